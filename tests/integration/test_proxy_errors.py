"""Errors produced by the proxy itself: limits, timeouts, unreachable or misbehaving upstreams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from tests.helpers import (
    HEADER,
    Backend,
    BackendFactory,
    GatewayFactory,
    RawConn,
    Resp,
    TcpBackend,
    assert_no_traceback,
    config_for,
    free_port,
    get,
    skip_body,
    started_servers,
)


async def one_shot(port: int, data: bytes) -> tuple[Resp, bytes]:
    """Send `data`, read one response, then whatever follows until the proxy closes (must close)."""
    conn = await RawConn.open(port)
    try:
        await conn.send(data)
        r = await conn.response()
        rest = await conn.until_closed()
    finally:
        await conn.close()
    assert_no_traceback(r.body)
    return r, rest


# ---- raw upstreams that misbehave on purpose ------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawBackend(TcpBackend):
    """An asyncio server speaking HTTP by hand; `handler(reader, writer, connection_index)`."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.connections = 0
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        await self.handler(reader, writer, index)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request head (and its Content-Length body); None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        self.requests += 1
        await skip_body(reader, head)
        return head


RawBackendFactory = Callable[[Handler], Awaitable[RawBackend]]


@pytest.fixture
async def raw_backend_factory() -> AsyncIterator[RawBackendFactory]:
    async with started_servers(RawBackend) as make:
        yield make


# ---- request limits --------------------------------------------------------------------------


async def test_413_content_length_over_limit(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address, route="    max_body_size: 1KB\n"))
    r, _ = await one_shot(
        app.proxy.port, b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 2048\r\n\r\n" + b"x" * 2048
    )
    assert r.status == 413
    assert (r.header("Connection") or "").lower() == "close"
    assert backend.app["requests"] == []
    # Exactly at the limit is fine.
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024)
        assert (await conn.response()).status == 200
    finally:
        await conn.close()


async def test_nothing_served_after_413_close(backend: Backend, gateway_factory: GatewayFactory) -> None:
    """A request pipelined behind a rejected body is never served: the answer said `Connection: close`."""
    app = await gateway_factory(config_for(backend.address, route="    max_body_size: 1KB\n"))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r, rest = await one_shot(
        app.proxy.port,
        b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 2048\r\n\r\n" + b"x" * 2048 + get("/smuggled"),
    )
    assert r.status == 413
    assert rest == b""
    assert loop.time() - t0 < 1.0  # closed once the body was drained, not after a linger
    assert backend.app["requests"] == []


async def test_413_chunked_body_over_limit(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address, route="    max_body_size: 1KB\n"))
    chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
        await conn.send(chunk)
        r = await conn.response()
        assert r.status == 413
        assert_no_traceback(r.body)
        assert (r.header("Connection") or "").lower() == "close"
        with contextlib.suppress(ConnectionError):  # the proxy may read and drop, or have closed already
            await conn.send(chunk + b"0\r\n\r\n")
        await conn.until_closed()
    finally:
        await conn.close()
    # Whatever reached the backend, it never saw a complete 2 KiB body.
    for req in backend.app["requests"]:
        assert req.content_length is None


async def test_431_header_too_large(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address, client="{max_header_bytes: 16KB}"))
    r, _ = await one_shot(app.proxy.port, get("/x", extra=f"X-Big: {'a' * 20000}\r\n"))
    assert r.status == 431
    assert (r.header("Connection") or "").lower() == "close"
    assert backend.app["requests"] == []


async def test_431_too_many_headers(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address, client="{max_headers: 20}"))
    many = "".join(f"X-H{i}: {i}\r\n" for i in range(30))
    r, _ = await one_shot(app.proxy.port, get("/x", extra=many))
    assert r.status == 431


async def test_414_url_too_long(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address, client="{max_url_bytes: 8KB}"))
    r, _ = await one_shot(app.proxy.port, get("/x?" + "q" * 9000))
    assert r.status == 414
    assert backend.app["requests"] == []


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello on the plain port
        b"GET / HTTP/9.9\r\nHost: t\r\n\r\n",
        b"GET /x HTTP/1.1\r\n\r\n",  # no Host in HTTP/1.1
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /a/../../etc/passwd HTTP/1.1\r\nHost: t\r\n\r\n",
    ],
    ids=["garbage", "tls", "version", "no-host", "two-hosts", "two-cl", "cl-and-te", "dotdot"],
)
async def test_400_and_close(data: bytes, backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    r, rest = await one_shot(app.proxy.port, data)
    assert r.status == 400
    assert (r.header("Connection") or "").lower() == "close"
    assert rest == b""
    assert backend.app["requests"] == []


async def test_bad_request_after_good_one_in_pipeline(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(get("/ok") + b"NOT HTTP AT ALL\r\n\r\n")
        first = await conn.response()
        second = await conn.response()
        assert (first.status, second.status) == (200, 400)
        await conn.until_closed()
    finally:
        await conn.close()


# ---- routing outcomes -------------------------------------------------------------------------


async def test_404_no_route_keeps_connection(backend: Backend, gateway_factory: GatewayFactory) -> None:
    text = (
        HEADER
        + f"upstreams:\n  api:\n    targets: [{{address: {backend.address}}}]\n"
        + "routes:\n  - name: api\n    match: {path_prefix: /api/}\n    upstream: api\n"
    )
    app = await gateway_factory(text)
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(get("/other"))
        r = await conn.response()
        assert r.status == 404
        assert_no_traceback(r.body)
        await conn.send(get("/api/yes"))
        assert (await conn.response()).status == 200
    finally:
        await conn.close()
    assert [req.path for req in backend.app["requests"]] == ["/api/yes"]


async def test_null_route_503_retry_after(backend: Backend, gateway_factory: GatewayFactory) -> None:
    text = (
        HEADER
        + f"upstreams:\n  api:\n    targets: [{{address: {backend.address}}}]\n"
        + "routes:\n"
        + "  - name: retired\n    match: {path_prefix: /old/}\n    upstream: null\n    retry_after: 7\n"
        + "  - name: api\n    upstream: api\n"
    )
    app = await gateway_factory(text)
    loop = asyncio.get_running_loop()
    conn = await RawConn.open(app.proxy.port)
    try:
        t0 = loop.time()
        await conn.send(get("/old/thing"))
        r = await conn.response()
        assert loop.time() - t0 < 1.0  # at once
        assert r.status == 503
        assert r.header("Retry-After") == "7"
        assert_no_traceback(r.body)
        # HEAD gets the same answer without a body; the connection stays usable.
        await conn.send(get("/old/thing", method="HEAD"))
        h = await conn.response(head_only=True)
        assert h.status == 503
        await conn.send(get("/new"))
        assert (await conn.response()).status == 200
    finally:
        await conn.close()
    assert [req.path for req in backend.app["requests"]] == ["/new"]


# ---- upstream failures ---------------------------------------------------------------------------


async def test_502_connection_refused(gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(f"127.0.0.1:{free_port()}"))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(get("/x"))
        r = await conn.response()
        assert r.status == 502
        assert_no_traceback(r.body)
        await conn.send(get("/y"))  # a failed upstream does not cost the client its connection
        assert (await conn.response()).status == 502
    finally:
        await conn.close()
    assert app.proxy.runtime.pools["api"].targets[0].stats.connect_errors >= 2


async def test_504_response_timeout(backend_factory: BackendFactory, gateway_factory: GatewayFactory) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 10)
        return web.Response(text="late\n")

    bapp = web.Application()
    bapp.router.add_get("/{tail:.*}", hang)
    b = await backend_factory(bapp)
    app = await gateway_factory(
        config_for(b.address, route="    timeouts: {connect: 1s, response: 200ms, idle: 60s}\n")
    )
    loop = asyncio.get_running_loop()
    conn = await RawConn.open(app.proxy.port)
    try:
        t0 = loop.time()
        await conn.send(get("/slow"))
        r = await conn.response()
        elapsed = loop.time() - t0
        assert r.status == 504
        assert_no_traceback(r.body)
        assert 0.15 <= elapsed < 2.0, elapsed
    finally:
        release.set()
        await conn.close()
    assert app.proxy.runtime.pools["api"].targets[0].stats.timeouts >= 1


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"THIS IS NOT HTTP\r\n\r\n")
    await writer.drain()
    await reader.read()


async def _rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
    await reader.readuntil(b"\r\n\r\n")  # then close without a word


async def _smuggle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
    await writer.drain()
    await reader.read()


@pytest.mark.parametrize(
    "backend_does",
    [_garbage, _rude, _smuggle],
    ids=["invalid_response", "closes_before_answering", "ambiguous_framing"],
)
async def test_502_when_the_upstream_answers_badly(
    raw_backend_factory: RawBackendFactory,
    gateway_factory: GatewayFactory,
    backend_does: Handler,
) -> None:
    b = await raw_backend_factory(backend_does)
    app = await gateway_factory(config_for(b.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(get("/x"))
        r = await conn.response()
        assert r.status == 502
        assert_no_traceback(r.body)
    finally:
        await conn.close()


# ---- stale pooled connections ------------------------------------------------------------------


async def test_backend_closes_pooled_connection_after_answer(
    raw_backend_factory: RawBackendFactory, gateway_factory: GatewayFactory
) -> None:
    """The backend answers with keep-alive, then closes: the next request still succeeds."""
    b: RawBackend

    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        if await b.read_request(reader) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n%d\r\n" % index)
        await writer.drain()

    b = await raw_backend_factory(one_then_close)
    app = await gateway_factory(config_for(b.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        for i in range(4):
            await conn.send(get(f"/r{i}"))
            r = await conn.response()
            assert r.status == 200, r
            assert r.body == b"%d\r\n" % i
    finally:
        await conn.close()
    assert b.connections == 4


async def test_stale_pooled_connection_retried_on_fresh_one(
    raw_backend_factory: RawBackendFactory, gateway_factory: GatewayFactory
) -> None:
    """The keep-alive race: the backend drops a pooled connection as the next request arrives.

    Nothing was answered and the request had no body, so the proxy retries once on a new connection.
    """
    b: RawBackend

    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        if await b.read_request(reader) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await b.read_request(reader)  # a second request on this connection: close without answering

    b = await raw_backend_factory(first_only)
    app = await gateway_factory(config_for(b.address))
    stats = app.proxy.runtime.pools["api"].targets[0].stats
    opened = stats.connections_opened
    conn = await RawConn.open(app.proxy.port)
    try:
        for i in range(3):
            await conn.send(get(f"/r{i}"))
            r = await conn.response()
            assert (r.status, r.body) == (200, b"ok")
    finally:
        await conn.close()
    # r0 on c0; r1 dies on pooled c0 and is retried on c1; r2 likewise dies on c1, retried on c2.
    assert b.connections == 3
    assert b.requests == 5
    assert stats.connections_opened - opened == 3


async def test_stale_pooled_connection_not_retried_after_body(
    raw_backend_factory: RawBackendFactory, gateway_factory: GatewayFactory
) -> None:
    """A request whose body already went out on the dead connection is never sent twice: 502."""
    b: RawBackend

    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        if await b.read_request(reader) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await b.read_request(reader)

    b = await raw_backend_factory(first_only)
    app = await gateway_factory(config_for(b.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(get("/first"))
        assert (await conn.response()).status == 200
        await conn.send(b"POST /pay HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        r = await conn.response()
        assert r.status == 502
        assert_no_traceback(r.body)
    finally:
        await conn.close()
    assert b.requests == 2  # the POST reached the backend exactly once


# ---- client-side timeouts ----------------------------------------------------------------------


async def test_slowloris_gets_408_and_close(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address, client="{header_read_timeout: 300ms}"))
    loop = asyncio.get_running_loop()
    conn = await RawConn.open(app.proxy.port)
    try:
        t0 = loop.time()
        await conn.send(b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Partial: ")  # ... and stall
        r = await conn.response(timeout=3.0)
        elapsed = loop.time() - t0
        assert r.status == 408
        assert_no_traceback(r.body)
        assert (r.header("Connection") or "").lower() == "close"
        assert await conn.until_closed(3.0) == b""
        assert 0.25 <= elapsed < 2.0, elapsed
    finally:
        await conn.close()
    assert backend.app["requests"] == []


async def test_silent_connection_closed_after_header_timeout(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(config_for(backend.address, client="{header_read_timeout: 300ms}"))
    conn = await RawConn.open(app.proxy.port)
    try:
        assert await conn.until_closed(3.0) == b""  # closed quietly, no response
    finally:
        await conn.close()


async def test_keepalive_idle_timeout_closes(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address, client="{keepalive_timeout: 300ms}"))
    loop = asyncio.get_running_loop()
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(get("/x"))
        assert (await conn.response()).status == 200
        t0 = loop.time()
        assert await conn.until_closed(3.0) == b""
        elapsed = loop.time() - t0
        assert 0.25 <= elapsed < 2.0, elapsed
    finally:
        await conn.close()


async def test_active_connection_not_closed_by_keepalive_timeout(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    """Requests spaced under the idle timeout keep one connection alive past the timeout."""
    app = await gateway_factory(config_for(backend.address, client="{keepalive_timeout: 300ms}"))
    loop = asyncio.get_running_loop()
    conn = await RawConn.open(app.proxy.port)
    try:
        t0 = loop.time()
        n = 0
        while loop.time() - t0 < 0.8 and n < 200:
            await conn.send(get(f"/k{n}"))
            assert (await conn.response()).status == 200
            n += 1
            await asyncio.sleep(0.05)  # the thing under test: a client pausing well under the timeout
    finally:
        await conn.close()
    assert n >= 5  # every request went over the one connection: it was never closed


async def test_error_bodies_never_contain_tracebacks(gateway_factory: GatewayFactory) -> None:
    text = (
        HEADER
        + f"upstreams:\n  dead:\n    targets: [{{address: 127.0.0.1:{free_port()}}}]\n"
        + "routes:\n"
        + "  - {name: dead, match: {path_prefix: /dead/}, upstream: dead}\n"
        + "  - {name: retired, match: {path_prefix: /null/}, upstream: null}\n"
        + "  - {name: small, match: {path_prefix: /small/}, upstream: dead, max_body_size: 10}\n"
    )
    app = await gateway_factory(text)
    cases = [
        get("/nowhere"),
        get("/dead/x"),
        get("/null/x"),
        b"POST /small/x HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"z" * 100,
        b"BAD\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ]
    statuses = []
    for data in cases:
        conn = await RawConn.open(app.proxy.port)
        try:
            await conn.send(data)
            r = await conn.response()
        finally:
            await conn.close()
        assert r.status >= 400
        assert_no_traceback(r.body)
        assert r.body.startswith(str(r.status).encode()), r.body
        statuses.append(r.status)
    assert statuses == [404, 502, 503, 413, 400, 405, 501]
