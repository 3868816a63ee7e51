"""A pooled upstream connection that went wrong is never handed out again (issue: defects, item 1).

Each test forces one interleaving instead of hoping for it:
- surplus bytes in the same read as a complete response, while another client waits in the
  admission queue for the slot that response frees (it would be given that very connection);
- a backend that answers the next request on a reused connection with garbage (the surplus of the
  previous answer, or a desynchronised stream) and closes;
- a backend that closes an idle pooled connection: the pool drops it when the EOF arrives;
- unsolicited bytes on an idle pooled connection.
In every case the well-behaved request gets 200 from a fresh connection, and the backend sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.helpers import HEADER, GatewayFactory, TcpBackend, read_request, started_servers, wait_for

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"


class ScriptedBackend(TcpBackend):
    """Connection 0 follows `script` (one answer per request it reads, b"" = close without answering);
    every later connection answers each request with OK. Records the paths each connection saw."""

    def __init__(self, script: list[bytes], close_after: bool = True) -> None:
        super().__init__()
        self.script = script
        self.close_after = close_after
        self.paths: list[list[bytes]] = []
        self.first_idle = asyncio.Event()  # connection 0 answered its whole script

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.paths)
        seen: list[bytes] = []
        self.paths.append(seen)
        if index == 0:
            for answer in self.script:
                head = await read_request(reader)
                seen.append(head.split(b" ", 2)[1])
                if not answer:
                    return
                writer.write(answer)
                await writer.drain()
            self.first_idle.set()
            if self.close_after:
                return
            await reader.read()  # hold the connection until the gateway closes it
            return
        for _ in range(1000):  # bounded keep-alive loop
            head = await read_request(reader)
            seen.append(head.split(b" ", 2)[1])
            writer.write(OK)
            await writer.drain()


ScriptedFactory = Callable[..., Awaitable[ScriptedBackend]]


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedFactory]:
    async with started_servers(ScriptedBackend) as make:
        yield make


async def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET on its own client connection: (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def config(address: str, extra: str = "") -> str:
    return (
        HEADER
        + f"upstreams:\n  app:\n    targets: [{{address: {address}}}]\n{extra}"
        + "routes:\n  - name: app\n    upstream: app\n    timeouts: {connect: 1s, response: 2s}\n"
    )


async def test_surplus_in_the_same_read_never_reaches_the_queued_request(
    scripted: ScriptedFactory, gateway_factory: GatewayFactory
) -> None:
    """The response that frees the admission slot carries surplus bytes in its read. The waiter
    admitted by that slot must not be sent on this connection: it gets 200 from a fresh one."""
    release = asyncio.Event()

    class Slow(ScriptedBackend):
        async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not self.paths:
                self.paths.append([])
                head = await read_request(reader)
                self.paths[0].append(head.split(b" ", 2)[1])
                await release.wait()  # hold the first answer until the second request is queued
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirstEVIL")
                await writer.drain()
                await reader.read()
                return
            await super().serve(reader, writer)

    b = Slow([])
    await b.start()
    try:
        app = await gateway_factory(
            config(b.address, "    max_in_flight: 1\n    queue: {size: 10, timeout: 3s}\n")
        )
        port = app.proxy.port
        first = asyncio.ensure_future(get(port, "/first"))
        await wait_for(lambda: len(b.paths) == 1 and len(b.paths[0]) == 1)
        second = asyncio.ensure_future(get(port, "/second"))
        pool = app.proxy.runtime.pools["app"]
        assert pool.admission is not None
        await wait_for(lambda: pool.admission is not None and pool.admission.queued == 1)
        release.set()
        assert await first == (200, b"first")
        assert await second == (200, b"fresh")
        assert b.paths[0] == [b"/first"]  # the surplus connection carried nothing more
        assert [b"/second"] in b.paths[1:]
    finally:
        await b.stop()


@pytest.mark.parametrize(
    "bad",
    [
        b"EVIL",  # the late surplus of the previous answer
        b"garbage instead of a status line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"",  # closed without a byte (the idle connection timed out at the backend)
    ],
    ids=["surplus", "garbage", "two-content-lengths", "closed-silently"],
)
async def test_a_reused_connection_that_answers_garbage_is_retried_fresh(
    bad: bytes, scripted: ScriptedFactory, gateway_factory: GatewayFactory
) -> None:
    """The second request on a pooled connection meets a broken answer before any valid response
    head: nothing of it was answered, so it is sent again once on a fresh connection."""
    b = await scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst", bad])
    app = await gateway_factory(config(b.address))
    port = app.proxy.port
    assert await get(port, "/one") == (200, b"first")
    await wait_for(lambda: len(app.proxy.runtime.pools["app"].targets[0].idle) == 1)
    assert await get(port, "/two") == (200, b"fresh")
    assert b.paths[0] == [b"/one", b"/two"]
    assert b.paths[1] == [b"/two"]
    assert await get(port, "/three") == (200, b"fresh")


async def test_an_idle_connection_closed_by_the_backend_leaves_the_pool(
    scripted: ScriptedFactory, gateway_factory: GatewayFactory
) -> None:
    b = await scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"], close_after=True)
    app = await gateway_factory(config(b.address))
    target = app.proxy.runtime.pools["app"].targets[0]
    assert await get(app.proxy.port, "/one") == (200, b"first")
    await b.first_idle.wait()
    await wait_for(lambda: not target.idle or target.idle[0].closed)
    assert not target.idle  # dropped when the EOF arrived, not at the next sweep
    assert await get(app.proxy.port, "/two") == (200, b"fresh")
    assert b.paths[0] == [b"/one"]


async def test_unsolicited_bytes_on_an_idle_connection_close_it(
    scripted: ScriptedFactory, gateway_factory: GatewayFactory
) -> None:
    b = await scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"], close_after=False)
    app = await gateway_factory(config(b.address))
    target = app.proxy.runtime.pools["app"].targets[0]
    assert await get(app.proxy.port, "/one") == (200, b"first")
    await b.first_idle.wait()
    await wait_for(lambda: len(target.idle) == 1)
    conn = target.idle[0]
    b.writers[0].write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
    await wait_for(lambda: conn.closed)
    assert conn not in target.idle  # dropped at once, not at the next sweep
    assert await get(app.proxy.port, "/two") == (200, b"fresh")
    assert b.paths[0] == [b"/one"]


async def test_a_body_after_a_head_answer_is_never_read_as_the_next_response(
    scripted: ScriptedFactory, gateway_factory: GatewayFactory
) -> None:
    """A backend that sends a body with its answer to HEAD: the client gets the head, and that
    connection is not pooled (its next bytes would be taken for the next request's answer)."""
    b = await scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"], close_after=False)
    app = await gateway_factory(config(b.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", app.proxy.port)
    try:
        writer.write(b"HEAD /one HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n\r\n")
    assert await get(app.proxy.port, "/two") == (200, b"fresh")
    assert b.paths[0] == [b"/one"]
