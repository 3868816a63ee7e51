"""Admin API: read-only views, the null switch, drain, bearer-token auth, redaction and reload."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from gateway.control.admin import REDACTED, redact
from gateway.control.metrics import render
from gateway.process.app import App
from tests.helpers import Result, admin_call, fetch, one_upstream, uniq, wait_for

TOKEN = "s3cret-admin-token-value"


async def proxy_get(app: App, path: str = "/", n: int = 1) -> list[Result]:
    async with aiohttp.ClientSession() as s:
        return [await fetch(s, app, path) for _ in range(n)]


def stderr_events(text: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            record = orjson.loads(line)
            if record.get("event") == name:
                out.append(record)
    return out


async def test_read_only_views(gateway_factory, backend):
    up, route = uniq("u"), uniq("r")
    app = await gateway_factory(one_upstream(backend.address, up, route))
    status, routes = await admin_call(app, "GET", "/admin/routes")
    assert status == 200
    [r] = routes["routes"]
    assert r["name"] == route and r["upstream"] == up and r["null"] is False and r["in_flight"] == 0
    assert set(r["timeouts"]) == {"connect", "response", "idle"}

    status, ups = await admin_call(app, "GET", "/admin/upstreams")
    assert status == 200
    view = ups["upstreams"][up]
    assert view["forced_null"] is False
    assert "circuit" in view
    [t] = view["targets"]
    assert t["address"] == backend.address
    assert t["state"] == "healthy"
    assert t["weight"] == 1 and t["effective_weight"] == 1.0
    assert t["in_flight"] == 0 and t["idle_connections"] == 0

    await proxy_get(app)
    _, ups = await admin_call(app, "GET", "/admin/upstreams")
    assert ups["upstreams"][up]["targets"][0]["idle_connections"] == 1

    status, _ = await admin_call(app, "GET", "/admin/nope")
    assert status == 404


async def test_null_switch(gateway_factory, backend, capfd):
    up, route = uniq("u"), uniq("r")
    app = await gateway_factory(one_upstream(backend.address, up, route))
    [(status, _, _)] = await proxy_get(app)
    assert status == 200

    status, body = await admin_call(app, "POST", f"/admin/upstreams/{up}/null")
    assert status == 200 and body["forced_null"] is True and body["changed"] is True
    status, body = await admin_call(app, "POST", f"/admin/upstreams/{up}/null")  # idempotent
    assert status == 200 and body["changed"] is False
    assert app.proxy.runtime.pools[up].forced_null is True

    served = len(backend.app["requests"])
    [(status, headers, _)] = await proxy_get(app)
    assert status == 503
    assert int(headers["Retry-After"]) >= 0
    assert len(backend.app["requests"]) == served  # answered without touching the backend
    _, ups = await admin_call(app, "GET", "/admin/upstreams")
    assert ups["upstreams"][up]["forced_null"] is True
    _, routes = await admin_call(app, "GET", "/admin/routes")
    assert routes["routes"][0]["null"] is True

    status, body = await admin_call(app, "DELETE", f"/admin/upstreams/{up}/null")
    assert status == 200 and body["forced_null"] is False
    [(status, _, _)] = await proxy_get(app)
    assert status == 200

    # Logged once per change, not per call.
    events = stderr_events(capfd.readouterr().err, "upstream_null")
    assert [e["forced_null"] for e in events if e["upstream"] == up] == [True, False]

    for method in ("POST", "DELETE"):
        status, body = await admin_call(app, method, "/admin/upstreams/nosuch/null")
        assert status == 404 and "nosuch" in body["error"]


async def test_null_switch_survives_reload(gateway_factory, backend, tmp_path):
    up, route = uniq("u"), uniq("r")
    header = "listen: 127.0.0.1:0\nhealth_listen: null\nadmin_listen: 127.0.0.1:0\n"
    text = one_upstream(backend.address, up, route, header)
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    app = await gateway_factory(text, path=str(path))
    assert (await admin_call(app, "POST", f"/admin/upstreams/{up}/null"))[0] == 200
    assert (await admin_call(app, "POST", "/admin/reload"))[0] == 200
    [(status, _, _)] = await proxy_get(app)
    assert status == 503


async def test_drain_target(gateway_factory, backend_factory, capfd):
    a = await backend_factory(name="a")
    b = await backend_factory(name="b")
    up, route = uniq("u"), uniq("r")
    app = await gateway_factory(f"""
upstreams:
  {up}:
    targets: [{{address: "{a.address}"}}, {{address: "{b.address}"}}]
routes:
  - name: {route}
    upstream: {up}
""")
    await proxy_get(app, n=4)
    assert len(a.app["requests"]) == 2 and len(b.app["requests"]) == 2

    status, body = await admin_call(app, "POST", f"/admin/upstreams/{up}/targets/{a.address}/drain")
    assert status == 200
    assert body["target"]["state"] == "drained" and body["target"]["effective_weight"] == 0
    assert body["target"]["idle_connections"] == 0  # pooled connections to a drained target are closed

    results = await proxy_get(app, n=10)
    assert [s for s, _, _ in results] == [200] * 10
    assert len(a.app["requests"]) == 2  # nothing new reached the drained target
    assert len(b.app["requests"]) == 12

    _, ups = await admin_call(app, "GET", "/admin/upstreams")
    states = {t["address"]: t["state"] for t in ups["upstreams"][up]["targets"]}
    assert states == {a.address: "drained", b.address: "healthy"}
    status, metrics = await admin_call(app, "GET", "/metrics")
    assert status == 200
    line = f'gateway_target_state{{state="drained",target="{a.address}",upstream="{up}"}} 1.0'
    assert line in metrics.decode()

    status, body = await admin_call(app, "DELETE", f"/admin/upstreams/{up}/targets/{a.address}/drain")
    assert status == 200 and body["target"]["state"] == "healthy"
    await proxy_get(app, n=4)
    assert len(a.app["requests"]) > 2 and len(a.app["requests"]) + len(b.app["requests"]) == 18

    events = stderr_events(capfd.readouterr().err, "target_drain")
    assert [(e["target"], e["drained"]) for e in events] == [(a.address, True), (a.address, False)]

    status, _ = await admin_call(app, "POST", f"/admin/upstreams/{up}/targets/127.0.0.1:1/drain")
    assert status == 404
    status, _ = await admin_call(app, "POST", f"/admin/upstreams/nosuch/targets/{a.address}/drain")
    assert status == 404


async def test_drain_lets_in_flight_finish(gateway_factory, backend):
    up, route = uniq("u"), uniq("r")
    app = await gateway_factory(one_upstream(backend.address, up, route))
    task = asyncio.create_task(proxy_get(app, "/sleep/0.3"))
    target = app.proxy.runtime.pools[up].targets[0]
    await wait_for(lambda: target.in_flight == 1)
    assert (await admin_call(app, "POST", f"/admin/upstreams/{up}/targets/{backend.address}/drain"))[0] == 200
    [(status, _, body)] = await task
    assert (status, body) == (200, b"slept\n")
    [(status, _, _)] = await proxy_get(app)
    assert status == 503  # the only target is drained: nothing available


async def test_auth_with_configured_token(gateway_factory, backend, capfd):
    up, route = uniq("u"), uniq("r")
    app = await gateway_factory(one_upstream(backend.address, up, route, f"admin_token: {TOKEN}"))
    pool = app.proxy.runtime.pools[up]
    target = pool.targets[0]
    attempts: list[dict[str, str | None]] = [
        {},
        {"token": "wrong"},
        {"token": TOKEN[:-1]},
        {"token": ""},
        {"auth": f"Basic {TOKEN}"},
        {"auth": TOKEN},
    ]
    for kwargs in attempts:
        for method, path in (
            ("POST", f"/admin/upstreams/{up}/null"),
            ("POST", f"/admin/upstreams/{up}/targets/{backend.address}/drain"),
            ("POST", "/admin/reload"),
        ):
            status, body = await admin_call(app, method, path, **kwargs)
            assert status == 401, (kwargs, path)
            assert "error" in body
        assert pool.forced_null is False and target.drained is False
    [(status, _, _)] = await proxy_get(app)
    assert status == 200

    # GET stays open.
    assert (await admin_call(app, "GET", "/admin/upstreams"))[0] == 200
    assert (await admin_call(app, "GET", "/metrics"))[0] == 200

    status, _ = await admin_call(app, "POST", f"/admin/upstreams/{up}/null", token=TOKEN)
    assert status == 200 and pool.forced_null is True
    status, _ = await admin_call(app, "DELETE", f"/admin/upstreams/{up}/null", token=TOKEN)
    assert status == 200 and pool.forced_null is False
    assert stderr_events(capfd.readouterr().err, "admin_unauthorized")


async def test_auth_token_from_environment(gateway_factory, backend, monkeypatch):
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "from-env")
    up, route = uniq("u"), uniq("r")
    app = await gateway_factory(one_upstream(backend.address, up, route))
    assert (await admin_call(app, "POST", f"/admin/upstreams/{up}/null"))[0] == 401
    assert app.proxy.runtime.pools[up].forced_null is False
    assert (await admin_call(app, "POST", f"/admin/upstreams/{up}/null", token="from-env"))[0] == 200
    assert app.proxy.runtime.pools[up].forced_null is True


async def test_config_is_redacted(gateway_factory, backend):
    up, route = uniq("u"), uniq("r")
    app = await gateway_factory(one_upstream(backend.address, up, route, f"admin_token: {TOKEN}"))
    status, raw = await admin_call(app, "GET", "/admin/config")
    assert status == 200
    assert TOKEN not in orjson.dumps(raw).decode()
    assert raw["admin_token"] == REDACTED
    assert raw["upstreams"][up]["targets"][0]["address"] == backend.address
    assert raw["routes"][0]["name"] == route


def test_redact_rules():
    data = {
        "redis": "redis://user:hunter2@cache:6379/0",
        "redis_url": "rediss://:hunter2@cache:6380",
        "plain": "redis://cache:6379",
        "query": "redis://cache:6379/0?password=hunter2&db=1",
        "nested": [{"client_secret": "hunter2", "Password": "hunter2", "api_key": "hunter2", "name": "x"}],
        "admin_token": None,
    }
    out = redact(data)
    assert "hunter2" not in orjson.dumps(out).decode()
    assert out["redis"] == f"redis://user:{REDACTED}@cache:6379/0"
    assert out["redis_url"] == f"rediss://:{REDACTED}@cache:6380"
    assert out["plain"] == "redis://cache:6379"
    assert out["query"] == f"redis://cache:6379/0?password={REDACTED}&db=1"
    assert out["nested"][0]["name"] == "x"
    assert out["admin_token"] is None  # nothing to hide


async def test_reload_endpoint(gateway_factory, backend, tmp_path, capfd):
    up, route = uniq("u"), uniq("r")
    header = "listen: 127.0.0.1:0\nhealth_listen: null\nadmin_listen: 127.0.0.1:0\n"
    text = one_upstream(backend.address, up, route, header)
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    app = await gateway_factory(text, path=str(path))
    old_config = app.config

    path.write_text(text + "  - name: broken\n    upstream: missing_upstream\n")
    status, body = await admin_call(app, "POST", "/admin/reload")
    assert status == 400
    assert body["ok"] is False
    assert any(str(path) in e and "missing_upstream" in e for e in body["errors"]), body
    assert app.config is old_config
    [(status, _, _)] = await proxy_get(app, "/still-here")
    assert status == 200

    path.write_text("listen: [unclosed\n")
    status, body = await admin_call(app, "POST", "/admin/reload")
    assert status == 400 and body["errors"]

    # A good file is applied: a new null route in front of the old one.
    new_route = uniq("maint")
    path.write_text(
        header
        + f"""
upstreams:
  {up}:
    targets: [{{address: "{backend.address}"}}]
routes:
  - name: {new_route}
    upstream: null
    match: {{path_prefix: /maintenance}}
  - name: {route}
    upstream: {up}
"""
    )
    status, body = await admin_call(app, "POST", "/admin/reload")
    assert (status, body) == (200, {"ok": True})
    [(status, _, _)] = await proxy_get(app, "/maintenance/x")
    assert status == 503
    [(status, _, _)] = await proxy_get(app, "/other")
    assert status == 200
    err = capfd.readouterr().err
    assert len(stderr_events(err, "reload_failed")) == 2
    assert len(stderr_events(err, "reloaded")) == 1


async def test_reload_without_file(gateway_factory, backend):
    app = await gateway_factory(one_upstream(backend.address, uniq("u"), uniq("r")))
    status, body = await admin_call(app, "POST", "/admin/reload")
    assert status == 400 and body["errors"]


async def test_raw_snapshots_merge_like_the_master(gateway_factory, backend):
    """A multi-worker master fetches each worker's /admin/_snapshot and merges them."""
    up, route = uniq("u"), uniq("r")
    app = await gateway_factory(one_upstream(backend.address, up, route))
    await proxy_get(app, n=3)
    status, raw = await admin_call(app, "GET", "/admin/_snapshot")
    assert status == 200
    body, _ = render([{**raw, "worker": "1"}, {**raw, "worker": "2"}])
    text = body.decode()
    assert f'gateway_requests_total{{code_class="2xx",route="{route}"}} 6.0' in text
    assert 'worker="2"' in text
