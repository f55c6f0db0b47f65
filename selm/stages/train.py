"""The training stage: one explicit loop of the SELM objective over preference pairs.

    for each optimizer step:
        for each micro-batch (gradient accumulation):
            logps  = policy log-probs of chosen, rejected, exploration   (one forward)
            losses = pairwise loss + exploration term                    (selm.objective.losses)
            backward(sum(losses) / examples in the whole step)           (4x2 == 1x8)
        clip, step, schedule

Reference log-probs are computed once, before the loop, in no-grad batches and cached in the stage
folder, so no reference model is held in memory while training. By default the reference is the
start model itself (SELM: the reference is the previous iteration's model), so its log-probs come
from the very model about to be trained, before its first update.

Runs as one process or under `accelerate launch` (data-parallel): each process takes its share of
every optimizer step's examples; the loss is normalised by the step's GLOBAL example count per
process, so averaged gradients match a single process.

Simplifications: checkpoints for resume are written by the main process from a full state dict
(fine for DDP; FSDP/DeepSpeed ZeRO-3 need sharded saving, not done yet).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from selm.config import Config, TrainConfig, save_config
from selm.data import load_pairs
from selm.io import (AtomicDir, InputError, atomic_write_bytes, atomic_write_json, clean_stale_temporaries, mark_done,
                     sha256_file, sha256_json)
from selm.objective.logprobs import COLLATORS, KINDS, ResponseLogps, batch_logps, tokenize_pairs
from selm.objective.losses import preference_objective
from selm.models import enable_checkpointing, load_causal_lm, load_tokenizer, return_freed_memory_to_os, set_threads

METRICS = "metrics.jsonl"
REF_CACHE = "ref_logps.safetensors"


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup from 0, then cosine/linear decay to 0 or constant (as TRL/transformers)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass
class StepPlan:
    """Which examples each optimizer step uses, fixed by (seed, epoch) so a resumed run sees the
    same batches. steps[s] is the list of example indices of step s (all processes together)."""

    steps: list[list[int]]

    @classmethod
    def build(cls, n: int, cfg: TrainConfig, seed: int, world: int) -> "StepPlan":
        per_step = cfg.batch_size * cfg.grad_accum * world
        steps = []
        for epoch in range(cfg.epochs):
            g = torch.Generator().manual_seed(seed * 1000 + epoch)
            order = torch.randperm(n, generator=g).tolist()
            steps += [order[i:i + per_step] for i in range(0, n, per_step)]
        return cls(steps)


def micro_batches(step_examples: list[int], rank: int, world: int, batch_size: int) -> list[list[int]]:
    mine = step_examples[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def _model_fingerprint(path: Path) -> dict:
    # Path, size and mtime of every weight/config file: cheap on 70B folders, changes when they do.
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files} | {"path": str(path.resolve())}


def reference_logps(module: ResponseLogps, examples, cfg: TrainConfig, collate, pad_id: int, device, autocast) -> dict[str, torch.Tensor]:
    """No-grad log-probs of every example under `module` (the reference), in big batches, sorted by
    length so that little padding is computed. Returns kind -> (N,) float32 tensors."""
    from tqdm.auto import tqdm

    n, kinds = len(examples), len(examples[0].responses)
    order = sorted(range(n), key=lambda i: len(examples[i].prompt) + sum(map(len, examples[i].responses)))
    out = {KINDS[k]: torch.zeros(n) for k in range(kinds)}
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for start in tqdm(range(0, n, cfg.ref_batch_size), desc="reference log-probs", leave=False):
            idx = order[start:start + cfg.ref_batch_size]
            batch = collate([examples[i] for i in idx], pad_id).to(device)
            with autocast():
                lp = batch_logps(module, batch)
            for k, v in lp.items():
                out[k][idx] = v.float().cpu()
    module.train(was_training)
    return out


def _save_hf(model, tokenizer, dest: Path) -> None:
    with AtomicDir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def _save_checkpoint(ckpt: Path, model, optimizer, scheduler, step: int, metrics_bytes: int) -> None:
    from safetensors.torch import save_model

    with AtomicDir(ckpt) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
        atomic_write_json(tmp / "state.json", {"step": step, "metrics_bytes": metrics_bytes})


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> tuple[int, int]:
    from safetensors.torch import load_model

    load_model(model, str(ckpt / "model.safetensors"))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # never unpickle arbitrary objects
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    info = json.loads((ckpt / "state.json").read_text())
    return int(info["step"]), int(info["metrics_bytes"])


def run_train(
    cfg: Config,
    pairs_path: Path,
    model_path: Path,
    stage_dir: Path,
    *,
    ref_model_path: Path | None = None,
    learning_rate: float | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
) -> dict:
    """Train one epoch set of cfg.train on `pairs_path`, starting from (and, unless `ref_model_path`
    is given, referenced to) `model_path`. Writes stage_dir/{model/, metrics.jsonl, tb/, config.yaml,
    ref_logps.safetensors, DONE.json}. Resumes from stage_dir/checkpoint if present.
    `max_steps` stops early (for tests that simulate a crash)."""
    from accelerate import Accelerator
    from safetensors.torch import load_file, save
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    tc = cfg.train
    lr = learning_rate if learning_rate is not None else tc.learning_rate
    set_threads(tc.num_threads)
    if tc.release_memory:
        return_freed_memory_to_os()
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(stage_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)

    with_explore = tc.alpha > 0
    pairs = load_pairs(pairs_path, need_exploration=with_explore)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    examples = tokenize_pairs(tokenizer, pairs, max_length=tc.max_length, max_prompt_length=tc.max_prompt_length,
                              with_exploration=with_explore)
    collate = COLLATORS[tc.layout]
    pad_id = tokenizer.pad_token_id
    use_bf16 = tc.bf16

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    model = load_causal_lm(model_path, cfg.model.dtype, cfg.model.trust_remote_code)
    model.to(device)
    model.config.use_cache = False
    if tc.gradient_checkpointing:
        enable_checkpointing(model)
    module = ResponseLogps(model)

    # --- reference log-probs: once, before training, cached by everything they depend on ---------
    ref_path = Path(ref_model_path or model_path)
    key = sha256_json({
        "ref": _model_fingerprint(ref_path), "data": sha256_file(pairs_path) if Path(pairs_path).is_file() else str(pairs_path),
        "max_length": tc.max_length, "max_prompt_length": tc.max_prompt_length, "explore": with_explore,
        "layout": tc.layout, "bf16": use_bf16, "dtype": cfg.model.dtype,
    })
    cache = stage_dir / REF_CACHE
    ref = None
    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                ref = load_file(str(cache))
    if ref is None:
        if accelerator.is_main_process:
            if ref_model_path is None:
                ref = reference_logps(module, examples, tc, collate, pad_id, device, autocast)
            else:
                ref_model = load_causal_lm(ref_path, cfg.model.dtype, cfg.model.trust_remote_code).to(device)
                ref = reference_logps(ResponseLogps(ref_model), examples, tc, collate, pad_id, device, autocast)
                del ref_model  # never held during training
            atomic_write_bytes(cache, save({k: v.contiguous() for k, v in ref.items()}, metadata={"key": key}))
        accelerator.wait_for_everyone()
        ref = load_file(str(cache))

    # --- optimizer, schedule, step plan ------------------------------------------------------------
    plan = StepPlan.build(len(examples), tc, seed, world)
    total_steps = len(plan.steps)
    warmup = int(math.ceil(tc.warmup_ratio * total_steps))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(tc.adam_beta1, tc.adam_beta2),
        # One fused kernel instead of a per-parameter loop, which the training profile showed as a
        # visible share of a CPU step (notes/train_benchmark.md, "Profile of selm's step").
        fused=device.type in ("cpu", "cuda"),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.lr_scheduler, warmup, total_steps))
    module, optimizer = accelerator.prepare(module, optimizer)
    raw_model = accelerator.unwrap_model(module).model

    save_config(cfg, stage_dir / "config.yaml")
    ckpt = stage_dir / "checkpoint"
    partial = stage_dir / (METRICS + ".partial")
    start_step, metrics_bytes = 0, 0
    if ckpt.is_dir() and (ckpt / "state.json").is_file():
        start_step, metrics_bytes = _load_checkpoint(ckpt, raw_model, optimizer, scheduler)
    if accelerator.is_main_process:
        # Drop metric lines written after the checkpoint we resume from (they will be redone).
        with open(partial, "a+b") as f:
            f.truncate(metrics_bytes)
    tb = _tensorboard(stage_dir, tc, accelerator.is_main_process, start_step)

    module.train()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train (alpha={tc.alpha:g})", disable=not accelerator.is_local_main_process)
    step = start_step
    for step in range(start_step, total_steps):
        if max_steps is not None and step >= max_steps:
            break
        t0 = time.perf_counter()
        step_examples = plan.steps[step]
        per_process = len(step_examples) / world  # normaliser: sum of losses / examples in the step
        micros = micro_batches(step_examples, rank, world, tc.batch_size)
        sums: dict[str, float] = {}
        tokens = 0
        for j, idx in enumerate(micros):
            batch = collate([examples[i] for i in idx], pad_id).to(device)
            tokens += batch.num_tokens
            sync = accelerator.no_sync(module) if j < len(micros) - 1 else nullcontext()
            with sync:
                with autocast():
                    logps = batch_logps(module, batch)
                refs = {k: ref[k][idx].to(device) for k in logps}
                out = preference_objective(logps, refs, loss=tc.loss, explore=tc.explore, beta=tc.beta, alpha=tc.alpha)
                accelerator.backward(out["loss"].sum() / per_process)
            _accumulate(sums, out, logps, refs)
        grad_norm = accelerator.clip_grad_norm_(module.parameters(), tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
        step_lr = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if accelerator.is_main_process and ((step + 1) % tc.logging_steps == 0 or step + 1 == total_steps):
            n = sum(len(m) for m in micros)
            row = {k: v / n for k, v in sums.items()}
            row.update({"step": step + 1, "epoch": (step + 1) / total_steps * tc.epochs, "lr": step_lr,
                        "grad_norm": float(grad_norm), "tokens_per_s": tokens * world / (time.perf_counter() - t0),
                        "pairs": len(step_examples)})
            with open(partial, "ab") as f:
                f.write((json.dumps(row) + "\n").encode())
            if tb is not None:
                for k, v in row.items():
                    if k != "step":
                        tb.add_scalar(k, v, step + 1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.3g}")
        if tc.save_every_steps and (step + 1) % tc.save_every_steps == 0 and step + 1 < total_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _save_checkpoint(ckpt, raw_model, optimizer, scheduler, step + 1, partial.stat().st_size)
    bar.close()
    if tb is not None:
        tb.close()
    if max_steps is not None and step + 1 < total_steps:
        return {"stopped_at": max_steps}

    accelerator.wait_for_everyone()
    summary = {"steps": total_steps, "pairs": len(examples), "learning_rate": lr, "alpha": tc.alpha, "beta": tc.beta,
               "seconds": time.perf_counter() - t_start}
    if accelerator.is_main_process:
        _save_hf(raw_model, tokenizer, stage_dir / "model")
        os.replace(partial, stage_dir / METRICS)
        shutil.rmtree(ckpt, ignore_errors=True)
        mark_done(stage_dir, summary)  # last: everything above is in place
    accelerator.wait_for_everyone()
    return summary


def _accumulate(sums: dict[str, float], out: dict, logps: dict, refs: dict) -> None:
    """Sum per-example metrics (TRL's names) over a step; divided by the step's examples when logged."""
    rc, rr = out["rewards_chosen"], out["rewards_rejected"]
    vals = {
        "loss": out["loss"], "loss/dpo": out["loss_pair"], "loss/explore": out["loss_explore"],
        "rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
        "rewards/accuracies": (rc > rr).float(), "logps/chosen": logps["chosen"], "logps/rejected": logps["rejected"],
    }
    if "explore" in logps:
        vals["logps/explore"] = logps["explore"]
        vals["logps/ref_explore"] = refs["explore"]
    for k, v in vals.items():
        sums[k] = sums.get(k, 0.0) + float(v.detach().float().sum())


def _tensorboard(stage_dir: Path, tc: TrainConfig, main: bool, start_step: int):
    if not (tc.tensorboard and main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    tb_dir = stage_dir / "tb"
    if start_step == 0:
        shutil.rmtree(tb_dir, ignore_errors=True)
    return SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step else None)
