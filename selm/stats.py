"""Win rates and bootstrap intervals (no model code)."""

from __future__ import annotations

import math
import random
from typing import Any, Mapping, Sequence


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def bootstrap_ci(values: Sequence[float], *, samples: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling the values)."""
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo = means[int((1 - level) / 2 * (samples - 1))]
    hi = means[int((1 + level) / 2 * (samples - 1))]
    return (lo, hi)


def grouped_bootstrap_ci(groups: Sequence[Sequence[float]], *, samples: int, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled mean of grouped values (e.g. the ratings of each
    question's turns), resampling whole groups: the unit of sampling is the group, not the value."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = []
    for _ in range(samples):
        picked = [groups[rng.randrange(len(groups))] for _ in groups]
        means.append(sum(map(sum, picked)) / sum(map(len, picked)))
    means.sort()
    return (means[int((1 - level) / 2 * (samples - 1))], means[int((1 + level) / 2 * (samples - 1))])


def outcomes(a: Sequence[float], b: Sequence[float], tol: float = 0.0) -> list[float]:
    """Per-prompt outcome of a vs b: 1 win, 0.5 tie (|a-b| <= tol), 0 loss."""
    if len(a) != len(b):
        raise ValueError("win rate needs paired scores of equal length")
    return [0.5 if abs(x - y) <= tol else float(x > y) for x, y in zip(a, b)]


def head_to_head(model: Mapping[Any, Mapping], baseline: Mapping[Any, Mapping], ids: Sequence,
                 key: str = "gold") -> list[float]:
    """Per-prompt outcomes of two evaluations' rows (keyed by prompt id) on the score `key`, for `ids`
    in that order: 1 the model's score is higher, 0.5 equal, 0 lower."""
    return outcomes([model[i][key] for i in ids], [baseline[i][key] for i in ids])


def preference_win_rate(preferences: Sequence[float], *, samples: int, seed: int = 0) -> dict:
    """Mean of per-prompt preferences P(model beats baseline) (1 win, 0.5 tie, 0 loss, or a judge's
    soft value in between) with a bootstrap 95% interval over prompts; wins/ties/losses count the
    preferences above, at and below 0.5."""
    o = [float(x) for x in preferences]
    lo, hi = bootstrap_ci(o, samples=samples, seed=seed)
    return {"win_rate": mean(o), "ci95": [lo, hi], "wins": sum(x > 0.5 for x in o),
            "ties": sum(x == 0.5 for x in o), "losses": sum(x < 0.5 for x in o), "n": len(o)}


def win_rate(a: Sequence[float], b: Sequence[float], *, samples: int, seed: int = 0) -> dict:
    """Win rate of a over b (ties count half) with a bootstrap 95% interval over prompts."""
    return preference_win_rate(outcomes(a, b), samples=samples, seed=seed)


def hierarchical_ci(groups: Sequence[Sequence], *, samples: int, seed: int = 0,
                    level: float = 0.95, stat=None) -> tuple[float, float]:
    """Bootstrap interval of the overall mean when values come in groups (e.g. seeds x prompts):
    resample the groups, then the values within each, so both sources of variation count.
    `stat` (a function of the flat resampled list, e.g. of (a, b) pairs) replaces the mean."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    if stat is not None:
        values = []
        for _ in range(samples):
            flat = []
            for _ in range(len(groups)):
                g = groups[rng.randrange(len(groups))]
                flat.extend(g[rng.randrange(len(g))] for _ in range(len(g)))
            values.append(stat(flat))
        values.sort()
        return (values[int((1 - level) / 2 * (samples - 1))], values[int((1 + level) / 2 * (samples - 1))])
    means = []
    for _ in range(samples):
        total, count = 0.0, 0
        for _ in range(len(groups)):
            g = groups[rng.randrange(len(groups))]
            total += sum(g[rng.randrange(len(g))] for _ in range(len(g)))
            count += len(g)
        means.append(total / count)
    means.sort()
    return (means[int((1 - level) / 2 * (samples - 1))], means[int((1 + level) / 2 * (samples - 1))])


def sd(xs: Sequence[float]) -> float:
    """Population standard deviation."""
    m = mean(xs)
    return (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5 if xs else float("nan")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))) / a
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on t_cdf; scipy is not a
    dependency)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def seed_t_interval(per_seed: Sequence[float], level: float = 0.95) -> tuple[float, float] | tuple[None, None]:
    """t-interval of the mean of per-seed values, with seeds - 1 degrees of freedom: the seed is the
    unit that varies from run to run, so the interval widens with few seeds instead of shrinking
    (a bootstrap that resamples 2 seeds cannot see their spread). (None, None) with fewer than 2 seeds:
    one run says nothing about how much another would differ."""
    n = len(per_seed)
    if n < 2:
        return (None, None)
    m = mean(per_seed)
    s = (sum((x - m) ** 2 for x in per_seed) / (n - 1)) ** 0.5
    half = t_quantile((1 + level) / 2, n - 1) * s / n ** 0.5
    return (m - half, m + half)
