"""The online loop end to end on configs/tiny.yaml: the artifact set, that the model changed, the
stage commands, status, config-change refusal, and that SIGKILL at several points followed by a
re-run gives the same final artifacts as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selm.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STAGE_FILES = {
    "generate": {"DONE.json", "generations.jsonl", "stats.json"},
    "rank": {"DONE.json", "scores.jsonl", "stats.json"},
    "pair": {"DONE.json", "pairs.jsonl"},
    "train": {"DONE.json", "config.yaml", "metrics.jsonl", "model", "ref_logps.safetensors", "tb"},
    "evaluate": {"DONE.json", "generations.jsonl", "metrics.json"},
}


def selm_cmd(*args):
    return [sys.executable, "-m", "selm.cli", *map(str, args)]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop") / "ref"
    t0 = time.perf_counter()
    proc = subprocess.run(selm_cmd("run", TINY, "--output-dir", out), env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, time.perf_counter() - t0


def test_tiny_run_writes_exact_artifacts_and_changes_the_model(reference_run):
    out, _ = reference_run
    assert sorted(p.name for p in out.iterdir()) == ["DONE.json", "config.yaml", "data", "environment.json", "iter_0",
                                                     "iter_1", "iter_2", "start_model"]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["DONE.json", "eval.jsonl", "train_1.jsonl",
                                                                "train_2.jsonl"]
    assert {p.name for p in (out / "iter_0").iterdir()} == {"evaluate"}
    assert {p.name for p in (out / "iter_0" / "evaluate").iterdir()} == STAGE_FILES["evaluate"]
    for t in (1, 2):
        assert {p.name for p in (out / f"iter_{t}").iterdir()} == set(STAGE_FILES)
        for stage, files in STAGE_FILES.items():
            assert {p.name for p in (out / f"iter_{t}" / stage).iterdir()} == files, (t, stage)
    env = json.loads((out / "environment.json").read_text())  # one entry per start of `selm run`
    assert len(env) == 1 and env[0]["seed"] == 0 and env[0]["packages"]["torch"] == torch.__version__
    start = load_file(str(out / "start_model" / "model.safetensors"))
    one = load_file(str(out / "iter_1" / "train" / "model" / "model.safetensors"))
    two = load_file(str(out / "iter_2" / "train" / "model" / "model.safetensors"))
    assert all(not torch.equal(start[k], one[k]) and not torch.equal(one[k], two[k]) for k in start)
    # Slices are disjoint and held-out prompts are never trained on.
    ids = [{json.loads(l)["prompt_id"] for l in (out / "data" / f).read_text().splitlines()}
           for f in ("train_1.jsonl", "train_2.jsonl", "eval.jsonl")]
    assert not (ids[0] & ids[1]) and not ((ids[0] | ids[1]) & ids[2])
    m2 = json.loads((out / "iter_2" / "evaluate" / "metrics.json").read_text())
    assert set(m2["win_rates"]) == {"start", "previous"}
    assert 0 <= m2["win_rates"]["start"]["win_rate"] <= 1
    lo, hi = m2["win_rates"]["start"]["ci95"]
    assert lo <= m2["win_rates"]["start"]["win_rate"] <= hi
    pairs = [json.loads(l) for l in (out / "iter_1" / "pair" / "pairs.jsonl").read_text().splitlines()]
    gens = {json.loads(l)["prompt_id"]: json.loads(l) for l in (out / "iter_1" / "generate" / "generations.jsonl").read_text().splitlines()}
    for p in pairs:
        assert p["exploration"][0]["content"] == gens[p["prompt_id"]]["exploration"]
        assert p["score_chosen"] > p["score_rejected"]


def test_status_reports_each_stage(reference_run, capsys):
    out, _ = reference_run
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    for t in (1, 2):
        for stage in STAGE_FILES:
            assert f"iter_{t}/{stage}" in text
    assert text.count("done") >= 12 and "pending" not in text


def _snapshot(out: Path) -> dict:
    """Every final artifact's content, minus wall-clock timings."""
    snap = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if p.is_dir() or rel.startswith("start_model") or "/tb/" in rel or p.name in ("DONE.json", "stats.json", "environment.json"):
            continue
        if p.suffix == ".safetensors":
            snap[rel] = {k: v.tolist() for k, v in load_file(str(p)).items()}
        elif p.name == "metrics.jsonl":
            snap[rel] = [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in p.read_text().splitlines()]
        else:
            snap[rel] = p.read_bytes()
    return snap


def rerun_equals_reference(out: Path, ref: Path) -> None:
    """Re-run a stopped run to its end: the same final artifacts as the uninterrupted `ref`, and no
    temporaries or checkpoints left."""
    proc = subprocess.run(selm_cmd("run", TINY, "--output-dir", out), env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _snapshot(ref), _snapshot(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("checkpoint"))


def _run_until(out: Path, condition, limit=300) -> bool:
    """Start `selm run`, SIGKILL it once `condition(out)` holds; True if it was killed mid-run."""
    proc = subprocess.Popen(selm_cmd("run", TINY, "--output-dir", out), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < limit:
        if condition(out):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


@pytest.mark.slow
def test_sigkill_at_several_points_then_rerun_equals_uninterrupted(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "killed"
    kill_points = [
        lambda o: (o / "data" / "DONE.json").exists(),
        lambda o: (o / "iter_1" / "generate").exists(),
        lambda o: (o / "iter_1" / "train" / "checkpoint").exists(),
        lambda o: (o / "iter_2" / "rank").exists(),
        lambda o: (o / "iter_2" / "evaluate").exists(),
    ]
    killed = sum(_run_until(out, cond) for cond in kill_points)
    assert killed >= 3  # most kill points land mid-run (timing may let a stage finish first)
    # What a kill while writing the start model, config.yaml or the data split leaves behind (a
    # random-time kill stress run found the first one surviving the re-run).
    (out / ".start_model.k1ll.tmp").mkdir(exist_ok=True)
    (out / ".start_model.k1ll.tmp" / "model.safetensors").write_bytes(b"half")
    (out / ".config.yaml.k1ll.tmp").write_text("seed: 0\n")
    (out / "data" / ".train_1.jsonl.k1ll.tmp").write_text("{")
    rerun_equals_reference(out, ref)


def test_changed_config_is_refused_unless_asked(reference_run, tmp_path, capsys):
    ref, _ = reference_run
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_bytes((ref / "config.yaml").read_bytes())
    rc = main(["run", str(TINY), "--output-dir", str(out), "--set", "train.alpha=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.alpha: 0.01 -> 0.0" in err and "--continue-with-new-config" in err


def test_stage_commands_run_on_their_own(reference_run, tmp_path, capsys):
    ref, _ = reference_run
    out = tmp_path / "stages"
    # Later stages refuse to run before their inputs exist.
    assert main(["rank", str(TINY), "--output-dir", str(out), "--iteration", "1"]) == 2
    assert "iter_1/generate: not finished" in capsys.readouterr().err
    assert main(["evaluate", str(TINY), "--output-dir", str(out), "--iteration", "0"]) == 0
    for stage in ("generate", "rank", "pair", "train", "evaluate"):
        assert main([stage, "--output-dir", str(out), "--iteration", "1"]) == 0, stage
    for stage in ("generate", "rank", "pair", "evaluate"):
        for name in STAGE_FILES[stage] - {"DONE.json"}:
            assert (out / "iter_1" / stage / name).read_bytes() == (ref / "iter_1" / stage / name).read_bytes(), (stage, name)
    assert load_file(str(out / "iter_1/train/model/model.safetensors")).keys() == \
        load_file(str(ref / "iter_1/train/model/model.safetensors")).keys()


def test_metrics_rows_carry_the_total_steps(reference_run):
    out, _ = reference_run
    rows = [json.loads(l) for l in (out / "iter_1" / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = json.loads((out / "iter_1" / "train" / "DONE.json").read_text())["steps"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert {r["total_steps"] for r in rows} == {steps}


def test_report_of_a_run_folder(reference_run, tmp_path, capsys):
    import shutil

    from selm.stats import outcomes

    ref, _ = reference_run
    out = tmp_path / "copy"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("*.safetensors", "model", "start_model", "tb"))
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.md'}"
    text = (out / "report.md").read_text()
    for png in ("gold_reward.png", "win_rates.png", "length_and_cut_off.png", "reward_distribution.png",
                "training_curves.png"):
        assert (out / "plots" / png).stat().st_size > 1000 and f"plots/{png}" in text, png
    data = json.loads((out / "report.json").read_text())
    gold = {t: {r["prompt_id"]: r["gold"] for r in map(json.loads, (out / f"iter_{t}" / "evaluate" /
            "generations.jsonl").read_text().splitlines())} for t in (0, 1, 2)}
    ids = sorted(gold[2])
    expect_prev = outcomes([gold[2][i] for i in ids], [gold[1][i] for i in ids])
    row = data["per_iteration"][2]
    assert row["win_vs_previous"]["mean"] == pytest.approx(sum(expect_prev) / len(expect_prev))
    m2 = json.loads((out / "iter_2" / "evaluate" / "metrics.json").read_text())
    assert row["win_vs_start"]["mean"] == pytest.approx(m2["win_rates"]["start"]["win_rate"])
    assert row["gold"]["mean"] == pytest.approx(m2["gold_mean"])
    assert row["cut_off"]["mean"] == pytest.approx(m2["cut_off_fraction"])
    assert row["pairs"] == json.loads((out / "iter_2" / "pair" / "DONE.json").read_text())["pairs"]
    assert f"| 2 | {row['pairs']} | {row['gold']['mean']:.3f} [" in text
    assert data["per_iteration"][0]["win_vs_previous"]["mean"] is None


def test_per_iteration_alphas_reach_training(tmp_path):
    """loop.alphas: iteration t trains with alphas[t-1] (its DONE.json, its config.yaml and its
    exploration loss say so); 0 is plain DPO, whose exploration term is exactly zero."""
    out = tmp_path / "alphas"
    rc = main(["run", str(TINY), "--output-dir", str(out), "--set", "loop.alphas=[0, 0.05]",
               "--set", "evaluate.enabled=false", "--set", "train.epochs=1"])
    assert rc == 0
    for t, alpha in ((1, 0.0), (2, 0.05)):
        sd = out / f"iter_{t}" / "train"
        assert json.loads((sd / "DONE.json").read_text())["alpha"] == alpha
        assert f"alpha: {alpha}" in (sd / "config.yaml").read_text()
        explore = [json.loads(l)["loss/explore"] for l in (sd / "metrics.jsonl").read_text().splitlines()]
        assert (all(e == 0 for e in explore) if alpha == 0 else any(e != 0 for e in explore)), (t, explore)


def _logps(run: Path, model: Path, dest: Path) -> dict:
    """Log-probs of `model` on iteration 2's pairs, scored as the run's training stage scores them."""
    from selm.config import load_config
    from selm.stages.train import run_train

    run_train(load_config(run / "config.yaml"), run / "iter_2" / "pair" / "pairs.jsonl", model, dest, max_steps=0)
    return load_file(str(dest / "ref_logps.safetensors"))


def _same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_reference_previous_is_the_previous_iterate(reference_run, tmp_path):
    out, _ = reference_run  # train.reference defaults to "previous"
    cached = load_file(str(out / "iter_2" / "train" / "ref_logps.safetensors"))
    assert _same(cached, _logps(out, out / "iter_1" / "train" / "model", tmp_path / "one"))
    assert not _same(cached, _logps(out, out / "start_model", tmp_path / "start"))


def test_reference_initial_is_the_start_model(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(TINY), "--output-dir", str(out), "--set", "train.reference=initial",
                 "--set", "evaluate.enabled=false"]) == 0
    cached = load_file(str(out / "iter_2" / "train" / "ref_logps.safetensors"))
    start = _logps(out, out / "start_model", tmp_path / "start")
    one = _logps(out, out / "iter_1" / "train" / "model", tmp_path / "one")
    assert _same(cached, start) and not _same(cached, one)
    # Iteration 2 still starts from iteration 1's model: its first step's policy is not the reference.
    row = json.loads((out / "iter_2" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(row["loss/dpo"] - 0.6931) > 1e-3
