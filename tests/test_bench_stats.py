"""The bench's statistics and target rules, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from gateway.bench.clock import offset_from
from gateway.bench.stats import evaluate, pct, summarise


def test_percentiles_interpolate_between_closest_ranks() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]  # sorted 1..5, rank k = (n - 1) q
    assert pct(xs, 0.0) == 1.0
    assert pct(xs, 0.5) == 3.0
    assert pct(xs, 1.0) == 5.0
    assert pct(xs, 0.95) == pytest.approx(4.8)  # k = 3.8: 4 + 0.8 * (5 - 4)
    assert pct(xs, 0.99) == pytest.approx(4.96)  # k = 3.96
    assert pct(xs, 0.25) == 2.0  # k = 1 exactly


def test_percentile_of_100_values_matches_the_hand_rank() -> None:
    xs = [float(i) for i in range(1, 101)]  # 1..100
    assert pct(xs, 0.95) == pytest.approx(95.05)  # k = 94.05: 95 + 0.05
    assert pct(xs, 0.99) == pytest.approx(99.01)


def test_percentile_edge_cases() -> None:
    assert math.isnan(pct([], 0.5))
    assert pct([7.0], 0.99) == 7.0
    with pytest.raises(ValueError, match="outside"):
        pct([1.0], 99)


def test_summary_of_a_series() -> None:
    s = summarise([1.0, 2.0, 3.0, 4.0, 10.0])
    assert (s.n, s.mean_ms, s.median_ms, s.max_ms) == (5, 4.0, 3.0, 10.0)
    assert s.p95_ms == pytest.approx(8.8)  # k = 3.8: 4 + 0.8 * 6
    assert s.p99_ms == pytest.approx(9.76)
    empty = summarise([])
    assert empty.n == 0 and math.isnan(empty.median_ms)


def test_route_target_median_within_1_3_floor_plus_half_ms() -> None:
    s = summarise([1.0, 1.0, 1.0, 1.0, 1.0])  # median 1.0, p99 1.0
    ok = evaluate(s, floor_median_ms=0.4)  # limit 1.3 * 0.4 + 0.5 = 1.02
    assert ok.median_limit_ms == pytest.approx(1.02) and ok.median_ok and ok.passed
    miss = evaluate(s, floor_median_ms=0.3)  # limit 0.89
    assert miss.median_ok is False and miss.passed is False


def test_route_target_p99_within_5_times_median() -> None:
    tail = summarise([1.0] * 98 + [6.0, 6.0])  # median 1, p99: k = 98.01 -> 6.0
    t = evaluate(tail, floor_median_ms=10.0)
    assert t.median_ok is True and t.p99_limit_ms == 5.0 and t.p99_ok is False and t.passed is False
    flat = summarise([1.0] * 98 + [5.0, 5.0])
    assert evaluate(flat, floor_median_ms=10.0).passed is True  # 5.0 <= 5 x 1.0


def test_dso_loop_target_is_10_ms_median_whatever_the_floor() -> None:
    assert evaluate(summarise([9.0, 10.0, 11.0]), None, loop=True).median_ok is True
    late = evaluate(summarise([10.0, 10.5, 11.0]), 1.0, loop=True)
    assert late.median_limit_ms == 10.0 and late.median_ok is False


def test_no_floor_judges_only_the_tail_and_no_samples_nothing() -> None:
    t = evaluate(summarise([1.0, 2.0, 3.0]), None)
    assert t.median_ok is None and t.p99_ok is True and t.passed is True
    assert evaluate(summarise([]), 1.0).passed is None


def test_ntp_offset_and_delay_from_four_timestamps() -> None:
    # server 5 ms ahead; 1 ms each way; the server holds it 0.5 ms
    t1 = 1_000_000_000
    t2 = t1 + 1_000_000 + 5_000_000
    t3 = t2 + 500_000
    t4 = t1 + 2_500_000
    offset, delay = offset_from(t1, t2, t3, t4)
    assert offset == 5_000_000 and delay == 2_000_000
