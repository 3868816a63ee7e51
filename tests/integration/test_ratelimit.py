"""Rate limits through the proxy: 429 answers and their headers, keys, two-phase admission,
trusted proxies, and the per-limit counters.

Long periods (`per: 1m`) keep buckets from refilling during a test, so counts are exact.
"""

from __future__ import annotations

import aiohttp

from gateway.observe import stats
from gateway.process.app import App
from gateway.ratelimit.limiter import MISSING, ROUTE
from tests.helpers import Backend, GatewayFactory, proxy_url, rate_limit_config


def counts(route: str, label: str) -> tuple[int, int]:
    admitted, limited = stats.RATELIMIT.get((route, label), [0, 0])
    return admitted, limited


async def get(
    session: aiohttp.ClientSession, app: App, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str]]:
    async with session.request(method, proxy_url(app, "/rl"), headers=headers) as r:
        await r.read()
        return r.status, dict(r.headers)


async def test_burst_then_429_with_headers(backend: Backend, gateway_factory: GatewayFactory) -> None:
    route = "rl-basic"
    base = counts(route, "client_ip")
    app = await gateway_factory(
        rate_limit_config(backend, route, "{rate: 5, per: 1s, burst: 5, key: client_ip}")
    )
    async with aiohttp.ClientSession() as s:
        results = [await get(s, app) for _ in range(6)]
        async with s.get(proxy_url(app, "/rl")) as r:
            seventh, body = r.status, await r.read()
    assert [st for st, _ in results] == [200] * 5 + [429]
    for _, h in results[:5]:
        assert "RateLimit" not in h and "RateLimit-Policy" not in h  # headers: false by default
    h = results[5][1]
    assert h["Retry-After"] == "1"
    assert h["RateLimit-Policy"] == '"client_ip";q=5;w=1'
    assert h["RateLimit"] == '"client_ip";r=0;t=1'
    assert seventh == 429 and b"rate limit client_ip exceeded" in body
    assert len(backend.app["requests"]) == 5  # rejected requests never reach the backend
    admitted, limited = counts(route, "client_ip")
    assert (admitted - base[0], limited - base[1]) == (5, 2)
    assert app.proxy.runtime.routes[0].stats.shed.get("rate_limited", 0) >= 2


async def test_custom_status(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(
        rate_limit_config(backend, "rl-status", "{rate: 2, per: 1m, burst: 2, key: client_ip, status: 503}")
    )
    async with aiohttp.ClientSession() as s:
        results = [await get(s, app) for _ in range(3)]
    assert [st for st, _ in results] == [200, 200, 503]
    assert int(results[2][1]["Retry-After"]) >= 1
    assert results[2][1]["RateLimit-Policy"] == '"client_ip";q=2;w=60'


async def test_rejecting_limit_consumes_no_token_from_the_others(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    route = "rl-two"
    limits = """
      - {name: wide, rate: 10, per: 1m, burst: 10, key: client_ip}
      - {name: narrow, rate: 2, per: 1m, burst: 2, key: route}"""
    base_wide, base_narrow = counts(route, "wide"), counts(route, "narrow")
    app = await gateway_factory(rate_limit_config(backend, route, limits))
    wide, narrow = app.proxy.runtime.routes[0].limiters
    async with aiohttp.ClientSession() as s:
        statuses = [(await get(s, app))[0] for _ in range(2)]
        assert statuses == [200, 200]
        assert wide.table.remaining("127.0.0.1") == 8
        assert narrow.table.remaining(ROUTE) == 0
        rejected = [await get(s, app) for _ in range(5)]
    assert [st for st, _ in rejected] == [429] * 5
    assert rejected[0][1]["RateLimit-Policy"] == '"narrow";q=2;w=60'  # named by the limit that refused
    assert wide.table.remaining("127.0.0.1") == 8  # untouched by the five rejected requests
    assert counts(route, "wide")[0] - base_wide[0] == 2
    assert counts(route, "wide")[1] - base_wide[1] == 0
    assert counts(route, "narrow")[0] - base_narrow[0] == 2
    assert counts(route, "narrow")[1] - base_narrow[1] == 5


async def test_header_key_separates_clients_and_missing_shares_a_bucket(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(
        rate_limit_config(backend, "rl-header", "{rate: 2, per: 1m, burst: 2, key: 'header:X-Api-Key'}")
    )
    limiter = app.proxy.runtime.routes[0].limiters[0]
    async with aiohttp.ClientSession() as s:
        a = [(await get(s, app, {"X-Api-Key": "alpha"}))[0] for _ in range(3)]
        b = [(await get(s, app, {"X-Api-Key": "beta"}))[0] for _ in range(3)]
        missing = [(await get(s, app))[0] for _ in range(2)]
    async with aiohttp.ClientSession() as other:  # another connection without the header
        missing.append((await get(other, app))[0])
    assert a == [200, 200, 429]
    assert b == [200, 200, 429]
    assert missing == [200, 200, 429]
    assert limiter.table.remaining(MISSING) == 0
    assert limiter.table.remaining("gamma") == 2


async def test_route_key_is_shared_across_clients(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(
        rate_limit_config(backend, "rl-route", "{rate: 3, per: 1m, burst: 3, key: route}")
    )
    # Two clients with different source addresses (all of 127.0.0.0/8 is loopback on Linux).
    c1 = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.1", 0)))
    c2 = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    async with c1, c2:
        statuses = [(await get(c1, app))[0], (await get(c2, app))[0], (await get(c1, app))[0]]
        statuses += [(await get(c2, app))[0], (await get(c1, app))[0]]
    assert statuses == [200, 200, 200, 429, 429]
    backend_peers = {r.headers["X-Forwarded-For"] for r in backend.app["requests"]}
    assert backend_peers == {"127.0.0.1", "127.0.0.2"}


async def test_client_ip_key_separates_source_addresses(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    app = await gateway_factory(rate_limit_config(backend, "rl-peers", "{rate: 1, per: 1m, burst: 1}"))
    c1 = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.1", 0)))
    c2 = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    async with c1, c2:
        statuses = [(await get(c, app))[0] for c in (c1, c2, c1, c2)]
    assert statuses == [200, 200, 429, 429]


async def test_headers_on_admitted_responses(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(
        rate_limit_config(
            backend, "rl-headers", "{rate: 5, per: 1m, burst: 5, key: client_ip, headers: true}"
        )
    )
    async with aiohttp.ClientSession() as s:
        results = [await get(s, app) for _ in range(6)]
    assert [st for st, _ in results] == [200] * 5 + [429]
    for i, (_, h) in enumerate(results[:5]):
        assert h["RateLimit-Policy"] == '"client_ip";q=5;w=60'
        assert h["RateLimit"].startswith(f'"client_ip";r={4 - i};t=')
    assert results[5][1]["RateLimit"].startswith('"client_ip";r=0;t=')


XFF_LIMIT = "{rate: 1, per: 1m, burst: 1, key: client_ip}"


async def test_trusted_proxy_xff_gives_separate_buckets(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    route = "rl-xff-trusted"
    base = counts(route, "client_ip")
    app = await gateway_factory(
        rate_limit_config(backend, route, XFF_LIMIT, extra="trusted_proxies: [127.0.0.0/8]\n")
    )
    limiter = app.proxy.runtime.routes[0].limiters[0]
    async with aiohttp.ClientSession() as s:
        one = (await get(s, app, {"X-Forwarded-For": "203.0.113.1"}))[0]
        two = (await get(s, app, {"X-Forwarded-For": "203.0.113.2"}))[0]
        one_again = (await get(s, app, {"X-Forwarded-For": "203.0.113.1"}))[0]
        # The rightmost untrusted hop counts: a trusted 127.x hop after it is skipped.
        chained = (await get(s, app, {"X-Forwarded-For": "203.0.113.2, 127.0.0.9"}))[0]
    assert (one, two, one_again, chained) == (200, 200, 429, 429)
    assert limiter.table.remaining("203.0.113.1") == 0
    assert limiter.table.remaining("203.0.113.2") == 0
    assert limiter.table.remaining("127.0.0.1") == 1  # the proxy's own address took no token
    admitted, limited = counts(route, "client_ip")
    assert (admitted - base[0], limited - base[1]) == (2, 2)


async def test_untrusted_xff_is_ignored(backend: Backend, gateway_factory: GatewayFactory) -> None:
    route = "rl-xff-untrusted"
    base = counts(route, "client_ip")
    app = await gateway_factory(rate_limit_config(backend, route, XFF_LIMIT))
    limiter = app.proxy.runtime.routes[0].limiters[0]
    async with aiohttp.ClientSession() as s:
        one = (await get(s, app, {"X-Forwarded-For": "203.0.113.1"}))[0]
        two = (await get(s, app, {"X-Forwarded-For": "203.0.113.2"}))[0]
    assert (one, two) == (200, 429)  # both are 127.0.0.1: one bucket
    assert limiter.table.remaining("127.0.0.1") == 0
    assert limiter.table.remaining("203.0.113.1") == 1
    admitted, limited = counts(route, "client_ip")
    assert (admitted - base[0], limited - base[1]) == (1, 1)
