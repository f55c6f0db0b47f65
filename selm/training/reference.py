"""The reference log-probs: computed once per training stage, before its first update, and cached.

By default the reference is the start model itself (SELM: the reference is the previous iteration's
model), so its log-probs come from the very model about to be trained. They are cached in the stage
folder under a key of everything they depend on, so a resumed stage does not score them again.
Which state is on disk is the main process's decision, broadcast with the numbers: on a shared
file system with attribute caching another node could see an older file than the one just written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from selm import dist
from selm.config import Config
from selm.io import atomic_write_bytes, sha256_file, sha256_json
from selm.models import load_causal_lm
from selm.objective.logprobs import ResponseLogps, TokenizedExample, score_logps
from selm.precision import use_bf16

REF_CACHE = "ref_logps.safetensors"


def _model_fingerprint(path: Path) -> dict:
    # Path, size and mtime of every weight/config file: cheap on 70B folders, changes when they do.
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files} | {"path": str(path.resolve())}


def reference_key(ref_path: Path, pairs_path: Path, cfg: Config, device) -> str:
    """Hash of everything the reference log-probs depend on: the reference model's files, the data,
    tokenisation, which responses are scored, layout and precision."""
    tc = cfg.train
    return sha256_json({
        "ref": _model_fingerprint(ref_path), "data": sha256_file(pairs_path) if Path(pairs_path).is_file() else str(pairs_path),
        "max_length": tc.max_length, "max_prompt_length": tc.max_prompt_length, "explore": tc.alpha > 0,
        "layout": tc.layout, "bf16": use_bf16(tc.bf16, device), "dtype": cfg.model.dtype,
    })


def reference_logps(module: ResponseLogps, ref_model_path: Path | None, examples: list[TokenizedExample], cfg: Config,
                    *, collate, pad_id: int, device, autocast_dtype: torch.dtype | None,
                    indices: list[int] | None = None, num_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Reference log-probs of examples[i] for i in `indices` (default: all), kind -> (n,) float32 CPU:
    of `module` itself (the start model, before its first update) or, when `ref_model_path` is
    given, of that model, loaded for this only so it is never held during training. `autocast_dtype`
    is training's (the engine's `autocast_dtype`), so the numbers compare with training's."""
    if ref_model_path is not None:
        ref_model = load_causal_lm(Path(ref_model_path), cfg.model.dtype, cfg.model.trust_remote_code).to(device)
        module = ResponseLogps(ref_model, segments=None if cfg.train.segment_attention else False)
    return score_logps(module, examples, batch_size=cfg.train.ref_batch_size, collate=collate, pad_id=pad_id,
                       device=device, autocast_dtype=autocast_dtype, indices=indices,
                       num_batches=num_batches, progress="reference log-probs" if dist.is_main() else None)


def _read_cache(cache: Path, key: str) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if cache.is_file():
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(str(cache))
    return None


def cached_reference(cache: Path, key: str, examples: list[TokenizedExample], batch_size: int,
                     score: Callable[[list[int], int], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The reference log-probs, kind -> (N,) float32, from `cache` when it was written under `key`.

    Otherwise the examples are sorted by length and cut into batches of `batch_size`, each process
    scores every world-th batch (`score(indices, num_batches)`; the same batches one process would
    run, and the same number of forwards on every process, as ZeRO-3 needs), and the main process
    puts the pieces together and writes the cache. Either way the main process's numbers are sent
    to every process, so all of them hold the same ones without reading the file."""
    from safetensors.torch import save

    ref = _read_cache(cache, key) if dist.is_main() else None
    if dist.broadcast(ref is not None):
        return dist.broadcast(ref)
    sizes = [len(e.prompt) + sum(map(len, e.responses)) for e in examples]
    order = sorted(range(len(examples)), key=sizes.__getitem__)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = [i for b in dist.shard(batches) for i in b]
    part = score(mine, -(-len(batches) // dist.world_size()))
    pieces = dist.all_gather((mine, part))
    if dist.is_main():
        ref = {k: torch.zeros(len(examples)) for k in part}
        for idx, values in pieces:
            for k, v in values.items():
                ref[k][idx] = v
        atomic_write_bytes(cache, save({k: v.contiguous() for k, v in ref.items()}, metadata={"key": key}))
    return dist.broadcast(ref)
