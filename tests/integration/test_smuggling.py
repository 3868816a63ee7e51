"""Request smuggling: every vector of tests/data/smuggling.yaml against a gateway and a recording backend.

The backend is a raw asyncio server that keeps every byte it receives and reads them with a
deliberately strict HTTP/1.1 reader (what a re-serializing proxy may emit: single spaces, `: ` after
names, CRLF only, one Host, exactly one of Content-Length / chunked, lower-case hex chunk sizes without
extensions, no trailers). Each request it accepts is also fed alone to llhttp (httptools), which must
see exactly one message with the same method, target, fields and body and no byte left over. So a
vector passes only if the backend never sees a request the gateway did not parse the same way, and
never a second request hidden in the first.

`RecordingBackend`, `StrictRequestStream` and `read_responses` are reused by tests/fuzz.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest
import yaml

from gateway.process.app import App
from tests.conftest import HEADER, TcpBackend

CORPUS = Path(__file__).resolve().parents[1] / "data" / "smuggling.yaml"
SEGMENT_PAUSE_S = 0.05
SLOW_PREFIX = b"/slow"  # the recording backend answers these targets after SLOW_DELAY_S
SLOW_DELAY_S = 0.3

GatewayFactory = Callable[[str], Awaitable[App]]


def gateway_config(address: str, client: str = "{header_read_timeout: 3s}") -> str:
    return (
        HEADER
        + f"upstreams:\n  api:\n    targets: [{{address: {address}}}]\n"
        + "routes:\n  - name: api\n    upstream: api\n    timeouts: {connect: 1s, response: 5s, idle: 5s}\n"
        + f"client: {client}\n"
    )


# ---- the strict backend-side reader -------------------------------------------------------------

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*|\*) HTTP/1\.1")
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"): ((?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*))?)")
_HOST = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=%:\[\]]+")
_CHUNK_LINE = re.compile(rb"(0|[1-9a-f][0-9a-f]*)\r\n")
MAX_HEAD = 1 << 20


class StrictError(Exception):
    pass


@dataclass
class BackendRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return b", ".join(values) if values else None


class _LLHTTPCheck:
    """What llhttp makes of one forwarded message, to compare with the strict reader."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.messages = 0
        self.bytes_after_end = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_begin(self) -> None:
        if self.messages:
            self.bytes_after_end = True

    def on_message_complete(self) -> None:
        self.messages += 1


def llhttp_agrees(req: BackendRequest) -> str | None:
    """None when llhttp parses `req.raw` as exactly one message equal to `req`; else why not."""
    check = _LLHTTPCheck()
    parser = httptools.HttpRequestParser(check)
    try:
        parser.feed_data(req.raw)
    except httptools.HttpParserUpgrade as e:  # an upgrade request: llhttp stops right after it
        if e.args[0] != len(req.raw):
            return "llhttp stops before the end of the request"
    except httptools.HttpParserError as e:
        return f"llhttp rejects it: {e}"
    if check.messages != 1 or check.bytes_after_end:
        return f"llhttp sees {check.messages} messages"
    if parser.get_method() != req.method or check.url != req.target:
        return "llhttp reads another request line"
    if check.headers != req.headers or check.body != req.body:
        return "llhttp reads other fields or another body"
    return None


class StrictRequestStream:
    """Incremental reader of a backend connection's bytes; raises StrictError at the first deviation."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def at_boundary(self) -> bool:
        return self.pos == len(self.buf)

    def feed(self, data: bytes) -> list[BackendRequest]:
        self.buf += data
        out = []
        for _ in range(len(self.buf) + 1):  # bounded: every pass consumes a whole request or stops
            req = self._one()
            if req is None:
                break
            out.append(req)
        if self.pos > 1 << 16:
            del self.buf[: self.pos]
            self.pos = 0
        return out

    def _one(self) -> BackendRequest | None:
        buf, start = self.buf, self.pos
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buf) - start > MAX_HEAD:
                raise StrictError("head never ends")
            self._no_bare_cr_lf(bytes(buf[start:]), partial=True)
            return None
        head = bytes(buf[start:end])
        self._no_bare_cr_lf(head)
        lines = head.split(b"\r\n")
        m = _REQUEST_LINE.fullmatch(lines[0])
        if m is None:
            raise StrictError(f"bad request line {lines[0][:100]!r}")
        method, target = m.group(1), m.group(2)
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            f = _FIELD_LINE.fullmatch(line)
            if f is None:
                raise StrictError(f"bad field line {line[:100]!r}")
            headers.append((f.group(1), f.group(2)))
        lower = [(k.lower(), v) for k, v in headers]
        hosts = [v for k, v in lower if k == b"host"]
        if len(hosts) != 1 or _HOST.fullmatch(hosts[0]) is None:
            raise StrictError(f"Host fields {hosts!r}")
        cls = [v for k, v in lower if k == b"content-length"]
        tes = [v for k, v in lower if k == b"transfer-encoding"]
        if len(cls) > 1 or len(tes) > 1 or (cls and tes):
            raise StrictError(f"framing fields CL={cls!r} TE={tes!r}")
        if tes and tes[0] != b"chunked":
            raise StrictError(f"Transfer-Encoding {tes[0]!r}")
        if cls and re.fullmatch(rb"0|[1-9][0-9]*", cls[0]) is None:
            raise StrictError(f"Content-Length {cls[0]!r}")
        pos = end + 4
        if cls:
            n = int(cls[0])
            if len(buf) - pos < n:
                return None
            body = bytes(buf[pos : pos + n])
            pos += n
        elif tes:
            parts = []
            while True:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if len(buf) - pos > 32:
                        raise StrictError("chunk-size line too long")
                    return None
                c = _CHUNK_LINE.fullmatch(bytes(buf[pos : nl + 2]))
                if c is None:
                    raise StrictError(f"bad chunk-size line {bytes(buf[pos : nl + 2])[:40]!r}")
                size = int(c.group(1), 16)
                pos = nl + 2
                if size == 0:
                    if len(buf) - pos < 2:
                        return None
                    if buf[pos : pos + 2] != b"\r\n":
                        raise StrictError("trailer section or garbage after the last chunk")
                    pos += 2
                    break
                if len(buf) - pos < size + 2:
                    return None
                if buf[pos + size : pos + size + 2] != b"\r\n":
                    raise StrictError("chunk data not followed by CRLF")
                parts.append(bytes(buf[pos : pos + size]))
                pos += size + 2
            body = b"".join(parts)
        else:
            body = b""
        req = BackendRequest(method, target, headers, body, bytes(buf[start:pos]))
        why = llhttp_agrees(req)
        if why is not None:
            raise StrictError(why)
        self.pos = pos
        return req

    @staticmethod
    def _no_bare_cr_lf(head: bytes, partial: bool = False) -> None:
        stripped = head.replace(b"\r\n", b"")
        if partial:
            stripped = stripped.rstrip(b"\r")  # a CRLF cut in two by the read
        if b"\r" in stripped or b"\n" in stripped:
            raise StrictError("bare CR or LF in a head")


class RecordingBackend(TcpBackend):
    """A raw HTTP/1.1 backend that records every byte and answers each strict-parsed request with 200.

    The answer body is the request target; targets starting with /slow are answered after a pause.
    """

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[BackendRequest] = []
        self.errors: list[str] = []
        self.streams: list[bytearray] = []
        self.partial = 0  # connections that ended inside a request (the gateway cut an upload)
        self._tasks: set[asyncio.Task[None]] = set()

    def targets(self) -> list[bytes]:
        return [r.target for r in self.requests]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = StrictRequestStream()
        raw = bytearray()
        self.streams.append(raw)
        while True:
            data = await reader.read(65536)
            if not data:
                break
            raw += data
            if len(raw) > 1 << 20:
                del raw[: -(1 << 16)]  # a long-lived connection keeps only its recent bytes
            try:
                reqs = stream.feed(data)
            except StrictError as e:
                self.errors.append(f"{e}; stream tail {bytes(raw[-300:])!r}")
                break
            for r in reqs:
                self.requests.append(r)
                if r.target.startswith(SLOW_PREFIX):
                    await asyncio.sleep(SLOW_DELAY_S)
                body = b"" if r.method == b"HEAD" else r.target
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(r.target), body))
                await writer.drain()
        if not stream.at_boundary():
            self.partial += 1


@pytest.fixture
async def recording_backend() -> AsyncIterator[RecordingBackend]:
    b = RecordingBackend()
    await b.start()
    yield b
    await b.stop()


# ---- the client side --------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return b", ".join(values) if values else None


class _ResponseCollector:
    def __init__(self) -> None:
        self.done: list[Response] = []
        self.current: Response | None = None
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.current = Response(0)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.done.append(self.current)
        self.current = None


@dataclass
class ClientResult:
    responses: list[Response]
    closed: bool
    malformed: str | None = None  # the gateway's bytes were not valid HTTP responses
    leftover: bool = False  # a response started but did not finish before the close / timeout


async def read_responses(
    reader: asyncio.StreamReader, count: int, wait_close: bool, timeout: float = 5.0
) -> ClientResult:
    """Parse responses with llhttp until `count` arrived (then, if `wait_close`, until EOF) or time is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    col = _ResponseCollector()
    closed = False
    malformed = None
    while loop.time() < deadline:
        if len(col.done) >= count and not wait_close:
            break
        try:
            data = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - loop.time()))
        except TimeoutError:
            break
        except (ConnectionError, OSError):
            closed = True
            break
        if not data:
            closed = True
            break
        if malformed is not None:
            continue  # unparseable already: only see whether the gateway closes
        try:
            col.parser.feed_data(data)
        except httptools.HttpParserError as e:
            malformed = f"{e}: {data[:200]!r}"
            if not wait_close:
                break
    return ClientResult(col.done, closed, malformed, col.current is not None)


async def play(
    port: int, segments: list[bytes], count: int, wait_close: bool, timeout: float = 5.0
) -> ClientResult:
    """Write `segments` (pausing between them) while reading responses, as a client would."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    reading = asyncio.ensure_future(read_responses(reader, count, wait_close, timeout))
    try:
        for i, seg in enumerate(segments):
            if i:
                await asyncio.sleep(SEGMENT_PAUSE_S)
            if reading.done() or writer.is_closing():
                break  # answered and closed: the rest would only meet a reset
            writer.write(seg)
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
        return await reading
    finally:
        reading.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


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
