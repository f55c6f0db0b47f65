"""A NaN or infinite loss term or gradient norm stops training with one line naming the step, the
term and the pairs; the step's metrics row is kept; no model/, no DONE.json; the re-run after fixing
the settings starts the stage over and equals a clean run."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import selm.stages.train as train_mod
from selm.cli import main
from selm.config import load_config
from selm.io import atomic_write_jsonl
from selm.stages.train import TrainingDiverged, run_train
from selm.training.plan import StepPlan

from helpers_cli import message_lines
from test_loop import TINY

PAIRS = [{"prompt_id": f"p{i}", "prompt": f"Question {i}?", "chosen": "A kind, full answer.", "rejected": "No.",
          "exploration": "Hm."} for i in range(8)]


def cfg(*overrides):
    base = ["train.beta=0.1", "train.alpha=0.01", "train.learning_rate=1e-2", "train.batch_size=2",
            "train.tensorboard=false", "train.save_every_steps=1"]
    return load_config(None, base + list(overrides))


@pytest.fixture
def pairs_file(tmp_path):
    p = tmp_path / "pairs.jsonl"
    atomic_write_jsonl(p, PAIRS)
    return p


def _partial_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl.partial").read_text().splitlines()]


def test_a_huge_learning_rate_stops_at_the_first_nonfinite_step_and_the_fixed_rerun_equals_a_clean_run(
        tmp_path, pairs_file, tiny_model_dir):
    out = tmp_path / "train"
    with pytest.raises(TrainingDiverged) as e:
        run_train(cfg("train.learning_rate=1e30"), pairs_file, tiny_model_dir, out)
    msg = str(e.value)
    assert "\n" not in msg
    # Step 1 runs on the start weights (finite); its update of ~1e30 breaks step 2.
    assert "optimizer step 2 of 4" in msg and "NaN or infinity" in msg and "train.learning_rate" in msg
    rows = _partial_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert math.isfinite(rows[0]["grad_norm"]) and not math.isfinite(rows[1]["grad_norm"])
    assert not (out / "model").exists() and not (out / "DONE.json").exists()
    assert not (out / "checkpoint").exists()  # saved after step 1 (save_every_steps=1), removed on the stop
    from selm import signals
    assert signals.pending() is None and not signals._defer  # a later Ctrl-C stops at once, not after a step

    fixed = cfg()
    run_train(fixed, pairs_file, tiny_model_dir, out)  # the same folder: starts over
    clean = tmp_path / "clean"
    run_train(fixed, pairs_file, tiny_model_dir, clean)
    assert (out / "DONE.json").is_file()
    a, b = load_file(str(out / "model" / "model.safetensors")), load_file(str(clean / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"}
                       for l in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(out) == strip(clean)


@pytest.mark.parametrize("term,key", [("explore", "loss_explore"), ("dpo", "loss_pair")])
def test_the_error_names_the_term_and_the_pairs(tmp_path, pairs_file, tiny_model_dir, monkeypatch, term, key):
    real = train_mod.preference_objective
    calls = []

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # step 2's first micro-batch (batch 2, 4 pairs per step: 2 micro-batches per step)
            out[key] = out[key].clone()
            out[key][1] = float("nan")
            out["loss"] = out["loss_pair"] + out["loss_explore"]
        return out

    monkeypatch.setattr(train_mod, "preference_objective", poisoned)
    tc = cfg("train.grad_accum=2")
    with pytest.raises(TrainingDiverged) as e:
        run_train(tc, pairs_file, tiny_model_dir, tmp_path / "out")
    bad = StepPlan.build(len(PAIRS), tc.train, tc.seed, 1).steps[1][1]  # step 2, micro-batch 1, example 1
    msg = str(e.value)
    assert f"optimizer step 2 of 2: NaN or infinity in loss/{term} of pairs [{bad}]" in msg
    assert f"prompt_ids 'p{bad}'" in msg
    rows = _partial_rows(tmp_path / "out")
    assert rows[-1]["step"] == 2 and math.isnan(rows[-1][f"loss/{term}"])
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "DONE.json").exists()


def test_the_loop_stops_with_one_line_and_resumes_after_the_fix(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["run", str(TINY), "--output-dir", str(out), "--set", "loop.iterations=1", "--set", "evaluate.enabled=false"]
    assert main(base + ["--set", "train.learning_rate=1e30"]) == 2
    err = message_lines(capsys.readouterr().err)
    assert len(err) == 1, err  # progress bars aside, one line
    assert err[0].startswith(f"selm: error: {out / 'iter_1' / 'train'}: training stopped at optimizer step 2 of ")
    assert not (out / "iter_1" / "train" / "DONE.json").exists() and not (out / "DONE.json").exists()
    assert (out / "iter_1" / "pair" / "DONE.json").exists()  # the stages before it are kept
    assert main(base + ["--continue-with-new-config"]) == 0
    assert (out / "iter_1" / "train" / "DONE.json").exists() and (out / "DONE.json").exists()
