"""The request path after parsing, written down once: its phases in execution order.

    route → [request actions] → rate limit → cache → null → admit → pick → send
      → response (gateway.cluster.upstream_connection) → settle

Each phase is a method named for it, on the base class of the client connection (the connection
parses; this decides where its requests go). Every decision is synchronous; a phase that waits
(a shared rate-limit store's decision, the admission queue, a cache fill) records where it stopped
and continues through `resume_exchange`, the one place that checks the exchange is still wanted.
Every upstream attempt is an `Attempt` permit, ended exactly once (gateway.pipeline.attempt).
docs/request-path.md draws it with each phase's outcomes.

Compiled with the rest of the data plane: methods here are direct C calls from the connection.
"""

from __future__ import annotations

import asyncio
import ssl
from time import monotonic
from typing import TYPE_CHECKING, Final, cast

from gateway import http1
from gateway.cache import stage as cache_stage
from gateway.cluster.pool import IDEMPOTENT, Pool
from gateway.cluster.upstream_connection import UpstreamProtocol
from gateway.observe import stats
from gateway.pipeline.attempt import Attempt
from gateway.pipeline.exchange import (
    ADMITTED,
    AFTER_CACHE,
    AFTER_RATE_LIMIT,
    RATE_LIMITED,
    SHED_WAITER,
    Downstream,
    Exchange,
)
from gateway.pipeline.routing import PRIORITY_BYTES
from gateway.ratelimit.admit import admit

if TYPE_CHECKING:
    from gateway.cluster.pool import TargetState
    from gateway.pipeline.routing import Holder

_now: Final = monotonic
CONTINUE_100: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

_RETRY_COND: Final = {
    "connect_failed": "connect_failure",
    "connect_timeout": "connect_failure",
    "response_timeout": "timeout",
    "reset": "reset",
}


class Pipeline(Downstream):
    """The phases of the request path, as methods of the client connection's base class."""

    __slots__ = ("host_key", "host_valid", "out", "peer_str", "permit", "read_now")

    def __init__(self, holder: Holder, loop: asyncio.AbstractEventLoop, scheme: bytes) -> None:
        super().__init__(holder, loop, scheme)
        self.out = http1.not_connected  # the transport's write, bound once per connection
        self.peer_str = ""
        # A connection's requests repeat their Host: validated and normalised (host_key) once per value.
        self.host_valid: bytes | None = None  # never empty: an empty Host is always refused
        self.host_key = b""
        # The clock at the start of the current read while data_received runs; 0 outside it.
        self.read_now = 0.0
        # One exchange is in flight at a time: its upstream tries arm this one permit.
        self.permit = Attempt()

    # ---- the phases, in execution order -------------------------------------------------------
    def dispatch(self, ex: Exchange) -> None:
        """A request whose head is parsed: route → request limits → rate limit → cache → … ."""
        if ex.canned is not None:
            self.answer_local(ex)  # refused while parsing: its answer is ready
            return
        if not self.route(ex):
            return
        route = ex.route
        assert route is not None
        if route.limiters and not self.rate_limit(ex):
            return
        cache_stage.cached_or_forward(self, ex)  # the cache phase; a miss goes on to forward()

    def route(self, ex: Exchange) -> bool:
        """Target form, route match, priority, body limits. False: answered (400, 404, 413)."""
        url = ex.url
        if not url.startswith(b"/"):
            if url == b"*" and ex.method == b"OPTIONS":
                pass
            elif url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
                # absolute-form: forward in origin-form; its authority must agree with Host
                rest = url[url.find(b"//") + 2 :]
                slash = rest.find(b"/")
                authority = rest if slash < 0 else rest[:slash]
                other = ex.host and authority.lower() != ex.host.lower()
                if other or authority.translate(None, http1.HOST_CHARS):
                    self.local(ex, http1.BAD_REQUEST, close=True)  # another host, or not a host at all
                    return False
                ex.host = ex.host or authority
                url = rest[slash:] if slash >= 0 else b"/"
                ex.url = url
            else:
                self.local(ex, http1.BAD_REQUEST, close=True)
                return False
        q = http1.query_start(url)
        if q < 0:
            self.local(ex, http1.BAD_REQUEST, close=True)  # a fragment, or a ".." segment
            return False
        path = url if q == len(url) else url[:q]
        # (an authority from an absolute-form target, or no Host in HTTP/1.0, is not the memo's)
        host = self.host_key if ex.host == self.host_valid else http1.route_host(ex.host)
        route = self.holder.runtime.match(ex.method, host, path, ex.headers)
        if route is None:
            stats.GLOBAL.no_route += 1
            self.local(ex, http1.NOT_FOUND)
            return False
        ex.route = route
        route.stats.in_flight += 1
        ex.priority = route.priority
        if route.priority_header is not None:
            for hn, hv in ex.headers:
                if hn.lower() == route.priority_header:
                    ex.priority = PRIORITY_BYTES.get(hv.strip().lower(), route.priority)
                    break
        if (ex.content_length is not None and ex.content_length > route.max_body_size) or (
            ex.body_bytes > route.max_body_size
        ):
            self.local(ex, http1.BODY_TOO_LARGE, close=True)
            return False
        return True

    def rate_limit(self, ex: Exchange) -> bool:
        """Every limit of the route must pass. False: answered (429) or waiting for a shared store."""
        route = ex.route
        assert route is not None
        runtime = self.holder.runtime
        client_ip = runtime.client_ip.of(self.peer_str, ex.forwarded_for)
        store = runtime.limit_store
        if store is not None and store.usable():
            store.begin(route.limiters, ex, client_ip, self._store_decided)
            return False
        rejection = admit(route.limiters, ex, client_ip)
        if rejection is not None:
            self.rate_limited(ex, rejection)
            return False
        return True

    def forward(self, ex: Exchange) -> None:
        """The null phase: route to null, operator switch, open circuit, no available target → the
        backup pool once, else the null answer (or a stale entry); then admission and pick."""
        route = ex.route
        assert route is not None
        pool = route.pool
        if pool is None:
            self.shed(ex, route.null_response, "null_upstream")
            return
        # The pool, else its backup once: forced null, open circuit or no available target skip it.
        chosen: Pool | None = None
        reason = "null_upstream"
        null = pool.null_response
        candidate: Pool | None = pool
        while candidate is not None:
            if not candidate.forced_null:
                cb = candidate.circuit
                if cb is not None and not cb.try_acquire():
                    if reason == "null_upstream" or candidate is pool:
                        reason = "circuit_open"
                        null = candidate.open_response(cb.retry_after_s())
                elif candidate.has_available():
                    ex.cb = cb is not None
                    chosen = candidate
                    break
                else:
                    if cb is not None:
                        cb.release()
                    if candidate is pool:
                        reason = "no_healthy_target"
            candidate = candidate.backup if candidate is pool else None
        if chosen is None:
            self.shed(ex, null, reason)
            return
        ex.pool = chosen
        if chosen.admission is not None and not self.admit(ex, chosen):
            return
        self.pick(ex)

    def admit(self, ex: Exchange, pool: Pool) -> bool:
        """Concurrency cap, bounded queue, adaptive limit. False: shed (503) or queued (waits)."""
        admitted = pool.try_admit(ex)
        if admitted is None:
            return False  # queued: resume_exchange(ex, ADMITTED or SHED) continues it
        if not admitted:
            self.shed(ex, pool.overload_response, pool.shed_reason())
            return False
        return True

    def pick(self, ex: Exchange) -> None:
        """A target (balancer, slow-start weights, caps) and its Attempt permit; then send."""
        pool = ex.pool
        assert pool is not None
        target = pool.pick()
        if target is None:  # every target at its (ramped) cap, or one just became unavailable
            self.shed(ex, pool.overload_response, pool.shed_reason())
            return
        ex.target = target
        attempt = self.permit
        if not attempt.ended:  # still held by an exchange that never settled: never reuse it
            attempt = self.permit = Attempt()
        attempt.arm(pool, target, ex.cb)
        ex.attempt = attempt
        ex.cb = False  # the circuit permit is the attempt's now
        now = self.read_now or _now()  # sent from this read, or later (queued): read afresh
        pool.retry_budget.on_request(now)
        if ex.expect_continue and not ex.request_done:
            self.out(CONTINUE_100)
        self.send(ex, now)

    def send(self, ex: Exchange, now: float = 0.0) -> None:
        """On an idle pooled connection to the attempt's target, or on a new one (the one await)."""
        attempt = ex.attempt
        assert attempt is not None and attempt.pool is not None and attempt.target is not None
        target = attempt.target
        conn = target.take_idle()
        if conn is not None:
            # The pool holds only UpstreamProtocols (typed as their base to keep the pool free of
            # them); the cast makes it a direct call when compiled.
            cast(UpstreamProtocol, conn).send(ex, self, True, now)
        else:
            self.loop.create_task(self._connect(ex, attempt, attempt.generation, attempt.pool, target))

    async def _connect(
        self, ex: Exchange, attempt: Attempt, generation: int, pool: Pool, target: TargetState
    ) -> None:
        """Open a connection for try `generation` of `attempt`; if that try was given up meanwhile
        (the client left, a retry went elsewhere), the connection joins the idle pool instead."""
        route = ex.route
        assert route is not None
        ssl_ctx = pool.ssl_context
        try:
            _, proto = await asyncio.wait_for(
                self.loop.create_connection(
                    # a compiled class cannot derive from asyncio.Protocol; the loop only calls its methods
                    lambda: cast(asyncio.Protocol, UpstreamProtocol(target, self.loop)),
                    target.host,
                    target.port,
                    ssl=ssl_ctx,
                    server_hostname=pool.server_hostname(target) if ssl_ctx is not None else None,
                ),
                route.connect_timeout,
            )
        except TimeoutError:
            target.stats.connect_errors += 1
            if self.active is ex and not ex.settled and attempt.generation == generation:
                self.upstream_failed(ex, http1.GATEWAY_TIMEOUT_CONNECT, "connect_timeout")
            return
        except (OSError, ssl.SSLError):
            target.stats.connect_errors += 1
            if self.active is ex and not ex.settled and attempt.generation == generation:
                self.upstream_failed(ex, http1.BAD_GATEWAY_REFUSED, "connect_failed")
            return
        target.stats.connections_opened += 1
        conn = cast(UpstreamProtocol, proto)
        if self.active is not ex or ex.settled or self.closed or attempt.generation != generation:
            target.put_idle(conn, _now())  # the client left meanwhile: keep the connection
            return
        conn.send(ex, self, reused=False)

    def settle(self, ex: Exchange, status: int, now: float = 0.0) -> None:
        """Exactly once per exchange: its attempt ends (abandoned if nothing ended it), its
        admission slot and cache fill are given back, and it is counted and logged."""
        if ex.settled:
            return
        ex.settled = True
        route = ex.route
        if ex.cb:
            ex.cb = False
            pool = ex.pool
            if pool is not None:
                pool.circuit_outcome(None, 0.0)  # acquired, but no attempt was made (shed after)
        if ex.queued is not None:
            ex.queued.cancel(ex)
        if ex.cache_fill or ex.cache_wait is not None:
            cache_stage.leave_cache(self, ex)
        attempt = ex.attempt
        if attempt is not None and not attempt.ended:
            attempt.abandoned()  # before the slot is released: the waiter it admits picks a target now
        if ex.admitted is not None:
            ex.admitted.release(ex)
        if route is not None:
            route.stats.in_flight -= 1
            duration = (now or _now()) - ex.started
            route.stats.done(status, duration)
            alog = self.holder.access_log
            if alog is not None:
                alog.record(self, ex, status, duration)

    # ---- waits: one way back in -----------------------------------------------------------------
    def resume_exchange(self, ex: Exchange, phase: int) -> None:
        """Continue an exchange that waited, at `phase`; nothing if it is no longer wanted (the
        client left, or it was answered meanwhile: a timeout, a reload's drain)."""
        if self.closed or self.active is not ex or ex.settled:
            if phase == ADMITTED:
                pool = ex.admitted
                if pool is not None:
                    pool.release(ex)  # the slot it was given goes to the next waiter
            return
        if phase == AFTER_RATE_LIMIT:
            cache_stage.cached_or_forward(self, ex)
        elif phase == RATE_LIMITED:
            rejection = ex.canned
            assert rejection is not None
            ex.canned = None
            self.rate_limited(ex, rejection)
        elif phase == AFTER_CACHE:
            cache_stage.after_fill(self, ex)
        elif phase == ADMITTED:
            self.pick(ex)
        else:
            pool = ex.pool
            assert pool is not None
            self.shed(ex, pool.overload_response, pool.shed_reason())

    def _store_decided(self, ex: Exchange, rejection: bytes | None) -> None:
        """A shared store (Redis, or the master of `workers: N`) decided."""
        if rejection is None:
            self.resume_exchange(ex, AFTER_RATE_LIMIT)
        else:
            ex.canned = rejection
            self.resume_exchange(ex, RATE_LIMITED)

    def resume_admitted(self, ex: Exchange) -> None:
        self.resume_exchange(ex, ADMITTED)

    def shed_waiter(self, ex: Exchange, pool: Pool) -> None:
        self.resume_exchange(ex, SHED_WAITER)

    # ---- outcomes that send again ---------------------------------------------------------------
    def try_retry(self, ex: Exchange, cond: str, is_5xx: bool = False) -> bool:
        """Send `ex` to another target if the pool's retry policy and budget allow; True if it did.

        A request that never reached a backend (`connect_failure`: refused, or no connection within
        the connect timeout) always goes to another target while an untried one is available and
        the route's response deadline has not passed, whatever `retry` says: the budget and
        `attempts` bound retries of requests a backend may have seen (retry storms), not a dead
        address turning into client-visible 502s beside a healthy target."""
        attempt = ex.attempt
        if attempt is None or attempt.ended or self.closed or self.active is not ex:
            return False
        pool = attempt.pool
        target = attempt.target
        assert pool is not None and target is not None
        if cond == "connect_failure":
            tried = ex.tried
            if tried is None:
                tried = ex.tried = [target]
            elif target not in tried:
                tried.append(target)
            route = ex.route
            if len(tried) >= len(pool.targets) or (
                route is not None and _now() - ex.started >= route.response_timeout
            ):
                return False
            other = pool.pick(exclude=tried)
            if other is None:
                return False
        else:
            if cond not in pool.retry_on or ex.attempts >= pool.config.retry.attempts:
                return False
            if (
                ex.method not in IDEMPOTENT
                or ex.body_bytes > 0
                or not ex.request_done
                or ex.upgrade is not None
            ):
                return False
            other = pool.pick(exclude=[target])
            if other is None or not pool.retry_budget.try_retry():
                return False
            ex.attempts += 1
        circuit = attempt.retried(is_5xx)
        up = ex.upstream
        if up is not None:
            up.abandon()
            ex.upstream = None
        ex.target = other
        attempt.arm(pool, other, circuit)
        ex.sent_head = False
        self.send(ex)
        return True

    def retry_fresh(self, ex: Exchange) -> None:
        """A pooled connection died before answering and nothing irreplaceable was sent: the same
        attempt, once more, on a new connection."""
        attempt = ex.attempt
        assert attempt is not None and attempt.pool is not None and attempt.target is not None
        ex.upstream = None
        ex.sent_head = False
        ex.replayable = False  # at most one such retry
        self.loop.create_task(self._connect(ex, attempt, attempt.generation, attempt.pool, attempt.target))

    def upstream_failed(self, ex: Exchange, response: http1.Canned, reason: str) -> None:
        """The upstream could not produce a response head: retry elsewhere, or answer with an error."""
        ex.upstream = None
        attempt = ex.attempt
        if attempt is not None and attempt.target is not None and reason == "response_timeout":
            attempt.target.stats.timeouts += 1  # connect timeouts are counted as connect errors
        cond = _RETRY_COND.get(reason)
        if cond is not None and ex.status == 0 and self.try_retry(ex, cond):
            return
        stale = cache_stage.can_serve_stale(self, ex)
        if attempt is not None and not attempt.ended:
            attempt.failed(_now() - ex.sent_at)
        # stale-if-error after the failure was counted: a cache hiding an outage must not keep the
        # circuit from opening.
        if stale and cache_stage.serve_stale(self, ex, "error"):
            return
        if ex.status != 0:
            self.abort()
            return
        self.local(ex, response, close=not ex.request_done)

    # ---- local answers --------------------------------------------------------------------------
    def local(self, ex: Exchange, response: http1.Canned, close: bool = False) -> None:
        """Answer with a canned response (its Connection: close variant when closing)."""
        if close or not ex.request_done:
            ex.keep_alive = False if close else ex.keep_alive
        ex.canned = response.pick(close or not ex.keep_alive, ex.head_only)
        ex.status = response.status
        self.answer_local(ex)

    def shed(self, ex: Exchange, response: http1.Canned, reason: str) -> None:
        """Refused before any upstream work (null, circuit, overload): counted under `reason`."""
        route = ex.route
        if route is not None:
            route.stats.count_shed(reason)
        ex.shed_reason = reason
        if ex.stale_entry is not None and cache_stage.serve_stale(self, ex, reason):
            return
        self.local(ex, response)

    def rate_limited(self, ex: Exchange, rejection: bytes) -> None:
        """Answer a rejection. Every store builds it (`Connection: close` or not) from `ex` in the
        same step that calls this, so `ex.keep_alive` already agrees with it: no scan of the answer."""
        route = ex.route
        assert route is not None
        route.stats.count_shed("rate_limited")
        ex.shed_reason = "rate_limited"
        ex.canned = rejection
        if not ex.request_done:
            ex.keep_alive = False
        self.answer_local(ex)
