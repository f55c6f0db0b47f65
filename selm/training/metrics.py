"""Per-step statistics over every process, the metrics file, the loggers, and divergence.

A step's statistics are sums over its examples on each process; `all_processes` adds them up, so
the logged means are those of the whole step, as one process would log them. Whether a step
diverged is decided from every process's view (`train_step` gathers it before the update), so all
processes stop at the same step with the same message instead of meeting in different collectives.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selm import dist
from selm.config import Config
from selm.data import load_pairs
from selm.io import InputError, on_main

METRICS = "metrics.jsonl"
PARTIAL = METRICS + ".partial"  # metrics.jsonl while training runs; renamed when the stage is done


@dataclass
class StepStats:
    """One optimizer step on this process: per-example metric sums over its `examples` examples, the
    real tokens it ran, the gradient norm before clipping (all processes; None before DeepSpeed's
    first step) and the rate it used. `diverged`: on any process a loss term or the norm was not
    finite (the same answer on every process)."""

    sums: dict[str, float]
    examples: int
    tokens: int
    grad_norm: float | None
    lr: float
    nonfinite: dict[str, list[int]] = field(default_factory=dict)
    """Loss term ("dpo", "explore") -> this process's example indices where it was NaN or infinite."""
    diverged: bool = False


def accumulate(sums: dict[str, float], out: dict, logps: dict, refs: dict) -> None:
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


def find_nonfinite(found: dict[str, list[int]], out: dict, idx: list[int]) -> None:
    """Add the example indices of micro-batch `idx` whose "dpo" or "explore" loss is NaN or infinite."""
    for term, key in (("dpo", "loss_pair"), ("explore", "loss_explore")):
        bad = (~torch.isfinite(out[key].detach())).flatten().nonzero().flatten().tolist()
        if bad:
            found.setdefault(term, []).extend(idx[i] for i in bad)


def finite(grad_norm: float | None) -> bool:
    # DeepSpeed reports no norm before its first step.
    return grad_norm is None or math.isfinite(grad_norm)


def all_processes(stats: StepStats) -> StepStats:
    """The step's statistics over every process (metric sums, examples and tokens added up)."""
    if dist.world_size() == 1:
        return stats
    parts = dist.all_gather((stats.sums, stats.examples, stats.tokens, stats.nonfinite))
    keys = sorted({k for p in parts for k in p[0]})  # a process that ran only padding has no sums
    sums = {k: sum(p[0].get(k, 0.0) for p in parts) for k in keys}
    nonfinite: dict[str, list[int]] = {}
    for p in parts:
        for term, rows in p[3].items():
            nonfinite.setdefault(term, []).extend(rows)
    return StepStats(sums, sum(p[1] for p in parts), sum(p[2] for p in parts), stats.grad_norm, stats.lr,
                     {t: sorted(r) for t, r in nonfinite.items()}, stats.diverged)


def metrics_row(stats: StepStats, *, step: int, total_steps: int, epochs: int, seconds: float, pairs: int) -> dict:
    """One metrics.jsonl line for optimizer step `step` (1-based) from the step's statistics over all
    processes: per-example means and the step's rate, gradient norm and throughput."""
    row = {k: v / stats.examples for k, v in stats.sums.items()}
    row.update({"step": step, "total_steps": total_steps, "epoch": step / total_steps * epochs, "lr": stats.lr,
                "grad_norm": stats.grad_norm,
                "tokens_per_s": stats.tokens / seconds, "pairs": pairs})
    return row


class MetricsLog:
    """The stage's metrics rows: metrics.jsonl.partial while training runs, plus the train.report_to
    loggers, on the main process only (elsewhere every method does nothing)."""

    def __init__(self, stage_dir: Path, cfg: Config, main: bool, start_step: int):
        self.path, self.main = stage_dir / PARTIAL, main
        self.loggers = _loggers(stage_dir, cfg, start_step) if main else []

    def write(self, row: dict) -> None:
        """Append `row` to the metrics file and send it to the loggers."""
        if not self.main:
            return
        with open(self.path, "ab") as f:
            f.write((json.dumps(row) + "\n").encode())
        scalars = {k: v for k, v in row.items() if k not in ("step", "total_steps")}
        for log in self.loggers:
            log.log(scalars, row["step"])

    def size(self) -> int:
        """Bytes written so far (a checkpoint records it; a resume truncates the file back to it)."""
        return on_main(lambda: self.path.stat().st_size)

    def truncate(self, size: int) -> None:
        """Drop the rows written after the checkpoint a run resumes from (they will be redone)."""
        if self.main:
            with open(self.path, "a+b") as f:
                f.truncate(size)

    def close(self) -> None:
        for log in self.loggers:
            log.close()


class TrainingDiverged(InputError):
    """A loss term or the gradient norm went NaN or infinite: training stops (an input problem: the
    settings or the data); nothing is saved as done."""


def stop_if_nonfinite(stats: StepStats, *, step: int, total_steps: int, stage_dir: Path, checkpoint: Path,
                      pairs_path: Path) -> None:
    """Raise TrainingDiverged naming the step, the loss term and the pairs when the step diverged.

    The checkpoint is removed: its weights lie on the diverging path and its schedule carries the old
    learning rate, so the re-run (after fixing the settings) redoes the stage from its first step."""
    if not stats.diverged:
        return
    if dist.is_main():
        shutil.rmtree(checkpoint, ignore_errors=True)
    if stats.nonfinite:
        ids = [p.prompt_id for p in load_pairs(pairs_path, need_exploration=False, warn=False)]
        what = "; ".join(
            f"loss/{term} of pairs {rows[:5]}{' ...' if len(rows) > 5 else ''} (0-based among the pairs of {pairs_path} trained on; "
            f"prompt_ids {', '.join(repr(ids[i]) for i in rows[:5])})"
            for term, rows in sorted(stats.nonfinite.items()))
    else:
        what = "the gradient norm (every loss term was finite)"
    raise TrainingDiverged(
        f"{stage_dir}: training stopped at optimizer step {step} of {total_steps}: NaN or infinity in {what}; "
        f"grad_norm={stats.grad_norm}; the step's metrics are in {stage_dir / PARTIAL}. Nothing was saved; lower "
        "train.learning_rate or train.beta (or fix those pairs) and re-run: the stage starts over")


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


def _loggers(stage_dir: Path, cfg: Config, start_step: int) -> list:
    """The train.report_to loggers."""
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
