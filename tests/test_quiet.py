"""A quiet screen: a normal run prints no third-party warnings into its progress bars, redirected
output is whole lines without cursor codes, and `selm report` says what it is doing."""

import io
import os
import subprocess
import sys
from pathlib import Path

from selm.quiet import PlainLines

ROOT = Path(__file__).resolve().parents[1]


def _selm(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "selm.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_redraws_become_whole_lines():
    out = io.StringIO()
    s = PlainLines(out)
    for text in ("\rtrain:  50%| 1/2", "", "\rtrain: 100%| 2/2", "\x1b[A\n", "\rnested 1/1\x1b[A", "\n"):
        s.write(text)
        s.flush()  # a bar flushes after every redraw: no half line may come out of it
    assert out.getvalue() == "train:  50%| 1/2\ntrain: 100%| 2/2\nnested 1/1\n"


def test_a_lora_run_and_its_report_print_nothing_but_selm_lines(tmp_path):
    run = _selm("run", ROOT / "configs" / "tiny.yaml", "--output-dir", tmp_path / "run", "--set", "loop.iterations=1",
                "--set", "train.epochs=1", "--set", "train.lora.r=4", "--set", "train.gradient_checkpointing=true",
                "--set", "evaluate.bootstrap_samples=20")
    assert run.returncode == 0, run.stderr[-2000:]
    text = run.stdout + run.stderr
    assert "Setting accelerator to CPU" not in text and "Warning" not in text and "WARNING" not in text
    assert "\r" not in run.stderr and "\x1b[" not in run.stderr
    assert any(l.startswith("train (alpha=0.01): 100%|") for l in run.stderr.splitlines())
    report = _selm("report", tmp_path / "run")
    assert report.returncode == 0, report.stderr[-2000:]
    assert report.stderr.splitlines()[:2] == [f"report: 1/3 numbers from {tmp_path / 'run'}", "report: 2/3 plots"]
