"""The training stage: one explicit loop of the SELM objective over preference pairs.

    for each optimizer step:                                             (run_train)
        for each micro-batch (gradient accumulation):                    (train_step)
            logps  = policy log-probs of chosen, rejected, exploration   (one forward)
            losses = pairwise loss + exploration term                    (selm.objective.losses)
            backward(sum(losses) / examples in the whole step)           (4x2 == 1x8)
        clip, step, schedule

Reference log-probs are computed once, before the loop, in no-grad batches (score_logps in
selm/objective/logprobs.py) and cached in the stage folder, so no reference model is held in memory
while training. By default the reference is the start model itself (SELM: the reference is the
previous iteration's model), so its log-probs come from the very model about to be trained, before
its first update.

Runs as one process or under a multi-process launcher (torchrun, `accelerate launch` with
configs/accelerate/{ddp,zero3,fsdp2}.yaml): each process takes its share of every optimizer step's
examples; the loss is normalised by the step's GLOBAL example count per process, so averaged
gradients match a single process. The engines differ only in how accelerate wraps the model and in
what is saved: every engine writes one consolidated safetensors folder at the end; resume state is
a full-state checkpoint (one process, DDP) or the engine's own shards (ZeRO-3, FSDP).

With train.lora.r > 0 (one process or DDP) the same loop trains LoRA adapters only (selm/lora.py):
the model is wrapped before the optimizer is built, checkpoints hold the adapters and their
optimizer state, and the adapters are merged into the saved model folder at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from selm import dist, lora, signals
from selm.config import Config, TrainConfig, save_config
from selm.data import load_pairs
from selm.io import (AtomicDir, InputError, atomic_write_bytes, atomic_write_json, clean_stale_temporaries, mark_done,
                     sha256_file, sha256_json)
from selm.objective.logprobs import (COLLATORS, ResponseLogps, TokenizedExample, autocast, batch_logps, score_logps,
                                     tokenize_pairs)
from selm.objective.losses import preference_objective
from selm.models import enable_checkpointing, load_causal_lm, load_tokenizer, return_freed_memory_to_os, set_threads
from selm.precision import describe as describe_precision, use_bf16

METRICS = "metrics.jsonl"
PARTIAL = METRICS + ".partial"  # metrics.jsonl while training runs; renamed when the stage is done
CHECKPOINT = "checkpoint"
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
    """This process's share of one step's example indices (every world-th, from `rank`), cut into
    micro-batches of `batch_size`."""
    mine = step_examples[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def autocast_dtype(tc: TrainConfig, device) -> torch.dtype | None:
    """The precision training's forwards on `device` autocast to (None: the weights' own). Anything
    scoring log-probs to compare with training's uses it too."""
    return torch.bfloat16 if use_bf16(tc.bf16, device) else None


def _model_fingerprint(path: Path) -> dict:
    # Path, size and mtime of every weight/config file: cheap on 70B folders, changes when they do.
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files} | {"path": str(path.resolve())}


def _reference_key(ref_path: Path, pairs_path: Path, cfg: Config, device) -> str:
    """Hash of everything the reference log-probs depend on: the reference model's files, the data,
    tokenisation, which responses are scored, layout and precision."""
    tc = cfg.train
    return sha256_json({
        "ref": _model_fingerprint(ref_path), "data": sha256_file(pairs_path) if Path(pairs_path).is_file() else str(pairs_path),
        "max_length": tc.max_length, "max_prompt_length": tc.max_prompt_length, "explore": tc.alpha > 0,
        "layout": tc.layout, "bf16": use_bf16(tc.bf16, device), "dtype": cfg.model.dtype,
    })


def reference_logps(module: ResponseLogps, ref_model_path: Path | None, examples: list[TokenizedExample], cfg: Config,
                    *, collate, pad_id: int, device, indices: list[int] | None = None,
                    num_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Reference log-probs of examples[i] for i in `indices` (default: all), kind -> (n,) float32 CPU:
    of `module` itself (the start model, before its first update) or, when `ref_model_path` is
    given, of that model, loaded for this only so it is never held during training."""
    if ref_model_path is not None:
        ref_model = load_causal_lm(Path(ref_model_path), cfg.model.dtype, cfg.model.trust_remote_code).to(device)
        module = ResponseLogps(ref_model, segments=None if cfg.train.segment_attention else False)
    return score_logps(module, examples, batch_size=cfg.train.ref_batch_size, collate=collate, pad_id=pad_id,
                       device=device, autocast_dtype=autocast_dtype(cfg.train, device), indices=indices,
                       num_batches=num_batches, progress="reference log-probs" if dist.is_main() else None)


def _reference_cache(cache: Path, key: str, examples: list[TokenizedExample], batch_size: int,
                     score: Callable[[list[int], int], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The reference log-probs, kind -> (N,) float32, from `cache` when it was written under `key`.

    Otherwise the examples are sorted by length and cut into batches of `batch_size`, each process
    scores every world-th batch (`score(indices, num_batches)`; the same batches one process would
    run, and the same number of forwards on every process, as ZeRO-3 needs), the main process puts
    the pieces together and writes the cache, and every process then reads the file, so all of them
    hold the same numbers."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    if cache.is_file():
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(str(cache))
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
    dist.barrier()
    return load_file(str(cache))


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, lr: float, device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norms, as TRL/transformers)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(tc.adam_beta1, tc.adam_beta2),
        # One fused kernel instead of a per-parameter loop, which the training profile showed as a
        # visible share of a CPU step (notes/train_benchmark.md, "Profile of selm's step").
        fused=torch.device(device).type in ("cpu", "cuda"),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, total_steps: int):
    """The learning-rate schedule of cfg.train over `total_steps` optimizer steps."""
    warmup = int(math.ceil(tc.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.lr_scheduler, warmup, total_steps))


def _save_hf(accelerator, module, tokenizer, dest: Path) -> None:
    """Every process takes part (ZeRO-3 gathers the 16-bit weights, FSDP the full state dict); the
    main process writes one plain Hugging Face folder of safetensors, loadable by the next iteration,
    by vLLM and by `from_pretrained`."""
    state = accelerator.get_state_dict(module)  # keys of ResponseLogps: "model." + the LM's own
    if accelerator.is_main_process:
        state = {k.removeprefix("model."): v for k, v in state.items()}
        with AtomicDir(dest) as tmp:
            accelerator.unwrap_model(module).model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()


def _sharded(accelerator) -> bool:
    """Whether the engine shards parameters and optimizer states (ZeRO-3, FSDP): then resume state is
    saved by the engine's own checkpointing, one shard per process."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def _save_checkpoint(accelerator, ckpt: Path, module, optimizer, scheduler, step: int, metrics_bytes: int) -> None:
    """Resume state at optimizer step `step`, built under a temporary name and renamed into place.

    One process or DDP: the main process writes model.safetensors (the trainable parameters: every
    weight, or the LoRA adapters) and trainer_state.pt (optimizer state and every process's random
    state, read back with weights_only=True). ZeRO-3 / FSDP: every process writes its shards with the
    engine's own checkpointing (accelerator.save_state) into the same folder."""
    from safetensors.torch import save_file

    folder = AtomicDir(ckpt)
    tmp = Path(dist.broadcast(str(folder.__enter__()) if accelerator.is_main_process else None))
    if _sharded(accelerator):
        accelerator.save_state(str(tmp))
    else:
        # Every process's own random state: each drew (LoRA dropout) on its own share of the data.
        rng = torch.stack(dist.all_gather(torch.get_rng_state()))
        if accelerator.is_main_process:
            save_file(lora.trainable_state(accelerator.unwrap_model(module).model), str(tmp / "model.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "torch_rng": rng}, tmp / "trainer_state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "state.json", {"step": step, "metrics_bytes": metrics_bytes,
                                               "scheduler": scheduler.state_dict()})
        folder.__exit__(None, None, None)
    accelerator.wait_for_everyone()


def _resume(accelerator, stage_dir: Path, module, optimizer, scheduler) -> int:
    """Load stage_dir/checkpoint into model, optimizer, schedule and RNG if there is one; return the
    step to start from (0 without one)."""
    from safetensors.torch import load_file

    ckpt, start_step, metrics_bytes = stage_dir / CHECKPOINT, 0, 0
    if ckpt.is_dir() and (ckpt / "state.json").is_file():
        info = json.loads((ckpt / "state.json").read_text())
        if _sharded(accelerator):
            accelerator.load_state(str(ckpt))
        else:
            lora.load_trainable_state(accelerator.unwrap_model(module).model, load_file(str(ckpt / "model.safetensors")),
                                      ckpt / "model.safetensors")
            state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # never unpickle arbitrary objects
            optimizer.load_state_dict(state["optimizer"])
            rng = state["torch_rng"]  # (processes, state bytes)
            # A copy: set_rng_state reads a row view (storage offset > 0) wrongly and crashes.
            torch.set_rng_state(rng[accelerator.process_index].clone())
        scheduler.load_state_dict(info["scheduler"])
        start_step, metrics_bytes = int(info["step"]), int(info["metrics_bytes"])
    if accelerator.is_main_process:
        # Drop metric lines written after the checkpoint we resume from (they will be redone).
        with open(stage_dir / PARTIAL, "a+b") as f:
            f.truncate(metrics_bytes)
    return start_step


@dataclass
class TrainData:
    """What every step reads: the tokenised pairs and their reference log-probs, kind -> (N,)."""

    examples: list[TokenizedExample]
    ref: dict[str, torch.Tensor]
    collate: Callable
    pad_id: int


@dataclass
class StepStats:
    """One optimizer step on this process: per-example metric sums over its `examples` examples, the
    real tokens it ran, the gradient norm before clipping (all processes) and the rate it used."""

    sums: dict[str, float]
    examples: int
    tokens: int
    grad_norm: torch.Tensor
    lr: float
    nonfinite: dict[str, list[int]] = field(default_factory=dict)
    """Loss term ("dpo", "explore") -> this process's example indices where it was NaN or infinite."""


AUTO_FORWARD_TOKENS_CPU = 1024
"""train.max_forward_tokens "auto" on a CPU. Measured against one pass per micro-batch (BENCHMARKS.md,
Memory): 1.08x the pairs/s at the demo's and at 256/384 lengths (a smaller working set), with the
demo's peak memory 4.5 instead of 7.3 GB; 512 halved the memory but cost 8 % at two threads."""


def forward_tokens(setting: int | str | None, device, sharded: bool) -> int | None:
    """The token budget of one forward pass for train.max_forward_tokens (None: no split)."""
    if setting != "auto":
        return setting  # type: ignore[return-value]
    return AUTO_FORWARD_TOKENS_CPU if torch.device(device).type == "cpu" and not sharded else None


def split_by_tokens(micros: list[list[int]], examples: list[TokenizedExample], budget: int | None, layout: str
                    ) -> list[list[int]]:
    """Each micro-batch cut, in order, into runs whose collated size (rows x longest row) stays within
    `budget` tokens; a run has at least one example. None: unchanged."""
    if budget is None:
        return micros
    out = []
    for idx in micros:
        run: list[int] = []
        longest = 0
        for i in idx:
            e = examples[i]
            k = len(e.responses)
            rows, length = (1, len(e.prompt) + sum(map(len, e.responses))) if layout == "prefix" else (
                k, len(e.prompt) + max(map(len, e.responses)))
            if run and (len(run) + 1) * rows * max(longest, length) > budget:
                out.append(run)
                run, longest = [], 0
            run.append(i)
            longest = max(longest, length)
        out.append(run)
    return out


def train_step(accelerator, module, optimizer, scheduler, data: TrainData, micros: list[list[int]], *,
               normaliser: float, tc: TrainConfig) -> StepStats:
    """One optimizer step over this process's micro-batches `micros` (example indices).

    Each micro-batch's summed loss is divided by `normaliser`, the step's examples per process (all
    processes together / world), so accumulated, all-reduced gradients equal one big batch's mean.
    """
    device = accelerator.device
    sums: dict[str, float] = {}
    nonfinite: dict[str, list[int]] = {}
    tokens = 0
    for j, idx in enumerate(micros):
        batch = data.collate([data.examples[i] for i in idx], data.pad_id).to(device)
        tokens += batch.num_tokens
        # Gradients are all-reduced once per step, after the last micro-batch: one all-reduce per
        # step instead of one per micro-batch. DeepSpeed reads the same fact from sync_gradients (its
        # engine steps at that boundary; its own accumulation count stays 1).
        last = j == len(micros) - 1
        accelerator.sync_gradients = last
        with accelerator.no_sync(module) if not last else nullcontext():
            with autocast(device, autocast_dtype(tc, device)):
                logps = batch_logps(module, batch)  # kind -> (B,)
            refs = {k: data.ref[k][idx].to(device) for k in logps}
            out = preference_objective(logps, refs, loss=tc.loss, explore=tc.explore, beta=tc.beta, alpha=tc.alpha)
            accelerator.backward(out["loss"].sum() / normaliser)
        _accumulate(sums, out, logps, refs)
        _find_nonfinite(nonfinite, out, idx)
    grad_norm = accelerator.clip_grad_norm_(module.parameters(), tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
    step_lr = scheduler.get_last_lr()[0]  # the rate this step used
    if not nonfinite and _finite(grad_norm):  # never step on NaN/inf (run_train stops; DeepSpeed stepped in backward)
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(sums, sum(len(m) for m in micros), tokens, grad_norm, step_lr, nonfinite)


def _finite(grad_norm) -> bool:
    # DeepSpeed reports no norm before its first step.
    return grad_norm is None or math.isfinite(float(grad_norm))


def _find_nonfinite(found: dict[str, list[int]], out: dict, idx: list[int]) -> None:
    """Add the example indices of micro-batch `idx` whose "dpo" or "explore" loss is NaN or infinite."""
    for term, key in (("dpo", "loss_pair"), ("explore", "loss_explore")):
        bad = (~torch.isfinite(out[key].detach())).flatten().nonzero().flatten().tolist()
        if bad:
            found.setdefault(term, []).extend(idx[i] for i in bad)


class TrainingDiverged(InputError):
    """A loss term or the gradient norm went NaN or infinite: training stops (an input problem: the
    settings or the data); nothing is saved as done."""


def stop_if_nonfinite(stats: StepStats, *, step: int, total_steps: int, stage_dir: Path, pairs_path: Path) -> None:
    """Raise TrainingDiverged naming the step, the loss term and the pairs when the step was not finite.

    The checkpoint is removed: its weights lie on the diverging path and its schedule carries the old
    learning rate, so the re-run (after fixing the settings) redoes the stage from its first step."""
    if not stats.nonfinite and _finite(stats.grad_norm):
        return
    grad_norm = float(stats.grad_norm) if stats.grad_norm is not None else None
    if dist.is_main():
        shutil.rmtree(stage_dir / CHECKPOINT, ignore_errors=True)
    if stats.nonfinite:
        ids = [p.prompt_id for p in load_pairs(pairs_path, need_exploration=False)]
        what = "; ".join(
            f"loss/{term} of pairs {rows[:5]}{' ...' if len(rows) > 5 else ''} (0-based rows of {pairs_path}; "
            f"prompt_ids {', '.join(repr(ids[i]) for i in rows[:5])})"
            for term, rows in sorted(stats.nonfinite.items()))
    else:
        what = "the gradient norm (every loss term was finite)"
    raise TrainingDiverged(
        f"{stage_dir}: training stopped at optimizer step {step} of {total_steps}: NaN or infinity in {what}; "
        f"grad_norm={grad_norm}; the step's metrics are in {stage_dir / PARTIAL}. Nothing was saved; lower "
        "train.learning_rate or train.beta (or fix those pairs) and re-run: the stage starts over")


def all_processes(stats: StepStats) -> StepStats:
    """The step's statistics over every process (metric sums, examples and tokens added up), so the
    logged means are those of the whole step, as one process would log them."""
    if dist.world_size() == 1:
        return stats
    parts = dist.all_gather((stats.sums, stats.examples, stats.tokens, stats.nonfinite))
    sums = {k: sum(p[0][k] for p in parts) for k in stats.sums}
    nonfinite: dict[str, list[int]] = {}
    for p in parts:
        for term, rows in p[3].items():
            nonfinite.setdefault(term, []).extend(rows)
    return StepStats(sums, sum(p[1] for p in parts), sum(p[2] for p in parts), stats.grad_norm, stats.lr,
                     {t: sorted(r) for t, r in nonfinite.items()})


def metrics_row(stats: StepStats, *, step: int, total_steps: int, epochs: int, seconds: float, pairs: int) -> dict:
    """One metrics.jsonl line for optimizer step `step` (1-based) from the step's statistics over all
    processes: per-example means and the step's rate, gradient norm and throughput."""
    row = {k: v / stats.examples for k, v in stats.sums.items()}
    row.update({"step": step, "total_steps": total_steps, "epoch": step / total_steps * epochs, "lr": stats.lr,
                "grad_norm": float(stats.grad_norm),
                "tokens_per_s": stats.tokens / seconds, "pairs": pairs})
    return row


def _log_row(stage_dir: Path, loggers: list, row: dict) -> None:
    """Append `row` to the metrics file being written and send it to the train.report_to loggers."""
    with open(stage_dir / PARTIAL, "ab") as f:
        f.write((json.dumps(row) + "\n").encode())
    scalars = {k: v for k, v in row.items() if k not in ("step", "total_steps")}
    for log in loggers:
        log.log(scalars, row["step"])


def _finish(accelerator, module, tokenizer, stage_dir: Path, summary: dict, tc: TrainConfig) -> None:
    """The model folder (every process takes part in gathering it; LoRA: the main process merges the
    adapters into it, after writing adapter/ if asked), then the main process moves metrics.jsonl
    into place, drops the checkpoint, and writes DONE.json last, so a folder with DONE.json is
    complete; every process waits for that."""
    if tc.lora.enabled:
        if accelerator.is_main_process:
            lora.save_merged(accelerator.unwrap_model(module).model, tokenizer, stage_dir / "model",
                             stage_dir / "adapter" if tc.lora.keep_adapter else None)
        accelerator.wait_for_everyone()
    else:
        _save_hf(accelerator, module, tokenizer, stage_dir / "model")
    if accelerator.is_main_process:
        os.replace(stage_dir / PARTIAL, stage_dir / METRICS)
        shutil.rmtree(stage_dir / CHECKPOINT, ignore_errors=True)
        mark_done(stage_dir, summary)  # last: everything above is in place
    accelerator.wait_for_everyone()


def _sharding_launch() -> bool:
    """Whether the launcher asks for DeepSpeed or FSDP (accelerate reads the same variables)."""
    return any(os.environ.get(f"ACCELERATE_USE_{k}", "false").lower() == "true" for k in ("DEEPSPEED", "FSDP"))


def _accelerator(tc: TrainConfig):
    """The engine comes from the launcher (`accelerate launch --config_file configs/accelerate/<engine>.yaml`
    sets it in the environment; plain torchrun gives DDP). DeepSpeed cannot infer its batch sizes
    without a dataloader, so they are set here: selm accumulates micro-batches itself."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not cuda:
        # accelerate's FSDP plugin does not shard on a CPU (it falls back to no distribution at all).
        raise InputError("FSDP (configs/accelerate/fsdp2.yaml) needs GPUs; on CPUs use configs/accelerate/zero3.yaml or DDP")
    # On CPU accelerate finds no backend for DeepSpeed by itself; gloo is the one that works there.
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
    accelerator = Accelerator(cpu=not cuda and not deepspeed, kwargs_handlers=kwargs)
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update({"train_micro_batch_size_per_gpu": tc.batch_size, "gradient_accumulation_steps": 1,
                   "train_batch_size": tc.batch_size * accelerator.num_processes,
                   "gradient_clipping": tc.max_grad_norm})
    return accelerator


def _prepare(tc: TrainConfig, stage_dir: Path) -> None:
    """Process settings (threads, returning freed memory to the OS) and the stage folder, cleared of
    temporaries a killed run left; LoRA under a sharding launch is refused first."""
    if tc.lora.enabled and _sharding_launch():
        # Refused before the process group exists, so every process just exits.
        raise InputError("train.lora.r: LoRA is not supported under ZeRO-3/FSDP yet; train it in one process or "
                         "with DDP (torchrun)")
    set_threads(tc.num_threads)
    if tc.release_memory:
        return_freed_memory_to_os()
    stage_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(stage_dir)


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
    accelerator = _accelerator(tc)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if isinstance(tc.max_forward_tokens, int) and _sharded(accelerator):
        raise InputError("train.max_forward_tokens: not supported under ZeRO-3/FSDP (every process must run the "
                         "same forward passes); use gradient checkpointing or a smaller train.batch_size there")
    if ref_model_path is not None and _sharded(accelerator):
        raise InputError("--ref-model / train.reference=initial: a separate reference model is not supported under "
                         "ZeRO-3/FSDP yet; train without it (the start model is the reference) or with DDP")
    if tc.bf16 == "auto" and accelerator.is_main_process:
        print(f"train: {describe_precision(tc.bf16, device)}", file=sys.stderr, flush=True)
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)

    tokenizer, examples, model = _load_inputs(pairs_path, model_path, cfg, device)
    plan = StepPlan.build(len(examples), tc, seed, world)
    total_steps = len(plan.steps)
    module, optimizer = accelerator.prepare(ResponseLogps(model, segments=None if tc.segment_attention else False),
                                           build_optimizer(model, tc, lr, device))
    # On the wrapped optimizer: ZeRO-3 regroups the parameters into its own flat partitions.
    scheduler = build_scheduler(optimizer, tc, total_steps)
    data = _train_data(module, examples, tokenizer.pad_token_id, cfg, pairs_path, model_path, ref_model_path,
                       stage_dir, device)
    if accelerator.is_main_process:
        save_config(cfg, stage_dir / "config.yaml")
    start_step = _resume(accelerator, stage_dir, module, optimizer, scheduler)
    loggers = _loggers(stage_dir, cfg, accelerator.is_main_process, start_step)

    module.train()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train (alpha={tc.alpha:g})", disable=not accelerator.is_main_process)
    end = total_steps if max_steps is None else min(max_steps, total_steps)
    forward_budget = forward_tokens(tc.max_forward_tokens, device, _sharded(accelerator))
    with signals.deferred():  # SIGTERM/Ctrl-C now stop after the current optimizer step (selm/signals.py)
        for step in range(start_step, end):
            t0 = time.perf_counter()
            step_examples = plan.steps[step]
            micros = split_by_tokens(micro_batches(step_examples, rank, world, tc.batch_size), data.examples,
                                     forward_budget, tc.layout)
            stats = train_step(accelerator, module, optimizer, scheduler, data, micros,
                               normaliser=len(step_examples) / world, tc=tc)
            bar.update(1)
            done = step + 1
            diverged = bool(stats.nonfinite) or not _finite(stats.grad_norm)
            if done % tc.logging_steps == 0 or done == total_steps or diverged:
                stats = all_processes(stats)
                if accelerator.is_main_process:
                    _log_step(stage_dir, loggers, bar, stats, step=done, total_steps=total_steps, epochs=tc.epochs,
                              seconds=time.perf_counter() - t0, pairs=len(step_examples))
            if diverged:
                _close(bar, loggers)
                stop_if_nonfinite(stats, step=done, total_steps=total_steps, stage_dir=stage_dir, pairs_path=pairs_path)
            stop = _stop_requested(world)
            if tc.save_every_steps and (done % tc.save_every_steps == 0 or stop) and done < total_steps:
                metrics_bytes = dist.broadcast((stage_dir / PARTIAL).stat().st_size if accelerator.is_main_process else 0)
                _save_checkpoint(accelerator, stage_dir / CHECKPOINT, module, optimizer, scheduler, done, metrics_bytes)
            if stop and done < total_steps:
                _close(bar, loggers)  # flushes this run's events; a resume purges those after its checkpoint
                raise signals.Interrupted(stop)
        stop = _stop_requested(world)  # a signal during the last step: the stage is finished first
    _close(bar, loggers)
    if end < total_steps:
        return {"stopped_at": max_steps}

    summary = _summary(model, tc, total_steps, len(examples), lr, t_start) | {"bf16": use_bf16(tc.bf16, device)}
    _finish(accelerator, module, tokenizer, stage_dir, summary, tc)
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


def _train_data(module, examples: list[TokenizedExample], pad_id: int, cfg: Config, pairs_path: Path,
                model_path: Path, ref_model_path: Path | None, stage_dir: Path, device) -> TrainData:
    """The examples with their reference log-probs: computed once, before training (after wrapping:
    under ZeRO-3 only the engine can run a forward), by default the start model's own, before its
    first update; cached in the stage folder under a key of everything they depend on."""
    collate, tc = COLLATORS[cfg.train.layout], cfg.train
    key = _reference_key(Path(ref_model_path or model_path), pairs_path, cfg, device)
    ref = _reference_cache(stage_dir / REF_CACHE, key, examples, tc.ref_batch_size, lambda idx, nb: reference_logps(
        module, ref_model_path, examples, cfg, collate=collate, pad_id=pad_id, device=device, indices=idx,
        num_batches=nb))
    return TrainData(examples, ref, collate, pad_id)


def _log_step(stage_dir: Path, loggers: list, bar, stats: StepStats, **row_fields) -> None:
    """Write one metrics row (all processes' statistics) and show its loss and margin on the bar."""
    row = metrics_row(stats, **row_fields)
    _log_row(stage_dir, loggers, row)
    bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.3g}")


def _summary(model, tc: TrainConfig, total_steps: int, pairs: int, lr: float, t_start: float) -> dict:
    """What DONE.json records about the training."""
    trainable = sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3: the whole size, not this rank's part
                    for p in model.parameters() if p.requires_grad)
    return {"steps": total_steps, "pairs": pairs, "learning_rate": lr, "alpha": tc.alpha, "beta": tc.beta,
            "trainable_parameters": trainable, "seconds": time.perf_counter() - t_start}


def _close(bar, loggers) -> None:
    bar.close()
    for log in loggers:
        log.close()


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


class _TensorBoard:
    """Events in the stage's tb/ folder; a resumed run drops the events after its checkpoint."""

    def __init__(self, stage_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        tb_dir = stage_dir / "tb"
        if start_step == 0:
            shutil.rmtree(tb_dir, ignore_errors=True)
        self.writer = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A Weights & Biases run per training stage, named after the stage folder, with the config.
    WANDB_PROJECT, WANDB_MODE (e.g. offline), WANDB_ENTITY come from the environment; the API key
    never passes through selm. Its local files go to the stage's wandb/ folder."""

    def __init__(self, stage_dir: Path, cfg: Config, start_step: int):
        try:
            import wandb
        except ImportError:
            raise InputError("train.report_to: 'wandb' needs the wandb package (pip install wandb)") from None
        from selm.config import config_to_dict

        name = "/".join(stage_dir.resolve().parts[-3:])
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "selm"), name=name, dir=str(stage_dir),
                              config=config_to_dict(cfg), reinit="create_new",
                              notes=f"resumed at step {start_step}" if start_step else None)

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _loggers(stage_dir: Path, cfg: Config, main: bool, start_step: int) -> list:
    """The train.report_to loggers, on the main process only."""
    if not main:
        return []
    out = []
    for name in cfg.train.loggers():
        if name == "tensorboard":
            try:
                out.append(_TensorBoard(stage_dir, start_step))
            except ImportError:  # tensorboard is a dependency; a trimmed install still trains
                continue
        elif name == "wandb":
            out.append(_WandB(stage_dir, cfg, start_step))
    return out
