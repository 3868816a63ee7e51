"""The shallow health port: its own thread and loop, so it answers while the proxy loop is saturated.

Probes that must measure the health thread alone run in a separate thread with urllib: an aiohttp
client on the (deliberately busy or blocked) proxy loop would only measure that loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

import aiohttp
from aiohttp import web

from gateway.process.app import App
from tests.helpers import one_upstream, proxy_url, uniq, wait_for

SPIN_S = 0.7  # longer than the probe budget: a health check served by this loop would miss it


def health_url(app: App, path: str) -> str:
    assert app.health is not None
    return f"http://127.0.0.1:{app.health.port}{path}"


def probe(url: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
    """Blocking probe (for threads): status and body, 5xx included."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def config(address: str, extra: str = "") -> str:
    return one_upstream(address, uniq("u"), uniq("r"), extra + "\ntimeouts: {connect: 10s}")


async def test_healthz_and_head(gateway_factory, backend):
    app = await gateway_factory(config(backend.address))
    for path in ("/healthz", "/livez"):
        status, body = await asyncio.to_thread(probe, health_url(app, path))
        assert (status, body) == (200, b"ok\n")
        status, body = await asyncio.to_thread(probe, health_url(app, path), "HEAD")
        assert (status, body) == (200, b"")
    async with aiohttp.ClientSession() as s:
        async with s.head(health_url(app, "/healthz")) as r:
            assert r.status == 200
        async with s.get(health_url(app, "/nope")) as r:
            assert r.status == 404


async def test_readyz_turns_503_while_draining(gateway_factory, backend):
    app = await gateway_factory(config(backend.address))
    assert await asyncio.to_thread(probe, health_url(app, "/readyz")) == (200, b"ready\n")
    assert (await asyncio.to_thread(probe, health_url(app, "/readyz"), "HEAD"))[0] == 200
    app.liveness.draining = True
    assert await asyncio.to_thread(probe, health_url(app, "/readyz")) == (503, b"draining\n")
    assert (await asyncio.to_thread(probe, health_url(app, "/readyz"), "HEAD"))[0] == 503
    # Draining is not dead: liveness stays up.
    assert (await asyncio.to_thread(probe, health_url(app, "/healthz")))[0] == 200


async def test_health_answers_while_proxy_loop_is_saturated(gateway_factory, backend_factory):
    held = 300
    release = asyncio.Event()
    arrived = 0

    async def hold(_: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return web.Response(text="released\n")

    slow = web.Application()
    slow.router.add_route("*", "/{tail:.*}", hold)
    backend = await backend_factory(slow)
    app = await gateway_factory(config(backend.address))
    loop = asyncio.get_running_loop()

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    )

    async def one(i: int) -> int:
        async with session.get(proxy_url(app, f"/held/{i}")) as r:
            await r.read()
            return r.status

    flood = [asyncio.create_task(one(i)) for i in range(held)]
    try:
        await wait_for(lambda: arrived >= held, timeout=30)
        assert sum(r.stats.in_flight for r in app.proxy.runtime.routes) == held

        # CPU-busy burst on the proxy loop: 50 ms spins back to back until the probes are done.
        busy = True
        spun = 0

        def spin() -> None:
            nonlocal spun
            end = time.perf_counter() + SPIN_S
            while time.perf_counter() < end:
                pass
            spun += 1
            if busy:
                loop.call_soon(spin)

        loop.call_soon(spin)
        url = health_url(app, "/healthz")

        assert app.admin is not None
        on_proxy_loop = f"http://127.0.0.1:{app.admin.port}/admin/routes"

        def probes() -> tuple[list[tuple[int, float]], float]:
            out = []
            for _ in range(50):
                t0 = time.perf_counter()
                status, _ = probe(url, timeout=2.0)
                out.append((status, time.perf_counter() - t0))
            # Control: the admin port is served by the proxy loop, so it is slow right now.
            t0 = time.perf_counter()
            probe(on_proxy_loop, timeout=30.0)
            return out, time.perf_counter() - t0

        try:
            results, control = await asyncio.to_thread(probes)
        finally:
            busy = False
        assert spun >= 2 and control > 0.5, "the proxy loop was not kept busy"
        assert [s for s, _ in results] == [200] * 50
        slowest = max(d for _, d in results)
        assert slowest < 0.5, f"slowest /healthz probe took {slowest:.3f}s"
        assert (await asyncio.to_thread(probe, health_url(app, "/readyz")))[0] == 200
    finally:
        release.set()
        statuses = await asyncio.gather(*flood, return_exceptions=True)
        await session.close()
    assert statuses == [200] * held


async def test_stalled_proxy_loop_turns_healthz_503(gateway_factory, backend):
    app = await gateway_factory(config(backend.address, "health: {stall_threshold: 300ms}"))
    url = health_url(app, "/healthz")
    assert await asyncio.to_thread(probe, url) == (200, b"ok\n")

    blocking = threading.Event()
    seen: list[int] = []

    def watch() -> None:
        blocking.wait(5)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            status, _ = probe(url, timeout=1.0)
            seen.append(status)
            if status == 503:
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    blocking.set()
    time.sleep(1.0)  # block the proxy loop itself: no heartbeat for well over stall_threshold
    await asyncio.to_thread(watcher.join, 5)
    assert 503 in seen, seen

    # The loop runs again: the heartbeat resumes and /healthz recovers on its own.
    deadline = time.monotonic() + 5
    while (await asyncio.to_thread(probe, url))[0] != 200:
        assert time.monotonic() < deadline, "healthz did not recover"
        await asyncio.sleep(0.05)


async def test_stale_heartbeat_turns_healthz_503(gateway_factory, backend):
    app = await gateway_factory(config(backend.address, "health: {stall_threshold: 300ms}"))
    url = health_url(app, "/healthz")
    liveness = app.liveness
    liveness.stop()  # no beat may sneak in between setting the stale time and probing
    liveness.last_beat = time.monotonic() - 3600
    assert await asyncio.to_thread(probe, url) == (503, b"event loop stalled\n")
    assert (await asyncio.to_thread(probe, url, "HEAD"))[0] == 503
    # A stall is not "not ready": readiness is about draining/startup only.
    assert (await asyncio.to_thread(probe, health_url(app, "/readyz")))[0] == 200
    liveness.beat_on(asyncio.get_running_loop())
    assert await asyncio.to_thread(probe, url) == (200, b"ok\n")
