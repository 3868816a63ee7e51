"""Circuit breaker for one upstream: closed -> open -> half_open -> closed.

Theory of operation:
- CLOSED: every request may go (``try_acquire`` is True, no clock read).  Each outcome is recorded
  in a sliding window of ``window_s`` seconds made of ``BUCKETS`` fixed buckets rotated by the clock
  (O(1) per call: at most ``BUCKETS`` buckets are zeroed, however long the idle gap).  Old outcomes
  therefore age out after between ``window_s * (1 - 1/BUCKETS)`` and ``window_s`` seconds.
- After every recorded outcome the breaker TRIPS (-> OPEN) iff, in the window,
  ``requests >= min_requests`` and ``failures / requests >= failure_ratio``.
- Latency trigger: when ``latency_threshold_s`` is set, a success whose latency is strictly above
  it counts exactly as a failure (in the window, and as a failed probe in HALF_OPEN).
  ``latency_ratio`` is accepted for configuration compatibility but not used: there is a single
  ratio, ``failure_ratio``, over failures plus slow successes.
- OPEN: nothing goes (``try_acquire`` is False) until ``open_for`` seconds after opening; the
  first ``try_acquire`` at or after that moment COOLS the breaker (-> HALF_OPEN) and is the first
  probe.  ``retry_after_s`` is the time left open (0 when not open).  Outcomes of requests
  acquired before the breaker opened are ignored while OPEN.
- HALF_OPEN: at most ``half_open_requests`` probes may be outstanding; ``release`` (a request that
  neither succeeded nor failed, e.g. the client went away) and every outcome free one slot.  Any
  failure re-opens (PROBE_FAILED) with ``open_for`` doubled, capped at ``max_open_for_s``
  (default ``8 * open_for_s``).  ``half_open_requests`` successes (necessarily consecutive, since
  a failure re-opens) close it (PROBES_PASSED): window cleared, ``open_for`` back to
  ``open_for_s``.  Outcomes are attributed to the state current when they are reported.
- ``force_open`` / ``reset`` are operator overrides (FORCE_OPEN / RESET); they do not change the
  backoff except that entering CLOSED always resets it.
- Every change of state increments ``transitions``, sets ``last_transition = (old, new)`` and
  calls the ``on_transition`` callbacks with ``(old, new)``.  Self-loops in the table
  (force_open while OPEN restarts the open timer; reset while CLOSED clears the window) run the
  entry action but are not state changes.  (state, event) pairs absent from the table are no-ops.
- Time comes from the injected monotonic ``clock``; this module never reads the time itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

# Events.
TRIP: Final = "trip"
COOLED: Final = "cooled"
PROBE_FAILED: Final = "probe_failed"
PROBES_PASSED: Final = "probes_passed"
FORCE_OPEN: Final = "force_open"
RESET: Final = "reset"

# (state, event) -> next state.  Anything else is a no-op.
TRANSITIONS: Final[dict[tuple[str, str], str]] = {
    (CLOSED, TRIP): OPEN,
    (OPEN, COOLED): HALF_OPEN,
    (HALF_OPEN, PROBE_FAILED): OPEN,
    (HALF_OPEN, PROBES_PASSED): CLOSED,
    (CLOSED, FORCE_OPEN): OPEN,
    (HALF_OPEN, FORCE_OPEN): OPEN,
    (OPEN, FORCE_OPEN): OPEN,
    (OPEN, RESET): CLOSED,
    (HALF_OPEN, RESET): CLOSED,
    (CLOSED, RESET): CLOSED,
}

BUCKETS: Final = 10

TransitionCallback = Callable[[str, str], None]


class CircuitBreaker:
    """Failure-ratio circuit breaker over a bucketed sliding window, with half-open probing and backoff."""

    __slots__ = (
        "_base_open_for",
        "_callbacks",
        "_clock",
        "_epoch",
        "_fail_b",
        "_failures",
        "_max_open_for",
        "_min_requests",
        "_open_for",
        "_opened_at",
        "_probe_ok",
        "_probes",
        "_req_b",
        "_requests",
        "_width",
        "failure_ratio",
        "half_open_requests",
        "last_transition",
        "latency_ratio",
        "latency_threshold_s",
        "state",
        "transitions",
    )

    def __init__(
        self,
        failure_ratio: float,
        min_requests: int,
        window_s: float,
        open_for_s: float,
        half_open_requests: int,
        clock: Callable[[], float],
        max_open_for_s: float | None = None,
        latency_threshold_s: float | None = None,
        latency_ratio: float = 0.01,
    ) -> None:
        if not 0.0 < failure_ratio <= 1.0:
            raise ValueError(f"failure_ratio must be in (0, 1] (got {failure_ratio})")
        if min_requests < 1:
            raise ValueError(f"min_requests must be >= 1 (got {min_requests})")
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be positive and finite (got {window_s})")
        if not (open_for_s > 0 and math.isfinite(open_for_s)):
            raise ValueError(f"open_for_s must be positive and finite (got {open_for_s})")
        if half_open_requests < 1:
            raise ValueError(f"half_open_requests must be >= 1 (got {half_open_requests})")
        max_open = 8.0 * open_for_s if max_open_for_s is None else max_open_for_s
        if max_open < open_for_s:
            raise ValueError(f"max_open_for_s must be >= open_for_s (got {max_open_for_s})")
        if latency_threshold_s is not None and not latency_threshold_s > 0:
            raise ValueError(f"latency_threshold_s must be positive (got {latency_threshold_s})")
        self.failure_ratio = failure_ratio
        self._min_requests = min_requests
        self._base_open_for = open_for_s
        self._open_for = open_for_s
        self._max_open_for = max_open
        self.half_open_requests = half_open_requests
        self.latency_threshold_s = latency_threshold_s
        self.latency_ratio = latency_ratio
        self._clock = clock
        self._width = window_s / BUCKETS
        self._req_b = [0] * BUCKETS
        self._fail_b = [0] * BUCKETS
        self._requests = 0
        self._failures = 0
        self._epoch = math.floor(clock() / self._width)
        self._opened_at = 0.0
        self._probes = 0  # outstanding half-open probes
        self._probe_ok = 0  # successful probes in this half-open period
        self._callbacks: list[TransitionCallback] = []
        self.state: str = CLOSED
        self.transitions = 0
        self.last_transition: tuple[str, str] | None = None

    # -- requests ---------------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """May this request go to the upstream?  Read ``state`` afterwards for a fresh value."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            if self._clock() < self._opened_at + self._open_for:
                return False
            self._fire(COOLED)
        if self._probes < self.half_open_requests:
            self._probes += 1
            return True
        return False

    def on_success(self, latency_s: float = 0.0) -> None:
        """The upstream answered well (a success slower than ``latency_threshold_s`` is a failure)."""
        threshold = self.latency_threshold_s
        if threshold is not None and latency_s > threshold:
            self.on_failure()
            return
        state = self.state
        if state == CLOSED:
            self._record(False)
        elif state == HALF_OPEN:
            self._free_probe()
            self._probe_ok += 1
            if self._probe_ok >= self.half_open_requests:
                self._fire(PROBES_PASSED)

    def on_failure(self) -> None:
        """The upstream failed in a way that counts against it."""
        state = self.state
        if state == CLOSED:
            self._record(True)
        elif state == HALF_OPEN:
            self._free_probe()
            self._open_for = min(self._open_for * 2.0, self._max_open_for)
            self._fire(PROBE_FAILED)

    def release(self) -> None:
        """An acquired request ended without an outcome that counts; frees its half-open probe slot."""
        if self.state == HALF_OPEN:
            self._free_probe()

    def retry_after_s(self) -> float:
        """Seconds left before the breaker lets a probe through (0 if not open)."""
        if self.state != OPEN:
            return 0.0
        left = self._opened_at + self._open_for - self._clock()
        return left if left > 0.0 else 0.0

    # -- overrides, observation --------------------------------------------------------------------

    def force_open(self) -> None:
        """Open now for the current backoff duration (restarts the timer if already open)."""
        self._fire(FORCE_OPEN)

    def reset(self) -> None:
        """Close now, clearing the window and the backoff."""
        self._fire(RESET)

    def on_transition(self, cb: TransitionCallback) -> None:
        """Register ``cb(old, new)``, called after every state change."""
        self._callbacks.append(cb)

    @property
    def open_for_s(self) -> float:
        """The current (backed-off) open duration."""
        return self._open_for

    def window_counts(self) -> tuple[int, int]:
        """(requests, failures) currently in the sliding window."""
        self._rotate(self._clock())
        return self._requests, self._failures

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker state={self.state} requests={self._requests} failures={self._failures} "
            f"probes={self._probes}/{self.half_open_requests} ok={self._probe_ok} "
            f"open_for={self._open_for:g}s transitions={self.transitions}>"
        )

    # -- internals ---------------------------------------------------------------------------------

    def _free_probe(self) -> None:
        if self._probes > 0:
            self._probes -= 1

    def _rotate(self, now: float) -> None:
        epoch = math.floor(now / self._width)
        steps = epoch - self._epoch
        if steps <= 0:
            return  # same bucket (or the clock went backwards: keep the newest bucket)
        req_b, fail_b = self._req_b, self._fail_b
        for e in range(self._epoch + 1, self._epoch + 1 + min(steps, BUCKETS)):
            i = e % BUCKETS
            self._requests -= req_b[i]
            self._failures -= fail_b[i]
            req_b[i] = 0
            fail_b[i] = 0
        self._epoch = epoch

    def _record(self, failed: bool) -> None:
        self._rotate(self._clock())
        i = self._epoch % BUCKETS
        self._req_b[i] += 1
        self._requests += 1
        if failed:
            self._fail_b[i] += 1
            self._failures += 1
        requests = self._requests
        if requests >= self._min_requests and self._failures / requests >= self.failure_ratio:
            self._fire(TRIP)

    def _clear_window(self) -> None:
        for i in range(BUCKETS):
            self._req_b[i] = 0
            self._fail_b[i] = 0
        self._requests = 0
        self._failures = 0

    def _fire(self, event: str) -> None:
        old = self.state
        new = TRANSITIONS.get((old, event))
        if new is None:
            return
        # Entry actions.
        if new == OPEN:
            self._opened_at = self._clock()
        elif new == HALF_OPEN:
            self._probes = 0
            self._probe_ok = 0
        else:  # CLOSED
            self._clear_window()
            self._epoch = math.floor(self._clock() / self._width)
            self._open_for = self._base_open_for
        if new == old:
            return
        self.state = new
        self.transitions += 1
        self.last_transition = (old, new)
        for cb in self._callbacks:
            cb(old, new)
