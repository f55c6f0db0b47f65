"""The training stage: one explicit loop of the SELM objective over preference pairs.

    for each optimizer step:                                             (run_train)
        for each forward pass of this process (gradient accumulation):  (train_step)
            logps  = policy log-probs of chosen, rejected, exploration   (one forward)
            losses = pairwise loss + exploration term                    (selm.objective.losses)
            backward(sum(losses) / examples in the whole step)           (4x2 == 1x8)
        clip, step, schedule

Reference log-probs are computed once, before the loop, and cached in the stage folder
(selm/training/reference.py), so no reference model is held in memory while training.

Runs as one process or under a multi-process launcher (torchrun, `accelerate launch` with
configs/accelerate/{ddp,zero3,fsdp2}.yaml): each process takes its share of every optimizer step's
examples, and every process runs as many forward passes as the busiest one (padded with zero-weight
passes; selm/training/plan.py), so the engines' collectives always match. The loss is normalised by
the step's GLOBAL example count per process, so averaged gradients match a single process. What
differs between engines lives in selm/training/engine.py.

With train.lora.r > 0 (one process or DDP) the same loop trains LoRA adapters only (selm/lora.py):
the model is wrapped before the optimizer is built, checkpoints hold the adapters and their
optimizer state, and the adapters are merged into the saved model folder at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from selm import dist, lora, signals
from selm.config import Config, TrainConfig, save_config
from selm.data import load_pairs
from selm.io import InputError, clean_stale_temporaries, mark_done
from selm.models import enable_checkpointing, load_causal_lm, load_tokenizer, return_freed_memory_to_os, set_threads
from selm.objective.logprobs import COLLATORS, TokenizedExample, autocast, batch_logps, tokenize_pairs
from selm.objective.losses import preference_objective
from selm.precision import describe as describe_precision
from selm.training import reference
from selm.training.engine import CHECKPOINT, Engine, create_engine, sharding_launch
from selm.training.metrics import (METRICS, PARTIAL, MetricsLog, StepStats, TrainingDiverged, accumulate,
                                   all_processes, find_nonfinite, finite, metrics_row, stop_if_nonfinite)
from selm.training.plan import (StepPlan, build_optimizer, build_scheduler, forward_passes, forward_tokens,
                                tokens_per_epoch)

__all__ = ["run_train", "train_step", "CHECKPOINT", "METRICS", "PARTIAL", "TrainingDiverged"]


@dataclass
class TrainData:
    """What every step reads: the tokenised pairs and their reference log-probs, kind -> (N,)."""

    examples: list[TokenizedExample]
    ref: dict[str, torch.Tensor]
    collate: Callable
    pad_id: int


def train_step(engine: Engine, module, optimizer, scheduler, data: TrainData, passes: list[list[int] | None], *,
               normaliser: float, filler: int, tc: TrainConfig) -> StepStats:
    """One optimizer step over this process's forward passes `passes` (example indices; None: a
    zero-weight pass of example `filler`, so that every process runs the same passes).

    Each pass's summed loss is divided by `normaliser`, the step's examples per process (all
    processes together / world), so accumulated, all-reduced gradients equal one big batch's mean.
    The update is made or skipped on every process alike: skipped when any process saw a NaN or an
    infinity (run_train then stops)."""
    device = engine.device
    sums: dict[str, float] = {}
    nonfinite: dict[str, list[int]] = {}
    tokens = examples = 0
    for j, idx in enumerate(passes):
        weight = 0.0 if idx is None else 1.0
        idx = [filler] if idx is None else idx
        batch = data.collate([data.examples[i] for i in idx], data.pad_id).to(device)
        with engine.forward_pass(module, last=j == len(passes) - 1):
            with autocast(device, engine.autocast_dtype):
                logps = batch_logps(module, batch)  # kind -> (B,)
            refs = {k: data.ref[k][idx].to(device) for k in logps}
            out = preference_objective(logps, refs, loss=tc.loss, explore=tc.explore, beta=tc.beta, alpha=tc.alpha)
            engine.backward(out["loss"].sum() * (weight / normaliser))
        if weight:
            tokens += batch.num_tokens
            examples += len(idx)
            accumulate(sums, out, logps, refs)
            find_nonfinite(nonfinite, out, idx)
    grad_norm = engine.clip_grad_norm(module, tc.max_grad_norm)
    step_lr = scheduler.get_last_lr()[0]  # the rate this step used
    diverged = not all(dist.all_gather(not nonfinite and finite(grad_norm)))
    if not diverged:  # never step on NaN/inf (DeepSpeed stepped in backward)
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(sums, examples, tokens, grad_norm, step_lr, nonfinite, diverged)


def _prepare(tc: TrainConfig, stage_dir: Path) -> None:
    """Process settings (threads, returning freed memory to the OS) and the stage folder, cleared of
    temporaries a killed run left; LoRA under a sharding launch is refused first."""
    if tc.lora.enabled and sharding_launch():
        # Refused before the process group exists, so every process just exits.
        raise InputError("train.lora.r: LoRA is not supported under ZeRO-3/FSDP yet; train it in one process or "
                         "with DDP (torchrun)")
    set_threads(tc.num_threads)
    if tc.release_memory:
        return_freed_memory_to_os()
    stage_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(stage_dir)


def _check_engine(engine: Engine, tc: TrainConfig, ref_model_path: Path | None) -> None:
    if ref_model_path is not None and engine.sharded:
        raise InputError("--ref-model / train.reference=initial: a separate reference model is not supported under "
                         "ZeRO-3/FSDP yet; train without it (the start model is the reference) or with DDP")


def _load_inputs(pairs_path: Path, model_path: Path, cfg: Config, device):
    """The tokenizer, the tokenised pairs, and the policy on `device`, set up for training."""
    tc = cfg.train
    pairs = load_pairs(pairs_path, need_exploration=tc.alpha > 0)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    examples = tokenize_pairs(tokenizer, pairs, max_length=tc.max_length, max_prompt_length=tc.max_prompt_length,
                              with_exploration=tc.alpha > 0)
    model = load_causal_lm(model_path, cfg.model.dtype, cfg.model.trust_remote_code, for_training=True)
    model.to(device)
    model.config.use_cache = False
    if tc.gradient_checkpointing:
        enable_checkpointing(model)
    if tc.lora.enabled:
        model = lora.wrap(model, tc.lora, checkpointing=tc.gradient_checkpointing)  # before the optimizer, which then holds the adapters only
    return tokenizer, examples, model


def _train_data(engine: Engine, module, examples: list[TokenizedExample], pad_id: int, cfg: Config, pairs_path: Path,
                model_path: Path, ref_model_path: Path | None, stage_dir: Path) -> TrainData:
    """The examples with their reference log-probs: computed once, before training (after wrapping:
    under ZeRO-3 only the engine can run a forward), by default the start model's own."""
    collate, tc = COLLATORS[cfg.train.layout], cfg.train
    key = reference.reference_key(Path(ref_model_path or model_path), pairs_path, cfg, engine.device)
    ref = reference.cached_reference(
        stage_dir / reference.REF_CACHE, key, examples, tc.ref_batch_size,
        lambda idx, nb: reference.reference_logps(module, ref_model_path, examples, cfg, collate=collate, pad_id=pad_id,
                                                  device=engine.device, autocast_dtype=engine.autocast_dtype,
                                                  indices=idx, num_batches=nb))
    return TrainData(examples, ref, collate, pad_id)


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
    ref_logps.safetensors, DONE.json} (and adapter/ with train.lora.keep_adapter). Resumes from stage_dir/checkpoint if present.
    `max_steps` stops early (for tests that simulate a crash)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    tc = cfg.train
    lr = learning_rate if learning_rate is not None else tc.learning_rate
    stage_dir = Path(stage_dir)
    _prepare(tc, stage_dir)
    engine = create_engine(tc)
    _check_engine(engine, tc, ref_model_path)
    if tc.bf16 == "auto" and engine.is_main:
        print(f"train: {describe_precision(tc.bf16, engine.device)}", file=sys.stderr, flush=True)
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)

    tokenizer, examples, model = _load_inputs(pairs_path, model_path, cfg, engine.device)
    plan = StepPlan.build(len(examples), tc, seed, engine.world)
    total_steps = len(plan.steps)
    module, optimizer = engine.prepare(model, lambda m: build_optimizer(m, tc, lr, engine.device, fused=not engine.sharded),
                                       segments=None if tc.segment_attention else False)
    # On the wrapped optimizer: ZeRO-3 regroups the parameters into its own flat partitions.
    scheduler = build_scheduler(optimizer, tc, total_steps)
    data = _train_data(engine, module, examples, tokenizer.pad_token_id, cfg, pairs_path, model_path, ref_model_path,
                       stage_dir)
    if engine.is_main:
        save_config(cfg, stage_dir / "config.yaml")
    start_step, metrics_bytes = engine.load_checkpoint(stage_dir / CHECKPOINT, module, optimizer, scheduler)
    log = MetricsLog(stage_dir, cfg, engine.is_main, start_step)
    log.truncate(metrics_bytes)

    module.train()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train (alpha={tc.alpha:g})", disable=not engine.is_main)
    end = total_steps if max_steps is None else min(max_steps, total_steps)
    budget = forward_tokens(tc.max_forward_tokens, engine.device, engine.sharded)
    try:
        with signals.deferred():  # SIGTERM/Ctrl-C now stop after the current optimizer step (selm/signals.py)
            for step in range(start_step, end):
                t0 = time.perf_counter()
                step_examples = plan.steps[step]
                passes = forward_passes(step_examples, examples, rank=engine.rank, world=engine.world,
                                        batch_size=tc.batch_size, budget=budget, layout=tc.layout)
                stats = train_step(engine, module, optimizer, scheduler, data, passes, filler=step_examples[0],
                                   normaliser=len(step_examples) / engine.world, tc=tc)
                bar.update(1)
                done = step + 1
                if done % tc.logging_steps == 0 or done == total_steps or stats.diverged:
                    stats = all_processes(stats)
                    row = metrics_row(stats, step=done, total_steps=total_steps, epochs=tc.epochs,
                                      seconds=time.perf_counter() - t0, pairs=len(step_examples))
                    log.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.3g}")
                stop_if_nonfinite(stats, step=done, total_steps=total_steps, stage_dir=stage_dir,
                                  checkpoint=stage_dir / CHECKPOINT, pairs_path=pairs_path)
                stop = _stop_requested(engine.world)
                if tc.save_every_steps and (done % tc.save_every_steps == 0 or stop) and done < total_steps:
                    engine.save_checkpoint(stage_dir / CHECKPOINT, module, optimizer, scheduler, step=done,
                                           metrics_bytes=log.size())
                if stop and done < total_steps:
                    raise signals.Interrupted(stop)  # the checkpoint is saved; a resume purges later events
            stop = _stop_requested(engine.world)  # a signal during the last step: the stage is finished first
    finally:
        bar.close()
        log.close()
    if end < total_steps:
        return {"stopped_at": max_steps}

    summary = _summary(model, tc, total_steps, len(examples), lr, t_start) | {"bf16": engine.bf16} | engine.summary()
    summary["tokens"] = tokens_per_epoch(examples, tc.layout) * tc.epochs  # what the report's cost table reads
    engine.save_model(module, tokenizer, stage_dir / "model", tc,
                      stage_dir / "adapter" if tc.lora.keep_adapter else None)
    if engine.is_main:
        os.replace(stage_dir / PARTIAL, stage_dir / METRICS)
        shutil.rmtree(stage_dir / CHECKPOINT, ignore_errors=True)
        mark_done(stage_dir, summary)  # last: everything above is in place
    dist.barrier()
    del module, optimizer, scheduler, model, data
    engine.release()
    if stop:
        raise signals.Interrupted(stop)
    return summary


def _stop_requested(world: int) -> int | None:
    """The signal noted on any process during this step, the same answer on every process: all of
    them save the checkpoint and stop after the same step. (A launcher such as torchrun passes a
    SIGTERM on to every rank, not necessarily during the same step; a rank that stopped alone would
    leave the others waiting in a collective.) One small all-gather per step."""
    stop = signals.pending()
    if world > 1:
        stop = max(s or 0 for s in dist.all_gather(stop)) or None
    return stop


def _summary(model, tc: TrainConfig, total_steps: int, pairs: int, lr: float, t_start: float) -> dict:
    """What DONE.json records about the training."""
    trainable = sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3: the whole size, not this rank's part
                    for p in model.parameters() if p.requires_grad)
    return {"steps": total_steps, "pairs": pairs, "learning_rate": lr, "alpha": tc.alpha, "beta": tc.beta,
            "trainable_parameters": trainable, "seconds": time.perf_counter() - t_start}
