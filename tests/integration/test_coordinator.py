"""The master-held rate-limit buckets of `workers: N` (gateway/ratelimit/coordinator.py), on a Unix socket.

The worker side batches the decisions of one loop iteration into one write and the master answers
a read's worth in one write; these tests pin that down together with exactness and the fail-open
paths (master gone, master silent, master speaking garbage).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config.parse import load_text
from gateway.pipeline.exchange import Exchange
from gateway.ratelimit.coordinator import CoordinatorServer, CoordinatorStore
from gateway.ratelimit.limiter import Limiter
from tests.helpers import HEADER, wait_for

# A gateway config with the routes given; the upstream is never contacted (decisions only).
ROUTES = HEADER + "upstreams:\n  api:\n    targets: [{address: 127.0.0.1:9}]\nroutes:\n"

CONFIG = (
    ROUTES
    + """
  - name: limited
    upstream: api
    rate_limit: {rate: 10, per: 1h, burst: 10, key: route}
"""
)


def limiters_of(server: CoordinatorServer) -> tuple[Limiter, ...]:
    return server.routes["limited"]


def request() -> Exchange:
    ex = Exchange(0.0)
    ex.request_done = True
    return ex


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[CoordinatorServer]:
    server = CoordinatorServer(load_text(CONFIG, "<test>"), str(tmp_path / "rl.sock"))
    await server.start()
    yield server
    await server.close()


async def connected_store(path: str, timeout_s: float = 0.5) -> CoordinatorStore:
    store = CoordinatorStore(path, timeout_s=timeout_s)
    await store.start()
    await wait_for(store.usable)
    return store


async def test_decisions_of_one_iteration_travel_in_one_batch_and_stay_exact(
    master: CoordinatorServer,
) -> None:
    store = await connected_store(master.path)
    try:
        # Worker-local copies of the limiters: the store must not decide with them while the master answers.
        local = limiters_of(CoordinatorServer(load_text(CONFIG, "<test>"), "unused"))
        before = list(local[0].counts)  # counters are process-wide per (route, limit), like metrics
        results = await asyncio.gather(*(store.admit(local, request(), "10.0.0.1") for _ in range(50)))
        admitted = [r for r in results if r is None]
        assert len(admitted) == 10  # burst 10, nothing refills within the test: exactly 10
        assert all(r is not None and r.startswith(b"HTTP/1.1 429") for r in results if r is not None)
        assert master.decisions == 50
        assert master.reads < 5  # one write from the worker: one read (or a few) on the master
        assert [a - b for a, b in zip(local[0].counts, before, strict=True)] == [10, 40]
        assert local[0].table.remaining("\x00route") == 10  # the worker's own bucket was not used
        assert store.errors == 0
    finally:
        await store.close()


async def test_master_gone_means_local_decisions_and_a_reconnect(tmp_path: Path) -> None:
    path = str(tmp_path / "rl.sock")
    server = CoordinatorServer(load_text(CONFIG, "<test>"), path)
    await server.start()
    store = await connected_store(path)
    local = limiters_of(CoordinatorServer(load_text(CONFIG, "<test>"), "unused"))
    try:
        assert await store.admit(local, request(), "10.0.0.1") is None
        assert server.decisions == 1
        await server.close()  # also closes the workers' connections, as the master's exit would
        await wait_for(lambda: not server.connections)
        await wait_for(lambda: not store.usable())
        assert await store.admit(local, request(), "10.0.0.1") is None  # decided by the local bucket
        assert local[0].table.remaining("\x00route") == 9
        server = CoordinatorServer(load_text(CONFIG, "<test>"), path)
        await server.start()
        await wait_for(store.usable, timeout=5.0)
        assert await store.admit(local, request(), "10.0.0.1") is None
        assert server.decisions == 1
    finally:
        await store.close()
        await server.close()


@pytest.mark.parametrize("reply", [b"", b"not json\n"])
async def test_a_silent_or_garbled_master_costs_one_timeout_then_local(tmp_path: Path, reply: bytes) -> None:
    path = str(tmp_path / "rl.sock")
    got: list[bytes] = []
    done = asyncio.Event()

    async def fake_master(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            got.append(await reader.readline())
            writer.write(reply)  # nothing, or a line that is not our protocol
            await reader.read()  # hold the connection open until the client goes
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_unix_server(fake_master, path=path)
    store = await connected_store(path, timeout_s=0.05)
    local = limiters_of(CoordinatorServer(load_text(CONFIG, "<test>"), "unused"))
    before = list(local[0].counts)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await store.admit(local, request(), "10.0.0.1") is None
        assert loop.time() - t0 < 2.0  # bounded by the timeout (or the garbage), never a hang
        assert got and got[0].startswith(b"[0,")
        assert store.errors == 1
        assert [a - b for a, b in zip(local[0].counts, before, strict=True)] == [1, 0]
        assert local[0].table.remaining("\x00route") == 9  # decided by the worker's own bucket
    finally:
        await store.close()
        server.close()
        await asyncio.wait_for(done.wait(), 5)


async def test_closing_the_store_decides_what_still_waits(tmp_path: Path) -> None:
    """A store closed (worker stopping) with decisions in flight must not leave requests waiting."""
    path = str(tmp_path / "rl.sock")
    done = asyncio.Event()

    async def silent_master(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_unix_server(silent_master, path=path)
    store = await connected_store(path, timeout_s=60.0)  # the timeout would be far too late
    local = limiters_of(CoordinatorServer(load_text(CONFIG, "<test>"), "unused"))
    decided: list[bytes | None] = []
    try:
        store.begin(local, request(), "10.0.0.1", lambda _ex, rejection: decided.append(rejection))
        await asyncio.sleep(0)  # let the request line leave
        assert decided == []
        await store.close()
        assert decided == [None]  # admitted by the local bucket at once
    finally:
        server.close()
        await asyncio.wait_for(done.wait(), 5)


HEADERS_CONFIG = (
    ROUTES
    + """
  - name: one
    upstream: api
    rate_limit: {rate: 10, per: 1h, burst: 10, key: route, headers: true}
  - name: two
    upstream: api
    rate_limit:
      - {rate: 100, per: 1h, burst: 100, key: route, name: wide}
      - {rate: 5, per: 1h, burst: 5, key: client_ip, name: narrow, headers: true}
"""
)


async def test_ratelimit_fields_come_from_the_master_s_buckets(tmp_path: Path) -> None:
    """`headers: true` through the master: the RateLimit numbers are the master's, not the worker's."""
    server = CoordinatorServer(load_text(HEADERS_CONFIG, "<test>"), str(tmp_path / "rl.sock"))
    await server.start()
    store = await connected_store(server.path)
    worker = CoordinatorServer(load_text(HEADERS_CONFIG, "<test>"), "unused")  # worker-side copies
    try:
        for _ in range(3):
            ex = request()
            assert await store.admit(worker.routes["one"], ex, "10.0.0.1") is None
        assert ex.extra_headers is not None
        assert b'RateLimit-Policy: "' in ex.extra_headers and b"RateLimit: " in ex.extra_headers
        assert b"r=7" in ex.extra_headers  # 10 - 3 taken, counted by the master
        assert worker.routes["one"][0].table.remaining("\x00route") == 10  # the worker's untouched

        ex = request()
        assert await store.admit(worker.routes["two"], ex, "10.0.0.2") is None
        assert ex.extra_headers is not None
        assert ex.extra_headers.count(b"RateLimit-Policy:") == 1  # only the limit that asked for it
        assert b"r=4" in ex.extra_headers
        for _ in range(4):
            assert await store.admit(worker.routes["two"], request(), "10.0.0.2") is None
        rejection = await store.admit(worker.routes["two"], request(), "10.0.0.2")
        assert rejection is not None and rejection.startswith(b"HTTP/1.1 429")
        assert server.routes["two"][0].table.remaining("\x00route") == 95  # nothing taken on reject
    finally:
        await store.close()
        await server.close()
