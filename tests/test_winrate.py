"""Raw and length-controlled win rates (selm/evaluation/winrate.py) on hand-made preferences with
known answers, and the LC fit against an independent formulation (numpy Newton on the same model)."""

import math

import numpy as np
import pytest

from selm.evaluation.winrate import C_GRID, lc_win_rate
from selm.stats import outcomes, preference_win_rate


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_raw_win_rate_counts_ties_half():
    r = preference_win_rate([1, 0, 0.5, 1, 0.7], samples=200)
    assert r["win_rate"] == pytest.approx(0.64)
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (3, 1, 1, 5)
    assert r["ci95"][0] <= 0.64 <= r["ci95"][1]
    assert outcomes([2, 1, 3], [1, 2, 3]) == [1.0, 0.0, 0.5]


def test_lc_equal_lengths_is_the_mean_preference():
    # Every length difference 0: the model is sigmoid(w_model), whose maximum-likelihood fit is the
    # mean preference; with no regularisation to speak of (C huge) LC = 3/4.
    r = lc_win_rate([1, 1, 1, 0], [5] * 4, [5] * 4, C=1e6)
    assert r["value"] == pytest.approx(0.75, abs=1e-4)
    assert r["coefficients"]["length"] == 0


def test_lc_worked_example_two_length_groups():
    # Two groups of 10 prompts: the model's answer longer by 100 chars (mean preference 0.9) or shorter by
    # 100 (mean 0.5). Two distinct rows of the design (t, 1) and (-t, 1): the fit is saturated, so
    # sigmoid(w_len t + w_m) = 0.9 and sigmoid(-w_len t + w_m) = 0.5, hence
    # w_m = (logit 0.9 + logit 0.5) / 2 = ln(9) / 2 and LC = sigmoid(w_m) = 3/4 (raw: 0.7).
    prefs = [1] * 9 + [0] + [1] * 5 + [0] * 5
    lm = [300] * 10 + [100] * 10
    lb = [200] * 20
    r = lc_win_rate(prefs, lm, lb, C=1e6)
    assert preference_win_rate(prefs, samples=10)["win_rate"] == pytest.approx(0.7)
    assert r["value"] == pytest.approx(0.75, abs=1e-4)
    assert r["coefficients"]["model"] == pytest.approx(math.log(9) / 2, abs=1e-3)
    sd = np.std(np.array(lm) - np.array(lb), ddof=1)
    t = math.tanh(100 / sd)
    assert r["coefficients"]["length"] * t == pytest.approx(math.log(9) / 2, abs=1e-3)


def newton_fit(X, p, iters=50):
    """Unregularised logistic regression with soft targets by Newton's method (no scikit-learn)."""
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        q = sigmoid(X @ w)
        grad = X.T @ (p - q)
        hess = (X * (q * (1 - q))[:, None]).T @ X
        w = w + np.linalg.solve(hess, grad)
    return w


def test_lc_fit_matches_newton_with_difficulty_terms():
    rng = np.random.default_rng(1)
    n = 300
    lb = rng.integers(100, 900, n).astype(float)
    lm = lb + rng.normal(150, 250, n)
    difficulty = rng.normal(0, 1, n)
    d = lm - lb
    t = np.tanh(d / d.std(ddof=1))
    p = sigmoid(1.5 * t - 0.7 * difficulty + 0.4)  # soft preferences from a known model
    r = lc_win_rate(p, lm, lb, difficulty, C=1e8)
    X = np.stack([t, difficulty, np.ones(n)], axis=1)
    w = newton_fit(X, p)
    assert w == pytest.approx([1.5, -0.7, 0.4], abs=1e-6)  # the generating weights are the exact optimum
    got = r["coefficients"]
    assert [got["length"], got["difficulty"], got["model"]] == pytest.approx(list(w), abs=2e-3)
    assert r["value"] == pytest.approx(float(np.mean(sigmoid(X[:, 1:] @ w[1:]))), abs=1e-3)


def _lengths(n, rng):
    lb = rng.integers(200, 800, n).astype(float)
    lm = lb + rng.normal(250, 300, n)  # the model is mostly the longer one
    return lm, lb


def test_judge_that_prefers_the_longer_answer_lc_near_half():
    rng = np.random.default_rng(0)
    lm, lb = _lengths(400, rng)
    d = lm - lb
    p = sigmoid(4 * np.tanh(d / d.std(ddof=1)))  # only length matters, symmetric around equal lengths
    r = lc_win_rate(p, lm, lb, samples=100)  # the judge's own probabilities
    assert preference_win_rate(p, samples=10)["win_rate"] > 0.7
    assert abs(r["value"] - 0.5) < 0.03, r
    assert r["C"] in C_GRID and r["warning"] is None
    assert r["ci95"][0] <= r["value"] <= r["ci95"][1]
    hard = (rng.random(400) < p).astype(float)  # its verdicts drawn from them
    r = lc_win_rate(hard, lm, lb)
    assert hard.mean() > 0.7 and abs(r["value"] - 0.5) < 0.1, r


def test_a_judge_that_only_looks_at_length_is_flagged():
    # Always the longer answer: perfectly separated, the fit has no optimum and LC is not identified.
    rng = np.random.default_rng(0)
    lm, lb = _lengths(100, rng)
    r = lc_win_rate((lm > lb).astype(float), lm, lb)
    assert "not identified" in r["warning"]


def test_judge_independent_of_length_lc_close_to_raw():
    rng = np.random.default_rng(2)
    lm, lb = _lengths(400, rng)
    soft = np.full(400, 0.75)
    assert lc_win_rate(soft, lm, lb)["value"] == pytest.approx(0.75, abs=0.01)
    hard = (rng.random(400) < 0.7).astype(float)
    raw = hard.mean()
    assert abs(lc_win_rate(hard, lm, lb)["value"] - raw) < 0.03


def test_lc_edge_cases():
    assert lc_win_rate([1, 1, 1], [3, 4, 5], [1, 1, 1])["value"] > 0.99  # every answer won
    assert lc_win_rate([0, 0, 0], [3, 4, 5], [1, 1, 1])["value"] < 0.01
    assert math.isnan(lc_win_rate([1], [3], [1])["value"])
    with pytest.raises(ValueError):
        lc_win_rate([1, 0], [3], [1, 2])
