"""Latency statistics and the latency issue's targets, shared by ``mgms bench`` and bench/*.py.

Why one module: every benchmark script used to carry its own percentile helper, and two of
them disagreed (linear interpolation vs nearest rank), so a p99 in one report was not the
p99 of another. Here there is one definition: linear interpolation between closest ranks
(numpy's default, "type 7"), on samples in milliseconds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Summary", "TargetResult", "evaluate", "pct", "summarise"]

# Targets of issue 5 (latency probes and the benchmark report).
MEDIAN_FACTOR = 1.3
MEDIAN_SLACK_MS = 0.5
P99_FACTOR = 5.0
LOOP_MEDIAN_MS = 10.0


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks; NaN if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside 0..1")
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass(frozen=True, slots=True)
class Summary:
    """n, mean, median, p95, p99 and max of one series (ms; NaN when there are no samples)."""

    n: int
    mean_ms: float
    median_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "mean_ms": self.mean_ms,
            "median_ms": self.median_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        }


def summarise(values: Sequence[float]) -> Summary:
    if not values:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    return Summary(
        n=len(values),
        mean_ms=statistics.fmean(values),
        median_ms=statistics.median(values),
        p95_ms=pct(values, 0.95),
        p99_ms=pct(values, 0.99),
        max_ms=max(values),
    )


@dataclass(frozen=True, slots=True)
class TargetResult:
    """Pass/fail of one route against the issue's targets, with the limits that applied.

    ``passed`` is None when the route has no target that can be judged (no floor measured
    and not the DSO loop, or no samples).
    """

    median_limit_ms: float | None
    p99_limit_ms: float | None
    median_ok: bool | None
    p99_ok: bool | None

    @property
    def passed(self) -> bool | None:
        checks = [c for c in (self.median_ok, self.p99_ok) if c is not None]
        return all(checks) if checks else None

    def as_dict(self) -> dict[str, float | bool | None]:
        return {
            "median_limit_ms": self.median_limit_ms,
            "p99_limit_ms": self.p99_limit_ms,
            "median_ok": self.median_ok,
            "p99_ok": self.p99_ok,
            "passed": self.passed,
        }


def evaluate(s: Summary, floor_median_ms: float | None, *, loop: bool = False) -> TargetResult:
    """The targets of the latency issue for one route.

    A route: median <= 1.3 x floor median + 0.5 ms, and p99 <= 5 x median.
    The DSO loop (``loop``): median <= 10 ms, and the same p99 rule.
    """
    if s.n == 0 or math.isnan(s.median_ms):
        return TargetResult(None, None, None, None)
    if loop:
        median_limit: float | None = LOOP_MEDIAN_MS
    elif floor_median_ms is not None and not math.isnan(floor_median_ms):
        median_limit = MEDIAN_FACTOR * floor_median_ms + MEDIAN_SLACK_MS
    else:
        median_limit = None
    p99_limit = P99_FACTOR * s.median_ms
    return TargetResult(
        median_limit_ms=median_limit,
        p99_limit_ms=p99_limit,
        median_ok=None if median_limit is None else s.median_ms <= median_limit,
        p99_ok=s.p99_ms <= p99_limit,
    )
