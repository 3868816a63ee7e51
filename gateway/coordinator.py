"""Host-wide rate limits for `workers: N` without Redis: the master holds the buckets.

Why: with N worker processes each holding its own buckets, a limit would hold N times over.
The master process owns the one authoritative set of GCRA tables (the same `Limiter` objects the
single-process path uses) and answers each decision over a Unix socket; workers send one line
per decision (pipelined on one connection, no handshake) and await the answer, like the Redis
store. If the master does not answer within the timeout, the worker decides with its local
bucket for that moment (fail open, logged once per transition) and reconnects in the background.
Wire format: one orjson array per line. Request `[id, route, [key, ...]]`; answer
`[id, -1, [[remaining, reset_s], ...]]` when admitted, `[id, index, wait_s]` when limit `index`
rejects (nothing consumed from any bucket).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import TYPE_CHECKING, Any

import orjson

from gateway import log
from gateway.ratelimit import Limiter, _reject, admit, build_limiters

if TYPE_CHECKING:
    from gateway.config.model import Config
    from gateway.proxy.exchange import Exchange


class CoordinatorServer:
    """Master side: authoritative buckets for every route's limits, served on a Unix socket."""

    def __init__(self, config: Config, path: str) -> None:
        self.path = path
        self.routes: dict[str, tuple[Limiter, ...]] = {}
        self.server: asyncio.AbstractServer | None = None
        self.decisions = 0
        self.load(config)

    def load(self, config: Config) -> None:
        """(Re)build the tables; unchanged limits keep their buckets (same rule as a reload)."""
        old = self.routes
        self.routes = {
            r.name: build_limiters(r.name, r.limits, old.get(r.name, ())) for r in config.routes if r.limits
        }

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    def decide(self, route: str, keys: list[str]) -> list[Any]:
        limiters = self.routes.get(route, ())
        self.decisions += 1
        if len(keys) != len(limiters):
            return [-1, []]  # config skew during a reload: admit rather than guess
        for i, (lim, key) in enumerate(zip(limiters, keys, strict=True)):
            wait = lim.table.check(key)
            if wait > 0.0:
                return [i, wait]
        out = []
        for lim, key in zip(limiters, keys, strict=True):
            lim.table.consume(key)
            out.append([lim.table.remaining(key), lim.table.reset_s(key)])
        return [-1, out]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                rid, route, keys = orjson.loads(line)
                writer.write(orjson.dumps([rid, *self.decide(route, keys)]) + b"\n")
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()


class CoordinatorStore:
    """Worker side: a LimitStore asking the master; falls back to local buckets when it can't."""

    def __init__(self, path: str, timeout_s: float = 0.05) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[list[Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = False
        self.errors = 0

    def usable(self) -> bool:
        return self._up

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            self._writer = writer
            self._set_up(True)
            try:
                while True:
                    line = await reader.readline()
                    if not line:
                        break
                    rid, *result = orjson.loads(line)
                    fut = self._pending.pop(rid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(result)
            except (ConnectionError, ValueError):
                pass
            self._writer = None
            self._set_up(False)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("coordinator gone"))
            self._pending.clear()
            await asyncio.sleep(0.2)

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            log.event("ratelimit_coordinator", state="up" if up else "down")

    async def admit(self, limiters: tuple[Limiter, ...], ex: Exchange, client_ip: str) -> bytes | None:
        writer = self._writer
        if writer is None:
            return admit(limiters, ex, client_ip)
        keys = [lim.key_of(ex, client_ip) for lim in limiters]
        rid = next(self._ids)
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        writer.write(orjson.dumps([rid, limiters[0].route, keys]) + b"\n")
        try:
            result = await asyncio.wait_for(fut, self.timeout_s)
        except (TimeoutError, ConnectionError):
            self._pending.pop(rid, None)
            self.errors += 1
            return admit(limiters, ex, client_ip)  # the master is slow or gone: decide locally now
        index = result[0]
        if index >= 0:
            lim = limiters[index]
            lim.counts[1] += 1
            return _reject(
                lim, keys[index], result[1], close=not ex.keep_alive or not ex.request_done, head=ex.head_only
            )
        extra = []
        for lim, (remaining, reset_s) in zip(limiters, result[1], strict=False):
            lim.counts[0] += 1
            if lim.config.headers:
                extra.append(lim.header_lines(remaining, reset_s))
        if extra:
            ex.extra_headers = b"".join(extra)
        return None
