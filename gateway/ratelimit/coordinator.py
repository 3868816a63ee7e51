"""Host-wide rate limits for `workers: N` without Redis: the master holds the buckets.

Why: with N worker processes each holding its own buckets, a limit would hold N times over.
The master process owns the one authoritative set of GCRA tables (the same `Limiter` objects the
single-process path uses) and answers each decision over a Unix socket; workers send one line
per decision (pipelined on one connection, no handshake) and the answer continues the request
through a callback (`LimitStore.begin`), as with the Redis store. Both sides are plain protocols
that batch: the decisions asked within one loop iteration leave in one write, and the master
answers everything one read brought in one write, so a busy worker pays a syscall per batch, not
per request; one timer per worker covers every timeout. If the master does not answer within the
timeout, the worker decides with its local bucket for that moment (fail open, logged once per
transition) and reconnects in the background.
Wire format: one orjson array per line. Request `[id, route, [key, ...]]`; answer
`[id, -1, [[remaining, reset_s] or [], ...]]` when admitted (the numbers only for limits with
`headers: true`), `[id, index, wait_s]` when limit `index` rejects (nothing consumed from any bucket).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import orjson

from gateway.observe import log
from gateway.ratelimit.admit import admit
from gateway.ratelimit.limiter import Decided, Limiter, build_limiters, reject

if TYPE_CHECKING:
    from gateway.config.model import Config
    from gateway.pipeline.exchange import Exchange


class CoordinatorServer:
    """Master side: authoritative buckets for every route's limits, served on a Unix socket."""

    def __init__(self, config: Config, path: str) -> None:
        self.path = path
        self.routes: dict[str, tuple[Limiter, ...]] = {}
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.BaseTransport] = set()
        self.decisions = 0
        self.reads = 0  # batches answered (one per read that completed lines)
        self.load(config)

    def load(self, config: Config) -> None:
        """(Re)build the tables; unchanged limits keep their buckets (same rule as a reload)."""
        old = self.routes
        self.routes = {
            r.name: build_limiters(r.name, r.limits, old.get(r.name, ())) for r in config.routes if r.limits
        }

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # A compiled (mypyc) class cannot derive from asyncio.Protocol; the loop only calls its methods.
        self.server = await loop.create_unix_server(
            lambda: cast(asyncio.Protocol, _MasterConn(self)), path=self.path
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for transport in list(self.connections):
                transport.close()  # workers notice at once and decide locally
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    def decide(self, route: str, keys: list[str]) -> list[Any]:
        limiters = self.routes.get(route, ())
        self.decisions += 1
        if len(keys) != len(limiters):
            return [-1, []]  # config skew during a reload: admit rather than guess
        if len(limiters) == 1:  # the common case: one take, and the header numbers only if asked for
            lim, key = limiters[0], keys[0]
            table = lim.table
            wait = table.take(key)
            if wait > 0.0:
                return [0, wait]
            return [-1, [[table.remaining(key), table.reset_s(key)]] if lim.config.headers else []]
        for i, (lim, key) in enumerate(zip(limiters, keys, strict=True)):
            wait = lim.table.check(key)
            if wait > 0.0:
                return [i, wait]
        out = []
        for lim, key in zip(limiters, keys, strict=True):
            lim.table.consume(key)
            out.append([lim.table.remaining(key), lim.table.reset_s(key)] if lim.config.headers else [])
        return [-1, out]

    def answer(self, lines: list[bytes]) -> bytes:
        """Decide every request line of one read; the answers as one block of lines."""
        self.reads += 1
        out = []
        decide = self.decide
        for line in lines:
            rid, route, keys = orjson.loads(line)
            out.append(orjson.dumps([rid, *decide(route, keys)]))
        out.append(b"")
        return b"\n".join(out)


def _lines(buf: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines of `buf + data`, and the unfinished rest."""
    if buf:
        data = buf + data
    end = data.rfind(b"\n")
    if end < 0:
        return [], data
    return data[:end].split(b"\n"), data[end + 1 :]


class _LineConn:
    """A Unix-socket connection carrying newline-delimited JSON; the sides differ in `lines`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        lines, self.buf = _lines(self.buf, data)
        if len(self.buf) > _MAX_LINE:
            self._bad()
            return
        if lines:
            try:
                self.lines(lines)
            except (ValueError, TypeError):
                self._bad()

    def lines(self, lines: list[bytes]) -> None:
        raise NotImplementedError

    # The rest of the protocol interface the loop calls (no asyncio.Protocol base to inherit it from).
    def eof_received(self) -> bool | None:
        return None  # the peer is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def _bad(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _MasterConn(_LineConn):
    def __init__(self, server: CoordinatorServer) -> None:
        super().__init__()
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self.transport)

    def lines(self, lines: list[bytes]) -> None:
        if self.transport is not None:
            self.transport.write(self.server.answer(lines))


class _WorkerConn(_LineConn):
    def __init__(self, store: CoordinatorStore) -> None:
        super().__init__()
        self.store = store
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def lines(self, lines: list[bytes]) -> None:
        answered = self.store.answered
        for line in lines:
            rid, *result = orjson.loads(line)
            answered(rid, result)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


_MAX_LINE = 1 << 20  # an unfinished line longer than this is not our protocol: close


class CoordinatorStore:
    """Worker side: a LimitStore asking the master; falls back to local buckets when it can't."""

    def __init__(self, path: str, timeout_s: float = 0.05) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._ids = itertools.count()
        # id -> what is needed to finish the decision: (limiters, exchange, client ip, keys, done)
        self._pending: dict[int, _Pending] = {}
        self._conn: _WorkerConn | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = False
        self._out: list[bytes] = []  # request lines of this loop iteration, written by _flush
        self._deadlines: deque[tuple[float, int]] = deque()  # (deadline, id), in sending order
        self._timer: asyncio.TimerHandle | None = None
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
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail_all()  # nothing may wait on a store that is gone: the local buckets decide

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                _, proto = await loop.create_unix_connection(
                    lambda: cast(asyncio.Protocol, _WorkerConn(self)), self.path
                )
            except OSError:
                await asyncio.sleep(0.2)
                continue
            conn = cast(_WorkerConn, proto)
            self._conn = conn
            self._set_up(True)
            await conn.lost
            self._conn = None
            self._out.clear()
            self._set_up(False)
            self._fail_all()
            await asyncio.sleep(0.2)

    def _fail_all(self) -> None:
        """The master (or this store) is gone: everything still waiting is decided locally now."""
        pending = list(self._pending.values())
        self._pending.clear()
        self._deadlines.clear()
        for limiters, ex, client_ip, _keys, done in pending:
            self.errors += 1
            done(ex, admit(limiters, ex, client_ip))

    def _flush(self) -> None:
        out = self._out
        conn = self._conn
        if out and conn is not None and conn.transport is not None:
            out.append(b"")
            conn.transport.write(b"\n".join(out))
        out.clear()

    def _expire(self) -> None:
        """The one timer: decide locally what the master did not answer within timeout_s; re-arm."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines = self._deadlines
        pending = self._pending
        while deadlines and deadlines[0][0] <= now:
            entry = pending.pop(deadlines.popleft()[1], None)
            if entry is not None:
                limiters, ex, client_ip, _keys, done = entry
                self.errors += 1
                done(ex, admit(limiters, ex, client_ip))  # the master is slow: decide locally now
        while deadlines and deadlines[0][1] not in pending:
            deadlines.popleft()  # answered already
        if deadlines:
            self._timer = loop.call_at(deadlines[0][0], self._expire)

    def answered(self, rid: int, result: list[Any]) -> None:
        entry = self._pending.pop(rid, None)
        if entry is not None:
            limiters, ex, _client_ip, keys, done = entry
            done(ex, _decision(limiters, ex, keys, result))

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            log.event("ratelimit_coordinator", state="up" if up else "down")

    async def admit(self, limiters: tuple[Limiter, ...], ex: Exchange, client_ip: str) -> bytes | None:
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.begin(limiters, ex, client_ip, lambda _ex, rejection: fut.set_result(rejection))
        return await fut

    def begin(self, limiters: tuple[Limiter, ...], ex: Exchange, client_ip: str, done: Decided) -> None:
        if self._conn is None:
            done(ex, admit(limiters, ex, client_ip))
            return
        keys = [lim.key_of(ex.headers, client_ip) for lim in limiters]
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        self._pending[rid] = (limiters, ex, client_ip, keys, done)
        out = self._out
        if not out:
            loop.call_soon(self._flush)
        out.append(orjson.dumps([rid, limiters[0].route, keys]))
        self._deadlines.append((loop.time() + self.timeout_s, rid))
        if self._timer is None:
            self._timer = loop.call_at(self._deadlines[0][0], self._expire)


_Pending = tuple[tuple[Limiter, ...], "Exchange", str, list[str], Decided]


def _decision(
    limiters: tuple[Limiter, ...], ex: Exchange, keys: list[str], result: list[Any]
) -> bytes | None:
    """The master's answer as the request path needs it: a rejection response, or None (admitted)."""
    index = result[0]
    if index >= 0:
        lim = limiters[index]
        lim.counts[1] += 1
        return reject(
            lim, keys[index], result[1], close=not ex.keep_alive or not ex.request_done, head=ex.head_only
        )
    numbers = result[1]  # [remaining, reset_s] per limit, filled only where headers are configured
    extra = []
    for i, lim in enumerate(limiters):
        lim.counts[0] += 1
        if lim.config.headers and i < len(numbers) and numbers[i]:
            remaining, reset_s = numbers[i]
            extra.append(lim.header_lines(remaining, reset_s))
    if extra:
        ex.extra_headers = b"".join(extra)
    return None
