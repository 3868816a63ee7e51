"""Adaptive concurrency limits computed from latency samples (Netflix concurrency-limits style).

Theory of operation:
- These classes only compute a number; enforcing it (e.g. ``Admission.limit = algo.limit``) is the
  caller's business.  The caller reports every finished request with ``on_sample(rtt_s, in_flight,
  dropped)``, where ``in_flight`` is the concurrency when the request was sent (or finished) and
  ``dropped`` means it failed in a way that signals overload (timeout, 503, connection refused).
- ``GradientLimit`` (Netflix ``Gradient2Limit``) keeps a float estimate; ``limit`` is its integer
  part, always within ``[min_limit, max_limit]``.  For a non-dropped sample:
  * short RTT = the sample itself; long RTT = average of the first 10 samples, then an exponential
    average with factor ``2 / (long_window + 1)``;
  * if ``long / short > 2`` (latency recovered after a long overload) the long RTT is decayed by
    ``0.95`` for the next samples, so it does not hold the limit up for ``long_window`` samples;
  * ``gradient = max(0.5, min(1.0, rtt_tolerance * long / short))``: 1 means no queueing, and one
    sample can at most halve the target;
  * ``target = estimate * gradient + queue_size(limit)`` (default ``sqrt(limit)``), then
    ``estimate = estimate * (1 - smoothing) + target * smoothing``;
  * app-limited guard: when ``in_flight < estimate / 2`` the estimate may shrink but never grows
    (low latency at low load proves nothing about higher load).
  A dropped sample multiplies the estimate by ``backoff_ratio`` (default 0.9; Gradient2 itself
  ignores drops) and its RTT is not fed into the averages.  Non-positive or non-finite RTTs of
  non-dropped samples are ignored.  Fixed point: ``estimate * (1 - gradient) == queue_size``;
  while latency stays within ``rtt_tolerance`` of the long RTT (gradient 1) there is none, so a
  used limit grows by about ``smoothing * sqrt(limit)`` per sample until the app-limited guard
  (at about twice the concurrency actually used) or ``max_limit`` stops it.
- ``AIMDLimit`` (Netflix ``AIMDLimit``): on a drop or an RTT above ``timeout_s``,
  ``limit = int(limit * backoff_ratio)`` (so it always falls by at least 1 while above
  ``min_limit``); otherwise, if ``in_flight * 2 >= limit``, ``limit += 1``.  Clamped likewise.
- Pure and deterministic: no clock, no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final, Protocol

_WARMUP: Final = 10  # long-RTT samples averaged plainly before the exponential average starts
_DRIFT_RATIO: Final = 2.0
_DRIFT_DECAY: Final = 0.95


class LimitAlgorithm(Protocol):
    """What an enforcement layer needs from a limit algorithm."""

    @property
    def limit(self) -> int: ...

    def on_sample(self, rtt_s: float, in_flight: int, dropped: bool) -> int: ...


def _check_bounds(initial_limit: int, min_limit: int, max_limit: int, backoff_ratio: float) -> None:
    if min_limit < 1 or max_limit < min_limit:
        raise ValueError(f"need 1 <= min_limit <= max_limit (got {min_limit}, {max_limit})")
    if not min_limit <= initial_limit <= max_limit:
        raise ValueError(f"initial_limit {initial_limit} outside [{min_limit}, {max_limit}]")
    if not 0.0 < backoff_ratio < 1.0:
        raise ValueError(f"backoff_ratio must be in (0, 1) (got {backoff_ratio})")


def _sqrt_queue(limit: int) -> float:
    return math.sqrt(limit)


class GradientLimit:
    """Gradient2: grow while short-term latency stays near the long-term average, shrink when it rises."""

    __slots__ = (
        "_estimate",
        "_long_count",
        "_long_factor",
        "_long_rtt",
        "_queue_size",
        "backoff_ratio",
        "max_limit",
        "min_limit",
        "rtt_tolerance",
        "smoothing",
    )

    def __init__(
        self,
        initial_limit: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        smoothing: float = 0.2,
        long_window: int = 600,
        rtt_tolerance: float = 1.5,
        queue_size: Callable[[int], float] | None = None,
        backoff_ratio: float = 0.9,
    ) -> None:
        _check_bounds(initial_limit, min_limit, max_limit, backoff_ratio)
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1] (got {smoothing})")
        if long_window < 1:
            raise ValueError(f"long_window must be >= 1 (got {long_window})")
        if not rtt_tolerance >= 1.0:
            raise ValueError(f"rtt_tolerance must be >= 1 (got {rtt_tolerance})")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.smoothing = smoothing
        self.rtt_tolerance = rtt_tolerance
        self.backoff_ratio = backoff_ratio
        self._queue_size = _sqrt_queue if queue_size is None else queue_size
        self._estimate = float(initial_limit)
        self._long_factor = 2.0 / (long_window + 1)
        self._long_rtt = 0.0
        self._long_count = 0

    @property
    def limit(self) -> int:
        return int(self._estimate)

    @property
    def estimate(self) -> float:
        """The unrounded limit."""
        return self._estimate

    @property
    def long_rtt_s(self) -> float:
        """The long-term RTT average (0 before the first sample)."""
        return self._long_rtt

    def on_sample(self, rtt_s: float, in_flight: int, dropped: bool) -> int:
        """Account one finished request; returns the new limit."""
        estimate = self._estimate
        if dropped:
            return self._set(estimate * self.backoff_ratio)
        if not (rtt_s > 0.0 and math.isfinite(rtt_s)):
            return int(estimate)
        queue = self._queue_size(int(estimate))
        long_rtt = self._add_long(rtt_s)
        if long_rtt / rtt_s > _DRIFT_RATIO:
            self._long_rtt = long_rtt * _DRIFT_DECAY
        gradient = max(0.5, min(1.0, self.rtt_tolerance * long_rtt / rtt_s))
        target = estimate * gradient + queue
        new = estimate * (1.0 - self.smoothing) + target * self.smoothing
        if in_flight < estimate / 2 and new > estimate:
            new = estimate  # app-limited: never grow
        return self._set(new)

    def __repr__(self) -> str:
        return (
            f"<GradientLimit limit={self.limit} estimate={self._estimate:.3f} "
            f"long_rtt={self._long_rtt * 1000:.3f}ms samples={self._long_count}>"
        )

    def _add_long(self, rtt_s: float) -> float:
        if self._long_count < _WARMUP:
            self._long_count += 1
            self._long_rtt += (rtt_s - self._long_rtt) / self._long_count  # running plain mean
        else:
            f = self._long_factor
            self._long_rtt = self._long_rtt * (1.0 - f) + rtt_s * f
        return self._long_rtt

    def _set(self, estimate: float) -> int:
        if estimate < self.min_limit:
            estimate = float(self.min_limit)
        elif estimate > self.max_limit:
            estimate = float(self.max_limit)
        self._estimate = estimate
        return int(estimate)


class AIMDLimit:
    """Additive increase (+1 while the limit is used), multiplicative decrease on drop or timeout."""

    __slots__ = ("_limit", "backoff_ratio", "max_limit", "min_limit", "timeout_s")

    def __init__(
        self,
        initial_limit: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        backoff_ratio: float = 0.9,
        timeout_s: float = 5.0,
    ) -> None:
        _check_bounds(initial_limit, min_limit, max_limit, backoff_ratio)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive (got {timeout_s})")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.backoff_ratio = backoff_ratio
        self.timeout_s = timeout_s
        self._limit = initial_limit

    @property
    def limit(self) -> int:
        return self._limit

    def on_sample(self, rtt_s: float, in_flight: int, dropped: bool) -> int:
        """Account one finished request; returns the new limit."""
        limit = self._limit
        if dropped or rtt_s > self.timeout_s:
            limit = max(self.min_limit, int(limit * self.backoff_ratio))
        elif in_flight * 2 >= limit:
            limit = min(self.max_limit, limit + 1)
        self._limit = limit
        return limit

    def __repr__(self) -> str:
        return f"<AIMDLimit limit={self._limit} [{self.min_limit}, {self.max_limit}]>"


class WindowedLimit:
    """Feeds an inner limit once per window with the window's mean RTT (Netflix WindowedLimit).

    Why: updating on every response lets queueing noise swing the limit by several times within a
    second, and a long-term average counted in samples drifts with load. One update per window
    (at least ``min_window_s`` and ``min_samples``, at most ``max_window_s``) gives the gradient a
    stable signal and makes ``long_window`` count windows, i.e. time.
    Window contents: mean RTT, the highest in-flight seen, and whether any request was dropped.
    """

    __slots__ = (
        "_clock",
        "_count",
        "_dropped",
        "_inner",
        "_max_in_flight",
        "_start",
        "_sum",
        "max_window_s",
        "min_samples",
        "min_window_s",
    )

    def __init__(
        self,
        inner: LimitAlgorithm,
        clock: Callable[[], float],
        min_window_s: float = 0.1,
        max_window_s: float = 1.0,
        min_samples: int = 10,
    ) -> None:
        if not 0 < min_window_s <= max_window_s:
            raise ValueError("need 0 < min_window_s <= max_window_s")
        self._inner = inner
        self._clock = clock
        self.min_window_s = min_window_s
        self.max_window_s = max_window_s
        self.min_samples = min_samples
        self._start = clock()
        self._count = 0
        self._sum = 0.0
        self._max_in_flight = 0
        self._dropped = False

    @property
    def limit(self) -> int:
        return self._inner.limit

    def __repr__(self) -> str:
        return f"<WindowedLimit {self._inner!r} window={self._count} samples>"

    def on_sample(self, rtt_s: float, in_flight: int, dropped: bool) -> int:
        if rtt_s > 0.0 and math.isfinite(rtt_s):
            self._count += 1
            self._sum += rtt_s
        if in_flight > self._max_in_flight:
            self._max_in_flight = in_flight
        self._dropped = self._dropped or dropped
        elapsed = self._clock() - self._start
        if (elapsed >= self.min_window_s and self._count >= self.min_samples) or elapsed >= self.max_window_s:
            if self._count:
                self._inner.on_sample(self._sum / self._count, self._max_in_flight, self._dropped)
            elif self._dropped:
                self._inner.on_sample(float("nan"), self._max_in_flight, True)
            self._start = self._clock()
            self._count = 0
            self._sum = 0.0
            self._max_in_flight = 0
            self._dropped = False
        return self._inner.limit
