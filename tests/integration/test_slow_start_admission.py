"""Slow start and admission control against real loopback backends.

(a) a fresh target's share of traffic follows the slow-start curve (undrained, or healthy again);
(b) a wholly fresh pool with concurrency caps admits only the ramped capacity, sheds `slow_start`;
(c) admission: bounded queue, immediate shed when full, queue timeout, FIFO order, adaptive LIFO
    (newest first once the queue stands, CoDel shedding of stale waiters);
(d) priorities: a critical request displaces a sheddable waiter;
(e) the adaptive (Gradient2) limit grows under low latency and shrinks when latency rises.

The "holding" backend parks every `/hold/<id>` request on its own event, so in-flight and queued
counts are observable and releases are explicit. Every wait is on a condition with a deadline;
the only timed parts are the ramp and the queue timeouts under test.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from gateway.policy.slow_start import ramp_fraction
from gateway.process.app import App
from tests.helpers import HEADER, Backend, BackendFactory, GatewayFactory, proxy_url, wait_for

# ---- backends -----------------------------------------------------------------------------------


class Named:
    """Answers its name; `/health` answers `health_status`; `delay` seconds before every answer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health_status = 200
        self.delay = 0.0
        self.app = web.Application()
        self.app["requests"] = []
        self.app.router.add_get("/health", self._health)
        self.app.router.add_route("*", "/{tail:.*}", self._any)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status, text="health\n")

    async def _any(self, request: web.Request) -> web.Response:
        self.app["requests"].append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(text=self.name)


class Holding:
    """Parks each `/hold/<id>` request until `release(id)`; records arrival order and in-flight."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.in_flight = 0
        self.app = web.Application()
        self.app["requests"] = []
        self.app.router.add_get("/hold/{id}", self._hold)

    def gate(self, rid: str) -> asyncio.Event:
        g = self.gates.get(rid)
        if g is None:
            g = self.gates[rid] = asyncio.Event()
        return g

    def release(self, *rids: str) -> None:
        for rid in rids:
            self.gate(rid).set()

    def release_all(self) -> None:
        for g in self.gates.values():
            g.set()

    async def _hold(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        self.order.append(rid)
        self.in_flight += 1
        try:
            await asyncio.wait_for(self.gate(rid).wait(), 20.0)  # bounded even if a test forgets
        finally:
            self.in_flight -= 1
        return web.Response(text=rid)


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Run finalizers of this test's sockets and tasks now, not at a random later point."""
    yield
    gc.collect()


@pytest.fixture
async def holding(backend_factory: BackendFactory) -> AsyncIterator[tuple[Holding, Backend]]:
    h = Holding()
    b = await backend_factory(app=h.app)
    try:
        yield h, b
    finally:
        h.release_all()  # before the backend stops, so its handlers finish at once


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=15)) as s:
        yield s


class Answer:
    def __init__(self, status: int, body: str, elapsed: float) -> None:
        self.status = status
        self.body = body
        self.elapsed = elapsed


async def get(
    session: aiohttp.ClientSession, app: App, path: str, headers: dict[str, str] | None = None
) -> Answer:
    t0 = time.monotonic()
    async with session.get(proxy_url(app, path), headers=headers) as r:
        body = await r.text()
        return Answer(r.status, body, time.monotonic() - t0)


def fire(
    session: aiohttp.ClientSession, app: App, path: str, headers: dict[str, str] | None = None
) -> asyncio.Task[Answer]:
    return asyncio.get_running_loop().create_task(get(session, app, path, headers))


def shed_now(app: App, route: str) -> dict[str, int]:
    r = next(r for r in app.proxy.runtime.routes if r.name == route)
    return dict(r.stats.shed)


def shed_delta(app: App, route: str, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in shed_now(app, route).items() if v - before.get(k, 0)}


# ---- (a) a fresh target's share follows the ramp --------------------------------------------------


def expected_share(t0: float, t1: float, window: float, aggression: float, floor: float) -> float:
    """Mean share f/(1+f) of a fresh target beside one at full weight over ramp time [t0, t1)."""
    n = 40
    total = 0.0
    for i in range(n):
        f = ramp_fraction(t0 + (i + 0.5) * (t1 - t0) / n, window, aggression, floor)
        total += f / (1 + f)
    return total / n


async def sample_shares(
    session: aiohttp.ClientSession, app: App, fresh: str, since: float, slices: list[float], workers: int = 4
) -> list[tuple[int, float]]:
    """Closed-loop GETs until the last slice edge; (requests, share reaching `fresh`) per slice."""
    hits: list[tuple[float, bool]] = []
    end = since + slices[-1]

    async def worker() -> None:
        while (sent := time.monotonic()) < end:
            a = await get(session, app, "/")
            assert a.status == 200, a.body
            hits.append((sent - since, a.body == fresh))

    await asyncio.gather(*(worker() for _ in range(workers)))
    out = []
    for lo, hi in itertools.pairwise(slices):
        in_slice = [f for t, f in hits if lo <= t < hi]
        out.append((len(in_slice), sum(in_slice) / len(in_slice) if in_slice else float("nan")))
    return out


async def test_undrained_target_share_follows_the_ramp(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    old, new = Named("old"), Named("new")
    b1 = await backend_factory(app=old.app)
    b2 = await backend_factory(app=new.app)
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {b1.address}}}, {{address: {b2.address}}}]
    slow_start: {{window: 2s, aggression: 1.0, min_weight_percent: 10, on_start: false}}
routes:
  - name: ss_share
    upstream: api
"""
    )
    pool = app.proxy.runtime.pools["api"]
    t2 = pool.target(b2.address)
    assert t2 is not None and t2.slow_start is not None
    assert not pool.ramping and not t2.slow_start.in_ramp()  # on_start: false → not fresh at start

    pool.set_drained(t2, True)
    assert (await get(session, app, "/")).body == "old"
    since = time.monotonic()
    pool.set_drained(t2, False)  # undrained: fresh, ramps from 10 % over 2 s
    assert t2.slow_start.in_ramp()

    slices = [0.0, 0.4, 0.8, 1.2, 1.6, 2.0, 2.4]
    got = await sample_shares(session, app, "new", since, slices)
    expected = [expected_share(lo, hi, 2.0, 1.0, 0.1) for lo, hi in itertools.pairwise(slices)]
    report = [(n, round(s, 3), round(e, 3)) for (n, s), e in zip(got, expected, strict=True)]
    for (n, share), exp in zip(got, expected, strict=True):
        assert n >= 20, report  # enough requests per slice to judge a share
        assert abs(share - exp) <= 0.08, report
    shares = [s for _, s in got]
    for a, b in itertools.pairwise(shares):
        assert b >= a - 0.04, report  # grows (allowing sampling noise)
    assert shares[0] < 0.2 and shares[-1] > 0.42, report
    assert not t2.slow_start.in_ramp()


async def test_target_healthy_again_ramps_from_the_floor(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    old, new = Named("old"), Named("new")
    b1 = await backend_factory(app=old.app)
    b2 = await backend_factory(app=new.app)
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {b1.address}}}, {{address: {b2.address}}}]
    slow_start: {{window: 1s, aggression: 1.0, min_weight_percent: 10, on_start: false}}
    health_check: {{path: /health, interval: 30ms, timeout: 500ms, healthy_threshold: 1,
                    unhealthy_threshold: 1, jitter: 0s}}
routes:
  - name: ss_health
    upstream: api
"""
    )
    pool = app.proxy.runtime.pools["api"]
    t2 = pool.target(b2.address)
    assert t2 is not None and t2.slow_start is not None
    new.health_status = 503
    await wait_for(lambda: not t2.healthy)
    assert {(await get(session, app, "/")).body for _ in range(4)} == {"old"}
    new.health_status = 200
    await wait_for(lambda: t2.healthy, interval=0.002)
    since = time.monotonic()
    assert t2.slow_start.in_ramp() and t2.slow_start.fraction() < 0.2  # recovered = fresh
    got = await sample_shares(session, app, "new", since, [0.0, 0.25, 1.0, 1.4])
    early, mid, after = (s for _, s in got)
    assert early < 0.2, got
    assert early < mid < after, got
    assert abs(after - 0.5) <= 0.06, got


# ---- (b) a wholly fresh pool with caps admits only the ramped capacity -----------------------------


async def test_fresh_pool_admits_only_ramped_capacity_and_sheds_slow_start(
    holding: tuple[Holding, Backend],
    backend_factory: BackendFactory,
    gateway_factory: GatewayFactory,
    session: aiohttp.ClientSession,
) -> None:
    h, b1 = holding
    h2 = Holding()
    b2 = await backend_factory(app=h2.app)
    try:
        # window 20 s, floor 10 %: the caps are ceil(10 x 0.1) = 1 per target for the first 2 s.
        app = await gateway_factory(
            HEADER
            + f"""
upstreams:
  api:
    targets: [{{address: {b1.address}, max_in_flight: 10}}, {{address: {b2.address}, max_in_flight: 10}}]
    slow_start: {{window: 20s, aggression: 1.0, min_weight_percent: 10}}
routes:
  - name: ss_caps
    upstream: api
"""
        )
        pool = app.proxy.runtime.pools["api"]
        adm = pool.admission
        assert adm is not None and pool.ramping
        assert adm.limit == 2 and pool.shed_reason() == "slow_start"
        before = shed_now(app, "ss_caps")
        held = [fire(session, app, f"/hold/{i}") for i in range(2)]
        await wait_for(lambda: h.in_flight + h2.in_flight == 2)
        assert h.in_flight == 1 and h2.in_flight == 1  # one each: the per-target ramped cap
        extra = await asyncio.gather(*(get(session, app, f"/hold/x{i}") for i in range(6)))
        assert [a.status for a in extra] == [503] * 6
        assert all("at capacity" in a.body for a in extra)
        assert shed_delta(app, "ss_caps", before) == {"slow_start": 6}
        assert h.in_flight + h2.in_flight == 2 and adm.in_flight == 2

        # Ramp finished: the full caps (10 + 10) admit 20; the 21st is shed as plain overload.
        for t in pool.targets:
            assert t.slow_start is not None
            t.slow_start.finish()
        pool.update_limits()
        assert adm.limit == 20 and pool.shed_reason() == "overloaded"
        more = [fire(session, app, f"/hold/m{i}") for i in range(18)]
        await wait_for(lambda: h.in_flight + h2.in_flight == 20)
        assert h.in_flight == 10 and h2.in_flight == 10
        over = await get(session, app, "/hold/over")
        assert over.status == 503
        assert shed_delta(app, "ss_caps", before) == {"slow_start": 6, "overloaded": 1}
        h.release_all()
        h2.release_all()
        assert [a.status for a in await asyncio.gather(*held, *more)] == [200] * 20
        await wait_for(lambda: adm.in_flight == 0)
    finally:
        h2.release_all()


# ---- (c) admission: bounded FIFO queue, timeout, order; adaptive LIFO -------------------------------


async def hold_two_queue_three(
    h: Holding, app: App, session: aiohttp.ClientSession
) -> list[asyncio.Task[Answer]]:
    """/hold/1 and /hold/2 take both slots, then /hold/3, 4 and 5 join the queue in that order."""
    adm = app.proxy.runtime.pools["api"].admission
    assert adm is not None
    tasks = [fire(session, app, "/hold/1"), fire(session, app, "/hold/2")]
    await wait_for(lambda: h.in_flight == 2)
    for i, rid in enumerate(("3", "4", "5"), start=1):
        tasks.append(fire(session, app, f"/hold/{rid}"))
        await wait_for(lambda i=i: adm.queued == i)
    return tasks


def admission_config(address: str, route: str, queue: str) -> str:
    return (
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {address}}}]
    max_in_flight: 2
    queue: {queue}
routes:
  - name: {route}
    upstream: api
"""
    )


async def test_queue_bounded_full_sheds_at_once_waiters_time_out(
    holding: tuple[Holding, Backend], gateway_factory: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    h, b = holding
    app = await gateway_factory(admission_config(b.address, "adm_bound", "{size: 2, timeout: 200ms}"))
    adm = app.proxy.runtime.pools["api"].admission
    assert adm is not None and adm.limit == 2
    before = shed_now(app, "adm_bound")
    r1, r2 = fire(session, app, "/hold/1"), fire(session, app, "/hold/2")
    await wait_for(lambda: h.in_flight == 2)
    r3 = fire(session, app, "/hold/3")
    await wait_for(lambda: adm.queued == 1)
    r4 = fire(session, app, "/hold/4")
    await wait_for(lambda: adm.queued == 2)
    assert h.order == ["1", "2"]

    r5 = await get(session, app, "/hold/5")  # queue full: shed at once
    assert r5.status == 503 and r5.elapsed < 0.05, r5.elapsed
    assert shed_delta(app, "adm_bound", before) == {"overloaded": 1}

    a3, a4 = await asyncio.gather(r3, r4)  # never admitted: shed when their 200 ms are up
    for a in (a3, a4):
        assert a.status == 503
        assert 0.19 <= a.elapsed < 1.0, a.elapsed
    assert shed_delta(app, "adm_bound", before) == {"overloaded": 3}
    assert adm.queued == 0 and h.order == ["1", "2"]  # the backend never saw them
    h.release("1", "2")
    assert [a.status for a in await asyncio.gather(r1, r2)] == [200, 200]
    await wait_for(lambda: adm.in_flight == 0)


async def test_fifo_queue_admits_oldest_first_when_slots_free(
    holding: tuple[Holding, Backend], gateway_factory: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    h, b = holding
    app = await gateway_factory(admission_config(b.address, "adm_fifo", "{size: 4, timeout: 5s}"))
    adm = app.proxy.runtime.pools["api"].admission
    assert adm is not None
    tasks = await hold_two_queue_three(h, app, session)
    for done, admitted in (("1", "3"), ("2", "4"), ("3", "5")):
        h.release(done)
        await wait_for(lambda admitted=admitted: h.order[-1] == admitted)
    assert h.order == ["1", "2", "3", "4", "5"]
    h.release_all()
    assert [a.status for a in await asyncio.gather(*tasks)] == [200] * 5


async def test_adaptive_lifo_serves_newest_first_once_standing(
    holding: tuple[Holding, Backend], gateway_factory: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    h, b = holding
    app = await gateway_factory(
        admission_config(
            b.address,
            "adm_lifo",
            "{size: 8, timeout: 5s, mode: adaptive_lifo, codel_interval: 1500ms, codel_target: 5s}",
        )
    )
    adm = app.proxy.runtime.pools["api"].admission
    assert adm is not None
    tasks = await hold_two_queue_three(h, app, session)
    assert not adm.is_standing()
    h.release("1")  # the queue is young: still FIFO → the oldest waiter
    await wait_for(lambda: h.order[-1] == "3")
    await wait_for(adm.is_standing)  # non-empty for the whole codel_interval: LIFO
    tasks.append(fire(session, app, "/hold/6"))
    await wait_for(lambda: adm.queued == 3)
    for done, admitted in (("2", "6"), ("3", "5"), ("6", "4")):
        h.release(done)
        await wait_for(lambda admitted=admitted: h.order[-1] == admitted)
    assert h.order == ["1", "2", "3", "6", "5", "4"]
    h.release_all()
    assert [a.status for a in await asyncio.gather(*tasks)] == [200] * 6


async def test_adaptive_lifo_sheds_stale_waiters_once_standing(
    holding: tuple[Holding, Backend], gateway_factory: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    h, b = holding
    app = await gateway_factory(
        admission_config(
            b.address,
            "adm_codel",
            "{size: 8, timeout: 5s, mode: adaptive_lifo, codel_interval: 100ms, codel_target: 10ms}",
        )
    )
    adm = app.proxy.runtime.pools["api"].admission
    assert adm is not None
    before = shed_now(app, "adm_codel")
    held = [fire(session, app, "/hold/1"), fire(session, app, "/hold/2")]
    await wait_for(lambda: h.in_flight == 2)
    waiter = await get(session, app, "/hold/3")  # standing after 100 ms → older than 10 ms: shed
    assert waiter.status == 503
    assert 0.09 <= waiter.elapsed < 1.0, waiter.elapsed  # far before the 5 s queue timeout
    assert shed_delta(app, "adm_codel", before) == {"overloaded": 1}
    h.release_all()
    assert [a.status for a in await asyncio.gather(*held)] == [200, 200]


# ---- (d) priorities -------------------------------------------------------------------------------


async def test_critical_request_displaces_sheddable_waiter(
    holding: tuple[Holding, Backend], gateway_factory: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    h, b = holding
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {b.address}}}]
    max_in_flight: 2
    queue: {{size: 1, timeout: 5s}}
routes:
  - name: prio_bulk
    upstream: api
    match: {{path_prefix: /hold/bulk}}
    priority: sheddable
  - name: prio_main
    upstream: api
    priority_header: X-Priority
"""
    )
    adm = app.proxy.runtime.pools["api"].admission
    assert adm is not None
    bulk_before, main_before = shed_now(app, "prio_bulk"), shed_now(app, "prio_main")
    held = [fire(session, app, "/hold/1"), fire(session, app, "/hold/2")]
    await wait_for(lambda: h.in_flight == 2)
    bulk = fire(session, app, "/hold/bulk3")  # route priority: sheddable
    await wait_for(lambda: adm.queued_by_priority() == (0, 0, 1))
    crit = fire(session, app, "/hold/4", headers={"X-Priority": "critical"})
    a_bulk = await bulk  # displaced by the critical arrival while the queue is full
    assert a_bulk.status == 503 and a_bulk.elapsed < 2.0
    await wait_for(lambda: adm.queued_by_priority() == (1, 0, 0))
    assert shed_delta(app, "prio_bulk", bulk_before) == {"overloaded": 1}
    # A default request cannot displace a critical waiter: it is the one shed.
    dflt = await get(session, app, "/hold/5")
    assert dflt.status == 503 and dflt.elapsed < 0.05
    assert shed_delta(app, "prio_main", main_before) == {"overloaded": 1}
    h.release("1")
    await wait_for(lambda: h.order[-1] == "4")
    assert "bulk3" not in h.order and "5" not in h.order
    h.release_all()
    assert [a.status for a in await asyncio.gather(*held, crit)] == [200] * 3


# ---- (e) the adaptive limit ------------------------------------------------------------------------


async def test_adaptive_limit_grows_at_low_latency_and_shrinks_when_latency_rises(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    named = Named("n")
    b = await backend_factory(app=named.app)
    app = await gateway_factory(
        HEADER
        + f"""
upstreams:
  api:
    targets: [{{address: {b.address}}}]
    adaptive: {{initial: 4, min: 1, max: 100, window: 10ms}}
    queue: {{size: 100, timeout: 5s}}
routes:
  - name: adaptive
    upstream: api
"""
    )
    pool = app.proxy.runtime.pools["api"]
    ad, adm = pool.adaptive, pool.admission
    assert ad is not None and adm is not None and ad.limit == 4 and adm.limit == 4
    peak = 0

    async def worker(n: int) -> None:
        nonlocal peak
        for _ in range(n):
            a = await get(session, app, "/")
            assert a.status == 200
            peak = max(peak, adm.in_flight)

    # Low latency, 8 concurrent clients: the limit is used (in flight ≥ limit / 2) and grows.
    await asyncio.gather(*(worker(40) for _ in range(8)))
    grown = ad.limit
    assert grown >= 6, (ad, peak)
    assert adm.limit == grown

    # Latency rises 30 ms above the learned baseline: the gradient halves the target; it shrinks.
    named.delay = 0.03
    await asyncio.gather(*(worker(6) for _ in range(8)))
    assert ad.limit < grown, (grown, ad)
    assert adm.limit == ad.limit
