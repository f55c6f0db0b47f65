"""LoRA training (train.lora, selm/lora.py) on the tiny model: only the adapters train, the saved model
is the start model plus the adapters' product, the reference log-probs are the start model's, a
killed run resumes exactly, and the tiny loop runs with LoRA end to end."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from selm import lora
from selm.cli import main
from selm.config import ConfigError, load_config
from selm.stages.train import run_train
from test_train import assert_same_training, cfg, pairs_file, weights  # noqa: F401 -- pairs_file is a fixture

ROOT = Path(__file__).resolve().parents[1]
# The tiny Llama: hidden 64, MLP 128, 4 heads of 16, 2 key/value heads (k, v project to 32), 2 layers.
IN_OUT = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def adapter_params(r: int, layers: int = 2) -> int:
    """A (r x in) + B (out x r) for every linear layer but the output head ("all-linear")."""
    return layers * sum(r * (i + o) for i, o in IN_OUT.values())


def test_only_adapters_train_and_the_merged_model_is_start_plus_BA(tmp_path, pairs_file, tiny_model_dir, monkeypatch):
    start = weights(tiny_model_dir)
    seen = {}
    real = lora.save_merged

    def spy(model, *args):  # the trained adapter model, just before its adapters are merged
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        real(model, *args)

    monkeypatch.setattr(lora, "save_merged", spy)
    out = tmp_path / "t"
    summary = run_train(cfg("train.batch_size=4", "train.epochs=3", "train.lora.r=4", "train.lora.alpha=8",
                            "train.lora.keep_adapter=true"), pairs_file, tiny_model_dir, out)
    assert summary["trainable_parameters"] == adapter_params(4) == 8192
    # Every base weight of the adapter model is the start model's, bit for bit; the adapters moved.
    base = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in seen.items() if "lora_" not in k}
    assert base.keys() == start.keys() | {"lm_head.weight"}  # the tied head is listed under its own name too
    for k in start:
        assert torch.equal(base[k], start[k]), k
    assert all(v.abs().max() > 0 for k, v in seen.items() if "lora_B" in k)

    # model/ = start + (alpha / r) * B @ A on every linear layer; everything else is the start's.
    merged = weights(out / "model")
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert merged.keys() == start.keys()
    changed = 0
    for k in start:
        stem = k.removesuffix(".weight")
        a = adapter.get(f"base_model.model.{stem}.lora_A.weight")
        if a is None:
            assert torch.equal(merged[k], start[k]), k
            continue
        b = adapter[f"base_model.model.{stem}.lora_B.weight"]
        assert_close(merged[k], start[k] + (8 / 4) * b @ a, atol=1e-6, rtol=1e-5)
        changed += not torch.equal(merged[k], start[k])
    assert changed == 2 * len(IN_OUT)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss/dpo"] == pytest.approx(0.6931, abs=1e-4)  # B = 0: the policy is the reference
    assert rows[-1]["loss/dpo"] < rows[0]["loss/dpo"]


def test_reference_logps_with_lora_equal_those_without(tmp_path, pairs_file, tiny_model_dir):
    # Computed after the adapters are added (B = 0, dropout on): exactly the start model's numbers.
    run_train(cfg("train.batch_size=4", "train.lora.r=8", "train.lora.dropout=0.3"), pairs_file, tiny_model_dir,
              tmp_path / "lora", max_steps=0)
    run_train(cfg("train.batch_size=4"), pairs_file, tiny_model_dir, tmp_path / "full", max_steps=0)
    a = load_file(str(tmp_path / "lora" / "ref_logps.safetensors"))
    b = load_file(str(tmp_path / "full" / "ref_logps.safetensors"))
    assert a.keys() == b.keys() == {"chosen", "rejected", "explore"}
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lora_resume_from_checkpoint_equals_uninterrupted(tmp_path, pairs_file, tiny_model_dir):
    # Dropout on, so the restored random state matters too.
    c = cfg("train.batch_size=2", "train.epochs=2", "train.save_every_steps=2", "train.lr_scheduler=cosine",
            "train.warmup_ratio=0.2", "train.max_grad_norm=1.0", "train.lora.r=4", "train.lora.dropout=0.2")
    run_train(c, pairs_file, tiny_model_dir, tmp_path / "full")
    run_train(c, pairs_file, tiny_model_dir, tmp_path / "resumed", max_steps=5)  # checkpoint at step 4
    ckpt = load_file(str(tmp_path / "resumed" / "checkpoint" / "model.safetensors"))
    assert sum(v.numel() for v in ckpt.values()) == adapter_params(4)  # the adapters only, not the base
    run_train(c, pairs_file, tiny_model_dir, tmp_path / "resumed")
    assert_same_training(tmp_path / "full", tmp_path / "resumed")
    # A checkpoint of adapters does not load into full training: refused, naming the file.
    run_train(c, pairs_file, tiny_model_dir, tmp_path / "switched", max_steps=5)
    from selm.io import InputError

    with pytest.raises(InputError, match=r"checkpoint/model.safetensors: does not match"):
        run_train(cfg("train.batch_size=2", "train.epochs=2", "train.save_every_steps=2"), pairs_file,
                  tiny_model_dir, tmp_path / "switched")


def test_lora_with_gradient_checkpointing_trains_the_same(tmp_path, pairs_file, tiny_model_dir):
    c = ["train.batch_size=8", "train.lora.r=4", "train.lora.dropout=0"]
    run_train(cfg(*c), pairs_file, tiny_model_dir, tmp_path / "a")
    run_train(cfg(*c, "train.gradient_checkpointing=true"), pairs_file, tiny_model_dir, tmp_path / "b")
    a, b, start = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model"), weights(tiny_model_dir)
    assert not torch.equal(b["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])
    for name in a:
        assert_close(a[name], b[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("setting, message", [
    ("train.lora.r=-1", "train.lora.r: must be >= 0"),
    ("train.lora.dropout=1", "train.lora.dropout: must be in"),
    ("train.lora.alpha=0", "train.lora.alpha: must be > 0"),
    ("train.lora.target_modules=[]", "train.lora.target_modules: must name"),
    ("train.lora.dropuot=0.1", r"train.lora.dropuot: unknown key \(did you mean 'dropout'\?\)"),
])
def test_bad_lora_settings_name_the_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [setting])


def test_target_modules_matching_nothing_is_refused(tmp_path, pairs_file, tiny_model_dir):
    with pytest.raises(ConfigError, match="train.lora.target_modules: "):
        run_train(cfg("train.lora.r=4", "train.lora.target_modules=[no_such_proj]"), pairs_file, tiny_model_dir,
                  tmp_path / "x")
    assert not (tmp_path / "x" / "DONE.json").exists()


def test_tiny_loop_with_lora(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--output-dir", str(out), "--set", "train.lora.r=8"]) == 0
    assert "iteration=2" in capsys.readouterr().out
    start = load_file(str(out / "start_model" / "model.safetensors"))
    for t in (1, 2):
        sd = out / f"iter_{t}" / "train"
        assert json.loads((sd / "DONE.json").read_text())["trainable_parameters"] == adapter_params(8)
        assert not (sd / "adapter").exists()  # train.lora.keep_adapter is off
    # Two iterations of merged adapters: the linear layers moved, embeddings and norms never did.
    two = load_file(str(out / "iter_2" / "train" / "model" / "model.safetensors"))
    assert two.keys() == start.keys()
    for k in start:
        assert torch.equal(two[k], start[k]) == ("proj" not in k), k
