"""What the study, run and exploration reports share: a mean with its bootstrap interval and how it
is printed, the training curves of a run, and matplotlib figures (file-only backend, atomic saves)."""

from __future__ import annotations

import json
from pathlib import Path

from selm.layout import stage_dir
from selm.stats import hierarchical_ci, mean, seed_t_interval


def interval_summary(groups: list[list[float]], samples: int) -> dict:
    """Mean and 95% interval (`samples` bootstrap resamples) of values grouped by seed, and the
    per-seed means with their t-interval (seed_ci95), which verdicts read (selm.studies.findings.decide)."""
    flat = [x for g in groups for x in g]
    if not flat:
        return {"mean": None, "ci95": [None, None], "n": 0}
    lo, hi = hierarchical_ci(groups, samples=samples, seed=0)
    per_seed = [mean(g) for g in groups if g]
    return {"mean": mean(flat), "ci95": [lo, hi], "n": len(flat), "seeds": len(groups), "per_seed": per_seed,
            "seed_ci95": list(seed_t_interval(per_seed))}


def read_training_curves(run: Path, T: int) -> list[dict]:
    pts, offset = [], 0
    for t in range(1, T + 1):
        p = stage_dir(run, t, "train") / "metrics.jsonl"
        if not p.is_file():
            break
        rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
        for r in rows:
            pts.append({"step": offset + r["step"], "iteration": t, "loss": r["loss"], "margin": r["rewards/margins"],
                        "explore": r["loss/explore"], "accuracy": r["rewards/accuracies"]})
        offset += len(rows)
    return pts


def format_interval(s: dict, pct: bool = False) -> str:
    """"mean [lo, hi]", as percentages (one decimal) or raw values (three decimals)."""
    if s.get("mean") is None:
        return "n/a"
    if pct:
        return f"{s['mean'] * 100:.1f}% [{s['ci95'][0] * 100:.1f}, {s['ci95'][1] * 100:.1f}]"
    return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def errorbars(ax, xs, summaries: list[dict], label: str, scale: float = 1.0) -> None:
    """Means with their 95% intervals as error bars, skipping points without data."""
    pts = [(x, s) for x, s in zip(xs, summaries) if s["mean"] is not None]
    if not pts:
        return
    x = [p[0] for p in pts]
    m = [p[1]["mean"] * scale for p in pts]
    lo = [(p[1]["mean"] - p[1]["ci95"][0]) * scale for p in pts]
    hi = [(p[1]["ci95"][1] - p[1]["mean"]) * scale for p in pts]
    ax.errorbar(x, m, yerr=[lo, hi], marker="o", capsize=4, label=label)
    ax.set_xticks(list(xs))


def legend(ax, **kw) -> None:
    """A legend where something is labelled (a run without evaluation has empty plots: no warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_saver(plots: Path, made: list[str]):
    """save(fig, name): write the figure atomically as plots/name and record the name in `made`."""
    plt = pyplot()
    plots.mkdir(parents=True, exist_ok=True)

    def save(fig, name):
        fig.tight_layout()
        tmp = plots / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(plots / name)
        made.append(name)

    return save


def training_curves(ax_row, curves: list[dict], label: str) -> None:
    """Loss, reward margin and exploration term against the optimizer step, on three axes."""
    if curves:
        for ax, key in zip(ax_row, ("loss", "margin", "explore")):
            ax.plot([p["step"] for p in curves], [p[key] for p in curves], label=label)


CURVE_TITLES = ("loss", "rewards/margins", "loss/explore (alpha*beta*(logp - logp_ref) of y0)")
