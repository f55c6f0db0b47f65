"""The paper's four findings, each tested on a study by a rule fixed before any run (docs/method.md,
"Findings and their rules"), plus what the paper does not report: length drift, answers cut off and
seed-to-seed variation. Also the alpha-vs-0 differences that the sweep headline states.

Every rule reads one interval: the 95% t-interval over the per-seed values of its statistic, with
seeds - 1 degrees of freedom (`decide`, the one rule the report's headlines also use), and only
whether it lies above, below or across its threshold. The seed is the unit that varies from run to
run, so the interval widens with few seeds; the bootstrap over seeds and prompts
(selm.stats.hierarchical_ci) is kept in report.json as "ci95" but decides nothing, because resampling
2 or 3 seeds cannot see their spread. With one seed there is no interval and every finding is
inconclusive:

1. SELM beats iterative DPO, head to head and vs the start model (gold win rates at the last
   iteration, ties half). Holds: both intervals above 50%. Does not hold: either below 50%.
2. A larger alpha concentrates the reward distribution in higher-reward regions (SELM arm vs alpha 0
   at the last iteration). Holds: SELM's share of high-gold answers (>= HIGH_GOLD) exceeds DPO's
   (difference interval above 0) and its spread (standard deviation of gold) is not larger
   (difference interval not above 0). Does not hold: the share difference is below 0 or the spread
   difference above 0.
3. Rewards shift up across iterations (SELM arm): the per-prompt gold at the last iteration minus at
   iteration 1. Holds: interval above 0. Does not hold: below 0.
4. SELM's implicit rewards exceed DPO's on held-out chosen and rejected responses (at the last
   iteration). Holds: both intervals above 0. Does not hold: either below 0.
Otherwise a finding is "inconclusive".
"""

from __future__ import annotations

from pathlib import Path

from selm.io import read_jsonl
from selm.layout import stage_dir, study_run
from selm.stats import hierarchical_ci, mean, outcomes, sd, seed_t_interval

HOLDS, FAILS, OPEN = "holds", "does not hold", "inconclusive"
# The demo task's "high gold": only an answer that breaks no rule can reach it (selm/studies/demo_task.py).
HIGH_GOLD = 0.5


def side(ci, threshold: float) -> int:
    """+1 if the interval lies above the threshold, -1 if below, 0 if it contains it."""
    lo, hi = ci
    if lo is None or hi is None:
        return 0
    return 1 if lo > threshold else -1 if hi < threshold else 0


def decide(s: dict, threshold: float) -> int | None:
    """The rule every verdict of a report uses (headline, sweep headline, findings): +1 if the 95%
    t-interval over per-seed values (`seed_ci95` of a summary) lies above `threshold`, -1 if below, 0
    if it contains it; None with fewer than two seeds (no interval)."""
    ci = s.get("seed_ci95") or [None, None]
    return None if ci[0] is None else side(ci, threshold)


def verdict(above: list[int], below_fails: bool = True) -> str:
    """Holds when every condition's interval is on its good side (+1); does not hold when any is on
    its bad side (-1); otherwise inconclusive."""
    if any(a < 0 for a in above) and below_fails:
        return FAILS
    return HOLDS if all(a > 0 for a in above) else OPEN


def eval_rows(run: Path, t: int) -> dict[str, dict] | None:
    """Iteration t's evaluation rows of a run folder, by prompt id (None before it is evaluated)."""
    p = stage_dir(run, t, "evaluate") / "generations.jsonl"
    return {r["prompt_id"]: r for r in read_jsonl(p)} if p.is_file() else None


def paired(out: Path, arm_a: str, t_a: int, arm_b: str, t_b: int, seeds: list[int], field: str = "gold") -> list[list]:
    """Per seed, the (a, b) values of `field` on the prompts both evaluations share."""
    groups = []
    for s in seeds:
        a, b = eval_rows(study_run(out, arm_a, s), t_a), eval_rows(study_run(out, arm_b, s), t_b)
        if a and b:
            ids = sorted(set(a) & set(b))
            groups.append([(a[i][field], b[i][field]) for i in ids])
    return groups


def summary(groups: list[list], samples: int, stat=None) -> dict:
    """The statistic over all groups pooled and its interval (None when there is no data)."""
    flat = [x for g in groups for x in g]
    if not flat:
        return {"value": None, "ci95": [None, None], "n": 0}
    f = stat or mean
    lo, hi = hierarchical_ci(groups, samples=samples, seed=0, stat=stat)
    per_seed = [f(g) for g in groups if g]
    return {"value": f(flat), "ci95": [lo, hi], "n": len(flat), "seeds": len(groups), "per_seed": per_seed,
            "seed_ci95": list(seed_t_interval(per_seed))}


def _diff_mean(pairs):
    return mean([a - b for a, b in pairs])


def _diff_sd(pairs):
    return sd([a for a, _ in pairs]) - sd([b for _, b in pairs])


def _diff_high(pairs):
    return mean([float(a >= HIGH_GOLD) - float(b >= HIGH_GOLD) for a, b in pairs])


def alpha_differences(out: Path, data: dict) -> dict[str, dict]:
    """Each arm vs the alpha-0 arm at the last iteration: mean gold, spread and high-gold share
    differences with intervals ({} without an alpha-0 arm)."""
    zero = [a for a in data["arms"] if data["alphas"][a] == 0]
    if not zero:
        return {}
    T, seeds, n = data["iterations"], data["seeds"], data["bootstrap_samples"]
    res = {}
    for arm in data["arms"]:
        if arm == zero[0]:
            continue
        g = paired(out, arm, T, zero[0], T, seeds)
        res[arm] = {"vs": zero[0], "alpha": data["alphas"][arm], "gold": summary(g, n, _diff_mean),
                    "sd": summary(g, n, _diff_sd), "high_share": summary(g, n, _diff_high)}
    return res


def _per_seed(groups: list[list]) -> list[float]:
    return [mean(outcomes([a for a, _ in g], [b for _, b in g])) for g in groups]


def findings(out: Path, data: dict) -> dict | None:
    """The four findings and the extras for a study with arms "selm" and "dpo" (else None)."""
    if not {"selm", "dpo"} <= set(data["arms"]):
        return None
    out, T, seeds, n = Path(out), data["iterations"], data["seeds"], data["bootstrap_samples"]
    win = lambda g: mean(outcomes([a for a, _ in g], [b for _, b in g]))  # noqa: E731
    h2h_g, start_g = paired(out, "selm", T, "dpo", T, seeds), paired(out, "selm", T, "selm", 0, seeds)
    h2h, vs_start = summary(h2h_g, n, win), summary(start_g, n, win)
    f1 = {"head_to_head": h2h, "selm_vs_start": vs_start,
          "verdict": verdict([decide(h2h, 0.5) or 0, decide(vs_start, 0.5) or 0])}
    diffs = alpha_differences(out, data)
    d = diffs.get("selm", {})
    share, spread = d.get("high_share", {"ci95": [None, None]}), d.get("sd", {"ci95": [None, None]})
    s_share, s_sd = decide(share, 0.0) or 0, decide(spread, 0.0) or 0
    f2 = {"high_share_diff": share, "sd_diff": spread, "by_alpha": diffs,
          "verdict": FAILS if s_share < 0 or s_sd > 0 else HOLDS if s_share > 0 and s_sd <= 0 else OPEN}
    shift = summary(paired(out, "selm", T, "selm", 1, seeds), n, _diff_mean) if T > 1 else summary([], n)
    f3 = {"gold_last_minus_first": shift, "verdict": verdict([decide(shift, 0.0) or 0])}
    ir = data.get("implicit_rewards", {}).get("diff") or []
    last = next((e for e in ir if e["iteration"] == T), None)
    if last:
        f4 = {"chosen": last["chosen"], "rejected": last["rejected"],
              "verdict": verdict([decide(last["chosen"], 0.0) or 0, decide(last["rejected"], 0.0) or 0])}
    else:
        f4 = {"verdict": OPEN, "note": "no implicit-reward analysis in this study folder"}
    extras = {
        "length_drift": {a: summary(paired(out, a, T, a, 0, seeds, "length_tokens"), n, _diff_mean) for a in data["arms"]},
        "cut_off": {a: data["per_arm"][a]["cut_off"][T] for a in data["arms"]},
        "per_seed_head_to_head": _per_seed(h2h_g),
        "per_seed_selm_vs_start": _per_seed(start_g),
    }
    extras["seed_sd_head_to_head"] = sd(extras["per_seed_head_to_head"]) if h2h_g else None
    return {"1_selm_beats_dpo": f1, "2_alpha_concentrates_rewards": f2, "3_rewards_shift_up": f3,
            "4_implicit_rewards_higher": f4, "extras": extras}


def _ci(s: dict, pct: bool = False, rate: bool = False) -> str:
    """"value [lo, hi]" with the interval that decides (the seeds' t-interval; "one seed" without one).
    A report saved before the t-interval rule has only the bootstrap "ci95", which it shows."""
    if s.get("value") is None and s.get("mean") is None:
        return "n/a"
    v = s["value"] if "value" in s else s["mean"]
    k, unit = (100, "%") if pct else (1, "")
    lo, hi = s["seed_ci95"] if "seed_ci95" in s else s["ci95"]
    if lo is None:
        return f"{v * k:.3g}{unit} [one seed: no interval]"
    if rate:  # a rate lies in [0, 100%]: shown within it, as the headline does (verdicts read it unclipped)
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return f"{v * k:.3g}{unit} [{lo * k:.3g}, {hi * k:.3g}]"


def findings_lines(f: dict | None) -> list[str]:
    """The report section: one row per finding with its statistic, interval and verdict."""
    if not f:
        return []
    f1, f2, f3, f4, ex = (f[k] for k in ("1_selm_beats_dpo", "2_alpha_concentrates_rewards", "3_rewards_shift_up",
                                         "4_implicit_rewards_higher", "extras"))
    rows = [
        ("1. SELM beats iterative DPO (head to head; SELM vs start)",
         f"{_ci(f1['head_to_head'], True, rate=True)}; {_ci(f1['selm_vs_start'], True, rate=True)}", f1["verdict"]),
        ("2. Larger alpha concentrates rewards (SELM - DPO: high-gold share; gold SD)",
         f"{_ci(f2['high_share_diff'], True)}; {_ci(f2['sd_diff'])}", f2["verdict"]),
        ("3. Rewards shift up across iterations (SELM gold, last - first iteration)",
         _ci(f3["gold_last_minus_first"]), f3["verdict"]),
        ("4. SELM's implicit rewards exceed DPO's (chosen; rejected)",
         f"{_ci(f4['chosen'])}; {_ci(f4['rejected'])}" if "chosen" in f4 else f4.get("note", "n/a"), f4["verdict"]),
    ]
    lines = ["## The paper's findings, tested", "",
             "Each rule was fixed before the run (docs/method.md): a finding holds when its 95% intervals lie on the "
             "predicted side, does not hold when one lies on the other side, and is inconclusive otherwise. The "
             "intervals are t-intervals over the per-seed values (seeds - 1 degrees of freedom), so that the "
             "seed-to-seed spread counts; with one seed there is none and every finding is inconclusive.", "",
             "| finding | statistic [95% interval] | verdict |", "|---|---|---|"]
    lines += [f"| {a} | {b} | **{c}** |" for a, b, c in rows]
    lines += ["", "By alpha (each arm minus alpha 0, last iteration):", "",
              "| arm | alpha | mean gold | high-gold share | gold SD |", "|---|---|---|---|---|"]
    for arm, d in sorted(f2["by_alpha"].items(), key=lambda kv: kv[1]["alpha"]):
        lines.append(f"| {arm} | {d['alpha']:g} | {_ci(d['gold'])} | {_ci(d['high_share'], True)} | {_ci(d['sd'])} |")
    lines += ["", "Not in the paper: length drift (evaluation answer length, last iteration minus the start, tokens), "
              "answers cut off at the last iteration, and seed-to-seed variation of the head-to-head win rate.", "",
              "| arm | length drift | cut off |", "|---|---|---|"]
    lines += [f"| {a} | {_ci(ex['length_drift'][a])} | {_ci(ex['cut_off'][a], True, rate=True)} |" for a in ex["length_drift"]]
    per_seed = ", ".join(f"{x * 100:.1f}%" for x in ex["per_seed_head_to_head"])
    lines += ["", f"Head-to-head win rate per seed: {per_seed or 'n/a'}"
              + (f" (SD {ex['seed_sd_head_to_head'] * 100:.1f} points)." if ex["seed_sd_head_to_head"] is not None else "."), ""]
    return lines


def sweep_headline(diffs: dict[str, dict]) -> str:
    """Whether any alpha differs from alpha 0 in mean gold, by the t-interval over seeds (`decide`)."""
    if not diffs:
        return ""
    if any(decide(d["gold"], 0.0) is None for d in diffs.values()):
        return (" No verdict on alpha: with one seed there is no interval over seeds, and one run cannot show how much "
                "another seed's would differ (docs/EVIDENCE.md); run two or more seeds.")
    differ = [f"{a} ({_ci(d['gold'])})" for a, d in diffs.items() if decide(d["gold"], 0.0) != 0]
    if not differ:
        return (" No alpha differs clearly from alpha 0 in mean gold at this size (every difference's 95% t-interval over "
                "seeds contains 0; docs/EVIDENCE.md).")
    return " Differs from alpha 0 in mean gold (difference, 95% t-interval over seeds): " + ", ".join(differ) + "."
