"""Optional whitespace around field values is not part of the value (RFC 9110 §5.5; defects, item 4).

llhttp drops the leading OWS and keeps the trailing one; the gateway strips it before validating, so
`Content-Length:  5  ` frames a 5-byte body and `X-A:\\t b \\t` reaches the backend as `b`, as
nginx and HAProxy forward them. Every smuggling defence still holds on the stripped value.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.helpers import HEADER, Backend, GatewayFactory, TcpBackend, raw_request, read_request


def config(address: str) -> str:
    upstreams = f"upstreams:\n  app:\n    targets: [{{address: {address}}}]\n"
    return HEADER + upstreams + "routes:\n  - name: app\n    upstream: app\n"


def parse(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body) if status == 200 else {})


@pytest.mark.parametrize(
    ("fields", "body", "expect"),
    [
        (b"Content-Length:  5  \r\n", b"hello", {"body_len": 5}),
        (b"Content-Length:\t5\t\r\n", b"hello", {"body_len": 5}),
        (b"Transfer-Encoding: chunked \r\n", b"5\r\nhello\r\n0\r\n\r\n", {"body_len": 5}),
        (b"Connection: keep-alive \r\n", b"", {}),
        (b"Host2: x\r\nX-Forwarded-For: 10.0.0.1 \r\n", b"", {"x-forwarded-for": "10.0.0.1, 127.0.0.1"}),
    ],
    ids=["cl-spaces", "cl-tabs", "te-ows", "connection-ows", "xff-ows"],
)
async def test_ows_is_stripped(
    fields: bytes, body: bytes, expect: dict[str, object], backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(config(backend.address))
    method = b"POST" if body else b"GET"
    raw = await raw_request(
        app.proxy.port,
        method + b" /echo HTTP/1.1\r\nHost: t\r\n" + fields + b"Connection: close\r\n\r\n" + body,
    )
    status, echoed = parse(raw)
    assert status == 200, raw[:200]
    headers = {k.lower(): v for k, v in dict(echoed["headers"]).items()}  # type: ignore[call-overload]
    for key, value in expect.items():
        if key == "body_len":
            assert echoed["body_len"] == value
        else:
            assert headers.get(key) == value, headers


class RecordingBackend(TcpBackend):
    """Keeps the raw request heads it reads (an aiohttp backend would strip OWS itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(100):  # bounded keep-alive loop
            self.heads.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()


@pytest.mark.parametrize(
    ("field", "forwarded"),
    [
        (b"X-A:\t b \t", b"\r\nX-A: b\r\n"),
        (b"X-A: b  c ", b"\r\nX-A: b  c\r\n"),  # whitespace inside the value is the value's own
        (b"X-Empty:  \t ", b"\r\nX-Empty: \r\n"),
    ],
    ids=["ows", "inner-kept", "only-ows"],
)
async def test_forwarded_value_has_no_ows(
    field: bytes, forwarded: bytes, gateway_factory: GatewayFactory
) -> None:
    b = RecordingBackend()
    await b.start()
    try:
        app = await gateway_factory(config(b.address))
        raw = await raw_request(
            app.proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n" + field + b"\r\nConnection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 200 "), raw[:100]
        assert forwarded in b.heads[0], b.heads[0]
    finally:
        await b.stop()


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 5 5\r\n",
        b"Content-Length: 5,5\r\n",
        b"Content-Length: +5\r\n",
        b"Content-Length: 0x5\r\n",
        b"Content-Length: 5\r\nContent-Length: 5 \r\n",
        b"Content-Length:  \r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked \r\n",
    ],
    ids=["inner-space", "list", "plus", "hex", "duplicate-after-strip", "empty", "cl-and-te"],
)
async def test_smuggling_defences_hold_after_stripping(
    fields: bytes, backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(config(backend.address))
    raw = await raw_request(app.proxy.port, b"POST /echo HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\nhello")
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:100]
    assert b"connection: close" in raw.lower()
