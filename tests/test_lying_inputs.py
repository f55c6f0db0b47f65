"""Inputs whose numbers would lie are refused or flagged: pairs whose chosen and rejected are the
same response, scores that are strings or bools, and an LC fit whose penalty zeroed the model term."""

import json
import math
import random

import numpy as np
import pytest

from selm.cli import main
from selm.config import RankConfig
from selm.data import load_pairs
from selm.engines.ranker_base import RankerError
from selm.engines.registry import build_ranker
from selm.evaluation.winrate import lc_win_rate
from selm.io import InputError, atomic_write_jsonl

PAIRS = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No.", "exploration": "Hm"} for i in range(6)]
P = [{"role": "user", "content": "hi"}]


def test_identical_pairs_are_dropped_with_a_count_or_refused_when_strict(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    rows = [dict(r) for r in PAIRS]
    rows[2]["rejected"] = rows[2]["chosen"]
    atomic_write_jsonl(path, rows)
    pairs = load_pairs(path, need_exploration=True)
    assert [p.prompt[0]["content"] for p in pairs] == [f"Question {i}?" for i in (0, 1, 3, 4, 5)]
    err = capsys.readouterr().err
    assert f"selm: warning: {path}: dropped 1 of 6 pairs whose chosen and rejected are the same response " \
           f"(first: {path}:3)" in err
    with pytest.raises(InputError, match=rf"^{path}:3: chosen and rejected are the same response \(1 of 6"):
        load_pairs(path, need_exploration=True, strict=True)
    # The same text, once finished and once cut at the length limit, is a preference (finished wins).
    rows[2]["finished_rejected"] = False
    atomic_write_jsonl(path, rows)
    assert len(load_pairs(path, need_exploration=True, strict=True)) == 6


def test_selm_train_on_identical_pairs_refuses_instead_of_training(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "same.jsonl"
    atomic_write_jsonl(path, [{**r, "rejected": r["chosen"]} for r in PAIRS])
    base = ["train", "--pairs", str(path), "--model", str(tiny_model_dir), "--alpha", "0"]
    assert main([*base, "--output-dir", str(tmp_path / "a")]) == 2
    assert f"{path}: no pairs whose chosen and rejected differ" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "b"), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"selm: error: {path}:1: chosen and rejected are the same response (6 of 6 pairs are); " \
                  "such a pair carries no preference"
    assert not (tmp_path / "b" / "model").exists()


@pytest.mark.parametrize("name", ["numeric_strings", "booleans"])
def test_scores_must_be_numbers_not_strings_or_bools(name):
    r = build_ranker(RankConfig(kind="callable", callable=f"bad_rankers:{name}"))
    with pytest.raises(RankerError, match="rank: prompt_id 'p': expected a list of numbers"):
        r.score([P], [["a", "b", "c"]], ids=["p"])


def test_numpy_and_torch_scalars_are_scores():
    r = build_ranker(RankConfig(kind="callable", callable="bad_rankers:numpy_and_torch"))
    assert r.score([P], [["a", "b", "c"]]) == [[1.5, 2.0, 3.0]]


def test_pairwise_judge_returning_a_string_is_refused(tmp_path, monkeypatch):
    (tmp_path / "strjudge.py").write_text("def judge(prompt, a, b):\n    return '0.7'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = build_ranker(RankConfig(kind="pairwise", callable="strjudge:judge"))
    with pytest.raises(RankerError, match=r"returned '0.7' for candidates \(0, 1\) of prompt 0; expected a probability"):
        r.score([P], [["a", "b"]])


def test_lc_fit_with_the_model_term_zeroed_says_so_instead_of_50_percent(capsys):
    """The issue's case: 24 prompts, raw win rate about 58%: cross-validation picks the strongest
    penalty, which zeroes every coefficient; LC then read 50.0% [50.0, 50.0]."""
    rng = random.Random(0)
    prefs = [1.0 if rng.random() < 0.58 else 0.0 for _ in range(24)]
    lm, lb = [rng.randint(10, 40) for _ in prefs], [rng.randint(10, 40) for _ in prefs]
    r = lc_win_rate(prefs, lm, lb, samples=50)
    assert r["coefficients"]["model"] == 0.0
    assert math.isnan(r["value"]) and all(math.isnan(v) for v in r["ci95"])
    assert "set the model term to 0 on these 24 prompts" in r["warning"]
    from selm.evaluation.pairwise import table

    text = table({"model": "m", "baseline": "b", "judge": "j", "judged": 24, "skipped": 0, "win_rate": 0.58,
                  "win_rate_ci95": [0.44, 0.73], "wins": 14, "ties": 0, "losses": 10, "lc_win_rate": r["value"],
                  "lc_win_rate_ci95": r["ci95"], "lc_fit": {"warning": r["warning"]},
                  "length_model_mean": 30.0, "length_baseline_mean": 25.0})
    assert "50.0" not in text and "n/a" in text and "set the model term to 0" in text


def test_selm_train_counts_the_identical_pairs_it_dropped(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "pairs.jsonl"
    atomic_write_jsonl(path, [{**r, "rejected": r["chosen"]} if i == 4 else r for i, r in enumerate(PAIRS)])
    assert main(["train", "--pairs", str(path), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"),
                 "--batch-size", "5", "--epochs", "1"]) == 0
    out, err = capsys.readouterr()
    assert "trained 1 steps on 5 pairs (1 whose chosen and rejected are the same dropped)" in out
    assert err.count("dropped 1 of 6 pairs") == 1
