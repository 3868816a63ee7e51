"""The hot-path counters: what is exported equals what was counted, whichever field counted it."""

from __future__ import annotations

import pytest

from gateway.observe import stats


@pytest.mark.parametrize(
    ("value", "bucket"),
    [
        (0.0, 0),
        (0.0005, 0),  # le: the bound itself belongs to its bucket
        (0.00050001, 1),
        (0.001, 1),
        (0.0025, 2),
        (0.005, 3),
        (0.0051, 4),
        (0.01, 4),
        (0.2, 8),
        (30.0, len(stats.BUCKETS) - 1),
        (30.1, len(stats.BUCKETS)),  # +Inf
    ],
)
def test_a_histogram_counts_each_value_in_its_bucket(value: float, bucket: int) -> None:
    h = stats.Histogram()
    h.observe(value)
    expected = [0] * (len(stats.BUCKETS) + 1)
    expected[bucket] = 1
    assert h.counts == expected and h.count == 1 and h.sum == value


def test_a_histogram_adds_up_across_the_field_and_list_buckets() -> None:
    h = stats.Histogram()
    values = [0.0001, 0.0007, 0.002, 0.004, 0.03, 0.03, 3.0, 100.0]
    for v in values:
        h.observe(v)
    assert h.count == len(values) and h.sum == pytest.approx(sum(values))
    assert h.counts == [1, 1, 1, 1, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 1]


def test_route_and_target_responses_count_200_and_the_rest() -> None:
    for s in (stats.RouteStats(), stats.TargetStats()):
        assert s.responses == {}
        for status in (200, 200, 404, 200, 503, 404):
            if isinstance(s, stats.RouteStats):
                s.done(status, 0.001)
            else:
                s.count(status)
        seen = s.responses
        assert seen == {200: 3, 404: 2, 503: 1}
        seen[200] = 0  # a copy: the export cannot change the counters
        assert s.responses[200] == 3


def test_statuses_in_runs_and_interleaved_add_up() -> None:
    """The status counted in a field (the last non-200) hands its count to the dict when another
    comes; the export sees both."""
    tally = stats.StatusTally()
    seq = [429] * 5 + [200] * 3 + [503, 429, 503, 503, 404, 429, 200]
    for status in seq:
        tally.add(status)
    assert tally.snapshot() == {s: seq.count(s) for s in set(seq)}


def test_shed_reasons_in_runs_and_interleaved_add_up() -> None:
    s = stats.RouteStats()
    assert s.shed == {}
    seq = ["rate_limited"] * 4 + ["circuit_open", "rate_limited", "null_upstream", "null_upstream"]
    for reason in seq:
        s.count_shed(reason)
    seen = s.shed
    assert seen == {r: seq.count(r) for r in set(seq)}
    seen["rate_limited"] = 0  # a copy
    assert s.shed["rate_limited"] == 5
