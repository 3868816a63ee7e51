"""One try of an exchange on one target, as a permit that is ended exactly once.

Netflix concurrency-limits' `Limiter.Listener` is the model: the permit is made when a target is
picked (it counts the target's in-flight request) and ended exactly once, as

- `answered(status, latency)`: a response came: the target's status and latency counters,
  outlier ejection (a 5xx is a failure where configured, anything else a success), the circuit
  breaker and the adaptive limit all get this one outcome;
- `failed(latency)`: no response (connect failure, timeout, reset, invalid answer): a failure for
  ejection, the circuit and the adaptive limit (a dropped sample);
- `retried(is_5xx)`: a failure for ejection only; the circuit permit passes to the next attempt
  (`next_circuit`), which is judged instead;
- `abandoned()`: the client left, or the exchange was answered otherwise (a stale entry): the
  circuit permit is released unjudged.

Every end gives back the target's in-flight slot. A second end is a bug in the caller and is
refused (AttemptEnded): each outcome must reach the policies once, never twice or not at all.

A client connection has one exchange in flight at a time, so it owns one Attempt and arms it
(`arm`) for each try: a permit per request without an allocation per request (the allocation was
most of the permit's cost per request). `generation` tells a try from the one armed after it, for
a connect that completes after its try was given up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.cluster.pool import Pool, TargetState


class AttemptEnded(Exception):
    """An attempt was ended a second time."""


class Attempt:
    __slots__ = ("circuit", "ended", "generation", "pool", "target")

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self.target: TargetState | None = None
        self.circuit = False  # holds the pool's circuit-breaker permit (judged at the end)
        self.ended = True  # not armed
        self.generation = 0

    def arm(self, pool: Pool, target: TargetState, circuit: bool) -> None:
        """Start a try on `target` (counted in its in-flight requests); the last try must have ended."""
        if not self.ended:
            raise AttemptEnded(f"{self!r} armed again before it ended")
        self.pool = pool
        self.target = target
        self.circuit = circuit
        self.ended = False
        self.generation += 1
        target.in_flight += 1

    def __repr__(self) -> str:
        flags = (" circuit" if self.circuit else "") + (" ended" if self.ended else "")
        return f"<Attempt {self.target.address if self.target is not None else '-'}{flags}>"

    def _end(self) -> tuple[Pool, TargetState]:
        pool = self.pool
        target = self.target
        if self.ended or pool is None or target is None:
            raise AttemptEnded(f"{self!r} ended twice")
        self.ended = True
        target.in_flight -= 1
        return pool, target

    def answered(self, status: int, latency_s: float) -> None:
        pool, target = self._end()
        s = target.stats
        s.count(status)
        s.duration.observe(latency_s)
        is_5xx = status >= 500
        if is_5xx:
            pool.on_failure(target, True)
        elif target.outlier is not None:
            pool.on_success(target)
        if self.circuit:
            self.circuit = False
            pool.circuit_outcome(not is_5xx, latency_s, is_5xx)
        if pool.adaptive is not None:
            pool.on_sample(latency_s, is_5xx)

    def failed(self, latency_s: float) -> None:
        pool, target = self._end()
        pool.on_failure(target)
        if pool.adaptive is not None:
            pool.on_sample(latency_s, True)
        if self.circuit:
            self.circuit = False
            pool.circuit_outcome(False, 0.0)

    def retried(self, is_5xx: bool) -> bool:
        """End as a failure of this target only; returns the circuit permit for the next attempt."""
        pool, target = self._end()
        pool.on_failure(target, is_5xx)
        circuit = self.circuit
        self.circuit = False
        return circuit

    def abandoned(self) -> None:
        pool, _ = self._end()
        if self.circuit:
            self.circuit = False
            pool.circuit_outcome(None, 0.0)
