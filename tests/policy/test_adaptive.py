from __future__ import annotations

import itertools
import math

import pytest

from gateway.policy.adaptive import AIMDLimit, GradientLimit, LimitAlgorithm

# -- GradientLimit ---------------------------------------------------------------------------------


def feed(g: GradientLimit, rtt: float, n: int, in_flight: int | None = None) -> list[int]:
    """n samples; in_flight None means 'fully using the current limit'."""
    return [g.on_sample(rtt, g.limit if in_flight is None else in_flight, False) for _ in range(n)]


def test_steady_low_latency_grows_when_used() -> None:
    g = GradientLimit(initial_limit=20)
    limits = feed(g, 0.010, 50)
    assert limits == sorted(limits)  # monotone
    assert limits[-1] > 40
    assert g.long_rtt_s == pytest.approx(0.010)


def test_growth_stops_at_about_twice_what_is_used() -> None:
    g = GradientLimit(initial_limit=20)
    feed(g, 0.010, 500, in_flight=30)
    assert 30 <= g.limit <= 61
    before = g.estimate
    feed(g, 0.010, 100, in_flight=30)
    assert g.estimate == before  # app-limited: no further growth


def test_app_limited_does_not_grow() -> None:
    g = GradientLimit(initial_limit=100)
    feed(g, 0.010, 200, in_flight=10)
    assert g.limit == 100


def test_app_limited_may_still_shrink() -> None:
    g = GradientLimit(initial_limit=100)
    feed(g, 0.010, 50, in_flight=10)
    feed(g, 0.040, 20, in_flight=10)
    assert g.limit < 100


def test_latency_doubling_shrinks() -> None:
    g = GradientLimit(initial_limit=100)
    feed(g, 0.010, 100)
    high = g.limit
    limits = feed(g, 0.020, 30)
    assert limits[-1] < high
    assert all(b <= a for a, b in itertools.pairwise(limits))
    # gradient here is 1.5 * ~10ms / 20ms = 0.75: one step moves 20% of the way to 0.75*L + sqrt(L)
    g2 = GradientLimit(initial_limit=100)
    feed(g2, 0.010, 10, in_flight=100)  # long rtt == 10ms exactly after warm-up
    est = g2.estimate
    long = g2.long_rtt_s
    new = g2.on_sample(0.020, 100, False)
    target = est * (1.5 * (long * 599 / 601 + 0.020 * 2 / 601) / 0.020) + math.sqrt(int(est))
    assert g2.estimate == pytest.approx(est * 0.8 + target * 0.2)
    assert new == int(g2.estimate)


def test_gradient_never_below_half() -> None:
    g = GradientLimit(initial_limit=100, queue_size=lambda _limit: 0.0, smoothing=1.0)
    feed(g, 0.001, 10, in_flight=100)
    g.on_sample(10.0, 100, False)  # latency x10000: gradient clamped to 0.5
    assert g.limit == 50


def test_tolerance_absorbs_moderate_latency_rise() -> None:
    g = GradientLimit(initial_limit=50, rtt_tolerance=1.5)
    feed(g, 0.010, 20)
    before = g.limit
    feed(g, 0.014, 20)  # 1.4x < tolerance: still gradient 1, still growing
    assert g.limit > before


def test_drops_shrink_multiplicatively() -> None:
    g = GradientLimit(initial_limit=100)
    assert g.on_sample(0.0, 100, True) == 90
    assert g.on_sample(0.0, 100, True) == 81
    assert g.long_rtt_s == 0.0  # drops do not feed the averages


def test_clamped_to_bounds() -> None:
    g = GradientLimit(initial_limit=10, min_limit=5, max_limit=30)
    for _ in range(100):
        g.on_sample(0.0, 10, True)
    assert g.limit == 5
    feed(g, 0.010, 1000)
    assert g.limit == 30
    assert g.estimate == 30.0


def test_invalid_rtt_ignored() -> None:
    g = GradientLimit(initial_limit=20)
    for rtt in (0.0, -1.0, math.inf, math.nan):
        assert g.on_sample(rtt, 20, False) == 20
    assert g.long_rtt_s == 0.0


def test_long_rtt_warmup_then_ewma() -> None:
    g = GradientLimit(long_window=9)  # factor 0.2
    for rtt in (0.01, 0.02, 0.03):
        g.on_sample(rtt, 0, False)
    assert g.long_rtt_s == pytest.approx(0.02)  # plain mean during warm-up
    feed(g, 0.02, 7, in_flight=0)
    assert g.long_rtt_s == pytest.approx(0.02)
    g.on_sample(0.03, 0, False)
    assert g.long_rtt_s == pytest.approx(0.02 * 0.8 + 0.03 * 0.2)


def test_long_rtt_drift_decays_after_recovery() -> None:
    g = GradientLimit(long_window=600)
    feed(g, 0.100, 600, in_flight=0)
    slow = g.long_rtt_s
    feed(g, 0.010, 20, in_flight=0)
    # plain EWMA would still be ~0.094 after 20 samples; the 0.95 decay brings it down much faster
    ewma_only = 0.010 + (slow - 0.010) * (1 - 2 / 601) ** 20
    assert g.long_rtt_s < 0.5 * ewma_only


def test_custom_queue_size() -> None:
    seen: list[int] = []

    def q(limit: int) -> float:
        seen.append(limit)
        return 4.0

    g = GradientLimit(initial_limit=20, queue_size=q, smoothing=1.0)
    g.on_sample(0.01, 20, False)
    assert seen == [20]
    assert g.limit == 24


def test_deterministic() -> None:
    def run() -> list[int]:
        g = GradientLimit()
        out = []
        for i in range(300):
            out.append(g.on_sample(0.01 + 0.005 * (i % 7), 25, i % 50 == 0))
        return out

    assert run() == run()


def test_gradient_repr() -> None:
    g = GradientLimit(initial_limit=20)
    assert "limit=20" in repr(g)


@pytest.mark.parametrize(
    "kw",
    [
        {"min_limit": 0},
        {"min_limit": 10, "max_limit": 5},
        {"initial_limit": 0},
        {"initial_limit": 2000},
        {"smoothing": 0.0},
        {"smoothing": 1.5},
        {"long_window": 0},
        {"rtt_tolerance": 0.5},
        {"backoff_ratio": 1.0},
    ],
)
def test_gradient_validation(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GradientLimit(**kw)  # type: ignore[arg-type]


# -- AIMDLimit -------------------------------------------------------------------------------------


def test_aimd_additive_increase_when_used() -> None:
    a = AIMDLimit(initial_limit=10)
    assert a.on_sample(0.01, 5, False) == 11  # 5 * 2 >= 10
    assert a.on_sample(0.01, 5, False) == 11  # 10 < 11: not used enough
    assert a.on_sample(0.01, 6, False) == 12


def test_aimd_decrease_on_drop_and_timeout() -> None:
    a = AIMDLimit(initial_limit=100, timeout_s=1.0)
    assert a.on_sample(0.01, 100, True) == 90
    assert a.on_sample(1.5, 100, False) == 81
    assert a.on_sample(1.0, 100, False) == 82  # == timeout is not a timeout


def test_aimd_small_limits_still_decrease_and_clamp() -> None:
    a = AIMDLimit(initial_limit=5, min_limit=2, max_limit=6)
    assert [a.on_sample(0.0, 0, True) for _ in range(5)] == [4, 3, 2, 2, 2]
    assert [a.on_sample(0.0, 10, False) for _ in range(6)] == [3, 4, 5, 6, 6, 6]


@pytest.mark.parametrize(
    "kw",
    [{"min_limit": 0}, {"initial_limit": 0}, {"backoff_ratio": 0.0}, {"timeout_s": 0.0}],
)
def test_aimd_validation(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AIMDLimit(**kw)  # type: ignore[arg-type]


def test_both_satisfy_protocol() -> None:
    algos: list[LimitAlgorithm] = [GradientLimit(initial_limit=7), AIMDLimit(initial_limit=7)]
    assert [x.limit for x in algos] == [7, 7]
    assert "AIMDLimit limit=7" in repr(algos[1])
