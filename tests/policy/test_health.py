"""Active health check hysteresis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy.health import HealthState


def test_becomes_unhealthy_after_consecutive_failures() -> None:
    h = HealthState(healthy_threshold=2, unhealthy_threshold=3)
    assert h.healthy
    assert [h.on_failure() for _ in range(3)] == [False, False, True]
    assert not h.healthy
    assert h.on_failure() is False  # already unhealthy: no flip


def test_becomes_healthy_after_consecutive_successes() -> None:
    h = HealthState(healthy_threshold=2, unhealthy_threshold=3, healthy=False)
    assert not h.healthy
    assert [h.on_success() for _ in range(3)] == [False, True, False]
    assert h.healthy


def test_opposite_observation_resets_streak() -> None:
    h = HealthState(healthy_threshold=2, unhealthy_threshold=3)
    h.on_failure()
    h.on_failure()
    assert h.on_success() is False
    assert [h.on_failure() for _ in range(3)] == [False, False, True]
    h.on_success()
    assert h.on_failure() is False
    assert [h.on_success() for _ in range(2)] == [False, True]


def test_threshold_one_flips_immediately() -> None:
    h = HealthState(healthy_threshold=1, unhealthy_threshold=1)
    assert h.on_failure() is True
    assert h.on_success() is True
    assert h.on_success() is False


@given(
    up=st.integers(1, 5),
    down=st.integers(1, 5),
    start=st.booleans(),
    observations=st.lists(st.booleans(), max_size=60),
)
def test_matches_reference_model(up: int, down: int, start: bool, observations: list[bool]) -> None:
    h = HealthState(up, down, healthy=start)
    state = start
    for i, ok in enumerate(observations):
        flipped = h.on_success() if ok else h.on_failure()
        # Reference: flip iff the last `threshold` observations all disagree with the state.
        threshold = up if ok else down
        window = observations[max(0, i - threshold + 1) : i + 1]
        expect_flip = ok != state and len(window) == threshold and all(o == ok for o in window)
        assert flipped == expect_flip
        if flipped:
            state = ok
        assert h.healthy == state


def test_rejects_bad_thresholds() -> None:
    with pytest.raises(ValueError):
        HealthState(0, 1)
    with pytest.raises(ValueError):
        HealthState(1, 0)


def test_repr() -> None:
    h = HealthState(2, 3)
    h.on_failure()
    assert repr(h) == "HealthState(healthy, streak=1/3)"
    h.on_failure()
    h.on_failure()
    assert repr(h) == "HealthState(unhealthy, streak=0/2)"
