"""Prometheus export of the plain counters in `gateway.observe.stats` and the live runtime, at scrape time.

Two steps, so a multi-process host can merge workers:

- `snapshot(runtime)` reads one process's structures into JSON-serialisable plain data (no
  prometheus-client objects; the hot path never touches them either);
- `render(snapshots, accept)` merges any number of snapshots and encodes them through a custom
  Collector in a private CollectorRegistry, in the text format or OpenMetrics as the scraper asks.

Snapshot layout (version 1)::

    {"version": 1, "worker": "<pid>", "families": [
        {"name": "gateway_requests_total", "type": "counter", "help": "...",
         "labels": ["route", "code_class"], "merge": "sum",
         "samples": [[["api", "2xx"], 7], ...]},
        {"name": "gateway_request_duration_seconds", "type": "histogram", ..., "buckets": [0.0005, ...],
         "samples": [[["api"], [per-bucket counts, not cumulative, last is +Inf], sum_seconds], ...]},
    ]}

Merge rules: counters and histograms are summed; each gauge says how it merges — `sum` (in-flight,
idle connections, open connections), `max` (operator switches, build info), or `per_worker`
(per-process state such as a target's health or a circuit: with several snapshots each sample gets
a `worker` label instead of being folded into a meaningless sum).

Adding a family is one function decorated with `@family` that returns `Family` objects, read from
the runtime snapshot it is given (`gateway.pipeline.routing.Runtime`) and `gateway.observe.stats`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

import gateway
from gateway.observe import stats

if TYPE_CHECKING:
    from gateway.cluster.pool import Pool, TargetState
    from gateway.pipeline.routing import Runtime

_go_float: Callable[[float], str] = floatToGoString  # untyped upstream; Prometheus float spelling

SNAPSHOT_VERSION = 1
TARGET_STATES = ("healthy", "unhealthy", "drained", "ejected")  # the values of TargetState.state
CIRCUIT_STATES = ("closed", "open", "half_open")

Labels = tuple[str, ...]


class Family:
    """One metric family being filled from plain data; `add` accumulates into a labelled sample."""

    __slots__ = ("buckets", "help", "labels", "merge", "name", "samples", "type")

    def __init__(
        self,
        name: str,
        type_: str,
        help_: str,
        labels: Sequence[str] = (),
        merge: str = "sum",
        buckets: Sequence[float] | None = None,
    ) -> None:
        self.name = name
        self.type = type_
        self.help = help_
        self.labels = tuple(labels)
        self.merge = merge
        self.buckets = tuple(buckets) if buckets is not None else None
        self.samples: dict[Labels, Any] = {}

    def add(self, labels: Sequence[object], value: float) -> Family:
        key = tuple(str(v) for v in labels)
        self.samples[key] = self.samples.get(key, 0) + value
        return self

    def observe(self, labels: Sequence[object], counts: Sequence[int], total: float) -> Family:
        """Add a histogram given its per-bucket (non-cumulative) counts and its sum."""
        key = tuple(str(v) for v in labels)
        prev = self.samples.get(key)
        if prev is None:
            self.samples[key] = [list(counts), float(total)]
        else:
            prev[0] = [a + b for a, b in zip(prev[0], counts, strict=True)]
            prev[1] += total
        return self

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "help": self.help,
            "labels": list(self.labels),
            "merge": self.merge,
        }
        if self.type == "histogram":
            d["buckets"] = list(self.buckets or ())
            d["samples"] = [[list(k), v[0], v[1]] for k, v in self.samples.items()]
        else:
            d["samples"] = [[list(k), v] for k, v in self.samples.items()]
        return d


def counter(name: str, help_: str, labels: Sequence[str] = ()) -> Family:
    return Family(name, "counter", help_, labels)


def gauge(name: str, help_: str, labels: Sequence[str] = (), merge: str = "sum") -> Family:
    return Family(name, "gauge", help_, labels, merge)


def histogram(name: str, help_: str, labels: Sequence[str] = ()) -> Family:
    return Family(name, "histogram", help_, labels, buckets=stats.BUCKETS)


FamilyFn = Callable[["Runtime"], Iterable[Family]]
FAMILIES: list[FamilyFn] = []


def family(fn: FamilyFn) -> FamilyFn:
    """Register a function producing one or more families from the current runtime snapshot."""
    FAMILIES.append(fn)
    return fn


# ---- state helpers shared with the admin API ----------------------------------------------------


def code_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def weight_fraction(target: TargetState) -> float:
    """Slow-start fraction of full weight (1.0 without slow start)."""
    ss = target.slow_start
    return 1.0 if ss is None else ss.fraction()


def effective_weight(target: TargetState) -> float:
    """The weight the balancer gives the target now: 0 while unavailable (drained, unhealthy, ejected)."""
    if not target.available:
        return 0.0
    return float(target.weight) * weight_fraction(target)


def circuit_state(pool: Pool) -> str | None:
    """The circuit breaker's state (closed, open, half_open); None without a breaker."""
    circuit = pool.circuit
    return None if circuit is None else circuit.state


# ---- families --------------------------------------------------------------------------------------


@family
def _route_families(runtime: Runtime) -> Iterable[Family]:
    requests = counter(
        "gateway_requests_total", "Requests answered, by route and status class.", ("route", "code_class")
    )
    responses = counter("gateway_responses_total", "Responses by route and status code.", ("route", "code"))
    duration = histogram(
        "gateway_request_duration_seconds", "Time from request head to response completion.", ("route",)
    )
    in_flight = gauge("gateway_requests_in_flight", "Requests being handled, by route.", ("route",))
    shed = counter(
        "gateway_requests_shed_total", "Requests answered locally instead of proxied.", ("route", "reason")
    )
    for name, rs in list(stats.ROUTES.items()):
        for status, n in list(rs.responses.items()):
            requests.add((name, code_class(status)), n)
            responses.add((name, status), n)
        duration.observe((name,), rs.duration.counts, rs.duration.sum)
        in_flight.add((name,), rs.in_flight)
        for reason, n in list(rs.shed.items()):
            shed.add((name, reason), n)
    return requests, responses, duration, in_flight, shed


@family
def _target_counters(runtime: Runtime) -> Iterable[Family]:
    labels = ("upstream", "target")
    responses = counter(
        "gateway_upstream_responses_total",
        "Responses received from upstream targets, by status class.",
        (*labels, "code_class"),
    )
    connect_errors = counter(
        "gateway_upstream_connect_errors_total", "Failed or timed-out connection attempts.", labels
    )
    timeouts = counter("gateway_upstream_timeouts_total", "Upstream connect or response timeouts.", labels)
    opened = counter("gateway_upstream_connections_opened_total", "Upstream connections opened.", labels)
    duration = histogram(
        "gateway_upstream_duration_seconds", "Time spent waiting on upstream targets.", labels
    )
    for (upstream, address), ts in list(stats.TARGETS.items()):
        key = (upstream, address)
        for status, n in list(ts.responses.items()):
            responses.add((*key, code_class(status)), n)
        connect_errors.add(key, ts.connect_errors)
        timeouts.add(key, ts.timeouts)
        opened.add(key, ts.connections_opened)
        duration.observe(key, ts.duration.counts, ts.duration.sum)
    return responses, connect_errors, timeouts, opened, duration


@family
def _pool_families(runtime: Runtime) -> Iterable[Family]:
    labels = ("upstream", "target")
    in_flight = gauge("gateway_upstream_in_flight", "Requests in flight to each target.", labels)
    idle = gauge(
        "gateway_upstream_pool_idle_connections", "Idle keep-alive connections pooled per target.", labels
    )
    state = gauge(
        "gateway_target_state",
        "1 for the target's current state (healthy, unhealthy, drained, ejected), 0 otherwise.",
        (*labels, "state"),
        merge="per_worker",
    )
    weight = gauge(
        "gateway_target_weight_ratio",
        "Fraction of its configured weight a target currently gets (slow start); 1 when none.",
        labels,
        merge="per_worker",
    )
    null = gauge(
        "gateway_upstream_null",
        "1 when the operator switched the upstream to the null upstream (instant 503).",
        ("upstream",),
        merge="max",
    )
    circuit = gauge(
        "gateway_circuit_state",
        "1 for the upstream circuit breaker's current state (closed, open, half_open), 0 otherwise.",
        ("upstream", "state"),
        merge="per_worker",
    )
    for name, pool in list(runtime.pools.items()):
        null.add((name,), 1 if pool.forced_null else 0)
        current = circuit_state(pool)
        if current is not None:
            for s in CIRCUIT_STATES:
                circuit.add((name, s), 1 if s == current else 0)
        for t in pool.targets:
            key = (name, t.address)
            in_flight.add(key, t.in_flight)
            idle.add(key, len(t.idle))
            now = t.state
            for s in TARGET_STATES:
                state.add((*key, s), 1 if s == now else 0)
            weight.add(key, weight_fraction(t))
    return in_flight, idle, state, weight, null, circuit


@family
def _ratelimit_family(runtime: Runtime) -> Iterable[Family]:
    decisions = counter(
        "gateway_ratelimit_decisions_total",
        "Rate-limit decisions by route, limit and decision (admitted, limited).",
        ("route", "limit", "decision"),
    )
    for (route, limit), counts in list(stats.RATELIMIT.items()):
        decisions.add((route, limit, "admitted"), counts[0])
        decisions.add((route, limit, "limited"), counts[1])
    return (decisions,)


@family
def _cache_families(runtime: Runtime) -> Iterable[Family]:
    lookups = counter(
        "gateway_cache_requests_total",
        "Micro-cache outcomes by route (hit, miss, bypass, coalesced waiter).",
        ("route", "result"),
    )
    stale = counter("gateway_cache_stale_total", "Stale answers by route and reason.", ("route", "reason"))
    stores = counter("gateway_cache_stores_total", "Responses stored.", ("route",))
    evictions = counter("gateway_cache_evictions_total", "Entries evicted by the byte bound.", ("route",))
    revalidations = counter(
        "gateway_cache_revalidations_total", "Background stale-while-revalidate refreshes stored.", ("route",)
    )
    size = gauge("gateway_cache_bytes", "Bytes held by the cache.", ("route",))
    entries = gauge("gateway_cache_entries", "Keys held by the cache.", ("route",))
    for name, s in stats.CACHES.items():
        for result, value in (
            ("hit", s.hits),
            ("miss", s.misses),
            ("bypass", s.bypass),
            ("coalesced", s.coalesced),
        ):
            lookups.add((name, result), value)
        for reason, value in s.stale.items():
            stale.add((name, reason), value)
        stores.add((name,), s.stores)
        evictions.add((name,), s.evictions)
        revalidations.add((name,), s.revalidations)
    for route in runtime.routes:
        cache = route.cache
        if cache is not None:
            size.add((route.name,), cache.bytes)
            entries.add((route.name,), len(cache.entries))
    return (lookups, stale, stores, evictions, revalidations, size, entries)


@family
def _global_families(runtime: Runtime) -> Iterable[Family]:
    g = stats.GLOBAL
    reloads = counter("gateway_config_reloads_total", "Configuration reloads by result.", ("result",))
    reloads.add(("success",), g.reloads)
    reloads.add(("failure",), g.reload_failures)
    return (
        reloads,
        gauge("gateway_client_connections_open", "Client connections currently open.").add(
            (), g.connections_open
        ),
        counter("gateway_client_connections_total", "Client connections accepted.").add(
            (), g.connections_accepted
        ),
        counter("gateway_bad_requests_total", "Malformed requests answered with an error.").add(
            (), g.bad_requests
        ),
        counter("gateway_no_route_total", "Requests that matched no route (404).").add((), g.no_route),
        gauge(
            "gateway_build_info",
            "Build information; the value is always 1. compiled: the data plane is mypyc-compiled C.",
            ("version", "python", "compiled"),
            "max",
        ).add((gateway.__version__, platform.python_version(), str(gateway.compiled()).lower()), 1),
    )


# ---- step 1: snapshot --------------------------------------------------------------------------------


def snapshot(runtime: Runtime, worker: str | None = None) -> dict[str, Any]:
    """This process's metrics as plain JSON-serialisable data (see the module docstring);
    `worker` labels it among `workers: N` (default: the pid)."""
    families: list[dict[str, Any]] = []
    for fn in FAMILIES:
        families.extend(f.to_dict() for f in fn(runtime))
    return {
        "version": SNAPSHOT_VERSION,
        "worker": worker if worker is not None else str(os.getpid()),
        "families": families,
    }


# ---- step 2: merge and render ---------------------------------------------------------------------


class _Merged:
    """Accumulates one family across snapshots."""

    __slots__ = ("buckets", "help", "labels", "merge", "name", "samples", "type")

    def __init__(self, spec: dict[str, Any], per_worker: bool) -> None:
        self.name: str = spec["name"]
        self.type: str = spec["type"]
        self.help: str = spec.get("help", "")
        self.merge: str = spec.get("merge", "sum")
        labels = tuple(spec.get("labels", ()))
        if per_worker and self.type == "gauge" and self.merge == "per_worker":
            labels = (*labels, "worker")
        self.labels = labels
        self.buckets: tuple[float, ...] = tuple(spec.get("buckets") or ())
        self.samples: dict[Labels, Any] = {}

    def add(self, spec: dict[str, Any], worker: str) -> None:
        samples = self.samples
        suffix = (worker,) if len(self.labels) > len(spec.get("labels", ())) else ()
        if self.type == "histogram":
            if tuple(spec.get("buckets") or ()) != self.buckets:
                raise ValueError(f"{self.name}: snapshots disagree on histogram buckets")
            for labels, counts, total in spec["samples"]:
                key = tuple(labels)
                prev = samples.get(key)
                if prev is None:
                    samples[key] = [list(counts), float(total)]
                else:
                    prev[0] = [a + b for a, b in zip(prev[0], counts, strict=True)]
                    prev[1] += total
            return
        for labels, value in spec["samples"]:
            key = (*labels, *suffix)
            prev = samples.get(key)
            if prev is None or self.merge == "per_worker":
                samples[key] = value if prev is None else prev + value
            elif self.merge == "max":
                samples[key] = max(prev, value)
            elif self.merge == "min":
                samples[key] = min(prev, value)
            else:
                samples[key] = prev + value

    def metric(self) -> Metric:
        labels = list(self.labels)
        if self.type == "counter":
            c = CounterMetricFamily(self.name, self.help, labels=labels)
            for key, value in self.samples.items():
                c.add_metric(list(key), value)
            return c
        if self.type == "histogram":
            h = HistogramMetricFamily(self.name, self.help, labels=labels)
            bounds = [_go_float(b) for b in self.buckets] + ["+Inf"]
            for key, (counts, total) in self.samples.items():
                cumulative: list[tuple[str, float]] = []
                running = 0
                for le, n in zip(bounds, counts, strict=True):
                    running += n
                    cumulative.append((le, running))
                h.add_metric(list(key), cumulative, total)
            return h
        g = GaugeMetricFamily(self.name, self.help, labels=labels)
        for key, value in self.samples.items():
            g.add_metric(list(key), value)
        return g


class SnapshotCollector(Collector):
    """A prometheus-client Collector over merged snapshots."""

    def __init__(self, snapshots: Sequence[dict[str, Any]]) -> None:
        self.families = merge(snapshots)

    def collect(self) -> Iterator[Metric]:
        for f in self.families:
            yield f.metric()


def merge(snapshots: Sequence[dict[str, Any]]) -> list[_Merged]:
    """Fold snapshots into one set of families (first-seen order)."""
    per_worker = len(snapshots) > 1
    merged: dict[str, _Merged] = {}
    for i, snap in enumerate(snapshots):
        if snap.get("version", SNAPSHOT_VERSION) != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported metrics snapshot version {snap.get('version')!r}")
        worker = str(snap.get("worker", i))
        for spec in snap["families"]:
            m = merged.get(spec["name"])
            if m is None:
                m = merged[spec["name"]] = _Merged(spec, per_worker)
            m.add(spec, worker)
    return list(merged.values())


def render(snapshots: Sequence[dict[str, Any]], accept: str | None = None) -> tuple[bytes, str]:
    """Merge snapshots and encode them for the scraper's Accept header → (body, content type)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
