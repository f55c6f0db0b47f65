"""What a run ran on, recorded in DIR/environment.json so a result can be traced and reproduced:
package versions, Python, the seed, a hash of the resolved config, the machine (CPU model, cores,
torch threads, GPUs) and the number of processes. Each start of `selm run` (the first and every
resume) appends one entry, so a run resumed elsewhere shows both machines."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from pathlib import Path

from selm import dist
from selm.io import atomic_write_json, read_json, sha256_json
from selm.precision import cpu_native_bf16, use_bf16

ENVIRONMENT = "environment.json"
PACKAGES = ("selm", "torch", "transformers", "accelerate", "safetensors", "tokenizers", "deepspeed", "vllm")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(config: dict) -> dict:
    """One entry: versions, seed, config hash and machine, now."""
    import torch

    from selm import __version__

    packages = {name: _version(name) for name in PACKAGES}
    packages["selm"] = __version__  # the source in use, also when run from a checkout
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "packages": {k: v for k, v in packages.items() if v is not None},
        "seed": config.get("seed"),
        "config_sha256": sha256_json(config),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "gpus": gpus, "cuda": torch.version.cuda if gpus else None,
                    "cpu_native_bf16": cpu_native_bf16()},
        # What train.bf16 means here ("auto" depends on the machine); training runs on the GPU when there is one.
        "train_bf16": use_bf16(config.get("train", {}).get("bf16", False), "cuda" if gpus else "cpu"),
        "processes": dist.world_size(),
    }


def record_environment(out: Path, config: dict) -> None:
    """Append this start's entry to out/environment.json (main rank; written atomically)."""
    if not dist.is_main():
        return
    path = Path(out) / ENVIRONMENT
    entries = read_json(path) if path.is_file() else []
    atomic_write_json(path, [*entries, environment(config)])
