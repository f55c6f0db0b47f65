"""The study report: report.md with PNG plots, built only from the files of the study it describes.

Sections: headline; gold win rate vs the start model per iteration (95% intervals over seeds and
prompts); head-to-head SELM vs DPO; gold reward distributions of generations per iteration (the
paper's Fig. 3); implicit rewards of SELM minus DPO on held-out chosen/rejected (Fig. 4); training
curves; response length; the alpha sweep (gold reward against alpha); the exploration statistics
(selm/studies/exploration_report.py); example generations.
"""

from __future__ import annotations

import json
from pathlib import Path

from selm.io import atomic_write_text, read_json
from selm.layout import model_dir, study_run
from selm.stats import head_to_head
from selm.studies.cost import cost_lines, cost_table
from selm.studies.findings import alpha_differences, decide, eval_rows, findings, findings_lines, sweep_headline
from selm.studies.plots import (CURVE_TITLES, errorbars, figure_saver, format_interval, interval_summary, legend, pyplot,
                               read_training_curves, training_curves)
from selm.studies.steps import Steps
from selm.studies.study import arm_configs, load_study


def collect(out: Path) -> dict:
    """Everything the report shows, as plain numbers (also saved as report.json)."""
    study = load_study(out)
    arms = [a["name"] for a in study["arms"]]
    seeds = study["seeds"]
    cfgs = arm_configs(study)
    shared = cfgs[arms[0]]
    T, samples = shared.loop.iterations, shared.evaluate.bootstrap_samples
    data: dict = {"arms": arms, "seeds": seeds, "iterations": T, "title": study["title"], "bootstrap_samples": samples,
                  "alphas": {name: cfg.train.alpha for name, cfg in cfgs.items()}}
    per_arm = {}
    for arm in arms:
        rows = {"win_vs_start": [], "gold": [], "length": [], "cut_off": [], "gold_all": []}
        for t in range(0, T + 1):
            wins, golds, lengths, cut = [], [], [], []
            for s in seeds:
                run = study_run(out, arm, s)
                cur, start = eval_rows(run, t), eval_rows(run, 0)
                if cur is None or start is None:
                    continue
                ids = sorted(cur)
                wins.append(head_to_head(cur, start, ids))
                golds.append([cur[i]["gold"] for i in ids])
                lengths.append([cur[i]["length_tokens"] for i in ids])
                cut.append([float(not cur[i].get("finished", True)) for i in ids])
            rows["win_vs_start"].append(interval_summary(wins, samples))
            rows["gold"].append(interval_summary(golds, samples))
            rows["length"].append(interval_summary(lengths, samples))
            rows["cut_off"].append(interval_summary(cut, samples))
            rows["gold_all"].append([g for grp in golds for g in grp])
        rows["curves"] = read_training_curves(study_run(out, arm, seeds[0]), T)
        per_arm[arm] = rows
    data["per_arm"] = per_arm
    data["setup"] = setup(shared, study_run(out, arms[0], seeds[0]))
    if "selm" in arms and "dpo" in arms:
        h2h = []
        for t in range(1, T + 1):
            groups = []
            for s in seeds:
                a, b = eval_rows(study_run(out, "selm", s), t), eval_rows(study_run(out, "dpo", s), t)
                if a and b:
                    ids = sorted(a)
                    groups.append(head_to_head(a, b, ids))
            h2h.append(interval_summary(groups, samples))
        data["head_to_head"] = h2h
        data["examples"] = _examples(out, seeds[0], T)
    ir = out / "analysis" / "implicit_rewards.json"
    if ir.is_file():
        data["implicit_rewards"] = read_json(ir)
    data["cost"] = cost_table([study_run(out, a, s) for a in arms for s in seeds], T)
    data["findings"] = findings(out, data)
    data["alpha_vs_zero"] = alpha_differences(out, data)
    return data


def _parameters(run: Path) -> int | None:
    """Parameters of the run's model, read from the shapes in iteration 1's safetensors (no loading)."""
    from safetensors import safe_open

    files = sorted(model_dir(run, 1).glob("*.safetensors"))
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total or None


def _source(name: str, gguf: str | None) -> str:
    if name == "tiny":
        return "the built-in tiny Llama, randomly initialised (selm/tiny.py)"
    if name.startswith("pypi:"):
        from selm.io import InputError
        from selm.models import packaged_gguf

        try:  # name the file actually shipped (its name says which model and quantisation)
            gguf = packaged_gguf(name[5:], gguf).name
        except InputError:
            pass
        return f"a GGUF file{f' ({gguf})' if gguf else ''} shipped in the PyPI package {name[5:]}, converted to safetensors"
    return f"{name}{f' ({gguf})' if gguf else ''}"


def _judge(rc) -> str:
    what = {"callable": rc.callable, "pairwise": rc.callable, "reward_model": rc.model, "http_judge": rc.endpoint.model}
    return f"{rc.kind} `{what.get(rc.kind)}`"


def setup(cfg, run: Path) -> dict:
    """What was aligned, on what, judged by what: the model, its size and source, the task, the
    training ranker and the gold judge."""
    split = read_json(run / "data" / "DONE.json") if (run / "data" / "DONE.json").is_file() else {}
    return {"model": cfg.model.name_or_path, "source": _source(cfg.model.name_or_path, cfg.model.gguf_file),
            "parameters": _parameters(run), "dtype": cfg.model.dtype,
            "prompts": cfg.data.prompts, "eval_prompts": cfg.data.eval_prompts or cfg.data.prompts,
            "train_prompts_per_iteration": split.get("train_slices"), "eval_prompt_count": split.get("eval"),
            "ranker": _judge(cfg.rank), "gold_judge": _judge(cfg.evaluate.judge)}


def _setup_lines(su: dict) -> list[str]:
    size = f"{su['parameters']:,} parameters" if su["parameters"] else "size unknown"
    per = su["train_prompts_per_iteration"] or []
    per = str(per[0]) if len(set(per)) == 1 else ", ".join(map(str, per)) or "?"
    return ["## Setup", "",
            f"- Model: `{su['model']}` ({size}, {su['dtype']}), from {su['source']}.",
            f"- Task: prompts from `{Path(su['prompts']).name}` ({per} per iteration), "
            f"evaluated on {su['eval_prompt_count']} held-out prompts from `{Path(su['eval_prompts']).name}`.",
            f"- Training ranker: {su['ranker']}. Gold judge (evaluation only): {su['gold_judge']}.", ""]


def _examples(out: Path, seed: int, T: int, n: int = 3) -> list[dict]:
    start = eval_rows(study_run(out, "selm", seed), 0)
    a = eval_rows(study_run(out, "selm", seed), T)
    b = eval_rows(study_run(out, "dpo", seed), T)
    if not (start and a and b):
        return []
    ids = sorted(start)[:n]
    return [{"prompt": start[i]["prompt"][-1]["content"], "start": start[i], "selm": a[i], "dpo": b[i]} for i in ids]


# ------------------------------------------------------------------------------------------------
# Plots and markdown.


def _plots(data: dict, plots: Path) -> list[str]:
    plt = pyplot()
    made: list[str] = []
    save = figure_saver(plots, made)
    T, arms = data["iterations"], data["arms"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        errorbars(ax, range(0, T + 1), data["per_arm"][arm]["win_vs_start"], arm, 100)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="iteration", ylabel="gold win rate vs start model (%)", title="Win rate vs the start model (95% CI)")
    legend(ax)
    save(fig, "win_rate_vs_start.png")

    if "head_to_head" in data:
        fig, ax = plt.subplots(figsize=(6, 4))
        errorbars(ax, range(1, T + 1), data["head_to_head"], "SELM vs DPO", 100)
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="iteration", ylabel="SELM win rate over DPO (%)", title="Head to head, same seed and prompts")
        save(fig, "head_to_head.png")

    fig, axes = plt.subplots(1, len(arms), figsize=(4.5 * len(arms), 3.6), squeeze=False, sharey=True)
    for ax, arm in zip(axes[0], arms):
        for t, vals in enumerate(data["per_arm"][arm]["gold_all"]):
            if vals:
                ax.hist(vals, bins=20, histtype="step", density=True, label=f"iter {t}", lw=1.5)
        ax.set(title=f"{arm}: gold reward of generations", xlabel="gold reward")
        legend(ax, fontsize=8)
    save(fig, "reward_distribution.png")

    ir = data.get("implicit_rewards")
    if ir and ir.get("diff"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind in ("chosen", "rejected"):
            errorbars(ax, [d["iteration"] for d in ir["diff"]], [d[kind] for d in ir["diff"]], kind)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="iteration", ylabel="implicit reward, SELM - DPO", title="Implicit rewards on held-out pairs")
        legend(ax)
        save(fig, "implicit_rewards.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for arm in arms:
        training_curves(axes, data["per_arm"][arm]["curves"], arm)
    for ax, title in zip(axes, CURVE_TITLES):
        ax.set(title=title, xlabel="optimizer step (all iterations, first seed)")
        legend(ax, fontsize=8)
    save(fig, "training_curves.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        errorbars(ax, range(0, T + 1), data["per_arm"][arm]["length"], arm)
    ax.set(xlabel="iteration", ylabel="response length (tokens)", title="Evaluation response length")
    legend(ax)
    save(fig, "length.png")

    if len(arms) > 2 or not ("selm" in arms and "dpo" in arms):
        fig, ax = plt.subplots(figsize=(6, 4))
        order = sorted(arms, key=lambda a: data["alphas"][a])
        xs = list(range(len(order)))
        errorbars(ax, xs, [data["per_arm"][a]["gold"][T] for a in order], f"iteration {T}")
        ax.set_xticks(xs, [f"{data['alphas'][a]:g}" for a in order])
        ax.set(xlabel="alpha", ylabel="mean gold reward", title="Alpha sweep (95% CI over seeds and prompts)")
        save(fig, "alpha_sweep.png")
    return made


def headline(data: dict) -> str:
    T = data["iterations"]
    if "head_to_head" in data and data["head_to_head"] and data["head_to_head"][-1]["mean"] is not None:
        h = data["head_to_head"][-1]
        side = decide(h, 0.5)
        if side is None:
            verdict = ("no verdict: with one seed there is no interval over seeds, and one run cannot show how much "
                       "another seed's would differ (docs/EVIDENCE.md); run two or more seeds")
        elif side:
            verdict = "SELM beat iterative DPO" if side > 0 else "iterative DPO beat SELM"
        else:
            verdict = ("no clear difference between SELM and iterative DPO at this size (the 95% t-interval over seeds "
                       "contains 50%; docs/EVIDENCE.md says how many seeds a difference needs)")
        s, d = data["per_arm"]["selm"]["win_vs_start"][T], data["per_arm"]["dpo"]["win_vs_start"][T]
        n_seeds = len(h.get("per_seed") or data["seeds"])
        per_seed = ", ".join(f"{x * 100:.1f}%" for x in h.get("per_seed") or [])
        lo, hi = h.get("seed_ci95") or [None, None]
        boot = f"[{h['ci95'][0] * 100:.1f}, {h['ci95'][1] * 100:.1f}]"
        if lo is None:
            seeds_ci = f"; bootstrap over prompts {boot}, which says nothing about another seed"
        else:
            # A win rate lies in [0, 100%]: the interval is shown within it (the verdict reads it unclipped;
            # clipping cannot move 50% in or out of it).
            lo, hi = max(lo, 0.0), min(hi, 1.0)
            seeds_ci = (f"; 95% t-interval over seeds [{lo * 100:.1f}, {hi * 100:.1f}]; bootstrap over seeds and prompts "
                        f"{boot}, which decides nothing (resampling a few seeds understates their spread)")
        return (f"**At iteration {T}: {verdict}.** Head-to-head gold win rate of SELM over DPO: {h['mean'] * 100:.1f}% "
                f"over {h['n']} prompt-seed pairs ({n_seeds} seed{'' if n_seeds == 1 else 's'}: {per_seed}{seeds_ci}). "
                f"Win rate vs the start model: SELM {format_interval(s, True)}, DPO {format_interval(d, True)}.")
    best = max(data["arms"], key=lambda a: data["per_arm"][a]["gold"][T]["mean"] or float("-inf"))
    return (f"**Highest mean gold reward at iteration {T}: {best}** ({format_interval(data['per_arm'][best]['gold'][T])})."
            + sweep_headline(data.get("alpha_vs_zero") or {}))


def build_report(out: Path, exploration_prompts: int | None = None) -> Path:
    """Write the study's report; `exploration_prompts` overrides report.exploration_prompts."""
    from selm.studies.exploration_report import study_section

    out = Path(out)
    steps = Steps("report", 4)
    steps.start("numbers from the run folders")
    data = collect(out)
    steps.start("plots")
    made = _plots(data, out / "plots")
    T = data["iterations"]
    lines = [f"# {data['title']}: report", "", headline(data), "",
             "Arms: " + ", ".join(f"{a} (alpha={data['alphas'][a]:g})" for a in data["arms"]) + "; seeds: "
             f"{', '.join(map(str, data['seeds']))}; iterations: {T}. Every figure below is computed from the run "
             f"folders under `{out}` (numbers also in `report.json`). Intervals in the tables are 95% bootstrap intervals "
             "that resample seeds, then prompts within a seed; ties count half. Verdicts (the headline and the "
             "findings) read only the 95% t-interval over the per-seed values (seeds - 1 degrees of freedom), which "
             "carries the seed-to-seed spread that a bootstrap over a few seeds misses.", ""]
    lines += _setup_lines(data["setup"])
    lines += ["## Gold win rate vs the start model", "", "| iteration | " + " | ".join(data["arms"]) + " |",
              "|---|" + "---|" * len(data["arms"])]
    for t in range(0, T + 1):
        lines.append(f"| {t} | " + " | ".join(format_interval(data["per_arm"][a]["win_vs_start"][t], True) for a in data["arms"]) + " |")
    lines += ["", "![](plots/win_rate_vs_start.png)", ""]
    if "head_to_head" in data:
        lines += ["## Head to head: SELM vs DPO", "", "| iteration | SELM win rate over DPO |", "|---|---|"]
        lines += [f"| {t} | {format_interval(h, True)} |" for t, h in enumerate(data["head_to_head"], 1)]
        lines += ["", "![](plots/head_to_head.png)", ""]
    lines += findings_lines(data.get("findings"))
    lines += ["## Mean gold reward, response length and answers cut off", "",
              "Cut off: the share of evaluation answers that hit evaluate.max_new_tokens before ending.", "",
              "| iteration | " + " | ".join(f"{a} gold | {a} length | {a} cut off" for a in data["arms"]) + " |",
              "|---|" + "---|---|---|" * len(data["arms"])]
    for t in range(0, T + 1):
        lines.append(f"| {t} | " + " | ".join(
            f"{format_interval(data['per_arm'][a]['gold'][t])} | {format_interval(data['per_arm'][a]['length'][t])} | "
            f"{format_interval(data['per_arm'][a]['cut_off'][t], True)}" for a in data["arms"]) + " |")
    lines += ["", "![](plots/reward_distribution.png)", "", "![](plots/length.png)", ""]
    if "implicit_rewards.png" in made:
        ir = data["implicit_rewards"]
        lines += ["## Implicit rewards on held-out pairs (SELM minus DPO)", "", ir.get("description", ""), "",
                  "| iteration | chosen | rejected |", "|---|---|---|"]
        lines += [f"| {d['iteration']} | {format_interval(d['chosen'])} | {format_interval(d['rejected'])} |" for d in ir["diff"]]
        lines += ["", "![](plots/implicit_rewards.png)", ""]
    lines += ["## Training curves", "", "![](plots/training_curves.png)", ""]
    if "alpha_sweep.png" in made:
        lines += ["## Alpha sweep", "", "| alpha | mean gold reward at the last iteration | win rate vs start |", "|---|---|---|"]
        for a in sorted(data["arms"], key=lambda a: data["alphas"][a]):
            lines.append(f"| {data['alphas'][a]:g} | {format_interval(data['per_arm'][a]['gold'][T])} | "
                         f"{format_interval(data['per_arm'][a]['win_vs_start'][T], True)} |")
        lines += ["", "![](plots/alpha_sweep.png)", ""]
    steps.start("exploration statistics")
    lines += study_section(out, data, exploration_prompts)
    lines += cost_lines(data["cost"])
    if data.get("examples"):
        lines += ["## Example generations (first seed, last iteration)", ""]
        for ex in data["examples"]:
            lines += [f"**Prompt:** {ex['prompt']}", "", "| model | gold | response |", "|---|---|---|"]
            for name in ("start", "selm", "dpo"):
                r = ex[name]
                text = r["response"].replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {name} | {r['gold']:.3f} | {text} |")
            lines.append("")
    steps.start("report.md and report.json")
    atomic_write_text(out / "report.json", json.dumps(data, indent=1))
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    steps.close()
    return out / "report.md"
