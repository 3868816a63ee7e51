"""A backend simulator with a fixed capacity, like a thread-pool application server.

* `--concurrency C --service-ms S`: at most C requests are "in service" at once, each takes S ms
  (`--service-dist exp` makes it exponential with mean S). Capacity is therefore C*1000/S req/s.
  Requests beyond C wait in the simulator's own unbounded FIFO queue and their queueing delay adds
  to their latency: above capacity the queue grows without bound and every request gets slower.
* Abandoned requests are still served (a thread pool does not notice that the client has gone):
  work done for clients that already timed out is wasted, which is what makes goodput collapse
  under overload. `--cancel-abandoned` drops a queued request when its connection closes instead.
* `--warmup-s N --warmup-from F`: the concurrency limit grows linearly from F*C to C over the first
  N seconds after start (a cold JIT/cache), so a fresh instance has a fraction of its capacity.
* `GET /health` answers at once (not queued): 503 while the waiting queue has exceeded the current
  concurrency limit for more than `--health-overload-s` (default 1 s), else 200.
* `POST /admin/hang`: from now on every request (including /health; use `/admin/hang?health=0` to
  keep /health answering) waits until `POST /admin/unhang`, then proceeds normally.
* `GET /admin/stats`: JSON with the current limit, in service, waiting, served, healthy, hanging.
* Every other path: `200 ok\\n` after queueing + service, with header `X-Queue-Ms`.

Raw asyncio + httptools (uvloop when available), HTTP/1.1 keep-alive, pipelined requests are
served in order. Listens on 127.0.0.1 only.

    python -m loadtest.sim_backend --port 9001 --concurrency 20 --service-ms 50
    python -m loadtest.sim_backend --port 9002 --concurrency 20 --service-ms 50 --warmup-s 6 --warmup-from 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import httptools

monotonic = time.monotonic

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Capacity:
    """The concurrency limit, optionally ramping up linearly during a warm-up period."""

    def __init__(self, concurrency: int, warmup_s: float = 0.0, warmup_from: float = 1.0) -> None:
        self.concurrency = concurrency
        self.warmup_s = warmup_s
        self.warmup_from = warmup_from
        self.start = monotonic()

    def current(self, now: float | None = None) -> int:
        if self.warmup_s <= 0:
            return self.concurrency
        elapsed = (monotonic() if now is None else now) - self.start
        if elapsed >= self.warmup_s:
            return self.concurrency
        frac = self.warmup_from + (1.0 - self.warmup_from) * max(0.0, elapsed) / self.warmup_s
        return max(1, round(self.concurrency * frac))


class FifoPool:
    """Counting semaphore with a dynamic limit and a strict FIFO waiting queue.

    `acquire` returns the request's *nominal* service start: when a slot is handed over to a
    waiting request, service starts at the previous request's nominal end, not when the event loop
    got round to it, so timer overshoot does not erode capacity (C requests per service time).
    """

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.in_service = 0
        self.waiting = 0
        self._queue: deque[tuple[asyncio.Future[float], float]] = deque()

    async def acquire(self) -> float:
        now = monotonic()
        if self.waiting == 0 and self.in_service < self.capacity.current(now):
            self.in_service += 1
            return now
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._queue.append((fut, now))
        self.waiting += 1
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(monotonic())  # granted and cancelled in the same instant
            else:
                self.waiting -= 1
            raise

    def release(self, nominal_end: float) -> None:
        self.in_service -= 1
        self.grant(nominal_end)

    def grant(self, nominal_end: float | None = None) -> None:
        now = monotonic()
        limit = self.capacity.current(now)
        q = self._queue
        while q and self.in_service < limit:
            fut, arrived = q.popleft()
            if fut.cancelled():
                continue
            self.waiting -= 1
            self.in_service += 1
            fut.set_result(now if nominal_end is None else max(nominal_end, arrived))


class SimBackend:
    def __init__(
        self,
        concurrency: int,
        service_ms: float,
        service_dist: str = "fixed",
        warmup_s: float = 0.0,
        warmup_from: float = 0.1,
        health_overload_s: float = 1.0,
        cancel_abandoned: bool = False,
        seed: int | None = None,
    ) -> None:
        self.capacity = Capacity(concurrency, warmup_s, warmup_from)
        self.pool = FifoPool(self.capacity)
        self.service_s = service_ms / 1000.0
        self.service_dist = service_dist
        self.health_overload_s = health_overload_s
        self.cancel_abandoned = cancel_abandoned
        self.rng = random.Random(seed)
        self.unhung = asyncio.Event()
        self.unhung.set()
        self.hang_health = True
        self.over_since: float | None = None
        self.served = 0
        self.abandoned_served = 0
        self.health_503 = 0
        self.connections = 0

    # ------------------------------------------------------------ state
    def overloaded(self, now: float) -> bool:
        """Update and return the /health verdict (queue > limit for more than health_overload_s)."""
        if self.pool.waiting > self.capacity.current(now):
            if self.over_since is None:
                self.over_since = now
            return now - self.over_since > self.health_overload_s
        self.over_since = None
        return False

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            self.pool.grant()  # the limit may have grown (warm-up)
            self.overloaded(monotonic())

    def stats(self) -> dict[str, Any]:
        now = monotonic()
        return {
            "limit": self.capacity.current(now),
            "concurrency": self.capacity.concurrency,
            "service_ms": self.service_s * 1000.0,
            "in_service": self.pool.in_service,
            "waiting": self.pool.waiting,
            "served": self.served,
            "abandoned_served": self.abandoned_served,
            "healthy": not self.overloaded(now),
            "health_503": self.health_503,
            "hanging": not self.unhung.is_set(),
            "connections": self.connections,
            "uptime_s": round(now - self.capacity.start, 3),
        }

    # ------------------------------------------------------------ requests
    async def handle(self, method: bytes, url: bytes, conn: _ServerConn) -> tuple[int, bytes, list[str]]:
        path, _, query = url.partition(b"?")
        if path.startswith(b"/admin/"):
            return self.admin(method, path, query)
        is_health = path == b"/health"
        if not self.unhung.is_set() and (self.hang_health or not is_health):
            await self.unhung.wait()
        if is_health:
            if self.overloaded(monotonic()):
                self.health_503 += 1
                return 503, b"overloaded\n", []
            return 200, b"ok\n", []
        t0 = monotonic()
        start = await self.pool.acquire()
        queued = max(0.0, start - t0)
        s = self.service_s if self.service_dist == "fixed" else self.rng.expovariate(1.0 / self.service_s)
        end = start + s
        try:
            await asyncio.sleep(max(0.0, end - monotonic()))
        finally:
            self.pool.release(min(end, monotonic()))
        self.served += 1
        if conn.closed:
            self.abandoned_served += 1
        return 200, b"ok\n", [f"X-Queue-Ms: {queued * 1000.0:.1f}"]

    def admin(self, method: bytes, path: bytes, query: bytes) -> tuple[int, bytes, list[str]]:
        if path == b"/admin/stats":
            return 200, json.dumps(self.stats()).encode() + b"\n", ["Content-Type: application/json"]
        if path in (b"/admin/hang", b"/admin/unhang"):
            if method != b"POST":
                return 405, b"use POST\n", ["Allow: POST"]
            if path == b"/admin/hang":
                self.hang_health = b"health=0" not in query
                self.unhung.clear()
                return 200, b"hanging\n", []
            self.unhung.set()
            return 200, b"unhung\n", []
        return 404, b"not found\n", []


class _ServerConn(asyncio.Protocol):
    def __init__(self, app: SimBackend) -> None:
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.queue: deque[tuple[bytes, bytes, bool]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.app.connections += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(400, b"bad request\n", [], keep=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.app.connections -= 1
        if self.app.cancel_abandoned and self.task is not None:
            self.task.cancel()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.queue.append((self.parser.get_method(), self.url, self.parser.should_keep_alive()))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while self.queue:
            method, url, keep = self.queue.popleft()
            status, body, headers = await self.app.handle(method, url, self)
            if self.closed:
                continue
            self._write(status, body, headers, keep)
            if not keep:
                self.queue.clear()
                break
        self.task = None

    def _write(self, status: int, body: bytes, headers: list[str], keep: bool) -> None:
        if self.closed or self.transport is None:
            return
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", f"Content-Length: {len(body)}"]
        if not any(h.lower().startswith("content-type:") for h in headers):
            head.append("Content-Type: text/plain")
        head.extend(headers)
        if not keep:
            head.append("Connection: close")
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        if not keep:
            self.closed = True
            self.transport.close()


async def serve(app: SimBackend, host: str, port: int, ready_msg: bool = True) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ServerConn(app), host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ticker = loop.create_task(app.ticker())
    if ready_msg:
        c = app.capacity
        print(
            f"sim_backend listening on {host}:{port} concurrency={c.concurrency} "
            f"service={app.service_s * 1000:g}ms ({app.service_dist}) "
            f"capacity={c.concurrency / app.service_s:.0f} req/s"
            + (f" warmup={c.warmup_s:g}s from {c.warmup_from:g}" if c.warmup_s > 0 else ""),
            flush=True,
        )
    try:
        await stop.wait()
    finally:
        ticker.cancel()
        server.close()
        app.unhung.set()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.sim_backend", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=20, help="requests in service at once (default 20)")
    p.add_argument("--service-ms", type=float, default=50.0, help="service time per request (default 50)")
    p.add_argument("--service-dist", choices=("fixed", "exp"), default="fixed")
    p.add_argument("--warmup-s", type=float, default=0.0, help="seconds over which capacity ramps up")
    p.add_argument("--warmup-from", type=float, default=0.1, help="starting fraction of capacity (0.1)")
    p.add_argument("--health-overload-s", type=float, default=1.0)
    p.add_argument("--cancel-abandoned", action="store_true", help="drop queued requests of gone clients")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("sim_backend listens on loopback only")
    if a.concurrency < 1 or a.service_ms <= 0 or not 0 < a.warmup_from <= 1:
        p.error("need concurrency >= 1, service-ms > 0, 0 < warmup-from <= 1")

    async def _main() -> None:
        app = SimBackend(
            a.concurrency,
            a.service_ms,
            service_dist=a.service_dist,
            warmup_s=a.warmup_s,
            warmup_from=a.warmup_from,
            health_overload_s=a.health_overload_s,
            cancel_abandoned=a.cancel_abandoned,
            seed=a.seed,
        )
        await serve(app, a.host, a.port)

    from loadtest.openloop import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
