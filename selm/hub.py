"""Models and datasets named by Hugging Face hub id, as every HF/TRL tool takes them.

A hub id that is not a local folder is downloaded on first use into the Hugging Face cache (at a
`revision`: branch, tag or commit, when one is set), by the main rank first under a multi-process
launcher; the others then find it there. With HF_HUB_OFFLINE=1 nothing is downloaded: models come
from the local cache only, and a dataset must be a local file or folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from selm import dist
from selm.io import InputError

# What selm reads from a model repository: configs, safetensors weights, tokenizer files and (for
# trust_remote_code) model code. Pickled duplicates of the weights (*.bin, *.pt) are not fetched.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*", "*.py"]


def offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) is set to a true value, read now (the
    hub library reads it once, at import)."""
    return any(os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"}
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_repo_id(name: str) -> bool:
    """Whether `name` is spelled like a hub repository id ("owner/name" or "name")."""
    if name.endswith((".jsonl", ".json", ".parquet")) or name.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def model_snapshot(name: str, key: str, revision: str | None = None) -> Path:
    """A hub model's folder in the Hugging Face cache: downloaded unless offline (then the cache
    only). `key` is the config key that named it, for the one-line error."""
    from huggingface_hub import snapshot_download

    if offline() or not is_repo_id(name):
        try:
            return Path(snapshot_download(name, revision=revision, local_files_only=True))
        except Exception:
            raise InputError(f"{key}: {name!r} is not a local folder nor a model in the local Hugging Face cache"
                             + (" (HF_HUB_OFFLINE=1: nothing is downloaded)" if offline() else "")) from None
    with dist.main_first():
        try:
            return Path(snapshot_download(name, revision=revision, allow_patterns=MODEL_FILES))
        except Exception as e:
            at = f" at revision {revision!r}" if revision else ""
            raise InputError(f"{key}: {name!r} is not a local folder, and downloading it{at} from the Hugging Face "
                             f"hub failed ({_first_line(e)})") from None


def load_dataset(name: str, split: str | None, revision: str | None):
    """A hub dataset as `datasets.load_dataset` gives it (a Dataset, or a DatasetDict when no split is
    named), downloaded (and cached) on the main rank first."""
    if offline():
        raise InputError(f"{name}: not a local file or folder (HF_HUB_OFFLINE=1: hub datasets are not downloaded)")
    import datasets

    with dist.main_first():
        try:
            return datasets.load_dataset(name, split=split, revision=revision)
        except Exception as e:
            at = f" at revision {revision!r}" if revision else ""
            raise InputError(f"{name}: not a local file or folder, and loading it{at} from the Hugging Face hub "
                             f"failed ({_first_line(e)})") from None
