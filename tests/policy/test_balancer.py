"""Smooth weighted round robin and weighted P2C least-request."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.balancer import LeastRequestP2C, SmoothWeightedRoundRobin


def picks(swrr: SmoothWeightedRoundRobin, weights: list[float], n: int) -> list[int]:
    return [swrr.pick(weights) for _ in range(n)]


def test_swrr_nginx_documented_sequence() -> None:
    swrr = SmoothWeightedRoundRobin(3)
    seq = "".join("abc"[i] for i in picks(swrr, [5, 1, 1], 14))
    assert seq == "aabacaa" * 2


def test_swrr_exact_sequences() -> None:
    assert picks(SmoothWeightedRoundRobin(2), [3, 1], 8) == [0, 0, 1, 0] * 2
    assert picks(SmoothWeightedRoundRobin(3), [1, 1, 1], 6) == [0, 1, 2] * 2
    assert picks(SmoothWeightedRoundRobin(3), [2, 0, 1], 6) == [0, 2, 0] * 2
    assert picks(SmoothWeightedRoundRobin(1), [1], 3) == [0, 0, 0]


def test_swrr_none_eligible() -> None:
    swrr = SmoothWeightedRoundRobin(3)
    assert swrr.pick([0, 0, 0]) == -1
    assert swrr.pick([-1, 0, -0.5]) == -1
    assert SmoothWeightedRoundRobin(0).pick([]) == -1


def test_swrr_proportions_3_1() -> None:
    counts = Counter(picks(SmoothWeightedRoundRobin(2), [3, 1], 10_000))
    assert counts == {0: 7500, 1: 2500}


def test_swrr_fractional_weights() -> None:
    # A slow-starting target at 0.25 of weight 1 next to two full ones.
    counts = Counter(picks(SmoothWeightedRoundRobin(3), [1.0, 1.0, 0.25], 9000))
    assert counts[0] == pytest.approx(4000, abs=2)
    assert counts[1] == pytest.approx(4000, abs=2)
    assert counts[2] == pytest.approx(1000, abs=2)


def test_swrr_skips_ineligible_and_recovers() -> None:
    swrr = SmoothWeightedRoundRobin(3)
    weights = [1.0, 1.0, 1.0]
    picks(swrr, weights, 5)
    weights[1] = 0.0
    assert set(picks(swrr, weights, 100)) == {0, 2}
    weights[1] = 1.0
    counts = Counter(picks(swrr, weights, 300))
    assert counts == {0: 100, 1: 100, 2: 100}


def test_swrr_pool_size_change_resets() -> None:
    swrr = SmoothWeightedRoundRobin(2)
    swrr.pick([1, 1])
    assert picks(swrr, [5, 1, 1], 7) == [0, 0, 1, 0, 2, 0, 0]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(0.05, 10.0)), min_size=1, max_size=8))
def test_swrr_is_smooth_and_proportional(weights: list[float]) -> None:
    swrr = SmoothWeightedRoundRobin(len(weights))
    total = sum(weights)
    rounds = 200
    n = rounds * len(weights)
    seen = Counter(picks(swrr, weights, n))
    if total == 0:
        assert seen == {-1: n}
        return
    for i, w in enumerate(weights):
        # SWRR keeps every target within one pick of its exact share.
        assert abs(seen[i] - n * w / total) <= len(weights) + 1e-6
    assert -1 not in seen


def test_p2c_single_and_none_eligible() -> None:
    p2c = LeastRequestP2C(random.Random(1))
    assert p2c.pick([0, 0], [0, 0]) == -1
    assert p2c.pick([], []) == -1
    assert p2c.pick([0, 2, 0], [0, 99, 0]) == 1


def test_p2c_two_targets_prefers_less_loaded() -> None:
    p2c = LeastRequestP2C(random.Random(2))
    for _ in range(200):
        assert p2c.pick([1, 1], [5, 2]) == 1
        assert p2c.pick([1, 1], [0, 3]) == 0


def test_p2c_weight_aware() -> None:
    p2c = LeastRequestP2C(random.Random(3))
    # (in_flight + 1) / weight: 4/4 = 1.0 beats 2/1 = 2.0.
    assert all(p2c.pick([4, 1], [3, 1]) == 0 for _ in range(100))
    # Idle targets compare by weight alone.
    assert all(p2c.pick([1, 3], [0, 0]) == 1 for _ in range(100))
    # A slow-starting target (fractional weight) is avoided unless the other is busy.
    assert all(p2c.pick([1.0, 0.1], [5, 0]) == 0 for _ in range(100))
    assert all(p2c.pick([1.0, 0.1], [20, 0]) == 1 for _ in range(100))


def test_p2c_tie_goes_to_first_drawn() -> None:
    p2c = LeastRequestP2C(random.Random(4))
    counts = Counter(p2c.pick([1, 1], [2, 2]) for _ in range(2000))
    assert set(counts) == {0, 1}
    assert 800 < counts[0] < 1200


def test_p2c_never_picks_the_more_loaded_of_many() -> None:
    # The most loaded target can only win if it is drawn against itself, which P2C never does.
    p2c = LeastRequestP2C(random.Random(5))
    in_flight = [0, 1, 2, 3, 50]
    counts = Counter(p2c.pick([1] * 5, in_flight) for _ in range(5000))
    assert counts[4] == 0
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0
    # Target 0 wins every pair it is drawn into: 2/5 of picks.
    assert counts[0] == pytest.approx(2000, rel=0.1)


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.one_of(st.just(0.0), st.just(-1.0), st.floats(0.01, 10.0)), min_size=1, max_size=10),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_p2c_never_returns_ineligible(weights: list[float], seed: int, data: st.DataObject) -> None:
    in_flight = data.draw(st.lists(st.integers(0, 100), min_size=len(weights), max_size=len(weights)))
    p2c = LeastRequestP2C(random.Random(seed))
    eligible = {i for i, w in enumerate(weights) if w > 0}
    for _ in range(50):
        i = p2c.pick(weights, in_flight)
        if eligible:
            assert i in eligible
        else:
            assert i == -1


def test_p2c_spreads_over_all_eligible() -> None:
    p2c = LeastRequestP2C(random.Random(6))
    counts = Counter(p2c.pick([1, 0, 1, 1, 0, 1], [0] * 6) for _ in range(4000))
    assert set(counts) == {0, 2, 3, 5}
    for i in (0, 2, 3, 5):
        assert counts[i] == pytest.approx(1000, rel=0.15)


def test_p2c_seeded_determinism() -> None:
    weights = [1.0, 2.0, 0.0, 0.5, 1.0]
    in_flight = [3, 1, 0, 0, 2]
    a = LeastRequestP2C(random.Random(42))
    b = LeastRequestP2C(random.Random(42))
    seq_a = [a.pick(weights, in_flight) for _ in range(500)]
    seq_b = [b.pick(weights, in_flight) for _ in range(500)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1


def test_reprs() -> None:
    swrr = SmoothWeightedRoundRobin(2)
    swrr.pick([3, 1])
    assert repr(swrr) == "SmoothWeightedRoundRobin(current=[-1, 1])"
    assert repr(LeastRequestP2C(random.Random(0))) == "LeastRequestP2C(rng=Random)"
