"""The Handbook's statistics: first crossings of a loss curve, the effective compute multiplier, confidence
intervals over seeds. Pure functions on plain lists, tested on hand-made curves."""

from __future__ import annotations

import math
import statistics

# Two-sided 95% Student t quantiles by degrees of freedom (n - 1); beyond 30 the normal 1.96.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    if df < 1:
        return math.inf
    known = [k for k in _T975 if k <= df]
    return _T975[max(known)] if df <= 30 else 1.96


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95% t-interval (lo, hi) over seeds; one value gives an unbounded interval."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    m = statistics.fmean(values)
    if n == 1:
        return m, -math.inf, math.inf
    half = t975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return m, m - half, m + half


def ratio_ci(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean and 95% interval of positive ratios (a t-interval on their logarithms: speedups multiply)."""
    if any(r is None or r <= 0 for r in ratios):
        return math.nan, math.nan, math.nan
    m, lo, hi = mean_ci([math.log(r) for r in ratios])
    return math.exp(m), math.exp(lo) if lo > -math.inf else 0.0, math.exp(hi) if hi < math.inf else math.inf


def first_crossing(curve: list[list[float]], target: float, x: int = 0) -> float | None:
    """Where a curve of points ``[flops, tokens, seconds, loss]`` first reaches ``target`` loss, in column ``x``
    (0 FLOPs, 2 seconds), linearly interpolated between the two evaluations around the crossing; None if never.
    A curve starting at or below the target crosses at its first point."""
    prev = None
    for point in curve:
        loss = point[3]
        if loss <= target:
            if prev is None or prev[3] == loss:
                return point[x]
            frac = (prev[3] - target) / (prev[3] - loss)
            return prev[x] + frac * (point[x] - prev[x])
        prev = point
    return None


def effective_flops(scratch: list[tuple[float, float]], loss: float) -> tuple[float, bool]:
    """FLOPs a from-scratch run needs to end at ``loss``, from scratch runs ``(flops, final loss)`` at several
    budgets (each with its own full schedule), interpolated linearly in log-FLOPs against loss. Outside the
    measured range it is extrapolated from the nearest two points and flagged (second value True)."""
    pts = sorted(scratch)  # by FLOPs; the final loss falls as the budget grows
    if len(pts) < 2:
        raise ValueError("the effective compute multiplier needs scratch runs at two or more budgets")
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if min(l0, l1) <= loss <= max(l0, l1) and l0 != l1:
            return math.exp(math.log(f0) + (l0 - loss) / (l0 - l1) * (math.log(f1) - math.log(f0))), False
    (f0, l0), (f1, l1) = (pts[-2], pts[-1]) if loss < pts[-1][1] else (pts[0], pts[1])
    if l0 == l1:
        return math.nan, True
    return math.exp(math.log(f0) + (l0 - loss) / (l0 - l1) * (math.log(f1) - math.log(f0))), True


def fmt_ci(m: float, lo: float, hi: float, digits: int = 2, suffix: str = "") -> str:
    if math.isnan(m):
        return "n/a"
    if math.isinf(hi) or math.isinf(lo):
        return f"{m:.{digits}f}{suffix} (1 seed)"
    return f"{m:.{digits}f}{suffix} [{lo:.{digits}f}, {hi:.{digits}f}]"
