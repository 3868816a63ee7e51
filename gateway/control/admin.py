"""Admin API and /metrics on the main event loop (aiohttp, JSON via orjson).

GET endpoints are open (the listener binds to loopback by default); POST/DELETE need
`Authorization: Bearer <token>` when `admin_token` is configured (or GATEWAY_ADMIN_TOKEN is set
and the config has none). Every state change is logged once as a structured event.
It sees the running gateway only through a `GatewayView` (gateway.control.view).

    GET    /metrics                                      Prometheus / OpenMetrics (Accept)
    GET    /admin/routes                                 route table with in-flight counts
    GET    /admin/upstreams                              pools, switches, targets and their state
    GET    /admin/config                                 effective config, secrets redacted
    POST   /admin/upstreams/{name}/null                  send the upstream's traffic to the null upstream
    DELETE /admin/upstreams/{name}/null                  ...and back
    POST   /admin/upstreams/{name}/targets/{address}/drain   no new requests to that target
    DELETE /admin/upstreams/{name}/targets/{address}/drain   ...and back
    POST   /admin/reload                                 re-read the config file (400 with errors)
    DELETE /admin/cache[?prefix=/path][&route=name]      drop cached entries
    GET    /admin/_snapshot                              this process's plain metrics (for the master)
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.control import metrics
from gateway.observe import log

if TYPE_CHECKING:
    from gateway.cluster.pool import Pool, TargetState
    from gateway.control.view import GatewayView

TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"
REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"token|password|passwd|secret|authorization|api[-_]?key|credential", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^/@\s]*)@", re.I)
_URL_PW_PARAM = re.compile(r"(?P<k>[?&](?:password|passwd|token|secret)=)[^&#\s]*", re.I)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def redact(value: Any) -> Any:
    """Copy of plain data with secret-named keys and URL passwords replaced."""
    if isinstance(value, dict):
        return {
            k: REDACTED if v is not None and _SECRET_KEY.search(str(k)) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value:
        value = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
        return _URL_PW_PARAM.sub(lambda m: f"{m['k']}{REDACTED}", value)
    return value


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str) + b"\n",
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


class AdminServer:
    def __init__(self, view: GatewayView, host: str, port: int) -> None:
        self.view = view
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        web_app = web.Application(middlewares=[self._auth])
        r = web_app.router
        r.add_get("/metrics", self.metrics)
        r.add_get("/admin/routes", self.routes)
        r.add_get("/admin/upstreams", self.upstreams)
        r.add_get("/admin/config", self.config)
        r.add_post("/admin/upstreams/{name}/null", self.set_null)
        r.add_delete("/admin/upstreams/{name}/null", self.set_null)
        r.add_post("/admin/upstreams/{name}/targets/{address}/drain", self.set_drain)
        r.add_delete("/admin/upstreams/{name}/targets/{address}/drain", self.set_drain)
        r.add_post("/admin/reload", self.reload)
        r.add_get("/admin/_snapshot", self.raw_snapshot)
        r.add_delete("/admin/cache", self.purge_cache)
        runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])  # the port bound, for `admin_listen: host:0`

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ---- auth -------------------------------------------------------------------------------------
    def token(self) -> str | None:
        return self.view.runtime().config.admin_token or os.environ.get(TOKEN_ENV) or None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in _SAFE_METHODS:
            return await handler(request)
        token = self.token()
        if token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape")
            )
            if not ok:
                log.event("admin_unauthorized", method=request.method, path=request.path, peer=request.remote)
                return _error(
                    401, "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="gateway-admin"'}
                )
        return await handler(request)

    # ---- read-only ----------------------------------------------------------------------------------
    async def metrics(self, request: web.Request) -> web.Response:
        snap = metrics.snapshot(self.view.runtime(), self.view.worker)
        body, content_type = metrics.render([snap], request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def purge_cache(self, request: web.Request) -> web.Response:
        """DELETE /admin/cache[?prefix=/path][&route=name]: drop cached entries."""
        prefix = request.query.get("prefix", "").encode()
        only = request.query.get("route")
        purged = {}
        for route in self.view.runtime().routes:
            cache = route.cache
            if cache is not None and (only is None or route.name == only):
                purged[route.name] = cache.purge(prefix)
        log.event("cache_purged", prefix=prefix.decode(), routes=purged, peer=request.remote)
        return _json({"purged": purged})

    async def raw_snapshot(self, _: web.Request) -> web.Response:
        """This process's plain metrics, for a `workers: N` master to merge (JSON)."""
        snap = metrics.snapshot(self.view.runtime(), self.view.worker)
        return web.Response(body=orjson.dumps(snap), content_type="application/json")

    async def routes(self, _: web.Request) -> web.Response:
        runtime = self.view.runtime()
        configured = {r.name: r for r in runtime.config.routes}
        out = []
        for compiled in runtime.routes:
            cfg = configured.get(compiled.name)
            item: dict[str, Any] = redact(dataclasses.asdict(cfg)) if cfg is not None else {}
            pool = compiled.pool
            item.update(
                name=compiled.name,
                upstream=compiled.upstream_name,
                null=pool is None or pool.forced_null,
                in_flight=compiled.stats.in_flight,
                timeouts={
                    "connect": compiled.connect_timeout,
                    "response": compiled.response_timeout,
                    "idle": compiled.idle_timeout,
                },
            )
            out.append(item)
        return _json({"routes": out})

    async def upstreams(self, _: web.Request) -> web.Response:
        pools = self.view.runtime().pools
        return _json({"upstreams": {name: self._pool_view(pool) for name, pool in pools.items()}})

    @staticmethod
    def _target_view(t: TargetState) -> dict[str, Any]:
        return {
            "address": t.address,
            "state": t.state,
            "healthy": t.healthy,
            "drained": t.drained,
            "ejected": t.ejected,
            "weight": t.weight,
            "weight_ratio": metrics.weight_fraction(t),
            "effective_weight": metrics.effective_weight(t),
            "in_flight": t.in_flight,
            "idle_connections": len(t.idle),
        }

    def _pool_view(self, pool: Pool) -> dict[str, Any]:
        return {
            "name": pool.name,
            "balance": pool.config.balance,
            "forced_null": pool.forced_null,
            "circuit": metrics.circuit_state(pool),
            "targets": [self._target_view(t) for t in pool.targets],
        }

    async def config(self, _: web.Request) -> web.Response:
        data = redact(dataclasses.asdict(self.view.runtime().config))
        if self.view.config_path is not None:
            data = {"config_path": str(self.view.config_path), **data}
        return _json(data)

    # ---- state changes --------------------------------------------------------------------------------
    def _pool(self, request: web.Request) -> Pool | web.Response:
        name = request.match_info["name"]
        pool = self.view.runtime().pools.get(name)
        if pool is None:
            return _error(404, f"unknown upstream {name!r}")
        return pool

    async def set_null(self, request: web.Request) -> web.Response:
        pool = self._pool(request)
        if isinstance(pool, web.Response):
            return pool
        on = request.method == "POST"
        changed = pool.forced_null != on
        pool.forced_null = on
        if changed:
            log.event(
                "upstream_null", upstream=pool.name, forced_null=on, source="admin", peer=request.remote
            )
        return _json({"upstream": pool.name, "forced_null": on, "changed": changed})

    async def set_drain(self, request: web.Request) -> web.Response:
        pool = self._pool(request)
        if isinstance(pool, web.Response):
            return pool
        address = request.match_info["address"]
        target = pool.target(address)
        if target is None:
            return _error(404, f"unknown target {address!r} in upstream {pool.name!r}")
        on = request.method == "POST"
        changed = target.drained != on
        # In-flight exchanges finish; pooled connections are closed; undraining restarts slow start.
        pool.set_drained(target, on)
        if changed:
            log.event(
                "target_drain",
                upstream=pool.name,
                target=address,
                drained=on,
                source="admin",
                peer=request.remote,
            )
        return _json({"upstream": pool.name, "target": self._target_view(target), "changed": changed})

    async def reload(self, request: web.Request) -> web.Response:
        ok, errors = self.view.reload()  # logs `reloaded` / `reload_failed` itself
        if ok:
            return _json({"ok": True})
        return _json({"ok": False, "errors": errors}, 400)
