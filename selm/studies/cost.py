"""Where a run's (or a study's) time went: per iteration, each stage's wall seconds (its DONE.json
"seconds"), the tokens it generated or trained, and tokens per second, so a user sees the cost of
a run before scaling it up. Read only from the stages' files; nothing is re-run.

Tokens generated: the generate stage's responses x mean response tokens (its DONE.json); the
evaluate stage's DONE.json "tokens" (older runs: the answers' re-tokenized lengths in
generations.jsonl). Tokens trained: the train stage's DONE.json "tokens" where it records them;
otherwise blank, and the rate is the optimizer steps' mean `tokens_per_s` from metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

from selm.io import DONE_MARKER, read_json, read_jsonl
from selm.layout import stage_dir
from selm.layout import STAGES


def _train_rate(stage: Path) -> float | None:
    """Mean tokens per second of the optimizer steps (metrics.jsonl), None without steps."""
    p = stage / "metrics.jsonl"
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return sum(rates) / len(rates) if rates else None


def stage_cost(stage: Path, name: str) -> dict | None:
    """One finished stage's seconds, tokens generated, tokens trained and tokens/s (None if not done)."""
    marker = stage / DONE_MARKER
    if not marker.is_file():
        return None
    done = read_json(marker)
    seconds = float(done.get("seconds") or 0.0)
    generated = trained = rate = None
    if name == "generate" and "responses" in done:
        generated = round(done["responses"] * done["response_tokens_mean"])
    elif name == "evaluate":
        generated = done.get("tokens")
        if generated is None and (stage / "generations.jsonl").is_file():
            generated = sum(r["length_tokens"] for r in read_jsonl(stage / "generations.jsonl"))
    elif name == "train":
        trained = done.get("tokens")
        rate = _train_rate(stage) if trained is None else None
    tokens = generated if generated is not None else trained
    if rate is None and tokens is not None and seconds > 0:
        rate = tokens / seconds
    return {"seconds": seconds, "generated": generated, "trained": trained, "tokens_per_s": rate,
            "_marker": marker.read_bytes()}


def cost_table(runs: list[Path], iterations: int) -> list[dict]:
    """Per iteration and stage, the cost summed over `runs`. A stage a study copied from another arm
    of the same seed (selm/studies/study.py: its DONE.json is byte-identical) is counted once."""
    rows = []
    for t in range(0, iterations + 1):
        for name in STAGES if t else ("evaluate",):
            seen, total = set(), {"iteration": t, "stage": name, "seconds": 0.0, "generated": None, "trained": None,
                                  "tokens_per_s": None, "runs": 0}
            rates = []
            for run in runs:
                c = stage_cost(stage_dir(run, t, name), name)
                if c is None or c["_marker"] in seen:
                    continue
                seen.add(c.pop("_marker"))
                total["runs"] += 1
                total["seconds"] += c["seconds"]
                for k in ("generated", "trained"):
                    if c[k] is not None:
                        total[k] = (total[k] or 0) + c[k]
                if c["tokens_per_s"] is not None:
                    rates.append((c["tokens_per_s"], c["seconds"]))
            if not total["runs"]:
                continue
            tokens = total["generated"] if total["generated"] is not None else total["trained"]
            if tokens is not None and total["seconds"] > 0:
                total["tokens_per_s"] = tokens / total["seconds"]
            elif rates:  # training without a token count: the steps' rate, weighted by each run's seconds
                total["tokens_per_s"] = sum(r * s for r, s in rates) / max(sum(s for _, s in rates), 1e-9)
            rows.append(total)
    return rows


def cost_lines(rows: list[dict]) -> list[str]:
    """The report section: one row per iteration and stage, and each iteration's total."""
    if not rows:
        return []
    total = sum(r["seconds"] for r in rows) or 1.0
    fmt = lambda v: "" if v is None else f"{v:,}"  # noqa: E731
    lines = ["## Where the time went", "",
             "Each stage's wall seconds (its `DONE.json`), summed over the runs (a stage copied from another arm "
             "counted once), with its share of all stages' time; tokens generated (sampling and evaluation answers) "
             "and trained; tokens/s is tokens over the stage's wall seconds, or for training without a recorded token "
             "count the optimizer steps' mean rate (`metrics.jsonl`). The report phase after the last stage is not "
             "included.", "",
             "| iteration | stage | runs | seconds | share | tokens generated | tokens trained | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for t in sorted({r["iteration"] for r in rows}):
        its = [r for r in rows if r["iteration"] == t]
        for r in its:
            rate = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
            lines.append(f"| {t} | {r['stage']} | {r['runs']} | {r['seconds']:.1f} | {r['seconds'] / total:.0%} | "
                         f"{fmt(r['generated'])} | {fmt(r['trained'])} | {rate} |")
        s = sum(r["seconds"] for r in its)
        lines.append(f"| {t} | **all stages** | | **{s:.1f}** | {s / total:.0%} | | | |")
    return lines + [""]
