"""Which examples each optimizer step and each forward pass uses; the optimizer and its schedule.

Every process knows every example, so each can work out what every other process runs: a step's
forward passes are padded, on each process, to the most that any process runs (a padded pass is a
zero-weight forward of one of the step's examples). DDP, ZeRO-3 and FSDP then meet in the same
collectives on every process, whatever the step's example count, and the update is one process's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from selm.config import TrainConfig
from selm.objective.logprobs import TokenizedExample


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


AUTO_FORWARD_TOKENS_CPU = 1024
"""train.max_forward_tokens "auto" on a CPU: the budget BENCHMARKS.md ("Memory") measured as faster
and leaner than one pass per micro-batch at the demo's lengths and at 256/384."""


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


def forward_passes(step_examples: list[int], examples: list[TokenizedExample], *, rank: int, world: int,
                   batch_size: int, budget: int | None, layout: str) -> list[list[int] | None]:
    """Process `rank`'s forward passes (example indices) for one optimizer step, followed by None
    (a zero-weight pass) up to the number of passes the busiest process runs.

    Without the padding a process whose share ran out (5 pairs over 2 processes of batch 2: 2 passes
    and 1) would skip collectives the others wait in: a hang under ZeRO-3/FSDP (parameter gathers)
    and under DDP (the gradient all-reduce of the step's last pass)."""
    def passes(r: int) -> list[list[int]]:
        return split_by_tokens(micro_batches(step_examples, r, world, batch_size), examples, budget, layout)

    every = [passes(r) for r in range(world)]
    most = max(map(len, every))
    return [*every[rank], *[None] * (most - len(every[rank]))]


def tokens_per_epoch(examples: list[TokenizedExample], layout: str) -> int:
    """The real (non-pad) tokens one epoch's forward passes run, as LogpBatch.num_tokens counts them:
    a prefix row holds its prompt once, a padded layout repeats it before every response."""
    prompts = 1 if layout == "prefix" else None
    return sum((prompts or len(e.responses)) * len(e.prompt) + sum(map(len, e.responses)) for e in examples)


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, lr: float, device, *, fused: bool = True
                    ) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norms, as TRL/transformers).
    `fused`: one kernel for all parameters where the device has it (not for sharded parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(tc.adam_beta1, tc.adam_beta2),
        # One fused kernel instead of a per-parameter loop, which the training profile showed as a
        # visible share of a CPU step (notes/train_benchmark.md, "Profile of selm's step").
        fused=fused and torch.device(device).type in ("cpu", "cuda"),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, total_steps: int):
    """The learning-rate schedule of cfg.train over `total_steps` optimizer steps."""
    warmup = int(math.ceil(tc.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.lr_scheduler, warmup, total_steps))
