"""Open-loop HTTP/1.1 load generator (asyncio + uvloop + httptools).

Requests are *scheduled* at a fixed rate (constant inter-arrival, or Poisson arrivals) whatever
the server's latency, and each request's latency is measured from its scheduled send time, so a
stalled server shows up as latency instead of silently lowering the offered load (no coordinated
omission). A request that cannot be sent at once because every connection is busy waits for a
connection and its clock is already running.

Connections: a pool of keep-alive connections; when none is idle a new one is opened, up to
`max_connections` (default 2000); beyond that requests queue inside the generator (FIFO).
Requests are not pipelined. A GET that fails on a *reused* connection before any response byte
arrived (the server closed an idle keep-alive connection under our feet) is retried once on
another connection, like browsers do.

Timeout: a request still unanswered `timeout` seconds (default 5) after its scheduled time is
counted as `timeout` and its connection is closed (checked every 20 ms).

Outcome classes, per request:
  ok       2xx with latency <= SLO          late     2xx with latency > SLO
  429      status 429                       503      status 503
  other    any other status                 error    connect/reset/parse error
  timeout  no answer within `timeout`
`goodput` = ok per second of schedule. Per-second buckets are keyed by the *scheduled* second,
so the outcomes of bucket t add up to the requests offered during second t.

Timing granularity: the scheduler sleeps at least 1 ms between wake-ups (no busy wait, so the
generator does not steal a core from the server under test) and sends every request that has
become due; the lateness of each send relative to its schedule ("dispatch lag") is reported,
and a large dispatch lag means the generator, not the server, was the bottleneck.

Paths: by default every request asks for the URL's path; with `paths` (and optional
`path_weights`, e.g. `zipf_weights(100, 1.0)`) each request picks one at random (seeded), and
`on_finish(path_index, outcome, scheduled, now)` is called for every finished request.

Library use:
    from loadtest.openloop import run_open_loop_sync
    res = run_open_loop_sync("http://127.0.0.1:8080/", rate=800, duration=8, slo=0.5)
    print(res.goodput, res.p99_2xx_ms, res.counts)

CLI:
    python -m loadtest.openloop --url http://127.0.0.1:8080/ --rate 800 --duration 8 --slo 0.5
    python -m loadtest.openloop --url ... --phases 3:200,5:1600,3:200 --poisson --json out.json
    python -m loadtest.openloop --url http://127.0.0.1:8080/k/ --rate 4000 --zipf-keys 100  # /k/0../k/99
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import itertools
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools

OUTCOMES = ("ok", "late", "429", "503", "other", "error", "timeout")
_IDX = {name: i for i, name in enumerate(OUTCOMES)}
_OK, _LATE, _429, _503, _OTHER, _ERROR, _TIMEOUT = range(7)

monotonic = time.monotonic


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted `values`; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 3)


class _Req:
    __slots__ = ("done", "key", "retried", "sched")

    def __init__(self, sched: float, key: int = -1) -> None:
        self.sched = sched
        self.key = key  # index into OpenLoop.paths, or -1: the URL's path
        self.done = False
        self.retried = False


class _Conn(asyncio.Protocol):
    __slots__ = ("closed", "framed", "gen", "got_bytes", "parser", "req", "served", "status", "transport")

    def __init__(self, gen: OpenLoop) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.req: _Req | None = None
        self.status = 0
        self.framed = False
        self.got_bytes = False
        self.served = 0
        self.closed = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.parse_errors += 1
            self.abort()

    def eof_received(self) -> bool | None:
        return None  # close our side too → connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gen.conn_lost(self)

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        req, status = self.req, self.status
        self.req = None
        self.status = 0
        self.got_bytes = False
        self.served += 1
        keep = self.parser.should_keep_alive()
        if req is not None:
            self.gen.complete(req, status)
        if not keep:
            self.abort()
        else:
            self.gen.release(self)

    # -- ours
    def send(self, req: _Req) -> None:
        self.req = req
        self.status = 0
        self.framed = False
        self.got_bytes = False
        gen = self.gen
        self.transport.write(gen.request_bytes if req.key < 0 else gen.path_requests[req.key])  # type: ignore[union-attr]

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()


@dataclass
class OpenLoopResult:
    url: str
    arrival: str
    phases: list[tuple[float, float]]
    rate: float  # mean offered rate over the schedule
    duration: float  # scheduled seconds
    slo_s: float
    timeout_s: float
    offered: int
    counts: dict[str, int]
    goodput: float  # ok per scheduled second
    ok_fraction: float
    p50_2xx_ms: float | None
    p99_2xx_ms: float | None
    max_2xx_ms: float | None
    p50_shed_ms: float | None
    p99_shed_ms: float | None
    p99_ok_ms: float | None
    dispatch_lag_p99_ms: float | None
    dispatch_lag_max_ms: float | None
    max_connections_used: int
    connections_opened: int
    connect_errors: int
    retries: int
    wall_s: float
    per_second: list[dict[str, Any]] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict, repr=False)  # seconds

    def to_dict(self, latencies: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not latencies:
            d.pop("latencies")
        return d

    def summary(self) -> str:
        c = self.counts
        return (
            f"offered {self.offered} ({self.rate:.0f}/s for {self.duration:g}s, {self.arrival}) | "
            f"goodput {self.goodput:.1f}/s "
            f"({100 * self.ok_fraction:.1f}% ok within {self.slo_s * 1000:g} ms) | "
            f"2xx p50 {_fmt(self.p50_2xx_ms)} p99 {_fmt(self.p99_2xx_ms)} | "
            f"shed p99 {_fmt(self.p99_shed_ms)} | "
            + " ".join(f"{k}={c[k]}" for k in OUTCOMES)
            + f" | conns {self.max_connections_used} | lag p99 {_fmt(self.dispatch_lag_p99_ms)}"
        )

    def per_second_table(self) -> str:
        head = "| t | offered | " + " | ".join(OUTCOMES) + " | 2xx p50 | 2xx p99 |"
        sep = "|" + "---|" * (len(OUTCOMES) + 4)
        rows = [head, sep]
        for b in self.per_second:
            rows.append(
                f"| {b['t']} | {b['offered']} | "
                + " | ".join(str(b[k]) for k in OUTCOMES)
                + f" | {_fmt(b['p50_2xx_ms'])} | {_fmt(b['p99_2xx_ms'])} |"
            )
        return "\n".join(rows)


def _fmt(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.2f}s" if ms >= 1000 else f"{ms:.1f}ms"


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    """Zipf popularity of `n` keys: weight of rank k (1-based) is 1/k**s."""
    return [1.0 / (k**s) for k in range(1, n + 1)]


def parse_phases(text: str) -> list[tuple[float, float]]:
    """`"3:200,5:1600"` → [(3.0, 200.0), (5.0, 1600.0)] (seconds:rate pairs)."""
    out = []
    for part in text.split(","):
        dur, _, rate = part.strip().partition(":")
        out.append((float(dur), float(rate)))
    if not out or any(d <= 0 or r < 0 for d, r in out):
        raise ValueError(f"bad phases {text!r}")
    return out


def arrivals(phases: Sequence[tuple[float, float]], poisson: bool, seed: int | None) -> Iterator[float]:
    """Offsets (seconds from start) of scheduled requests, in increasing order."""
    rng = random.Random(seed)
    start = 0.0
    for dur, rate in phases:
        if rate > 0:
            if poisson:
                t = start + rng.expovariate(rate)
                while t < start + dur:
                    yield t
                    t += rng.expovariate(rate)
            else:
                n = round(dur * rate)
                for i in range(n):
                    yield start + i / rate
        start += dur


class OpenLoop:
    def __init__(
        self,
        url: str,
        phases: Sequence[tuple[float, float]],
        slo: float = 0.5,
        timeout: float = 5.0,
        poisson: bool = False,
        max_connections: int = 2000,
        headers: dict[str, str] | None = None,
        seed: int | None = None,
        paths: Sequence[str] | None = None,
        path_weights: Sequence[float] | None = None,
        on_finish: Callable[[int, str, float, float], None] | None = None,
    ) -> None:
        u = urlsplit(url)
        if u.scheme != "http":
            raise ValueError("only http:// URLs are supported")
        self.url = url
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        hdrs = {"Host": u.netloc, "User-Agent": "loadtest-openloop"}
        hdrs.update(headers or {})
        self.request_bytes = (
            f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        ).encode("latin-1")
        self.paths = list(paths or ())
        self.path_requests = [
            (f"GET {p} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n").encode(
                "latin-1"
            )
            for p in self.paths
        ]
        if path_weights is not None and len(path_weights) != len(self.paths):
            raise ValueError("path_weights needs one weight per path")
        self._cum_weights = list(itertools.accumulate(path_weights or [1.0] * len(self.paths)))
        self._path_rng = random.Random(seed)
        self.on_finish = on_finish
        self.phases = list(phases)
        self.duration = sum(d for d, _ in self.phases)
        self.slo = slo
        self.timeout = timeout
        self.poisson = poisson
        self.max_connections = max_connections
        self.seed = seed

        self.idle: list[_Conn] = []
        self.conns: set[_Conn] = set()
        self.pending: deque[_Req] = deque()
        self.connecting = 0
        self.max_used = 0
        self.opened = 0
        self.connect_errors = 0
        self.parse_errors = 0
        self.retries = 0
        self.issued = 0
        self.finished = 0
        self.t0 = 0.0
        nb = max(1, math.ceil(self.duration))
        self.buckets = [[0] * len(OUTCOMES) for _ in range(nb)]
        self.bucket_2xx: list[list[float]] = [[] for _ in range(nb)]
        self.offered_per_bucket = [0] * nb
        self.lat: list[list[float]] = [[] for _ in OUTCOMES]
        self.lag: list[float] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- bookkeeping
    def _bucket(self, req: _Req) -> int:
        return min(len(self.buckets) - 1, max(0, int(req.sched - self.t0)))

    def finish(self, req: _Req, outcome: int, now: float) -> None:
        if req.done:
            return
        req.done = True
        self.finished += 1
        latency = now - req.sched
        b = self._bucket(req)
        self.buckets[b][outcome] += 1
        self.lat[outcome].append(latency)
        if outcome <= _LATE:
            self.bucket_2xx[b].append(latency)
        if self.on_finish is not None:
            self.on_finish(req.key, OUTCOMES[outcome], req.sched - self.t0, now - self.t0)

    def _pick_path(self) -> int:
        cum = self._cum_weights
        if not cum:
            return -1
        return min(len(cum) - 1, bisect.bisect_right(cum, self._path_rng.random() * cum[-1]))

    def complete(self, req: _Req, status: int) -> None:
        now = monotonic()
        if 200 <= status < 300:
            outcome = _OK if now - req.sched <= self.slo else _LATE
        elif status == 429:
            outcome = _429
        elif status == 503:
            outcome = _503
        else:
            outcome = _OTHER
        self.finish(req, outcome, now)

    # ---------------------------------------------------------------- connection pool
    def dispatch(self, req: _Req) -> None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                conn.send(req)
                return
        self.pending.append(req)
        self._maybe_connect()

    def _maybe_connect(self) -> None:
        if (
            self.pending
            and len(self.conns) + self.connecting < self.max_connections
            and self.connecting < len(self.pending)
        ):
            self.connecting += 1
            self.loop.create_task(self._connect())  # type: ignore[union-attr]

    async def _connect(self) -> None:
        loop = self.loop
        assert loop is not None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self), self.host, self.port), self.timeout
            )
        except (TimeoutError, OSError):
            self.connecting -= 1
            self.connect_errors += 1
            now = monotonic()
            while self.pending:
                req = self.pending.popleft()
                if not req.done:
                    self.finish(req, _ERROR, now)
                    break
            return
        self.connecting -= 1
        self.opened += 1
        self.conns.add(conn)
        self.max_used = max(self.max_used, len(self.conns))
        self.release(conn)

    def release(self, conn: _Conn) -> None:
        if conn.closed:
            return
        while self.pending:
            req = self.pending.popleft()
            if not req.done:
                conn.send(req)
                return
        self.idle.append(conn)

    def conn_lost(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        req, conn.req = conn.req, None
        if req is not None and not req.done:
            if conn.status and not conn.framed:  # close-delimited body: the close ends it
                self.complete(req, conn.status)
            elif not conn.got_bytes and conn.served > 0 and not req.retried:
                req.retried = True  # stale keep-alive connection: retry the GET once
                self.retries += 1
                while self.idle:
                    other = self.idle.pop()
                    if not other.closed:
                        other.send(req)
                        return
                self.pending.appendleft(req)
            else:
                self.finish(req, _ERROR, monotonic())
        self._maybe_connect()

    # ---------------------------------------------------------------- timers
    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            self._sweep(monotonic())

    def _sweep(self, now: float) -> None:
        limit = now - self.timeout
        pending = self.pending
        while pending and (pending[0].done or pending[0].sched <= limit):
            req = pending.popleft()
            if not req.done:
                self.finish(req, _TIMEOUT, now)
        for conn in list(self.conns):
            held = conn.req
            if held is not None and held.sched <= limit:
                conn.req = None
                self.finish(held, _TIMEOUT, now)
                conn.abort()

    async def _schedule(self) -> None:
        t0 = self.t0
        it = arrivals(self.phases, self.poisson, self.seed)
        nxt = next(it, None)
        lag = self.lag
        offered = self.offered_per_bucket
        nb = len(offered)
        while nxt is not None:
            now = monotonic()
            while nxt is not None and t0 + nxt <= now:
                req = _Req(t0 + nxt, self._pick_path())
                lag.append(now - req.sched)
                offered[min(nb - 1, int(nxt))] += 1
                self.issued += 1
                self.dispatch(req)
                nxt = next(it, None)
            if nxt is None:
                break
            await asyncio.sleep(max(0.001, t0 + nxt - monotonic()))

    # ---------------------------------------------------------------- run
    async def run(self, preconnect: int = 0) -> OpenLoopResult:
        self.loop = asyncio.get_running_loop()
        for _ in range(min(preconnect, self.max_connections)):
            try:
                _, conn = await asyncio.wait_for(
                    self.loop.create_connection(lambda: _Conn(self), self.host, self.port), self.timeout
                )
            except (TimeoutError, OSError):
                break
            self.opened += 1
            self.conns.add(conn)
            self.idle.append(conn)
        self.max_used = len(self.conns)
        gc.collect()
        gc.freeze()
        wall0 = monotonic()
        self.t0 = wall0 + 0.01
        sweeper = self.loop.create_task(self._sweeper())
        try:
            await self._schedule()
            # drain: every outstanding request ends by its timeout at the latest
            deadline = monotonic() + self.timeout + 0.5
            while self.finished < self.issued and monotonic() < deadline:
                await asyncio.sleep(0.02)
            self._sweep(monotonic() + self.timeout + 1.0)  # anything left is a timeout
        finally:
            sweeper.cancel()
            for conn in list(self.conns):
                conn.abort()
            gc.unfreeze()
        await asyncio.sleep(0)
        return self._result(monotonic() - wall0)

    def _result(self, wall: float) -> OpenLoopResult:
        counts = {name: len(self.lat[i]) for i, name in enumerate(OUTCOMES)}
        two = self.lat[_OK] + self.lat[_LATE]
        shed = self.lat[_429] + self.lat[_503]
        per_second = []
        for t, row in enumerate(self.buckets):
            b: dict[str, Any] = {"t": t, "offered": self.offered_per_bucket[t]}
            b.update({name: row[i] for i, name in enumerate(OUTCOMES)})
            b["p50_2xx_ms"] = _ms(percentile(self.bucket_2xx[t], 50))
            b["p99_2xx_ms"] = _ms(percentile(self.bucket_2xx[t], 99))
            per_second.append(b)
        offered = self.issued
        return OpenLoopResult(
            url=self.url,
            arrival="poisson" if self.poisson else "constant",
            phases=self.phases,
            rate=offered / self.duration if self.duration else 0.0,
            duration=self.duration,
            slo_s=self.slo,
            timeout_s=self.timeout,
            offered=offered,
            counts=counts,
            goodput=counts["ok"] / self.duration if self.duration else 0.0,
            ok_fraction=counts["ok"] / offered if offered else 0.0,
            p50_2xx_ms=_ms(percentile(two, 50)),
            p99_2xx_ms=_ms(percentile(two, 99)),
            max_2xx_ms=_ms(max(two) if two else None),
            p50_shed_ms=_ms(percentile(shed, 50)),
            p99_shed_ms=_ms(percentile(shed, 99)),
            p99_ok_ms=_ms(percentile(self.lat[_OK], 99)),
            dispatch_lag_p99_ms=_ms(percentile(self.lag, 99)),
            dispatch_lag_max_ms=_ms(max(self.lag) if self.lag else None),
            max_connections_used=self.max_used,
            connections_opened=self.opened,
            connect_errors=self.connect_errors,
            retries=self.retries,
            wall_s=round(wall, 3),
            per_second=per_second,
            latencies={name: self.lat[i] for i, name in enumerate(OUTCOMES)},
        )


async def run_open_loop(
    url: str,
    rate: float | None = None,
    duration: float | None = None,
    *,
    phases: Sequence[tuple[float, float]] | None = None,
    slo: float = 0.5,
    timeout: float = 5.0,
    poisson: bool = False,
    max_connections: int = 2000,
    headers: dict[str, str] | None = None,
    seed: int | None = None,
    preconnect: int = 0,
    paths: Sequence[str] | None = None,
    path_weights: Sequence[float] | None = None,
    on_finish: Callable[[int, str, float, float], None] | None = None,
) -> OpenLoopResult:
    """Run one open-loop test inside the current event loop. Give `rate`+`duration` or `phases`."""
    if phases is None:
        if rate is None or duration is None:
            raise ValueError("give rate and duration, or phases")
        phases = [(float(duration), float(rate))]
    gen = OpenLoop(
        url,
        phases,
        slo=slo,
        timeout=timeout,
        poisson=poisson,
        max_connections=max_connections,
        headers=headers,
        seed=seed,
        paths=paths,
        path_weights=path_weights,
        on_finish=on_finish,
    )
    return await gen.run(preconnect=preconnect)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


def run_open_loop_sync(
    url: str, rate: float | None = None, duration: float | None = None, **kw: Any
) -> OpenLoopResult:
    """`run_open_loop` in a fresh (uvloop) event loop."""
    from loadtest.common import raise_nofile_limit

    raise_nofile_limit()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(run_open_loop(url, rate, duration, **kw))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.openloop", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="http://127.0.0.1:PORT/path")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second (default 100)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of schedule (default 8)")
    p.add_argument("--phases", help="instead of --rate/--duration: 'secs:rate,secs:rate,...'")
    p.add_argument("--poisson", action="store_true", help="Poisson arrivals instead of constant spacing")
    p.add_argument("--slo", type=float, default=0.5, help="latency SLO in seconds for 'ok' (default 0.5)")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout in seconds (default 5)")
    p.add_argument("--max-connections", type=int, default=2000, help="connection pool bound (default 2000)")
    p.add_argument("--preconnect", type=int, default=0, help="open this many connections before starting")
    p.add_argument("--header", action="append", default=[], help="extra request header 'Name: value'")
    p.add_argument("--seed", type=int, default=None, help="random seed for --poisson")
    p.add_argument("--json", metavar="FILE", help="write the result (with per-second buckets) as JSON")
    p.add_argument("--latencies", action="store_true", help="include raw latency lists in --json output")
    p.add_argument("--quiet", action="store_true", help="only the summary line")
    p.add_argument("--zipf-keys", type=int, default=0, help="ask for URL path + 0..N-1, Zipf popularity")
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent for --zipf-keys (default 1.0)")
    a = p.parse_args(argv)

    headers = {}
    for h in a.header:
        k, _, v = h.partition(":")
        headers[k.strip()] = v.strip()
    phases = parse_phases(a.phases) if a.phases else [(a.duration, a.rate)]
    if sum(d for d, _ in phases) > 3600:
        p.error("schedule longer than one hour")
    res = run_open_loop_sync(
        a.url,
        phases=phases,
        slo=a.slo,
        timeout=a.timeout,
        poisson=a.poisson,
        max_connections=a.max_connections,
        headers=headers,
        seed=a.seed,
        preconnect=a.preconnect,
        paths=[f"{urlsplit(a.url).path or '/'}{i}" for i in range(a.zipf_keys)] or None,
        path_weights=zipf_weights(a.zipf_keys, a.zipf_s) if a.zipf_keys else None,
    )
    if not a.quiet:
        print(res.per_second_table())
        print()
    print(res.summary())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res.to_dict(latencies=a.latencies), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
