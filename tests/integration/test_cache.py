"""Micro-cache end to end: a real gateway in front of a real loopback backend that counts requests.

Most tests replace the route cache's clock by a manual one (`RouteCache.clock`), so ttl, stale
windows and `Age` are exercised without sleeping; one test uses real time for
stale-while-revalidate. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.cache.store import RouteCache
from gateway.process.app import App
from tests.helpers import (
    ROOT,
    Backend,
    BackendFactory,
    GatewayFactory,
    ManualClock,
    admin_call,
    fetch,
    uniq,
    wait_for,
)

BIG = 100_000  # bytes, over the 64 KB max_object_bytes used below


def counting_app() -> web.Application:
    """Answers `<path> #<n>` (n = how often this path was asked); behaviour chosen by path prefix."""
    hits: Counter[str] = Counter()

    async def handler(request: web.Request) -> web.StreamResponse:
        path = request.path
        hits[path] += 1
        n = hits[path]
        st = request.app["state"]
        if st["fail"]:
            return web.Response(status=500, text="backend failure\n")
        if path.startswith("/slow/"):
            await asyncio.sleep(0.2)
        gate: asyncio.Event | None = st["gate"]
        if path.startswith("/gated/") and gate is not None:
            await asyncio.wait_for(gate.wait(), 20)
        headers: dict[str, str] = {}
        body = f"{path} #{n}\n".encode()
        if path.startswith("/nostore"):
            headers["Cache-Control"] = "no-store"
        elif path.startswith("/private"):
            headers["Cache-Control"] = "private, max-age=60"
        elif path.startswith("/cookie"):
            headers["Set-Cookie"] = f"session={n}"
        elif "/vary" in path:
            headers["Vary"] = "Accept-Encoding"
            body = f"{request.headers.get('Accept-Encoding', '-')} variant #{n}\n".encode()
        elif path.startswith("/kb/"):
            body = body.ljust(1000, b".")
        elif path.startswith("/big/"):
            body = b"B" * BIG
        elif path.startswith("/chunked-big/"):
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(10):
                await resp.write(b"C" * (BIG // 10))
            await resp.write_eof()
            return resp
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app["hits"] = hits
    app["state"] = {"fail": False, "gate": None}  # mutable: the app is frozen once started
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def config(address: str, route: str, cache: str, extra: str = "", upstream_extra: str = "") -> str:
    return f"""{extra}
upstreams:
  api:
    targets: [{{address: "{address}"}}]
{upstream_extra}
routes:
  - name: {route}
    upstream: api
    cache: {cache}
"""


def cache_of(app: App, route: str) -> RouteCache:
    for r in app.proxy.runtime.routes:
        if r.name == route:
            assert r.cache is not None
            return r.cache
    raise AssertionError(f"no route {route}")


async def setup(
    backend_factory: BackendFactory,
    gateway_factory: GatewayFactory,
    cache: str = "{ttl: 10s, stale_if_error: 60s}",
    extra: str = "",
    manual_clock: bool = True,
) -> tuple[Backend, App, RouteCache, ManualClock]:
    backend = await backend_factory(app=counting_app())
    route = uniq("cache")
    app = await gateway_factory(config(backend.address, route, cache, extra))
    rc = cache_of(app, route)
    clock = ManualClock()
    if manual_clock:
        rc.clock = clock
    return backend, app, rc, clock


def hits(backend: Backend, path: str) -> int:
    return int(backend.app["hits"][path])


def state(backend: Backend) -> dict[str, Any]:
    return backend.app["state"]  # type: ignore[no-any-return]


async def metrics(app: App) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = await admin_call(app, "GET", "/metrics")
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ---- hit / miss / HEAD ---------------------------------------------------------------------------


async def test_miss_then_hit_with_age_and_head(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, _rc, clock = await setup(backend_factory, gateway_factory)
    async with aiohttp.ClientSession() as s:
        st, miss, body = await fetch(s, app, "/a")
        assert (st, miss["X-Cache"], body) == (200, "MISS", b"/a #1\n")
        assert "Age" not in miss
        clock.now += 3.4
        st, h, body = await fetch(s, app, "/a")
        assert (st, h["X-Cache"], h["Age"], body) == (200, "HIT", "3", b"/a #1\n")
        assert h["Content-Length"] == str(len(body)) and h["Content-Type"] == miss["Content-Type"]
        assert h["Date"] == miss["Date"] and h["Server"] == miss["Server"]  # the stored head, unchanged
        st, h, body = await fetch(s, app, "/a", "HEAD")  # HEAD shares GET's entry
        assert (st, h["X-Cache"], h["Content-Length"], body) == (200, "HIT", "6", b"")
        st, h, body = await fetch(s, app, "/a?x=1")  # the query is part of the key
        assert (h["X-Cache"], body) == ("MISS", b"/a #2\n")
        # HEAD of a cold key goes upstream and is not stored; the next GET is still a miss
        st, h, body = await fetch(s, app, "/h", "HEAD")
        assert (st, h["X-Cache"], body) == (200, "MISS", b"")
        st, h, body = await fetch(s, app, "/h")
        assert (h["X-Cache"], body) == ("MISS", b"/h #2\n")
        # POST is never cached
        st, h, body = await fetch(s, app, "/a", "POST")
        assert (h["X-Cache"], body) == ("BYPASS", b"/a #3\n")
        clock.now += 7.0  # ttl 10 s: expired now (no stale-while-revalidate)
        st, h, body = await fetch(s, app, "/a")
        assert (h["X-Cache"], body) == ("MISS", b"/a #4\n")
    assert hits(backend, "/a") == 4 and hits(backend, "/h") == 2


async def test_thousand_concurrent_misses_one_upstream_request(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, rc, _ = await setup(backend_factory, gateway_factory)
    gate = asyncio.Event()
    state(backend)["gate"] = gate
    n = 1000
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        tasks = [asyncio.ensure_future(fetch(s, app, "/gated/hot")) for _ in range(n)]
        # The backend holds its answer until every other request has joined the fill in flight.
        await wait_for(lambda: sum(len(f.waiters) for f in rc.fills.values()) == n - 1, timeout=20)
        assert hits(backend, "/gated/hot") == 1
        gate.set()
        results = await asyncio.gather(*tasks)
    assert hits(backend, "/gated/hot") == 1
    assert {(st, body) for st, _, body in results} == {(200, b"/gated/hot #1\n")}
    labels = Counter(h["X-Cache"] for _, h, _ in results)
    assert labels == {"MISS": 1, "HIT": n - 1}
    assert rc.stats.misses == 1 and rc.stats.coalesced == n - 1
    assert not rc.fills


async def test_concurrent_misses_with_real_overlap(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    """Without a gate: a backend answering after 200 ms, 300 clients on separate connections."""
    backend, app, _rc, _ = await setup(backend_factory, gateway_factory, manual_clock=False)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        results = await asyncio.gather(*(fetch(s, app, "/slow/x") for _ in range(300)))
    assert hits(backend, "/slow/x") == 1
    assert {(st, body) for st, _, body in results} == {(200, b"/slow/x #1\n")}


# ---- stale-while-revalidate (real time) ----------------------------------------------------------


async def test_stale_while_revalidate_answers_at_once_and_refreshes_once(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, rc, _ = await setup(
        backend_factory, gateway_factory, "{ttl: 300ms, stale_while_revalidate: 30s}", manual_clock=False
    )
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        assert (await fetch(s, app, "/gated/r"))[2] == b"/gated/r #1\n"  # no gate yet: answered at once
        state(backend)["gate"] = gate  # from now on the backend holds its answers until the gate opens
        entry = next(iter(rc.entries.values()))[0]
        await wait_for(lambda: rc.clock() - entry.stored_at >= 0.3, timeout=2)  # real time: past ttl
        t0 = loop.time()
        results = await asyncio.gather(*(fetch(s, app, "/gated/r") for _ in range(50)))
        elapsed = loop.time() - t0
        # all answered stale while the one refresh is still held by the backend: none waited for it
        assert {(st, h["X-Cache"], body) for st, h, body in results} == {(200, "STALE", b"/gated/r #1\n")}
        assert hits(backend, "/gated/r") == 2 and rc.stats.revalidations == 0
        gate.set()
        await wait_for(lambda: rc.stats.revalidations == 1, timeout=5)
        assert hits(backend, "/gated/r") == 2  # exactly one background refresh
        st, h, body = await fetch(s, app, "/gated/r")
        assert (st, h["X-Cache"], body) == (200, "HIT", b"/gated/r #2\n")
        assert int(h["Age"]) == 0
    assert hits(backend, "/gated/r") == 2
    print(f"50 stale answers in {elapsed * 1000:.1f} ms")
    assert rc.stats.stale.get("revalidate") == 50


# ---- stale-if-error --------------------------------------------------------------------------------


async def test_stale_if_error_when_backend_killed(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, rc, clock = await setup(backend_factory, gateway_factory, "{ttl: 1s, stale_if_error: 30s}")
    async with aiohttp.ClientSession() as s:
        for p in ("/k/1", "/k/2"):
            assert (await fetch(s, app, p))[1]["X-Cache"] == "MISS"
        await backend.stop()
        clock.now += 5.0  # past ttl, within stale_if_error
        for p in ("/k/1", "/k/2"):
            st, h, body = await fetch(s, app, p)
            assert (st, h["X-Cache"], body) == (200, "STALE", f"{p} #1\n".encode())
            assert int(h["Age"]) == 5
        st, h, _ = await fetch(s, app, "/k/uncached")
        assert st == 502
        clock.now += 26.0  # 31 s old: past ttl + stale_if_error
        st, _, _ = await fetch(s, app, "/k/1")
        assert st == 502
    assert rc.stats.stale.get("error") == 2


async def test_stale_if_error_through_admin_null_switch(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, rc, clock = await setup(backend_factory, gateway_factory, "{ttl: 1s, stale_if_error: 30s}")
    async with aiohttp.ClientSession() as s:
        await fetch(s, app, "/n/1")
        assert (await admin_call(app, "POST", "/admin/upstreams/api/null"))[0] == 200
        st, h, body = await fetch(s, app, "/n/1")  # still fresh: a hit, null or not
        assert (st, h["X-Cache"]) == (200, "HIT")
        clock.now += 2.0
        st, h, body = await fetch(s, app, "/n/1")
        assert (st, h["X-Cache"], body) == (200, "STALE", b"/n/1 #1\n")
        st, h, _ = await fetch(s, app, "/n/2")
        assert st == 503
        assert hits(backend, "/n/1") == 1 and hits(backend, "/n/2") == 0
        assert (await admin_call(app, "DELETE", "/admin/upstreams/api/null"))[0] == 200
        st, h, body = await fetch(s, app, "/n/1")
        assert (st, h["X-Cache"], body) == (200, "MISS", b"/n/1 #2\n")
    assert rc.stats.stale.get("null_upstream") == 1


async def test_stale_if_error_on_5xx(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, rc, clock = await setup(backend_factory, gateway_factory, "{ttl: 1s, stale_if_error: 30s}")
    async with aiohttp.ClientSession() as s:
        await fetch(s, app, "/f/1")
        state(backend)["fail"] = True
        clock.now += 2.0
        st, h, body = await fetch(s, app, "/f/1")
        assert (st, h["X-Cache"], body) == (200, "STALE", b"/f/1 #1\n")
        st, h, body = await fetch(s, app, "/f/2")
        assert (st, body) == (500, b"backend failure\n")  # nothing cached: the 5xx passes through
        st, h, body = await fetch(s, app, "/f/2")
        assert st == 500 and hits(backend, "/f/2") == 2  # a 500 is never stored
        state(backend)["fail"] = False
        st, h, body = await fetch(s, app, "/f/1")
        assert (st, h["X-Cache"], body) == (200, "MISS", b"/f/1 #3\n")
    assert rc.stats.stale.get("5xx") == 1


@pytest.mark.parametrize("failure", ["5xx", "killed"])
async def test_stale_answers_still_open_the_circuit(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory, failure: str
) -> None:
    """A cache hiding an outage must not hide it from the circuit breaker: the failures behind
    stale answers count, the circuit opens, and later misses fail fast instead of reaching the backend."""
    backend = await backend_factory(app=counting_app())
    route = uniq("cache")
    breaker = "    circuit_breaker: {min_requests: 3, failure_ratio: 0.5, window: 30s, open_for: 60s}"
    app = await gateway_factory(
        config(backend.address, route, "{ttl: 1s, stale_if_error: 30s}", upstream_extra=breaker)
    )
    rc = cache_of(app, route)
    clock = ManualClock()
    rc.clock = clock
    circuit = app.proxy.runtime.pools["api"].circuit
    assert circuit is not None
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            assert (await fetch(s, app, f"/o/{i}"))[1]["X-Cache"] == "MISS"
        if failure == "5xx":
            state(backend)["fail"] = True
        else:
            await backend.stop()
        clock.now += 2.0
        for i in range(3):
            st, h, _ = await fetch(s, app, f"/o/{i}")
            assert (st, h["X-Cache"]) == (200, "STALE")
        assert circuit.state == "open"
        st, _, _ = await fetch(s, app, "/o/uncached")
        assert st == 503  # fails fast: the open circuit, not the backend
        if failure == "5xx":
            assert hits(backend, "/o/uncached") == 0
    assert rc.stats.stale.get("5xx" if failure == "5xx" else "error") == 3


async def test_coalesced_waiters_get_stale_when_the_fill_fails(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, _rc, clock = await setup(backend_factory, gateway_factory, "{ttl: 1s, stale_if_error: 30s}")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await fetch(s, app, "/slow/w")
        state(backend)["fail"] = True
        clock.now += 2.0
        results = await asyncio.gather(*(fetch(s, app, "/slow/w") for _ in range(20)))
    assert {(st, h["X-Cache"], body) for st, h, body in results} == {(200, "STALE", b"/slow/w #1\n")}


# ---- what is never stored --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nostore", "/cookie", "/private"])
async def test_uncacheable_responses_always_reach_the_backend(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory, path: str
) -> None:
    backend, app, rc, _ = await setup(backend_factory, gateway_factory)
    async with aiohttp.ClientSession() as s:
        for i in range(1, 6):
            st, h, body = await fetch(s, app, path)
            assert (st, h["X-Cache"], body) == (200, "MISS", f"{path} #{i}\n".encode())
    assert hits(backend, path) == 5
    assert not rc.entries and rc.bytes == 0


async def test_set_cookie_forwarded_to_each_client(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    _backend, app, _rc, _ = await setup(backend_factory, gateway_factory)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        results = await asyncio.gather(*(fetch(s, app, "/cookie") for _ in range(10)))
    cookies = sorted(h["Set-Cookie"] for _, h, _ in results)
    assert cookies == sorted(f"session={i}" for i in range(1, 11))  # nobody got someone else's cookie


async def test_authorization_requests_bypass(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    _backend, app, rc, _ = await setup(backend_factory, gateway_factory)
    auth = {"Authorization": "Bearer abc"}
    async with aiohttp.ClientSession() as s:
        await fetch(s, app, "/auth")  # cached without Authorization
        for i in range(2, 5):
            st, h, body = await fetch(s, app, "/auth", headers=auth)
            assert (st, h["X-Cache"], body) == (200, "BYPASS", f"/auth #{i}\n".encode())
        st, h, body = await fetch(s, app, "/auth")
        assert (h["X-Cache"], body) == ("HIT", b"/auth #1\n")  # authorized answers were not stored
    assert rc.stats.bypass == 3


async def test_vary_accept_encoding_keeps_two_variants(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, rc, _ = await setup(backend_factory, gateway_factory)
    gz, ident = {"Accept-Encoding": "gzip"}, {"Accept-Encoding": "identity"}
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        for _ in range(3):
            assert (await fetch(s, app, "/vary", headers=gz))[2] == b"gzip variant #1\n"
            assert (await fetch(s, app, "/vary", headers=ident))[2] == b"identity variant #2\n"
        _st, h, _ = await fetch(s, app, "/vary", headers=gz)
        assert (h["X-Cache"], h["Vary"]) == ("HIT", "Accept-Encoding")
    assert hits(backend, "/vary") == 2
    assert len(rc.entries) == 1 and len(next(iter(rc.entries.values()))) == 2


async def test_vary_concurrent_variants_never_mixed(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    """Misses for two variants of one key coalesce on one fill: each must still get its own variant."""
    backend, app, rc, _ = await setup(backend_factory, gateway_factory)
    gate = asyncio.Event()
    state(backend)["gate"] = gate
    gz, ident = {"Accept-Encoding": "gzip"}, {"Accept-Encoding": "identity"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False) as s:
        first = asyncio.ensure_future(fetch(s, app, "/gated/vary", headers=gz))
        await wait_for(lambda: hits(backend, "/gated/vary") == 1)
        others = [
            asyncio.ensure_future(fetch(s, app, "/gated/vary", headers=gz if i % 2 else ident))
            for i in range(10)
        ]
        await wait_for(lambda: sum(len(f.waiters) for f in rc.fills.values()) == 10)
        gate.set()
        results = [await first, *await asyncio.gather(*others)]
    for (_, _, body), ae in zip(
        results, ["gzip"] + ["gzip" if i % 2 else "identity" for i in range(10)], strict=True
    ):
        assert body.startswith(f"{ae} variant".encode()), (ae, body)


# ---- memory bound, object limit ------------------------------------------------------------------


async def test_memory_bound_under_many_keys(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    _backend, app, rc, _ = await setup(
        backend_factory, gateway_factory, "{ttl: 60s, max_bytes: 256KB}", extra="", manual_clock=True
    )
    limit = 256 * 1024
    sem = asyncio.Semaphore(50)

    async def one(s: aiohttp.ClientSession, i: int) -> int:
        async with sem:
            st, _, body = await fetch(s, app, f"/kb/{i}")
            assert len(body) == 1000
            return st

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:
        statuses = await asyncio.gather(*(one(s, i) for i in range(5000)))
    assert set(statuses) == {200}
    assert 0 < rc.bytes <= limit
    assert rc.bytes == sum(e.size for v in rc.entries.values() for e in v)
    assert rc.stats.stores == 5000 and rc.stats.evictions == 5000 - len(rc.entries)
    m = await metrics(app)
    assert m[("gateway_cache_bytes", (("route", rc.route),))] == rc.bytes <= limit


@pytest.mark.parametrize("path", ["/big/1", "/chunked-big/1"])
async def test_objects_over_max_object_bytes_stream_uncached(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory, path: str
) -> None:
    backend, app, rc, _ = await setup(backend_factory, gateway_factory, "{ttl: 60s, max_object_bytes: 64KB}")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for _ in range(3):
            st, h, body = await fetch(s, app, path)
            assert (st, h["X-Cache"], len(body)) == (200, "MISS", BIG)
        results = await asyncio.gather(*(fetch(s, app, path) for _ in range(5)))
        assert {(st, len(body)) for st, _, body in results} == {(200, BIG)}
    assert hits(backend, path) == 8
    assert not rc.entries and rc.bytes == 0


# ---- purge, metrics, access log ------------------------------------------------------------------


async def test_admin_purge_by_prefix(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    _backend, app, rc, _ = await setup(backend_factory, gateway_factory)
    paths = ["/a/1", "/a/2", "/ab", "/b/1"]
    async with aiohttp.ClientSession() as s:
        for p in paths:
            await fetch(s, app, p)
        st, body = await admin_call(app, "DELETE", "/admin/cache?prefix=/a")
        assert (st, body) == (200, {"purged": {rc.route: 3}})
        for p in paths:
            _, h, _ = await fetch(s, app, p)
            assert h["X-Cache"] == ("HIT" if p == "/b/1" else "MISS"), p
        st, body = await admin_call(app, "DELETE", "/admin/cache")
        assert body == {"purged": {rc.route: 4}}
        assert not rc.entries and rc.bytes == 0


async def test_metrics_match_outcomes(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, rc, clock = await setup(
        backend_factory, gateway_factory, "{ttl: 1s, stale_while_revalidate: 0s, stale_if_error: 30s}"
    )
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession() as s:
        for p in ("/m/1", "/m/2", "/m/1", "/m/1", "/m/2", "/m/3"):
            seen[(await fetch(s, app, p))[1]["X-Cache"]] += 1
        seen[(await fetch(s, app, "/m/1", headers={"Authorization": "x"}))[1]["X-Cache"]] += 1
        seen[(await fetch(s, app, "/m/1", "DELETE"))[1]["X-Cache"]] += 1
        state(backend)["fail"] = True
        clock.now += 2
        seen[(await fetch(s, app, "/m/2"))[1]["X-Cache"]] += 1
    assert seen == {"MISS": 3, "HIT": 3, "BYPASS": 2, "STALE": 1}
    m = await metrics(app)
    r = rc.route

    def val(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted({"route": r, **labels}.items()))), 0.0)

    assert val("gateway_cache_requests_total", result="hit") == 3
    # the stale answer was a miss that then found the backend failing
    assert val("gateway_cache_requests_total", result="miss") == 4
    assert val("gateway_cache_requests_total", result="bypass") == 2
    assert val("gateway_cache_requests_total", result="coalesced") == 0
    assert val("gateway_cache_stale_total", reason="5xx") == 1
    assert val("gateway_cache_stores_total") == 3
    assert val("gateway_cache_entries") == 3
    assert val("gateway_cache_bytes") == rc.bytes > 0


async def test_access_log_records_cache_status(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    backend, app, _rc, _ = await setup(
        backend_factory,
        gateway_factory,
        extra=f"access_log: {{enabled: true, path: '{log_path}'}}\n",
    )
    async with aiohttp.ClientSession() as s:
        await fetch(s, app, "/log")
        await fetch(s, app, "/log")
        await fetch(s, app, "/log", headers={"Authorization": "x"})
    assert app.access_log is not None
    app.access_log.flush()
    records = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [(r["path"], r["status"], r["cache"]) for r in records] == [
        ("/log", 200, "MISS"),
        ("/log", 200, "HIT"),
        ("/log", 200, "BYPASS"),
    ]
    assert records[1]["target"] is None and records[0]["target"] == backend.address


# ---- the fill goes away --------------------------------------------------------------------------


async def test_fill_client_leaving_hands_the_fill_over(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    """The client whose miss is the fill disconnects: the waiters still make one upstream request."""
    backend, app, rc, _ = await setup(backend_factory, gateway_factory)
    gate = asyncio.Event()
    state(backend)["gate"] = gate
    _reader, writer = await asyncio.open_connection("127.0.0.1", app.proxy.port)
    writer.write(b"GET /gated/leave HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % app.proxy.port)
    await writer.drain()
    await wait_for(lambda: hits(backend, "/gated/leave") == 1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.ensure_future(fetch(s, app, "/gated/leave")) for _ in range(20)]
        await wait_for(lambda: sum(len(f.waiters) for f in rc.fills.values()) == 20)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # the fill's client gives up (a reset: a FIN is only a half-close)
        await wait_for(lambda: hits(backend, "/gated/leave") >= 2)
        await asyncio.sleep(0.05)
        assert hits(backend, "/gated/leave") == 2  # one waiter took over; the others wait on it
        gate.set()
        results = await asyncio.gather(*tasks)
    assert {(st, body) for st, _, body in results} == {(200, b"/gated/leave #2\n")}
    assert hits(backend, "/gated/leave") == 2


async def test_lock_timeout_sends_waiters_upstream(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, rc, _ = await setup(backend_factory, gateway_factory, "{ttl: 10s, lock_timeout: 100ms}")
    gate = asyncio.Event()
    state(backend)["gate"] = gate
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        first = asyncio.ensure_future(fetch(s, app, "/gated/lock"))
        await wait_for(lambda: hits(backend, "/gated/lock") == 1)
        tasks = [asyncio.ensure_future(fetch(s, app, "/gated/lock")) for _ in range(5)]
        # the sweeper (about once a second) sends waiters past lock_timeout upstream themselves
        await wait_for(lambda: hits(backend, "/gated/lock") == 6, timeout=5)
        gate.set()
        results = [await first, *await asyncio.gather(*tasks)]
    assert {st for st, _, _ in results} == {200}
    assert not rc.fills


# ---- background refresh ----------------------------------------------------------------------------


async def test_refresh_keeps_the_variant_of_the_request(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    """The background refresh of a Vary variant asks for that variant (same Accept-Encoding)."""
    _backend, app, rc, clock = await setup(
        backend_factory, gateway_factory, "{ttl: 1s, stale_while_revalidate: 30s}"
    )
    ident = {"Accept-Encoding": "identity"}
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        assert (await fetch(s, app, "/vary/r", headers=ident))[2] == b"identity variant #1\n"
        clock.now += 2.0
        st, h, body = await fetch(s, app, "/vary/r", headers=ident)
        assert (st, h["X-Cache"], body) == (200, "STALE", b"identity variant #1\n")
        await wait_for(lambda: rc.stats.revalidations == 1)
        st, h, body = await fetch(s, app, "/vary/r", headers=ident)
        assert (st, h["X-Cache"], body) == (200, "HIT", b"identity variant #2\n")


async def test_no_background_refresh_while_nulled(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    backend, app, _rc, clock = await setup(
        backend_factory, gateway_factory, "{ttl: 1s, stale_while_revalidate: 30s}"
    )
    async with aiohttp.ClientSession() as s:
        await fetch(s, app, "/nr")
        assert (await admin_call(app, "POST", "/admin/upstreams/api/null"))[0] == 200
        clock.now += 2.0
        for _ in range(3):
            st, h, body = await fetch(s, app, "/nr")
            assert (st, h["X-Cache"], body) == (200, "STALE", b"/nr #1\n")
        await asyncio.sleep(0.1)  # a refresh, if one had been started, would have reached the backend
        assert hits(backend, "/nr") == 1


# ---- the shipped read/write split example --------------------------------------------------------


async def test_read_write_split_example(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    reads = await backend_factory(app=counting_app())
    writes = await backend_factory(app=counting_app())
    text = (ROOT / "config/read-write-split.yaml").read_text()
    lines = []
    for line in text.splitlines():  # as text: PyYAML would turn the `on:` keys into booleans
        if "health_check:" in line or "10.0.3.11" in line or "10.0.3.12" in line:
            continue
        line = line.replace("0.0.0.0:8080", "127.0.0.1:0").replace("0.0.0.0:8081", "127.0.0.1:0")
        line = line.replace("127.0.0.1:9901", "127.0.0.1:0")
        lines.append(line.replace("10.0.3.10:8000", reads.address).replace("10.0.4.10:8000", writes.address))
    app = await gateway_factory("\n".join(lines))
    async with aiohttp.ClientSession() as s:
        assert (await fetch(s, app, "/api/orders/1"))[1]["X-Cache"] == "MISS"
        assert (await fetch(s, app, "/api/orders/1"))[1]["X-Cache"] == "HIT"
        assert (await fetch(s, app, "/api/orders/1", "HEAD"))[1]["X-Cache"] == "HIT"
        for method in ("POST", "PUT", "DELETE"):
            st, h, _body = await fetch(s, app, "/api/orders/1", method)
            assert st == 200 and "X-Cache" not in h  # the write route has no cache
        assert (await fetch(s, app, "/other"))[0] == 404  # no route outside /api/
    assert hits(reads, "/api/orders/1") == 1 and hits(writes, "/api/orders/1") == 3


async def test_failed_refresh_is_not_retried_per_stale_answer(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    """While the upstream fails, stale answers do not each start a refresh (about one a second)."""
    backend, app, rc, clock = await setup(
        backend_factory, gateway_factory, "{ttl: 1s, stale_while_revalidate: 30s}"
    )
    async with aiohttp.ClientSession() as s:
        await fetch(s, app, "/fr")
        state(backend)["fail"] = True
        clock.now += 2.0
        for _ in range(30):
            st, h, body = await fetch(s, app, "/fr")
            assert (st, h["X-Cache"], body) == (200, "STALE", b"/fr #1\n")
            await asyncio.sleep(0.005)
        assert hits(backend, "/fr") == 2  # the fill and one refresh (that got a 500)
        assert rc.revalidating  # held back for a moment
        await wait_for(lambda: not rc.revalidating, timeout=3)
        state(backend)["fail"] = False
        assert (await fetch(s, app, "/fr"))[1]["X-Cache"] == "STALE"
        await wait_for(lambda: rc.stats.revalidations == 1)
        st, h, body = await fetch(s, app, "/fr")
        assert (st, h["X-Cache"], body) == (200, "HIT", b"/fr #3\n")
