"""Distributed rate limits: the GCRA buckets of every gateway instance shared through Redis.

Rules:
- one decision = one Lua script run (EVALSHA; the script is loaded once and re-loaded on
  NOSCRIPT, e.g. after a Redis restart) that checks the buckets of ALL limits of the request and,
  only if every one passes, takes a token from each: atomic, one round trip, nothing consumed on
  a rejection (the same two-phase rule as the local `gateway.ratelimit.admit.admit`);
- the script reads Redis's own clock (`TIME`), so instances with skewed clocks agree; the GCRA is
  the local `RateTable`'s (interval T = per/rate, tau = (burst-1)*T, a missing key is a full
  bucket, the same 1e-6*T rounding slack), in microseconds;
- each key (prefix + route + label + bucket key, the parts percent-encoded so spaces and colons
  are safe, a bucket key longer than 64 characters replaced by its SHA-256) is written with
  `SET ... PX ttl`, ttl = time until its bucket is full again + 1 s: Redis drops idle buckets itself;
- every decision waits at most `timeout`. Any error or timeout marks the store down (logged once
  per transition, `ratelimit_store` event) and applies `on_error`:
    allow: the local buckets decide (`gateway.ratelimit.admit.admit`), and `usable()` turns False so
           the hot path decides locally without even a task switch;
    deny:  the first limit's status with `Retry-After: 1`; `usable()` stays True and decisions
           are rejected at once, without waiting on Redis, until it is back;
  while down a background task PINGs every 0.5 s and reloads the script; the first answer marks
  the store up again (logged once). A decision that timed out may still have taken its tokens in
  Redis (it is not cancelled there); the local buckets are not fed while Redis decides, so after
  a failover each instance starts from a full local bucket;
- connections: redis-py's pool, and micro-batching on top of it. Decisions arriving in the same
  event-loop tick, or while earlier batches are in flight, are sent as one non-transactional
  pipeline of EVALSHAs (one write, one read). At most `_MAX_INFLIGHT` batches are in flight, so
  at most that many connections are used however high the request rate; an idle gateway sends
  each decision at once (a batch of one, a plain EVALSHA).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from gateway.config.model import RateLimitStore
from gateway.observe import log
from gateway.ratelimit.admit import admit
from gateway.ratelimit.limiter import MISSING, ROUTE, Decided, Limiter, reject

if TYPE_CHECKING:
    from gateway.pipeline.exchange import Exchange

# Extra life of a key past the moment its bucket is full again (a missing key IS a full bucket,
# so this only absorbs rounding; expiring exactly then would lose nothing).
TTL_MARGIN_MS = 1000
PROBE_INTERVAL_S = 0.5
_MAX_INFLIGHT = 4
_MAX_BATCH = 256
_LONG_KEY = 64

# KEYS[i]: the bucket of limit i.  ARGV[1]: "now" in microseconds, or "" for the Redis clock (the
# override exists for tests only); then per limit ARGV[2i] = emission interval (µs) and
# ARGV[2i+1] = burst.  Reply: {i, wait_us} when limit i refuses (nothing written), else
# {0, 0, remaining_1, reset_us_1, remaining_2, reset_us_2, ...}.  Lua numbers become integers in
# the reply, hence the ceil/floor.  TATs are stored with %.17g so a float round-trips exactly.
SCRIPT = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local n = #KEYS
local tats = {}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i])
  local tau = (tonumber(ARGV[2 * i + 1]) - 1) * interval
  local v = redis.call('GET', KEYS[i])
  if v then
    local tat = tonumber(v)
    local wait = tat - tau - now
    if wait > interval * 1e-6 then
      return {i, math.ceil(wait)}
    end
    tats[i] = tat
  else
    tats[i] = false
  end
end
local out = {0, 0}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tau = (burst - 1) * interval
  local tat = tats[i]
  local base = now
  if tat and tat > now + interval * 1e-6 then
    base = tat
  end
  local new = base + interval
  local backlog = new - now
  redis.call('SET', KEYS[i], string.format('%.17g', new), 'PX', math.ceil(backlog / 1000) + MARGIN)
  local r = math.floor((tau - backlog) / interval + 1 + 1e-6)
  if r < 0 then r = 0 elseif r > burst then r = burst end
  out[2 * i + 1] = r
  out[2 * i + 2] = math.ceil(backlog)
end
return out
""".replace("MARGIN", str(TTL_MARGIN_MS))
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


def encode_key(key: str) -> str:
    """A bucket key as a Redis key part: percent-encoded (no ':' or spaces), long ones hashed."""
    if key == ROUTE:
        return "!route"  # '!', '#' never appear in quote() output: no collision with real keys
    if key == MISSING:
        return "!missing"
    encoded = quote(key, safe="")
    if len(encoded) > _LONG_KEY:
        return "#" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return encoded


def limit_prefix(prefix: str, route: str, label: str) -> str:
    return f"{prefix}{quote(route, safe='')}:{quote(label, safe='')}:"


def limit_args(lim: Limiter) -> tuple[str, str]:
    c = lim.config
    return repr(c.per / c.rate * 1e6), str(c.bucket)


_Pending = tuple[list[str], list[str], "asyncio.Future[Any]"]


class RedisLimitStore:
    """`LimitStore` on Redis; see the module docstring.  Plain counters: decisions, errors, fallbacks."""

    def __init__(self, config: RateLimitStore) -> None:
        self.config = config
        self.timeout = float(config.timeout)
        self.deny = config.on_error == "deny"
        self.client = aioredis.Redis.from_url(
            config.redis,
            socket_timeout=max(1.0, 20 * self.timeout),
            socket_connect_timeout=max(0.5, 4 * self.timeout),
            retry=Retry(NoBackoff(), 0),
            max_connections=_MAX_INFLIGHT + 4,
        )
        self.healthy = True
        self.closed = False
        # counters
        self.decisions = 0  # answered by Redis
        self.errors = 0  # errors and timeouts of Redis calls
        self.fallbacks = 0  # decided by `on_error` instead
        self.downs = 0  # transitions to down
        self.batches = 0  # round trips (pipelines or single EVALSHAs) sent
        self.last_error = ""
        self._meta: dict[int, tuple[Limiter, str, tuple[str, str]]] = {}
        self._queue: list[_Pending] = []
        self._inflight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deciding: set[asyncio.Task[None]] = set()  # begin()'s decisions in flight
        self._probe: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "up" if self.healthy else "down"
        return f"<RedisLimitStore {state} decisions={self.decisions} errors={self.errors}>"

    def stats(self) -> dict[str, int | bool]:
        return {
            "healthy": self.healthy,
            "decisions": self.decisions,
            "errors": self.errors,
            "fallbacks": self.fallbacks,
            "downs": self.downs,
            "batches": self.batches,
        }

    async def start(self) -> None:
        """Load the script (bounded wait); an unreachable Redis marks the store down, never raises."""
        try:
            await asyncio.wait_for(self.client.script_load(SCRIPT), max(self.timeout, 1.0))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._down(e)

    def usable(self) -> bool:
        # In deny mode the store keeps deciding while down (rejecting at once): "decide locally"
        # would silently turn fail-closed into fail-open.
        return not self.closed and (self.healthy or self.deny)

    def begin(self, limiters: tuple[Limiter, ...], ex: Exchange, client_ip: str, done: Decided) -> None:
        task = asyncio.get_running_loop().create_task(self._decide(limiters, ex, client_ip, done))
        self._deciding.add(task)  # not cancelled by close(): admit() falls back to local buckets
        task.add_done_callback(self._deciding.discard)

    async def _decide(
        self, limiters: tuple[Limiter, ...], ex: Exchange, client_ip: str, done: Decided
    ) -> None:
        done(ex, await self.admit(limiters, ex, client_ip))

    async def admit(self, limiters: tuple[Limiter, ...], ex: Exchange, client_ip: str) -> bytes | None:
        if self.closed:  # replaced by a reload or stopping: the local buckets decide, quietly
            return admit(limiters, ex, client_ip)
        if not self.healthy:
            return self._fallback(limiters, ex, client_ip)
        keys = [lim.key_of(ex.headers, client_ip) for lim in limiters]
        rkeys: list[str] = []
        args = [""]
        meta = self._meta
        for lim, key in zip(limiters, keys, strict=True):
            m = meta.get(id(lim))
            if m is None or m[0] is not lim:
                if len(meta) > 4096:
                    meta.clear()
                m = meta[id(lim)] = (
                    lim,
                    limit_prefix(self.config.prefix, lim.route, lim.label),
                    limit_args(lim),
                )
            rkeys.append(m[1] + encode_key(key))
            args.extend(m[2])
        try:
            reply = await asyncio.wait_for(self._submit(rkeys, args), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if self.closed:  # closed while waiting (reload, stop): not a Redis failure
                return admit(limiters, ex, client_ip)
            self.errors += 1
            self._down(e)
            return self._fallback(limiters, ex, client_ip)
        self.decisions += 1
        index = int(reply[0])
        if index:
            lim = limiters[index - 1]
            lim.counts[1] += 1
            close = not ex.keep_alive or not ex.request_done
            return reject(lim, keys[index - 1], int(reply[1]) / 1e6, close=close, head=ex.head_only)
        extra: list[bytes] | None = None
        for i, lim in enumerate(limiters):
            lim.counts[0] += 1
            if lim.config.headers:
                if extra is None:
                    extra = []
                extra.append(lim.header_lines(int(reply[2 + 2 * i]), int(reply[3 + 2 * i]) / 1e6))
        if extra is not None:
            ex.extra_headers = b"".join(extra)
        return None

    def _fallback(self, limiters: tuple[Limiter, ...], ex: Exchange, client_ip: str) -> bytes | None:
        self.fallbacks += 1
        if not self.deny:
            return admit(limiters, ex, client_ip)
        lim = limiters[0]
        lim.counts[1] += 1
        close = not ex.keep_alive or not ex.request_done
        return reject(lim, lim.key_of(ex.headers, client_ip), 1.0, close=close, head=ex.head_only)

    # -- health ---------------------------------------------------------------------------------

    def _down(self, error: BaseException) -> None:
        self.last_error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if not self.healthy or self.closed:
            return
        self.healthy = False
        self.downs += 1
        log.event("ratelimit_store", state="down", error=self.last_error, on_error=self.config.on_error)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        wait = max(self.timeout, 0.25)
        while not self.closed:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await asyncio.wait_for(self.client.ping(), wait)
                await asyncio.wait_for(self.client.script_load(SCRIPT), wait)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                continue
            if self.closed:
                return
            self.healthy = True
            self._probe = None
            log.event("ratelimit_store", state="up", down_errors=self.errors)
            return

    # -- batching -------------------------------------------------------------------------------

    def _submit(self, keys: list[str], args: list[str]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, args, fut))
        if not self._flush_scheduled and self._inflight < _MAX_INFLIGHT:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        loop = asyncio.get_running_loop()
        while self._queue and self._inflight < _MAX_INFLIGHT:
            batch = [p for p in self._queue[:_MAX_BATCH] if not p[2].done()]  # timed out already
            del self._queue[:_MAX_BATCH]
            if not batch:
                continue
            self._inflight += 1
            task = loop.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            replies = await self._eval(batch)
        except BaseException as e:
            error = e if isinstance(e, Exception) else ConnectionError("rate-limit store closed")
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            if not isinstance(e, Exception):
                raise
        else:
            for (_, _, fut), reply in zip(batch, replies, strict=True):
                if not fut.done():
                    if isinstance(reply, Exception):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
        finally:
            self._inflight -= 1
            if self._queue and not self._flush_scheduled and not self.closed:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _eval(self, batch: Sequence[_Pending]) -> list[Any]:
        self.batches += 1
        client = self.client
        if len(batch) == 1:
            keys, args, _ = batch[0]
            try:
                return [await client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)]
            except NoScriptError:
                await client.script_load(SCRIPT)
                return [await client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)]
        replies = await self._pipeline(batch)
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if again:
            await client.script_load(SCRIPT)
            for i, r in zip(again, await self._pipeline([batch[i] for i in again]), strict=True):
                replies[i] = r
        return replies

    async def _pipeline(self, batch: Sequence[_Pending]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(SCRIPT_SHA, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    # -- lifecycle ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop probing, fail queued decisions (their callers fall back), close the connections."""
        if self.closed:
            return
        self.closed = True
        if self._probe is not None:
            self._probe.cancel()
        queued, self._queue = self._queue, []
        for _, _, fut in queued:
            if not fut.done():
                fut.set_exception(ConnectionError("rate-limit store closed"))
        tasks = [t for t in (self._probe, *self._tasks) if t is not None]
        if tasks:
            # In-flight batches get a moment to finish (their callers are waiting on them).
            _, pending = await asyncio.wait(tasks, timeout=max(self.timeout, 0.1))
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        self._probe = None
        await self.client.aclose()
