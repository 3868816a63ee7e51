from __future__ import annotations

import pytest

from gateway.policy.circuit import (
    BUCKETS,
    CLOSED,
    COOLED,
    FORCE_OPEN,
    HALF_OPEN,
    OPEN,
    PROBE_FAILED,
    PROBES_PASSED,
    RESET,
    TRANSITIONS,
    TRIP,
    CircuitBreaker,
)
from tests.helpers import ManualClock


def make(clock: ManualClock, **kw: object) -> CircuitBreaker:
    args: dict[str, object] = dict(
        failure_ratio=0.5, min_requests=4, window_s=10.0, open_for_s=5.0, half_open_requests=2
    )
    args.update(kw)
    return CircuitBreaker(clock=clock, **args)  # type: ignore[arg-type]


def trip(b: CircuitBreaker) -> None:
    for _ in range(4):
        assert b.try_acquire()
        b.on_failure()
    assert b.state == OPEN


def to_half_open(b: CircuitBreaker, clock: ManualClock) -> None:
    trip(b)
    clock.advance(b.retry_after_s())
    assert b.try_acquire()
    assert b.state == HALF_OPEN
    b.release()  # give the probe slot back so tests start with all slots free


# -- the transition table, exhaustively ------------------------------------------------------------

STATES = (CLOSED, OPEN, HALF_OPEN)
EVENTS = (TRIP, COOLED, PROBE_FAILED, PROBES_PASSED, FORCE_OPEN, RESET)


def enter(state: str, b: CircuitBreaker, clock: ManualClock) -> None:
    if state == OPEN:
        trip(b)
    elif state == HALF_OPEN:
        to_half_open(b, clock)


def drive(event: str, b: CircuitBreaker, clock: ManualClock) -> None:
    """Cause ``event`` through the public API."""
    if event == TRIP:
        for _ in range(4):
            b.on_failure()
    elif event == COOLED:
        clock.advance(b.open_for_s)
        b.try_acquire()
    elif event == PROBE_FAILED:
        b.on_failure()
    elif event == PROBES_PASSED:
        for _ in range(b.half_open_requests):
            b.on_success()
    elif event == FORCE_OPEN:
        b.force_open()
    else:
        assert event == RESET
        b.reset()


@pytest.mark.parametrize(("key", "new"), sorted(TRANSITIONS.items()))
def test_every_table_transition_via_public_api(key: tuple[str, str], new: str) -> None:
    old, event = key
    clock = ManualClock()
    b = make(clock)
    enter(old, b, clock)
    seen: list[tuple[str, str]] = []
    b.on_transition(lambda o, n: seen.append((o, n)))
    before = b.transitions
    drive(event, b, clock)
    assert b.state == new
    if new != old:
        assert b.transitions == before + 1
        assert b.last_transition == (old, new)
        assert seen == [(old, new)]
    else:
        assert b.transitions == before
        assert seen == []


NOT_IN_TABLE = [(s, e) for s in STATES for e in EVENTS if (s, e) not in TRANSITIONS]


@pytest.mark.parametrize(("old", "event"), NOT_IN_TABLE)
def test_pairs_outside_table_are_noops(old: str, event: str) -> None:
    clock = ManualClock()
    b = make(clock)
    enter(old, b, clock)
    before = (b.transitions, b.last_transition)
    b._fire(event)
    assert b.state == old
    assert (b.transitions, b.last_transition) == before


def test_table_covers_the_cycle() -> None:
    assert TRANSITIONS[(CLOSED, TRIP)] == OPEN
    assert TRANSITIONS[(OPEN, COOLED)] == HALF_OPEN
    assert TRANSITIONS[(HALF_OPEN, PROBES_PASSED)] == CLOSED
    assert TRANSITIONS[(HALF_OPEN, PROBE_FAILED)] == OPEN
    assert {s for s, _ in TRANSITIONS} == set(STATES)
    assert set(TRANSITIONS.values()) == set(STATES)


# -- closed: the window ----------------------------------------------------------------------------


def test_closed_always_acquires() -> None:
    b = make(ManualClock())
    assert all(b.try_acquire() for _ in range(1000))
    assert b.state == CLOSED


def test_no_trip_below_min_requests() -> None:
    b = make(ManualClock(), min_requests=5)
    for _ in range(4):
        b.on_failure()
    assert b.state == CLOSED
    b.on_failure()
    assert b.state == OPEN


def test_no_trip_below_ratio() -> None:
    b = make(ManualClock(), failure_ratio=0.5, min_requests=4)
    for _ in range(3):
        b.on_success()
    for _ in range(2):
        b.on_failure()  # 2/5 = 0.4
    assert b.state == CLOSED
    b.on_failure()  # 3/6 = 0.5
    assert b.state == OPEN


@pytest.mark.parametrize(("ratio", "fails", "total"), [(0.3, 3, 10), (0.1, 1, 10), (0.7, 7, 10), (1.0, 5, 5)])
def test_ratio_boundary_is_inclusive(ratio: float, fails: int, total: int) -> None:
    b = make(ManualClock(), failure_ratio=ratio, min_requests=total)
    for _ in range(total - fails):
        b.on_success()
    for _ in range(fails - 1):
        b.on_failure()
    assert b.state == CLOSED
    b.on_failure()
    assert b.state == OPEN


def test_success_can_complete_min_requests_and_trip() -> None:
    b = make(ManualClock(), failure_ratio=0.5, min_requests=4)
    for _ in range(3):
        b.on_failure()
    assert b.state == CLOSED
    b.on_success()  # 3/4 with min_requests reached
    assert b.state == OPEN


def test_old_failures_age_out_of_window() -> None:
    clock = ManualClock()
    b = make(clock, window_s=10.0, min_requests=4)
    for _ in range(3):
        b.on_failure()
    clock.advance(10.0)
    assert b.window_counts() == (0, 0)
    b.on_failure()
    assert b.state == CLOSED
    assert b.window_counts() == (1, 1)


def test_window_slides_bucket_by_bucket() -> None:
    clock = ManualClock(0.0)
    b = make(clock, window_s=10.0, min_requests=100)
    for _ in range(BUCKETS):
        b.on_failure()
        clock.advance(1.0)
    # ten failures, one per bucket; the first has just aged out
    assert b.window_counts() == (9, 9)
    clock.advance(4.0)
    assert b.window_counts() == (5, 5)
    clock.advance(1000.0)  # long idle gap: all buckets cleared, O(BUCKETS) work
    assert b.window_counts() == (0, 0)


def test_failures_spread_within_window_trip() -> None:
    clock = ManualClock(0.0)
    b = make(clock, window_s=10.0, min_requests=4)
    for _ in range(3):
        b.on_failure()
        clock.advance(2.5)
    assert b.state == CLOSED
    b.on_failure()  # first failure at t=0 is still in the window at t=7.5
    assert b.state == OPEN


def test_clock_going_backwards_does_not_corrupt_window() -> None:
    clock = ManualClock(100.0)
    b = make(clock, min_requests=100)
    b.on_failure()
    clock.now = 50.0
    b.on_failure()
    assert b.window_counts() == (2, 2)


# -- open ------------------------------------------------------------------------------------------


def test_open_never_lets_anything_through_before_open_for() -> None:
    clock = ManualClock()
    b = make(clock, open_for_s=5.0)
    trip(b)
    opened = clock.now
    while clock.now < opened + 5.0 - 1e-9:
        assert not b.try_acquire()
        assert b.state == OPEN
        clock.advance(0.01)
    clock.now = opened + 5.0
    assert b.try_acquire()
    assert b.state == HALF_OPEN


def test_retry_after_counts_down() -> None:
    clock = ManualClock()
    b = make(clock, open_for_s=5.0)
    assert b.retry_after_s() == 0.0
    trip(b)
    assert b.retry_after_s() == pytest.approx(5.0)
    clock.advance(2.0)
    assert b.retry_after_s() == pytest.approx(3.0)
    clock.advance(10.0)
    assert b.retry_after_s() == 0.0  # elapsed, still OPEN until the next try_acquire
    assert b.state == OPEN
    b.try_acquire()
    assert b.retry_after_s() == 0.0


def test_outcomes_while_open_are_ignored() -> None:
    clock = ManualClock()
    b = make(clock)
    trip(b)
    for _ in range(10):
        b.on_success()
        b.on_failure()
        b.release()
    assert b.state == OPEN
    assert b.open_for_s == 5.0
    assert b.retry_after_s() == pytest.approx(5.0)


# -- half-open -------------------------------------------------------------------------------------


def test_half_open_limits_outstanding_probes() -> None:
    clock = ManualClock()
    b = make(clock, half_open_requests=2)
    to_half_open(b, clock)
    assert b.try_acquire()
    assert b.try_acquire()
    assert not b.try_acquire()
    assert not b.try_acquire()
    assert b.state == HALF_OPEN


def test_release_frees_probe_slot() -> None:
    clock = ManualClock()
    b = make(clock, half_open_requests=1)
    to_half_open(b, clock)
    assert b.try_acquire()
    assert not b.try_acquire()
    b.release()
    assert b.state == HALF_OPEN
    assert b.try_acquire()
    b.release()
    b.release()  # extra releases never make the count negative
    assert b.try_acquire()
    assert not b.try_acquire()


def test_success_frees_slot_and_closes_after_enough() -> None:
    clock = ManualClock()
    b = make(clock, half_open_requests=2)
    to_half_open(b, clock)
    assert b.try_acquire() and b.try_acquire()
    b.on_success()
    assert b.state == HALF_OPEN
    assert b.try_acquire()  # slot freed by the success
    b.on_success()
    assert b.state == CLOSED
    assert b.window_counts() == (0, 0)  # window reset on close


def test_window_cleared_on_close_so_old_failures_do_not_retrip() -> None:
    clock = ManualClock()
    b = make(clock, min_requests=4, half_open_requests=1)
    to_half_open(b, clock)
    b.try_acquire()
    b.on_success()
    assert b.state == CLOSED
    b.on_failure()
    assert b.state == CLOSED


def test_backoff_doubles_up_to_max_and_resets_on_close() -> None:
    clock = ManualClock()
    b = make(clock, open_for_s=1.0, max_open_for_s=5.0, half_open_requests=1)
    trip(b)
    durations = []
    for _ in range(5):
        durations.append(b.retry_after_s())
        clock.advance(b.retry_after_s())
        assert b.try_acquire()
        b.on_failure()
        assert b.state == OPEN
    durations.append(b.retry_after_s())
    assert durations == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
    clock.advance(b.retry_after_s())
    assert b.try_acquire()
    b.on_success()
    assert b.state == CLOSED
    trip(b)
    assert b.retry_after_s() == pytest.approx(1.0)


def test_default_max_open_for_is_8x() -> None:
    clock = ManualClock()
    b = make(clock, open_for_s=1.0, half_open_requests=1)
    trip(b)
    for _ in range(10):
        clock.advance(b.retry_after_s())
        b.try_acquire()
        b.on_failure()
    assert b.open_for_s == 8.0


# -- latency trigger -------------------------------------------------------------------------------


def test_slow_success_counts_as_failure() -> None:
    b = make(ManualClock(), latency_threshold_s=0.5, min_requests=4, failure_ratio=0.5)
    b.on_success(0.5)  # not strictly above the threshold: a success
    b.on_success(0.1)
    assert b.window_counts() == (2, 0)
    b.on_success(0.6)
    b.on_success(2.0)
    assert b.state == OPEN


def test_slow_probe_reopens() -> None:
    clock = ManualClock()
    b = make(clock, latency_threshold_s=0.5)
    to_half_open(b, clock)
    b.try_acquire()
    b.on_success(1.0)
    assert b.state == OPEN
    assert b.open_for_s == 10.0


def test_latency_ignored_without_threshold() -> None:
    b = make(ManualClock())
    for _ in range(10):
        b.on_success(100.0)
    assert b.state == CLOSED
    assert b.window_counts() == (10, 0)


# -- overrides, observation, validation ------------------------------------------------------------


def test_force_open_and_reset() -> None:
    clock = ManualClock()
    b = make(clock)
    b.force_open()
    assert b.state == OPEN
    assert not b.try_acquire()
    clock.advance(3.0)
    b.force_open()  # restarts the timer, not a state change
    assert b.retry_after_s() == pytest.approx(5.0)
    assert b.transitions == 1
    b.reset()
    assert b.state == CLOSED
    assert b.try_acquire()
    assert b.transitions == 2


def test_reset_while_closed_clears_window() -> None:
    b = make(ManualClock(), min_requests=4)
    for _ in range(3):
        b.on_failure()
    b.reset()
    assert b.window_counts() == (0, 0)
    assert b.transitions == 0
    b.on_failure()
    assert b.state == CLOSED


def test_transition_log_full_cycle() -> None:
    clock = ManualClock()
    b = make(clock, half_open_requests=1)
    log: list[tuple[str, str]] = []
    b.on_transition(lambda o, n: log.append((o, n)))
    assert b.last_transition is None
    trip(b)
    clock.advance(5.0)
    b.try_acquire()
    b.on_failure()
    clock.advance(10.0)
    b.try_acquire()
    b.on_success()
    assert log == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert b.transitions == 5
    assert b.last_transition == (HALF_OPEN, CLOSED)


def test_repr_shows_state() -> None:
    clock = ManualClock()
    b = make(clock)
    assert "state=closed" in repr(b)
    trip(b)
    r = repr(b)
    assert "state=open" in r and "transitions=1" in r


@pytest.mark.parametrize(
    "kw",
    [
        {"failure_ratio": 0.0},
        {"failure_ratio": 1.5},
        {"min_requests": 0},
        {"window_s": 0.0},
        {"window_s": float("inf")},
        {"open_for_s": 0.0},
        {"half_open_requests": 0},
        {"max_open_for_s": 1.0},
        {"latency_threshold_s": 0.0},
    ],
)
def test_validation(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make(ManualClock(), **kw)
