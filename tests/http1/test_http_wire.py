"""HTTP/1.1 wire helpers: request re-serialization for the upstream and canned responses."""

from __future__ import annotations

import asyncio

import httptools
import pytest

from gateway import http1
from gateway.cluster.upstream_connection import request_head
from gateway.pipeline.exchange import Exchange


def exchange(
    method: bytes = b"GET",
    url: bytes = b"/",
    host: bytes = b"example.com",
    headers: list[tuple[bytes, bytes]] | None = None,
    conn_tokens: tuple[bytes, ...] | None = None,
    forwarded_for: bytes | None = None,
) -> Exchange:
    ex = Exchange(0.0)
    ex.method = method
    ex.url = url
    ex.host = host
    ex.headers = headers or []
    ex.conn_tokens = conn_tokens
    ex.forwarded_for = forwarded_for
    return ex


def parse_head(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Parse with llhttp (what a real upstream would do): request line and ordered header fields."""
    assert raw.endswith(b"\r\n\r\n")
    fields: list[tuple[bytes, bytes]] = []
    url = []

    class Cb:
        def on_url(self, u: bytes) -> None:
            url.append(u)

        def on_header(self, name: bytes, value: bytes) -> None:
            fields.append((name, value))

    parser = httptools.HttpRequestParser(Cb())
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade as e:
        assert e.args[0] == len(raw)  # an upgrade request: nothing after the head
    assert parser.get_http_version() == "1.1"
    return parser.get_method() + b" " + b"".join(url), fields


def names(fields: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in fields]


def value(fields: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    found = [v for n, v in fields if n.lower() == name]
    assert len(found) <= 1, f"{name!r} appears {len(found)} times"
    return found[0] if found else None


def test_basic_head() -> None:
    ex = exchange(url=b"/a/b?x=1&y=%20", headers=[(b"Accept", b"*/*"), (b"X-Trace", b"t1")])
    raw = request_head(ex, b"10.1.2.3", b"http", b"127.0.0.1:9001")
    assert raw.startswith(b"GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost: example.com\r\n")
    line, fields = parse_head(raw)
    assert line == b"GET /a/b?x=1&y=%20"
    assert value(fields, b"host") == b"example.com"
    assert value(fields, b"accept") == b"*/*"
    assert value(fields, b"x-trace") == b"t1"
    assert value(fields, b"x-forwarded-for") == b"10.1.2.3"
    assert value(fields, b"x-forwarded-proto") == b"http"
    assert value(fields, b"x-forwarded-host") == b"example.com"
    assert value(fields, b"content-length") is None
    assert value(fields, b"transfer-encoding") is None
    assert value(fields, b"connection") is None


def test_header_order_and_case_preserved() -> None:
    hdrs = [(b"X-B", b"2"), (b"x-a", b"1"), (b"Set-Thing", b"a"), (b"Set-Thing", b"b")]
    _, fields = parse_head(request_head(exchange(headers=hdrs), b"1.1.1.1", b"http", b"d"))
    assert [f for f in fields if f[0] in (b"X-B", b"x-a", b"Set-Thing")] == hdrs


def test_x_forwarded_for_appended() -> None:
    ex = exchange(forwarded_for=b"203.0.113.9, 10.0.0.2")
    _, fields = parse_head(request_head(ex, b"192.0.2.1", b"http", b"d"))
    assert value(fields, b"x-forwarded-for") == b"203.0.113.9, 10.0.0.2, 192.0.2.1"


def test_x_forwarded_proto_https() -> None:
    _, fields = parse_head(request_head(exchange(), b"192.0.2.1", b"https", b"d"))
    assert value(fields, b"x-forwarded-proto") == b"https"


def test_missing_host_uses_default_and_no_forwarded_host() -> None:
    ex = exchange(host=b"")
    raw = request_head(ex, b"192.0.2.1", b"http", b"127.0.0.1:9001")
    _, fields = parse_head(raw)
    assert value(fields, b"host") == b"127.0.0.1:9001"
    assert value(fields, b"x-forwarded-host") is None


def test_headers_named_in_connection_removed() -> None:
    hdrs = [(b"X-Hop", b"1"), (b"x-other-hop", b"2"), (b"X-Keep", b"3")]
    ex = exchange(headers=hdrs, conn_tokens=(b"keep-alive", b"x-hop", b"x-other-hop"))
    _, fields = parse_head(request_head(ex, b"1.1.1.1", b"http", b"d"))
    assert b"x-hop" not in names(fields)
    assert b"x-other-hop" not in names(fields)
    assert value(fields, b"x-keep") == b"3"


def test_connection_keep_alive_close_tokens_drop_nothing() -> None:
    hdrs = [(b"Keep-Alive-Ish", b"x"), (b"Close-Reason", b"y")]
    ex = exchange(headers=hdrs, conn_tokens=(b"keep-alive", b"close", b""))
    _, fields = parse_head(request_head(ex, b"1.1.1.1", b"http", b"d"))
    assert value(fields, b"keep-alive-ish") == b"x"
    assert value(fields, b"close-reason") == b"y"


def test_content_length_and_chunked_framing() -> None:
    ex = exchange(method=b"POST")
    ex.content_length = 1234
    _, fields = parse_head(request_head(ex, b"1.1.1.1", b"http", b"d"))
    assert value(fields, b"content-length") == b"1234"
    assert value(fields, b"transfer-encoding") is None
    ex = exchange(method=b"POST")
    ex.chunked = True
    _, fields = parse_head(request_head(ex, b"1.1.1.1", b"http", b"d"))
    assert value(fields, b"transfer-encoding") == b"chunked"
    assert value(fields, b"content-length") is None


def test_upgrade_is_forwarded_only_as_upgrade() -> None:
    ex = exchange(conn_tokens=(b"upgrade",))
    ex.upgrade = b"websocket"
    _, fields = parse_head(request_head(ex, b"1.1.1.1", b"http", b"d"))
    assert value(fields, b"connection") == b"Upgrade"
    assert value(fields, b"upgrade") == b"websocket"


class CaptureTransport:
    """Enough of a transport for the protocols: keeps what is written."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Wired:
    """A ClientProtocol and one pooled UpstreamProtocol of a real server config, on fake transports:
    the data plane's callbacks end to end without sockets."""

    def __init__(self, route_extra: str = "") -> None:
        from gateway.client.connection import ClientProtocol
        from gateway.client.listener import ProxyServer
        from gateway.cluster.upstream_connection import UpstreamProtocol
        from gateway.config.parse import load_text

        config = (
            "listen: 127.0.0.1:0\nhealth_listen: null\nadmin_listen: null\n"
            "upstreams: {api: {targets: [{address: 127.0.0.1:9}]}}\n"
            f"routes: [{{name: api, match: {{path_prefix: /}}, upstream: api{route_extra}}}]\n"
        )
        loop = asyncio.get_running_loop()
        server = ProxyServer(load_text(config))
        self.target = server.runtime.pools["api"].targets[0]
        self.upstream_side = CaptureTransport()
        self.up = UpstreamProtocol(self.target, loop)
        self.up.connection_made(self.upstream_side)  # type: ignore[arg-type]
        self.target.idle.append(self.up)  # a pooled connection: requests are written to it at once
        self.client_side = CaptureTransport()
        self.client = ClientProtocol(server.holder, loop, server.clients, server.runtime.config.client)
        self.client.connection_made(self.client_side)  # type: ignore[arg-type]

    def exchange(self, request: bytes, response: bytes) -> bytes:
        """What the client receives for `request` when the backend answers `response`."""
        self.client_side.out.clear()
        self.client.data_received(request)
        self.up.data_received(response)
        return b"".join(self.client_side.out)


async def test_client_protocol_drops_hop_by_hop_before_request_head() -> None:
    """End to end through the real parser callbacks: hop-by-hop request fields never reach the head
    the upstream connection is sent."""
    wired = Wired()
    client, upstream_side = wired.client, wired.upstream_side
    client.data_received(
        b"GET /x HTTP/1.1\r\nHost: h.test\r\n"
        b"Connection: keep-alive, X-Private\r\nX-Private: s\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nTrailer: X-T\r\nProxy-Authorization: Basic x\r\nProxy-Connection: keep-alive\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nX-Forwarded-For: 1.2.3.4\r\n"
        b"Accept: */*\r\n\r\n"
    )
    _, fields = parse_head(b"".join(upstream_side.out))
    got = names(fields)
    for hop in (
        b"x-private",
        b"keep-alive",
        b"te",
        b"trailer",
        b"proxy-authorization",
        b"proxy-connection",
        b"connection",
    ):
        assert hop not in got, hop
    assert value(fields, b"x-forwarded-proto") == b"http"
    assert value(fields, b"x-forwarded-host") == b"h.test"
    assert value(fields, b"x-forwarded-for") == b"1.2.3.4, 127.0.0.1"
    assert value(fields, b"accept") == b"*/*"


async def test_repeated_response_heads_reuse_the_result_and_changed_ones_do_not() -> None:
    """A target's last response head is remembered with what it became; a head differing in any byte
    (another length, a close) is worked out again."""
    wired = Wired()
    get = b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n"
    for _ in range(2):
        out = wired.exchange(get, head % (5, b"keep-alive") + b"hello")
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nhello")
        assert b"Content-Length: 5\r\n" in out and b"keep-alive" not in out.lower()
    memo = wired.target.head_memo
    assert memo is not None and memo[2] == b"5"
    fast = wired.target.fast_head  # the whole head, answered without the parser next time
    assert fast is not None and fast[2] == 5 and fast[3] == 200
    # Same bytes, but this client asks to close: its answer must say so (not the remembered head).
    out = wired.exchange(get[:-2] + b"Connection: close\r\n\r\n", head % (5, b"keep-alive") + b"hello")
    assert b"Connection: close\r\n" in out and out.endswith(b"hello")
    wired = Wired()
    for _ in range(2):
        out = wired.exchange(get, head % (5, b"keep-alive") + b"hello")
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nhello")
    out = wired.exchange(get, head % (11, b"keep-alive") + b"hello world")
    assert b"Content-Length: 11\r\n" in out and out.endswith(b"hello world")
    assert not wired.up.closed and wired.target.idle  # kept alive, back in the pool
    # This one says close: the connection is not pooled again, whatever the previous head said.
    out = wired.exchange(get, head % (2, b"close") + b"ok")
    assert out.endswith(b"ok") and wired.upstream_side.closed and not wired.target.idle


# ---- canned responses and small helpers ------------------------------------------------------


def parse_response(raw: bytes, head: bool = False) -> tuple[int, dict[bytes, bytes], bytes, bool]:
    fields: dict[bytes, bytes] = {}
    body: list[bytes] = []
    done: list[bool] = []

    class Cb:
        def on_header(self, name: bytes, value: bytes) -> None:
            fields[name.lower()] = value

        def on_body(self, b: bytes) -> None:
            body.append(b)

        def on_message_complete(self) -> None:
            done.append(True)

    parser = httptools.HttpResponseParser(Cb())
    parser.feed_data(raw)
    return parser.get_status_code(), fields, b"".join(body), bool(done)


@pytest.mark.parametrize(
    "canned",
    [
        http1.BAD_REQUEST,
        http1.NOT_FOUND,
        http1.URI_TOO_LONG,
        http1.HEADERS_TOO_LARGE,
        http1.REQUEST_TIMEOUT,
        http1.BODY_TOO_LARGE,
        http1.BAD_GATEWAY_REFUSED,
        http1.GATEWAY_TIMEOUT,
    ],
)
def test_canned_forms(canned: http1.Canned) -> None:
    status, fields, body, done = parse_response(canned.keep)
    assert status == canned.status
    assert done
    assert int(fields[b"content-length"]) == len(body)
    assert body.startswith(str(canned.status).encode())
    assert b"Traceback" not in body
    assert b"connection" not in fields
    status, fields, body2, _ = parse_response(canned.close)
    assert fields[b"connection"] == b"close"
    assert body2 == body
    # HEAD forms: same head (Content-Length of the body), no body bytes.
    assert canned.pick(close=False, head=True) == canned.keep[: len(canned.keep) - len(body)]
    assert canned.pick(close=True, head=True).endswith(b"\r\n\r\n")
    assert canned.pick(close=True, head=False) == canned.close


def test_error_helper_with_extra_headers() -> None:
    c = http1.error(503, "unavailable", extra=((b"Retry-After", b"7"),))
    status, fields, body, _ = parse_response(c.keep)
    assert status == 503
    assert fields[b"retry-after"] == b"7"
    assert body == b"503 Service Unavailable: unavailable\n"


def test_status_of_reads_the_code_of_the_responses_we_build() -> None:
    for canned in (http1.BAD_REQUEST, http1.NOT_FOUND, http1.HEADERS_TOO_LARGE, http1.GATEWAY_TIMEOUT):
        assert http1.status_of(canned.keep) == http1.status_of(canned.close) == canned.status
    assert http1.status_of(http1.status_line(429) + b"Retry-After: 1\r\n\r\n") == 429
    assert http1.status_of(http1.status_line(599, b"Custom")) == 599


def test_status_line() -> None:
    assert http1.status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert http1.status_line(404) == b"HTTP/1.1 404 Not Found\r\n"
    assert http1.status_line(599) == b"HTTP/1.1 599 Unknown\r\n"
    assert http1.status_line(599, b"Custom") == b"HTTP/1.1 599 Custom\r\n"


def test_chunk_encoding() -> None:
    assert http1.chunk(b"hello") == b"5\r\nhello\r\n"
    assert http1.chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert http1.LAST_CHUNK == b"0\r\n\r\n"
    # A stream built from these helpers parses back to the same bytes.
    parts = [b"a" * 10, b"b" * 4096, b"c"]
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(map(http1.chunk, parts))
    _, _, body, done = parse_response(raw + http1.LAST_CHUNK)
    assert body == b"".join(parts)
    assert done


def test_hop_by_hop_set() -> None:
    for name in (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ):
        assert name in http1.HOP_BY_HOP
    assert b"content-length" in http1.SPECIAL_RESPONSE
    for name in (b"host", b"content-length", b"expect", b"x-forwarded-for"):
        assert name in http1.SPECIAL_REQUEST


async def test_host_is_checked_per_value_on_a_keep_alive_connection() -> None:
    """Host is validated and normalised once per value of a connection; another value is checked anew."""
    wired = Wired()
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert wired.exchange(b"GET / HTTP/1.1\r\nHost: A.Test:8080\r\n\r\n", ok).endswith(b"ok")
    assert wired.client.host_key == b"a.test"
    assert wired.exchange(b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n", ok).endswith(b"ok")
    assert wired.client.host_key == b"b.test"
    out = wired.exchange(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", ok)
    assert out.startswith(b"HTTP/1.1 400 ") and wired.client_side.closed


def sent_upstream(wired: Wired, request: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Send `request` through the wired protocols; the request line and fields the upstream got."""
    wired.upstream_side.out.clear()
    assert wired.exchange(request, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").endswith(b"ok")
    return parse_head(b"".join(wired.upstream_side.out))


async def test_request_heads_follow_each_requests_fields_on_a_keep_alive_connection() -> None:
    """The part after the request line is reused only while Host and the fields repeat."""
    wired = Wired()

    def sent(request: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        return sent_upstream(wired, request)

    url, fields = sent(b"GET /a HTTP/1.1\r\nHost: h.test\r\nAccept: x\r\n\r\n")
    assert url == b"GET /a" and value(fields, b"accept") == b"x"
    url, fields = sent(b"GET /b?q=1 HTTP/1.1\r\nHost: h.test\r\nAccept: x\r\n\r\n")  # reused
    assert url == b"GET /b?q=1" and value(fields, b"accept") == b"x" and value(fields, b"host") == b"h.test"
    url, fields = sent(b"GET /c HTTP/1.1\r\nHost: h.test\r\nAccept: y\r\n\r\n")
    assert url == b"GET /c" and value(fields, b"accept") == b"y"
    url, fields = sent(b"GET /d HTTP/1.1\r\nHost: other.test\r\nAccept: y\r\n\r\n")
    assert value(fields, b"host") == b"other.test" and value(fields, b"x-forwarded-host") == b"other.test"
    url, fields = sent(
        b"GET /e HTTP/1.1\r\nHost: other.test\r\nAccept: y\r\nX-Forwarded-For: 9.9.9.9\r\n\r\n"
    )
    assert value(fields, b"x-forwarded-for") == b"9.9.9.9, 127.0.0.1"
    url, fields = sent(b"GET /f HTTP/1.1\r\nHost: other.test\r\nAccept: y\r\n\r\n")
    assert value(fields, b"x-forwarded-for") == b"127.0.0.1"


async def test_a_connection_field_naming_fields_drops_them_even_between_reused_heads() -> None:
    """`Connection: keep-alive` names nothing to drop (the head after the request line is reused);
    a Connection field naming a field drops that field from that request only."""
    wired = Wired()

    def sent(request: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        return sent_upstream(wired, request)

    plain = b"HTTP/1.1\r\nHost: h.test\r\nX-Secret: s\r\nConnection: keep-alive\r\n\r\n"
    url, fields = sent(b"GET /a " + plain)
    assert value(fields, b"x-secret") == b"s" and value(fields, b"connection") != b"keep-alive"
    tail = wired.client.tail
    url, fields = sent(b"GET /b " + plain)
    assert url == b"GET /b" and value(fields, b"x-secret") == b"s" and wired.client.tail is tail  # reused
    url, fields = sent(
        b"GET /c HTTP/1.1\r\nHost: h.test\r\nX-Secret: s\r\nConnection: keep-alive, X-Secret\r\n\r\n"
    )
    assert url == b"GET /c" and value(fields, b"x-secret") is None
    url, fields = sent(b"GET /d " + plain)
    assert url == b"GET /d" and value(fields, b"x-secret") == b"s"


OK_12 = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world\n"


async def test_a_rejection_says_close_exactly_when_the_connection_is_closed() -> None:
    """A 429 keeps a bodyless request's connection alive; one answered while the request's body is
    still coming says `Connection: close`, drops the body and closes."""
    wired = Wired(", rate_limit: {rate: 1, per: 1h, burst: 1, key: client_ip}")
    assert wired.exchange(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", OK_12).startswith(b"HTTP/1.1 200")
    out = wired.exchange(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", b"")
    assert out.startswith(b"HTTP/1.1 429") and b"Connection: close" not in out
    assert not wired.client_side.closed
    out = wired.exchange(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n", b"")
    assert out.startswith(b"HTTP/1.1 429") and b"Connection: close\r\n" in out
    wired.client.data_received(b"abcde")
    assert wired.client_side.closed
