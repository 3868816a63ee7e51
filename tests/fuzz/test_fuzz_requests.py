"""Malformed and mutated requests at the proxy socket (hypothesis), and request_head re-serialization.

Each example mutates a valid request (byte flips, inserted CR/LF/NUL/space/colon/framing fields,
deleted bytes, duplicated or swapped lines, lying chunk framing), writes it in one to three reads,
half-closes, and reads until the gateway closes. Properties:

- the gateway answers with well-formed HTTP responses (parsed with llhttp) or closes, and closes once
  the client half-closed (nothing waits on a request that cannot complete);
- the backend (tests.integration.test_smuggling.RecordingBackend) only ever gets strictly re-serialized
  requests that llhttp parses alone as exactly one message, with no byte left over;
- it gets no request the client's bytes did not contain (the targets forwarded are a subsequence of
  those llhttp reads from the client stream), and every 200 the client got is one of them, in order;
- the gateway survives: a valid request on a new connection still works after every example.

`FuzzHarness` is reused by tests/fuzz/campaign.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cluster.upstream_connection import request_head
from gateway.config.parse import load_text
from gateway.pipeline.exchange import Exchange
from gateway.process.app import App
from tests.integration.test_smuggling import (
    ClientResult,
    RecordingBackend,
    StrictRequestStream,
    gateway_config,
    play,
    read_responses,
)

SEEDS: list[bytes] = [
    b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /b?x=1 HTTP/1.1\r\nHost: t\r\nAccept: */*\r\nX-A: b\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /d HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\n\r\n",
    b"GET /e HTTP/1.1\r\nHost: t\r\n\r\nPOST /f HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /g HTTP/1.0\r\nHost: t\r\n\r\n",
    b"PUT /h HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://t/i HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /j HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"DELETE /k HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-H\r\nX-H: 1\r\n\r\n",
    b"POST /l HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-T: 1\r\n\r\n"
    b"GET /m HTTP/1.1\r\nHost: t\r\n\r\n",
]

INSERTS: list[bytes] = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b",",
    b";",
    b"\x7f",
    b"\xff",
    b"0",
    b"f",
    b"\r\n\r\n",
    b"\r\n ",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Host: x\r\n",
    b"Connection: upgrade\r\nUpgrade: h2c\r\n",
    b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n",
]

_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.sampled_from(INSERTS)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 4)),
    st.tuples(st.just("dup_line"), st.integers(0, 64), st.just(0)),
    st.tuples(st.just("swap_lines"), st.integers(0, 64), st.integers(0, 64)),
)


def mutate(data: bytes, ops: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(data)
    for name, a, b in ops:
        if name == "flip" and buf:
            buf[a % len(buf)] ^= int(b)  # type: ignore[call-overload]
        elif name == "insert":
            pos = a % (len(buf) + 1)
            buf[pos:pos] = b  # type: ignore[assignment]
        elif name == "delete" and buf:
            pos = a % len(buf)
            del buf[pos : pos + int(b)]  # type: ignore[call-overload]
        elif name in ("dup_line", "swap_lines"):
            lines = bytes(buf).split(b"\r\n")
            i = a % len(lines)
            if name == "dup_line":
                lines.insert(i, lines[i])
            else:
                j = int(b) % len(lines)  # type: ignore[call-overload]
                lines[i], lines[j] = lines[j], lines[i]
            buf = bytearray(b"\r\n".join(lines))
    return bytes(buf)


@st.composite
def chunked_request(draw: st.DrawFn) -> bytes:
    """A chunked POST with random chunk framing: sizes that may lie, odd hex, extensions, trailers."""
    parts = [b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for data in draw(st.lists(st.binary(max_size=24), max_size=4)):
        size = max(0, len(data) + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 7])))
        fmt = draw(st.sampled_from([b"%x", b"%X", b"00%x", b"%x;e=1", b'%x;e="q"', b"%x ", b"%x\t", b"+%x"]))
        parts.append(fmt % size + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"])) + data + b"\r\n")
    parts.append(draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b"0\r\n", b"", b"0;z\r\n\r\n"])))
    return b"".join(parts)


@st.composite
def mutated_requests(draw: st.DrawFn) -> list[bytes]:
    """The client's bytes, as the reads they arrive in."""
    seed = draw(st.one_of(st.sampled_from(SEEDS), chunked_request()))
    data = mutate(seed, draw(st.lists(_op, max_size=5)))
    cuts = sorted(draw(st.lists(st.integers(0, max(0, len(data))), max_size=2)))
    bounds = [0, *cuts, len(data)]
    return [data[x:y] for x, y in itertools.pairwise(bounds) if y > x] or [b""]


# ---- the oracle ------------------------------------------------------------------------------------


class _Targets:
    def __init__(self) -> None:
        self.targets: list[bytes] = []
        self.url = b""

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        url = self.url
        if url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            rest = url[url.find(b"//") + 2 :]
            slash = rest.find(b"/")
            url = rest[slash:] if slash >= 0 else b"/"
        self.targets.append(url)


def client_targets(data: bytes) -> list[bytes]:
    """The request targets llhttp reads from the client's bytes (up to an error or an upgrade)."""
    t = _Targets()
    with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
        httptools.HttpRequestParser(t).feed_data(data)
    return t.targets


def is_subsequence(small: list[bytes], big: list[bytes]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


async def play_half_closed(port: int, segments: list[bytes], timeout: float = 5.0) -> ClientResult:
    """Write the reads (a short pause between), half-close, and read responses until the gateway closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    reading = asyncio.ensure_future(read_responses(reader, 1 << 30, True, timeout))
    try:
        with contextlib.suppress(ConnectionError, OSError):
            for i, seg in enumerate(segments):
                if i:
                    await asyncio.sleep(0.002)
                writer.write(seg)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        return await reading
    finally:
        reading.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


@dataclass
class Outcome:
    statuses: list[int]
    forwarded: int


class FuzzHarness:
    """A gateway before a RecordingBackend on a private event loop; `run(segments)` checks one example."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.backend = RecordingBackend()
        self.app: App | None = None
        self.examples = 0
        self.forwarded = 0
        self.statuses: dict[int, int] = {}

    def __enter__(self) -> FuzzHarness:
        self.loop.run_until_complete(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.run_until_complete(self._stop())
        self.loop.close()

    async def _start(self) -> None:
        await self.backend.start()
        limits = "{header_read_timeout: 2s, keepalive_timeout: 5s}"
        self.app = App(load_text(gateway_config(self.backend.address, limits), "<fuzz>"))
        await self.app.start()

    async def _stop(self) -> None:
        if self.app is not None:
            await self.app.stop()
        await self.backend.stop()

    def run(self, segments: list[bytes]) -> Outcome:
        return self.loop.run_until_complete(self.check(segments))

    async def check(self, segments: list[bytes]) -> Outcome:
        assert self.app is not None
        port = self.app.proxy.port
        b = self.backend
        del b.requests[:-1]  # bounded memory over long campaigns
        b.streams.clear()
        n0, e0 = len(b.requests), len(b.errors)
        data = b"".join(segments)
        result = await play_half_closed(port, segments)
        finals = [r for r in result.responses if r.status >= 200]
        head_request = b"HEAD" in data  # llhttp cannot frame responses to HEAD without being told
        if not head_request:
            assert result.malformed is None, f"malformed response: {result.malformed}"
            assert not result.leftover, "a response was cut"
        assert result.closed, "the gateway did not close after the client's half-close"
        for r in result.responses:
            assert 100 <= r.status <= 599, r.status
            assert b"Traceback" not in r.body
        # The backend: nothing it could not parse exactly like llhttp, nothing the client did not send.
        assert b.errors[e0:] == [], b.errors[e0:]
        forwarded = [r.target for r in b.requests[n0:]]
        assert is_subsequence(forwarded, client_targets(data)), (forwarded, client_targets(data))
        ok = [r.body for r in finals if r.status == 200]
        if not head_request:
            assert is_subsequence(ok, forwarded), (ok, forwarded)
            assert len(forwarded) - len(ok) <= 1, (forwarded, [r.status for r in finals])
        # The gateway is alive and its pooled backend connections are in sync.
        canary = await play(port, [b"GET /canary HTTP/1.1\r\nHost: t\r\n\r\n"], 1, False)
        assert [(r.status, r.body) for r in canary.responses] == [(200, b"/canary")], canary
        assert b.errors == [] and b.requests[-1].target == b"/canary"
        self.examples += 1
        self.forwarded += len(forwarded)
        for r in finals:
            self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
        return Outcome([r.status for r in finals], len(forwarded))


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
