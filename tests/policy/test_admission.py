from __future__ import annotations

import random

import pytest

from gateway.policy.admission import (
    ADAPTIVE_LIFO,
    CRITICAL,
    DEFAULT,
    FIFO,
    SHEDDABLE,
    Admission,
    reserve_for,
)
from tests.helpers import ManualClock


def make(
    clock: ManualClock, limit: int = 2, queue_size: int = 10, timeout: float = 1.0, **kw: object
) -> Admission[str]:
    return Admission(limit, queue_size, timeout, clock, **kw)  # type: ignore[arg-type]


def fill(a: Admission[str], n: int | None = None) -> None:
    for _ in range(a.limit if n is None else n):
        assert a.try_acquire()


# -- the cap ---------------------------------------------------------------------------------------


def test_try_acquire_up_to_limit() -> None:
    a = make(ManualClock(), limit=3)
    assert [a.try_acquire() for _ in range(5)] == [True, True, True, False, False]
    assert a.in_flight == 3


def test_release_without_waiters() -> None:
    a = make(ManualClock())
    fill(a)
    assert a.release() == (None, [])
    assert a.in_flight == 1
    assert a.try_acquire()


def test_unmatched_release_never_goes_negative() -> None:
    a = make(ManualClock())
    assert a.release() == (None, [])
    assert a.release() == (None, [])
    assert a.in_flight == 0
    fill(a)
    assert a.in_flight == 2


def test_limit_zero_admits_nobody() -> None:
    a = make(ManualClock(), limit=0)
    assert not a.try_acquire(CRITICAL)
    a.enqueue("w")
    assert a.release() == (None, [])
    assert a.in_flight == 0


# -- FIFO ------------------------------------------------------------------------------------------


def test_fifo_order() -> None:
    clock = ManualClock()
    a = make(clock, limit=1)
    fill(a)
    for w in "abcd":
        assert a.enqueue(w) == []
        clock.advance(0.01)
    assert a.queued == 4
    got = [a.release()[0] for _ in range(4)]
    assert got == list("abcd")
    assert a.in_flight == 1  # each admitted waiter took the freed slot
    assert a.queued == 0
    assert a.release() == (None, [])
    assert a.in_flight == 0


def test_no_queue_jumping() -> None:
    a = make(ManualClock(), limit=1)
    fill(a)
    a.enqueue("w")
    a.limit = 2  # a slot is free, but a DEFAULT waiter is queued
    assert not a.try_acquire(DEFAULT)
    assert not a.try_acquire(SHEDDABLE)
    assert a.try_acquire(CRITICAL)  # higher priority than anyone queued


# -- priorities ------------------------------------------------------------------------------------


def test_higher_priority_served_first() -> None:
    clock = ManualClock()
    a = make(clock, limit=1)
    fill(a)
    a.enqueue("s1", SHEDDABLE)
    a.enqueue("d1", DEFAULT)
    a.enqueue("c1", CRITICAL)
    a.enqueue("d2", DEFAULT)
    a.enqueue("c2", CRITICAL)
    a.limit = 100
    got = [a.release()[0] for _ in range(5)]
    assert got == ["c1", "c2", "d1", "d2", "s1"]


def test_full_queue_displaces_newest_lower_priority() -> None:
    a = make(ManualClock(), limit=1, queue_size=3)
    fill(a)
    assert a.enqueue("s1", SHEDDABLE) == []
    assert a.enqueue("d1", DEFAULT) == []
    assert a.enqueue("s2", SHEDDABLE) == []
    assert a.enqueue("c1", CRITICAL) == ["s2"]  # newest of the lowest class
    assert a.enqueue("d2", DEFAULT) == ["s1"]
    assert a.queued_by_priority() == (1, 2, 0)
    assert a.enqueue("d3", DEFAULT) == ["d3"]  # only equal or higher priority queued
    assert a.enqueue("s3", SHEDDABLE) == ["s3"]
    assert a.enqueue("c2", CRITICAL) == ["d2"]  # newest DEFAULT
    assert a.enqueue("c3", CRITICAL) == ["d1"]
    assert a.enqueue("c4", CRITICAL) == ["c4"]
    assert a.queued == 3


def test_queue_size_zero_sheds_every_arrival() -> None:
    a = make(ManualClock(), limit=1, queue_size=0)
    fill(a)
    assert a.enqueue("x", CRITICAL) == ["x"]
    assert a.queued == 0


@pytest.mark.parametrize(
    ("limit", "reserve"), [(0, 0), (1, 1), (9, 1), (10, 1), (11, 2), (20, 2), (30, 3), (70, 7), (101, 11)]
)
def test_reserve_is_ceil_tenth(limit: int, reserve: int) -> None:
    assert reserve_for(limit) == reserve


def test_sheddable_keeps_headroom_for_others() -> None:
    a = make(ManualClock(), limit=20)
    assert sum(a.try_acquire(SHEDDABLE) for _ in range(25)) == 18
    assert a.try_acquire(DEFAULT)
    assert a.try_acquire(CRITICAL)
    assert not a.try_acquire(CRITICAL)


def test_sheddable_never_admitted_with_limit_one() -> None:
    a = make(ManualClock(), limit=1)
    assert not a.try_acquire(SHEDDABLE)
    assert a.try_acquire(DEFAULT)


def test_sheddable_waiter_admitted_below_its_cap() -> None:
    a = make(ManualClock(), limit=10)
    fill(a, 9)
    assert not a.try_acquire(SHEDDABLE)  # cap is 9
    a.enqueue("s", SHEDDABLE)
    assert a.release() == ("s", [])  # in_flight 8 < 9
    assert a.in_flight == 9


def test_release_respects_sheddable_cap() -> None:
    a = make(ManualClock(), limit=10)
    fill(a, 10)
    a.enqueue("s", SHEDDABLE)
    assert a.release() == (None, [])  # in_flight 9 == cap 9: the reserved slot stays free
    assert a.queued == 1
    assert a.try_acquire(DEFAULT)  # ... for non-sheddable traffic
    a.release()
    a.release()
    assert a.in_flight == 9
    assert a.queued == 0


# -- limit changes ---------------------------------------------------------------------------------


def test_lowering_limit_admits_nobody_until_below() -> None:
    a = make(ManualClock(), limit=4)
    fill(a)
    for w in "abc":
        a.enqueue(w)
    a.limit = 2
    assert a.release() == (None, [])  # 3 in flight
    assert a.release() == (None, [])  # 2 in flight
    assert not a.try_acquire(CRITICAL)
    assert a.release() == ("a", [])  # 1 in flight -> admit one, back to 2
    assert a.in_flight == 2


def test_raising_limit_lets_release_and_pump_admit() -> None:
    a = make(ManualClock(), limit=1)
    fill(a)
    for w in "abcde":
        a.enqueue(w)
    a.limit = 4
    assert a.release() == ("a", [])  # one per release
    assert a.in_flight == 1
    assert a.pump() == (["b", "c", "d"], [])
    assert a.in_flight == 4
    assert a.queued == 1
    assert a.pump() == ([], [])


# -- cancel ----------------------------------------------------------------------------------------


def test_cancel() -> None:
    a = make(ManualClock(), limit=1)
    fill(a)
    for w in "abc":
        a.enqueue(w)
    assert a.cancel("b")
    assert not a.cancel("b")
    assert not a.cancel("zzz")
    assert a.queued == 2
    assert [a.release()[0] for _ in range(3)] == ["a", "c", None]
    assert not a.cancel("a")  # admitted already
    assert a.queued == 0


def test_cancel_frees_queue_space() -> None:
    a = make(ManualClock(), limit=1, queue_size=1)
    fill(a)
    a.enqueue("a")
    assert a.enqueue("b") == ["b"]
    a.cancel("a")
    assert a.enqueue("b") == []


def test_many_cancels_are_compacted() -> None:
    a = make(ManualClock(), limit=1, queue_size=10_000)
    fill(a)
    waiters = [f"w{i}" for i in range(1000)]
    for w in waiters:
        a.enqueue(w)
    for w in waiters[:-1]:
        assert a.cancel(w)
    assert a.queued == 1
    assert sum(len(q) for q in a._queues) < 100  # dead entries do not pile up
    assert a.release() == ("w999", [])


def test_duplicate_enqueue_rejected() -> None:
    a = make(ManualClock(), limit=0)
    a.enqueue("a")
    with pytest.raises(ValueError):
        a.enqueue("a")
    a.cancel("a")
    assert a.enqueue("a") == []


# -- timeouts --------------------------------------------------------------------------------------


def test_expire_and_next_deadline() -> None:
    clock = ManualClock()
    a = make(clock, limit=1, timeout=1.0)
    fill(a)
    assert a.next_deadline() is None
    a.enqueue("a")
    clock.advance(0.3)
    a.enqueue("b", CRITICAL)
    assert a.next_deadline() == pytest.approx(1001.0)
    clock.advance(0.5)
    assert a.expire() == []
    clock.now = a.next_deadline()  # type: ignore[assignment]
    assert a.expire() == ["a"]
    assert a.next_deadline() == pytest.approx(1001.3)
    clock.now = a.next_deadline()  # type: ignore[assignment]
    assert a.expire() == ["b"]
    assert a.next_deadline() is None
    assert a.queued == 0


@pytest.mark.parametrize("start", [1000.1, 0.1, 12345.678, 1e6 + 0.7])
def test_deadline_and_expire_agree_despite_rounding(start: float) -> None:
    clock = ManualClock(start)
    a = make(clock, limit=0, timeout=0.3)
    a.enqueue("a")
    deadline = a.next_deadline()
    assert deadline is not None
    clock.now = deadline
    assert a.expire() == ["a"]


def test_cancelled_waiter_not_expired_and_not_deadline() -> None:
    clock = ManualClock()
    a = make(clock, limit=0, timeout=1.0)
    a.enqueue("a")
    clock.advance(0.5)
    a.enqueue("b")
    a.cancel("a")
    assert a.next_deadline() == pytest.approx(1001.5)
    clock.advance(10)
    assert a.expire() == ["b"]


def test_release_expires_before_admitting() -> None:
    clock = ManualClock()
    a = make(clock, limit=1, timeout=1.0)
    fill(a)
    a.enqueue("old")
    clock.advance(0.9)
    a.enqueue("new")
    clock.advance(0.1)
    assert a.release() == ("new", ["old"])


def test_enqueue_expires_first() -> None:
    clock = ManualClock()
    a = make(clock, limit=1, queue_size=1, timeout=1.0)
    fill(a)
    a.enqueue("old")
    clock.advance(1.0)
    assert a.enqueue("new") == ["old"]
    assert a.queued == 1


# -- adaptive LIFO + CoDel -------------------------------------------------------------------------


def make_codel(clock: ManualClock) -> Admission[str]:
    return make(clock, limit=1, timeout=10.0, mode=ADAPTIVE_LIFO, codel_target_s=0.005, codel_interval_s=0.1)


def test_adaptive_is_fifo_while_not_standing() -> None:
    clock = ManualClock()
    a = make_codel(clock)
    fill(a)
    for w in "abc":
        a.enqueue(w)
        clock.advance(0.001)
    assert not a.is_standing()
    assert [a.release()[0] for _ in range(3)] == ["a", "b", "c"]


def test_adaptive_switches_to_lifo_when_standing_and_sheds_after_target() -> None:
    clock = ManualClock(1000.0)

    def at(ms: float) -> None:
        clock.now = 1000.0 + ms / 1000

    a = make_codel(clock)  # target 5ms, interval 100ms
    fill(a)
    a.enqueue("a")
    at(98)
    assert a.enqueue("b") == []  # "a" waited 98ms: not standing yet, full timeout applies
    at(99.9)
    assert not a.is_standing()
    at(100)
    assert a.is_standing()  # non-empty for a whole interval
    assert a.enqueue("c") == ["a"]  # timeout is now the target: "a" is shed, "b" (2ms) is not
    at(101)
    assert a.enqueue("d") == []
    assert a.is_standing()  # the queue never went empty
    assert a.release() == ("d", [])  # newest first
    assert a.release() == ("c", [])
    at(102.9)
    assert a.expire() == []
    at(103.1)  # "b" has now waited more than 5ms
    assert a.release() == (None, ["b"])
    # drained empty for a whole interval: FIFO again with the full timeout
    assert not a.is_standing()
    at(210)
    a.enqueue("e")
    at(250)
    a.enqueue("f")
    assert a.release() == ("e", [])


def test_standing_survives_a_queue_emptied_by_shedding() -> None:
    """Hysteresis: shedding empties the queue, but the overload goes on: the next waiter does not
    start a fresh FIFO interval (which would let it wait the full timeout)."""
    clock = ManualClock()
    a = make_codel(clock)
    fill(a)
    a.enqueue("a")
    clock.advance(0.1)
    assert a.enqueue("b") == ["a"]  # standing: "a" waited far past the 5 ms target
    assert a.is_standing()
    clock.advance(0.006)
    assert a.expire() == ["b"]  # shed after the target, not after 10 s


def test_interval_restarts_after_a_full_quiet_interval() -> None:
    clock = ManualClock()
    a = make_codel(clock)
    fill(a)
    a.enqueue("a")
    clock.advance(0.1)
    assert a.enqueue("b") == ["a"]
    assert a.cancel("b")  # empty from now on
    clock.advance(0.1)  # one whole interval with nobody waiting: the overload is over
    a.enqueue("c")
    assert not a.is_standing()
    clock.advance(0.05)
    assert a.expire() == []


def test_adaptive_lifo_keeps_priorities() -> None:
    clock = ManualClock(1000.0)
    a = make_codel(clock)
    fill(a)
    a.enqueue("d1", DEFAULT)
    clock.now = 1000.098
    a.enqueue("c1", CRITICAL)
    clock.now = 1000.1
    assert a.is_standing()
    assert a.enqueue("d2", DEFAULT) == ["d1"]  # c1 (2ms) stays
    clock.now = 1000.101
    a.enqueue("c2", CRITICAL)
    a.enqueue("d3", DEFAULT)
    a.enqueue("c3", CRITICAL)
    a.limit = 10
    assert a.pump() == (["c3", "c2", "c1", "d3", "d2"], [])


def test_adaptive_next_deadline() -> None:
    clock = ManualClock()
    a = make_codel(clock)
    fill(a)
    a.enqueue("a")
    # not standing before 1000.1; after that "a" (enqueued at 1000.0) is past target at once
    assert a.next_deadline() == pytest.approx(1000.1)
    clock.now = a.next_deadline()  # type: ignore[assignment]
    assert a.expire() == ["a"]
    clock.advance(0.1)  # a whole quiet interval ends the standing period
    a.enqueue("b")  # the interval starts again
    assert a.next_deadline() == pytest.approx(clock.now + 0.1)
    clock.advance(0.099)
    assert a.enqueue("c") == []
    # standing at b's enqueue + 0.1; b is older than target by then, c only 1ms old
    assert a.next_deadline() == pytest.approx(clock.now + 0.001)
    clock.advance(0.001)
    assert a.expire() == ["b"]
    assert a.next_deadline() == pytest.approx(clock.now + 0.004)  # c reaches the target
    clock.advance(0.004)
    assert a.expire() == ["c"]


def test_fifo_mode_never_standing() -> None:
    clock = ManualClock()
    a = make(clock, limit=1, timeout=10.0, mode=FIFO)
    fill(a)
    a.enqueue("a")
    clock.advance(5)
    a.enqueue("b")
    assert not a.is_standing()
    assert a.expire() == []
    assert a.release() == ("a", [])


def test_codel_target_longer_than_timeout_does_not_extend_it() -> None:
    clock = ManualClock()
    a = make(clock, limit=0, timeout=0.05, mode=ADAPTIVE_LIFO, codel_target_s=1.0, codel_interval_s=0.01)
    a.enqueue("a")
    clock.advance(0.05)
    assert a.expire() == ["a"]


# -- invariants under a random workload ------------------------------------------------------------


@pytest.mark.parametrize("mode", [FIFO, ADAPTIVE_LIFO])
@pytest.mark.parametrize("seed", range(5))
def test_random_workload_invariants(mode: str, seed: int) -> None:
    rng = random.Random(seed)
    clock = ManualClock()
    a = make(
        clock, limit=5, queue_size=8, timeout=0.05, mode=mode, codel_target_s=0.01, codel_interval_s=0.02
    )
    outstanding: set[str] = set()  # queued waiters, as far as the caller knows
    resolved: set[str] = set()
    holders = 0
    n = 0

    def resolve(ws: list[str]) -> None:
        for w in ws:
            assert w not in resolved
            resolved.add(w)
            outstanding.discard(w)

    for _ in range(3000):
        clock.advance(rng.random() * 0.004)
        op = rng.random()
        if op < 0.4:
            n += 1
            w = f"w{n}"
            prio = rng.choice([CRITICAL, DEFAULT, SHEDDABLE])
            if a.try_acquire(prio):
                holders += 1
            else:
                outstanding.add(w)
                shed = a.enqueue(w, prio)
                resolve(shed)
        elif op < 0.75 and holders:
            holders -= 1
            admitted, shed = a.release()
            resolve(shed)
            if admitted is not None:
                resolve([admitted])
                holders += 1
        elif op < 0.85 and outstanding:
            w = rng.choice(sorted(outstanding))
            assert a.cancel(w)
            resolve([w])
        elif op < 0.9:
            a.limit = rng.randint(0, 8)
        else:
            resolve(a.expire())
        assert a.in_flight == holders >= 0
        assert a.queued == len(outstanding) >= 0
        assert a.queued <= a.queue_size
        assert sum(a.queued_by_priority()) == a.queued
        assert all(c >= 0 for c in a.queued_by_priority())
        assert len(a._index) == a.queued
        assert a._dead >= 0


# -- misc ------------------------------------------------------------------------------------------


def test_repr_shows_state() -> None:
    clock = ManualClock()
    a = make_codel(clock)
    fill(a)
    a.enqueue("a")
    assert "in_flight=1/1" in repr(a) and "queued=1/10" in repr(a) and "(fifo)" in repr(a)
    clock.advance(1)
    assert "(standing)" in repr(a)


@pytest.mark.parametrize(
    "kw",
    [
        {"limit": -1},
        {"queue_size": -1},
        {"timeout": 0.0},
        {"mode": "lifo"},
        {"codel_target_s": 0.0},
        {"codel_interval_s": -1.0},
    ],
)
def test_validation(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make(ManualClock(), **kw)  # type: ignore[arg-type]


def test_invalid_priority() -> None:
    a = make(ManualClock())
    with pytest.raises(ValueError):
        a.try_acquire(3)
    with pytest.raises(ValueError):
        a.enqueue("x", -1)


def release_at_rate(a: Admission[str], clock: ManualClock, per_s: float, seconds: float) -> None:
    """Take and free a slot `per_s` times a second for `seconds` (the queue stays empty)."""
    for _ in range(round(per_s * seconds)):
        assert a.try_acquire()
        clock.advance(1.0 / per_s)
        assert a.release() == (None, [])


def test_standing_queue_is_bounded_by_what_the_slots_release_within_the_target() -> None:
    clock = ManualClock()
    a = make(clock, limit=1, queue_size=100, timeout=10.0, mode=ADAPTIVE_LIFO, codel_target_s=0.005)
    assert a.standing_bound() == 100  # no release rate measured yet: the configured size
    release_at_rate(a, clock, 800.0, 0.2)  # 800 releases/s over whole intervals
    assert a.standing_bound() == 4  # 800/s * 5 ms
    fill(a)
    a.enqueue("x")  # the queue starts standing one interval from now
    clock.advance(0.097)
    for w in "abcd":
        assert a.enqueue(w) == []  # not standing yet: only queue_size bounds
        clock.advance(0.0005)
    clock.advance(0.0015)
    assert a.is_standing()
    assert a.expire() == ["x"]  # waited past the target
    # Standing: 4 already wait, so each arrival displaces the oldest at once — after one
    # inter-arrival time, not after the 5 ms target — and LIFO still serves the newest first.
    assert a.enqueue("e") == ["a"]
    assert a.enqueue("f") == ["b"]
    assert a.queued == 4
    assert a.release() == ("f", [])


def test_standing_bound_sheds_the_arrival_when_everyone_waiting_outranks_it() -> None:
    clock = ManualClock()
    a = make(clock, limit=1, queue_size=100, timeout=10.0, mode=ADAPTIVE_LIFO, codel_target_s=0.005)
    release_at_rate(a, clock, 200.0, 0.2)  # bound: 200/s * 5 ms = 1
    assert a.standing_bound() == 1
    fill(a)
    a.enqueue("c0", CRITICAL)
    clock.advance(0.1)
    assert a.is_standing()
    assert a.enqueue("c1", CRITICAL) == ["c0"]  # c0 waited past the target
    assert a.enqueue("s1", SHEDDABLE) == ["s1"]  # nobody of its class or lower to displace
    assert a.enqueue("c2", CRITICAL) == ["c1"]  # same class: the oldest goes
    assert a.queued_by_priority() == (1, 0, 0)


def test_standing_bound_is_at_least_one_and_at_most_the_queue_size() -> None:
    clock = ManualClock()
    slow = make(clock, limit=1, queue_size=100, timeout=10.0, mode=ADAPTIVE_LIFO, codel_target_s=0.005)
    release_at_rate(slow, clock, 20.0, 0.5)  # 20/s * 5 ms = 0.1
    assert slow.standing_bound() == 1
    small = make(clock, limit=1, queue_size=3, timeout=10.0, mode=ADAPTIVE_LIFO, codel_target_s=0.005)
    release_at_rate(small, clock, 10_000.0, 0.2)
    assert small.standing_bound() == 3
