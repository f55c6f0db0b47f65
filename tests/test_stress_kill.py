"""The random-time SIGKILL stress tool (tests/stress_kill_resume.py), with a small trial count: two
kills at random moments of a tiny run, then a re-run, must give every artifact of an uninterrupted
run. The fixed-point kills of test_loop.py miss what lands between stage boundaries; this does not."""

import subprocess
import sys
from pathlib import Path

import pytest

from test_loop import env


@pytest.mark.slow
def test_random_time_kills_then_rerun_equal_an_uninterrupted_run():
    tool = Path(__file__).with_name("stress_kill_resume.py")
    proc = subprocess.run([sys.executable, str(tool), "--trials", "2", "--seed", "1"], env=env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2/2 trials OK" in proc.stdout
