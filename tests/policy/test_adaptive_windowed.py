from __future__ import annotations

from gateway.policy.adaptive import GradientLimit, WindowedLimit
from tests.helpers import ManualClock


class Recorder:
    def __init__(self) -> None:
        self.samples: list[tuple[float, int, bool]] = []
        self.limit = 20

    def on_sample(self, rtt_s: float, in_flight: int, dropped: bool) -> int:
        self.samples.append((rtt_s, in_flight, dropped))
        return self.limit


def test_one_update_per_window_with_mean_rtt_max_in_flight_and_drops() -> None:
    clock = ManualClock()
    inner = Recorder()
    w = WindowedLimit(inner, clock, min_window_s=0.1, max_window_s=1.0, min_samples=3)
    w.on_sample(0.010, 5, False)
    w.on_sample(0.030, 9, False)
    clock.advance(0.2)
    assert inner.samples == []  # two samples: not enough yet
    w.on_sample(0.020, 7, True)
    assert inner.samples == [(0.02, 9, True)]
    w.on_sample(0.050, 1, False)
    assert len(inner.samples) == 1  # a new window has started


def test_a_sparse_window_still_closes_at_max_window() -> None:
    clock = ManualClock()
    inner = Recorder()
    w = WindowedLimit(inner, clock, min_window_s=0.1, max_window_s=1.0, min_samples=10)
    w.on_sample(0.010, 1, False)
    clock.advance(1.0)
    w.on_sample(0.030, 2, False)
    assert inner.samples == [(0.02, 2, False)]


def test_windowed_gradient_is_stable_under_noisy_samples() -> None:
    """Per-sample noise (queueing jitter) must not swing the limit by multiples within a second."""
    clock = ManualClock()
    w = WindowedLimit(GradientLimit(initial_limit=20, max_limit=1000), clock, min_window_s=0.1)
    seen = []
    for i in range(4000):  # 10 s at 400 samples/s, RTT alternating 50 ms and 150 ms
        clock.advance(0.0025)
        w.on_sample(0.05 if i % 2 else 0.15, 20, False)
        seen.append(w.limit)
    last_second = seen[-400:]
    assert max(last_second) <= 2 * min(last_second)
