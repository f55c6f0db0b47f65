"""The training stage (selm/stages/train.py) on the tiny model: it learns, accumulation is normalised,
it writes a loadable checkpoint, reuses its reference cache, and resumes exactly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from selm.io import atomic_write_jsonl
from selm.config import ConfigError, load_config
from selm.stages.train import run_train
from selm.training.plan import StepPlan, lr_lambda

PAIRS = [
    {"prompt": "Say something nice.", "chosen": "You are wonderful.", "rejected": "No.", "exploration": "Hello."},
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How are you?"}],
     "chosen": [{"role": "assistant", "content": "Great, thanks!"}],
     "rejected": [{"role": "assistant", "content": "bad"}], "exploration": [{"role": "assistant", "content": "ok"}]},
    {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Car.", "exploration": "A fruit."},
    {"prompt": "Count to three.", "chosen": "1, 2, 3.", "rejected": "1, 5.", "exploration": "one two"},
    {"prompt": "Greet me.", "chosen": "Good morning!", "rejected": "What?", "exploration": "Hi"},
    {"prompt": "Colour of the sky?", "chosen": "Blue.", "rejected": "Loud.", "exploration": "Grey"},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5", "exploration": "four"},
    {"prompt": "A pet?", "chosen": "A cat.", "rejected": "A rock.", "exploration": "dog"},
]


@pytest.fixture
def pairs_file(tmp_path):
    p = tmp_path / "pairs.jsonl"
    atomic_write_jsonl(p, PAIRS)
    return p


def cfg(*overrides):
    base = ["train.beta=0.1", "train.alpha=0.01", "train.learning_rate=1e-2", "train.warmup_ratio=0",
            "train.lr_scheduler=constant", "train.max_grad_norm=0", "train.tensorboard=false"]
    return load_config(None, base + list(overrides))


def weights(path):
    return load_file(str(path / "model.safetensors"))


def assert_same_training(a: Path, b: Path) -> None:
    """Two training folders hold the same model (to float tolerance) and the same metrics (but speed)."""
    wa, wb = weights(a / "model"), weights(b / "model")
    for name in wa:
        assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in p.read_text().splitlines()]
    assert strip(a / "metrics.jsonl") == strip(b / "metrics.jsonl")


def test_training_changes_every_parameter_and_lowers_loss(tmp_path, pairs_file, tiny_model_dir):
    out = tmp_path / "train"
    run_train(cfg("train.batch_size=8", "train.epochs=5"), pairs_file, tiny_model_dir, out)
    before, after = weights(tiny_model_dir), weights(out / "model")
    assert before.keys() == after.keys()
    for name in before:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5  # one optimizer step per epoch (8 pairs, batch 8)
    assert rows[0]["loss/dpo"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert rows[-1]["loss/dpo"] < 0.7 * rows[0]["loss/dpo"]
    assert rows[-1]["rewards/margins"] > 0 and rows[-1]["rewards/accuracies"] == 1.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "logps/explore", "loss/dpo", "loss/explore", "lr", "grad_norm", "tokens_per_s"):
        assert key in rows[0]
    assert sorted(p.name for p in out.iterdir()) == ["DONE.json", "config.yaml", "metrics.jsonl", "model",
                                                     "ref_logps.safetensors"]
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out / "model")
    assert_close(m.state_dict()["model.norm.weight"], after["model.norm.weight"])
    assert load_config(out / "config.yaml").train.alpha == 0.01


def test_grad_accumulation_4x2_equals_1x8(tmp_path, pairs_file, tiny_model_dir):
    run_train(cfg("train.batch_size=8", "train.grad_accum=1"), pairs_file, tiny_model_dir, tmp_path / "a")
    run_train(cfg("train.batch_size=2", "train.grad_accum=4"), pairs_file, tiny_model_dir, tmp_path / "b")
    a, b = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    # Adam's first step is ~lr * g / |g|, which amplifies float noise in near-zero gradients: allow
    # 2% of one step (lr = 1e-2). A wrong normalisation (e.g. mean per micro-batch without / 4)
    # changes the gradient norm 4x and fails the check below.
    for name in a:
        assert_close(a[name], b[name], atol=2e-4, rtol=0)
    ma = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    mb = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)


def test_max_forward_tokens_trains_the_same_step(tmp_path, pairs_file, tiny_model_dir, monkeypatch):
    import selm.stages.train as tr
    import selm.training.plan as plan

    passes = []
    real = tr.batch_logps
    monkeypatch.setattr(tr, "batch_logps",
                        lambda module, batch: passes.append(batch.input_ids.numel()) or real(module, batch))
    run_train(cfg("train.batch_size=8", "train.max_forward_tokens=null"), pairs_file, tiny_model_dir, tmp_path / "a")
    assert len(passes) == 1
    passes.clear()
    run_train(cfg("train.batch_size=8", "train.max_forward_tokens=100"), pairs_file, tiny_model_dir, tmp_path / "b")
    assert len(passes) > 2 and max(passes) <= 100  # every pass within the budget (one pair fits in 100 here)
    # The default, "auto", is a budget on a CPU: the same passes as that budget.
    monkeypatch.setattr(plan, "AUTO_FORWARD_TOKENS_CPU", 100)
    auto = passes[:]
    passes.clear()
    run_train(cfg("train.batch_size=8"), pairs_file, tiny_model_dir, tmp_path / "c")
    assert passes == auto
    a, b = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    for name in a:  # as 4x2 vs 1x8 above: float noise through Adam's first step
        assert_close(a[name], b[name], atol=2e-4, rtol=0)
    ma = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    mb = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)


def test_forward_tokens_auto_is_a_budget_on_cpus_only():
    from selm.training.plan import AUTO_FORWARD_TOKENS_CPU, forward_tokens

    assert forward_tokens("auto", "cpu", sharded=False) == AUTO_FORWARD_TOKENS_CPU == 1024
    assert forward_tokens("auto", "cpu", sharded=True) is None  # ZeRO-3/FSDP: every process the same passes
    assert forward_tokens("auto", "cuda:0", sharded=False) is None
    assert forward_tokens(100, "cuda:0", sharded=False) == 100 and forward_tokens(None, "cpu", False) is None
    assert load_config(None, []).train.max_forward_tokens == "auto"
    assert load_config(None, ["train.max_forward_tokens=300"]).train.max_forward_tokens == 300
    assert load_config(None, ["train.max_forward_tokens=null"]).train.max_forward_tokens is None
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="train.max_forward_tokens"):
            load_config(None, [f"train.max_forward_tokens={bad}"])


def test_split_by_tokens():
    from selm.objective.logprobs import TokenizedExample
    from selm.training.plan import split_by_tokens

    ex = [TokenizedExample([1] * p, [[2] * r for r in rs]) for p, rs in
          [(4, [3, 3, 3]), (2, [1, 1, 1]), (10, [5, 6, 7]), (1, [1, 1, 1])]]
    micros = [[0, 1, 2, 3]]
    assert split_by_tokens(micros, ex, None, "prefix") is micros
    # prefix rows are 13, 5, 28, 4 tokens: 2 x 13 fits 30; adding the 28-token row would make 3 x 28
    assert split_by_tokens(micros, ex, 30, "prefix") == [[0, 1], [2], [3]]
    assert split_by_tokens(micros, ex, 1000, "prefix") == micros
    assert split_by_tokens(micros, ex, 1, "prefix") == [[0], [1], [2], [3]]  # one pair at least
    # padded: 3 rows of prompt + longest response: 7, 3, 17, 2 -> 3 x 7 = 21; 6 x 7 = 42 > 40
    assert split_by_tokens([[0, 1], [2, 3]], ex, 40, "padded") == [[0], [1], [2], [3]]
    assert split_by_tokens([[0, 1], [2, 3]], ex, 42, "padded") == [[0, 1], [2], [3]]


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, pairs_file, tiny_model_dir, recwarn):
    run_train(cfg("train.batch_size=8"), pairs_file, tiny_model_dir, tmp_path / "a")
    run_train(cfg("train.batch_size=8", "train.gradient_checkpointing=true"), pairs_file, tiny_model_dir, tmp_path / "b")
    a, b = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    for name in a:  # recomputed activations, same gradients (up to Adam's amplified float noise)
        assert_close(a[name], b[name], atol=2e-4, rtol=0)
    ma = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    mb = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
    # Turned on under the current transformers name, not the deprecated one.
    assert not [w for w in recwarn if "checkpointing_enable" in str(w.message)]


def test_alpha_zero_needs_no_exploration_and_matches_dpo(tmp_path, tiny_model_dir):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "exploration"}) + "\n" for r in PAIRS))
    run_train(cfg("train.alpha=0", "train.batch_size=4"), p, tiny_model_dir, tmp_path / "dpo")
    row = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss/explore"] == 0 and "logps/explore" not in row
    assert row["loss"] == row["loss/dpo"]


def test_exploration_required_when_alpha_positive(tmp_path, tiny_model_dir):
    from selm.io import InputError

    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    with pytest.raises(InputError, match=r"pairs.jsonl:1: missing field 'exploration'"):
        run_train(cfg(), p, tiny_model_dir, tmp_path / "x")
    assert not (tmp_path / "x" / "DONE.json").exists()


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, pairs_file, tiny_model_dir):
    c = cfg("train.batch_size=2", "train.epochs=2", "train.save_every_steps=2", "train.lr_scheduler=cosine",
            "train.warmup_ratio=0.2", "train.max_grad_norm=1.0")
    run_train(c, pairs_file, tiny_model_dir, tmp_path / "full")
    # A crash after step 5 (checkpoint at step 4), then a re-run of the same command.
    run_train(c, pairs_file, tiny_model_dir, tmp_path / "resumed", max_steps=5)
    assert (tmp_path / "resumed" / "checkpoint").is_dir() and not (tmp_path / "resumed" / "DONE.json").exists()
    run_train(c, pairs_file, tiny_model_dir, tmp_path / "resumed")
    assert_same_training(tmp_path / "full", tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "checkpoint").exists()


def test_reference_cache_is_reused_and_keyed(tmp_path, pairs_file, tiny_model_dir, monkeypatch):
    import selm.training.reference as tr

    out = tmp_path / "t"
    run_train(cfg("train.batch_size=8"), pairs_file, tiny_model_dir, out)
    calls = []
    real = tr.reference_logps
    monkeypatch.setattr(tr, "reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    (out / "DONE.json").unlink()
    run_train(cfg("train.batch_size=8"), pairs_file, tiny_model_dir, out)
    assert calls == []  # same model, data and settings: the cache is used
    run_train(cfg("train.batch_size=8", "train.max_length=600"), pairs_file, tiny_model_dir, out)
    assert calls == [1]  # a tokenisation setting changed: recomputed


def test_step_plan_and_schedule():
    c = load_config(None, ["train.batch_size=2", "train.grad_accum=2", "train.epochs=2"]).train
    plan = StepPlan.build(10, c, seed=3, world=1)
    assert [len(s) for s in plan.steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(plan.steps[:3], [])) == list(range(10))
    assert plan.steps == StepPlan.build(10, c, seed=3, world=1).steps
    f = lr_lambda("cosine", warmup_steps=2, total_steps=10)
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.0)
    assert f(6) == pytest.approx(0.5)


def test_done_records_the_tokens_training_ran(tmp_path, pairs_file, tiny_model_dir, monkeypatch):
    """DONE.json's "tokens" equals the real tokens of every forward pass (LogpBatch.num_tokens), for both
    layouts and over epochs."""
    import selm.stages.train as tr

    ran, real = [], tr.batch_logps
    monkeypatch.setattr(tr, "batch_logps", lambda m, b: ran.append(b.num_tokens) or real(m, b))
    for layout in ("prefix", "padded"):
        ran.clear()
        out = tmp_path / layout
        run_train(cfg("train.batch_size=4", f"train.layout={layout}", "train.epochs=2"), pairs_file, tiny_model_dir, out)
        assert json.loads((out / "DONE.json").read_text())["tokens"] == sum(ran) > 0
