"""Passive outlier ejection per target, plus the pool-wide ejection cap.

Rules:
- ``on_failure`` counts consecutive failures; ``on_success`` clears the count.  ``on_failure``
  returns True while the count is at or past ``consecutive_failures`` and the target is not
  ejected, so a caller refused by the pool cap gets asked again on the next failure.
  Failures observed while ejected (requests already in flight) are ignored.
- ``eject`` ejects now for ``base * 2 ** (ejections - 1)`` seconds, capped at ``max_ejection_s``,
  and clears the failure count.  Un-ejection is observed lazily: ``is_ejected`` compares the
  clock with the deadline, and ``check_returned`` is True exactly once after the deadline so the
  caller can start slow start.
- Decay: the multiplier (``ejections``) resets to 0 once the target has spent a full
  ``max_ejection_s`` un-ejected with no failure (a simple stand-in for Envoy's per-interval
  decrement).  It is applied lazily when read, on failure, and on ejection.
- OutlierPool.may_eject never lets the ejected share of the pool exceed
  ``max_ejection_percent`` (unlike Envoy, which always allows one ejection).
- Time comes from the injected monotonic ``clock``; this module never reads the time itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class OutlierState:
    """Consecutive-failure outlier detection and ejection backoff for one target."""

    __slots__ = (
        "_base",
        "_clock",
        "_ejected_until",
        "_ejections",
        "_failures",
        "_last_failure",
        "_max",
        "_returning",
        "_threshold",
    )

    def __init__(
        self,
        consecutive_failures: int,
        base_ejection_s: float,
        max_ejection_s: float,
        clock: Callable[[], float],
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1 (got {consecutive_failures})")
        if not base_ejection_s > 0 or max_ejection_s < base_ejection_s:
            raise ValueError(
                f"need 0 < base_ejection_s <= max_ejection_s (got {base_ejection_s}, {max_ejection_s})"
            )
        self._threshold = consecutive_failures
        self._base = base_ejection_s
        self._max = max_ejection_s
        self._clock = clock
        self._failures = 0
        self._ejections = 0
        self._ejected_until = -math.inf
        self._last_failure = -math.inf
        self._returning = False

    @property
    def ejections(self) -> int:
        """Times ejected since the multiplier last decayed to zero."""
        self._decay(self._clock())
        return self._ejections

    def on_success(self) -> None:
        """A request succeeded: clear the consecutive failure count."""
        self._failures = 0

    def on_failure(self) -> bool:
        """A request failed; True when the threshold is reached (the caller decides whether to eject)."""
        now = self._clock()
        if now < self._ejected_until:
            return False
        self._decay(now)
        self._last_failure = now
        self._failures += 1
        return self._failures >= self._threshold

    def eject(self) -> float:
        """Eject now; return the ejection duration (exponential backoff, capped)."""
        now = self._clock()
        self._decay(now)
        self._ejections += 1
        # Cap the exponent too, so a long ejection history cannot overflow the float.
        duration = min(self._max, self._base * 2.0 ** min(self._ejections - 1, 64))
        self._ejected_until = now + duration
        self._failures = 0
        self._returning = True
        return duration

    def is_ejected(self) -> bool:
        """True while ejected; expiry is observed lazily against the clock."""
        return self._clock() < self._ejected_until

    def check_returned(self) -> bool:
        """True exactly once, the first time it is called after an ejection has expired."""
        if self._returning and self._clock() >= self._ejected_until:
            self._returning = False
            return True
        return False

    def _decay(self, now: float) -> None:
        if self._ejections and now - max(self._last_failure, self._ejected_until) >= self._max:
            self._ejections = 0

    def __repr__(self) -> str:
        now = self._clock()
        ejected = f"ejected for {self._ejected_until - now:g}s" if now < self._ejected_until else "active"
        return (
            f"OutlierState({ejected}, failures={self._failures}/{self._threshold}, "
            f"ejections={self._ejections})"
        )


class OutlierPool:
    """Pool-level cap on the share of targets that may be ejected at once."""

    __slots__ = ("_max_percent",)

    def __init__(self, max_ejection_percent: float) -> None:
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent must be within [0, 100] (got {max_ejection_percent})")
        self._max_percent = max_ejection_percent

    def may_eject(self, ejected_now: int, pool_size: int) -> bool:
        """Whether ejecting one more target keeps the ejected share within the cap."""
        if pool_size <= 0 or ejected_now >= pool_size:
            return False
        return (ejected_now + 1) * 100 <= self._max_percent * pool_size

    def __repr__(self) -> str:
        return f"OutlierPool(max_ejection_percent={self._max_percent:g})"
