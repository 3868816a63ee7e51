"""Slow start ramp curve and per-target ramp state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy.slow_start import SlowStart, ramp_fraction
from tests.helpers import ManualClock


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [(0.0, 0.1), (1.0, 0.1), (2.5, 0.25), (5.0, 0.5), (7.5, 0.75), (9.99, 0.999), (10.0, 1.0), (50.0, 1.0)],
)
def test_linear_curve(elapsed: float, expected: float) -> None:
    assert ramp_fraction(elapsed, 10.0, 1.0, 0.1) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [
        (0.0, 0.1),
        (0.05, 0.1),
        (0.5, 0.22360679774997896),
        (1.0, 0.31622776601683794),
        (2.5, 0.5),
        (5.0, 0.7071067811865476),
        (10.0, 1.0),
    ],
)
def test_aggression_two_is_square_root(elapsed: float, expected: float) -> None:
    assert ramp_fraction(elapsed, 10.0, 2.0, 0.1) == pytest.approx(expected)


def test_aggression_below_one_ramps_late() -> None:
    assert ramp_fraction(5.0, 10.0, 0.5, 0.0) == pytest.approx(0.25)


def test_edges() -> None:
    assert ramp_fraction(-3.0, 10.0, 1.0, 0.2) == 0.2
    assert ramp_fraction(5.0, 0.0, 1.0, 0.2) == 1.0
    assert ramp_fraction(5.0, -1.0, 1.0, 0.2) == 1.0
    assert ramp_fraction(0.0, 10.0, 1.0, 0.0) == 0.0
    assert ramp_fraction(5.0, 10.0, 1.0, 1.5) == 1.0  # floor clipped to 1.0
    with pytest.raises(ValueError):
        ramp_fraction(5.0, 10.0, 0.0, 0.1)


@given(
    window=st.floats(0.1, 1000.0),
    aggression=st.floats(0.1, 10.0),
    min_fraction=st.floats(0.0, 1.0),
    a=st.floats(-10.0, 2000.0),
    b=st.floats(-10.0, 2000.0),
)
def test_monotonic_and_bounded(
    window: float, aggression: float, min_fraction: float, a: float, b: float
) -> None:
    lo, hi = sorted((a, b))
    f_lo = ramp_fraction(lo, window, aggression, min_fraction)
    f_hi = ramp_fraction(hi, window, aggression, min_fraction)
    assert min_fraction <= f_lo <= f_hi <= 1.0


def test_more_aggression_ramps_faster() -> None:
    for elapsed in (1.0, 3.0, 6.0, 9.0):
        assert ramp_fraction(elapsed, 10.0, 3.0, 0.0) > ramp_fraction(elapsed, 10.0, 1.0, 0.0)


def test_slow_start_starts_finished(clock: ManualClock) -> None:
    ss = SlowStart(30.0, 1.0, 0.1, clock)
    assert ss.fraction() == 1.0
    assert not ss.in_ramp()
    assert ss.cap(100) == 100


def test_slow_start_ramp(clock: ManualClock) -> None:
    ss = SlowStart(10.0, 1.0, 0.1, clock)
    ss.restart()
    assert ss.in_ramp()
    assert ss.fraction() == pytest.approx(0.1)
    clock.advance(5.0)
    assert ss.fraction() == pytest.approx(0.5)
    assert ss.in_ramp()
    clock.advance(5.0)
    assert ss.fraction() == 1.0
    assert not ss.in_ramp()
    # Latched: done stays done without further clock arithmetic.
    assert "done" in repr(ss)
    ss.restart()
    assert ss.fraction() == pytest.approx(0.1)


def test_finish_skips_ramp(clock: ManualClock) -> None:
    ss = SlowStart(10.0, 1.0, 0.1, clock)
    ss.restart()
    clock.advance(1.0)
    ss.finish()
    assert ss.fraction() == 1.0
    assert not ss.in_ramp()


def test_zero_window_never_ramps(clock: ManualClock) -> None:
    ss = SlowStart(0.0, 1.0, 0.1, clock)
    ss.restart()
    assert ss.fraction() == 1.0
    assert not ss.in_ramp()


def test_cap_ramps_with_weight(clock: ManualClock) -> None:
    ss = SlowStart(10.0, 1.0, 0.1, clock)
    ss.restart()
    assert ss.cap(100) == 10
    assert ss.cap(5) == 1  # ceil(0.5)
    assert ss.cap(1) == 1
    assert ss.cap(0) == 1
    clock.advance(3.0)
    assert ss.cap(100) == 30  # exactly 30, not 31 from float noise
    clock.advance(0.01)
    assert ss.cap(100) == 31
    clock.advance(6.99)
    assert ss.cap(100) == 100
    caps = []
    ss.restart()
    for _ in range(11):
        caps.append(ss.cap(64))
        clock.advance(1.0)
    assert caps == sorted(caps)
    assert caps[0] == 7 and caps[-1] == 64


def test_rejects_bad_aggression(clock: ManualClock) -> None:
    with pytest.raises(ValueError):
        SlowStart(10.0, 0.0, 0.1, clock)


def test_repr_in_ramp(clock: ManualClock) -> None:
    ss = SlowStart(10.0, 2.0, 0.1, clock)
    ss.restart()
    clock.advance(2.5)
    assert repr(ss) == "SlowStart(window_s=10, aggression=2, started_at=1000, fraction=0.500)"
