"""Malformed and mutated requests at the proxy socket (hypothesis), and request_head re-serialization.

Each example mutates a valid request (byte flips, inserted CR/LF/NUL/space/colon/framing fields,
deleted bytes, duplicated or swapped lines, lying chunk framing), writes it in one to three reads,
half-closes, and reads until the gateway closes. Properties:

- the gateway answers with well-formed HTTP responses (parsed with llhttp) or closes, and closes once
  the client half-closed (nothing waits on a request that cannot complete);
- the backend (tests.helpers.RecordingBackend) only ever gets strictly re-serialized
  requests that llhttp parses alone as exactly one message, with no byte left over;
- it gets no request the client's bytes did not contain (the targets forwarded are a subsequence of
  those llhttp reads from the client stream), and every 200 the client got is one of them, in order;
- the gateway survives: a valid request on a new connection still works after every example.

The harness (`FuzzHarness`, `mutated_requests`) lives in tests/helpers.py: tests/fuzz/campaign.py
runs it too.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cluster.upstream_connection import request_head
from gateway.pipeline.exchange import Exchange
from tests.helpers import (
    SEEDS,
    FuzzHarness,
    StrictRequestStream,
    client_targets,
    mutated_requests,
)


@pytest.fixture(scope="module")
def harness() -> object:
    with FuzzHarness() as h:
        yield h
        print(
            f"\nfuzz: {h.examples} examples, {h.forwarded} forwarded, statuses {sorted(h.statuses.items())}"
        )


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(segments=mutated_requests())
def test_fuzzed_requests_at_the_proxy_socket(harness: FuzzHarness, segments: list[bytes]) -> None:
    harness.run(segments)


def test_seeds_are_served(harness: FuzzHarness) -> None:
    """The unmutated seeds are valid: all forwarded (the oracle is not vacuous)."""
    for seed in SEEDS:
        out = harness.run([seed])
        assert out.forwarded == len(client_targets(seed)), (seed, out)
        assert all(s == 200 for s in out.statuses), (seed, out)


# ---- request_head: the re-serialization itself ---------------------------------------------------------

_TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SPECIAL = {
    b"host",
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"keep-alive",
    b"upgrade",
    b"te",
    b"trailer",
    b"expect",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}
_names = st.binary(min_size=1, max_size=12).map(lambda b: bytes(_TCHAR[x % len(_TCHAR)] for x in b))
_vchar = [*range(0x21, 0x7F), *range(0x80, 0x100)]
_values = st.lists(st.sampled_from([*_vchar, 0x20, 0x09]), max_size=24).map(lambda v: bytes(v).lstrip(b" \t"))
_path = st.lists(st.sampled_from(b"abcxyz019-._~!$&'()*+,;=:@/%?"), max_size=30).map(
    lambda p: b"/" + bytes(p)
)
_host = st.lists(st.sampled_from(b"abcxyz019-._~:[]"), min_size=1, max_size=20).map(bytes)


@settings(max_examples=300, deadline=None, database=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]),
    url=_path,
    host=st.one_of(st.just(b""), _host),
    headers=st.lists(st.tuples(_names, _values), max_size=8),
    extra_tokens=st.lists(st.sampled_from([b"keep-alive", b"close", b"x-drop", b""]), max_size=3),
    drop_some=st.booleans(),
    framing=st.sampled_from(["none", "length", "chunked", "upgrade"]),
    forwarded_for=st.one_of(st.none(), st.just(b"10.0.0.1"), st.just(b"10.0.0.1, 10.0.0.2")),
)
def test_request_head_reserializes_exactly(
    method: bytes,
    url: bytes,
    host: bytes,
    headers: list[tuple[bytes, bytes]],
    extra_tokens: list[bytes],
    drop_some: bool,
    framing: str,
    forwarded_for: bytes | None,
) -> None:
    headers = [(n, v) for n, v in headers if n.lower() not in _SPECIAL]
    ex = Exchange(0.0)
    ex.method, ex.url, ex.host, ex.headers, ex.forwarded_for = method, url, host, headers, forwarded_for
    tokens = list(extra_tokens)
    if drop_some and headers:
        tokens.append(headers[0][0].lower())
    ex.conn_tokens = tuple(tokens) or None
    body = b""
    if framing == "length":
        ex.content_length = 7
        body = b"x" * 7
    elif framing == "chunked":
        ex.chunked = True
        body = b"3\r\nabc\r\n0\r\n\r\n"
    elif framing == "upgrade":
        ex.upgrade = b"websocket"
    raw = request_head(ex, b"192.0.2.1", b"https", b"127.0.0.1:9") + body
    reqs = StrictRequestStream().feed(raw)  # strict, and llhttp alone agrees on every field
    assert len(reqs) == 1 and reqs[0].raw == raw
    r = reqs[0]
    drop = {t for t in tokens if t not in (b"keep-alive", b"close", b"upgrade", b"")}
    want = [(b"Host", host or b"127.0.0.1:9")]
    want += [(n, v) for n, v in headers if n.lower() not in drop]
    want.append((b"X-Forwarded-For", (forwarded_for + b", " if forwarded_for else b"") + b"192.0.2.1"))
    want.append((b"X-Forwarded-Proto", b"https"))
    if host:
        want.append((b"X-Forwarded-Host", host))
    if framing == "chunked":
        want.append((b"Transfer-Encoding", b"chunked"))
    elif framing == "length":
        want.append((b"Content-Length", b"7"))
    elif framing == "upgrade":
        want += [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    assert (r.method, r.target, r.headers) == (method, url, want)
    assert r.body == (b"abc" if framing == "chunked" else body)
