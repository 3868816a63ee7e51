"""Request smuggling: every vector of tests/data/smuggling.yaml against a gateway and a recording backend.

The backend is a raw asyncio server that keeps every byte it receives and reads them with a
deliberately strict HTTP/1.1 reader (what a re-serializing proxy may emit: single spaces, `: ` after
names, CRLF only, one Host, exactly one of Content-Length / chunked, lower-case hex chunk sizes without
extensions, no trailers). Each request it accepts is also fed alone to llhttp (httptools), which must
see exactly one message with the same method, target, fields and body and no byte left over. So a
vector passes only if the backend never sees a request the gateway did not parse the same way, and
never a second request hidden in the first.

The backend, its reader and the client (`RecordingBackend`, `StrictRequestStream`, `play`) live in
tests/helpers.py: tests/fuzz uses them too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.helpers import (
    DATA,
    BackendRequest,
    GatewayFactory,
    RecordingBackend,
    StrictError,
    StrictRequestStream,
    gateway_config,
    play,
    started_servers,
)

CORPUS = DATA / "smuggling.yaml"


@pytest.fixture
async def recording_backend() -> AsyncIterator[RecordingBackend]:
    async with started_servers(RecordingBackend) as make:
        yield await make()


# ---- the corpus ------------------------------------------------------------------------------------------


def _bytes(text: str) -> bytes:
    return text.encode("latin-1")


@dataclass
class Vector:
    name: str
    family: str
    segments: list[bytes]
    statuses: list[int]
    close: bool
    backend: list[dict[str, Any]]


def load_vectors() -> list[Vector]:
    doc = yaml.safe_load(CORPUS.read_text(encoding="utf-8"))
    out = []
    for v in doc["vectors"]:
        send = v["send"] if isinstance(v["send"], list) else [v["send"]]
        for marker, (text, n) in (v.get("repeat") or {}).items():
            send = [s.replace(marker, text * n) for s in send]
        exp = v["expect"]
        if exp == "reject":
            exp = {"status": 400}
        statuses = exp["status"] if isinstance(exp["status"], list) else [exp["status"]]
        close = exp.get("close", statuses[-1] >= 400)
        out.append(
            Vector(v["name"], v["family"], [_bytes(s) for s in send], statuses, close, exp.get("backend", []))
        )
    return out


VECTORS = load_vectors()


def check_backend_request(got: BackendRequest, want: dict[str, Any]) -> None:
    assert got.method == _bytes(want["method"]), (got.method, want)
    assert got.target == _bytes(want["target"]), (got.target, want)
    for name, value in (want.get("headers") or {}).items():
        assert got.header(_bytes(name)) == _bytes(str(value)), (name, got.headers)
    for name in want.get("absent") or ():
        assert got.header(_bytes(name)) is None, (name, got.headers)
    if "body" in want:
        assert got.body == _bytes(want["body"]), got.body[:200]


def test_corpus_is_well_formed() -> None:
    names = [v.name for v in VECTORS]
    assert len(names) == len(set(names))
    assert len(VECTORS) >= 100
    for v in VECTORS:
        assert all(s >= 400 for s in v.statuses[len(v.backend) :]), v.name  # forwarded ones are answered


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
async def test_vector(
    vector: Vector, recording_backend: RecordingBackend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(gateway_config(recording_backend.address))
    port = app.proxy.port
    result = await play(port, vector.segments, len(vector.statuses), vector.close)
    assert result.malformed is None, result.malformed
    assert [r.status for r in result.responses] == vector.statuses, [
        (r.status, r.body[:80]) for r in result.responses
    ]
    for r in result.responses:
        assert b"Traceback" not in r.body
        if r.status >= 400:
            assert (r.header(b"Connection") or b"").lower() == b"close"
    if vector.close:
        assert result.closed, "the gateway kept the connection open"
        assert not result.leftover
    # The backend saw exactly the expected, re-serialized requests, and nothing it could not parse.
    assert recording_backend.errors == []
    assert len(recording_backend.requests) == len(vector.backend), recording_backend.targets()
    for got, want in zip(recording_backend.requests, vector.backend, strict=True):
        check_backend_request(got, want)
    for i, r in enumerate(result.responses[: len(vector.backend)]):
        assert r.body == recording_backend.requests[i].target  # each answer belongs to its request
    # The gateway is fine and the backend connection it may pool is in sync: a fresh client is served.
    canary = await play(port, [b"GET /canary HTTP/1.1\r\nHost: t\r\n\r\n"], 1, False)
    assert [(r.status, r.body) for r in canary.responses] == [(200, b"/canary")]
    assert recording_backend.errors == []
    assert all(b"smuggled" not in t for t in recording_backend.targets()), recording_backend.targets()
    assert recording_backend.targets()[-1] == b"/canary"


async def test_strict_reader_catches_a_hidden_request() -> None:
    """The backend's reader is the oracle: check that it does flag what the vectors guard against."""
    for bad in (
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n",
        b"GET /a HTTP/1.1\nHost: t\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;x\r\nhello\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 05\r\n\r\nhello",
        b"GET /a HTTP/1.0\r\nHost: t\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: t\r\nX-A:  b\r\n\r\n",
    ):
        with pytest.raises(StrictError):
            StrictRequestStream().feed(bad)
    reqs = StrictRequestStream().feed(
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    assert [(r.method, r.target, r.body) for r in reqs] == [(b"POST", b"/a", b"hello"), (b"GET", b"/b", b"")]
