"""Stress check: SIGKILL `selm run` on configs/tiny.yaml twice at random times, re-run it to the
end, and compare every final artifact with an uninterrupted run. CI runs it with 2 trials
(tests/test_stress_kill.py); run more by hand:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python tests/stress_kill_resume.py [--trials 12] [--seed 0]

Prints one line per trial (OK or FAIL with what differed or was left behind); exits 1 on any FAIL.
tests/test_loop.py kills at fixed stage boundaries; this finds what lands between them (it found
the start model's temporary folder surviving a re-run).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import TINY, _snapshot, env, selm_cmd  # noqa: E402


def run(out: Path, kill_after: float | None = None) -> str:
    proc = subprocess.Popen(selm_cmd("run", TINY, "--output-dir", out), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        return f"killed at {kill_after:.1f}s"
    if proc.returncode:
        raise RuntimeError(err[-1500:])
    return "finished first"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        run(Path(tmp) / "ref")
        full = time.time() - t0
        ref = _snapshot(Path(tmp) / "ref")
        print(f"uninterrupted run: {full:.1f} s", flush=True)
        for trial in range(a.trials):
            out = Path(tmp) / f"trial{trial}"
            events = [run(out, rng.uniform(0.5, full)) for _ in range(2)]
            problem = ""
            try:
                run(out)
                snap = _snapshot(out)
                left = list(out.rglob("*.tmp")) + list(out.rglob("checkpoint"))
                if snap.keys() != ref.keys():
                    problem = f"artifacts differ: {sorted(set(snap) ^ set(ref))[:5]}"
                elif bad := [k for k in ref if ref[k] != snap[k]]:
                    problem = f"contents differ: {bad[:5]}"
                elif left:
                    problem = f"left behind: {[str(p.relative_to(out)) for p in left[:3]]}"
            except Exception as e:  # a failed re-run or an unreadable artifact
                problem = f"{type(e).__name__}: {e}"
            failed += bool(problem)
            print(trial, "FAIL" if problem else "OK", events, problem, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print(f"{a.trials - failed}/{a.trials} trials OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
