"""Retry budget: retries may be at most `ratio` of requests over a sliding window.

Rules (Envoy's and Linkerd's retry budgets): a retry is allowed while
retries_in_window < max(min_retries, ratio * requests_in_window); every allowed retry is counted.
The window is `buckets` fixed slots rotated by the injected clock, so each call is O(1) amortised.
Why: retries against a failing pool must never multiply its load; with a 100% failing pool the
extra load is bounded by `ratio`.
"""

from __future__ import annotations

from collections.abc import Callable


class RetryBudget:
    __slots__ = (
        "_buckets",
        "_clock",
        "_head",
        "_head_requests",
        "_head_start",
        "_requests",
        "_retries",
        "_slot_s",
        "min_retries",
        "ratio",
    )

    def __init__(
        self, ratio: float, min_retries: int, window_s: float, clock: Callable[[], float], buckets: int = 10
    ) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self._clock = clock
        self._buckets = buckets
        self._slot_s = window_s / buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._head = 0
        # Requests of the head slot, a plain field (compiled: a C increment per request, where a
        # list slot boxes a new int); written into `_requests` when the window moves or is read.
        self._head_requests = 0
        self._head_start = clock()

    def __repr__(self) -> str:
        req, ret = self.counts()
        return f"<RetryBudget {ret}/{req} ratio={self.ratio} min={self.min_retries}>"

    def _rotate(self) -> None:
        now = self._clock()
        elapsed = int((now - self._head_start) // self._slot_s)
        if elapsed <= 0:
            return
        self._requests[self._head] = self._head_requests
        self._head_requests = 0
        for _ in range(min(elapsed, self._buckets)):
            self._head = (self._head + 1) % self._buckets
            self._requests[self._head] = 0
            self._retries[self._head] = 0
        self._head_start += elapsed * self._slot_s

    def counts(self) -> tuple[int, int]:
        """(requests, retries) in the current window."""
        self._rotate()
        self._requests[self._head] = self._head_requests
        return sum(self._requests), sum(self._retries)

    def on_request(self, now: float = -1.0) -> None:
        """Count a request; `now`: the caller's read of the same clock, saving one (a float, not
        `float | None`: compiled, an optional float is boxed per call)."""
        t = now if now >= 0.0 else self._clock()
        if t - self._head_start >= self._slot_s:  # once per slot, not per request
            self._rotate()
        self._head_requests += 1

    def try_retry(self) -> bool:
        requests, retries = self.counts()
        if retries < max(self.min_retries, self.ratio * requests):
            self._retries[self._head] += 1
            return True
        return False
