"""The demo pipeline (study of SELM vs DPO, implicit rewards, report) on the tiny stand-in model:
the report exists, its numbers come from the run folders, and it states a verdict."""

import json
from pathlib import Path

import pytest

from selm.studies.demo import run_demo, run_sweep
from selm.stats import outcomes

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    report = run_demo(out, config=TINY, seeds=[0, 1])
    return out, report


def _gold(run: Path, t: int) -> dict:
    rows = [json.loads(l) for l in (run / f"iter_{t}" / "evaluate" / "generations.jsonl").read_text().splitlines()]
    return {r["prompt_id"]: r["gold"] for r in rows}


def test_report_files_and_sections(demo):
    out, report = demo
    assert report == out / "report.md"
    text = report.read_text()
    for section in ("Gold win rate vs the start model", "Head to head: SELM vs DPO", "Implicit rewards on held-out",
                    "Training curves", "Example generations", "Mean gold reward, response length and answers cut off"):
        assert section in text, section
    assert any(v in text for v in ("SELM beat iterative DPO", "iterative DPO beat SELM", "no clear difference"))
    for png in ("win_rate_vs_start.png", "head_to_head.png", "reward_distribution.png", "implicit_rewards.png",
                "training_curves.png", "length.png"):
        assert (out / "plots" / png).stat().st_size > 1000, png
        assert f"plots/{png}" in text


def test_report_numbers_come_from_the_runs(demo):
    out, _ = demo
    data = json.loads((out / "report.json").read_text())
    # Recompute SELM's win rate vs the start model at iteration 2 from the evaluation files.
    flat = []
    for s in (0, 1):
        run = out / "selm" / f"seed_{s}"
        cur, start = _gold(run, 2), _gold(run, 0)
        flat += outcomes([cur[i] for i in sorted(cur)], [start[i] for i in sorted(cur)])
    assert data["per_arm"]["selm"]["win_vs_start"][2]["mean"] == pytest.approx(sum(flat) / len(flat))
    # Head to head at iteration 2, same seed and prompts.
    h = []
    for s in (0, 1):
        a, b = _gold(out / "selm" / f"seed_{s}", 2), _gold(out / "dpo" / f"seed_{s}", 2)
        h += outcomes([a[i] for i in sorted(a)], [b[i] for i in sorted(a)])
    assert data["head_to_head"][1]["mean"] == pytest.approx(sum(h) / len(h))
    lo, hi = data["head_to_head"][1]["ci95"]
    assert lo <= data["head_to_head"][1]["mean"] <= hi
    assert data["per_arm"]["dpo"]["win_vs_start"][0]["mean"] == 0.5  # the start model vs itself: all ties
    # The cut-off share: evaluation answers that used every one of evaluate.max_new_tokens.
    rows = [json.loads(l) for s in (0, 1)
            for l in (out / "dpo" / f"seed_{s}" / "iter_1" / "evaluate" / "generations.jsonl").read_text().splitlines()]
    cut = data["per_arm"]["dpo"]["cut_off"][1]["mean"]
    assert cut == pytest.approx(sum(not r["finished"] for r in rows) / len(rows))


def test_the_demo_headline_reads_the_t_interval_over_its_seeds(demo):
    from selm.stats import seed_t_interval

    out, report = demo
    per_seed = []
    for s in (0, 1):
        a, b = _gold(out / "selm" / f"seed_{s}", 2), _gold(out / "dpo" / f"seed_{s}", 2)
        o = outcomes([a[i] for i in sorted(a)], [b[i] for i in sorted(a)])
        per_seed.append(sum(o) / len(o))
    h = json.loads((out / "report.json").read_text())["head_to_head"][1]
    assert h["per_seed"] == pytest.approx(per_seed)
    lo, hi = seed_t_interval(per_seed)
    assert h["seed_ci95"] == pytest.approx([lo, hi])
    expected = ("SELM beat iterative DPO" if lo > 0.5 else "iterative DPO beat SELM" if hi < 0.5
                else "no clear difference between SELM and iterative DPO at this size")
    headline = report.read_text().splitlines()[2]
    shown = f"95% t-interval over seeds [{max(lo, 0) * 100:.1f}, {min(hi, 1) * 100:.1f}]"  # within [0, 100%]
    assert headline.startswith(f"**At iteration 2: {expected}") and shown in headline


def test_arms_share_only_training_independent_stages(demo):
    out, _ = demo
    for s in (0, 1):
        selm, dpo = out / "selm" / f"seed_{s}", out / "dpo" / f"seed_{s}"
        assert (selm / "iter_1/pair/pairs.jsonl").read_bytes() == (dpo / "iter_1/pair/pairs.jsonl").read_bytes()
        assert (selm / "iter_1/train/metrics.jsonl").read_bytes() != (dpo / "iter_1/train/metrics.jsonl").read_bytes()
        assert "alpha: 0.0\n" in (dpo / "config.yaml").read_text()


def test_implicit_rewards_on_heldout_pairs(demo):
    out, _ = demo
    ir = json.loads((out / "analysis" / "implicit_rewards.json").read_text())
    pairs = [json.loads(l) for l in (out / "analysis" / "heldout" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["gold_chosen"] > p["gold_rejected"] for p in pairs)
    assert [d["iteration"] for d in ir["diff"]] == [1, 2]
    assert ir["diff"][0]["chosen"]["n"] == 2 * len(pairs)  # seeds x held-out pairs


def test_each_run_makes_its_share_of_the_report_as_it_finishes(demo, monkeypatch):
    """Each run's analysis (its exploration statistics, the held-out log-probs of its models) is made
    by the run itself when it finishes, so under --jobs it runs in parallel: the report phase then
    scores nothing, and its numbers are the cached ones."""
    from selm.studies import analysis, exploration
    from selm.studies.demo import _finish

    out, _ = demo
    # 4 start models (the tiny model is built from each run's seed) + 2 arms x 2 seeds x 2 iterations.
    assert len(list((out / "analysis" / "implicit").glob("*.json"))) == 12
    for arm in ("selm", "dpo"):
        for s in (0, 1):
            assert (out / arm / f"seed_{s}" / "analysis" / "exploration.json").is_file()
    # The study's progress bar counts each run's analysis as a step after its stages.
    from selm.studies.parallel import done_stages

    runs = [(out / arm / f"seed_{s}", 2) for arm in ("selm", "dpo") for s in (0, 1)]
    assert done_stages(runs, analysis=True) == done_stages(runs) + 4
    before = json.loads((out / "analysis" / "implicit_rewards.json").read_text())

    def no_scoring(*a, **k):
        raise AssertionError("the report phase scored a model")

    monkeypatch.setattr(analysis, "_logps", no_scoring)
    monkeypatch.setattr(exploration, "score_responses", no_scoring)
    _finish(out)
    assert json.loads((out / "analysis" / "implicit_rewards.json").read_text()) == before


def test_held_out_log_probs_are_scored_again_when_the_model_changes(demo, monkeypatch):
    import os

    from selm.studies import analysis
    from selm.studies.study import Arm, arm_config, load_study

    out, _ = demo
    study = load_study(out)
    cfg = arm_config(study["base"], Arm(**study["arms"][0]), 0)
    model = out / "selm" / "seed_0" / "iter_1" / "train" / "model"
    scored = []
    real = analysis._logps
    monkeypatch.setattr(analysis, "_logps", lambda path, *a: scored.append(path) or real(path, *a))
    first = analysis.heldout_logps(out, model, cfg)
    assert scored == []  # the run's own analysis made it
    w = next(model.glob("*.safetensors"))
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))  # as a retrained model's new file
    again = analysis.heldout_logps(out, model, cfg)
    assert scored == [model]
    assert again["chosen"] == pytest.approx(first["chosen"]) and again["rejected"] == pytest.approx(first["rejected"])


def test_rerun_resumes_without_redoing(demo):
    out, _ = demo
    before = (out / "selm" / "seed_0" / "iter_2" / "train" / "DONE.json").stat().st_mtime_ns
    run_demo(out, config=TINY, seeds=[0, 1])
    assert (out / "selm" / "seed_0" / "iter_2" / "train" / "DONE.json").stat().st_mtime_ns == before


def test_alpha_sweep_report(tmp_path):
    report = run_sweep(tmp_path / "sweep", alphas=[0.0, 0.01, 0.1, 1.0], seeds=[0], config=TINY,
                       overrides=["loop.iterations=1"])
    text = report.read_text()
    assert "## Alpha sweep" in text and (tmp_path / "sweep" / "plots" / "alpha_sweep.png").is_file()
    # One seed: the sweep's headline names no alpha as different, and says why.
    assert "No verdict on alpha: with one seed there is no interval over seeds" in text.splitlines()[2]
    for a in ("| 0 |", "| 0.01 |", "| 0.1 |", "| 1 |"):
        assert a in text
    assert "### Alpha vs exploration (iteration 1)" in text
    assert (tmp_path / "sweep" / "plots" / "exploration_alpha.png").stat().st_size > 1000
    for a in ("0", "0.01", "0.1", "1"):
        assert f"| alpha_{a} | {a} | " in text


def test_exploration_section_pools_the_seeds_of_each_arm(demo):
    out, report = demo
    text = report.read_text()
    assert "## Exploration" in text and "### Alpha vs exploration (iteration 2)" in text
    for png in ("exploration_distance.png", "exploration_diversity.png", "exploration_coverage.png",
                "exploration_alpha.png"):
        assert (out / "plots" / png).stat().st_size > 1000 and f"plots/{png}" in text, png
    per_arm = json.loads((out / "report.json").read_text())["exploration"]["per_arm"]
    vals = []
    for s in (0, 1):
        cached = json.loads((out / "selm" / f"seed_{s}" / "analysis" / "exploration.json").read_text())
        vals += cached["per_iteration"][1]["distance"]["y0_vs_start"]["per_sequence"]
    pooled = per_arm["selm"][1]["distance"]["y0_vs_start"]["per_sequence"]
    assert pooled["seeds"] == 2 and pooled["n"] == len(vals) == 2 * 8  # the first 8 of 12 prompts
    assert pooled["mean"] == pytest.approx(sum(vals) / len(vals))
    # Within a seed the arms share iteration 1's candidates, so their diversity and coverage agree.
    assert per_arm["selm"][0]["diversity"] == per_arm["dpo"][0]["diversity"]
    assert per_arm["selm"][0]["coverage"] == per_arm["dpo"][0]["coverage"]


def test_report_states_model_size_source_task_ranker_and_gold_judge(demo):
    from transformers import AutoModelForCausalLM

    out, report = demo
    text = report.read_text()
    run = out / "selm" / "seed_0"
    n = AutoModelForCausalLM.from_pretrained(run / "start_model").num_parameters()
    assert f"- Model: `tiny` ({n:,} parameters, float32), from the built-in tiny Llama" in text
    assert "- Task: prompts from `tiny_prompts.jsonl` (12 per iteration), evaluated on 8 held-out prompts" in text
    assert ("- Training ranker: callable `selm.toy_judges:letters_ranker`. Gold judge (evaluation only): callable "
            "`selm.toy_judges:vowels_gold`.") in text


def test_the_report_shows_where_the_time_went(demo):
    from selm.studies.run_report import build_run_report

    out, report = demo
    cost = json.loads((out / "report.json").read_text())["cost"]
    row = {(r["iteration"], r["stage"]): r for r in cost}
    done = lambda arm, s, t, stage: json.loads((out / arm / f"seed_{s}" / f"iter_{t}" / stage / "DONE.json").read_text())  # noqa: E731
    # Training is per arm and seed: all four runs count.
    train = row[(2, "train")]
    assert train["runs"] == 4
    assert train["seconds"] == pytest.approx(sum(done(a, s, 2, "train")["seconds"] for a in ("selm", "dpo") for s in (0, 1)))
    assert train["tokens_per_s"] > 0
    # Iteration 1's generation is copied from the seed's first arm: counted once per seed.
    gen = row[(1, "generate")]
    g = [done("selm", s, 1, "generate") for s in (0, 1)]
    assert gen["runs"] == 2 and gen["seconds"] == pytest.approx(sum(d["seconds"] for d in g))
    assert gen["generated"] == sum(round(d["responses"] * d["response_tokens_mean"]) for d in g) > 0
    assert gen["tokens_per_s"] == pytest.approx(gen["generated"] / gen["seconds"])
    ev = row[(2, "evaluate")]
    assert ev["generated"] == sum(done(a, s, 2, "evaluate")["tokens"] for a in ("selm", "dpo") for s in (0, 1)) > 0
    text = report.read_text()
    assert "## Where the time went" in text and f"| 2 | train | 4 | {train['seconds']:.1f} |" in text
    # The report of one run folder has the same table, from that run alone.
    run = out / "selm" / "seed_0"
    one = build_run_report(run).read_text()
    assert f"| 2 | train | 1 | {done('selm', 0, 2, 'train')['seconds']:.1f} |" in one


def test_the_report_phase_prints_each_step_with_its_count(demo, capsys):
    import re

    from selm.studies.demo import _finish

    out, _ = demo
    for s in (0, 1):  # drop the exploration cache of one arm so that its scoring runs again
        (out / "selm" / f"seed_{s}" / "analysis" / "exploration.json").unlink()
    capsys.readouterr()
    _finish(out)
    err = capsys.readouterr().err  # captured: not a terminal, so plain lines
    steps = [(int(k), int(n)) for k, n in re.findall(r"^report: implicit rewards: (\d+)/(\d+) ", err, re.M)]
    # 4 start models (the tiny model is built from each run's seed) and 2 x 2 runs x 2 iterations.
    assert steps == [(k, 12) for k in range(1, 13)]
    for s in (0, 1):
        scored = re.findall(rf"^report: exploration scoring of selm/seed_{s}: (\d+)/(\d+) ", err, re.M)
        assert scored == [("1", "3"), ("2", "3"), ("3", "3")]
    assert "exploration scoring of dpo/" not in err  # cached: nothing to do
    assert re.findall(r"^report: (\d)/4 ", err, re.M) == ["1", "2", "3", "4"]


def test_the_headline_shows_a_win_rate_interval_within_0_and_100():
    """Two seeds far apart give a t-interval past 0 and 100%: shown clipped, the verdict unchanged."""
    from selm.studies.report import headline

    h = {"mean": 0.48, "n": 128, "per_seed": [0.406, 0.555], "seed_ci95": [-0.463, 1.424], "ci95": [0.355, 0.605]}
    start = {"mean": 0.6, "ci95": [0.5, 0.7]}
    data = {"arms": ["selm", "dpo"], "iterations": 2, "seeds": [0, 1], "head_to_head": [None, h],
            "per_arm": {a: {"win_vs_start": [None, None, start]} for a in ("selm", "dpo")}}
    text = headline(data)
    assert "no clear difference" in text and "t-interval over seeds [0.0, 100.0]" in text
