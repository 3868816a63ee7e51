"""Slow start: ramp a fresh target's weight (and concurrency cap) up over a window.

Rules (Envoy's slow_start_config curve):
- ``f = (elapsed / window) ** (1 / aggression)``, floored at ``min_fraction`` and clipped to
  ``[min_fraction, 1.0]``.  ``aggression == 1`` is linear; larger values ramp faster early.
- ``elapsed >= window`` or ``window <= 0`` gives 1.0; ``elapsed < 0`` gives ``min_fraction``.
- A SlowStart starts finished (full weight) until ``restart()`` marks its target fresh.  Once
  the window has passed it latches a flag, so ``fraction()`` is one attribute read from then on.
- Time comes from the injected monotonic ``clock``; this module never reads the time itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

# Absorbs float noise so that e.g. ceil(100 * 0.3) is 30, not 31.
_CAP_EPS = 1e-9


def ramp_fraction(elapsed_s: float, window_s: float, aggression: float, min_fraction: float) -> float:
    """Fraction of full weight a target gets ``elapsed_s`` into a ``window_s`` slow-start ramp."""
    if window_s <= 0 or elapsed_s >= window_s:
        return 1.0
    floor = min(1.0, max(0.0, min_fraction))
    if elapsed_s <= 0:
        return floor
    if aggression <= 0:
        raise ValueError(f"aggression must be > 0 (got {aggression})")
    f: float = (elapsed_s / window_s) ** (1.0 / aggression)
    return min(1.0, max(floor, f))


class SlowStart:
    """Ramp state for one target."""

    __slots__ = ("_aggression", "_clock", "_done", "_min_fraction", "_start", "_window")

    def __init__(
        self, window_s: float, aggression: float, min_fraction: float, clock: Callable[[], float]
    ) -> None:
        if aggression <= 0:
            raise ValueError(f"aggression must be > 0 (got {aggression})")
        self._window = window_s
        self._aggression = aggression
        self._min_fraction = min_fraction
        self._clock = clock
        self._start = 0.0
        self._done = True

    def restart(self) -> None:
        """The target became fresh now: start ramping from ``min_fraction``."""
        self._start = self._clock()
        self._done = self._window <= 0

    def finish(self) -> None:
        """Skip the ramp: full weight from now on."""
        self._done = True

    def fraction(self) -> float:
        """Current ramp fraction; 1.0 once the ramp is done."""
        if self._done:
            return 1.0
        elapsed = self._clock() - self._start
        if elapsed >= self._window:
            self._done = True
            return 1.0
        return ramp_fraction(elapsed, self._window, self._aggression, self._min_fraction)

    def in_ramp(self) -> bool:
        """True while the target is still ramping up."""
        return self.fraction() < 1.0

    def cap(self, full_cap: int) -> int:
        """Concurrency cap ramped with the weight: ``max(1, ceil(full_cap * fraction()))``."""
        f = self.fraction()
        if f >= 1.0:
            return max(1, full_cap)
        return max(1, math.ceil(full_cap * f - _CAP_EPS))

    def __repr__(self) -> str:
        if self._done:
            return f"SlowStart(window_s={self._window:g}, done)"
        return (
            f"SlowStart(window_s={self._window:g}, aggression={self._aggression:g}, "
            f"started_at={self._start:g}, fraction={self.fraction():.3f})"
        )
