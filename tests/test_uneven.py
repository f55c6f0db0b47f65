"""Steps whose examples do not divide among the processes: the last step of 5 pairs over 2 processes
of batch 2 gives one process 1 pair and the other none (with 1 pair, one process has nothing at all).
Every process must still run the same forward passes and collectives (a zero-weight pass pads the
short one), or the run hangs: under DDP in the step's gradient all-reduce, under ZeRO-3 in the
parameter gathers of the forward. Trained weights equal one process's with the same global batch.
A NaN that only one process sees stops every process at the same step with the same message."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

from selm.config import load_config
from selm.io import atomic_write_jsonl
from selm.stages.train import run_train
from selm.training.plan import StepPlan, forward_passes, micro_batches
from test_distributed import ROOT, accelerate_zero3, env, torchrun
from test_nonfinite import PAIRS

COUNTS = [1, 3, 5, 7]
SETS = ["train.learning_rate=5e-3", "train.tensorboard=false", "train.alpha=0.01", "train.beta=0.1"]
# Under the sharding engines: a pass of about one pair, so a step is several passes (gradients
# accumulated inside the engine) and the processes' pass counts differ, not only their pairs.
SPLIT = ["train.max_forward_tokens=60"]
TESTS_PATH = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}


def test_forward_passes_pad_every_process_to_the_busiest():
    from selm.objective.logprobs import TokenizedExample

    ex = [TokenizedExample([1, 2], [[3], [4]]) for _ in range(5)]
    # 5 examples, 2 processes of batch 2: 3 and 2 examples -> 2 passes and 1 (+ one zero-weight pass)
    a = forward_passes([0, 1, 2, 3, 4], ex, rank=0, world=2, batch_size=2, budget=None, layout="prefix")
    b = forward_passes([0, 1, 2, 3, 4], ex, rank=1, world=2, batch_size=2, budget=None, layout="prefix")
    assert a == [[0, 2], [4]] and b == [[1, 3], None]
    # One example: the second process runs only padding.
    assert forward_passes([3], ex, rank=1, world=2, batch_size=2, budget=None, layout="prefix") == [None]
    # A token budget that splits one process's share more than the other's pads the other.
    ex[0] = TokenizedExample([1] * 20, [[3] * 20, [4] * 20])
    a = forward_passes([0, 1, 2, 3], ex, rank=0, world=2, batch_size=2, budget=30, layout="prefix")
    b = forward_passes([0, 1, 2, 3], ex, rank=1, world=2, batch_size=2, budget=30, layout="prefix")
    assert a == [[0], [2]] and b == [[1, 3], None]
    assert forward_passes([0, 1], ex, rank=0, world=1, batch_size=1, budget=None, layout="prefix") == [[0], [1]]


def _write_pairs(out):
    out.mkdir(parents=True, exist_ok=True)
    for n in COUNTS:
        atomic_write_jsonl(out / f"pairs_{n}.jsonl", PAIRS[:n])


def _assert_same_as_one_process(two, one_dir, tiny, extra=()):
    for n in COUNTS:
        cfg = load_config(None, [*SETS, "train.batch_size=4", *extra])
        run_train(cfg, two / f"pairs_{n}.jsonl", tiny, one_dir / str(n))
        a = load_file(one_dir / str(n) / "model" / "model.safetensors")
        b = load_file(two / str(n) / "model" / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert_close(b[k], a[k], atol=5e-4, rtol=0, msg=f"{n} pairs: {k}")
        ma = [json.loads(x) for x in (one_dir / str(n) / "metrics.jsonl").read_text().splitlines()]
        mb = [json.loads(x) for x in (two / str(n) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in ma] == [r["step"] for r in mb]
        for ra, rb in zip(ma, mb):
            for key in ("loss", "rewards/margins", "grad_norm"):
                assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-6), (n, key)
        assert json.loads((two / str(n) / "DONE.json").read_text())["pairs"] == n


def _launch(cmd, extra=()):
    # A hang would sit in a collective until the distributed timeout (SELM_DIST_TIMEOUT_MINUTES,
    # a few minutes in env()); the subprocess timeout is the backstop.
    sets = " ".join([*SETS, "train.batch_size=2", *extra])
    proc = subprocess.run(cmd, env={**env(), **TESTS_PATH, "SELM_TEST_SETS": sets}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_torchrun_uneven_steps_train_like_one_process(tmp_path, tiny_model_dir):
    two = tmp_path / "two"
    _write_pairs(two)
    cmd = torchrun(tiny_model_dir, two, *COUNTS)
    cmd[cmd.index("selm.cli")] = "helpers_uneven"
    _launch(cmd)
    _assert_same_as_one_process(two, tmp_path / "one", tiny_model_dir)


@pytest.mark.slow
def test_zero3_uneven_steps_train_like_one_process(tmp_path, tiny_model_dir):
    import deepspeed  # noqa: F401 -- installed by the test set-up

    two = tmp_path / "two"
    _write_pairs(two)
    _launch(accelerate_zero3(tiny_model_dir, two, *COUNTS, module="helpers_uneven"), SPLIT)
    _assert_same_as_one_process(two, tmp_path / "one", tiny_model_dir, SPLIT)


@pytest.mark.slow
def test_fsdp2_uneven_steps_train_like_one_process_one_unit_per_layer(tmp_path, tiny_model_dir):
    """FSDP2 on CPUs through `accelerate launch --config_file configs/accelerate/fsdp2.yaml` (selm
    shards the model itself): each decoder layer is its own unit, and the weights, losses and whole
    gradient norms equal one process's."""
    two = tmp_path / "two"
    _write_pairs(two)
    cmd = accelerate_zero3(tiny_model_dir, two, *COUNTS, module="helpers_uneven")
    cmd[cmd.index("--config_file") + 1] = str(ROOT / "configs" / "accelerate" / "fsdp2.yaml")
    _launch(cmd, SPLIT)
    _assert_same_as_one_process(two, tmp_path / "one", tiny_model_dir, SPLIT)
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(tiny_model_dir).num_hidden_layers
    done = json.loads((two / "5" / "DONE.json").read_text())
    assert done["engine"] == "fsdp2" and done["processes"] == 2
    assert done["fsdp_units"] == ["", *[f"model.model.layers.{i}" for i in range(layers)]]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "zero3"])
def test_a_nan_seen_by_one_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_model_dir, launcher):
    """Rank 1 alone sees a NaN loss term (its reported value only, so the other rank's gradient and
    norm stay finite): both ranks stop after step 2 with the same one-line message."""
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    atomic_write_jsonl(pairs, PAIRS)
    sets = ["train.batch_size=2", "train.save_every_steps=1", "train.tensorboard=false", "train.alpha=0.01"]
    args = ["explore", "train", "--pairs", pairs, "--output-dir", out,
            *[a for s in sets for a in ("--set", s)]]
    if launcher == "torchrun":
        cmd = torchrun(*args)
        cmd[cmd.index("selm.cli")] = "poisoned_cli"
    else:
        cmd = accelerate_zero3(*args, module="poisoned_cli")
    proc = subprocess.run(cmd, env={**env(), **TESTS_PATH, "POISON_RANK": "1", "POISON_DETACHED": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    tc = load_config(None, sets).train
    bad = micro_batches(StepPlan.build(len(PAIRS), tc, 0, 2).steps[1], 1, 2, tc.batch_size)[0][1]
    for r in (0, 1):
        # Searched within lines: the other rank's progress bar may have left a line without its end.
        lines = [x.split(f"selm: error (rank {r})", 1)[1] for x in proc.stderr.splitlines() if f"selm: error (rank {r})" in x]
        assert len(lines) == 1, (r, proc.stderr[-4000:])
        assert f"optimizer step 2 of 2: NaN or infinity in loss/explore of pairs [{bad}]" in lines[0]
    assert "Timed out" not in proc.stderr
    assert not (out / "DONE.json").exists() and not (out / "checkpoint").exists()
