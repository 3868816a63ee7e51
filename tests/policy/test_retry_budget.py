from __future__ import annotations

from gateway.policy.retry_budget import RetryBudget
from tests.helpers import ManualClock


def test_min_retries_always_allowed() -> None:
    clock = ManualClock()
    b = RetryBudget(0.2, 3, 10.0, clock)
    assert [b.try_retry() for _ in range(4)] == [True, True, True, False]


def test_ratio_caps_retries_under_total_failure() -> None:
    clock = ManualClock()
    b = RetryBudget(0.2, 0, 10.0, clock)
    allowed = 0
    for _ in range(1000):
        b.on_request()
        if b.try_retry():
            allowed += 1
    assert allowed == 200


def test_window_slides() -> None:
    clock = ManualClock()
    b = RetryBudget(0.5, 0, 10.0, clock)
    for _ in range(10):
        b.on_request()
    assert sum(b.try_retry() for _ in range(10)) == 5
    clock.advance(10.5)
    assert b.counts() == (0, 0)
    assert not b.try_retry()
    b.on_request()
    b.on_request()
    assert b.try_retry()


def test_a_callers_clock_read_counts_like_the_budgets_own() -> None:
    """on_request(now) with the caller's read of the same clock behaves as on_request()."""
    clock = ManualClock()
    own, given = RetryBudget(0.5, 0, 10.0, clock), RetryBudget(0.5, 0, 10.0, clock)
    for step in range(40):
        clock.advance(0.7)
        own.on_request()
        given.on_request(clock())
        if step % 5 == 0:
            assert own.counts() == given.counts()
