"""The request fast path: a read that repeats the last plain request's head is served without llhttp.

Each test drives a real gateway over real sockets. The fast path must answer exactly as llhttp's
path does: a request on a connection whose previous plain request primed it is compared with the
same bytes sent on a fresh connection (always parsed by llhttp). `fast_requests`, a counter on the
client connection, tells which path served a request: without the fast path it stays 0.
"""

from __future__ import annotations

import json

import pytest

from gateway.client.connection import LEARN_GAP_MAX, ClientProtocol
from gateway.process.app import App
from tests.helpers import (
    Backend,
    BackendFactory,
    GatewayFactory,
    RawConn,
    Resp,
    assert_no_traceback,
    config_for,
    get,
    wait_for,
)

NULL_ROUTE = "  - {name: retired, match: {path_prefix: /null/}, upstream: null}\n"


def connection(app: App) -> ClientProtocol:
    """The gateway's only open client connection."""
    clients = list(app.proxy.clients)
    assert len(clients) == 1, clients
    return clients[0]


async def exchange(conn: RawConn, data: bytes, head_only: bool = False) -> Resp:
    await conn.send(data)
    resp = await conn.response(head_only=head_only)
    assert_no_traceback(resp.body)
    return resp


def echoed(resp: Resp) -> dict[str, object]:
    assert resp.status == 200, (resp.status, resp.body)
    seen: dict[str, object] = json.loads(resp.body)
    return seen


async def test_repeated_heads_take_the_fast_path(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    extra = "User-Agent: t\r\nX-Forwarded-For: 10.0.0.7\r\nAccept: */*\r\n"
    first = echoed(await exchange(conn, get("/a", extra=extra)))
    assert connection(app).fast_requests == 0  # the first request of a connection is parsed
    for path in ("/b", "/c?x=1&y=%20", "/a", "/d/e;p=1"):
        seen = echoed(await exchange(conn, get(path, extra=extra)))
        assert seen["path"] == path
        assert seen["method"] == "GET"
        assert seen["headers"] == first["headers"]  # Host, X-Forwarded-*, the client's own fields
    headers = first["headers"]
    assert isinstance(headers, dict)
    assert headers["Host"] == "test.local"
    assert headers["X-Forwarded-For"] == "10.0.0.7, 127.0.0.1"
    assert headers["User-Agent"] == "t"
    assert connection(app).fast_requests == 4
    head = await exchange(conn, get("/h", extra=extra, method="HEAD"), head_only=True)
    assert head.status == 200 and head.body == b""
    assert connection(app).fast_requests == 5
    assert [r.method for r in backend.app["requests"]][-1] == "HEAD"
    # Still in step: a request after the HEAD is answered with its own body.
    assert echoed(await exchange(conn, get("/after", extra=extra)))["path"] == "/after"
    assert connection(app).fast_requests == 6
    assert connection(app).requests == 7
    await conn.close()


async def test_a_changed_head_is_parsed_and_becomes_the_new_template(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    assert echoed(await exchange(conn, get("/1", host="a.test")))["headers"]["Host"] == "a.test"  # type: ignore[index]
    seen = echoed(await exchange(conn, get("/2", host="b.test")))  # another Host: not the template
    assert seen["headers"]["Host"] == "b.test"  # type: ignore[index]
    assert connection(app).fast_requests == 0
    seen = echoed(await exchange(conn, get("/3", host="b.test")))
    assert seen["headers"]["Host"] == "b.test"  # type: ignore[index]
    assert connection(app).fast_requests == 1
    # A body-carrying request with the same fields after the request line is parsed, body and all.
    post = b"POST /p HTTP/1.1\r\nHost: b.test\r\nContent-Length: 3\r\n\r\nabc"
    assert echoed(await exchange(conn, post))["method"] == "POST"
    assert connection(app).fast_requests == 1
    await conn.close()


# Requests sent on a primed connection and on a fresh one: the answers must agree.
VARIANTS: list[tuple[str, bytes, bool]] = [
    ("plain", get("/v"), True),
    ("query", get("/v?q=a,b&c=%2F"), True),
    ("every visible byte", get("/" + "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "#")), True),
    ("fragment", get("/v#frag"), True),  # fast, and refused by the same check as llhttp's path
    ("dot segment", get("/a/../b"), True),
    ("null route", get("/null/x"), True),
    ("HEAD", get("/v", method="HEAD"), True),
    ("POST", get("/v", method="POST"), False),
    ("lower-case method", get("/v", method="get"), False),
    ("asterisk", get("*", method="OPTIONS"), False),
    ("absolute form", get("http://test.local/v"), False),
    ("double space", b"GET  /v HTTP/1.1\r\nHost: test.local\r\n\r\n", False),
    ("tab in target", b"GET /a\tb HTTP/1.1\r\nHost: test.local\r\n\r\n", False),
    ("DEL in target", b"GET /a\x7fb HTTP/1.1\r\nHost: test.local\r\n\r\n", False),
    ("high byte in target", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: test.local\r\n\r\n", False),
    ("HTTP/1.0", b"GET /v HTTP/1.0\r\nHost: test.local\r\n\r\n", False),
    ("another field", get("/v", extra="X-A: 1\r\n"), False),
    ("Connection: close", get("/v", extra="Connection: close\r\n"), False),
    ("too long", get("/" + "a" * 9000), False),
]


def _answer(resp: Resp) -> tuple[int, str | None, object]:
    """What must agree between the two paths: status, Connection, and what the backend saw."""
    body: object = resp.body
    if resp.status == 200 and resp.body:
        seen = json.loads(resp.body)
        body = (seen["method"], seen["path"], sorted(seen["headers"].items()))
    return resp.status, resp.header("connection"), body


@pytest.mark.parametrize(("name", "data", "fast"), VARIANTS, ids=[v[0] for v in VARIANTS])
async def test_the_fast_path_answers_as_llhttp_does(
    backend: Backend, gateway_factory: GatewayFactory, name: str, data: bytes, fast: bool
) -> None:
    app = await gateway_factory(config_for(backend.address, extra_routes=NULL_ROUTE))
    head_only = data.startswith(b"HEAD")
    fresh = await RawConn.open(app.proxy.port)
    await wait_for(lambda: bool(app.proxy.clients))
    client = connection(app)  # held: a refused request closes the connection
    parsed = await exchange(fresh, data, head_only)
    assert client.fast_requests == 0
    await fresh.close()
    await wait_for(lambda: not app.proxy.clients)  # the gateway saw the connection go
    primed = await RawConn.open(app.proxy.port)
    echoed(await exchange(primed, get("/prime")))
    client = connection(app)
    answered = await exchange(primed, data, head_only)
    assert client.fast_requests == (1 if fast else 0), name
    assert _answer(answered) == _answer(parsed), name
    if answered.header("connection") != "close":
        assert echoed(await exchange(primed, get("/next")))["path"] == "/next"  # still in step
    await primed.close()


async def test_pipelined_repeats_are_parsed_in_order(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    echoed(await exchange(conn, get("/a")))
    # Two requests in one read, the last one repeating the template's head: not one fast request.
    await conn.send(get("/b") + get("/c"))
    assert echoed(await conn.response())["path"] == "/b"
    assert echoed(await conn.response())["path"] == "/c"
    assert connection(app).fast_requests == 0
    await conn.close()


async def test_the_fast_path_keeps_the_per_connection_request_limit(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(config_for(backend.address, client="{max_requests_per_connection: 3}"))
    conn = await RawConn.open(app.proxy.port)
    for i in range(3):
        resp = await exchange(conn, get(f"/{i}"))
        echoed(resp)
        assert (resp.header("connection") == "close") == (i == 2)
    assert await conn.until_closed() == b""
    await conn.close()


async def test_the_fast_path_serves_a_draining_gateway_with_close(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend = await backend_factory()
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    echoed(await exchange(conn, get("/a")))
    client = connection(app)
    client.holder.draining = True  # what a reload or a stop sets before the listener closes
    resp = await exchange(conn, get("/b"))
    assert echoed(resp)["path"] == "/b"
    assert resp.header("connection") == "close"
    assert client.fast_requests == 1
    assert await conn.until_closed() == b""
    client.holder.draining = False
    await conn.close()


async def test_heads_that_vary_back_off_learning_and_a_repeated_head_is_learned_again(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(config_for(backend.address))
    conn = await RawConn.open(app.proxy.port)
    for i in range(40):  # a field that changes every request: no template ever serves
        assert echoed(await exchange(conn, get("/v", extra=f"X-Seq: {i}\r\n")))["headers"]["X-Seq"] == str(i)  # type: ignore[index]
    client = connection(app)
    assert client.fast_requests == 0
    # Learned at requests 1, 2, 5, 9, 15, 25; the gap doubles after each wasted template.
    assert client.learn_gap == 32
    repeated = get("/r", extra="X-Seq: same\r\n")
    for _ in range(LEARN_GAP_MAX + 2):
        echoed(await exchange(conn, repeated))
        if client.fast_requests:
            break
    assert client.fast_requests == 1  # the skip ran out, the head was learned and served
    for _ in range(3):
        echoed(await exchange(conn, repeated))
    assert client.fast_requests == 4
    # A template that served resets the back-off: a new head is learned at once.
    other = get("/o", extra="X-Seq: other\r\n")
    echoed(await exchange(conn, other))
    assert client.learn_gap == 0
    assert echoed(await exchange(conn, other))["path"] == "/o"
    assert client.fast_requests == 5
    await conn.close()
