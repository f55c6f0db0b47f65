"""FSDP2 (torch.distributed.fsdp.fully_shard) for training, on CPUs (gloo) as on GPUs (nccl).

accelerate cannot be the way on CPUs: its FSDP plugin is only reached for accelerator devices
(accelerate 1.16 comes up as DistributedType.NO, or MULTI_CPU = DDP with ``cpu=True``), and it takes
the layers to wrap from ``_no_split_modules`` of the module it is given, which selm's log-prob
wrapper does not have. So selm shards the model itself:

    module = shard_model(ResponseLogps(model))          # every decoder layer, then the root
    optimizer = torch.optim.AdamW(module.parameters())   # AFTER sharding: it holds the shards
    for micro-batches of a step:
        set_gradient_sync(module, last)                  # reduce-scatter on the last one only
        loss.backward()
    norm = clip_grad_norm(module, max_norm)              # the whole model's norm, on every rank
    optimizer.step()

``save_sharded`` / ``load_sharded`` hold resume state (each rank writes its own shards with
torch.distributed.checkpoint); ``full_state_dict`` gathers the whole model on the main rank for a
plain Hugging Face folder. Every function here is collective: all ranks call it together.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from selm import dist
from selm.io import atomic_dir_everywhere, atomic_write_json, on_main, read_json

EXTRA = "state.json"  # the step, schedule and metrics size (the same name as the other engines' checkpoints)


def _fsdp():
    """torch.distributed.fsdp with FSDP2's public API (torch >= 2.6), or a one-line error."""
    try:
        from torch.distributed import fsdp
        fsdp.fully_shard, fsdp.FSDPModule  # noqa: B018
    except (ImportError, AttributeError):
        raise RuntimeError(f"FSDP2 needs torch>=2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                           f"{torch.__version__}") from None
    return fsdp


def decoder_layer_classes(module: nn.Module, names: Iterable[str] | None = None) -> set[type]:
    """The classes of `module`'s submodules named in `names` (default: the ``_no_split_modules`` of the
    Hugging Face model inside `module`, i.e. its decoder layers). Raises ValueError if none is found:
    one unit for the whole model would gather every parameter at once (DDP's memory)."""
    if names is None:
        names = {n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    names = set(names)
    found = {type(m) for m in module.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(f"FSDP: no submodule of {type(module).__name__} is one of "
                         f"{sorted(names) or 'the layer classes'}; name the decoder layer class to shard by")
    return found


def shard_model(module: nn.Module, layer_classes: Iterable[type | str] | None = None, *,
                mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply fully_shard to each submodule of a class in `layer_classes` (types or class names; default
    the model's decoder layers, ``decoder_layer_classes``), then to `module` itself, which then owns
    what is left (embeddings, final norm, LM head). Returns `module`, now an FSDPModule whose
    parameters are DTensors sharded over all ranks. Call before building the optimizer."""
    fully_shard = _fsdp().fully_shard
    dist.barrier()  # joins the process group (gloo on CPU) before fully_shard builds its device mesh
    if layer_classes is None:
        classes = decoder_layer_classes(module)
    else:
        wanted = list(layer_classes)
        classes = {c for c in wanted if isinstance(c, type)}
        named = [c for c in wanted if isinstance(c, str)]
        if named:
            classes |= decoder_layer_classes(module, named)
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    layers = [m for m in module.modules() if m is not module and isinstance(m, tuple(classes))]
    if not layers:
        raise ValueError(f"FSDP: {type(module).__name__} has no submodule of class "
                         f"{', '.join(sorted(c.__name__ for c in classes))}")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(module, **kwargs)
    return module


def units(module: nn.Module) -> list[str]:
    """Names of the FSDP units in `module` ("" is the root), in module order."""
    return [name for name, m in module.named_modules() if isinstance(m, _fsdp().FSDPModule)]


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """Gradient accumulation: False on every micro-batch of a step but the last (gradients stay
    unsharded and local, no reduce-scatter), True on the last (the accumulated sum is reduce-scattered
    once). The default is True."""
    module.set_requires_gradient_sync(sync)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value as a plain tensor; a plain tensor as it is. The total gradient norm of
    sharded gradients is a DTensor: replicated in torch 2.13 (checked), a partial one in older
    versions, where float() of it is this rank's share (pytorch#126457)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `module` to a total norm of `max_norm` (inf: measure only) and return the
    total norm before clipping, the whole model's, as a plain tensor equal on every rank."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
    return full_value(norm)


def full_state_dict(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on the main rank (an empty dict on the others),
    keys without `prefix` (e.g. "model." for a ResponseLogps, so that the inner Hugging Face model's
    save_pretrained(state_dict=...) takes them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied weight (the LM head sharing the embedding) comes back under both names; a Hugging Face
    # folder holds it once, under the name a plain state dict keeps.
    kept = {name for name, _ in module.named_parameters()}
    aliases = {name for name, _ in module.named_parameters(remove_duplicate=False)} - kept
    return {k.removeprefix(prefix): v for k, v in state.items() if k not in aliases}


def _rng_key() -> str:
    return f"rng/rank_{dist.rank()}"


def save_sharded(path: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict | None = None) -> None:
    """Resume state in folder `path`: model and optimizer shards (each rank writes its own, with
    torch.distributed.checkpoint), each rank's random state (dropout), and `extra` (JSON: step,
    schedule...) from the main rank. Built under a temporary name and renamed into place, so a kill
    leaves the previous checkpoint or this one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with atomic_dir_everywhere(path) as tmp:
        model_state, optim_state = get_state_dict(module, optimizer)
        dcp.save({"model": model_state, "optim": optim_state, _rng_key(): torch.get_rng_state()}, checkpoint_id=tmp)
        if dist.is_main():
            atomic_write_json(tmp / EXTRA, extra or {})


def _weights_only_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner unpickles the non-tensor entries (optimizer hyper-parameters) with
        torch.load(weights_only=False); a checkpoint folder is never trusted with arbitrary objects."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            safe = torch.load(value, weights_only=True)
            buf = io.BytesIO()
            torch.save(safe, buf)  # only plain values from here on
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return WeightsOnlyLoadPlanner()


def load_sharded(path: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load what save_sharded wrote into `module` (sharded as when it was saved, same world size) and
    `optimizer` (built on it), restore this rank's random state; return `extra`. Which checkpoint to
    load is the caller's decision, made on the main rank and broadcast."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state, _rng_key(): torch.get_rng_state()}
    dcp.load(state, checkpoint_id=Path(path), planner=_weights_only_planner())
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state[_rng_key()])
    return on_main(lambda: read_json(Path(path) / EXTRA))
