"""Plain per-process counters for the hot path; the Prometheus collector reads them at scrape time.

Why not prometheus-client objects directly: each of their increments takes a lock. Here a
request costs a few increments of plain fields (the common cases) or dict/list slots (the rest),
and the export cost, merging them, is paid only when scraped.
"""

from __future__ import annotations

from typing import Final

# Histogram upper bounds in seconds (le), shared by every duration histogram.
BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Histogram:
    """Cumulative-at-export histogram: per-bucket counts plus sum; last slot is +Inf.

    The first four buckets (up to 5 ms, where a proxy's own latencies fall) are plain int fields:
    compiled, counting one is a C increment, where a list slot boxes a new int per request.
    """

    __slots__ = ("_b0", "_b1", "_b2", "_b3", "_rest", "sum")

    def __init__(self) -> None:
        self._b0 = 0
        self._b1 = 0
        self._b2 = 0
        self._b3 = 0
        self._rest = [0] * (len(BUCKETS) - 3)  # buckets 4.. and +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        if value <= 0.0005:
            self._b0 += 1
        elif value <= 0.001:
            self._b1 += 1
        elif value <= 0.0025:
            self._b2 += 1
        elif value <= 0.005:
            self._b3 += 1
        else:
            # A scan, not bisect: compiled it is a C loop over C doubles, not a call into bisect.
            i = 0
            for bound in _SLOW_BUCKETS:
                if value <= bound:
                    break
                i += 1
            rest = self._rest
            rest[i] = rest[i] + 1

    @property
    def counts(self) -> list[int]:
        """Per-bucket counts (not cumulative), the last one +Inf."""
        return [self._b0, self._b1, self._b2, self._b3, *self._rest]

    @property
    def count(self) -> int:
        return sum(self.counts)


# The buckets after the four counted in fields (Histogram.observe).
_SLOW_BUCKETS: Final = BUCKETS[4:]
assert BUCKETS[:4] == (0.0005, 0.001, 0.0025, 0.005)


class StatusTally:
    """Responses by status. The two statuses a run of traffic repeats are plain int fields (compiled:
    a C increment, where a dict counter boxes a new int per request): 200, and whichever other status
    came last (a 429 storm, a 503 outage); the rest are in a dict."""

    __slots__ = ("_hot", "_hot_n", "_ok", "_other")

    def __init__(self) -> None:
        self._ok = 0
        self._hot = 0
        self._hot_n = 0
        self._other: dict[int, int] = {}

    def add(self, status: int) -> None:
        if status == 200:
            self._ok += 1
        elif status == self._hot:
            self._hot_n += 1
        else:
            if self._hot_n:
                other = self._other
                other[self._hot] = other.get(self._hot, 0) + self._hot_n
            self._hot = status
            self._hot_n = 1

    def snapshot(self) -> dict[int, int]:
        """Status → count, for export (a copy: reading it changes nothing)."""
        out = dict(self._other)
        if self._hot_n:
            out[self._hot] = out.get(self._hot, 0) + self._hot_n
        if self._ok:
            out[200] = self._ok
        return out


class RouteStats:
    """Counters of one route; `responses` is keyed by status code, `shed` by reason."""

    __slots__ = ("_shed", "_shed_hot", "_shed_hot_n", "_statuses", "duration", "in_flight")

    def __init__(self) -> None:
        self._statuses = StatusTally()
        self._shed: dict[str, int] = {}
        self._shed_hot = ""  # the last shed reason, counted in a field (see StatusTally)
        self._shed_hot_n = 0
        self.duration = Histogram()
        self.in_flight = 0

    @property
    def responses(self) -> dict[int, int]:
        return self._statuses.snapshot()

    @property
    def shed(self) -> dict[str, int]:
        out = dict(self._shed)
        if self._shed_hot_n:
            out[self._shed_hot] = out.get(self._shed_hot, 0) + self._shed_hot_n
        return out

    def count_shed(self, reason: str) -> None:
        if reason == self._shed_hot:
            self._shed_hot_n += 1
            return
        if self._shed_hot_n:
            shed = self._shed
            shed[self._shed_hot] = shed.get(self._shed_hot, 0) + self._shed_hot_n
        self._shed_hot = reason
        self._shed_hot_n = 1

    def done(self, status: int, seconds: float) -> None:
        self._statuses.add(status)
        self.duration.observe(seconds)


class TargetStats:
    """Counters of one upstream target."""

    __slots__ = ("_statuses", "connect_errors", "connections_opened", "duration", "timeouts")

    def __init__(self) -> None:
        self.duration = Histogram()
        self._statuses = StatusTally()
        self.connect_errors = 0
        self.timeouts = 0
        self.connections_opened = 0

    @property
    def responses(self) -> dict[int, int]:
        return self._statuses.snapshot()

    def count(self, status: int) -> None:
        self._statuses.add(status)


class GlobalStats:
    """Process-wide counters that belong to no route (connections, parse errors, no route)."""

    __slots__ = (
        "bad_requests",
        "connections_accepted",
        "connections_open",
        "no_route",
        "reload_failures",
        "reloads",
    )

    def __init__(self) -> None:
        self.connections_accepted = 0
        self.connections_open = 0
        self.bad_requests = 0
        self.no_route = 0
        self.reloads = 0
        self.reload_failures = 0


GLOBAL: Final = GlobalStats()


# (route, limit label) → [admitted, limited]
RATELIMIT: dict[tuple[str, str], list[int]] = {}

# Keyed registries so counters survive configuration reloads (a counter must never go backwards).
ROUTES: dict[str, RouteStats] = {}
TARGETS: dict[tuple[str, str], TargetStats] = {}


def route_stats(name: str) -> RouteStats:
    s = ROUTES.get(name)
    if s is None:
        s = ROUTES[name] = RouteStats()
    return s


def target_stats(upstream: str, address: str) -> TargetStats:
    s = TARGETS.get((upstream, address))
    if s is None:
        s = TARGETS[(upstream, address)] = TargetStats()
    return s


class CacheStats:
    """Counters of one route's micro-cache (`stale` by reason: revalidate, error, null, ...)."""

    __slots__ = ("bypass", "coalesced", "evictions", "hits", "misses", "revalidations", "stale", "stores")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.bypass = 0
        self.coalesced = 0
        self.stores = 0
        self.evictions = 0
        self.revalidations = 0
        self.stale: dict[str, int] = {}


CACHES: dict[str, CacheStats] = {}


def cache_stats(route: str) -> CacheStats:
    s = CACHES.get(route)
    if s is None:
        s = CACHES[route] = CacheStats()
    return s
