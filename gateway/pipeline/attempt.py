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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr

if TYPE_CHECKING:
    from gateway.cluster.pool import Pool, TargetState


class AttemptEnded(Exception):
    """An attempt was ended a second time."""


# Compiled, one freed instance is kept for the next: an attempt per request costs no allocation.
@mypyc_attr(free_list_len=1)
class Attempt:
    __slots__ = ("circuit", "ended", "pool", "target")

    def __init__(self, pool: Pool, target: TargetState, circuit: bool) -> None:
        self.pool = pool
        self.target = target
        self.circuit = circuit  # holds the pool's circuit-breaker permit (judged at the end)
        self.ended = False
        target.in_flight += 1

    def __repr__(self) -> str:
        flags = (" circuit" if self.circuit else "") + (" ended" if self.ended else "")
        return f"<Attempt {self.target.address}{flags}>"

    def _end(self) -> None:
        if self.ended:
            raise AttemptEnded(f"{self!r} ended twice")
        self.ended = True
        self.target.in_flight -= 1

    def answered(self, status: int, latency_s: float) -> None:
        self._end()
        target = self.target
        s = target.stats
        s.count(status)
        s.duration.observe(latency_s)
        pool = self.pool
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
        self._end()
        pool = self.pool
        pool.on_failure(self.target)
        if pool.adaptive is not None:
            pool.on_sample(latency_s, True)
        if self.circuit:
            self.circuit = False
            pool.circuit_outcome(False, 0.0)

    def retried(self, is_5xx: bool) -> bool:
        """End as a failure of this target only; returns the circuit permit for the next attempt."""
        self._end()
        self.pool.on_failure(self.target, is_5xx)
        circuit = self.circuit
        self.circuit = False
        return circuit

    def abandoned(self) -> None:
        self._end()
        if self.circuit:
            self.circuit = False
            self.pool.circuit_outcome(None, 0.0)
