"""The "Exploration" section of `selm report`, for a run folder and for a study (demo or sweep):
tables and plots of the statistics of selm/studies/exploration.py, per iteration (per arm in a
study, seeds pooled with 95% intervals that resample seeds, then prompts), and in a study each
statistic against alpha next to the gold reward. docs/method.md says what each number means."""

from __future__ import annotations

from pathlib import Path

from selm.layout import study_run
from selm.stats import mean
from selm.studies.exploration import DISTANCES, quantile, run_exploration
from selm.studies.plots import errorbars, figure_saver, format_interval, interval_summary, pyplot

WITHIN = ("distinct_1", "distinct_2", "duplicates", "edit_distance")
ACROSS = ("distinct_1_across", "distinct_2_across", "duplicates_across")
COVERAGE = ("best", "mean", "beats_start_best", "margin")
QUANTILES = (0.1, 0.5, 0.9)
LABELS = {
    "samples_vs_previous": "samples: vs previous", "samples_vs_start": "samples: vs start",
    "own_samples_vs_previous": "own samples: vs previous", "own_samples_vs_start": "own samples: vs start",
    "y0_vs_previous": "its y0: vs previous", "y0_vs_start": "start's y0: vs start",
    "distinct_1": "distinct-1", "distinct_2": "distinct-2", "duplicates": "duplicates", "edit_distance": "edit distance",
    "distinct_1_across": "distinct-1 across", "distinct_2_across": "distinct-2 across",
    "duplicates_across": "duplicates across", "best": "best score per prompt", "mean": "mean score per prompt",
    "beats_start_best": "best beats start's best", "margin": "chosen - rejected",
}
PCT = {"duplicates", "beats_start_best", "duplicates_across"}

EXPLAIN = [
    "Computed by `selm report` from the run's files plus one no-grad scoring pass per model (training's scoring "
    "path and tokenisation) over the first {cap} prompts of each iteration, cached in each run's "
    "`analysis/exploration.json`; docs/method.md (\"Exploration statistics\") says how each is estimated. Model t "
    "is iteration t's trained model; \"previous\" is model t-1 (the start model for t = 1); \"start\" is the "
    "start model.",
    "",
    "- **Distance moved**: the mean over responses of log p_t(y) - log p_ref(y), per response (per token in the "
    "second table); negative: model t gives them less probability than the reference. *samples*: iteration t's "
    "sampled candidates, drawn from model t-1, so the mean against previous is minus a Monte-Carlo estimate of "
    "KL(model t-1 || model t). *own samples*: iteration t+1's candidates, drawn from model t: an estimate of "
    "KL(model t || reference) (none at the last iteration). *its y0*: iteration t's exploration responses, "
    "which its optimism term pushed down. *start's y0*: iteration 1's (the start model's greedy answers), "
    "scored by every iterate. The KL readings assume generate.temperature 1 and top_p 1 (here {temp:g} and "
    "{top_p:g}).",
    "- **Diversity** of iteration t's sampled candidates (drawn from model t-1): distinct-n ratios, the share "
    "of exact duplicates and the word edit distance (first {cap} prompts) within each prompt's samples; "
    "\"across\": over all prompts' samples pooled (a point value per seed, no interval).",
    "- **Reward coverage**: training-ranker scores of iteration t's generated candidates (the dataset's responses "
    "left out), whether each prompt's best beats the start model's best ({kind}), and the pairs' "
    "chosen-minus-rejected margin.",
]


def summarize(runs: list[dict], samples: int) -> list[dict]:
    """Per iteration, the statistics of the runs (one per seed) pooled: a mean with its 95% interval
    over seeds and prompts for per-prompt values, a plain mean over seeds for pooled ones."""
    T = max((len(r["per_iteration"]) for r in runs), default=0)
    out = []
    for i in range(T):
        its = [r["per_iteration"][i] for r in runs if i < len(r["per_iteration"])]
        row: dict = {"iteration": i + 1, "distance": {}}
        for name in DISTANCES:
            got = [it["distance"][name] for it in its if name in it["distance"]]
            row["distance"][name] = {u: interval_summary([g[u] for g in got], samples) for u in ("per_sequence", "per_token")}
        div = [it["diversity"] for it in its if it["diversity"]]
        row["diversity"] = {k: interval_summary([d[k] for d in div], samples) for k in WITHIN}
        for k in ACROSS:
            vals = [d[k] for d in div if d[k] is not None]
            row["diversity"][k] = {"mean": mean(vals) if vals else None, "values": vals}
        cov = [it["coverage"] for it in its if it["coverage"]]
        row["coverage"] = {k: interval_summary([c[k] for c in cov], samples) for k in COVERAGE}
        pooled = [s for c in cov for s in c["scores"]]
        row["coverage"]["quantiles"] = {f"p{round(q * 100)}": quantile(pooled, q) for q in QUANTILES}
        row["coverage"]["max"] = max(pooled) if pooled else None
        row["coverage"]["beats_kind"] = "/".join(sorted({c["beats_kind"] for c in cov} - {"none"})) or "none"
        out.append(row)
    return out


def _cell(stat: dict, key: str) -> str:
    if "values" in stat:  # pooled over prompts: a point value, no interval
        return "n/a" if stat["mean"] is None else (f"{stat['mean'] * 100:.1f}%" if key in PCT else f"{stat['mean']:.3f}")
    return format_interval(stat, key in PCT)


def _table(per_label: dict[str, list[dict]], part: str, keys, pick=lambda s: s) -> list[str]:
    """Markdown rows: one per (label, iteration); label column only when there are several."""
    several = len(per_label) > 1
    head = (["arm"] if several else []) + ["iteration"] + [LABELS[k] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rows in per_label.items():
        for r in rows:
            cells = ([label] if several else []) + [str(r["iteration"])] + [_cell(pick(r[part][k]), k) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _coverage_rows(per_label: dict[str, list[dict]]) -> list[str]:
    several = len(per_label) > 1
    head = (["arm"] if several else []) + ["iteration", "best score per prompt", "score p10 / p50 / p90 / max",
                                           "best beats start's best", "chosen - rejected"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rows in per_label.items():
        for r in rows:
            c = r["coverage"]
            qs = " / ".join("n/a" if v is None else f"{v:.3f}" for v in [*c["quantiles"].values(), c["max"]])
            cells = ([label] if several else []) + [str(r["iteration"]), format_interval(c["best"]), qs,
                                                    format_interval(c["beats_start_best"], True), format_interval(c["margin"])]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _grid(save, name: str, title: str, per_label: dict[str, list[dict]], panels: list[tuple[str, str, str]]) -> None:
    """One panel per (part, key, unit) statistic against the iteration, one line per label."""
    plt = pyplot()
    cols = 3
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4.3 * cols, 3.3 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (part, key, unit) in zip(axes.flat, panels):
        for label, rows in per_label.items():
            stats = [r[part][key][unit] if unit else r[part][key] for r in rows]
            if all("values" not in s for s in stats):
                errorbars(ax, [r["iteration"] for r in rows], stats, label, 100 if key in PCT else 1)
            else:  # pooled over prompts: no interval
                pts = [(r["iteration"], s["mean"] * (100 if key in PCT else 1)) for r, s in zip(rows, stats)
                       if s["mean"] is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                ax.set_xticks([r["iteration"] for r in rows])
        if part == "distance":
            ax.axhline(0, color="grey", lw=0.8, ls="--")
        if key == "beats_start_best":
            ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set(title=LABELS[key] + (f" ({unit.replace('_', ' ')})" if unit else "") + (" (%)" if key in PCT else ""),
               xlabel="iteration")
        if len(per_label) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    rest = list(axes.flat)[len(panels):]
    if part == "coverage" and rest:
        _quantile_panel(rest.pop(0), per_label)
    for ax in rest:
        ax.axis("off")
    fig.suptitle(title)
    save(fig, name)


def _quantile_panel(ax, per_label: dict[str, list[dict]]) -> None:
    """The ranker scores' median (line), 10%-90% band and maximum (x) per iteration."""
    for label, rows in per_label.items():
        its = [r["iteration"] for r in rows if r["coverage"]["max"] is not None]
        q = [r["coverage"]["quantiles"] for r in rows if r["coverage"]["max"] is not None]
        line = ax.plot(its, [x["p50"] for x in q], marker="o", label=f"{label} median")[0]
        ax.fill_between(its, [x["p10"] for x in q], [x["p90"] for x in q], alpha=0.2, color=line.get_color())
        ax.plot(its, [r["coverage"]["max"] for r in rows if r["coverage"]["max"] is not None], "x",
                color=line.get_color())
    ax.set_xticks([r["iteration"] for rows in per_label.values() for r in rows])
    ax.set(title="candidate scores: median, 10-90% band, max (x)", xlabel="iteration")


PLOTS = {
    "exploration_distance.png": ("Distance moved (log-ratio per response, 95% CI)",
                                 [("distance", k, "per_sequence") for k in DISTANCES]),
    "exploration_diversity.png": ("Diversity of the sampled candidates",
                                  [("diversity", k, None) for k in WITHIN + ACROSS[1:]]),
    "exploration_coverage.png": ("Reward coverage (training ranker)",
                                 [("coverage", k, None) for k in COVERAGE]),
}


def section(per_label: dict[str, list[dict]], plots: Path, cfg, kind: str) -> list[str]:
    """The markdown of the section (plots written into `plots`), for summaries keyed by arm."""
    made: list[str] = []
    save = figure_saver(plots, made)
    for name, (title, panels) in PLOTS.items():
        _grid(save, name, title, per_label, panels)
    fill = dict(cap=cfg.report.exploration_prompts, temp=cfg.generate.temperature, top_p=cfg.generate.top_p, kind=kind)
    lines = ["## Exploration", ""] + [line.format(**fill) for line in EXPLAIN] + ["",
             "### Distance moved: log-ratio per response", ""]
    lines += _table(per_label, "distance", DISTANCES, lambda s: s["per_sequence"])
    lines += ["### Distance moved: log-ratio per token", ""]
    lines += _table(per_label, "distance", DISTANCES, lambda s: s["per_token"])
    lines += ["![](plots/exploration_distance.png)", "", "### Diversity of the sampled candidates", ""]
    lines += _table(per_label, "diversity", WITHIN + ACROSS)
    lines += ["![](plots/exploration_diversity.png)", "", "### Reward coverage (training ranker)", ""]
    lines += _coverage_rows(per_label)
    return lines + ["![](plots/exploration_coverage.png)", ""]


def run_section(out: Path, data: dict, prompts: int | None = None) -> list[str]:
    """The section of a `selm run` report; puts its numbers in data["exploration"]."""
    from selm.config import load_saved_config

    cfg = load_saved_config(Path(out) / "config.yaml")
    ex = run_exploration(out, cfg, prompts)
    rows = summarize([ex], cfg.evaluate.bootstrap_samples)
    data["exploration"] = {"prompts_scored": ex["prompts_scored"], "per_iteration": rows}
    return section({"run": rows}, Path(out) / "plots", _with_cap(cfg, ex["prompts_scored"]), _kind(rows))


def _with_cap(cfg, cap: int):
    import dataclasses

    return dataclasses.replace(cfg, report=dataclasses.replace(cfg.report, exploration_prompts=cap))


def _kind(rows_lists) -> str:
    kinds = {r["coverage"]["beats_kind"] for r in rows_lists} - {"none"}
    return {"paired": "paired: the same prompts", "unpaired": "unpaired: the slices hold different prompts, so "
            "each prompt's best is compared with every iteration-1 prompt's best"}.get("/".join(sorted(kinds)),
                                                                                     "from iteration 2 on")


def study_section(out: Path, data: dict, prompts: int | None = None) -> list[str]:
    """The section of a demo or sweep report: per arm, seeds pooled; then each statistic against
    alpha at the last iteration, next to the gold reward. Puts its numbers in data["exploration"]."""
    from selm.studies.study import Arm, arm_config, load_study

    study = load_study(out)
    per_arm, cfg = {}, None
    for a in study["arms"]:
        runs = []
        for s in study["seeds"]:
            cfg = arm_config(study["base"], Arm(**a), s)
            run = study_run(out, a["name"], s)
            if (run / "config.yaml").is_file():
                runs.append(run_exploration(run, cfg, prompts))
        per_arm[a["name"]] = summarize(runs, cfg.evaluate.bootstrap_samples)
    cap = cfg.report.exploration_prompts if prompts is None else prompts
    data["exploration"] = {"prompts_scored": cap, "per_arm": per_arm}
    lines = section(per_arm, Path(out) / "plots", _with_cap(cfg, cap),
                    _kind([r for rows in per_arm.values() for r in rows]))
    return lines + _alpha_part(data, per_arm, Path(out) / "plots")


ALPHA = [("distance", "y0_vs_start", "per_sequence"), ("distance", "samples_vs_start", "per_sequence"),
         ("distance", "samples_vs_previous", "per_sequence"), ("diversity", "distinct_2", None),
         ("coverage", "best", None), ("coverage", "beats_start_best", None), ("coverage", "margin", None)]


def _alpha_part(data: dict, per_arm: dict[str, list[dict]], plots: Path) -> list[str]:
    """Each statistic at the last iteration against alpha, next to the mean gold reward."""
    T = data["iterations"]
    order = sorted((a for a in per_arm if len(per_arm[a]) >= T), key=lambda a: data["alphas"][a])
    if not order or T < 1:
        return []
    stat = lambda a, part, key, unit: (per_arm[a][T - 1][part][key][unit] if unit  # noqa: E731
                                       else per_arm[a][T - 1][part][key])
    gold = [data["per_arm"][a]["gold"][T] for a in order]
    head = ["arm", "alpha", "mean gold"] + [LABELS[k] for _, k, _ in ALPHA]
    lines = [f"### Alpha vs exploration (iteration {T})", "",
             "Each statistic of iteration T against alpha, next to the gold reward: where more exploration stops "
             "paying. (Iteration T's candidates were drawn from model T-1.)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, g in zip(order, gold):
        lines.append(f"| {a} | {data['alphas'][a]:g} | {format_interval(g)} | " + " | ".join(
            format_interval(stat(a, *p), p[1] in PCT) for p in ALPHA) + " |")
    plt = pyplot()
    made: list[str] = []
    fig, axes = plt.subplots(2, 4, figsize=(17, 6.6))
    xs = list(range(len(order)))
    for ax, (part, key, unit) in zip(axes.flat, [("gold", "gold", None)] + ALPHA):
        vals = gold if part == "gold" else [stat(a, part, key, unit) for a in order]
        errorbars(ax, xs, vals, key, 100 if key in PCT else 1)
        ax.set_xticks(xs, [f"{data['alphas'][a]:g}" for a in order])
        ax.set(xlabel="alpha", title="mean gold reward" if part == "gold" else LABELS[key] + (" (%)" if key in PCT else ""))
    figure_saver(plots, made)(fig, "exploration_alpha.png")
    return lines + ["", "![](plots/exploration_alpha.png)", ""]
