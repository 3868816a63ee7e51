"""Runtime state of upstream pools: targets, idle keep-alive connections, balancing.

A `Pool` is rebuilt on reload, but `TargetState` objects of unchanged targets are carried over
by (upstream, address) so their pooled connections and counters survive.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from typing import TYPE_CHECKING, Any, Final

from gateway import http1
from gateway.config.model import Upstream, parse_address
from gateway.observe import log
from gateway.observe.stats import TargetStats, target_stats
from gateway.policy.adaptive import GradientLimit, WindowedLimit
from gateway.policy.admission import ADAPTIVE_LIFO, FIFO, Admission
from gateway.policy.balancer import LeastRequestP2C, SmoothWeightedRoundRobin
from gateway.policy.circuit import CircuitBreaker
from gateway.policy.health import HealthState
from gateway.policy.outlier import OutlierPool, OutlierState
from gateway.policy.retry_budget import RetryBudget
from gateway.policy.slow_start import SlowStart as SlowStartState
from gateway.tls import client_context

if TYPE_CHECKING:
    from collections.abc import Callable


class Pooled:
    """An upstream connection as the pool and the client side see it. A compiled base class rather
    than a Protocol: compiled, the pool reads and writes these fields of UpstreamProtocol directly,
    and the client side's calls are direct (vtable) calls, without importing the connection."""

    __slots__ = ("closed", "head_written", "idle_since")

    def __init__(self) -> None:
        self.closed = False
        self.idle_since = 0.0
        self.head_written = False  # the response head went to the client: a failure is a cut now

    def close(self) -> None:
        self.closed = True

    def abandon(self) -> None:
        """Give up on this connection mid-exchange (client gone, timeout): never reuse it."""
        raise NotImplementedError

    def write_body(self, data: bytes, chunked: bool) -> None:
        raise NotImplementedError

    def write_raw(self, data: bytes) -> None:
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def response_timeout(self) -> None:
        """No response head within the route's response timeout (the listener's sweep)."""
        raise NotImplementedError


class TargetState:
    """One backend instance: address, weight, idle connections, in-flight count."""

    __slots__ = (
        "address",
        "drained",
        "ejected",
        "fast_head",
        "full_cap",
        "head_memo",
        "health",
        "healthy",
        "host",
        "idle",
        "in_flight",
        "last_check",
        "max_idle",
        "outlier",
        "port",
        "slow_start",
        "stats",
        "upstream",
        "weight",
    )

    def __init__(self, upstream: str, address: str, weight: int, max_idle: int) -> None:
        self.upstream = upstream
        self.address = address
        self.host, self.port = parse_address(address, "address")
        self.weight = weight
        self.max_idle = max_idle
        # A list, not a deque: append/pop at the end are compiled list operations (a deque's are
        # method calls); the sweep that removes from the front runs a few times a minute.
        self.idle: list[Pooled] = []
        self.in_flight = 0
        # The last response head block seen from this target and what the proxy made of it
        # (block, forwarded lines, Content-Length, Connection tokens): a backend repeats the same
        # head (only Date changes, once a second), so most heads skip the scan (UpstreamProtocol).
        self.head_memo: tuple[bytes, bytes, bytes | None, list[bytes] | None] | None = None
        # The last whole plain 2xx response head with a Content-Length seen from this target, as
        # (raw head, the head the client got, body length, status): a response that repeats it byte
        # for byte and arrives whole in one read is answered without the parser (UpstreamProtocol).
        self.fast_head: tuple[bytes, bytes, int, int] | None = None
        self.healthy = True
        self.drained = False
        self.ejected = False
        self.health: HealthState | None = None
        self.outlier: OutlierState | None = None
        self.last_check: dict[str, object] | None = None
        self.slow_start: SlowStartState | None = None
        self.full_cap: int | None = None  # concurrency cap once fully ramped (None: uncapped)
        self.stats: TargetStats = target_stats(upstream, address)

    def __repr__(self) -> str:
        return (
            f"<Target {self.address} w={self.weight} in_flight={self.in_flight} idle={len(self.idle)}"
            f"{'' if self.healthy else ' unhealthy'}{' drained' if self.drained else ''}>"
        )

    @property
    def available(self) -> bool:
        return self.healthy and not self.drained and not self.ejected

    @property
    def state(self) -> str:
        if self.drained:
            return "drained"
        if not self.healthy:
            return "unhealthy"
        if self.ejected:
            return "ejected"
        return "healthy"

    def take_idle(self) -> Pooled | None:
        idle = self.idle
        while idle:
            conn = idle.pop()  # LIFO: the most recently used connection is the least likely stale
            if not conn.closed:
                return conn
        return None

    def put_idle(self, conn: Pooled, now: float) -> None:
        if len(self.idle) >= self.max_idle or self.drained:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def close_idle_older_than(self, deadline: float) -> None:
        idle = self.idle
        stale = 0
        while stale < len(idle) and (idle[stale].closed or idle[stale].idle_since < deadline):
            stale += 1
        if stale:
            gone = idle[:stale]
            del idle[:stale]
            for conn in gone:
                conn.close()

    def close_all_idle(self) -> None:
        while self.idle:
            self.idle.pop().close()


IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class Pool:
    """A named upstream: targets, balancer, and the fail-fast machinery around them.

    Circuit breaker, outlier ejection and retry budget are pure policies (gateway/policy/); this
    class only feeds them outcomes and turns their decisions into target availability.
    """

    __slots__ = (
        "_any_available",
        "_lr",
        "_open_responses",
        "_outlier_pool",
        "_rr",
        "_timer",
        "_weights",
        "adaptive",
        "admission",
        "backup",
        "capped",
        "circuit",
        "clock",
        "config",
        "forced_null",
        "loop",
        "name",
        "null_response",
        "overload_response",
        "ramp_limited",
        "ramping",
        "retry_budget",
        "retry_on",
        "retry_statuses",
        "ssl_context",
        "targets",
    )

    def __init__(
        self,
        name: str,
        config: Upstream,
        previous: dict[str, TargetState] | None = None,
        rng: random.Random | None = None,
        previous_pool: Pool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.forced_null = False  # the operator's manual switch: all traffic to the null upstream
        self.backup: Pool | None = None  # resolved by the Runtime once every pool exists
        # TLS to the targets (None = plain TCP); built from the upstream's `tls` settings.
        self.ssl_context: ssl.SSLContext | None = client_context(config.tls)
        previous = previous or {}
        old_cfg = previous_pool.config if previous_pool is not None else None
        self.targets: list[TargetState] = []
        for t in config.targets:
            state = previous.get(t.address)
            if state is None:
                state = TargetState(name, t.address, t.weight, config.keepalive)
            else:
                state.weight = t.weight
                state.max_idle = config.keepalive
            hc = config.health_check
            if hc is None:
                state.health = None
                state.healthy = True
            elif state.health is None or old_cfg is None or old_cfg.health_check != hc:
                state.health = HealthState(
                    hc.healthy_threshold, hc.unhealthy_threshold, healthy=state.healthy
                )
            pc = config.passive
            if pc is None:
                state.outlier = None
                state.ejected = False
            elif state.outlier is None or old_cfg is None or old_cfg.passive != pc:
                state.outlier = OutlierState(
                    pc.consecutive_failures, pc.ejection_time, pc.max_ejection_time, clock
                )
                state.ejected = False
            self.targets.append(state)
        self._outlier_pool = OutlierPool(config.passive.max_ejection_percent) if config.passive else None
        self._setup_slow_start(previous, previous_pool)
        self._setup_admission(previous_pool)
        cb = config.circuit_breaker
        if cb is None:
            self.circuit: CircuitBreaker | None = None
        elif previous_pool is not None and old_cfg is not None and old_cfg.circuit_breaker == cb:
            self.circuit = previous_pool.circuit
        else:
            self.circuit = CircuitBreaker(
                cb.failure_ratio,
                cb.min_requests,
                cb.window,
                cb.open_for,
                cb.half_open_requests,
                clock,
                max_open_for_s=cb.max_open_for,
                latency_threshold_s=cb.latency_threshold,
            )
            self.circuit.on_transition(self._log_circuit)
        r = config.retry
        if previous_pool is not None and old_cfg is not None and old_cfg.retry == r:
            self.retry_budget: RetryBudget = previous_pool.retry_budget
        else:
            self.retry_budget = RetryBudget(r.budget / 100.0, r.min_retries, 10.0, clock)
        self.retry_on = frozenset(r.on)
        self.retry_statuses = frozenset(int(x) for x in r.on if x.isdigit())
        assert all(x >= 500 for x in self.retry_statuses)  # retries_status answers a 2xx without a lookup
        self._open_responses: dict[int, http1.Canned] = {}
        self.null_response = self._null_answer(config.null_response.retry_after)
        p2c = config.balance == "least_request"
        self._lr = LeastRequestP2C(rng or random.Random()) if p2c else None
        self._rr = None if p2c else SmoothWeightedRoundRobin(len(self.targets))
        self._weights: list[float] = []
        self._any_available = False
        self.refresh()

    def __repr__(self) -> str:
        null = " NULL" if self.forced_null else ""
        return (
            f"<Pool {self.name}{null} circuit={self.circuit!r} admission={self.admission!r} {self.targets!r}>"
        )

    def _setup_slow_start(self, previous: dict[str, TargetState], previous_pool: Pool | None) -> None:
        """Per-target ramp clocks (carried over reloads) and fully-ramped concurrency caps."""
        config = self.config
        ss = config.slow_start
        starting = previous_pool is None
        total_weight = sum(t.weight for t in config.targets)
        for tc, state in zip(config.targets, self.targets, strict=True):
            if tc.max_in_flight is not None:
                state.full_cap = tc.max_in_flight
            elif config.max_in_flight is not None:
                state.full_cap = max(1, -(-config.max_in_flight * tc.weight // total_weight))
            else:
                state.full_cap = None
            if ss is None:
                state.slow_start = None
                continue
            fresh = tc.address not in previous
            if state.slow_start is None or fresh:
                state.slow_start = SlowStartState(
                    ss.window, ss.aggression, ss.min_weight_percent / 100.0, self.clock
                )
                if fresh and (ss.on_start or not starting):
                    state.slow_start.restart()
        self.capped = any(t.full_cap is not None for t in self.targets)
        self.ramping = any(t.slow_start is not None and t.slow_start.in_ramp() for t in self.targets)
        self.ramp_limited = False

    def _setup_admission(self, previous_pool: Pool | None) -> None:
        config = self.config
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        ad = config.adaptive
        if ad is None:
            self.adaptive: WindowedLimit | None = None
        elif (
            previous_pool is not None
            and previous_pool.adaptive is not None
            and previous_pool.config.adaptive == ad
        ):
            self.adaptive = previous_pool.adaptive
        else:
            self.adaptive = WindowedLimit(
                GradientLimit(ad.initial, ad.min, ad.max, ad.smoothing, rtt_tolerance=ad.rtt_tolerance),
                self.clock,
                min_window_s=ad.window,
                max_window_s=max(ad.window, 1.0),
            )
        q = config.queue
        if config.max_in_flight is None and ad is None and not self.capped and q is None:
            self.admission: Admission[Any] | None = None
        else:
            self.admission = Admission(
                limit=config.max_in_flight or (ad.initial if ad is not None else 1 << 30),
                queue_size=q.size if q is not None else 0,
                queue_timeout_s=q.timeout if q is not None else 1.0,  # no queue: never used, must be > 0
                clock=self.clock,
                mode=(ADAPTIVE_LIFO if q.mode == "adaptive_lifo" else FIFO) if q is not None else FIFO,
                codel_target_s=q.codel_target if q is not None else 0.005,
                codel_interval_s=q.codel_interval if q is not None else 0.1,
            )
            if previous_pool is not None and previous_pool.admission is not None:
                self.admission.in_flight = (
                    previous_pool.admission.in_flight
                )  # in-flight work still holds slots
        self.overload_response = http1.Canned(
            503,
            b"503 Service Unavailable: upstream at capacity, request shed\n",
            extra=((b"Retry-After", b"1"),),
        )
        self.update_limits()

    def update_limits(self) -> None:
        """Recompute the admission limit from max_in_flight, the adaptive limit and ramped target caps."""
        adm = self.admission
        ramping = False
        for t in self.targets:
            ss = t.slow_start
            if ss is not None and ss.in_ramp():
                ramping = True
        self.ramping = ramping
        if adm is None:
            return
        limits: list[int] = []
        if self.config.max_in_flight is not None:
            limits.append(self.config.max_in_flight)
        if self.adaptive is not None:
            limits.append(self.adaptive.limit)
        ramp_limited = False
        if self.capped:
            total = 0
            full = 0
            for t in self.targets:
                if t.available and t.full_cap is not None:
                    total += self.cap_of(t)
                    full += t.full_cap
            limits.append(max(1, total))
            ramp_limited = total < full and total <= min(limits)
        self.ramp_limited = ramp_limited
        adm.limit = max(1, min(limits)) if limits else 1 << 30

    def cap_of(self, t: TargetState) -> int:
        full = t.full_cap
        if full is None:
            return 1 << 30
        ss = t.slow_start
        return ss.cap(full) if ss is not None and ss.in_ramp() else full

    def shed_reason(self) -> str:
        return "slow_start" if self.ramp_limited else "overloaded"

    def restart_slow_start(self, target: TargetState) -> None:
        if target.slow_start is not None:
            target.slow_start.restart()
            self.ramping = True
            self.update_limits()

    def on_sample(self, latency_s: float, dropped: bool) -> None:
        """Feed the adaptive limit with one completed exchange."""
        ad = self.adaptive
        adm = self.admission
        if ad is not None and adm is not None:
            ad.on_sample(latency_s, adm.in_flight, dropped)
            self.update_limits()

    # ---- admission queue (waiters are Exchanges; `ex.client` resumes or sheds them) ----------------
    def try_admit(self, ex: Any) -> bool | None:
        """True: admitted now. False: shed now (caller answers). None: queued, resumed later."""
        adm = self.admission
        assert adm is not None
        if adm.try_acquire(ex.priority):
            ex.admitted = self
            return True
        if adm.queue_size <= 0:
            return False
        queued = True
        for w in adm.enqueue(ex, ex.priority):
            if w is ex:
                queued = False
            else:
                w.queued = None
                w.client.shed_waiter(w, self)
        if queued:
            ex.queued = self
            self._arm()
            return None
        return False

    def release(self, ex: Any) -> None:
        ex.admitted = None
        adm = self.admission
        if adm is None:
            return
        w, shed = adm.release()
        self._settle_waiters([w] if w is not None else [], shed)

    def cancel(self, ex: Any) -> None:
        ex.queued = None
        if self.admission is not None:
            self.admission.cancel(ex)

    def pump(self) -> None:
        adm = self.admission
        if adm is not None and adm.queued:
            admitted, shed = adm.pump()
            self._settle_waiters(admitted, shed)

    def _settle_waiters(self, admitted: list[Any], shed: list[Any]) -> None:
        for w in shed:
            w.queued = None
            w.client.shed_waiter(w, self)
        for w in admitted:
            w.queued = None
            w.admitted = self
            w.client.resume_admitted(w)
        if shed or admitted:
            self._arm()

    def _arm(self) -> None:
        """One timer per pool at the earliest queue deadline, so waiters are shed on time."""
        adm = self.admission
        if adm is None:
            return
        deadline = adm.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is None:
            return
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self._timer = self.loop.call_later(max(0.0, deadline - self.clock()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        adm = self.admission
        if adm is not None:
            self._settle_waiters([], adm.expire())
            self._arm()

    def server_hostname(self, target: TargetState) -> str:
        """SNI and certificate name for TLS to `target` (the configured name, else its host)."""
        tls = self.config.tls
        if tls is not None and tls.server_name:
            return tls.server_name
        return target.host

    def open_response(self, retry_after_s: float) -> http1.Canned:
        """The null answer while the circuit is open: Retry-After is the time left open."""
        secs = max(1, int(retry_after_s + 0.999))
        r = self._open_responses.get(secs)
        if r is None:
            r = self._open_responses[secs] = self._null_answer(secs)
        return r

    def _null_answer(self, retry_after: int) -> http1.Canned:
        """The configured null_response with the given Retry-After."""
        nr = self.config.null_response
        return http1.Canned(
            nr.status,
            nr.body.encode(),
            nr.content_type.encode(),
            extra=((b"Retry-After", b"%d" % retry_after),),
        )

    def _log_circuit(self, old: str, new: str) -> None:
        log.event("circuit", upstream=self.name, old=old, new=new)

    def refresh(self) -> None:
        """Recompute effective weights after any availability change (health, drain, ejection)."""
        self._weights = [float(t.weight) if t.available else 0.0 for t in self.targets]
        self._any_available = any(w > 0 for w in self._weights)

    def pick(self, exclude: list[TargetState] | None = None) -> TargetState | None:
        """A target for the next exchange (None: none can take it); never one in `exclude`."""
        weights = self._weights
        if self.ramping or self.capped:
            # Ramped weights and concurrency caps change with time and load: computed per pick.
            weights = [
                (w * t.slow_start.fraction() if t.slow_start is not None else w)
                if w > 0 and (t.full_cap is None or t.in_flight < self.cap_of(t))
                else 0.0
                for t, w in zip(self.targets, weights, strict=True)
            ]
        if exclude is not None:
            weights = [0.0 if t in exclude else w for t, w in zip(self.targets, weights, strict=True)]
        if len(self.targets) == 1:
            t = self.targets[0]
            return t if weights[0] > 0 else None
        if self._rr is not None:
            i = self._rr.pick(weights)
        else:
            assert self._lr is not None
            i = self._lr.pick(weights, [t.in_flight for t in self.targets])
        return self.targets[i] if i >= 0 else None

    def retries_status(self, status: int) -> bool:
        """Whether a response with `status` is retried (`retry.on`); retried statuses are all 5xx."""
        return status >= 500 and status in self.retry_statuses

    def has_available(self) -> bool:
        return self._any_available

    def target(self, address: str) -> TargetState | None:
        for t in self.targets:
            if t.address == address:
                return t
        return None

    # ---- outcomes ---------------------------------------------------------------------------------
    def on_success(self, target: TargetState) -> None:
        o = target.outlier
        if o is not None:
            o.on_success()

    def on_failure(self, target: TargetState, is_5xx: bool = False) -> None:
        """A failed exchange with `target`: feed outlier detection (5xx only if configured)."""
        o = target.outlier
        pc = self.config.passive
        if o is None or pc is None or (is_5xx and not pc.on_5xx):
            return
        if o.on_failure() and not target.ejected:
            ejected_now = sum(1 for t in self.targets if t.ejected)
            assert self._outlier_pool is not None
            if self._outlier_pool.may_eject(ejected_now, len(self.targets)):
                duration = o.eject()
                target.ejected = True
                self.refresh()
                log.event(
                    "ejected",
                    upstream=self.name,
                    target=target.address,
                    for_s=duration,
                    ejections=o.ejections,
                )

    def circuit_outcome(self, ok: bool | None, latency_s: float, is_5xx: bool = False) -> None:
        """Report one circuit-acquired request: True success, False failure, None neither (client left)."""
        cb = self.circuit
        if cb is None:
            return
        if ok is None:
            cb.release()
        elif ok or (
            is_5xx and self.config.circuit_breaker is not None and not self.config.circuit_breaker.on_5xx
        ):
            cb.on_success(latency_s)
        else:
            cb.on_failure()

    def set_health(self, target: TargetState, healthy: bool) -> None:
        if target.healthy != healthy:
            target.healthy = healthy
            self.refresh()
            if healthy:
                self.restart_slow_start(target)  # a recovered instance is fresh: ramp it
            else:
                self.update_limits()
            log.event("health", upstream=self.name, target=target.address, healthy=healthy)

    def set_drained(self, target: TargetState, drained: bool) -> None:
        """Operator drain: no new requests to `target`; undraining makes it fresh (slow start)."""
        if target.drained == drained:
            return
        target.drained = drained
        if drained:
            target.close_all_idle()
        self.refresh()
        if not drained:
            self.restart_slow_start(target)
        else:
            self.update_limits()

    def sweep(self, now: float) -> None:
        deadline = now - self.config.keepalive_timeout
        changed = False
        for t in self.targets:
            t.close_idle_older_than(deadline)
            if t.ejected and t.outlier is not None and not t.outlier.is_ejected():
                t.outlier.check_returned()
                t.ejected = False
                changed = True
                if t.slow_start is not None:
                    t.slow_start.restart()
                log.event("returned", upstream=self.name, target=t.address)
        if changed:
            self.refresh()
        if changed or self.ramping or self.adaptive is not None:
            self.update_limits()
            self.pump()


def carry_over(pools: dict[str, Pool]) -> Callable[[str], dict[str, TargetState]]:
    """Previous targets by address for an upstream name, for rebuilding pools on reload."""

    def lookup(name: str) -> dict[str, TargetState]:
        pool = pools.get(name)
        return {t.address: t for t in pool.targets} if pool else {}

    return lookup
