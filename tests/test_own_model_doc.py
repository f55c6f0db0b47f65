"""docs/your-own-model.md, as printed: its files are written and its commands run in order, with
the tiny model saved as `my_model`; the run, its status, its report and its extension by an
iteration do what the guide says."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "your-own-model.md"


def _blocks() -> tuple[dict[str, str], list[str]]:
    text = DOC.read_text()
    files = dict(re.findall(r"Save this as `([^`]+)`[^\n]*:\n\n```\w+\n(.*?)```", text, re.S))
    commands = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
                if line.strip()]
    return files, commands


def test_the_guide_runs_as_printed(tmp_path):
    from selm.tiny import save_tiny

    files, commands = _blocks()
    assert set(files) == {"my_prompts.jsonl", "myrank.py", "my.yaml"} and len(commands) == 4
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    save_tiny(tmp_path / "my_model", seed=0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = tmp_path / "runs" / "mine"
    outputs = []
    for command in commands:
        if "loop.iterations=3" in command:
            kept = {str(p.relative_to(run)): p.read_bytes() for p in run.glob("iter_[012]/*/DONE.json")}
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        outputs.append(proc.stdout)
    run_out, status_out, report_out, extend_out = outputs
    assert [l.split()[0] for l in run_out.splitlines()[:3]] == ["iteration=0", "iteration=1", "iteration=2"]
    assert "failed" not in status_out and "pending" not in status_out and "2 prompts" not in status_out
    assert (run / "report.md").is_file() and report_out.strip() == f"report: {Path('runs/mine/report.md')}"
    # The extension kept iterations 0..2 as they were and ran iteration 3 on the prompts left.
    assert {k: (run / k).read_bytes() for k in kept} == kept
    assert "iteration=3" in extend_out and (run / "iter_3" / "evaluate" / "DONE.json").is_file()
    slices = [{json.loads(l)["prompt_id"] for l in (run / "data" / f"train_{t}.jsonl").read_text().splitlines()}
              for t in (1, 2, 3)]
    held = {json.loads(l)["prompt_id"] for l in (run / "data" / "eval.jsonl").read_text().splitlines()}
    assert [len(s) for s in slices] == [2, 2, 2] and len(held) == 2
    assert len(set.union(*slices, held)) == 8  # disjoint: every prompt of the file used once
