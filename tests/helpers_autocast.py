"""Run under `accelerate launch` (ZeRO-3) by tests/test_engine.py: `python -m helpers_autocast MODEL PAIRS
OUT` trains with train.bf16=true and writes, per rank, OUT/autocast_<rank>.json: the DeepSpeed config's
torch_autocast section, the dtypes selm's own autocast was asked for, and whether autocast was on
(and to what) inside every forward of the model."""

import json
import os
import sys
from pathlib import Path

import torch

import selm.stages.train as train_mod
from selm import dist
from selm.config import load_config
from selm.objective.logprobs import ResponseLogps

seen = {"outer": [], "forward": []}


def main(model: Path, pairs: Path, out: Path) -> None:
    real_autocast, real_forward, real_engine = train_mod.autocast, ResponseLogps.forward, train_mod.create_engine

    def autocast(device, dtype):
        seen["outer"].append(None if dtype is None else str(dtype))
        return real_autocast(device, dtype)

    def forward(self, *a, **k):
        seen["forward"].append([torch.is_autocast_enabled("cpu"), str(torch.get_autocast_dtype("cpu"))])
        return real_forward(self, *a, **k)

    def engine(*a, **k):
        e = real_engine(*a, **k)
        seen["ds_config"] = e.accelerator.state.deepspeed_plugin.deepspeed_config.get("torch_autocast")
        return e

    train_mod.autocast, ResponseLogps.forward, train_mod.create_engine = autocast, forward, engine
    cfg = load_config(None, ["train.batch_size=2", "train.tensorboard=false", "train.alpha=0.01", "train.bf16=true"])
    train_mod.run_train(cfg, pairs, model, out / "train")
    (out / f"autocast_{dist.rank()}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    sys.stdout.flush()
    os._exit(0)  # as selm.cli.main under a launcher: no interpreter teardown of gloo's threads
