"""Fail fast against real loopback backends: health checks, circuit breaker, backup pools, the null
response, retries with a retry budget, and passive outlier ejection.

Intervals are short and every wait is on a condition with a deadline (`wait_for` or a bounded loop).
"""

from __future__ import annotations

import asyncio
import gc
import math
import resource
import time

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import (
    HEADER,
    Backend,
    BackendFactory,
    GatewayFactory,
    default_backend_app,
    fetch,
    free_port,
    proxy_url,
    wait_for,
)


def hc(unhealthy: int) -> str:
    """A fast active health check (flow mapping for the YAML templates)."""
    return (
        "{path: /health, interval: 100ms, timeout: 200ms, healthy_threshold: 1, "
        f"unhealthy_threshold: {unhealthy}}}"
    )


def served(backend: Backend) -> int:
    """Proxied requests the backend received (active health-check probes not counted)."""
    return sum(1 for r in backend.app["requests"] if r.headers.get("User-Agent") != "gateway-health-check")


def involuntary_switches() -> int:
    """Times this thread was preempted so far (Linux reports it per thread)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw


def always(status: int) -> web.Application:
    """A backend answering `status` to everything, counting requests like the default one."""

    async def handler(request: web.Request) -> web.Response:
        request.app["requests"].append(request)
        return web.Response(status=status, text=f"always {status}\n")

    app = web.Application()
    app["requests"] = []
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


# ---- 1. active health checks --------------------------------------------------------------------


async def test_killed_backend_marked_unhealthy_then_back(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    b1 = await backend_factory(app=default_backend_app("b1"))
    b2 = await backend_factory(app=default_backend_app("b2"))
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {b1.address}}}, {{address: {b2.address}}}]
    health_check: {hc(unhealthy=2)}
    retry: {{attempts: 1}}
routes:
  - name: hc
    upstream: api
    timeouts: {{connect: 200ms, response: 1s}}
"""
    )
    pool = app.proxy.runtime.pools["api"]
    t1 = pool.target(b1.address)
    assert t1 is not None
    async with aiohttp.ClientSession() as s:
        names = []
        for _ in range(10):
            status, _, body = await fetch(s, app, "/x")
            assert status == 200
            names.append(body)
        assert served(b1) >= 4 and served(b2) >= 4  # both share the traffic

        await b1.stop()
        await wait_for(lambda: not t1.healthy, timeout=3.0)
        assert t1.state == "unhealthy"
        assert t1.last_check is not None and t1.last_check["ok"] is False

        before = served(b2)
        answers = [await fetch(s, app, "/after-kill") for _ in range(40)]
        statuses = [a[0] for a in answers]
        bad = [a for a in answers if a[0] != 200]
        # No retries are configured: any pick of b1 would be a 502.
        assert statuses == [200] * 40, (bad[:1], t1, pool.target(b2.address), t1.last_check)
        assert served(b2) - before == 40

        b1b = await backend_factory(app=default_backend_app("b1"), port=b1.port)
        assert b1b.port == b1.port
        await wait_for(lambda: t1.healthy, timeout=3.0)
        statuses = [(await fetch(s, app, "/after-restart"))[0] for _ in range(20)]
        assert statuses == [200] * 20
        assert served(b1b) >= 8  # back in rotation (round robin: about half)


# ---- 2. circuit breaker: trip on timeouts, fail fast while open, half-open probes, close ----------


async def test_circuit_opens_on_timeouts_fails_fast_and_recovers(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        request.app["requests"].append(request)
        if not release.is_set():
            await release.wait()
        return web.json_response({"name": "flaky"})

    bapp = web.Application()
    bapp["requests"] = []
    bapp.router.add_route("*", "/{tail:.*}", handler)
    b = await backend_factory(app=bapp)
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {b.address}}}]
    circuit_breaker: {{failure_ratio: 0.5, min_requests: 5, window: 5s, open_for: 1s, half_open_requests: 2}}
    retry: {{attempts: 1}}
routes:
  - name: cb
    upstream: api
    timeouts: {{connect: 200ms, response: 200ms}}
"""
    )
    pool = app.proxy.runtime.pools["api"]
    cb = pool.circuit
    assert cb is not None
    transitions: list[tuple[str, str]] = []
    at: dict[str, float] = {}

    def seen(old: str, new: str) -> None:
        transitions.append((old, new))
        at[new] = time.monotonic()

    cb.on_transition(seen)
    try:
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(*(fetch(s, app, f"/hang/{i}") for i in range(5)))
            assert [r[0] for r in results] == [504] * 5
            assert cb.state == "open"
            assert transitions == [("closed", "open")]

            reached = served(b)
            status, headers, _ = await fetch(s, app, "/warmup")  # keep-alive connection in place
            assert status == 503
            # Each of 50 requests must be answered in under 5 ms.  The client shares the process
            # and a small machine with the gateway (and with other jobs), so a round spoiled by the
            # scheduler is measured again (up to 3 rounds).  If none is clean, every slow sample
            # must be one during which this thread was preempted (an involuntary context switch):
            # time spent off the CPU, not a wait inside the gateway.
            rounds: list[list[tuple[float, bool]]] = []
            for _ in range(3):
                gc.collect()  # a collection of earlier tests' garbage is not the gateway's latency
                samples = []
                for _ in range(50):
                    switches = involuntary_switches()
                    t0 = time.perf_counter()
                    status, headers, _ = await fetch(s, app, "/open")
                    elapsed = time.perf_counter() - t0
                    samples.append((elapsed, involuntary_switches() > switches))
                    assert status == 503
                    assert int(headers["Retry-After"]) >= 1
                rounds.append(samples)
                latencies = sorted(x for x, _ in samples)
                p50 = latencies[len(latencies) // 2]
                p99 = latencies[math.ceil(0.99 * len(latencies)) - 1]
                preempted = sum(1 for _, p in samples if p)
                print(
                    f"\nopen-circuit 503 latency: p50={p50 * 1e3:.3f} ms p99={p99 * 1e3:.3f} ms "
                    f"max={latencies[-1] * 1e3:.3f} ms (n=50, {preempted} preempted)"
                )
                if latencies[-1] < 0.005:
                    break
            slow = [(round(x * 1e3, 2), p) for r in rounds for x, p in r if x >= 0.005]
            if max(x for x, _ in rounds[-1]) >= 0.005:  # no clean round
                assert all(p for _, p in slow), slow  # slow without being preempted: a real wait
                assert all(x < 100 for x, _ in slow), slow  # nowhere near the 200 ms timeout path
            assert p50 < 0.005
            assert served(b) == reached  # nothing reached the backend while open
            assert cb.state == "open"

            release.set()  # restore the backend: hung handlers finish, new requests answer at once
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 4.0
            got = []
            while cb.state != "closed" or not got or got[-1] != 200:
                assert loop.time() < deadline, (cb, got[-5:])
                status, _, _ = await fetch(s, app, "/recover")
                got.append(status)
                if status != 200:
                    await asyncio.sleep(0.02)
            assert ("open", "half_open") in transitions
            # Not one probe before open_for (the stamp of "open" may lag a little behind the breaker's).
            assert at["half_open"] - at["open"] >= 1.0 - 0.05
            assert transitions[-1] == ("half_open", "closed")
            assert set(got) <= {200, 503}
            statuses = [(await fetch(s, app, "/ok"))[0] for _ in range(10)]
            assert statuses == [200] * 10
            assert cb.state == "closed"
    finally:
        release.set()  # let hung handlers finish so the backend shuts down at once


async def test_circuit_counts_5xx_and_a_failed_probe_reopens_for_longer(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    bad = await backend_factory(app=always(500))
    cfg = "{{min_requests: 4, failure_ratio: 0.5, window: 5s, open_for: 200ms, half_open_requests: 1{}}}"
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {bad.address}}}]
    circuit_breaker: {cfg.format("")}
  tolerant:
    targets: [{{address: {bad.address}}}]
    circuit_breaker: {cfg.format(", on_5xx: false")}
routes:
  - name: tolerant
    match: {{path_prefix: /tolerant}}
    upstream: tolerant
  - name: cb5xx
    upstream: api
"""
    )
    cb = app.proxy.runtime.pools["api"].circuit
    tolerant = app.proxy.runtime.pools["tolerant"].circuit
    assert cb is not None and tolerant is not None
    async with aiohttp.ClientSession() as s:
        statuses = [(await fetch(s, app, "/x"))[0] for _ in range(4)]
        assert statuses == [500] * 4  # the backend's own 500s are passed through ...
        assert cb.state == "open"  # ... and counted against it
        assert (await fetch(s, app, "/x"))[0] == 503
        assert served(bad) == 4

        await wait_for(lambda: cb.retry_after_s() == 0.0, timeout=2.0)
        assert (await fetch(s, app, "/x"))[0] == 500  # the half-open probe goes through and fails
        assert cb.state == "open"
        assert cb.open_for_s == pytest.approx(0.4)  # backoff doubled
        assert (await fetch(s, app, "/x"))[0] == 503

        statuses = [(await fetch(s, app, "/tolerant"))[0] for _ in range(8)]
        assert statuses == [500] * 8
        assert tolerant.state == "closed"  # on_5xx: false


# ---- 3. backup pool ---------------------------------------------------------------------------


async def test_backup_pool_serves_when_primary_is_down(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    fb = await backend_factory(app=default_backend_app("fallback"))
    dead1, dead2 = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {dead1}}}, {{address: {dead2}}}]
    health_check: {hc(unhealthy=1)}
    backup: fallback
  fallback:
    targets: [{{address: {fb.address}}}]
routes:
  - name: backup
    upstream: api
    timeouts: {{connect: 200ms, response: 1s}}
"""
    )
    pool = app.proxy.runtime.pools["api"]
    await wait_for(lambda: not pool.has_available(), timeout=3.0)
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.get(proxy_url(app, "/via-backup")) as r:
                assert r.status == 200
                assert (await r.json())["name"] == "fallback"
    assert served(fb) == 10


async def test_backup_pool_serves_while_primary_circuit_is_open(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    primary = await backend_factory(app=default_backend_app("primary"))
    fb = await backend_factory(app=default_backend_app("fallback"))
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {primary.address}}}]
    circuit_breaker: {{min_requests: 5, open_for: 5s}}
    backup: fallback
  fallback:
    targets: [{{address: {fb.address}}}]
routes:
  - name: backup-cb
    upstream: api
"""
    )
    cb = app.proxy.runtime.pools["api"].circuit
    assert cb is not None
    async with aiohttp.ClientSession() as s:

        async def name() -> str:
            async with s.get(proxy_url(app, "/n")) as r:
                assert r.status == 200
                return str((await r.json())["name"])

        assert await name() == "primary"
        cb.force_open()
        assert [await name() for _ in range(5)] == ["fallback"] * 5
        cb.reset()
        assert await name() == "primary"


# ---- 4. null response ---------------------------------------------------------------------------


async def test_null_response_when_nothing_is_available(gateway_factory: GatewayFactory) -> None:
    dead = f"127.0.0.1:{free_port()}"
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {dead}}}]
    health_check: {hc(unhealthy=1)}
    null_response:
      {{status: 503, body: '{{"degraded":true}}', content_type: application/json, retry_after: 7}}
routes:
  - name: nullresp
    upstream: api
    timeouts: {{connect: 200ms, response: 1s}}
"""
    )
    pool = app.proxy.runtime.pools["api"]
    await wait_for(lambda: not pool.has_available(), timeout=3.0)
    route_stats = app.proxy.runtime.routes[0].stats
    before = route_stats.shed.get("no_healthy_target", 0)  # `shed` is a snapshot
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            status, headers, body = await fetch(s, app, "/anything")
            assert status == 503
            assert body == b'{"degraded":true}'
            assert headers["Content-Type"] == "application/json"
            assert headers["Retry-After"] == "7"
            assert headers["Content-Length"] == str(len(body))
    assert route_stats.shed.get("no_healthy_target", 0) - before == 3


# ---- 5. retries and the retry budget --------------------------------------------------------------


async def test_retry_budget_caps_retries_against_a_failing_pool(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    b1, b2 = await backend_factory(), await backend_factory()
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {b1.address}}}, {{address: {b2.address}}}]
    retry: {{attempts: 2, on: [503], budget: 20, min_retries: 0}}
routes:
  - name: budget
    upstream: api
"""
    )
    n = 100
    async with aiohttp.ClientSession() as s:
        statuses = [(await fetch(s, app, "/status/503"))[0] for _ in range(n)]
    assert statuses == [503] * n
    backend_requests = served(b1) + served(b2)
    requests, retries = app.proxy.runtime.pools["api"].retry_budget.counts()
    assert requests == n
    assert backend_requests == n + retries
    assert retries > 0  # retries did happen ...
    assert backend_requests <= n * 1.2 + 1  # ... but never more than the 20% budget


async def test_connect_failure_is_retried_on_the_live_target(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    live = await backend_factory()
    dead = f"127.0.0.1:{free_port()}"
    # Round robin sends half the first tries to the dead target, so the budget must allow 50%.
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {dead}}}, {{address: {live.address}}}]
    retry: {{attempts: 2, on: [connect_failure], budget: 100}}
    passive: false  # the default would eject the dead target after its third failure
routes:
  - name: connretry
    upstream: api
    timeouts: {{connect: 200ms, response: 1s}}
"""
    )
    async with aiohttp.ClientSession() as s:
        statuses = [(await fetch(s, app, "/c"))[0] for _ in range(50)]
    assert statuses == [200] * 50
    assert served(live) == 50
    dead_t = app.proxy.runtime.pools["api"].target(dead)
    assert dead_t is not None and dead_t.stats.connect_errors >= 20  # it was tried, and retried away


async def test_post_with_body_is_not_retried_on_503(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    b1, b2 = await backend_factory(), await backend_factory()
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {b1.address}}}, {{address: {b2.address}}}]
    retry: {{attempts: 2, on: [503], budget: 100, min_retries: 100}}
routes:
  - name: noretry
    upstream: api
"""
    )
    async with aiohttp.ClientSession() as s:
        for method in ("POST", "PUT", "PATCH"):
            before = served(b1) + served(b2)
            statuses = [(await fetch(s, app, "/status/503", method, b"payload"))[0] for _ in range(10)]
            assert statuses == [503] * 10
            assert served(b1) + served(b2) - before == 10, method  # exactly one try each
        # Control: the same pool does retry an idempotent GET.
        before = served(b1) + served(b2)
        assert (await fetch(s, app, "/status/503"))[0] == 503
        assert served(b1) + served(b2) - before == 2


# ---- 6. passive outlier ejection ------------------------------------------------------------------


async def test_outlier_ejected_and_returns(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    bad = await backend_factory(app=always(500))
    good = await backend_factory()
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {bad.address}}}, {{address: {good.address}}}]
    passive: {{consecutive_failures: 3, ejection_time: 600ms, max_ejection_percent: 50}}
routes:
  - name: outlier
    upstream: api
    timeouts: {{idle: 400ms}}
"""
    )
    assert app.proxy.tick_s() <= 0.1  # the sweeper that un-ejects runs often
    pool = app.proxy.runtime.pools["api"]
    bad_t = pool.target(bad.address)
    assert bad_t is not None
    async with aiohttp.ClientSession() as s:
        statuses: list[int] = []
        for _ in range(20):
            statuses.append((await fetch(s, app, "/o"))[0])
            if bad_t.ejected:
                break
        assert bad_t.ejected and bad_t.state == "ejected"
        assert statuses.count(500) == 3  # exactly consecutive_failures failures, then out

        before = served(bad)
        statuses = [(await fetch(s, app, "/o"))[0] for _ in range(10)]
        assert bad_t.ejected  # still inside the ejection time
        assert statuses == [200] * 10
        assert served(bad) == before  # no traffic while ejected

        await wait_for(lambda: not bad_t.ejected, timeout=3.0)
        statuses = [(await fetch(s, app, "/o"))[0] for _ in range(2)]
        assert served(bad) == before + 1  # back in rotation
        assert sorted(statuses) == [200, 500]
