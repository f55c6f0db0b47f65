"""docs/EVIDENCE.md quotes the evidence study's saved report (docs/evidence/report.json) and nothing
else: its findings table and headline are what `selm report` prints from that file's numbers."""

import json
from pathlib import Path

from selm.studies.findings import findings_lines

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "EVIDENCE.md"
SAVED = ROOT / "docs" / "evidence" / "report.json"


def _report() -> dict:
    return json.loads(SAVED.read_text())


def test_the_findings_table_is_the_one_the_saved_report_gives():
    doc = DOC.read_text()
    rows = [line for line in findings_lines(_report()["findings"]) if line.startswith("| ")]
    assert len(rows) >= 8  # the four findings, the by-alpha rows and the extras
    missing = [r for r in rows if r not in doc]
    assert not missing, missing


def test_the_head_to_head_and_the_study_design_match_the_saved_report():
    r, doc = _report(), DOC.read_text()
    assert r["arms"] == ["selm", "dpo", "alpha_0.0001", "alpha_0.1"] and r["seeds"] == [0, 1, 2]
    assert r["iterations"] == 3
    last = r["head_to_head"][-1]
    quoted = f"{100 * last['mean']:.1f}% [{100 * last['ci95'][0]:.1f}, {100 * last['ci95'][1]:.1f}]"
    assert quoted in doc
    for arm, per in r["per_arm"].items():
        w = per["win_vs_start"][-1]
        assert f"{100 * w['mean']:.1f}% [{100 * w['ci95'][0]:.1f}, {100 * w['ci95'][1]:.1f}]" in doc, arm
    # The plots the document shows are committed next to the report.
    for name in [p.split("(")[1].rstrip(")") for p in doc.split() if p.startswith("![](")]:
        assert (DOC.parent / name).is_file(), name


def test_the_readme_points_to_the_evidence():
    assert "docs/EVIDENCE.md" in (ROOT / "README.md").read_text()


def _rederived_rows() -> list[str]:
    """The verdict rule (a t-interval over per-seed values, seeds - 1 df) applied to the saved report
    alone: each seed's values are its slice of the pooled per-arm gold lists (seeds in order, the same
    held-out prompts, sorted by id), and the per-seed implicit-reward means."""
    from selm.stats import mean, outcomes, sd, seed_t_interval
    from selm.studies.findings import HIGH_GOLD, side

    r = _report()
    T, seeds = r["iterations"], r["seeds"]

    def per_seed(arm, t):
        g = r["per_arm"][arm]["gold_all"][t]
        n = len(g) // len(seeds)
        assert n * len(seeds) == len(g)
        return [g[i * n:(i + 1) * n] for i in range(len(seeds))]

    def row(name, values, threshold, pct=False):
        lo, hi = seed_t_interval(values)
        k = 100 if pct else 1
        word = {1: "above", -1: "below", 0: "contains"}[side((lo, hi), threshold)]
        return (f"| {name} | {', '.join(f'{x * k:.3g}' for x in values)} | {mean(values) * k:.3g} "
                f"[{lo * k:.3g}, {hi * k:.3g}] | {word} {threshold * k:g} |")

    h2h = [mean(outcomes(a, b)) for a, b in zip(per_seed("selm", T), per_seed("dpo", T))]
    assert h2h == r["findings"]["extras"]["per_seed_head_to_head"]  # the slices are the seeds
    rows = [row("SELM over DPO, head to head (%)", h2h, 0.5, True)]
    rows += [row(f"{a} over the start model (%)", [mean(outcomes(x, y)) for x, y in zip(per_seed(a, T), per_seed(a, 0))],
                 0.5, True) for a in r["arms"]]
    high = lambda xs: mean([float(x >= HIGH_GOLD) for x in xs])  # noqa: E731
    for a in ("selm", "alpha_0.0001", "alpha_0.1"):
        pairs = list(zip(per_seed(a, T), per_seed("dpo", T)))
        rows.append(row(f"{a} - DPO, mean gold", [mean(x) - mean(y) for x, y in pairs], 0.0))
        rows.append(row(f"{a} - DPO, high-gold share (%)", [high(x) - high(y) for x, y in pairs], 0.0, True))
        rows.append(row(f"{a} - DPO, gold SD", [sd(x) - sd(y) for x, y in pairs], 0.0))
    rows.append(row("SELM gold, last - first iteration",
                    [mean(x) - mean(y) for x, y in zip(per_seed("selm", T), per_seed("selm", 1))], 0.0))
    m = r["implicit_rewards"]["means"]
    for kind in ("chosen", "rejected"):
        rows.append(row(f"SELM - DPO implicit reward, {kind}",
                        [m[f"selm/{s}/{T}"][kind] - m[f"dpo/{s}/{T}"][kind] for s in seeds], 0.0))
    return rows


def test_the_verdicts_re_derived_with_the_seed_t_interval_are_the_ones_quoted():
    rows, doc = _rederived_rows(), DOC.read_text()
    missing = [r for r in rows if r not in doc]
    assert not missing, missing
    # The negative control (alpha_0.0001) no longer differs from DPO; rewards no longer shift up clearly.
    assert "| alpha_0.0001 - DPO, mean gold | 0.175, 0.0437, 0.138 | 0.119 [-0.0493, 0.287] | contains 0 |" in rows
