"""The floor of the design: the least an asyncio.Protocol + httptools forwarder on uvloop can do.

Why it exists: issue 2 sets the gateway's throughput target from "a minimal asyncio.Protocol +
httptools forwarder on uvloop ≈ nginx". This is that forwarder, measured in the same run as nginx
and the gateway (`bench_throughput --minimal`), so the gap between the gateway and nginx splits
into what the design costs (this file vs nginx) and what our features cost (gateway vs this file).

It does no routing, no header rewriting, no limits and no error handling: each client connection
gets one keep-alive upstream connection, request bytes are parsed (to find message ends) and
forwarded as they are, responses likewise. Not a product; a benchmark baseline only.

    python -m loadtest.minimal_forwarder --port 8090 --upstream 127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import cast

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        self.upstream = up
        if self.pending:
            assert up.transport is not None
            up.transport.write(b"".join(self.pending))
            self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.close()


async def serve(port: int, upstream: str) -> None:
    host, _, up_port = upstream.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(host, int(up_port)), "127.0.0.1", port, backlog=1024)
    print(f"minimal forwarder listening on http://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.minimal_forwarder", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="host:port (loopback)")
    a = p.parse_args(argv)
    if not a.upstream.startswith(("127.", "localhost:")):
        p.error("benchmarks stay on loopback")
    uvloop.run(serve(a.port, a.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
