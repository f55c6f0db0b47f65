"""The training engine's hand-offs that a GPU run depends on, checked on a CPU: memory handed back
when the stage ends, resume state loaded onto the CPU first, the GPU's random state checkpointed,
and bf16 under DeepSpeed set as the engine's own autocast (an outer torch.autocast is switched off
inside DeepSpeed's engine, with only a warning)."""

import gc
import json
import os
import subprocess
import weakref

import pytest
import torch

import selm.stages.train as train_mod
import selm.training.engine as engine_mod
from selm.config import load_config
from selm.io import atomic_write_jsonl
from test_distributed import ROOT, accelerate_zero3, env
from test_nonfinite import PAIRS


def cfg(*overrides):
    return load_config(None, ["train.batch_size=2", "train.tensorboard=false", "train.alpha=0.01", *overrides])


@pytest.fixture
def pairs(tmp_path):
    p = tmp_path / "pairs.jsonl"
    atomic_write_jsonl(p, PAIRS[:4])
    return p


def test_nothing_of_the_training_survives_the_stage_and_the_device_cache_is_emptied(tmp_path, pairs, tiny_model_dir,
                                                                                    monkeypatch):
    refs, released = [], []
    real_load, real_opt, real_engine = train_mod.load_causal_lm, train_mod.build_optimizer, train_mod.create_engine

    def load(*a, **k):
        model = real_load(*a, **k)
        refs.append(weakref.ref(model))
        return model

    def optimizer(*a, **k):
        opt = real_opt(*a, **k)
        refs.append(weakref.ref(opt))
        return opt

    def engine(*a, **k):
        e = real_engine(*a, **k)
        refs.append(weakref.ref(e))
        return e

    monkeypatch.setattr(train_mod, "load_causal_lm", load)
    monkeypatch.setattr(train_mod, "build_optimizer", optimizer)
    monkeypatch.setattr(train_mod, "create_engine", engine)
    monkeypatch.setattr(engine_mod, "release_device_memory", lambda device: released.append(torch.device(device)))
    train_mod.run_train(cfg(), pairs, tiny_model_dir, tmp_path / "out")
    assert released == [torch.device("cpu")]  # the hook ran once, for this process's device
    gc.collect()
    assert len(refs) == 3 and [r() for r in refs] == [None, None, None]


def test_the_release_hook_empties_the_gpu_cache_only_on_a_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    engine_mod.release_device_memory("cpu")
    assert calls == []
    engine_mod.release_device_memory("cuda:0")
    assert calls == [1]


def test_resume_state_is_read_onto_the_cpu_and_never_unpickled(tmp_path, pairs, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    assert train_mod.run_train(cfg("train.save_every_steps=1"), pairs, tiny_model_dir, out, max_steps=1) == {"stopped_at": 1}
    seen, real = [], torch.load
    monkeypatch.setattr(engine_mod.torch, "load", lambda *a, **k: seen.append(k) or real(*a, **k))
    train_mod.run_train(cfg("train.save_every_steps=1"), pairs, tiny_model_dir, out)
    assert seen == [{"weights_only": True, "map_location": "cpu"}]


def test_the_gpu_random_state_is_checkpointed_where_there_is_a_gpu(monkeypatch):
    assert set(engine_mod.random_states()) == {"torch_rng"}  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.arange(4, dtype=torch.uint8))
    states = engine_mod.random_states()
    assert states["cuda_rng"].tolist() == [[0, 1, 2, 3]] and states["torch_rng"].shape[0] == 1


@pytest.mark.slow
def test_zero3_bf16_is_the_engines_own_autocast(tmp_path, pairs, tiny_model_dir):
    """Under ZeRO-3 with train.bf16=true the model's forward runs under bf16 autocast, set by the
    DeepSpeed engine from its config (torch_autocast), with no outer autocast around it."""
    import deepspeed  # noqa: F401 -- installed by the test set-up

    out = tmp_path / "out"
    cmd = accelerate_zero3(tiny_model_dir, pairs, out, module="helpers_autocast")
    tests_path = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    proc = subprocess.run(cmd, env={**env(), "PYTHONPATH": tests_path}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        seen = json.loads((out / f"autocast_{rank}.json").read_text())
        assert seen["ds_config"] == {"enabled": True, "dtype": "bfloat16"}
        assert seen["outer"] == [None] * len(seen["outer"]) and seen["outer"]  # selm's own autocast: off
        assert seen["forward"] and all(f == [True, "torch.bfloat16"] for f in seen["forward"])
    assert json.loads((out / "train" / "DONE.json").read_text())["bf16"] is True
