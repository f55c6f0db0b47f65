"""AlpacaEval 2.0's length-controlled (LC) win rate of one model over a baseline, from a judge's
per-prompt preferences; the raw win rate is selm.stats.preference_win_rate (the evaluate stage's and
the reports' too).

A preference is P(model's answer beats the baseline's) in [0, 1]: 1 win, 0 loss, 0.5 tie, or a soft
value (a judge's probability, or the mean over both presentation orders).
"""

from __future__ import annotations

import inspect
import math
import random
from typing import Sequence

import numpy as np


C_GRID = tuple(float(c) for c in np.logspace(-4, 4, 10))
"""Inverse L1 strengths tried by the cross-validation (scikit-learn's default grid for Cs=10)."""
FOLDS = 5


def _design(len_model, len_baseline, difficulty) -> tuple[np.ndarray, list[str]]:
    """Columns: tanh(standardised length difference), the difficulty terms, the model term (1)."""
    delta = np.asarray(len_model, dtype=float) - np.asarray(len_baseline, dtype=float)
    sd = delta.std(ddof=1) if len(delta) > 1 else 0.0
    cols, names = [np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)], ["length"]
    if difficulty is not None:
        d = np.asarray(difficulty, dtype=float).reshape(len(delta), -1)
        cols += [d[:, j] for j in range(d.shape[1])]
        names += [f"difficulty_{j}" for j in range(d.shape[1])] if d.shape[1] > 1 else ["difficulty"]
    cols.append(np.ones_like(delta))
    names.append("model")
    return np.stack(cols, axis=1), names


def _l1_logistic(C: float):
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        from selm.io import InputError

        raise InputError("the length-controlled win rate needs scikit-learn: pip install 'selm[eval]'") from None

    # scikit-learn 1.8 replaced penalty="l1" by l1_ratio=1; older versions only know the former.
    l1 = {"l1_ratio": 1.0} if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated" \
        else {"penalty": "l1"}
    return LogisticRegression(C=C, solver="liblinear", fit_intercept=False, random_state=123, max_iter=1000, **l1)


def _fit(X: np.ndarray, p: np.ndarray, C: float) -> np.ndarray:
    """Coefficients of the L1 logistic regression of soft labels p on X: each row enters twice, as a
    win with weight p and as a loss with weight 1 - p (the cross-entropy with soft targets)."""
    keep_w, keep_l = p > 0, p < 1
    Xd = np.concatenate([X[keep_w], X[keep_l]])
    y = np.concatenate([np.ones(keep_w.sum()), np.zeros(keep_l.sum())])
    w = np.concatenate([p[keep_w], 1 - p[keep_l]])
    if len(set(y.tolist())) < 2:  # every answer won (or lost): no finite fit; push the model term far
        coef = np.zeros(X.shape[1])
        coef[-1] = 30.0 if y[0] == 1 else -30.0
        return coef
    return _l1_logistic(C).fit(Xd, y, sample_weight=w).coef_[0]


def _log_loss(X: np.ndarray, p: np.ndarray, coef: np.ndarray) -> float:
    q = np.clip(1 / (1 + np.exp(-(X @ coef))), 1e-15, 1 - 1e-15)
    return float(-np.mean(p * np.log(q) + (1 - p) * np.log(1 - q)))


def _cv_C(X: np.ndarray, p: np.ndarray, seed: int = 0) -> float:
    """The C of C_GRID with the least held-out soft log loss over FOLDS folds of the prompts."""
    n = len(p)
    folds = min(FOLDS, n)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts = [np.array(sorted(order[k::folds])) for k in range(folds)]
    best, best_loss = C_GRID[0], math.inf
    for C in C_GRID:
        losses = []
        for test in parts:
            train = np.setdiff1d(np.arange(n), test)
            losses.append(_log_loss(X[test], p[test], _fit(X[train], p[train], C)))
        if np.mean(losses) < best_loss - 1e-12:
            best, best_loss = C, float(np.mean(losses))
    return best


def lc_win_rate(preferences: Sequence[float], len_model: Sequence[float], len_baseline: Sequence[float],
                difficulty: Sequence | None = None, *, C: float | None = None, samples: int = 0,
                seed: int = 0) -> dict:
    """Length-controlled win rate (AlpacaEval 2.0's GLM), for one model against one baseline.

    Model, per prompt i with preference p_i = P(model beats baseline):

        P(model wins on i) = sigmoid( w_len * tanh(d_i / sd(d)) + sum_k w_k * difficulty_ik + w_model )

    d_i = len_model_i - len_baseline_i in characters, sd the sample standard deviation over prompts;
    no intercept (w_model is the model's own term). Fitted by logistic regression on the soft labels
    p_i (cross-entropy with soft targets) with an L1 penalty whose strength C is chosen by 5-fold
    cross-validation over prompts (held-out log loss, C in 1e-4..1e4), unless C is given.

        LC = mean over prompts of sigmoid( sum_k w_k * difficulty_ik + w_model )

    i.e. the predicted win rate had both answers been equally long. With no difficulty terms this is
    sigmoid(w_model). AlpacaEval also regularises toward the weights of two length-gamed baselines it
    ships with its own annotator; that needs its data, so it is not done here.

    `samples` > 0 adds a percentile bootstrap 95% interval over prompts (each resample refitted at
    the chosen C). Returns {"value", "ci95", "C", "coefficients": {name: w}, "n", "warning"}; the
    warning (else None) says when the longer answer won every prompt (the fit then has no optimum),
    or when the penalty set the model term to 0 (too few prompts for the fit): then value and
    interval are NaN rather than a 50% [50, 50] that reads as a measurement.
    """
    p = np.clip(np.asarray(preferences, dtype=float), 0.0, 1.0)
    n = len(p)
    if not (len(len_model) == len(len_baseline) == n):
        raise ValueError("lc_win_rate: preferences and lengths must be paired (equal length)")
    if n < 2:
        return {"value": float("nan"), "ci95": [float("nan")] * 2, "C": None, "coefficients": {}, "n": n,
                "warning": "fewer than 2 judged prompts"}
    X, names = _design(len_model, len_baseline, difficulty)
    C = _cv_C(X, p, seed) if C is None else float(C)
    coef = _fit(X, p, C)
    X0 = X.copy()
    X0[:, 0] = 0.0  # no length difference

    def lc(rows: np.ndarray, w: np.ndarray) -> float:
        return float(np.mean(1 / (1 + np.exp(-(X0[rows] @ w)))))

    out = {"value": lc(np.arange(n), coef), "ci95": [float("nan")] * 2, "C": C,
           "coefficients": dict(zip(names, map(float, coef))), "n": n, "warning": None}
    delta = np.asarray(len_model, dtype=float) - np.asarray(len_baseline, dtype=float)
    if np.all((p == 1) & (delta > 0) | (p == 0) & (delta < 0)):
        # The longer answer always won: the fit has no optimum (its length weight grows without
        # bound) and the model term, hence LC, is not identified; its value is the optimiser's.
        out["warning"] = ("every preference is explained by which answer is longer: the length-controlled "
                          "win rate is not identified by these annotations")
    if coef[-1] == 0.0 and out["warning"] is None:
        # The penalty's floor, not a measurement: with the model term at 0 (and no difficulty
        # terms) LC is exactly 50% and every bootstrap refit at this C gives 50% again.
        out.update(value=float("nan"), warning=f"the L1 penalty (C={C:.3g}) set the model term to 0 on these {n} "
                   "prompts: the length-controlled win rate is not measured here (it would read 50% by "
                   "construction); judge more prompts")
        return out
    if samples > 0:
        rng = np.random.default_rng(seed)
        values = []
        for _ in range(samples):
            rows = rng.integers(0, n, n)
            values.append(lc(rows, _fit(X[rows], p[rows], C)))
        values.sort()
        out["ci95"] = [values[int(0.025 * (samples - 1))], values[int(0.975 * (samples - 1))]]
    return out
