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


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), using the
    symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def t_pvalue(t: float, df: int) -> float:
    """Two-sided p-value of Student's t statistic ``t`` with ``df`` degrees of freedom."""
    if df < 1 or math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2, 0.5, df / (df + t * t))


def paired_pvalue(diffs: list[float]) -> float:
    """Two-sided p-value of the one-sample t-test of paired differences against zero (nan below two values; 0 when
    the differences are equal and non-zero)."""
    n = len(diffs)
    if n < 2:
        return math.nan
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:
        return 1.0 if m == 0 else 0.0
    return t_pvalue(m / (sd / math.sqrt(n)), n - 1)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order as given; nan stays nan and is not counted):
    the k-th smallest of m is multiplied by m - k + 1, then made monotone. Rejecting where the adjusted p < alpha
    keeps the family-wise error rate at alpha."""
    ranked = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out, running, m = [math.nan] * len(pvalues), 0.0, len(ranked)
    for k, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out
