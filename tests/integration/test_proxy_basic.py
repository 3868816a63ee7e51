"""Round trips through the proxy: methods, headers, keep-alive, pipelining, HTTP/1.0, HEAD, 204/304."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from gateway.observe.stats import TargetStats
from gateway.process.app import App
from tests.helpers import Backend, BackendFactory, GatewayFactory, RawConn, config_for, get, proxy_url


def target_stats(app: App, index: int = 0, upstream: str = "api") -> TargetStats:
    return app.proxy.runtime.pools[upstream].targets[index].stats


# ---- plain round trips --------------------------------------------------------------------------


async def test_get_round_trip(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    async with aiohttp.ClientSession() as s, s.get(proxy_url(app, "/api/hello")) as r:
        assert r.status == 200
        data = await r.json()
    assert data["method"] == "GET"
    assert data["path"] == "/api/hello"
    assert data["body_len"] == 0
    assert len(backend.app["requests"]) == 1


async def test_post_round_trip(backend_factory: BackendFactory, gateway_factory: GatewayFactory) -> None:
    async def echo_body(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(
            body=body[::-1], headers={"X-Method": request.method, "X-Type": request.content_type}
        )

    bapp = web.Application()
    bapp.router.add_route("*", "/{tail:.*}", echo_body)
    b = await backend_factory(bapp)
    app = await gateway_factory(config_for(b.address))
    payload = bytes(range(256)) * 400
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy_url(app, "/submit"), data=payload, headers={"Content-Type": "application/x-test"}) as r,
    ):
        assert r.status == 200
        assert r.headers["X-Method"] == "POST"
        assert r.headers["X-Type"] == "application/x-test"
        assert await r.read() == payload[::-1]
    for method in ("PUT", "PATCH", "DELETE", "OPTIONS"):
        async with aiohttp.ClientSession() as s, s.request(method, proxy_url(app, "/m"), data=b"xyz") as r:
            assert r.status == 200
            assert r.headers["X-Method"] == method
            assert await r.read() == b"zyx"


async def test_query_string_preserved(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        target = "/api/search?q=a%20b&x=1&x=2&empty=&flag&u=%E2%9C%93"
        await conn.send(get(target))
        r = await conn.response()
        assert r.status == 200
    finally:
        await conn.close()
    import json

    assert json.loads(r.body)["path"] == target


async def test_host_passed_through(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy_url(app, "/h"), headers={"Host": "www.example.test:8443"}) as r,
    ):
        data = await r.json()
    assert data["headers"]["Host"] == "www.example.test:8443"
    assert data["headers"]["X-Forwarded-Host"] == "www.example.test:8443"
    assert data["headers"]["X-Forwarded-Proto"] == "http"


async def test_x_forwarded_for_appended(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy_url(app, "/a"), headers={"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}) as r:
            with_xff = await r.json()
        async with s.get(proxy_url(app, "/b")) as r:
            without = await r.json()
        # A client cannot choose the scheme or host the backend believes it was reached by.
        async with s.get(
            proxy_url(app, "/c"), headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.test"}
        ) as r:
            spoofed = await r.json()
    assert with_xff["headers"]["X-Forwarded-For"] == "203.0.113.7, 10.0.0.1, 127.0.0.1"
    assert without["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert spoofed["headers"]["X-Forwarded-Proto"] == "http"
    assert spoofed["headers"]["X-Forwarded-Host"] != "evil.test"


async def test_hop_by_hop_stripped_from_request(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(
            get(
                "/hop",
                extra=(
                    "Connection: keep-alive, X-Secret-Hop\r\n"
                    "X-Secret-Hop: do-not-forward\r\n"
                    "Keep-Alive: timeout=99\r\n"
                    "TE: trailers\r\n"
                    "Trailer: X-T\r\n"
                    "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
                    "Proxy-Connection: keep-alive\r\n"
                    "Upgrade: h2c\r\n"
                    "X-End-To-End: kept\r\n"
                ),
            )
        )
        r = await conn.response()
    finally:
        await conn.close()
    import json

    seen = {k.lower(): v for k, v in json.loads(r.body)["headers"].items()}
    for hop in (
        "x-secret-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ):
        assert hop not in seen, hop
    assert seen.get("connection", "keep-alive").lower() == "keep-alive"
    assert seen["x-end-to-end"] == "kept"


async def test_hop_by_hop_stripped_from_response(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    async def hoppy(request: web.Request) -> web.Response:
        return web.Response(
            text="hop\n",
            headers={
                "Connection": "keep-alive, X-Internal-Hop",
                "X-Internal-Hop": "secret",
                "Keep-Alive": "timeout=5, max=100",
                "Proxy-Authenticate": "Basic",
                "Trailer": "X-Checksum",
                "X-End-To-End": "kept",
            },
        )

    bapp = web.Application()
    bapp.router.add_get("/{tail:.*}", hoppy)
    b = await backend_factory(bapp)
    app = await gateway_factory(config_for(b.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(get("/x"))
        r = await conn.response()
        assert r.status == 200
        assert r.body == b"hop\n"
        for hop in ("X-Internal-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer"):
            assert not r.has(hop), hop
        assert r.header("X-End-To-End") == "kept"
        assert (r.header("Connection") or "keep-alive").lower() == "keep-alive"
        # The connection is still usable afterwards.
        await conn.send(get("/y"))
        assert (await conn.response()).status == 200
    finally:
        await conn.close()


# ---- connection reuse -------------------------------------------------------------------------


async def test_keepalive_reuse_both_sides(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    peers: list[tuple[str, int]] = []

    async def who(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok\n")

    bapp = web.Application()
    bapp.router.add_get("/{tail:.*}", who)
    b = await backend_factory(bapp)
    app = await gateway_factory(config_for(b.address))
    opened_before = target_stats(app).connections_opened
    conn = await RawConn.open(app.proxy.port)
    try:
        for i in range(30):
            await conn.send(get(f"/r{i}"))
            r = await conn.response()
            assert r.status == 200
            assert r.body == b"ok\n"
            assert r.header("Connection") is None or r.header("Connection") == "keep-alive"
    finally:
        await conn.close()
    assert len(peers) == 30
    assert len(set(peers)) == 1, "sequential requests on one client connection reuse one upstream connection"
    assert target_stats(app).connections_opened - opened_before == 1
    assert len(app.proxy.runtime.pools["api"].targets[0].idle) == 1


async def test_keepalive_reuse_across_clients(backend: Backend, gateway_factory: GatewayFactory) -> None:
    """Requests from several sequential client connections share the pooled upstream connection."""
    app = await gateway_factory(config_for(backend.address))
    opened_before = target_stats(app).connections_opened
    for i in range(5):
        async with aiohttp.ClientSession() as s, s.get(proxy_url(app, f"/c{i}")) as r:
            assert r.status == 200
            await r.read()
    assert target_stats(app).connections_opened - opened_before == 1


async def test_pipelining_in_order(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        # The first answer is the slowest: responses must still come back in request order.
        await conn.send(get("/sleep/0.1") + get("/api/second?n=2") + get("/status/201"))
        first = await conn.response()
        second = await conn.response()
        third = await conn.response()
        assert (first.status, first.body) == (200, b"slept\n")
        assert second.status == 200
        assert b'"path": "/api/second?n=2"' in second.body or b'"path":"/api/second?n=2"' in second.body
        assert (third.status, third.body) == (201, b"status\n")
        # The connection stays usable after the pipeline drained.
        await conn.send(get("/after"))
        assert (await conn.response()).status == 200
    finally:
        await conn.close()


async def test_pipelining_with_bodies(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        reqs = b"".join(
            f"POST /p{i} HTTP/1.1\r\nHost: t\r\nContent-Length: {i * 100}\r\n\r\n".encode() + b"x" * (i * 100)
            for i in range(1, 6)
        )
        await conn.send(reqs)
        import json

        for i in range(1, 6):
            r = await conn.response()
            assert r.status == 200
            data = json.loads(r.body)
            assert (data["path"], data["body_len"]) == (f"/p{i}", i * 100)
    finally:
        await conn.close()


# ---- protocol variants --------------------------------------------------------------------------


async def test_http10_client(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    # Plain HTTP/1.0: answered, then closed (no Host header needed).
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(b"GET /old HTTP/1.0\r\n\r\n")
        r = await conn.response()
        assert r.status == 200
        assert b"/old" in r.body
        assert (r.header("Connection") or "close").lower() == "close"
        assert await conn.until_closed() == b""
    finally:
        await conn.close()
    # HTTP/1.0 with keep-alive: the connection stays open for a second request.
    conn = await RawConn.open(app.proxy.port)
    try:
        for i in range(2):
            await conn.send(f"GET /ka{i} HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n".encode())
            r = await conn.response()
            assert r.status == 200
            assert (r.header("Connection") or "").lower() == "keep-alive"
            assert r.has("Content-Length")
    finally:
        await conn.close()


async def test_http10_client_streamed_response(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    """A chunked upstream answer cannot be re-framed for HTTP/1.0: sent close-delimited instead."""

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b"part%d;" % i)
        await resp.write_eof()
        return resp

    bapp = web.Application()
    bapp.router.add_get("/{tail:.*}", stream)
    b = await backend_factory(bapp)
    app = await gateway_factory(config_for(b.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(b"GET /s HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
        r = await conn.head()
        assert r.status == 200
        assert not r.has("Transfer-Encoding")
        assert await conn.until_closed() == b"part0;part1;part2;part3;part4;"
    finally:
        await conn.close()


async def test_head(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        await conn.send(get("/head-me", method="HEAD"))
        r = await conn.response(head_only=True)
        assert r.status == 200
        assert r.has("Content-Length")
        assert int(r.header("Content-Length") or 0) > 0
        # No body bytes may follow: the next response parses cleanly on the same connection.
        await conn.send(get("/next"))
        r2 = await conn.response()
        assert r2.status == 200
        assert b"/next" in r2.body
    finally:
        await conn.close()
    assert [r.method for r in backend.app["requests"]] == ["HEAD", "GET"]


async def test_204_and_304(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    try:
        for code in (204, 304, 204):
            await conn.send(get(f"/status/{code}"))
            r = await conn.response()
            assert r.status == code
            assert not r.has("Transfer-Encoding")
        await conn.send(get("/after"))
        r = await conn.response()
        assert r.status == 200
        assert b"/after" in r.body
        # Nothing stray is left on the wire.
        assert conn.reader.at_eof() is False
        assert len(conn.reader._buffer) == 0  # type: ignore[attr-defined]
    finally:
        await conn.close()


async def test_status_codes_pass_through(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    async with aiohttp.ClientSession() as s:
        for code in (201, 301, 400, 404, 418, 500, 502, 503):
            async with s.get(proxy_url(app, f"/status/{code}"), allow_redirects=False) as r:
                assert r.status == code
                assert await r.read() == b"status\n"


# ---- balancing through the proxy --------------------------------------------------------------


async def test_round_robin_weights_through_proxy(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    a = await backend_factory(name="a")
    b = await backend_factory(name="b")
    app = await gateway_factory(config_for(a.address, b.address, weights=(3, 1)))
    async with aiohttp.ClientSession() as s:
        names = []
        for i in range(40):
            async with s.get(proxy_url(app, f"/rr{i}")) as r:
                names.append((await r.json())["name"])
    assert names.count("a") == 30
    assert names.count("b") == 10
    # Smooth: never more than three in a row for the heavy target.
    assert "aaaa" not in "".join(names)


async def test_least_request_spreads(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    a = await backend_factory(name="a")
    b = await backend_factory(name="b")
    app = await gateway_factory(config_for(a.address, b.address, balance="least_request"))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(i: int) -> str:
            async with s.get(proxy_url(app, "/sleep/0.2")) as r:
                assert r.status == 200
                await r.read()
            return "x"

        await asyncio.gather(*(one(i) for i in range(20)))
    na, nb = len(a.app["requests"]), len(b.app["requests"])
    assert na + nb == 20
    # With both targets compared on every pick, in-flight counts stay balanced.
    assert abs(na - nb) <= 4, (na, nb)
    assert min(na, nb) >= 8
