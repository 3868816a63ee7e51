"""WebSocket through the proxy: the 101 upgrade and a byte tunnel both ways."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType, web

from tests.helpers import BackendFactory, GatewayFactory, RawConn, config_for, proxy_url


def ws_app(seen: list[dict[str, str]]) -> web.Application:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        seen.append(dict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data == "close-please":
                    await ws.close(code=4000, message=b"bye")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="plain\n")

    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_get("/{tail:.*}", plain)
    return app


async def test_websocket_echo(backend_factory: BackendFactory, gateway_factory: GatewayFactory) -> None:
    seen: list[dict[str, str]] = []
    b = await backend_factory(ws_app(seen))
    app = await gateway_factory(config_for(b.address))
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(proxy_url(app, "/ws"), timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws,
    ):
        await ws.send_str("hello")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo:hello")
        await ws.send_bytes(b"\x00\x01\x02binary")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"yranib\x02\x01\x00")
        # Many messages and a large one, in order.
        for i in range(50):
            await ws.send_str(f"m{i}")
        for i in range(50):
            msg = await ws.receive(timeout=5)
            assert msg.data == f"echo:m{i}"
        big = bytes(range(256)) * 4096  # 1 MiB
        await ws.send_bytes(big)
        msg = await ws.receive(timeout=10)
        assert msg.data == big[::-1]
    (headers,) = seen
    assert headers["Upgrade"].lower() == "websocket"
    assert "upgrade" in headers["Connection"].lower()
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert "Sec-WebSocket-Key" in headers


async def test_websocket_server_close_reaches_client(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    seen: list[dict[str, str]] = []
    b = await backend_factory(ws_app(seen))
    app = await gateway_factory(config_for(b.address))
    async with aiohttp.ClientSession() as s, s.ws_connect(proxy_url(app, "/ws")) as ws:
        await ws.send_str("close-please")
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE
        assert msg.data == 4000
        assert msg.extra == "bye"
    assert ws.closed
    assert ws.close_code == 4000


async def test_websocket_handshake_on_raw_socket(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    """The 101 head is relayed with Connection: Upgrade; after it the connection is a tunnel."""
    seen: list[dict[str, str]] = []
    b = await backend_factory(ws_app(seen))
    app = await gateway_factory(config_for(b.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        r = await conn.head()
        assert r.status == 101
        assert (r.header("Upgrade") or "").lower() == "websocket"
        assert (r.header("Connection") or "").lower() == "upgrade"
        assert r.header("Sec-WebSocket-Accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        # A masked text frame "hi" (RFC 6455 §5.7 style), echoed back unmasked as "echo:hi".
        mask = b"\x01\x02\x03\x04"
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(b"hi"))
        await conn.send(b"\x81\x82" + mask + payload)
        frame = await asyncio.wait_for(conn.reader.readexactly(2 + 7), 5)
        assert frame == b"\x81\x07echo:hi"
    finally:
        await conn.close()


async def test_plain_request_with_upgrade_header_only_is_not_upgraded(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    seen: list[dict[str, str]] = []
    b = await backend_factory(ws_app(seen))
    app = await gateway_factory(config_for(b.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        # Upgrade without `Connection: upgrade` is not an upgrade request (and Upgrade is hop-by-hop).
        await conn.send(b"GET /plain HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\r\n")
        r = await conn.response()
        assert (r.status, r.body) == (200, b"plain\n")
        await conn.send(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await conn.response()).body == b"plain\n"
    finally:
        await conn.close()
