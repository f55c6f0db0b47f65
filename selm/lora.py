"""LoRA adapters around the training stage's model (train.lora, through peft).

The training loop is the same with or without them: `wrap` freezes the model and adds adapters
before the optimizer is built, so only the adapters are trained; `save_merged` folds them into the
weights at the end, so every iteration still writes a plain safetensors model folder (read by the
next iteration, evaluation and vLLM as before).

peft initialises every adapter's B matrix to zero, so the wrapped model computes exactly what the
model did before wrapping: the reference log-probs, scored before the first update, are the
model's own.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from selm.config import ConfigError, LoraConfig
from selm.io import AtomicDir, InputError


def _peft():
    try:
        import peft
    except ImportError:
        raise InputError("train.lora.r: LoRA needs peft; install it with: pip install 'selm[lora]'") from None
    return peft


def wrap(model: torch.nn.Module, lc: LoraConfig, *, checkpointing: bool = False) -> torch.nn.Module:
    """`model` with LoRA adapters of rank lc.r on lc.target_modules, everything else frozen.
    `checkpointing`: activation checkpointing is on in `model`."""
    peft = _peft()
    config = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                             bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            # PEFT reads transformers' deprecated alias is_gradient_checkpointing (a FutureWarning
            # about PEFT's code, nothing the user can act on).
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. no module matches target_modules
        raise ConfigError(f"train.lora.target_modules: {e}") from None
    if checkpointing:
        # transformers 4.x checkpoints with use_reentrant=True: with frozen embeddings nothing that
        # enters a checkpointed block needs a gradient, so the adapters inside it would get none.
        # Marking the embedding output as needing one fixes that (5.x is non-reentrant; harmless).
        model.enable_input_require_grads()
    return wrapped


def is_wrapped(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("peft.")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters training changes (all of them without LoRA, the adapters with it): what a
    resume checkpoint must hold besides the optimizer."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` (from trainable_state) into `model`; it must hold exactly the trainable parameters."""
    want = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != want:
        raise InputError(f"{source}: does not match the model being trained (was train.lora changed?); "
                         "delete the checkpoint folder to start this stage over")
    model.load_state_dict(state, strict=False)


def save_merged(model: torch.nn.Module, tokenizer, dest: Path, adapter_dest: Path | None) -> None:
    """Write the adapters (to `adapter_dest`, if given: a peft folder) and then the model with the
    adapters merged into its weights (to `dest`: a plain Hugging Face safetensors folder)."""
    if adapter_dest is not None:
        with AtomicDir(adapter_dest) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
    merged = model.merge_and_unload()
    with AtomicDir(dest) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
