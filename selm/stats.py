"""Win rates and bootstrap intervals (no model code)."""

from __future__ import annotations

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
