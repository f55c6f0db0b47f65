"""The report of one `selm run` folder: report.md, report.json and PNG plots, built only from the
run's own files (`selm report DIR`). Per iteration: mean gold reward, win rates vs the start model
and vs the previous iteration (95% bootstrap intervals over prompts; ties count half), response
length, the share of answers cut off, pairs; the training curves; and the exploration statistics
(selm/studies/exploration_report.py). The plotting and interval
helpers are the study report's (selm/studies/report.py)."""

from __future__ import annotations

import json
from pathlib import Path

from selm.config import load_saved_config
from selm.io import DONE_MARKER, InputError, atomic_write_text, read_json
from selm.studies.steps import Steps
from selm.layout import stage_dir
from selm.stats import head_to_head
from selm.studies.cost import cost_lines, cost_table
from selm.studies.exploration_report import run_section
from selm.studies.findings import eval_rows
from selm.studies.plots import (CURVE_TITLES, errorbars, figure_saver, format_interval, interval_summary, legend, pyplot,
                               read_training_curves, training_curves)


def collect_run(out: Path) -> dict:
    """Everything the run report shows, as plain numbers (also saved as report.json)."""
    if not (out / "config.yaml").is_file():
        raise InputError(f"{out}: not a selm run folder (no config.yaml); `selm report` takes a run, demo or sweep folder")
    cfg = load_saved_config(out / "config.yaml")
    T, samples = cfg.loop.iterations, cfg.evaluate.bootstrap_samples
    start = eval_rows(out, 0)
    rows = []
    for t in range(0, T + 1):
        cur, prev = eval_rows(out, t), eval_rows(out, t - 1) if t > 0 else None
        row: dict = {"iteration": t, "evaluated": cur is not None}
        pair = stage_dir(out, t, "pair") / DONE_MARKER
        row["pairs"] = read_json(pair).get("pairs") if pair.is_file() else None
        ids = sorted(cur) if cur else []
        group = lambda vals: interval_summary([vals] if vals else [], samples)  # noqa: E731 - one seed: one group
        row["gold"] = group([cur[i]["gold"] for i in ids])
        row["length"] = group([cur[i]["length_tokens"] for i in ids])
        row["cut_off"] = group([float(not cur[i].get("finished", True)) for i in ids])
        row["win_vs_start"] = group(head_to_head(cur, start, ids)
                                    if start and ids else [])
        row["win_vs_previous"] = group(head_to_head(cur, prev, ids)
                                       if prev and ids and t > 0 else [])
        row["gold_all"] = [cur[i]["gold"] for i in ids]
        rows.append(row)
    return {"run": str(out), "iterations": T, "alpha": cfg.train.alpha, "beta": cfg.train.beta,
            "per_iteration": rows, "curves": read_training_curves(out, T), "cost": cost_table([out], T)}


def _plots(data: dict, plots: Path) -> list[str]:
    plt = pyplot()
    made: list[str] = []
    save = figure_saver(plots, made)
    rows, xs = data["per_iteration"], range(0, data["iterations"] + 1)

    fig, ax = plt.subplots(figsize=(6, 4))
    errorbars(ax, xs, [r["gold"] for r in rows], "mean gold reward")
    ax.set(xlabel="iteration", ylabel="mean gold reward", title="Gold reward on held-out prompts (95% CI)")
    save(fig, "gold_reward.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    errorbars(ax, xs, [r["win_vs_start"] for r in rows], "vs the start model", 100)
    errorbars(ax, xs, [r["win_vs_previous"] for r in rows], "vs the previous iteration", 100)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="iteration", ylabel="gold win rate (%)", title="Win rates (95% CI; ties count half)")
    legend(ax)
    save(fig, "win_rates.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    errorbars(axes[0], xs, [r["length"] for r in rows], "length")
    axes[0].set(xlabel="iteration", ylabel="response length (tokens)", title="Evaluation response length")
    errorbars(axes[1], xs, [r["cut_off"] for r in rows], "cut off", 100)
    axes[1].set(xlabel="iteration", ylabel="answers cut off (%)", title="Answers cut at evaluate.max_new_tokens")
    save(fig, "length_and_cut_off.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["gold_all"]:
            ax.hist(r["gold_all"], bins=20, histtype="step", density=True, label=f"iter {r['iteration']}", lw=1.5)
    ax.set(title="Gold reward of evaluation responses", xlabel="gold reward")
    legend(ax, fontsize=8)
    save(fig, "reward_distribution.png")

    if data["curves"]:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        training_curves(axes, data["curves"], f"alpha={data['alpha']:g}")
        for ax, title in zip(axes, CURVE_TITLES):
            ax.set(title=title, xlabel="optimizer step (all iterations)")
        save(fig, "training_curves.png")
    return made


def build_run_report(out: Path, exploration_prompts: int | None = None) -> Path:
    """Write out/report.md, out/report.json and out/plots/*.png for the run folder `out`.
    `exploration_prompts` overrides report.exploration_prompts."""
    out = Path(out)
    steps = Steps("report", 3)
    steps.start(f"numbers from {out}")
    data = collect_run(out)
    steps.start("plots")
    made = _plots(data, out / "plots")
    lines = [f"# selm run report: {out.name}", "",
             f"alpha={data['alpha']:g}, beta={data['beta']:g}, {data['iterations']} iterations. Every number is computed "
             f"from the files under `{out}` (also in `report.json`); intervals are 95% bootstrap intervals over "
             "held-out prompts, ties count half; iteration 0 is the start model. Cut off: the share of answers that "
             "hit evaluate.max_new_tokens before ending.", "",
             "| iteration | pairs | mean gold | win rate vs start | win rate vs previous | length (tokens) | cut off |",
             "|---|---|---|---|---|---|---|"]
    for r in data["per_iteration"]:
        pairs = "" if r["pairs"] is None else str(r["pairs"])
        lines.append(f"| {r['iteration']} | {pairs} | {format_interval(r['gold'])} | {format_interval(r['win_vs_start'], True)} | "
                     f"{format_interval(r['win_vs_previous'], True)} | {format_interval(r['length'])} | {format_interval(r['cut_off'], True)} |")
    lines.append("")
    for name, title in (("gold_reward.png", "Gold reward"), ("win_rates.png", "Win rates"),
                        ("length_and_cut_off.png", "Length and answers cut off"),
                        ("reward_distribution.png", "Gold reward distribution"),
                        ("training_curves.png", "Training curves")):
        if name in made:
            lines += [f"## {title}", "", f"![](plots/{name})", ""]
    steps.start("exploration statistics (scoring responses with each iteration's model)")
    lines += run_section(out, data, exploration_prompts)
    lines += cost_lines(data["cost"])
    atomic_write_text(out / "report.json", json.dumps(data, indent=1))
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    steps.close()
    return out / "report.md"
