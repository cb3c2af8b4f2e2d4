"""Significance, computed rather than eyeballed: Welch's unequal-variance t-test over seeds (with the regularised
incomplete beta function, so no SciPy), `mean ± std` cells, and the sentence a table's findings print for each
comparison: a win only when p < 0.05, and the caution a block of uncorrected comparisons needs.
"""
from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> str:
    """'mean ± std' with the sample standard deviation (n-1); a single value is marked n=1."""
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test: (t, degrees of freedom, two-sided p). Needs two values per side."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least two seeds per side")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return (0.0 if diff == 0 else math.copysign(math.inf, diff)), float(len(a) + len(b) - 2), (1.0 if diff == 0 else 0.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df, betainc(df / 2, 0.5, df / (df + t * t))


def finding(what: str, name_a: str, a: list[float], name_b: str, b: list[float], alpha: float = 0.05) -> str:
    """One sentence on a comparison, written from the numbers: a win or a loss only when Welch's t-test over
    seeds gives p < alpha, otherwise no significant difference."""
    if not a or not b:
        return f"{what}: {name_a} vs {name_b}: not measured."
    nums = f"{statistics.mean(a):.2f} vs {statistics.mean(b):.2f} (n = {len(a)}, {len(b)})"
    if len(a) < 2 or len(b) < 2:
        return f"{what}: {name_a} vs {name_b}: {nums}; one seed per side, no test."
    t, df, pv = welch(a, b)
    if pv < alpha:
        verdict = f"**{name_a} {'beats' if t > 0 else 'is below'} {name_b}**"
    else:
        verdict = f"no significant difference between {name_a} and {name_b}"
    return f"{what}: {verdict}, {nums}, Welch p = {pv:.3g}."


def multiple_comparisons(kinds: str, n: int, passed: int, alpha: float = 0.05) -> str:
    """The caution a block of uncorrected tests needs: how many would pass by chance alone if nothing differed."""
    return (f"{kinds}: {n} comparisons, each at p < {alpha:g} without correction for multiple comparisons, so about "
            f"{n * alpha:.1f} would pass by chance alone if nothing differed; {passed} passed. Read a lone pass with "
            f"a small effect as a lead to re-run with more seeds, not as a result.")


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks, ties at their mean rank); NaN when either is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two equal-length lists of 2 or more values (got {len(x)} and {len(y)})")
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
