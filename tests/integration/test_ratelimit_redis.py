"""Distributed rate limits through a real `redis-server`: two in-process gateways sharing one
bucket, Redis killed (allow → local buckets, deny → rejections, never a hang), Redis restarted
(the store comes back, keys carry a TTL), the aggregate admitted rate of two instances, and the
Lua GCRA compared decision by decision with the local `RateTable` (the script's clock override).
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.observe import log
from gateway.policy.token_bucket import RateTable
from gateway.process.app import App
from gateway.ratelimit.redis_store import SCRIPT, RedisLimitStore
from tests.helpers import Backend, GatewayFactory, free_port, proxy_url, rate_limit_config, wait_for

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


class RedisServer:
    """`redis-server` on 127.0.0.1:<port>, no persistence; can be killed and restarted on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, deadline_s: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        while True:
            assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(b"PING\r\n")
                    if await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n":
                        return
                finally:
                    writer.close()
                    await writer.wait_closed()
            except (OSError, TimeoutError):
                pass
            if loop.time() > deadline:
                raise AssertionError(f"redis-server did not answer PING on port {self.port}")
            await asyncio.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer(free_port())
    await server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every `ratelimit_store` log event (still written to stderr)."""
    seen: list[dict[str, Any]] = []
    real = log.event

    def record(name: str, **fields: Any) -> None:
        if name == "ratelimit_store":
            seen.append(fields)
        real(name, **fields)

    monkeypatch.setattr(log, "event", record)
    return seen


def config(
    backend: Backend,
    redis: RedisServer,
    route: str,
    limit: str,
    on_error: str = "allow",
    timeout: str = "500ms",
    prefix: str = "gw:test:",
) -> str:
    store = f"""rate_limit_store:
  redis: {redis.url}
  on_error: {on_error}
  timeout: {timeout}
  prefix: "{prefix}"
"""
    return rate_limit_config(backend, route, limit, store)


def store_of(app: App) -> RedisLimitStore:
    store = app.proxy.runtime.limit_store
    assert isinstance(store, RedisLimitStore)
    return store


async def get(session: aiohttp.ClientSession, app: App, path: str = "/rl") -> tuple[int, dict[str, str]]:
    async with session.get(proxy_url(app, path)) as r:
        await r.read()
        return r.status, dict(r.headers)


async def timed_get(session: aiohttp.ClientSession, app: App) -> tuple[int, dict[str, str], float]:
    t0 = time.perf_counter()
    status, headers = await get(session, app)
    return status, headers, time.perf_counter() - t0


async def test_two_instances_share_one_bucket(
    backend: Backend, redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    text = config(backend, redis_server, "rl-shared", "{rate: 20, per: 1s, burst: 20, key: route}")
    a, b = await gateway_factory(text), await gateway_factory(text)
    assert store_of(a) is not store_of(b)  # two instances, two connections, one Redis
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(get(s, a if i % 2 == 0 else b) for i in range(60)))
        elapsed = time.perf_counter() - t0
    statuses = [st for st, _ in results]
    admitted = statuses.count(200)
    assert statuses.count(429) == 60 - admitted
    # Alone, each instance would admit its own 20 (40 in all); shared, the bucket holds 20, plus
    # what refilled (20/s) while the requests ran.
    assert elapsed < 1.0
    assert 20 <= admitted <= 20 + math.ceil(elapsed * 20) + 1, (admitted, elapsed)
    assert admitted <= 24, (admitted, elapsed)
    for app in (a, b):
        store = store_of(app)
        assert store.errors == 0 and store.fallbacks == 0 and store.healthy
    assert store_of(a).decisions + store_of(b).decisions == 60


async def test_headers_count_down_across_instances(
    backend: Backend, redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    text = config(
        backend, redis_server, "rl-headers", "{rate: 5, per: 1m, burst: 5, key: client_ip, headers: true}"
    )
    a, b = await gateway_factory(text), await gateway_factory(text)
    async with aiohttp.ClientSession() as s:
        results = [await get(s, a if i % 2 == 0 else b) for i in range(6)]
    assert [st for st, _ in results] == [200] * 5 + [429]
    assert [h["RateLimit"] for _, h in results[:5]] == [
        f'"client_ip";r={r};t={t}' for r, t in ((4, 12), (3, 24), (2, 36), (1, 48), (0, 60))
    ]
    assert all(h["RateLimit-Policy"] == '"client_ip";q=5;w=60' for _, h in results[:5])
    rejected = results[5][1]
    assert rejected["Retry-After"] == "12"  # one token per 12 s
    assert rejected["RateLimit"] == '"client_ip";r=0;t=12'


async def test_redis_killed_allow_falls_back_to_the_local_bucket(
    backend: Backend,
    redis_server: RedisServer,
    gateway_factory: GatewayFactory,
    events: list[dict[str, Any]],
) -> None:
    app = await gateway_factory(
        config(backend, redis_server, "rl-allow", "{rate: 5, per: 1m, burst: 5, key: route}", "allow")
    )
    store = store_of(app)
    async with aiohttp.ClientSession() as s:
        before = [await get(s, app) for _ in range(3)]
        assert [st for st, _ in before] == [200] * 3 and store.decisions == 3
        redis_server.kill()
        after = [await timed_get(s, app) for _ in range(10)]
    assert max(dt for _, _, dt in after) < 0.2, [dt for _, _, dt in after]
    # The local bucket (untouched while Redis decided) takes over: its 5 tokens, then 429s.
    assert [st for st, _, _ in after] == [200] * 5 + [429] * 5
    assert not store.usable() and not store.healthy
    assert store.downs == 1 and store.errors >= 1 and store.fallbacks >= 1
    downs = [e for e in events if e["state"] == "down"]
    assert len(downs) == 1 and downs[0]["error"]


async def test_redis_killed_deny_rejects_fast(
    backend: Backend,
    redis_server: RedisServer,
    gateway_factory: GatewayFactory,
    events: list[dict[str, Any]],
) -> None:
    app = await gateway_factory(
        config(backend, redis_server, "rl-deny", "{rate: 5, per: 1m, burst: 5, key: route}", "deny")
    )
    store = store_of(app)
    async with aiohttp.ClientSession() as s:
        assert (await get(s, app))[0] == 200
        redis_server.kill()
        after = [await timed_get(s, app) for _ in range(5)]
    assert max(dt for _, _, dt in after) < 0.2
    assert [st for st, _, _ in after] == [429] * 5
    assert all(h["Retry-After"] == "1" for _, h, _ in after)
    assert store.downs == 1 and store.fallbacks == 5 and len(backend.app["requests"]) == 1
    assert store.usable()  # deny keeps deciding (rejecting at once) instead of going local
    assert len([e for e in events if e["state"] == "down"]) == 1


async def test_redis_restarted_store_comes_back(
    backend: Backend,
    redis_server: RedisServer,
    gateway_factory: GatewayFactory,
    events: list[dict[str, Any]],
) -> None:
    app = await gateway_factory(
        config(
            backend,
            redis_server,
            "rl restart:x",  # a space and a colon in the route name: encoded in the key
            "{rate: 5, per: 1m, burst: 5, key: client_ip}",
            prefix="gw:t3:",
        )
    )
    store = store_of(app)
    async with aiohttp.ClientSession() as s:
        assert (await get(s, app))[0] == 200
        redis_server.kill()
        assert (await get(s, app))[0] == 200  # local bucket
        await wait_for(lambda: not store.healthy, timeout=2.0)
        await redis_server.start()  # same port, empty: no keys, no script
        await wait_for(store.usable, timeout=5.0)
        decided = store.decisions
        assert (await get(s, app))[0] == 200
        assert store.decisions == decided + 1  # through Redis again (script re-loaded)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        keys = await client.keys("gw:t3:*")
        assert keys == [b"gw:t3:rl%20restart%3Ax:client_ip:127.0.0.1"]
        ttl_ms = await client.pttl(keys[0])
        assert 0 < ttl_ms <= 12_000 + 1_000  # one interval of backlog + the margin: keys expire
    finally:
        await client.aclose()
    assert [e["state"] for e in events] == ["down", "up"]


async def test_aggregate_rate_of_two_instances(
    backend: Backend, redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    rate, burst, duration = 100, 10, 2.0
    text = config(backend, redis_server, "rl-rate", f"{{rate: {rate}, per: 1s, burst: {burst}, key: route}}")
    apps = [await gateway_factory(text), await gateway_factory(text)]
    admitted = rejected = 0
    loop = asyncio.get_running_loop()

    async def worker(session: aiohttp.ClientSession, app: App, until: float) -> None:
        nonlocal admitted, rejected
        while loop.time() < until:
            status, _ = await get(session, app)
            if status == 200:
                admitted += 1
            else:
                assert status == 429
                rejected += 1

    async with aiohttp.ClientSession() as s:
        t0 = loop.time()
        until = t0 + duration
        await asyncio.gather(*(worker(s, apps[i % 2], until) for i in range(16)))
        elapsed = loop.time() - t0
    expected = rate * elapsed + burst
    measured_rate = (admitted - burst) / elapsed
    print(
        f"\naggregate: {admitted} admitted, {rejected} rejected in {elapsed:.3f}s "
        f"→ {measured_rate:.1f}/s after the burst (limit {rate}/s + {burst}); "
        f"offered {(admitted + rejected) / elapsed:.0f}/s; "
        f"round trips {sum(store_of(a).batches for a in apps)} for "
        f"{sum(store_of(a).decisions for a in apps)} decisions"
    )
    assert rejected > admitted  # offered well above the limit
    assert abs(admitted - expected) <= 0.1 * expected, (admitted, expected)
    assert admitted <= expected + 1  # GCRA bound: never more than rate·t + burst
    for app in apps:
        assert store_of(app).errors == 0


async def test_lua_gcra_matches_the_local_rate_table(redis_client: aioredis.Redis) -> None:
    """Same request times, two limits per request: the same decisions, waits and remaining tokens."""
    sha = await redis_client.script_load(SCRIPT)
    limits = [(10.0, 1.0, 5), (3.0, 1.0, 2), (7.0, 0.5, 1)]  # rate, per, burst
    now = [1_000_000_000]  # µs; the script takes it from ARGV[1] instead of TIME

    def clock() -> float:
        return now[0] / 1e6

    rng = random.Random(7)
    for trial in range(3):
        chosen = [limits[trial], limits[(trial + 1) % 3]]
        tables = [RateTable(r, p, b, 1000, clock) for r, p, b in chosen]
        keys = [f"gcra:{trial}:{i}" for i in range(len(chosen))]
        args = [""]
        for r, p, b in chosen:
            args += [repr(p / r * 1e6), str(b)]
        for _step in range(300):
            # bursts at one instant, exact intervals, and random gaps
            now[0] += rng.choice([0, 0, 0, 1, 50_000, 100_000, 142_857, 333_333, rng.randrange(400_000)])
            args[0] = str(now[0])
            reply = await redis_client.evalsha(sha, len(keys), *keys, *args)
            waits = [t.check(k) for t, k in zip(tables, keys, strict=True)]
            refused = next((i for i, w in enumerate(waits) if w > 0.0), None)
            if refused is not None:
                assert reply[0] == refused + 1, (reply, waits)
                assert abs(reply[1] / 1e6 - waits[refused]) < 2e-6, (reply, waits)
                continue
            assert reply[0] == 0, (reply, waits)
            for i, (t, k) in enumerate(zip(tables, keys, strict=True)):
                t.consume(k)
                assert reply[2 + 2 * i] == t.remaining(k), (i, reply)
                assert abs(reply[3 + 2 * i] / 1e6 - t.reset_s(k)) < 2e-6, (i, reply)
    assert all(ttl > 0 for ttl in [await redis_client.pttl(k) for k in keys])


async def test_redis_hung_times_out_then_recovers(
    backend: Backend,
    redis_server: RedisServer,
    gateway_factory: GatewayFactory,
    events: list[dict[str, Any]],
) -> None:
    """A stopped (not dead) Redis: each decision waits at most `timeout`, then the local bucket."""
    app = await gateway_factory(
        config(backend, redis_server, "rl-hung", "{rate: 5, per: 1m, burst: 5, key: route}", timeout="50ms")
    )
    store = store_of(app)
    proc = redis_server.proc
    assert proc is not None
    async with aiohttp.ClientSession() as s:
        assert (await get(s, app))[0] == 200
        proc.send_signal(signal.SIGSTOP)
        try:
            after = [await timed_get(s, app) for _ in range(3)]
            assert [st for st, _, _ in after] == [200] * 3
            assert max(dt for _, _, dt in after) < 0.2, [dt for _, _, dt in after]
            assert not store.healthy and store.errors == 1 and "Timeout" in store.last_error
        finally:
            proc.send_signal(signal.SIGCONT)
        await wait_for(store.usable, timeout=5.0)
        decided = store.decisions
        assert (await get(s, app))[0] == 200
        assert store.decisions == decided + 1
    assert [e["state"] for e in events] == ["down", "up"]


async def test_reload_keeps_replaces_and_drops_the_store(
    backend: Backend, redis_server: RedisServer, gateway_factory: Any, tmp_path: Any
) -> None:
    limit = "{rate: 5, per: 1m, burst: 5, key: route}"
    path = tmp_path / "gateway.yaml"
    text = config(backend, redis_server, "rl-reload", limit)
    path.write_text(text)
    app = await gateway_factory(text, str(path))
    first = store_of(app)
    assert app.reload() == (True, [])
    assert store_of(app) is first  # unchanged store config: same store, same connections
    path.write_text(config(backend, redis_server, "rl-reload", limit, prefix="gw:other:"))
    assert app.reload() == (True, [])
    second = store_of(app)
    assert second is not first and second.config.prefix == "gw:other:"
    await wait_for(lambda: first.closed and second.healthy)
    async with aiohttp.ClientSession() as s:
        assert (await get(s, app))[0] == 200
    assert second.decisions == 1
    path.write_text(text.split("rate_limit_store:")[0] + "upstreams:" + text.split("upstreams:")[1])
    assert app.reload() == (True, [])
    assert app.proxy.runtime.limit_store is None and app.limit_store is None
    await wait_for(lambda: second.closed)
