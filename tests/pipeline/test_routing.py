"""Route matching on the compiled runtime, and balancing through real `Pool` picks."""

from __future__ import annotations

import random
from collections import Counter

import aiohttp
import pytest

from gateway.cluster.pool import Pool
from gateway.config.model import Target, Upstream
from gateway.config.parse import load_text
from gateway.pipeline.routing import Runtime
from tests.helpers import BackendFactory, GatewayFactory

UPSTREAMS = """\
listen: 127.0.0.1:0
health_listen: null
admin_listen: null
upstreams:
  a: {targets: [{address: 127.0.0.1:9001}]}
  b: {targets: [{address: 127.0.0.1:9002}]}
routes:
"""


def runtime(routes: str) -> Runtime:
    return Runtime(load_text(UPSTREAMS + routes, "<test>"))


def name_of(
    rt: Runtime,
    path: bytes = b"/",
    method: bytes = b"GET",
    host: bytes = b"example.com",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> str | None:
    route = rt.match(method, host, path, list(headers))
    return None if route is None else route.name


def test_first_match_wins() -> None:
    rt = runtime(
        "  - {name: specific, upstream: a, match: {path_prefix: /api/v2/}}\n"
        "  - {name: general, upstream: b, match: {path_prefix: /api/}}\n"
        "  - {name: shadowed, upstream: a, match: {path_prefix: /api/v2/x}}\n"
        "  - {name: rest, upstream: b}\n"
    )
    assert name_of(rt, b"/api/v2/x") == "specific"
    assert name_of(rt, b"/api/v1/x") == "general"
    assert name_of(rt, b"/other") == "rest"
    assert [r.name for r in rt.routes] == ["specific", "general", "shadowed", "rest"]


def test_no_route() -> None:
    rt = runtime("  - {name: api, upstream: a, match: {path_prefix: /api/}}\n")
    assert name_of(rt, b"/") is None
    assert name_of(rt, b"/apiary") is None
    assert name_of(rt, b"/api") is None  # the prefix includes the slash


def test_empty_match_matches_everything() -> None:
    rt = runtime("  - {name: all, upstream: a}\n")
    for path in (b"/", b"/x/y", b"*"):
        assert name_of(rt, path, method=b"DELETE", host=b"") == "all"


def test_host_exact() -> None:
    rt = runtime(
        "  - {name: api, upstream: a, match: {host: API.Example.com}}\n  - {name: other, upstream: b}\n"
    )
    # The client protocol lower-cases the host and strips the port before matching.
    assert name_of(rt, host=b"api.example.com") == "api"
    assert name_of(rt, host=b"www.example.com") == "other"
    assert name_of(rt, host=b"api.example.com.evil") == "other"
    assert name_of(rt, host=b"xapi.example.com") == "other"


def test_host_wildcard() -> None:
    rt = runtime(
        "  - {name: wild, upstream: a, match: {host: '*.example.com'}}\n  - {name: other, upstream: b}\n"
    )
    assert name_of(rt, host=b"a.example.com") == "wild"
    assert name_of(rt, host=b"a.b.example.com") == "wild"
    assert name_of(rt, host=b"example.com") == "other"  # the wildcard needs a label
    assert name_of(rt, host=b"badexample.com") == "other"
    assert name_of(rt, host=b"a.example.com.org") == "other"


def test_path_exact_prefix_regex() -> None:
    rt = runtime(
        "  - {name: exact, upstream: a, match: {path: /health}}\n"
        "  - {name: regex, upstream: a, match: {path_regex: '^/users/[0-9]+$'}}\n"
        "  - {name: prefix, upstream: b, match: {path_prefix: /static/}}\n"
    )
    assert name_of(rt, b"/health") == "exact"
    assert name_of(rt, b"/health/") is None
    assert name_of(rt, b"/healthz") is None
    assert name_of(rt, b"/users/42") == "regex"
    assert name_of(rt, b"/users/42/edit") is None
    assert name_of(rt, b"/users/abc") is None
    assert name_of(rt, b"/static/app.js") == "prefix"
    assert name_of(rt, b"/static") is None


def test_path_regex_uses_re_match() -> None:
    rt = runtime("  - {name: r, upstream: a, match: {path_regex: '/v[12]/'}}\n")
    assert name_of(rt, b"/v1/x") == "r"
    assert name_of(rt, b"/api/v1/x") is None  # anchored at the start like re.match


def test_methods() -> None:
    rt = runtime(
        "  - {name: read, upstream: a, match: {methods: [get, HEAD]}}\n"
        "  - {name: write, upstream: b, match: {methods: [POST, PUT]}}\n"
    )
    assert name_of(rt, method=b"GET") == "read"
    assert name_of(rt, method=b"HEAD") == "read"
    assert name_of(rt, method=b"POST") == "write"
    assert name_of(rt, method=b"PUT") == "write"
    assert name_of(rt, method=b"DELETE") is None


def test_headers() -> None:
    rt = runtime(
        "  - {name: canary, upstream: a, match: {headers: {X-Canary: 'yes', x-env: prod}}}\n"
        "  - {name: main, upstream: b}\n"
    )
    both = ((b"x-canary", b"yes"), (b"X-Env", b"prod"))
    assert name_of(rt, headers=both) == "canary"
    assert name_of(rt, headers=((b"X-CANARY", b"yes"), (b"x-env", b"prod"))) == "canary"
    assert name_of(rt, headers=((b"x-canary", b"yes"),)) == "main"  # all must match
    assert name_of(rt, headers=((b"x-canary", b"YES"), (b"x-env", b"prod"))) == "main"  # values exact
    # Any occurrence of a repeated header may satisfy the match.
    assert name_of(rt, headers=((b"x-env", b"dev"), (b"x-env", b"prod"), (b"x-canary", b"yes"))) == "canary"


def test_all_conditions_combined() -> None:
    rt = runtime(
        "  - name: combo\n"
        "    upstream: a\n"
        "    match: {host: '*.example.com', path_prefix: /api/, methods: [POST], headers: {x-k: v}}\n"
    )
    ok = {"path": b"/api/x", "method": b"POST", "host": b"a.example.com", "headers": ((b"x-k", b"v"),)}
    assert name_of(rt, **ok) == "combo"  # type: ignore[arg-type]
    for key, bad in (("path", b"/x"), ("method", b"GET"), ("host", b"a.example.org"), ("headers", ())):
        assert name_of(rt, **{**ok, key: bad}) is None, key  # type: ignore[arg-type]


def test_null_upstream_route_has_no_pool() -> None:
    rt = runtime("  - {name: retired, upstream: null, retry_after: 17}\n")
    route = rt.match(b"GET", b"h", b"/", [])
    assert route is not None
    assert route.pool is None
    assert b"Retry-After: 17\r\n" in route.null_response.keep
    assert route.null_response.status == 503


# ---- balancing ------------------------------------------------------------------------------


def pool(*weights: int, balance: str = "round_robin", seed: int = 7) -> Pool:
    up = Upstream(
        targets=tuple(Target(address=f"127.0.0.1:{9100 + i}", weight=w) for i, w in enumerate(weights)),
        balance=balance,  # type: ignore[arg-type]
    )
    return Pool("test", up, rng=random.Random(seed))


def picks(p: Pool, n: int) -> list[str]:
    out = []
    for _ in range(n):
        t = p.pick()
        assert t is not None
        out.append(t.address)
    return out


def test_swrr_3_to_1_proportions() -> None:
    p = pool(3, 1)
    a, b = p.targets[0].address, p.targets[1].address
    seq = picks(p, 400)
    assert Counter(seq) == {a: 300, b: 100}
    # Smooth: every window of 4 consecutive picks holds exactly 3 a's and 1 b (nginx: a a b a).
    for i in range(0, 400, 4):
        assert Counter(seq[i : i + 4]) == {a: 3, b: 1}
    assert seq[:4] == [a, a, b, a]


def test_swrr_equal_weights_alternate() -> None:
    p = pool(1, 1, 1)
    seq = picks(p, 30)
    assert Counter(seq) == dict.fromkeys((t.address for t in p.targets), 10)
    for i in range(0, 30, 3):
        assert len(set(seq[i : i + 3])) == 3


def test_swrr_skips_unavailable_target() -> None:
    p = pool(3, 1)
    p.targets[0].healthy = False
    p.refresh()
    assert set(picks(p, 10)) == {p.targets[1].address}
    p.targets[1].drained = True
    p.refresh()
    assert p.pick() is None
    p.targets[0].healthy = True
    p.targets[1].drained = False
    p.refresh()
    assert Counter(picks(p, 40)) == {p.targets[0].address: 30, p.targets[1].address: 10}


def test_single_target_pool() -> None:
    p = pool(5)
    assert picks(p, 3) == [p.targets[0].address] * 3
    p.targets[0].healthy = False
    p.refresh()
    assert p.pick() is None


def test_least_request_prefers_less_loaded() -> None:
    p = pool(1, 1, balance="least_request")
    p.targets[0].in_flight = 5
    assert set(picks(p, 50)) == {p.targets[1].address}  # with two targets both are always compared
    p.targets[0].in_flight = 0
    p.targets[1].in_flight = 3
    assert set(picks(p, 50)) == {p.targets[0].address}


def test_least_request_spreads_idle_targets() -> None:
    p = pool(1, 1, 1, 1, balance="least_request", seed=1)
    counts = Counter(picks(p, 4000))
    assert len(counts) == 4
    for n in counts.values():
        assert 700 <= n <= 1300


def test_least_request_tracks_in_flight() -> None:
    """Picks that hold their in-flight count spread evenly over two targets."""
    p = pool(1, 1, balance="least_request")
    for _ in range(20):
        t = p.pick()
        assert t is not None
        t.in_flight += 1
    assert sorted(t.in_flight for t in p.targets) == [10, 10]


@pytest.mark.parametrize("weights", [(5, 1), (2, 3, 5)])
def test_swrr_general_proportions(weights: tuple[int, ...]) -> None:
    p = pool(*weights)
    total = sum(weights)
    counts = Counter(picks(p, total * 20))
    assert [counts[t.address] for t in p.targets] == [w * 20 for w in weights]


# ---- through a running gateway: the client protocol normalizes the host before matching ----------


async def test_host_routing_ignores_port_and_case(
    backend_factory: BackendFactory, gateway_factory: GatewayFactory
) -> None:
    a = await backend_factory(name="a")
    b = await backend_factory(name="b")
    text = (
        "listen: 127.0.0.1:0\nhealth_listen: null\nadmin_listen: null\n"
        "upstreams:\n"
        f"  a: {{targets: [{{address: {a.address}}}]}}\n"
        f"  b: {{targets: [{{address: {b.address}}}]}}\n"
        "routes:\n"
        "  - {name: exact, upstream: a, match: {host: api.example.com}}\n"
        "  - {name: wild, upstream: b, match: {host: '*.example.com'}}\n"
    )
    app = await gateway_factory(text)
    url = f"http://127.0.0.1:{app.proxy.port}/"
    expect = {
        "api.example.com": "a",
        "API.Example.COM:8443": "a",
        "www.example.com:80": "b",
        "x.y.example.com": "b",
        "example.com": None,
        "[::1]:8080": None,
    }
    async with aiohttp.ClientSession() as s:
        for host, name in expect.items():
            async with s.get(url, headers={"Host": host}) as r:
                if name is None:
                    assert r.status == 404, host
                else:
                    assert r.status == 200, host
                    assert (await r.json())["name"] == name, host
