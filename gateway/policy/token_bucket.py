"""Per-key rate limiting with GCRA (a token bucket stored as one float per key).

Rules:
- Emission interval ``T = per_s / rate``; burst tolerance ``tau = (burst - 1) * T``.
- Each key stores only its theoretical arrival time (TAT).  An unknown key, or one whose TAT
  is in the past, has a FULL bucket (``burst`` tokens).
- A request at ``now`` is admissible iff ``max(TAT, now) - tau <= now``; admitting it sets
  ``TAT = max(TAT, now) + T``.  Hence in any window of length W at most ``W / T + burst``
  requests are admitted, and a request is refused only when admitting it would break that bound.
- ``check`` never mutates; ``consume`` takes one token (the caller checked first).
- Float rounding is absorbed by a slack of 1e-6 interval: a TAT within it of ``now`` counts as
  ``now``, so exactly spaced requests never drift into refusal.
- Memory is bounded by ``max_keys``.  Inserting a new key into a full table evicts a full
  bucket from the least-recently-used end if one is found within a few entries (dropping a full
  bucket loses nothing), otherwise the least-recently-used entry.
- Time comes from the injected monotonic ``clock``; this module never reads the time itself.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from itertools import islice

# Slack, in units of the emission interval, absorbing float rounding so that requests spaced exactly
# one interval apart are never refused over an ulp of drift.  At most 1e-6 of a token is given away
# per admitted request.
_EPS = 1e-6
# How many least-recently-used entries to inspect for an already-full bucket before falling back
# to plain LRU eviction.  Constant, so insertion stays O(1).
_EVICT_SCAN = 8


class RateTable:
    """Per-key token buckets for one limit, stored as one float (theoretical arrival time, GCRA) per key."""

    __slots__ = ("_burst", "_clock", "_eps", "_interval", "_max_keys", "_tat", "_tau")

    def __init__(
        self, rate: float, per_s: float, burst: int, max_keys: int, clock: Callable[[], float]
    ) -> None:
        if not rate > 0 or not per_s > 0 or not math.isfinite(rate) or not math.isfinite(per_s):
            raise ValueError(f"rate and per_s must be positive and finite (rate={rate}, per_s={per_s})")
        if burst < 1:
            raise ValueError(f"burst must be >= 1 (got {burst})")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1 (got {max_keys})")
        self._interval: float = per_s / rate
        self._tau: float = (burst - 1) * self._interval
        self._eps: float = self._interval * _EPS
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._tat: OrderedDict[str, float] = OrderedDict()

    def check(self, key: str) -> float:
        """0.0 if one token is available now; else seconds until one is.  Consumes nothing."""
        tat = self._tat.get(key)
        if tat is None:
            return 0.0
        wait = tat - self._tau - self._clock()
        return wait if wait > self._eps else 0.0

    def consume(self, key: str) -> None:
        """Take one token for ``key`` (the caller checked first)."""
        self._take(key, force=True)

    def take(self, key: str) -> float:
        """``check`` then ``consume`` with one clock read and one lookup: 0.0 when a token was
        taken, else the seconds until one is (nothing taken)."""
        return self._take(key, force=False)

    def _take(self, key: str, force: bool) -> float:
        now = self._clock()
        table = self._tat
        tat = table.get(key)
        if tat is None:
            if len(table) >= self._max_keys:
                self._evict(now)
            table[key] = now + self._interval
            return 0.0
        if not force:
            wait = tat - self._tau - now
            if wait > self._eps:
                return wait
        table[key] = (tat if tat > now + self._eps else now) + self._interval
        table.move_to_end(key)
        return 0.0

    def try_take(self, key: str) -> bool:
        """Consume one token if one is available now; return whether it was."""
        if self.check(key) == 0.0:
            self.consume(key)
            return True
        return False

    def remaining(self, key: str) -> int:
        """Whole tokens left now (for the RateLimit header)."""
        tat = self._tat.get(key)
        if tat is None:
            return self._burst
        backlog = tat - self._clock()
        if backlog <= 0.0:
            return self._burst
        tokens = math.floor((self._tau - backlog) / self._interval + 1.0 + _EPS)
        return max(0, min(self._burst, tokens))

    def reset_s(self, key: str) -> float:
        """Seconds until the bucket for ``key`` is full again."""
        tat = self._tat.get(key)
        if tat is None:
            return 0.0
        return max(0.0, tat - self._clock())

    def _evict(self, now: float) -> None:
        table = self._tat
        for key, tat in islice(table.items(), _EVICT_SCAN):
            if tat <= now:
                del table[key]  # safe: iteration stops here
                return
        table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._tat)

    def __repr__(self) -> str:
        return (
            f"RateTable(interval_s={self._interval:g}, burst={self._burst}, "
            f"keys={len(self._tat)}/{self._max_keys})"
        )
