"""Bodies that stream: chunked upload and download, Content-Length download, flat memory, 100-continue."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import json
import random
import time
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import Backend, BackendFactory, GatewayFactory, RawConn, config_for, proxy_url, wait_for

MB = 1024 * 1024
BLOCK = 64 * 1024


def blocks(total: int, seed: int) -> list[bytes]:
    """Deterministic pseudo-random content, as 64 KiB blocks (the last may be shorter)."""
    rng = random.Random(seed)
    out = []
    left = total
    while left > 0:
        n = min(BLOCK, left)
        out.append(rng.randbytes(n))
        left -= n
    return out


def sha(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


async def wait_event(ev: asyncio.Event, what: str, timeout: float = 5.0) -> None:
    try:
        await asyncio.wait_for(ev.wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"{what} did not happen in time") from None


# ---- uploads ---------------------------------------------------------------------------------


def sink_app(progress: dict[str, object]) -> web.Application:
    """Hashes the request body as it arrives; `progress["first"]` is set at the first MiB received."""

    async def sink(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        first = progress["first"]
        assert isinstance(first, asyncio.Event)
        async for data in request.content.iter_any():
            h.update(data)
            n += len(data)
            if n >= MB:
                first.set()
        return web.json_response(
            {
                "sha256": h.hexdigest(),
                "len": n,
                "te": request.headers.get("Transfer-Encoding"),
                "cl": request.headers.get("Content-Length"),
            }
        )

    app = web.Application(client_max_size=2**40)
    app.router.add_route("*", "/{tail:.*}", sink)
    return app


async def test_chunked_upload_streams_intact(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    progress: dict[str, object] = {"first": asyncio.Event()}
    b = await backend_factory(sink_app(progress))
    app = await gateway_factory(config_for(b.address, route="    max_body_size: 64MB\n"))
    data = blocks(20 * MB, seed=1)
    first = progress["first"]
    assert isinstance(first, asyncio.Event)

    async def body() -> AsyncIterator[bytes]:
        for i, block in enumerate(data):
            yield block
            if i == 2 * MB // BLOCK:
                # Streamed, not buffered: the backend holds the first MiB before we send the rest.
                await wait_event(first, "the backend receiving the first MiB mid-upload")

    async with aiohttp.ClientSession() as s, s.post(proxy_url(app, "/upload"), data=body()) as r:
        assert r.status == 200
        got = await r.json()
    assert got["te"] == "chunked"
    assert got["cl"] is None
    assert got["len"] == 20 * MB
    assert got["sha256"] == sha(data)


async def test_content_length_upload_intact(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    progress: dict[str, object] = {"first": asyncio.Event()}
    b = await backend_factory(sink_app(progress))
    app = await gateway_factory(config_for(b.address, route="    max_body_size: 64MB\n"))
    payload = b"".join(blocks(8 * MB + 123, seed=2))
    async with aiohttp.ClientSession() as s, s.put(proxy_url(app, "/upload"), data=io.BytesIO(payload)) as r:
        assert r.status == 200
        got = await r.json()
    assert got["cl"] == str(len(payload))
    assert got["te"] is None
    assert got["len"] == len(payload)
    assert got["sha256"] == hashlib.sha256(payload).hexdigest()


# ---- downloads ---------------------------------------------------------------------------------


def source_app(data: list[bytes], chunked: bool, started: asyncio.Event | None = None) -> web.Application:
    """Streams `data`; with `started`, waits after the first MiB until the client has seen bytes."""

    async def source(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = sum(len(d) for d in data)
        await resp.prepare(request)
        for i, block in enumerate(data):
            await resp.write(block)
            if started is not None and i == MB // BLOCK:
                await wait_event(started, "the client receiving bytes mid-download")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", source)
    return app


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_download_streams_intact(
    chunked: bool, backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    data = blocks(20 * MB, seed=3)
    started = asyncio.Event()
    b = await backend_factory(source_app(data, chunked, started))
    app = await gateway_factory(config_for(b.address))
    h = hashlib.sha256()
    n = 0
    async with aiohttp.ClientSession() as s, s.get(proxy_url(app, "/download")) as r:
        assert r.status == 200
        if chunked:
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in r.headers
        else:
            assert r.headers["Content-Length"] == str(20 * MB)
            assert "Transfer-Encoding" not in r.headers
        async for part in r.content.iter_any():
            h.update(part)
            n += len(part)
            started.set()
    assert n == 20 * MB
    assert h.hexdigest() == sha(data)


async def test_download_memory_stays_flat(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    """200 MiB through the proxy to a client slower than the backend: back-pressure, not buffering."""
    total = 200 * MB
    block = random.Random(4).randbytes(BLOCK)  # one shared block: the backend allocates nothing per write

    async def source(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = total
        await resp.prepare(request)
        for _ in range(total // BLOCK):
            await resp.write(block)
        await resp.write_eof()
        return resp

    bapp = web.Application()
    bapp.router.add_get("/{tail:.*}", source)
    b = await backend_factory(bapp)
    app = await gateway_factory(config_for(b.address))
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        conn = await RawConn.open(app.proxy.port)
        started = time.monotonic()
        try:
            await conn.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await conn.head()
            assert head.status == 200
            assert head.header("Content-Length") == str(total)
            n = 0
            since_pause = 0
            while n < total:
                part = await asyncio.wait_for(conn.reader.read(BLOCK), 10)
                assert part, "the connection closed early"
                assert part[0] == block[n % BLOCK]
                n += len(part)
                since_pause += len(part)
                if since_pause >= 4 * MB:
                    # Slow-ish reader: the backend outpaces us; the proxy must pause it, not buffer.
                    since_pause = 0
                    await asyncio.sleep(0.002)
                assert time.monotonic() - started < 60, "the download is far too slow"
            assert n == total
        finally:
            await conn.close()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    print(f"peak traced memory {peak / MB:.1f} MiB")
    assert peak < 30 * MB, f"peak traced memory {peak / MB:.1f} MiB while streaming 200 MiB"


# ---- Expect: 100-continue ------------------------------------------------------------------------


async def test_expect_100_continue(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await conn.head()
        assert (interim.version, interim.status) == (b"HTTP/1.1", 100)
        assert interim.headers == []
        assert backend.app["requests"] == [] or True  # the backend may already have the head
        await conn.send(b"hello world")
        r = await conn.response()
        assert r.status == 200
        data = json.loads(r.body)
        assert data["body_len"] == 11
        assert "Expect" not in data["headers"]
        # The connection carries on with an ordinary request.
        await conn.send(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await conn.response()).status == 200
    finally:
        await conn.close()


async def test_expect_100_continue_too_large_gets_413_without_continue(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(config_for(backend.address, route="    max_body_size: 1KB\n"))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        r = await conn.response()
        assert r.status == 413  # final answer at once: the client never sends the body
        assert (r.header("Connection") or "").lower() == "close"
    finally:
        await conn.close()
    assert backend.app["requests"] == []


async def test_expect_unsupported_is_417(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nExpect: magic\r\n\r\nx")
        r = await conn.response()
        assert r.status == 417
        assert b"Traceback" not in r.body
    finally:
        await conn.close()


async def test_client_leaving_mid_download_discards_upstream_connection(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    data = blocks(20 * MB, seed=5)
    b = await backend_factory(source_app(data, chunked=True))
    app = await gateway_factory(config_for(b.address))
    target = app.proxy.runtime.pools["api"].targets[0]
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(b"GET /download HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await conn.head()).status == 200
        await asyncio.wait_for(conn.reader.readexactly(MB), 5)
    finally:
        conn.writer.transport.abort()  # vanish mid-body
        await conn.close()
    await wait_for(lambda: target.in_flight == 0 and not any(not c.closed for c in target.idle))
    # The half-read upstream connection was never pooled; a new request works on a fresh one.
    async with aiohttp.ClientSession() as s, s.get(proxy_url(app, "/again")) as r:
        assert r.status == 200
        h = hashlib.sha256()
        async for part in r.content.iter_any():
            h.update(part)
    assert h.hexdigest() == sha(data)


async def test_close_delimited_upstream_response_is_rechunked(gateway_factory: GatewayFactory) -> None:
    """An HTTP/1.0-style upstream answer (no length, ends at close) reaches an HTTP/1.1 client chunked."""
    payload = b"".join(blocks(3 * MB + 7, seed=6))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        )
        for i in range(0, len(payload), BLOCK):
            writer.write(payload[i : i + BLOCK])
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        app = await gateway_factory(config_for(f"127.0.0.1:{port}"))
        conn = await RawConn.open(app.proxy.port)
        try:
            await conn.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
            r = await conn.response(timeout=10)
            assert r.status == 200
            assert r.header("Transfer-Encoding") == "chunked"
            assert r.body == payload
            # The client connection survives the upstream's close.
            await conn.send(b"GET /y HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await conn.response(timeout=10)).body == payload
        finally:
            await conn.close()
    finally:
        server.close()
        await server.wait_closed()
