"""DIR/environment.json: versions, seed, config hash and machine, one entry per start of a run."""

import json
import platform

import torch

from selm.config import config_to_dict, load_config
from selm.environment import record_environment
from selm.io import sha256_json


def test_each_start_appends_an_entry_with_versions_seed_hash_and_machine(tmp_path):
    cfg = config_to_dict(load_config(None, ["seed=7", "train.alpha=0"]))
    record_environment(tmp_path, cfg)
    other = config_to_dict(load_config(None, ["seed=7", "train.alpha=0.1"]))
    record_environment(tmp_path, other)
    entries = json.loads((tmp_path / "environment.json").read_text())
    assert len(entries) == 2
    first = entries[0]
    assert first["seed"] == 7 and first["python"] == platform.python_version()
    assert first["packages"]["torch"] == torch.__version__
    assert {"selm", "torch", "transformers", "accelerate"} <= set(first["packages"])
    assert first["config_sha256"] == sha256_json(cfg) != entries[1]["config_sha256"]
    machine = first["machine"]
    assert machine["cpu"] and machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1
    assert len(machine["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert first["processes"] == 1


def test_accelerate_floor_honours_sync_gradients_under_deepspeed():
    """accelerate 1.0-1.7 step the DeepSpeed optimizer after every micro-batch (their engine wrapper
    ignores sync_gradients; 1.8 added set_gradient_accumulation_boundary and steps only at the
    boundary): the requirement must exclude them, and the installed version must satisfy it."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (req,) = [Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "accelerate"]
    assert not req.specifier.contains("1.7.0") and req.specifier.contains("1.8.0")
    assert req.specifier.contains(version("accelerate"))
