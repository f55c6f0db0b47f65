"""--continue-with-new-config on an existing run: a changed setting redoes the stages that read it
(and those after them) from their start and says so; a setting no finished stage reads leaves it
done; loop.iterations grows a run by new slices of the prompts no slice has yet, or is refused."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selm import loop
from selm.cli import main
from selm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["--set", "train.epochs=1", "--set", "data.prompts_per_iteration=8", "--set", "evaluate.bootstrap_samples=50"]


def run(out, *extra):
    return main(["run", str(TINY), "--output-dir", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def one_iteration(tmp_path_factory):
    out = tmp_path_factory.mktemp("grow") / "one"
    assert run(out, "--set", "loop.iterations=1") == 0
    return out


def _markers(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("iter_*/*/DONE.json"))}


def _same_files(a: Path, b: Path) -> None:
    """Every artifact of two runs is the same: byte for byte, but for timings, the environment record,
    the TensorBoard logs and the safetensors metadata (which names the run folder); weights and
    log-probs within float tolerance."""
    names = lambda d: {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "/tb/" not in str(p)}
    skip = {"DONE.json", "environment.json", "config_changes.log", "config.yaml"}
    assert names(a) - {"config_changes.log"} == names(b)
    for rel in sorted(names(b)):
        pa, pb = a / rel, b / rel
        if pa.name in skip:
            continue
        if pa.suffix == ".safetensors":
            x, y = load_file(str(pa)), load_file(str(pb))
            assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-6) for k in x), rel
        elif pa.name == "metrics.jsonl":
            strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in p.read_text().splitlines()]
            assert strip(pa) == strip(pb), rel
        else:
            assert pa.read_bytes() == pb.read_bytes(), rel


def test_growing_one_iteration_to_two_equals_a_two_iteration_run(one_iteration, tmp_path, capsys):
    grown = tmp_path / "grown"
    shutil.copytree(one_iteration, grown)
    before = _markers(grown)
    assert run(grown, "--set", "loop.iterations=2", "--continue-with-new-config") == 0
    assert "redoing" not in capsys.readouterr().out
    assert {k: v for k, v in _markers(grown).items() if k.startswith(("iter_0", "iter_1"))} == before
    scratch = tmp_path / "scratch"
    assert run(scratch, "--set", "loop.iterations=2") == 0
    _same_files(grown, scratch)
    assert main(["status", str(grown)]) == 0
    text = capsys.readouterr().out
    assert "fix" not in text and "failed" not in text and "not done" not in text


def _data_only(out: Path, *overrides: str):
    """A run folder with its config and prompt split written (what a run has before its first stage)."""
    cfg = load_config(TINY, list(overrides))
    loop.check_config(cfg, out, allow_change=False)
    loop.prepare_data(cfg, out)
    return cfg


def test_growing_past_the_prompts_left_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    _data_only(out, "loop.iterations=1")  # the 24 training prompts all in iteration 1's slice
    config = (out / "config.yaml").read_bytes()
    rc = main(["run", str(TINY), "--output-dir", str(out), "--set", "loop.iterations=2", "--continue-with-new-config"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "loop.iterations: iteration 2 needs 12 training prompts and 0 are left" in err
    # Nothing changed: the config, no log of a change, no folder for iteration 2; nothing to fix.
    assert (out / "config.yaml").read_bytes() == config and not (out / "config_changes.log").exists()
    assert not (out / "iter_2").exists()
    assert main(["status", str(out)]) == 0
    assert "fix" not in capsys.readouterr().out


def test_shrinking_is_refused_until_the_later_iterations_are_deleted(tmp_path, capsys):
    out = tmp_path / "run"
    _data_only(out, "loop.iterations=2")
    (out / "iter_2" / "generate").mkdir(parents=True)
    rc = main(["run", str(TINY), "--output-dir", str(out), "--set", "loop.iterations=1", "--continue-with-new-config"])
    assert rc == 2 and f"delete {out / 'iter_2'} to shrink it" in capsys.readouterr().err
    shutil.rmtree(out / "iter_2")
    cfg = load_config(TINY, ["loop.iterations=1"])
    loop.check_config(cfg, out, allow_change=True)
    assert load_config(out / "config.yaml").loop.iterations == 1


def test_evaluate_change_redoes_only_the_evaluate_stages(one_iteration, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_iteration, out)
    before = _markers(out)
    assert run(out, "--set", "loop.iterations=1", "--set", "evaluate.max_new_tokens=8", "--continue-with-new-config") == 0
    said = [l for l in capsys.readouterr().out.splitlines() if l.startswith("selm: redoing")]
    assert [l.split()[2] for l in said] == ["iter_0/evaluate", "iter_1/evaluate"]
    assert "evaluate.max_new_tokens: 16 -> 8" in said[0]
    after = _markers(out)
    assert {k: v for k, v in after.items() if "evaluate" not in k} == {k: v for k, v in before.items() if "evaluate" not in k}
    assert all(after[k] != before[k] for k in before if "evaluate" in k)


@pytest.mark.parametrize("change", ["train.logging_steps=5", "evaluate.enabled=false"])
def test_a_change_no_finished_stage_reads_redoes_nothing(one_iteration, tmp_path, capsys, change):
    out = tmp_path / "run"
    shutil.copytree(one_iteration, out)
    before = _markers(out)
    assert run(out, "--set", "loop.iterations=1", "--set", change, "--continue-with-new-config") == 0
    assert "redoing" not in capsys.readouterr().out
    assert _markers(out) == before


def test_learning_rate_change_after_ctrl_c_retrains_with_the_new_schedule(tmp_path, capsys):
    """The issue's case: stopped mid-training with a checkpoint, continued with another learning
    rate: the stage starts over (the new schedule from step 1), and the screen says so."""
    out = tmp_path / "run"
    args = ["run", TINY, "--output-dir", out, "--set", "loop.iterations=1", "--set", "train.epochs=20",
            "--set", "evaluate.enabled=false"]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "selm.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if (out / "iter_1" / "train" / "checkpoint").exists():
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    proc.wait()
    train = out / "iter_1" / "train"
    assert not (train / "DONE.json").exists(), "training finished before the interrupt; raise train.epochs"
    rc = main([*map(str, args), "--set", "train.learning_rate=1e-3", "--continue-with-new-config"])
    assert rc == 0
    said = capsys.readouterr().out
    assert "selm: redoing iter_1/train from its start (train.learning_rate: 0.005 -> 0.001)" in said
    rows = [json.loads(l) for l in (train / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, rows[-1]["total_steps"] + 1))
    assert max(r["lr"] for r in rows) == pytest.approx(1e-3)
    assert "learning_rate: 0.001" in (train / "config.yaml").read_text()
