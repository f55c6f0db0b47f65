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
