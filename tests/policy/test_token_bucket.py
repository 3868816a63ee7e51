"""GCRA rate table: window bound, tightness, header helpers, bounded memory."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.token_bucket import RateTable
from tests.helpers import ManualClock


def tol(count: int) -> float:
    """Float slack: the table gives away at most 1e-6 token per admitted request."""
    return 2e-6 * count + 1e-9


def test_fresh_bucket_allows_exactly_burst_at_one_instant(clock: ManualClock) -> None:
    table = RateTable(rate=10, per_s=1.0, burst=5, max_keys=100, clock=clock)
    assert [table.try_take("k") for _ in range(7)] == [True] * 5 + [False] * 2
    assert table.check("k") == pytest.approx(0.1)
    assert table.remaining("k") == 0


def test_check_consumes_nothing_and_stores_nothing(clock: ManualClock) -> None:
    table = RateTable(rate=1, per_s=1.0, burst=2, max_keys=100, clock=clock)
    for _ in range(50):
        assert table.check("k") == 0.0
    assert len(table) == 0
    assert table.remaining("k") == 2
    assert table.reset_s("k") == 0.0
    table.consume("k")
    for _ in range(50):
        assert table.check("k") == 0.0
    assert table.remaining("k") == 1
    assert len(table) == 1


def test_remaining_and_reset(clock: ManualClock) -> None:
    table = RateTable(rate=1, per_s=1.0, burst=5, max_keys=100, clock=clock)
    for _ in range(3):
        table.consume("k")
    assert table.remaining("k") == 2
    assert table.reset_s("k") == pytest.approx(3.0)
    clock.advance(1.5)
    assert table.remaining("k") == 3
    assert table.reset_s("k") == pytest.approx(1.5)
    clock.advance(1.5)
    assert table.remaining("k") == 5
    assert table.reset_s("k") == 0.0
    # Drained: the wait is exactly one interval past the burst tolerance.
    for _ in range(5):
        assert table.try_take("k")
    assert table.remaining("k") == 0
    assert table.check("k") == pytest.approx(1.0)
    assert table.reset_s("k") == pytest.approx(5.0)


def test_keys_are_independent(clock: ManualClock) -> None:
    table = RateTable(rate=1, per_s=60.0, burst=1, max_keys=100, clock=clock)
    assert table.try_take("a")
    assert not table.try_take("a")
    assert table.try_take("b")
    assert table.check("a") == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("rate", "per_s", "burst"),
    [(3, 1.0, 1), (7, 1.0, 1), (10, 1.0, 3), (1, 0.1, 1), (100, 60.0, 1), (0.3, 1.0, 2)],
)
def test_requests_one_interval_apart_are_all_admitted(
    clock: ManualClock, rate: float, per_s: float, burst: int
) -> None:
    table = RateTable(rate=rate, per_s=per_s, burst=burst, max_keys=10, clock=clock)
    interval = per_s / rate
    start = clock.now
    for i in range(2000):
        clock.now = start + i * interval
        assert table.try_take("k"), i


def test_burst_then_steady_rate(clock: ManualClock) -> None:
    table = RateTable(rate=10, per_s=1.0, burst=4, max_keys=10, clock=clock)
    start = clock.now
    assert sum(table.try_take("k") for _ in range(10)) == 4
    for i in range(1, 200):
        clock.now = start + i * 0.1
        assert table.try_take("k")
        assert not table.try_take("k")


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.5, 50.0),
    per_s=st.sampled_from([0.1, 1.0, 2.5, 60.0]),
    burst=st.integers(1, 8),
    gaps=st.lists(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 3.0)), max_size=120),
)
def test_window_bound_and_tightness(rate: float, per_s: float, burst: int, gaps: list[float]) -> None:
    """Admitted count in every window [t, t+W] is <= rate*W/per + burst, and a request is
    refused only when admitting it would break that bound for some window."""
    clock = ManualClock(500.0)
    table = RateTable(rate=rate, per_s=per_s, burst=burst, max_keys=4, clock=clock)
    interval = per_s / rate

    def allowed(span: float) -> float:
        return span * rate / per_s + burst

    admitted: list[float] = []
    for gap in gaps:
        clock.advance(gap * interval)
        t = clock.now
        wait = table.check("k")
        if wait == 0.0:
            table.consume("k")
            admitted.append(t)
            continue
        assert wait > 0.0
        n = len(admitted)
        # Tight: some window ending now would hold one request too many.
        assert any(n - j + 1 > allowed(t - admitted[j]) - tol(n - j + 1) for j in range(n))
        # The wait is exact: admissible at t + wait, not noticeably before.
        clock.now = t + wait
        assert table.check("k") == 0.0
        clock.now = t + wait - interval * 1e-3
        assert table.check("k") > 0.0
        clock.now = t
    for i in range(len(admitted)):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= allowed(admitted[j] - admitted[i]) + tol(j - i + 1)


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(0.5, 50.0),
    burst=st.integers(1, 8),
    start=st.floats(0.0, 1e5),
    n=st.integers(1, 300),
)
def test_steady_state_spacing_always_admitted(rate: float, burst: int, start: float, n: int) -> None:
    clock = ManualClock(start)
    table = RateTable(rate=rate, per_s=1.0, burst=burst, max_keys=4, clock=clock)
    for i in range(n):
        clock.now = start + i / rate
        assert table.try_take("k")
        # The header helper agrees with check().
        assert (table.remaining("k") >= 1) == (table.check("k") == 0.0)


def test_evicts_full_bucket_before_lru(clock: ManualClock) -> None:
    table = RateTable(rate=1, per_s=10.0, burst=3, max_keys=3, clock=clock)
    t0 = clock.now
    for _ in range(3):
        table.consume("b")  # oldest, TAT = t0 + 30
    clock.now = t0 + 1
    table.consume("a")  # TAT = t0 + 11
    clock.now = t0 + 2
    table.consume("c")  # TAT = t0 + 12
    clock.now = t0 + 11.5  # only "a" is full now
    table.consume("d")
    assert len(table) == 3
    assert table.remaining("b") == 1  # still tracked (would read 3 if evicted)
    assert table.remaining("c") == 2
    assert table.reset_s("a") == 0.0


def test_evicts_lru_when_no_bucket_is_full(clock: ManualClock) -> None:
    table = RateTable(rate=1, per_s=10.0, burst=2, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        table.consume(key)
    table.consume("a")  # refreshes "a": "b" is now least recently used
    table.consume("d")
    assert len(table) == 3
    assert table.remaining("b") == 2  # evicted: reads as a fresh, full bucket
    assert table.remaining("a") == 0
    assert table.remaining("c") == 1


def test_million_keys_bounded_memory(clock: ManualClock) -> None:
    max_keys = 10_000
    table = RateTable(rate=5, per_s=1.0, burst=3, max_keys=max_keys, clock=clock)
    consume = table.consume

    def insert(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            if i % 1000 == 0:
                clock.advance(0.05)  # some buckets refill, exercising both eviction paths
            consume(str(i))

    gc.collect()
    tracemalloc.start()
    try:
        insert(0, 20_000)
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        insert(20_000, 100_000)
        _, peak_early = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        insert(100_000, 1_000_000)
        _, peak_late = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(table) <= max_keys
    # Retaining the extra keys would cost ~8 MB (early) and ~100 MB (late); a bounded table
    # only churns memory of its own size (~1 MB here, peaks included).
    assert peak_early - baseline < 1_000_000, peak_early - baseline
    assert peak_late - baseline < 1_000_000, peak_late - baseline
    assert abs(peak_late - peak_early) < 250_000, (peak_early, peak_late)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0, "per_s": 1.0, "burst": 1, "max_keys": 1},
        {"rate": 1, "per_s": 0.0, "burst": 1, "max_keys": 1},
        {"rate": 1, "per_s": 1.0, "burst": 0, "max_keys": 1},
        {"rate": 1, "per_s": 1.0, "burst": 1, "max_keys": 0},
        {"rate": float("nan"), "per_s": 1.0, "burst": 1, "max_keys": 1},
    ],
)
def test_rejects_bad_config(clock: ManualClock, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateTable(clock=clock, **kwargs)  # type: ignore[arg-type]


def test_repr_shows_state(clock: ManualClock) -> None:
    table = RateTable(rate=2, per_s=1.0, burst=3, max_keys=10, clock=clock)
    table.consume("x")
    assert repr(table) == "RateTable(interval_s=0.5, burst=3, keys=1/10)"


def test_take_is_check_then_consume(clock: ManualClock) -> None:
    """The single-lookup fast path decides exactly as check() followed by consume()."""
    a = RateTable(rate=5, per_s=1.0, burst=3, max_keys=10, clock=clock)
    b = RateTable(rate=5, per_s=1.0, burst=3, max_keys=10, clock=clock)
    for step in [0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.25, 0.0, 1.0, 0.05] * 3:
        clock.advance(step)
        wait_b = b.check("k")
        if wait_b == 0.0:
            b.consume("k")
        assert a.take("k") == pytest.approx(wait_b)
        assert a.remaining("k") == b.remaining("k")
