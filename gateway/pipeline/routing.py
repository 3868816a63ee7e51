"""The immutable runtime snapshot compiled from a Config: route table and pools.

Reload builds a new snapshot (carrying target state over by name) and swaps one reference; an
exchange keeps the route (and so the pool) it was dispatched with until it finishes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from gateway import http1
from gateway.cache.store import RouteCache
from gateway.cluster.pool import Pool, carry_over
from gateway.config.model import Config, Route, Timeouts
from gateway.observe.stats import RouteStats, route_stats
from gateway.ratelimit.limiter import ClientIp, Limiter, LimitStore, build_limiters

PRIORITY = {"critical": 0, "default": 1, "sheddable": 2}
PRIORITY_BYTES = {b"critical": 0, b"default": 1, b"sheddable": 2}


def _host_matcher(pattern: str | None) -> tuple[bytes | None, bytes | None]:
    """(exact, suffix) for a host pattern: `api.example.com` or `*.example.com`."""
    if pattern is None:
        return None, None
    p = pattern.lower().encode()
    if p.startswith(b"*."):
        return None, p[1:]
    return p, None


class CompiledRoute:
    """One route with everything the hot path needs precomputed."""

    __slots__ = (
        "cache",
        "connect_timeout",
        "header_match",
        "host_exact",
        "host_suffix",
        "idle_timeout",
        "limiters",
        "max_body_size",
        "methods",
        "name",
        "null_response",
        "path_exact",
        "path_prefix",
        "path_regex",
        "pool",
        "priority",
        "priority_header",
        "response_timeout",
        "stats",
        "upstream_name",
    )

    def __init__(
        self, route: Route, pool: Pool | None, defaults: Timeouts, previous: CompiledRoute | None = None
    ) -> None:
        self.name = route.name
        self.upstream_name = route.upstream
        self.pool = pool
        m = route.match
        self.host_exact, self.host_suffix = _host_matcher(m.host)
        self.path_prefix = m.path_prefix.encode() if m.path_prefix is not None else None
        self.path_exact = m.path.encode() if m.path is not None else None
        self.path_regex = re.compile(m.path_regex.encode()) if m.path_regex is not None else None
        self.methods = frozenset(x.upper().encode() for x in m.methods) if m.methods else None
        self.header_match = (
            tuple((k.lower().encode(), v.encode()) for k, v in m.headers.items()) if m.headers else None
        )
        t = route.timeouts or defaults
        self.connect_timeout = t.connect
        self.response_timeout = t.response
        self.idle_timeout = t.idle
        self.max_body_size = route.max_body_size
        self.priority = PRIORITY[route.priority]
        self.priority_header = route.priority_header.lower().encode() if route.priority_header else None
        self.stats: RouteStats = route_stats(route.name)
        old_cache = previous.cache if previous is not None else None
        if route.cache is None:
            self.cache: RouteCache | None = None
        elif old_cache is not None and old_cache.config == route.cache:
            self.cache = old_cache  # unchanged settings: keep the entries
        else:
            self.cache = RouteCache(route.name, route.cache)
        self.limiters: tuple[Limiter, ...] = build_limiters(
            route.name, route.limits, previous.limiters if previous is not None else ()
        )
        self.null_response = http1.error(
            503, "upstream unavailable (null upstream)", extra=((b"Retry-After", b"%d" % route.retry_after),)
        )

    def __repr__(self) -> str:
        return f"<Route {self.name} → {self.upstream_name or 'null'}>"

    def matches(
        self, method: bytes, host: bytes, path: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> bool:
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path_exact is not None and path != self.path_exact:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.host_exact is not None and host != self.host_exact:
            return False
        if self.host_suffix is not None and not host.endswith(self.host_suffix):
            return False
        if self.path_regex is not None and self.path_regex.match(path) is None:
            return False
        if self.header_match is not None:
            for name, value in self.header_match:
                for hn, hv in headers:
                    if hn.lower() == name and hv == value:
                        break
                else:
                    return False
        return True


class Runtime:
    """A compiled configuration; treat as immutable once built."""

    __slots__ = ("client_ip", "config", "limit_store", "pools", "routes")

    def __init__(self, config: Config, previous: Runtime | None = None) -> None:
        self.config = config
        lookup = carry_over(previous.pools if previous else {})
        old_pools = previous.pools if previous is not None else {}
        self.pools: dict[str, Pool] = {
            name: Pool(name, up, lookup(name), previous_pool=old_pools.get(name))
            for name, up in config.upstreams.items()
        }
        for name, pool in self.pools.items():
            old = old_pools.get(name)
            if old is not None:
                pool.forced_null = old.forced_null  # the operator's switch survives reloads
            if pool.config.backup is not None:
                pool.backup = self.pools[pool.config.backup]
        old_routes = {r.name: r for r in previous.routes} if previous is not None else {}
        self.routes: tuple[CompiledRoute, ...] = tuple(
            CompiledRoute(
                r,
                self.pools[r.upstream] if r.upstream is not None else None,
                config.timeouts,
                old_routes.get(r.name),
            )
            for r in config.routes
        )
        self.client_ip = ClientIp(config.trusted_proxies)
        # The distributed store is attached by the app (it owns the Redis connection's lifecycle).
        self.limit_store: LimitStore | None = previous.limit_store if previous is not None else None

    def match(
        self, method: bytes, host: bytes, path: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> CompiledRoute | None:
        for route in self.routes:
            if route.matches(method, host, path, headers):
                return route
        return None


class Holder:
    """The one mutable reference to the current snapshot, swapped atomically on reload."""

    __slots__ = ("access_log", "draining", "runtime")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.draining = False
        # An object with `record(client, exchange, status, duration_s)`; None = access log off.
        self.access_log: AccessLogSink | None = None


class AccessLogSink(Protocol):
    def record(self, client: Any, ex: Any, status: int, duration_s: float) -> None: ...
