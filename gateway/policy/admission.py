"""Admission control: a concurrency cap with a bounded, prioritised wait queue (FIFO or adaptive LIFO).

Theory of operation:
- At most ``limit`` requests are in flight.  ``limit`` (and ``queue_size``) are plain attributes
  the caller may change at any time (adaptive limit, slow start).  Lowering ``limit`` never evicts
  anyone, it only stops admissions until ``in_flight`` drops below it.  Raising it admits nobody
  by itself: the next ``release`` admits one waiter, and ``pump`` admits as many as now fit.
- Priorities: CRITICAL (0) < DEFAULT (1) < SHEDDABLE (2); a lower number is served first.
  SHEDDABLE traffic may only use ``limit - reserve`` slots, ``reserve = ceil(limit / 10)``
  (integer arithmetic, so ``limit`` 1..10 reserves 1 slot: with ``limit == 1`` sheddable requests
  are never admitted), keeping headroom for the other classes.
- ``try_acquire(p)`` takes a slot iff one is free for class ``p`` and no waiter of priority ``p``
  or higher is queued (no queue jumping).  Otherwise the caller calls ``enqueue``.
- Waiters are opaque objects owned by the caller (the async layer wraps futures around them);
  every method returns the waiters it admitted (they hold a slot now) and/or the waiters it shed
  (they must be failed now).  Waiters must be hashable (futures are); equal waiters are the same
  waiter, and a waiter is in the queue at most once.
- Queue full (``queued >= queue_size``) on ``enqueue``: the newest waiter of the lowest priority
  class that is strictly lower than the arrival's is displaced (shed); if there is none, the
  arrival itself is shed.
- Timeouts: a waiter whose queue time is ``>= queue_timeout_s`` (computed as
  ``enqueued_at + timeout <= now``) is shed by ``expire`` (and by ``enqueue``, ``release`` and
  ``pump``, which expire first so that a stale waiter is never admitted).  ``next_deadline`` is
  computed the same way, so calling ``expire`` at that time sheds someone, unless the queue
  changed meanwhile (it is never later than the true deadline).
- FIFO mode: within a class, oldest first.
- ADAPTIVE_LIFO mode (Facebook, "Fail at Scale"): the queue is STANDING when it has been
  non-empty for the whole last ``codel_interval_s`` (Facebook's ``lastEmptyTime < now - N``).
  That is CoDel's "minimum queueing delay over the interval is not below target" with an empty
  queue as the only below-target observation: the sojourn times of admitted waiters are
  deliberately not used, because under LIFO they are biased low and would flip the mode back and
  forth.  While standing, each class is served newest first (LIFO) and the queue timeout of every
  queued waiter, whenever it was enqueued, becomes ``codel_target_s`` (if shorter).  Standing
  ends only once the queue has stayed empty for a whole ``codel_interval_s`` (hysteresis: a queue
  emptied by shedding is still the same overload); then it is FIFO with the full timeout again.
  While standing the queue is also bounded to what the slots release within ``codel_target_s``
  (``release rate * codel_target_s``, at least 1; the rate is measured over the last whole
  ``codel_interval_s``; until then the bound is ``queue_size``): an arrival beyond it displaces
  the *oldest* waiter of the lowest class not above its own (under LIFO that waiter would only
  time out), else it is shed itself.
  Why: excess is then shed about one inter-arrival time after it came, not after the full
  ``codel_target_s`` wait, and a standing queue never holds more than it can serve in time.
- Cost: per-class deques; ``enqueue``/``release``/``try_acquire`` are O(1) amortised.  ``cancel``
  is O(1) by mark-and-skip: a cancelled entry stays in its deque, dead, and is dropped when it
  reaches an end; deques are compacted when dead entries outnumber live ones.
- Counters never go negative: an unmatched ``release`` is ignored.
- Time comes from the injected monotonic ``clock``; this module never reads the time itself.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

FIFO: Final = "fifo"
ADAPTIVE_LIFO: Final = "adaptive_lifo"
CRITICAL: Final = 0
DEFAULT: Final = 1
SHEDDABLE: Final = 2
PRIORITIES: Final = (CRITICAL, DEFAULT, SHEDDABLE)

# Compact the deques once this many cancelled entries are held and they outnumber live ones.
_COMPACT_MIN_DEAD = 32

W = TypeVar("W", bound=Hashable)


class _Entry(Generic[W]):
    __slots__ = ("live", "prio", "t", "waiter")

    def __init__(self, waiter: W, prio: int, t: float) -> None:
        self.waiter = waiter
        self.prio = prio
        self.t = t
        self.live = True


def reserve_for(limit: int) -> int:
    """Slots withheld from SHEDDABLE traffic: ceil(limit / 10), 0 for a non-positive limit."""
    return -(-limit // 10) if limit > 0 else 0


class Admission(Generic[W]):
    """Concurrency limit with a bounded priority wait queue; pure bookkeeping, the caller owns the waiters."""

    __slots__ = (
        "_clock",
        "_counts",
        "_dead",
        "_empty_since",
        "_index",
        "_nonempty_since",
        "_queued",
        "_queues",
        "_rel_count",
        "_rel_rate",
        "_rel_start",
        "codel_interval_s",
        "codel_target_s",
        "in_flight",
        "limit",
        "mode",
        "queue_size",
        "queue_timeout_s",
    )

    def __init__(
        self,
        limit: int,
        queue_size: int,
        queue_timeout_s: float,
        clock: Callable[[], float],
        mode: str = FIFO,
        codel_target_s: float = 0.005,
        codel_interval_s: float = 0.1,
    ) -> None:
        if limit < 0 or queue_size < 0:
            raise ValueError(f"limit and queue_size must be >= 0 (got {limit}, {queue_size})")
        if not queue_timeout_s > 0:
            raise ValueError(f"queue_timeout_s must be positive (got {queue_timeout_s})")
        if mode not in (FIFO, ADAPTIVE_LIFO):
            raise ValueError(f"mode must be {FIFO!r} or {ADAPTIVE_LIFO!r} (got {mode!r})")
        if not (codel_target_s > 0 and codel_interval_s > 0):
            raise ValueError("codel_target_s and codel_interval_s must be positive")
        self.limit = limit
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.mode = mode
        self.codel_target_s = codel_target_s
        self.codel_interval_s = codel_interval_s
        self.in_flight = 0
        self._clock = clock
        self._queues: tuple[deque[_Entry[W]], ...] = tuple(deque() for _ in PRIORITIES)
        self._counts = [0] * len(PRIORITIES)  # live waiters per class
        self._queued = 0
        self._index: dict[W, _Entry[W]] = {}  # waiter -> its live entry
        self._dead = 0  # cancelled entries still sitting in the deques
        self._nonempty_since: float | None = None  # start of the current busy period of the queue
        self._empty_since: float | None = None  # when the queue last went empty
        self._rel_start = clock()  # releases counted since then; their rate over the last interval
        self._rel_count = 0
        self._rel_rate = 0.0

    # -- public API --------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Live waiters in the queue."""
        return self._queued

    def queued_by_priority(self) -> tuple[int, ...]:
        return tuple(self._counts)

    def is_standing(self) -> bool:
        """ADAPTIVE_LIFO only: has the queue been non-empty for at least ``codel_interval_s``?"""
        return self._standing(self._clock())

    def try_acquire(self, priority: int = DEFAULT) -> bool:
        """Take a slot now if one is free for ``priority`` and nobody of equal/higher priority waits."""
        _check_priority(priority)
        if self.in_flight >= self._cap(priority):
            return False
        counts = self._counts
        for p in range(priority + 1):
            if counts[p]:
                return False
        self.in_flight += 1
        return True

    def enqueue(self, waiter: W, priority: int = DEFAULT) -> list[W]:
        """Queue ``waiter``; returns the waiters to shed now (may include ``waiter`` itself)."""
        _check_priority(priority)
        if waiter in self._index:
            raise ValueError(f"waiter already queued: {waiter!r}")
        now = self._clock()
        shed = self._expire(now)
        # Full: a standing queue at its bound gives up its oldest waiter of the arrival's class or
        # a lower one; a queue at queue_size its newest waiter of a strictly lower class.
        standing = self._standing(now) and self._queued >= self.standing_bound()
        if standing or self._queued >= self.queue_size:
            lowest_spared = priority - 1 if standing else priority
            for p in range(len(PRIORITIES) - 1, lowest_spared, -1):
                if self._counts[p]:
                    victim = self._pop(p, newest=not standing)
                    assert victim is not None
                    shed.append(victim.waiter)
                    break
            else:
                shed.append(waiter)
                return shed
        entry = _Entry(waiter, priority, now)
        self._queues[priority].append(entry)
        self._index[waiter] = entry
        self._counts[priority] += 1
        if self._queued == 0:
            empty = self._empty_since
            # Hysteresis: a queue emptied (by shedding or a burst of releases) for less than one
            # interval is still the same overload; only a full quiet interval ends it.
            if self._nonempty_since is None or empty is None or now - empty >= self.codel_interval_s:
                self._nonempty_since = now
        self._queued += 1
        return shed

    def release(self) -> tuple[W | None, list[W]]:
        """A slot was freed: returns (waiter admitted into it or None, waiters to shed now)."""
        if self.in_flight > 0:
            self.in_flight -= 1
        now = self._clock()
        self._rel_count += 1  # releases in (_rel_start, now]
        elapsed = now - self._rel_start
        if elapsed >= self.codel_interval_s:
            self._rel_rate = self._rel_count / elapsed
            self._rel_start = now
            self._rel_count = 0
        shed = self._expire(now)
        return self._admit(now), shed

    def standing_bound(self) -> int:
        """How many may wait while the queue stands: what the slots release within the CoDel target
        (``queue_size`` until a release rate has been measured over a whole interval)."""
        rate = self._rel_rate
        if rate <= 0.0:
            return self.queue_size
        return min(self.queue_size, max(1, int(rate * self.codel_target_s + 1e-9)))

    def pump(self) -> tuple[list[W], list[W]]:
        """Admit as many waiters as now fit (e.g. after raising ``limit``): (admitted, shed)."""
        now = self._clock()
        shed = self._expire(now)
        admitted: list[W] = []
        while (w := self._admit(now)) is not None:
            admitted.append(w)
        return admitted, shed

    def cancel(self, waiter: W) -> bool:
        """The waiter gave up: remove it if queued (O(1), lazy).  Returns whether it was queued."""
        entry = self._index.get(waiter)
        if entry is None:
            return False
        self._forget(entry)
        entry.live = False
        self._dead += 1
        if self._dead >= _COMPACT_MIN_DEAD and self._dead > self._queued:
            self._compact()
        return True

    def expire(self) -> list[W]:
        """Remove and return the waiters whose queue time has reached the (current) timeout."""
        return self._expire(self._clock())

    def next_deadline(self) -> float | None:
        """Earliest clock time at which some waiter would expire, or None if none would."""
        if self._queued == 0:
            return None
        oldest = math.inf
        for p in PRIORITIES:
            head = self._head(p)
            if head is not None and head.t < oldest:
                oldest = head.t
        deadline = oldest + self.queue_timeout_s
        if self.mode == ADAPTIVE_LIFO and self._nonempty_since is not None:
            standing_at = self._nonempty_since + self.codel_interval_s
            deadline = min(deadline, max(standing_at, oldest + self.codel_target_s))
        return deadline if math.isfinite(deadline) else None

    def __repr__(self) -> str:
        mode = self.mode
        if mode == ADAPTIVE_LIFO:
            mode += " (standing)" if self.is_standing() else " (fifo)"
        return (
            f"<Admission {mode} in_flight={self.in_flight}/{self.limit} "
            f"queued={self._queued}/{self.queue_size} by_priority={self._counts}>"
        )

    # -- internals ---------------------------------------------------------------------------------

    def _cap(self, priority: int) -> int:
        limit = self.limit
        return limit - reserve_for(limit) if priority == SHEDDABLE else limit

    def _standing(self, now: float) -> bool:
        since = self._nonempty_since
        return (
            self.mode == ADAPTIVE_LIFO
            and since is not None
            and self._queued > 0
            and now >= since + self.codel_interval_s
        )

    def _forget(self, entry: _Entry[W]) -> None:
        """Bookkeeping for a live entry leaving the queue (the caller removes or marks it)."""
        del self._index[entry.waiter]
        self._counts[entry.prio] -= 1
        self._queued -= 1
        if self._queued == 0:
            self._empty_since = self._clock()

    def _head(self, p: int) -> _Entry[W] | None:
        """Oldest live entry of class ``p`` (drops dead entries found at the left end)."""
        q = self._queues[p]
        while q:
            e = q[0]
            if e.live:
                return e
            q.popleft()
            self._dead -= 1
        return None

    def _pop(self, p: int, newest: bool) -> _Entry[W] | None:
        q = self._queues[p]
        while q:
            e = q.pop() if newest else q.popleft()
            if e.live:
                self._forget(e)
                return e
            self._dead -= 1
        return None

    def _admit(self, now: float) -> W | None:
        if self.in_flight >= self.limit:
            return None
        for p in PRIORITIES:
            if self._counts[p]:
                # The highest-priority class waiting goes first; if its cap blocks it, nobody goes
                # (only SHEDDABLE, the lowest class, has a lower cap).
                if self.in_flight >= self._cap(p):
                    return None
                entry = self._pop(p, newest=self._standing(now))
                assert entry is not None
                self.in_flight += 1
                return entry.waiter
        return None

    def _expire(self, now: float) -> list[W]:
        if self._queued == 0:
            return []
        timeout = self.queue_timeout_s
        if self._standing(now) and self.codel_target_s < timeout:
            timeout = self.codel_target_s
        shed: list[W] = []
        for p in PRIORITIES:
            while (head := self._head(p)) is not None and head.t + timeout <= now:
                self._queues[p].popleft()
                self._forget(head)
                shed.append(head.waiter)
        return shed

    def _compact(self) -> None:
        for q in self._queues:
            live = [e for e in q if e.live]
            q.clear()
            q.extend(live)
        self._dead = 0


def _check_priority(priority: int) -> None:
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES} (got {priority})")
