"""The validated configuration model: frozen dataclasses built from YAML by `schema.build`.

Every field carries its default and a line of documentation; README's reference table is
generated from these classes (see `gateway.config.reference`), so the two cannot drift.
Data only: `validate` checks values, never the disk; the files a configuration names
(certificates, keys, CAs) are checked at load by `gateway.config.checks`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from gateway.config.schema import Duration, Issue, Percent, Ratio, Size, doc, required


def parse_address(value: str, path: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise Issue(path, f"expected host:port, got {value!r}")
    if not 0 <= int(port) <= 65535:
        raise Issue(path, f"port out of range in {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: Duration = doc(1.0, "time to open a TCP (and TLS) connection to a target → 502/504 on expiry")
    response: Duration = doc(30.0, "time from the request sent to the upstream's response headers → 504")
    idle: Duration = doc(60.0, "longest pause between body chunks in either direction → connection cut")


@dataclass(frozen=True, slots=True)
class ClientLimits:
    header_read_timeout: Duration = doc(
        10.0, "time a client has to send a complete header block (slowloris) → 408"
    )
    keepalive_timeout: Duration = doc(60.0, "idle time before a client keep-alive connection is closed")
    max_header_bytes: Size = doc(16384, "request line plus header block size limit → 431")
    max_headers: int = doc(100, "number of request header fields → 431")
    max_url_bytes: Size = doc(8192, "request-target length → 414")
    max_requests_per_connection: int = doc(10000, "requests served on one keep-alive connection before close")
    max_connections: int = doc(10000, "concurrent client connections accepted by one worker")
    max_connections_per_ip: int = doc(
        4096,
        "concurrent connections from one client address per worker, over that: closed at accept (0: no limit; behind a load balancer, its addresses count)",
    )
    max_pipelined: int = doc(32, "parsed requests queued behind the active one before reading pauses")
    min_body_rate: Size = doc(
        1024,
        "slow POST floor: a request body slower than this many bytes/s over a body_rate_window → 408 (0: off)",
    )
    body_rate_window: Duration = doc(
        5.0, "window min_body_rate is measured over; the first window after the headers is a grace period"
    )


@dataclass(frozen=True, slots=True)
class Target:
    address: str = required("host:port of the backend instance")
    weight: int = doc(1, "relative share of traffic (smooth weighted round robin / weighted least request)")
    max_in_flight: int | None = doc(
        None,
        "concurrency cap of this target (HAProxy maxconn); default: the upstream's max_in_flight split by weight",
    )

    def validate(self, path: str) -> None:
        parse_address(self.address, f"{path}.address")
        if self.weight < 1:
            raise Issue(f"{path}.weight", "must be at least 1")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = doc("/", "path probed with GET on every target")
    interval: Duration = doc(5.0, "time between probes of one target")
    timeout: Duration = doc(1.0, "a probe slower than this is a failure")
    healthy_threshold: int = doc(2, "consecutive successes that make an unhealthy target healthy")
    unhealthy_threshold: int = doc(3, "consecutive failures that make a healthy target unhealthy")
    expected_status: tuple[int, ...] = doc((), "statuses counted as success (empty: any 2xx or 3xx)")
    jitter: Duration | None = doc(
        None, "random extra delay per probe (default 10% of interval), so checks never stampede"
    )
    host: str | None = doc(None, "Host header of probes (default: the target address)")

    def validate(self, path: str) -> None:
        if self.interval <= 0:
            raise Issue(f"{path}.interval", "must be > 0")
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise Issue(path, "thresholds must be >= 1")
        if not self.path.startswith("/"):
            raise Issue(f"{path}.path", "must start with /")


@dataclass(frozen=True, slots=True)
class Passive:
    consecutive_failures: int = doc(
        5, "consecutive failed exchanges (connect error, timeout, 5xx) that eject a target"
    )
    ejection_time: Duration = doc(10.0, "first ejection length; doubles on each repeat ejection")
    max_ejection_time: Duration = doc(300.0, "cap of the doubling ejection time")
    max_ejection_percent: Percent = doc(50.0, "never eject more than this share of the pool at once")
    on_5xx: bool = doc(True, "count 5xx responses as failures (connect errors and timeouts always count)")

    def validate(self, path: str) -> None:
        if self.consecutive_failures < 1:
            raise Issue(f"{path}.consecutive_failures", "must be >= 1")
        if not 0 < self.ejection_time <= self.max_ejection_time:
            raise Issue(f"{path}.ejection_time", "must be > 0 and <= max_ejection_time")
        if not 0 <= self.max_ejection_percent <= 100:
            raise Issue(f"{path}.max_ejection_percent", "must be within 0..100")


# What an upstream without a `passive` key gets (nginx keeps a server out for 10 s after one failed
# connection, `max_fails=1 fail_timeout=10s`): a dead target stops costing a connection attempt per
# request, while a backend's own 5xx answers never eject anything unless asked for.
DEFAULT_PASSIVE = Passive(consecutive_failures=3, on_5xx=False)


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failure_ratio: Ratio = doc(0.5, "open when failures/requests over the window reach this")
    min_requests: int = doc(20, "requests needed in the window before the ratio counts")
    window: Duration = doc(10.0, "sliding window of outcomes")
    open_for: Duration = doc(5.0, "time open before half-open probes; doubles on each failed probe round")
    max_open_for: Duration | None = doc(None, "cap of the doubling open time (default 8 × open_for)")
    half_open_requests: int = doc(3, "probe requests let through while half-open; all must succeed to close")
    latency_threshold: Duration | None = doc(
        None, "a success slower than this counts as a failure (latency trigger)"
    )
    on_5xx: bool = doc(True, "count 5xx responses as failures (connect errors and timeouts always count)")

    def validate(self, path: str) -> None:
        if not 0 < self.failure_ratio <= 1:
            raise Issue(f"{path}.failure_ratio", "must be within (0, 1], e.g. 0.5 or 50%")
        if self.min_requests < 1 or self.half_open_requests < 1:
            raise Issue(path, "min_requests and half_open_requests must be >= 1")
        if self.window <= 0 or self.open_for <= 0:
            raise Issue(path, "window and open_for must be > 0")


@dataclass(frozen=True, slots=True)
class NullResponse:
    status: int = doc(503, "status the null upstream answers with")
    body: str = doc(
        "503 Service Unavailable: upstream unavailable\n", "body of the answer (a degraded page, JSON)"
    )
    content_type: str = doc("text/plain; charset=utf-8", "Content-Type of the body")
    retry_after: int = doc(5, "Retry-After seconds (when the circuit is open: the time left open)")


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int = doc(2, "total tries including the first (2 = one retry)")
    on: tuple[Literal["connect_failure", "timeout", "reset", "502", "503", "504"], ...] = doc(
        ("connect_failure",),
        "conditions that retry; status codes and timeout/reset only for idempotent methods",
    )
    budget: Percent = doc(20.0, "retries may be at most this percent of requests over the last 10 s")
    min_retries: int = doc(3, "retries always allowed per 10 s regardless of the budget")

    def validate(self, path: str) -> None:
        if self.attempts < 1:
            raise Issue(f"{path}.attempts", "must be >= 1")
        if not 0 <= self.budget <= 100:
            raise Issue(f"{path}.budget", "must be a percentage within 0..100")


@dataclass(frozen=True, slots=True)
class SlowStart:
    window: Duration = doc(
        30.0,
        "ramp length of a fresh target (added, healthy again, returned from ejection, undrained, gateway start)",
    )
    aggression: float = doc(1.0, "curve (t/window)^(1/aggression): 1 linear, >1 faster early (Envoy)")
    min_weight_percent: Percent = doc(
        10.0, "weight and concurrency cap at the start of the ramp, in percent of the full ones"
    )
    on_start: bool = doc(True, "targets are fresh when the gateway itself starts")

    def validate(self, path: str) -> None:
        if self.aggression <= 0:
            raise Issue(f"{path}.aggression", "must be > 0")
        if not 0 < self.min_weight_percent <= 100:
            raise Issue(f"{path}.min_weight_percent", "must be within (0, 100]")


@dataclass(frozen=True, slots=True)
class Queue:
    size: int = doc(100, "requests waiting for admission at most; beyond, the lowest priority is shed")
    timeout: Duration = doc(1.0, "a request not admitted within this is shed with 503 (reason overloaded)")
    mode: Literal["fifo", "adaptive_lifo"] = doc(
        "fifo", "adaptive_lifo: LIFO with CoDel once the queue stands (Facebook)"
    )
    codel_target: Duration = doc(0.005, "adaptive_lifo: queue timeout while the queue stands")
    codel_interval: Duration = doc(0.1, "adaptive_lifo: a queue non-empty this long is standing")


@dataclass(frozen=True, slots=True)
class Adaptive:
    initial: int = doc(20, "starting concurrency limit")
    min: int = doc(1, "lowest limit")
    max: int = doc(1000, "highest limit")
    smoothing: float = doc(0.2, "weight of each new estimate")
    rtt_tolerance: float = doc(
        1.1,
        "latency growth tolerated before the limit shrinks (Gradient2; Netflix uses 1.5, which let "
        "admitted p99 reach 2.7x the unloaded p99 in loadtest/scenario_overload; 1.1 keeps it under 2x)",
    )
    window: Duration = doc(0.1, "the limit is updated once per window (≥ 10 samples) from its mean latency")


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    enabled: bool = doc(True, "speak TLS to the targets of this upstream")
    verify: bool = doc(True, "verify the target's certificate chain and name (off: encryption only)")
    ca: str | None = doc(None, "PEM file of the CA(s) to trust instead of the system store")
    server_name: str | None = doc(None, "SNI and certificate name to expect (default: the target's host)")


@dataclass(frozen=True, slots=True)
class Upstream:
    targets: tuple[Target, ...] = required("backend instances of this pool")
    balance: Literal["round_robin", "least_request"] = doc("round_robin", "load-balancing algorithm")
    keepalive: int = doc(64, "idle keep-alive connections kept per target (nginx `keepalive`)")
    keepalive_timeout: Duration = doc(60.0, "idle pooled connections older than this are closed")
    health_check: HealthCheck | None = doc(None, "active health checks (off when absent)")
    passive: Passive | None = doc(
        None,
        "passive outlier ejection from real traffic; absent: 3 consecutive connection failures or "
        "timeouts eject a target for 10 s (doubling on repeats, 5xx not counted); false: off",
        factory=lambda: DEFAULT_PASSIVE,
    )
    circuit_breaker: CircuitBreakerConfig | None = doc(
        None, "circuit breaker to the null upstream (off when absent)"
    )
    backup: str | None = doc(None, "upstream used when no target here can take traffic (nginx `backup`)")
    null_response: NullResponse = doc(
        None, "what the null upstream answers for this upstream", factory=NullResponse
    )
    retry: Retry = doc(None, "retries to another target, bounded by a retry budget", factory=Retry)
    tls: UpstreamTls | None = doc(None, "TLS to the targets (plain TCP when absent)")
    slow_start: SlowStart | None = doc(
        None, "ramp weight and concurrency cap of fresh targets (off when absent)"
    )
    max_in_flight: int | None = doc(None, "admission control: requests outstanding to this upstream at most")
    queue: Queue | None = doc(None, "bounded wait for admission (absent: shed at once when at the limit)")
    adaptive: Adaptive | None = doc(
        None, "find the concurrency limit from latency (Gradient2) instead of a hand-set number"
    )

    def validate(self, path: str) -> None:
        if not self.targets:
            raise Issue(f"{path}.targets", "an upstream needs at least one target")
        seen: set[str] = set()
        for i, t in enumerate(self.targets):
            if t.address in seen:
                raise Issue(f"{path}.targets[{i}].address", f"duplicate target {t.address!r}")
            seen.add(t.address)
        if self.keepalive < 0:
            raise Issue(f"{path}.keepalive", "must be >= 0")


@dataclass(frozen=True, slots=True)
class Match:
    host: str | None = doc(None, "exact host or `*.example.com` wildcard (port ignored)")
    path_prefix: str | None = doc(None, "request path starts with this")
    path: str | None = doc(None, "request path equals this exactly")
    path_regex: str | None = doc(None, "request path matches this regular expression (re.match)")
    methods: tuple[str, ...] | None = doc(None, "allowed methods, e.g. [GET, HEAD]")
    headers: dict[str, str] | None = doc(None, "header name → exact value; all must match")

    def validate(self, path: str) -> None:
        if sum(x is not None for x in (self.path_prefix, self.path, self.path_regex)) > 1:
            raise Issue(path, "use only one of path_prefix, path, path_regex")
        if self.path_regex is not None:
            try:
                re.compile(self.path_regex)
            except re.error as e:
                raise Issue(f"{path}.path_regex", f"invalid regular expression: {e}") from None
        for key, v in (("path_prefix", self.path_prefix), ("path", self.path)):
            if v is not None and not v.startswith("/"):
                raise Issue(f"{path}.{key}", "must start with /")


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float = required("tokens added per `per` (sustained rate)")
    per: Duration = doc(1.0, "the period `rate` refers to")
    burst: int | None = doc(None, "bucket size; a fresh bucket starts full (default: rate, at least 1)")
    key: str = doc("client_ip", "client_ip | header:<Name> | route (one bucket for the whole route)")
    name: str | None = doc(None, "label in metrics and RateLimit headers (default: the key)")
    max_keys: int = doc(100000, "most buckets kept; least recently used (full ones first) are dropped")
    status: int = doc(429, "status of a rejected request (nginx limit_req_status)")
    headers: bool = doc(False, "also send RateLimit-Policy/RateLimit on admitted responses")

    def validate(self, path: str) -> None:
        if self.rate <= 0:
            raise Issue(f"{path}.rate", "must be > 0")
        if self.per <= 0:
            raise Issue(f"{path}.per", "must be > 0")
        if self.burst is not None and self.burst < 1:
            raise Issue(f"{path}.burst", "must be >= 1")
        if not (self.key in ("client_ip", "route") or (self.key.startswith("header:") and len(self.key) > 7)):
            raise Issue(f"{path}.key", f"expected client_ip, route or header:<Name>, got {self.key!r}")
        if self.max_keys < 1:
            raise Issue(f"{path}.max_keys", "must be >= 1")
        if not 400 <= self.status <= 599:
            raise Issue(f"{path}.status", "must be a 4xx or 5xx status")

    @property
    def bucket(self) -> int:
        return self.burst if self.burst is not None else max(1, int(self.rate))

    @property
    def label(self) -> str:
        return self.name or self.key


@dataclass(frozen=True, slots=True)
class RateLimitStore:
    redis: str = required("redis://host:port/db shared by every gateway instance (and worker)")
    on_error: Literal["allow", "deny"] = doc(
        "allow", "Redis down or slow: allow = a local bucket decides (fail open); deny = reject"
    )
    timeout: Duration = doc(0.05, "longest wait for Redis per decision; past it, `on_error` applies")
    prefix: str = doc("gw:rl:", "key prefix in Redis")


@dataclass(frozen=True, slots=True)
class Cache:
    ttl: Duration = doc(1.0, "freshness when the response has no Cache-Control max-age/s-maxage")
    stale_while_revalidate: Duration = doc(
        0.0, "after ttl, answer stale at once and refresh once in the background"
    )
    stale_if_error: Duration = doc(
        0.0, "after ttl, answer stale (X-Cache: STALE) when the upstream fails or is switched to null"
    )
    max_bytes: Size = doc(64 * 1024**2, "memory bound of this route's cache (LRU by bytes)")
    max_object_bytes: Size = doc(1024**2, "larger responses stream through uncached")
    key: tuple[Literal["method", "host", "path", "query"], ...] = doc(
        ("method", "host", "path", "query"), "request parts forming the cache key (HEAD shares GET's entry)"
    )
    vary: tuple[str, ...] = doc(
        (), "request headers always added to the key (the response's Vary is honoured too)"
    )
    header: str | None = doc("X-Cache", "response header carrying HIT/MISS/STALE/BYPASS (null: off)")
    cache_set_cookie: bool = doc(False, "store responses carrying Set-Cookie")
    cache_authorized: bool = doc(False, "store answers to requests with Authorization")
    lock_timeout: Duration | None = doc(
        None, "longest wait of a coalesced miss (default: the route's response timeout)"
    )


@dataclass(frozen=True, slots=True)
class Route:
    name: str = required("route name, used in metrics and logs")
    upstream: str | None = required("upstream name, or null for the null upstream (instant 503)")
    match: Match = doc(None, "conditions, all of which must hold (empty matches everything)", factory=Match)
    timeouts: Timeouts | None = doc(None, "per-route upstream timeouts (defaults from top-level `timeouts`)")
    max_body_size: Size = doc(1024**3, "request body size limit → 413 (nginx client_max_body_size)")
    retry_after: int = doc(5, "Retry-After seconds sent by the null upstream on this route")
    priority: Literal["critical", "default", "sheddable"] = doc(
        "default", "under overload sheddable is shed first, critical last"
    )
    priority_header: str | None = doc(
        None, "request header that may set the priority (critical/default/sheddable)"
    )
    rate_limit: tuple[RateLimit, ...] | RateLimit | None = doc(
        None, "one token-bucket limit or a list of them; a request must pass all"
    )
    cache: Cache | None = doc(
        None, "micro-cache for GET/HEAD with request coalescing and stale answers (off when absent)"
    )

    @property
    def limits(self) -> tuple[RateLimit, ...]:
        rl = self.rate_limit
        if rl is None:
            return ()
        return rl if isinstance(rl, tuple) else (rl,)


@dataclass(frozen=True, slots=True)
class Health:
    stall_threshold: Duration = doc(
        10.0, "/healthz turns 503 only if the proxy loop made no progress this long"
    )
    isolation: Literal["process", "thread"] = doc(
        "process",
        "where the health port is answered: its own process (no GIL shared with the proxy) or a thread",
    )


@dataclass(frozen=True, slots=True)
class ListenerTls:
    cert: str = required("PEM certificate chain of the proxy listener (leaf first)")
    key: str = required("PEM private key of `cert`")


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    enabled: bool = doc(False, "write one JSON line per request (off: no cost at all)")
    path: str = doc("stdout", "`stdout` or a file path (appended; SIGUSR1 reopens it after rotation)")
    sample: Ratio = doc(1.0, "share of requests logged, 0..1 or 0%..100% (1.0 logs all)")
    buffer: int = doc(1000, "records buffered before a write (else written every 0.5 s)")

    def validate(self, path: str) -> None:
        if not 0.0 <= self.sample <= 1.0:
            raise Issue(f"{path}.sample", "must be within 0..1, e.g. 0.1 or 10%")
        if self.buffer < 1:
            raise Issue(f"{path}.buffer", "must be >= 1")
        if not self.path:
            raise Issue(f"{path}.path", "must be stdout or a file path")


@dataclass(frozen=True, slots=True)
class Config:
    upstreams: dict[str, Upstream] = doc(None, "named backend pools", factory=dict)
    routes: tuple[Route, ...] = doc((), "ordered route table, first match wins")
    listen: str = doc("127.0.0.1:8080", "proxy listener host:port")
    health_listen: str | None = doc("127.0.0.1:8081", "shallow health listener (null disables)")
    admin_listen: str | None = doc("127.0.0.1:9901", "metrics and admin API listener (null disables)")
    admin_token: str | None = doc(
        None, "bearer token required by admin POST/DELETE (else env GATEWAY_ADMIN_TOKEN; unset: open)"
    )
    timeouts: Timeouts = doc(None, "default upstream timeouts for every route", factory=Timeouts)
    client: ClientLimits = doc(None, "client-side limits and timeouts", factory=ClientLimits)
    health: Health = doc(None, "shallow health endpoint settings", factory=Health)
    rate_limit_store: RateLimitStore | None = doc(None, "share rate limits across instances through Redis")
    trusted_proxies: tuple[str, ...] = doc(
        (), "CIDRs whose X-Forwarded-For is believed when finding client_ip"
    )
    workers: int | Literal["auto"] = doc(
        1, "processes serving the port (SO_REUSEPORT) under one master; auto = CPU count"
    )
    pid_file: str | None = doc(None, "file the running gateway writes its pid to (used by `gateway reload`)")
    drain_delay: Duration = doc(0.0, "on SIGTERM: time readiness reports 503 before listeners stop accepting")
    drain_timeout: Duration = doc(30.0, "on SIGTERM: longest wait for in-flight exchanges to finish")
    tls: ListenerTls | None = doc(None, "serve the proxy listener over TLS (plain HTTP when absent)")
    access_log: AccessLogConfig = doc(None, "per-request JSON access log", factory=AccessLogConfig)

    def validate(self, path: str) -> None:
        for key, value in (
            ("listen", self.listen),
            ("health_listen", self.health_listen),
            ("admin_listen", self.admin_listen),
        ):
            if value is not None:
                parse_address(value, key)
        for i, cidr in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise Issue(f"trusted_proxies[{i}]", f"not a CIDR: {cidr!r}") from None
        names: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.name in names:
                raise Issue(f"routes[{i}].name", f"duplicate route name {route.name!r}")
            names.add(route.name)
            if route.upstream is not None and route.upstream not in self.upstreams:
                raise Issue(f"routes[{i}].upstream", f"unknown upstream {route.upstream!r}")
        for name, up in self.upstreams.items():
            if up.backup is not None:
                if up.backup not in self.upstreams:
                    raise Issue(f"upstreams.{name}.backup", f"unknown upstream {up.backup!r}")
                if up.backup == name:
                    raise Issue(f"upstreams.{name}.backup", "an upstream cannot be its own backup")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
