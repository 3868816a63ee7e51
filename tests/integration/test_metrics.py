"""/metrics on the admin port: values match the traffic actually sent, both exposition formats."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import Metric
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families

import gateway
from gateway.cluster.pool import Pooled, TargetState
from gateway.control.metrics import render, snapshot
from gateway.observe import stats
from gateway.policy.slow_start import SlowStart
from gateway.process.app import App
from tests.helpers import admin_url, free_port, one_upstream, proxy_url, raw_request, uniq

OPENMETRICS = "application/openmetrics-text; version=1.0.0"

om_families: Callable[[str], Iterator[Metric]] = om_parser.text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(app: App, accept: str | None = None) -> tuple[str, str]:
    assert app.admin is not None
    headers = {"Accept": accept} if accept else {}
    async with (
        aiohttp.ClientSession() as s,
        s.get(admin_url(app, "/metrics"), headers=headers) as r,
    ):
        assert r.status == 200
        return await r.text(), r.headers["Content-Type"]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def get_many(url: str, n: int) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(url) as r:
                await r.read()
                statuses.append(r.status)
    return statuses


async def test_counters_match_requests_sent(gateway_factory, backend):
    route, up = uniq("r"), uniq("u")
    app = await gateway_factory(one_upstream(backend.address, up, route))
    assert await get_many(proxy_url(app, "/ok"), 7) == [200] * 7
    assert await get_many(proxy_url(app, "/status/503"), 3) == [503] * 3

    text, ctype = await scrape(app)
    assert ctype.startswith("text/plain")
    m = parse(text)
    assert value(m, "gateway_requests_total", route=route, code_class="2xx") == 7
    assert value(m, "gateway_requests_total", route=route, code_class="5xx") == 3
    assert value(m, "gateway_requests_total", route=route, code_class="4xx") == 0
    assert value(m, "gateway_responses_total", route=route, code="200") == 7
    assert value(m, "gateway_responses_total", route=route, code="503") == 3
    assert value(m, "gateway_request_duration_seconds_count", route=route) == 10
    assert value(m, "gateway_request_duration_seconds_bucket", route=route, le="+Inf") == 10
    assert value(m, "gateway_request_duration_seconds_sum", route=route) > 0
    assert value(m, "gateway_requests_in_flight", route=route) == 0

    t = {"upstream": up, "target": backend.address}
    assert value(m, "gateway_upstream_responses_total", **t, code_class="2xx") == 7
    assert value(m, "gateway_upstream_responses_total", **t, code_class="5xx") == 3
    assert value(m, "gateway_upstream_duration_seconds_count", **t) == 10
    assert value(m, "gateway_upstream_connect_errors_total", **t) == 0
    assert value(m, "gateway_upstream_timeouts_total", **t) == 0
    # One client connection, requests one after another: the pooled upstream connection is reused.
    assert value(m, "gateway_upstream_connections_opened_total", **t) == 1
    assert value(m, "gateway_upstream_pool_idle_connections", **t) == 1
    assert value(m, "gateway_upstream_in_flight", **t) == 0
    assert value(m, "gateway_target_state", **t, state="healthy") == 1
    for state in ("unhealthy", "drained", "ejected"):
        assert (("gateway_target_state", frozenset({**t, "state": state}.items()))) in m
        assert value(m, "gateway_target_state", **t, state=state) == 0
    assert value(m, "gateway_target_weight_ratio", **t) == 1.0
    assert value(m, "gateway_upstream_null", upstream=up) == 0
    assert len(backend.app["requests"]) == 10
    build = [k for k in m if k[0] == "gateway_build_info"]
    assert len(build) == 1 and m[build[0]] == 1
    assert ("compiled", str(gateway.compiled()).lower()) in build[0][1]
    assert ("gateway_client_connections_open", frozenset()) in m
    assert value(m, "gateway_client_connections_total") >= 2


async def test_local_answers_are_counted(gateway_factory, backend):
    null_route, api, up = uniq("null"), uniq("api"), uniq("u")
    app = await gateway_factory(f"""
upstreams:
  {up}:
    targets: [{{address: "{backend.address}"}}]
routes:
  - name: {null_route}
    upstream: null
    match: {{path_prefix: /off}}
  - name: {api}
    upstream: {up}
    match: {{path_prefix: /api}}
""")
    before = parse((await scrape(app))[0])
    assert await get_many(proxy_url(app, "/off/x"), 4) == [503] * 4
    assert await get_many(proxy_url(app, "/nowhere"), 2) == [404] * 2
    reply = await raw_request(app.proxy.port, b"NOT A REQUEST\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
    after = parse((await scrape(app))[0])

    assert value(after, "gateway_requests_shed_total", route=null_route, reason="null_upstream") == 4
    assert value(after, "gateway_requests_total", route=null_route, code_class="5xx") == 4
    assert value(after, "gateway_responses_total", route=null_route, code="503") == 4
    assert value(after, "gateway_no_route_total") - value(before, "gateway_no_route_total") == 2
    assert value(after, "gateway_bad_requests_total") - value(before, "gateway_bad_requests_total") == 1
    accepted = value(after, "gateway_client_connections_total") - value(
        before, "gateway_client_connections_total"
    )
    assert accepted >= 3  # two client sessions plus the raw connection (scrapes go to the admin port)
    assert len(backend.app["requests"]) == 0


async def test_connect_errors_counted(gateway_factory):
    route, up = uniq("r"), uniq("u")
    dead = f"127.0.0.1:{free_port()}"
    app = await gateway_factory(one_upstream(dead, up, route))
    assert await get_many(proxy_url(app, "/"), 2) == [502, 502]
    m = parse((await scrape(app))[0])
    assert value(m, "gateway_upstream_connect_errors_total", upstream=up, target=dead) == 2
    assert value(m, "gateway_upstream_connections_opened_total", upstream=up, target=dead) == 0
    assert value(m, "gateway_requests_total", route=route, code_class="5xx") == 2


async def test_ratelimit_decisions(gateway_factory, backend):
    route, up = uniq("r"), uniq("u")
    app = await gateway_factory(
        one_upstream(backend.address, up, route)
        + "    rate_limit: {rate: 1, per: 1h, burst: 2, key: route, name: perroute}\n"
    )
    statuses = await get_many(proxy_url(app, "/"), 5)
    assert statuses == [200, 200, 429, 429, 429]
    m = parse((await scrape(app))[0])
    labels = {"route": route, "limit": "perroute"}
    assert value(m, "gateway_ratelimit_decisions_total", **labels, decision="admitted") == 2
    assert value(m, "gateway_ratelimit_decisions_total", **labels, decision="limited") == 3


async def test_reload_results_counted(gateway_factory, backend, tmp_path):
    route, up = uniq("r"), uniq("u")
    text = "listen: 127.0.0.1:0\nhealth_listen: null\nadmin_listen: 127.0.0.1:0\n" + one_upstream(
        backend.address, up, route
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    app = await gateway_factory(text, path=str(path))
    before = parse((await scrape(app))[0])
    assert app.reload() == (True, [])
    path.write_text(text + "bogus_key: 1\n")
    ok, _ = app.reload()
    assert not ok
    after = parse((await scrape(app))[0])
    for result in ("success", "failure"):
        delta = value(after, "gateway_config_reloads_total", result=result) - value(
            before, "gateway_config_reloads_total", result=result
        )
        assert delta == 1, result


async def test_openmetrics_when_asked(gateway_factory, backend):
    route, up = uniq("r"), uniq("u")
    app = await gateway_factory(one_upstream(backend.address, up, route))
    assert await get_many(proxy_url(app, "/"), 3) == [200] * 3
    text, ctype = await scrape(app, OPENMETRICS)
    assert ctype.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in om_families(text)}
    assert families["gateway_requests"].type == "counter"
    assert families["gateway_request_duration_seconds"].type == "histogram"
    got = {
        (s.name, s.labels.get("route"), s.labels.get("code_class")): s.value
        for s in families["gateway_requests"].samples
    }
    assert got[("gateway_requests_total", route, "2xx")] == 3
    # A plain-text scraper (Prometheus' default Accept) still gets the text format.
    text, ctype = await scrape(app, "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    assert ctype.startswith("text/plain") and "# EOF" not in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
async def test_promtool_check_metrics(gateway_factory, backend):
    """promtool lints the Prometheus text format (it reads OpenMetrics' HELP names as a mismatch)."""
    route, up = uniq("r"), uniq("u")
    app = await gateway_factory(one_upstream(backend.address, up, route))
    await get_many(proxy_url(app, "/"), 2)
    await get_many(proxy_url(app, "/status/500"), 1)
    text, _ = await scrape(app)
    promtool = shutil.which("promtool")
    assert promtool is not None
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


# ---- merging snapshots (what a multi-worker master does) ----------------------------------------------


async def test_snapshots_merge_across_workers(gateway_factory, backend):
    route, up = uniq("r"), uniq("u")
    app = await gateway_factory(one_upstream(backend.address, up, route))
    await get_many(proxy_url(app, "/"), 4)
    one = orjson.loads(orjson.dumps(snapshot(app.proxy.runtime, worker="w1")))  # survives JSON
    two = orjson.loads(orjson.dumps(snapshot(app.proxy.runtime, worker="w2")))
    body, ctype = render([one, two], None)
    assert ctype.startswith("text/plain")
    m = parse(body.decode())
    t = {"upstream": up, "target": backend.address}
    # Counters and histograms are summed.
    assert value(m, "gateway_requests_total", route=route, code_class="2xx") == 8
    assert value(m, "gateway_request_duration_seconds_count", route=route) == 8
    assert value(m, "gateway_upstream_responses_total", **t, code_class="2xx") == 8
    # Additive gauges are summed, switches take the max, per-process state keeps a worker label.
    assert value(m, "gateway_upstream_pool_idle_connections", **t) == 2
    assert value(m, "gateway_upstream_null", upstream=up) == 0
    for w in ("w1", "w2"):
        assert value(m, "gateway_target_state", **t, state="healthy", worker=w) == 1
        assert value(m, "gateway_target_weight_ratio", **t, worker=w) == 1
    build = [v for k, v in m.items() if k[0] == "gateway_build_info"]
    assert build == [1]
    # A single snapshot has no worker label.
    m1 = parse(render([one], None)[0].decode())
    assert value(m1, "gateway_target_state", **t, state="healthy") == 1


class _FakeCircuit:
    state = "half_open"


def test_circuit_slow_start_and_target_state_are_exported():
    """Circuit state, slow start, and each target's `TargetState.state` (drained > unhealthy > ejected)."""
    now = [0.0]
    ta = TargetState("fake", "10.0.0.1:80", 2, 4)
    ta.in_flight = 3
    ta.idle.append(Pooled())
    ta.ejected = True
    ramp = SlowStart(10.0, 1.0, 0.1, lambda: now[0])
    ramp.restart()
    now[0] = 2.5  # a quarter of the way up the ramp
    ta.slow_start = ramp
    tb = TargetState("fake", "10.0.0.2:80", 1, 4)
    tb.healthy = False
    tb.ejected = True  # unhealthy wins over ejected
    pool = SimpleNamespace(name="fake", forced_null=True, circuit=_FakeCircuit(), targets=[ta, tb])
    runtime: Any = SimpleNamespace(pools={"fake": pool}, routes=())
    m = parse(render([snapshot(runtime)], None)[0].decode())
    a = {"upstream": "fake", "target": "10.0.0.1:80"}
    b = {"upstream": "fake", "target": "10.0.0.2:80"}
    assert value(m, "gateway_circuit_state", upstream="fake", state="half_open") == 1
    assert value(m, "gateway_circuit_state", upstream="fake", state="open") == 0
    assert ("gateway_circuit_state", frozenset({"upstream": "fake", "state": "closed"}.items())) in m
    assert value(m, "gateway_target_state", **a, state="ejected") == 1
    assert value(m, "gateway_target_state", **a, state="healthy") == 0
    assert value(m, "gateway_target_state", **b, state="unhealthy") == 1
    assert value(m, "gateway_target_state", **b, state="ejected") == 0
    assert value(m, "gateway_target_weight_ratio", **a) == 0.25
    assert value(m, "gateway_target_weight_ratio", **b) == 1.0
    assert value(m, "gateway_upstream_in_flight", **a) == 3
    assert value(m, "gateway_upstream_pool_idle_connections", **a) == 1
    assert value(m, "gateway_upstream_null", upstream="fake") == 1
    assert stats.BUCKETS  # the shared bucket layout the histograms export
