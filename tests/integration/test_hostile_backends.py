"""Backends that misbehave, and clients that hold resources: each gets the right status or a clean cut.

For every misbehaving backend (raw asyncio servers): the client sees the right status (502/504) or a
clean cut of a response already started; the pooled connection is never reused (the next request goes
to a fresh connection that sees only that request); and a well-behaved client on another route keeps
being served meanwhile. Then the client-side limits: connections per IP, the slow-POST rate floor,
requests per keep-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.process.app import App
from tests.helpers import (
    HEADER,
    Backend,
    GatewayFactory,
    RawConn,
    Resp,
    TcpBackend,
    assert_no_traceback,
    get,
    read_request,
    started_servers,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class HostileBackend(TcpBackend):
    """Connection 0 runs `first` (the misbehaviour); every later connection answers `fresh` correctly."""

    def __init__(self, first: Handler) -> None:
        super().__init__()
        self.first = first
        self.requests_per_conn: list[int] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.requests_per_conn)
        self.requests_per_conn.append(0)
        if index == 0:
            self.requests_per_conn[index] += 1
            await self.first(reader, writer)
            return
        for _ in range(1000):  # bounded keep-alive loop
            await read_request(reader)
            self.requests_per_conn[index] += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
            await writer.drain()


HostileFactory = Callable[[Handler], Awaitable[HostileBackend]]


@pytest.fixture
async def hostile_factory() -> AsyncIterator[HostileFactory]:
    async with started_servers(HostileBackend) as make:
        yield make


def two_routes(bad: str, good: str, client: str = "") -> str:
    text = (
        HEADER
        + f"upstreams:\n  bad:\n    targets: [{{address: {bad}}}]\n    retry: {{attempts: 1}}\n"
        + f"  good:\n    targets: [{{address: {good}}}]\n"
        + "routes:\n"
        + "  - name: bad\n    match: {path_prefix: /bad/}\n    upstream: bad\n"
        + "    timeouts: {connect: 1s, response: 500ms, idle: 2s}\n"
        + "  - name: good\n    upstream: good\n"
    )
    if client:
        text += f"client: {client}\n"
    return text


class Bystander:
    """A well-behaved client on the good route, requesting in a loop until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Bystander:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 10.0)
        assert self.errors == []
        assert self.statuses and all(s == 200 for s in self.statuses), self.statuses[-5:]

    async def _run(self) -> None:
        conn = await RawConn.open(self.port)
        try:
            for i in range(100000):  # bounded; stops when told
                if self._stop.is_set():
                    break
                await conn.send(get(f"/good/{i}"))
                r = await conn.response(timeout=3.0)
                self.statuses.append(r.status)
                await asyncio.sleep(0.01)  # a steady trickle, not a flood
        except Exception as e:  # reported by __aexit__
            self.errors.append(repr(e))
        finally:
            await conn.close()


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[Resp | None, bool, bytes]:
    """Send `data`; return (response or None when cut before a full response, closed?, raw bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = RawConn(reader, writer)
    try:
        await conn.send(data)
        try:
            r = await conn.response(timeout=timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None, True, b""
        try:
            rest = await conn.until_closed(0.5)
            return r, True, rest
        except AssertionError:
            return r, False, b""
    finally:
        await conn.close()


async def assert_fresh_connection_used(app: App, b: HostileBackend) -> None:
    """The misbehaving connection is never reused: the next request on the route goes to a new one."""
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(get("/bad/next"))
        r = await conn.response()
        assert (r.status, r.body) == (200, b"fresh")
    finally:
        await conn.close()
    assert len(b.requests_per_conn) >= 2
    assert b.requests_per_conn[0] == 1, b.requests_per_conn  # nothing else came on the hostile one


# ---- misbehaving backends ------------------------------------------------------------------------


async def _close_mid_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
    await writer.drain()


async def _close_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    await writer.drain()
    await asyncio.sleep(0.1)


async def _close_mid_chunked_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"\x00\x01garbage, not HTTP\r\n\r\n")
    await writer.drain()
    await reader.read()


async def _garbage_mid_chunked_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
    await writer.drain()
    await reader.read()


async def _head_never_ends(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(2000):  # 2000 x 100 B: far past any sane head, well before the response timeout
        writer.write(b"X-Filler-%d: %s\r\n" % (i, b"f" * 80))
        await writer.drain()
    await reader.read()


async def _never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await reader.read()  # until the gateway gives up and closes


async def _more_body_than_declared(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    # A second "response" right behind the first: whoever reuses this connection would get it.
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    )
    await writer.drain()
    await reader.read()


async def _more_body_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")  # on the now idle connection
    await writer.drain()
    await reader.read()


async def _early_answer_keep_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader, body=False)  # the body is never read
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
    await writer.drain()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(reader.read(), 5.0)


async def _early_answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader, body=False)
    writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig\n")
    await writer.drain()


def _framed(response: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response)
        await writer.drain()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(), 5.0)

    return handler


@pytest.mark.parametrize(
    ("handler", "status"),
    [
        (_close_mid_headers, 502),
        (_garbage, 502),
        (_head_never_ends, 502),
        (_never_answers, 504),
        (
            _framed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            502,
        ),
        (_framed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello"), 502),
        (_framed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"), 502),
        (_framed(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!"), 502),
        (_framed(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello"), 502),
        (_framed(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok"), 502),
        (_framed(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"), 502),
        (_framed(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok"), 502),
        (_framed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\nConnection: upgrade\r\n\r\n"), 502),
        (_framed(b"HTTP/1.1 99 Weird\r\nContent-Length: 2\r\n\r\nok"), 502),
    ],
    ids=[
        "close-mid-headers",
        "garbage",
        "head-never-ends",
        "never-answers",
        "cl-and-te",
        "te-and-cl",
        "two-content-lengths",
        "comma-content-length",
        "plus-content-length",
        "nul-in-header",
        "bare-lf",
        "obs-fold",
        "unrequested-101",
        "status-99",
    ],
)
async def test_backend_fails_before_the_head(
    handler: Handler,
    status: int,
    hostile_factory: HostileFactory,
    backend: Backend,
    gateway_factory: GatewayFactory,
) -> None:
    b = await hostile_factory(handler)
    app = await gateway_factory(two_routes(b.address, backend.address))
    loop = asyncio.get_running_loop()
    async with Bystander(app.proxy.port):
        t0 = loop.time()
        r, _, _ = await exchange(app.proxy.port, get("/bad/x"))
        assert r is not None
        assert r.status == status
        assert_no_traceback(r.body)
        assert r.body.startswith(str(status).encode())
        assert loop.time() - t0 < 3.0
        await assert_fresh_connection_used(app, b)


@pytest.mark.parametrize(
    "handler",
    [_close_mid_body, _close_mid_chunked_body, _garbage_mid_chunked_body],
    ids=["close-mid-body", "close-mid-chunked-body", "garbage-mid-chunked-body"],
)
async def test_backend_fails_mid_body_is_a_clean_cut(
    handler: Handler,
    hostile_factory: HostileFactory,
    backend: Backend,
    gateway_factory: GatewayFactory,
) -> None:
    """The head went out already: the only honest signal left is cutting the client connection."""
    b = await hostile_factory(handler)
    app = await gateway_factory(two_routes(b.address, backend.address))
    async with Bystander(app.proxy.port):
        reader, writer = await asyncio.open_connection("127.0.0.1", app.proxy.port)
        try:
            writer.write(get("/bad/x"))
            await writer.drain()
            got = b""
            for _ in range(100):  # until EOF or reset
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 3.0)
                except ConnectionError:
                    break
                if not chunk:
                    break
                got += chunk
        finally:
            writer.close()
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")
        # Never completed: no final chunk, or fewer bytes than Content-Length.
        head, _, body = got.partition(b"\r\n\r\n")
        if b"content-length: 100" in head.lower():
            assert len(body) < 100
        else:
            assert not body.endswith(b"0\r\n\r\n")
        await assert_fresh_connection_used(app, b)


@pytest.mark.parametrize("handler", [_more_body_than_declared, _more_body_later], ids=["same-read", "later"])
async def test_backend_sends_more_than_declared(
    handler: Handler,
    hostile_factory: HostileFactory,
    backend: Backend,
    gateway_factory: GatewayFactory,
) -> None:
    """The surplus never reaches anyone: the client gets the declared body, the connection is dropped."""
    b = await hostile_factory(handler)
    app = await gateway_factory(two_routes(b.address, backend.address))
    async with Bystander(app.proxy.port):
        conn = await RawConn.open(app.proxy.port)
        try:
            await conn.send(get("/bad/first"))
            r = await conn.response()
            assert (r.status, r.body) == (200, b"ok")
            await asyncio.sleep(0.3)  # the late surplus arrives on the idle pooled connection
            await conn.send(get("/bad/second"))  # same client, same route: must not get "evil"
            r2 = await conn.response()
            assert (r2.status, r2.body) == (200, b"fresh")
        finally:
            await conn.close()
        await assert_fresh_connection_used(app, b)


@pytest.mark.parametrize(
    ("handler", "status", "body"),
    [(_early_answer_keep_open, 200, b"early"), (_early_answer_and_close, 413, b"big\n")],
    ids=["keep-open", "and-close"],
)
async def test_backend_answers_before_reading_the_body(
    handler: Handler,
    status: int,
    body: bytes,
    hostile_factory: HostileFactory,
    backend: Backend,
    gateway_factory: GatewayFactory,
) -> None:
    """The answer is relayed at once; the rest of the upload is read and dropped, never sent on."""
    b = await hostile_factory(handler)
    app = await gateway_factory(two_routes(b.address, backend.address))
    size = 2_000_000
    async with Bystander(app.proxy.port):
        reader, writer = await asyncio.open_connection("127.0.0.1", app.proxy.port, limit=1 << 20)
        conn = RawConn(reader, writer)
        try:
            writer.write(b"POST /bad/upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
            writer.write(b"x" * 65536)
            await writer.drain()
            r = await conn.response()
            assert (r.status, r.body) == (status, body)
            sent = 65536
            with contextlib.suppress(ConnectionError):
                while sent < size:  # the client finishes its upload regardless
                    n = min(65536, size - sent)
                    writer.write(b"x" * n)
                    await writer.drain()
                    sent += n
            if (r.header("Connection") or "").lower() != "close":
                # The response said keep-alive: the connection goes on once the body is drained.
                await conn.send(get("/good/after"))
                assert (await conn.response()).status == 200
        finally:
            await conn.close()
        await assert_fresh_connection_used(app, b)


async def test_backend_until_close_with_unknown_coding(
    hostile_factory: HostileFactory,
    backend: Backend,
    gateway_factory: GatewayFactory,
) -> None:
    """`Transfer-Encoding: xchunked` is not chunked: the body runs to the close and is relayed whole."""

    async def xchunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        await writer.drain()

    b = await hostile_factory(xchunked)
    app = await gateway_factory(two_routes(b.address, backend.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(get("/bad/x"))
        r = await conn.response()
        assert r.status == 200
        assert r.body == b"5\r\nhello\r\n0\r\n\r\n"  # what llhttp read, re-framed for the client
    finally:
        await conn.close()
    await assert_fresh_connection_used(app, b)


# ---- client-side limits ---------------------------------------------------------------------------


async def _is_refused(port: int) -> bool:
    """True when the gateway drops a new connection at once (no response to a request)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(get("/good/probe"))
            await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(65536), 2.0)
        except ConnectionError:
            return True
        return data == b""
    finally:
        writer.close()


async def test_connections_per_ip_limit(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(
        HEADER
        + f"upstreams:\n  good:\n    targets: [{{address: {backend.address}}}]\n"
        + "routes:\n  - name: good\n    upstream: good\n"
        + "client: {max_connections_per_ip: 3}\n"
    )
    port = app.proxy.port
    conns = [await RawConn.open(port) for _ in range(3)]
    try:
        for i, c in enumerate(conns):
            await c.send(get(f"/held/{i}"))
            assert (await c.response()).status == 200
        assert await _is_refused(port)
        await conns[0].close()
        conns = conns[1:]
        # The slot is free again once the gateway saw the close.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while await _is_refused(port):
            assert loop.time() < deadline, "the freed slot was never reusable"
            await asyncio.sleep(0.05)
        for c in conns:  # the held connections were never disturbed
            await c.send(get("/again"))
            assert (await c.response()).status == 200
    finally:
        for c in conns:
            await c.close()


async def test_slow_post_is_cut_with_408(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(
        HEADER
        + f"upstreams:\n  good:\n    targets: [{{address: {backend.address}}}]\n"
        + "routes:\n  - name: good\n    upstream: good\n"
        + "client: {min_body_rate: 2KB, body_rate_window: 300ms}\n"
    )
    loop = asyncio.get_running_loop()
    async with Bystander(app.proxy.port):
        reader, writer = await asyncio.open_connection("127.0.0.1", app.proxy.port)
        conn = RawConn(reader, writer)
        t0 = loop.time()
        try:
            writer.write(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
            reading = asyncio.ensure_future(conn.response(timeout=5.0))
            for _ in range(100):  # 10 B per 50 ms = 200 B/s, far under the floor
                if reading.done():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(b"y" * 10)
                    await writer.drain()
                await asyncio.sleep(0.05)
            r = await reading
            assert r.status == 408
            assert (r.header("Connection") or "").lower() == "close"
            assert_no_traceback(r.body)
            assert 0.3 <= loop.time() - t0 < 3.0
        finally:
            await conn.close()
    # The request head went upstream at once; its partial body was abandoned with the connection.
    assert all(req.path != "/slow" or req.content_length == 100000 for req in backend.app["requests"])


async def test_upload_above_the_floor_is_not_cut(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(
        HEADER
        + f"upstreams:\n  good:\n    targets: [{{address: {backend.address}}}]\n"
        + "routes:\n  - name: good\n    upstream: good\n"
        + "client: {min_body_rate: 2KB, body_rate_window: 300ms}\n"
    )
    conn = await RawConn.open(app.proxy.port)
    try:
        size = 20 * 1024
        await conn.send(b"POST /steady HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(20):  # 1 KB per 50 ms = 20 KB/s, ten times the floor, for a second
            await conn.send(b"z" * 1024)
            await asyncio.sleep(0.05)
        r = await conn.response()
        assert r.status == 200
        assert b'"body_len": 20480' in r.body
    finally:
        await conn.close()


async def test_max_requests_per_connection(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(
        HEADER
        + f"upstreams:\n  good:\n    targets: [{{address: {backend.address}}}]\n"
        + "routes:\n  - name: good\n    upstream: good\n"
        + "client: {max_requests_per_connection: 3}\n"
    )
    conn = await RawConn.open(app.proxy.port)
    try:
        for i in range(3):
            await conn.send(get(f"/n/{i}"))
            r = await conn.response()
            assert r.status == 200
            closing = (r.header("Connection") or "").lower() == "close"
            assert closing == (i == 2), (i, r.headers)
        with contextlib.suppress(ConnectionError):
            await conn.send(get("/n/extra"))
        assert await conn.until_closed(3.0) == b""
    finally:
        await conn.close()
    assert [req.path for req in backend.app["requests"]] == ["/n/0", "/n/1", "/n/2"]


async def test_client_that_stops_reading_leaves_no_paused_pooled_connection(
    hostile_factory: HostileFactory,
    backend: Backend,
    gateway_factory: GatewayFactory,
) -> None:
    """A client that stops reading pauses the upstream; if the response still completes (the last read
    filled the client's buffer), the connection must not go back to the pool paused: the next request
    on it would never be read (a 504 for someone else)."""
    sizes = [2_000_000 + 250_000 * i for i in range(9)]

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for n in sizes:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + b"b" * n)
            await writer.drain()

    b = await hostile_factory(big)
    app = await gateway_factory(two_routes(b.address, backend.address))
    target = app.proxy.runtime.pools["bad"].targets[0]
    loop = asyncio.get_running_loop()
    for _ in sizes:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", app.proxy.port))
        _, writer = await asyncio.open_connection(sock=sock)
        writer.write(get("/bad/big"))
        await writer.drain()
        await asyncio.sleep(0.3)  # never read: the response piles up in the gateway
        assert not any(c.paused for c in target.idle if not c.closed)
        writer.transport.abort()
        await asyncio.sleep(0.05)
