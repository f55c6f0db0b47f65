"""The training engine: the only module that knows whether one process, DDP, DeepSpeed ZeRO-3 or
FSDP2 trains, so the training loop never asks.

The engine comes from the launcher: `accelerate launch --config_file configs/accelerate/<engine>.yaml`
sets it in the environment (ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP); plain torchrun gives DDP;
one process, none. An engine wraps the model, runs each forward pass's backward (gradients are
synced once per optimizer step, on its last pass), clips and reports the whole gradient norm, saves
and loads resume checkpoints (files it owns: checkpoint/), writes the final model folder, and hands
its memory back when the stage ends.
"""

from __future__ import annotations

import gc
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from selm import dist, lora
from selm.config import TrainConfig
from selm.io import AtomicDir, InputError, atomic_dir_everywhere, atomic_write_json, on_main
from selm.objective.logprobs import ResponseLogps
from selm.precision import use_bf16

CHECKPOINT = "checkpoint"
STATE = "state.json"  # in a checkpoint: step, schedule, metrics size; written last


def _launcher_asks(kind: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def sharding_launch() -> bool:
    """Whether the launcher asks for DeepSpeed or FSDP (accelerate reads the same variables); known
    before any engine exists, so what such engines refuse can be refused before the process group."""
    return _launcher_asks("DEEPSPEED") or _launcher_asks("FSDP")


def create_engine(tc: TrainConfig) -> "Engine | FSDP2Engine":
    """The engine the launcher asks for: FSDP2 (selm shards the model itself, on CPUs and GPUs) or
    accelerate's (one process, DDP, DeepSpeed)."""
    return FSDP2Engine(tc) if _launcher_asks("FSDP") else Engine(tc)


class Engine:
    """One process, DDP or DeepSpeed ZeRO-3, through accelerate."""

    def __init__(self, tc: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        cuda = torch.cuda.is_available()
        deepspeed = _launcher_asks("DEEPSPEED")
        # On CPU accelerate finds no backend for DeepSpeed by itself; gloo is the one that works there.
        kwargs = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
        self.accelerator = Accelerator(cpu=not cuda and not deepspeed, kwargs_handlers=kwargs)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.deepspeed = self.accelerator.state.deepspeed_plugin is not None
        self.sharded = self.deepspeed
        """Parameters and optimizer states are sharded: resume state is the engine's own shards."""
        self.kind = "deepspeed" if self.deepspeed else ("ddp" if self.world > 1 else "one process")
        self.bf16 = use_bf16(tc.bf16, self.device)
        if self.deepspeed:
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            # DeepSpeed cannot infer its batch sizes without a dataloader; selm accumulates itself.
            ds.update({"train_micro_batch_size_per_gpu": tc.batch_size, "gradient_accumulation_steps": 1,
                       "train_batch_size": tc.batch_size * self.world, "gradient_clipping": tc.max_grad_norm})
            if self.bf16:
                # DeepSpeed (>= 0.17.6) turns an outer torch.autocast OFF inside its engine, with only a
                # warning: bf16 has to be the engine's own setting, and no outer autocast is used.
                ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype this process's forwards autocast to around the model (None: none). Under DeepSpeed
        the engine autocasts inside its own forward (its config's torch_autocast)."""
        return torch.bfloat16 if self.bf16 and not self.deepspeed else None

    def prepare(self, model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer], *,
                segments: bool | None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The model wrapped for log-probs and for the engine, and the optimizer the engine steps
        (`make_optimizer(model)`, built when the engine's parameters exist)."""
        return self.accelerator.prepare(ResponseLogps(model, segments=segments), make_optimizer(model))

    def summary(self) -> dict:
        """What DONE.json records about the engine."""
        return {"engine": self.kind, "processes": self.world}

    def unwrap(self, module) -> torch.nn.Module:
        """The Hugging Face model inside the engine's wrapper."""
        return self.accelerator.unwrap_model(module).model

    def forward_pass(self, module, *, last: bool):
        """The context of one forward/backward pass of a step: gradients are all-reduced once per step,
        after the last pass (one all-reduce per step instead of one per pass). DeepSpeed reads the same
        fact from sync_gradients (its engine steps at that boundary; its own accumulation count stays 1)."""
        self.accelerator.sync_gradients = last
        return self.accelerator.no_sync(module) if not last else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, module, max_norm: float) -> float | None:
        """Clip to `max_norm` (<= 0: no clipping) and return the norm of all gradients before it, the
        same number on every process (None: DeepSpeed before its first step)."""
        norm = self.accelerator.clip_grad_norm_(module.parameters(), max_norm if max_norm > 0 else float("inf"))
        if norm is None:
            return None
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor whose local value is this process's share
            norm = norm.full_tensor()
        return float(norm)

    def save_checkpoint(self, ckpt: Path, module, optimizer, scheduler, *, step: int, metrics_bytes: int) -> None:
        """Resume state at optimizer step `step`, built under a temporary name and renamed into place.

        One process or DDP: the main process writes model.safetensors (the trainable parameters: every
        weight, or the LoRA adapters) and trainer_state.pt (optimizer state and every process's random
        state, read back with weights_only=True). ZeRO-3 / FSDP: every process writes its shards with the
        engine's own checkpointing (accelerator.save_state) into the same folder."""
        from safetensors.torch import save_file

        with atomic_dir_everywhere(ckpt) as tmp:
            if self.sharded:
                self.accelerator.save_state(str(tmp))
            else:
                rng = random_states()
                if self.is_main:
                    save_file(lora.trainable_state(self.unwrap(module)), str(tmp / "model.safetensors"))
                    torch.save({"optimizer": optimizer.state_dict(), **rng}, tmp / "trainer_state.pt")
            if self.is_main:
                atomic_write_json(tmp / STATE, {"step": step, "metrics_bytes": metrics_bytes,
                                                "scheduler": scheduler.state_dict()})

    def load_checkpoint(self, ckpt: Path, module, optimizer, scheduler) -> tuple[int, int]:
        """Load the checkpoint at `ckpt` into model, optimizer, schedule and random state if there is one
        (the main process decides); return (step to start from, metrics bytes to keep), (0, 0) without."""
        from safetensors.torch import load_file

        info = _checkpoint_state(ckpt)
        if info is None:
            return 0, 0
        if self.sharded:
            self.accelerator.load_state(str(ckpt))
        else:
            lora.load_trainable_state(self.unwrap(module), load_file(str(ckpt / "model.safetensors")),
                                      ckpt / "model.safetensors")
            # weights_only: never unpickle arbitrary objects. map_location: on the CPU first, as saved
            # tensors would otherwise go back to the GPU they came from (every process onto GPU 0).
            state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
            optimizer.load_state_dict(state["optimizer"])
            # A copy: set_rng_state reads a row view (storage offset > 0) wrongly and crashes.
            torch.set_rng_state(state["torch_rng"][self.rank].clone())
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda_rng"][self.rank].clone())
        scheduler.load_state_dict(info["scheduler"])
        return int(info["step"]), int(info["metrics_bytes"])

    def save_model(self, module, tokenizer, dest: Path, tc: TrainConfig, adapter_dest: Path | None) -> None:
        """The final model as one plain Hugging Face folder of safetensors, loadable by the next
        iteration, by vLLM and by `from_pretrained`. Every process takes part (ZeRO-3 gathers the 16-bit
        weights, FSDP the full state dict); the main process writes. LoRA: the adapters (to
        `adapter_dest` if given) and the model with them merged."""
        if tc.lora.enabled:
            if self.is_main:
                lora.save_merged(self.unwrap(module), tokenizer, dest, adapter_dest)
        else:
            state = self.accelerator.get_state_dict(module)  # keys of ResponseLogps: "model." + the LM's own
            if self.is_main:
                write_model_folder(self.unwrap(module), {k.removeprefix("model."): v for k, v in state.items()},
                                   tokenizer, dest)
        dist.barrier()

    def release(self) -> None:
        """Hand the engine's memory back (the DeepSpeed engine, accelerate's references to the model and
        optimizer, cached GPU blocks), so that a later stage in this process (vLLM asks for a share of
        the GPU's free memory) finds it free. The caller drops its own references first."""
        self.accelerator.free_memory()
        release_device_memory(self.device)


class FSDP2Engine:
    """PyTorch FSDP2 (fully_shard), applied by selm itself (selm/fsdp.py): each decoder layer is its
    own unit, then the root, so parameters are gathered one layer at a time. accelerate's FSDP path
    does not shard on CPUs and would wrap selm's log-prob wrapper as one unit; this one runs under
    torchrun (or `accelerate launch --config_file configs/accelerate/fsdp2.yaml`) on CPUs and GPUs."""

    kind = "fsdp2"
    sharded = True
    deepspeed = False

    def __init__(self, tc: TrainConfig):
        from selm.models import default_device

        if "MASTER_ADDR" not in os.environ:
            raise InputError("FSDP (ACCELERATE_USE_FSDP=true) needs a launcher: torchrun --nproc_per_node N -m selm.cli "
                             "... or accelerate launch --config_file configs/accelerate/fsdp2.yaml ...")
        self.tc = tc
        self.device = default_device()
        dist.join()  # fully_shard builds its device mesh on the process group, also with one process
        self.rank, self.world, self.is_main = dist.rank(), dist.world_size(), dist.is_main()
        self.bf16 = use_bf16(tc.bf16, self.device)
        # On GPUs bf16 is FSDP2's own policy (gathers and compute in bf16, gradients reduced in fp32,
        # as torchtune does); a CPU autocasts around the forward as one process does.
        self.mixed_precision = self.bf16 and self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if self.bf16 and not self.mixed_precision else None
        self.units: list[str] = []

    def prepare(self, model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer], *,
                segments: bool | None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from selm import fsdp

        # accelerate launch passes fsdp2.yaml's settings on as FSDP_* variables; train.fsdp_layers wins.
        named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
        layers = self.tc.fsdp_layers or [n.strip() for n in named.split(",") if n.strip()] or None
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
        policy = None
        if self.mixed_precision:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        module = fsdp.shard_model(ResponseLogps(model, segments=segments), layers, mp_policy=policy,
                                  reshard_after_forward=reshard)
        self.units = fsdp.units(module)
        return module, make_optimizer(model)  # after sharding: the optimizer holds this process's shards

    def summary(self) -> dict:
        return {"engine": self.kind, "processes": self.world, "fsdp_units": self.units}

    def unwrap(self, module) -> torch.nn.Module:
        return module.model

    def forward_pass(self, module, *, last: bool):
        from selm import fsdp

        fsdp.set_gradient_sync(module, last)  # reduce-scattered once, after the step's last pass
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, module, max_norm: float) -> float:
        from selm import fsdp

        return float(fsdp.clip_grad_norm(module, max_norm if max_norm > 0 else float("inf")))

    def save_checkpoint(self, ckpt: Path, module, optimizer, scheduler, *, step: int, metrics_bytes: int) -> None:
        from selm import fsdp

        fsdp.save_sharded(ckpt, module, optimizer, {"step": step, "metrics_bytes": metrics_bytes,
                                                     "scheduler": scheduler.state_dict()})

    def load_checkpoint(self, ckpt: Path, module, optimizer, scheduler) -> tuple[int, int]:
        from selm import fsdp

        info = _checkpoint_state(ckpt)
        if info is None:
            return 0, 0
        fsdp.load_sharded(ckpt, module, optimizer)
        scheduler.load_state_dict(info["scheduler"])
        return int(info["step"]), int(info["metrics_bytes"])

    def save_model(self, module, tokenizer, dest: Path, tc: TrainConfig, adapter_dest: Path | None) -> None:
        from selm import fsdp

        state = fsdp.full_state_dict(module, prefix="model.")  # every process takes part; the main one gets it
        if self.is_main:
            write_model_folder(module.model, state, tokenizer, dest)
        dist.barrier()

    def release(self) -> None:
        release_device_memory(self.device)


def write_model_folder(model: torch.nn.Module, state: dict[str, torch.Tensor], tokenizer, dest: Path) -> None:
    """`model` with the gathered weights `state` and its tokenizer as one plain Hugging Face folder of
    safetensors at `dest` (the main process's part of an engine's save_model)."""
    with AtomicDir(dest) as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def _checkpoint_state(ckpt: Path) -> dict | None:
    """The checkpoint's state.json, read by the main process and sent to all (None: no checkpoint):
    on a shared file system another node's view could lag behind."""
    return on_main(lambda: json.loads((ckpt / STATE).read_text()) if (ckpt / STATE).is_file() else None)


def random_states() -> dict[str, torch.Tensor]:
    """Every process's random states, (processes, state bytes) each: the CPU's and, where there is
    one, the GPU's. Each process drew (LoRA dropout) on its own share of the data."""
    states = {"torch_rng": torch.stack(dist.all_gather(torch.get_rng_state()))}
    if torch.cuda.is_available():
        states["cuda_rng"] = torch.stack(dist.all_gather(torch.cuda.get_rng_state()))
    return states


def release_device_memory(device) -> None:
    """Collect unreachable objects, then return a GPU's cached blocks to the driver."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
