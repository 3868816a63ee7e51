"""Passive outlier ejection: thresholds, backoff, lazy return, decay, pool cap."""

from __future__ import annotations

import pytest

from gateway.policy.outlier import OutlierPool, OutlierState
from tests.helpers import ManualClock


def make(clock: ManualClock, failures: int = 3, base: float = 10.0, cap: float = 100.0) -> OutlierState:
    return OutlierState(consecutive_failures=failures, base_ejection_s=base, max_ejection_s=cap, clock=clock)


def test_threshold_reached_after_consecutive_failures(clock: ManualClock) -> None:
    o = make(clock)
    assert [o.on_failure() for _ in range(3)] == [False, False, True]
    # Still at/over threshold (e.g. the pool cap refused the ejection): keep reporting it.
    assert o.on_failure() is True


def test_success_resets_count(clock: ManualClock) -> None:
    o = make(clock)
    o.on_failure()
    o.on_failure()
    o.on_success()
    assert [o.on_failure() for _ in range(3)] == [False, False, True]


def test_eject_and_lazy_return(clock: ManualClock) -> None:
    o = make(clock)
    assert not o.is_ejected()
    assert not o.check_returned()
    for _ in range(3):
        o.on_failure()
    assert o.eject() == 10.0
    assert o.ejections == 1
    assert o.is_ejected()
    assert not o.check_returned()
    clock.advance(9.99)
    assert o.is_ejected()
    assert not o.check_returned()
    clock.advance(0.01)
    assert not o.is_ejected()
    assert o.check_returned() is True
    assert o.check_returned() is False  # exactly once


def test_failures_while_ejected_are_ignored_and_count_restarts(clock: ManualClock) -> None:
    o = make(clock)
    for _ in range(3):
        o.on_failure()
    o.eject()
    assert [o.on_failure() for _ in range(5)] == [False] * 5  # in-flight stragglers
    clock.advance(10.0)
    assert [o.on_failure() for _ in range(3)] == [False, False, True]


def test_exponential_backoff_capped(clock: ManualClock) -> None:
    o = make(clock, failures=1, base=10.0, cap=100.0)
    durations = []
    for _ in range(7):
        o.on_failure()
        durations.append(o.eject())
        clock.advance(durations[-1])
        assert o.check_returned()
    assert durations == [10.0, 20.0, 40.0, 80.0, 100.0, 100.0, 100.0]
    assert o.ejections == 7


def test_backoff_does_not_overflow(clock: ManualClock) -> None:
    o = make(clock, failures=1, base=1.0, cap=5.0)
    for _ in range(2000):
        o.on_failure()
        assert o.eject() <= 5.0
        clock.advance(1.0)


def test_multiplier_decays_after_quiet_period(clock: ManualClock) -> None:
    o = make(clock, failures=1, base=10.0, cap=100.0)
    o.on_failure()
    assert o.eject() == 10.0
    clock.advance(10.0)
    o.on_failure()
    assert o.eject() == 20.0
    clock.advance(20.0)  # returned now
    clock.advance(99.0)  # quiet, but not yet a full max_ejection_s
    assert o.ejections == 2
    o.on_success()
    clock.advance(1.0)
    assert o.ejections == 0
    o.on_failure()
    assert o.eject() == 10.0


def test_recent_failure_prevents_decay(clock: ManualClock) -> None:
    o = make(clock, failures=3, base=10.0, cap=100.0)
    for _ in range(3):
        o.on_failure()
    o.eject()
    clock.advance(60.0)
    o.on_failure()  # below threshold, but breaks the quiet period
    clock.advance(60.0)  # 110 s since the return, only 60 s since the failure
    assert o.ejections == 1
    o.on_failure()
    assert o.on_failure() is True
    assert o.eject() == 20.0


def test_time_ejected_does_not_count_as_quiet(clock: ManualClock) -> None:
    o = make(clock, failures=1, base=60.0, cap=100.0)
    o.on_failure()
    assert o.eject() == 60.0
    clock.advance(60.0)
    o.on_failure()
    assert o.eject() == 100.0  # 120 capped
    clock.advance(99.0)  # well past max_ejection_s since the failure, but still ejected
    assert o.is_ejected()
    assert o.ejections == 2
    clock.advance(1.0)
    assert o.check_returned()
    clock.advance(99.0)
    assert o.ejections == 2
    clock.advance(1.0)  # a full max_ejection_s un-ejected and failure-free
    assert o.ejections == 0


@pytest.mark.parametrize(
    ("percent", "ejected_now", "pool_size", "allowed"),
    [
        (10, 0, 10, True),
        (10, 1, 10, False),
        (10, 0, 5, False),  # one of five is 20 % > 10 %: never exceed
        (50, 1, 4, True),
        (50, 2, 4, False),
        (100, 3, 4, True),
        (100, 4, 4, False),
        (0, 0, 10, False),
        (33.4, 0, 3, True),
        (33.3, 0, 3, False),
        (50, 0, 0, False),
    ],
)
def test_pool_cap(percent: float, ejected_now: int, pool_size: int, allowed: bool) -> None:
    assert OutlierPool(percent).may_eject(ejected_now, pool_size) is allowed


def test_validation(clock: ManualClock) -> None:
    with pytest.raises(ValueError):
        make(clock, failures=0)
    with pytest.raises(ValueError):
        make(clock, base=0.0)
    with pytest.raises(ValueError):
        make(clock, base=10.0, cap=5.0)
    with pytest.raises(ValueError):
        OutlierPool(101)
    with pytest.raises(ValueError):
        OutlierPool(-1)


def test_reprs(clock: ManualClock) -> None:
    o = make(clock)
    o.on_failure()
    assert repr(o) == "OutlierState(active, failures=1/3, ejections=0)"
    o.eject()
    clock.advance(4.0)
    assert repr(o) == "OutlierState(ejected for 6s, failures=0/3, ejections=1)"
    assert repr(OutlierPool(10)) == "OutlierPool(max_ejection_percent=10)"
