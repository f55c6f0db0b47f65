"""scripts/gpu_check.sh on a machine without a CUDA GPU: a dry run that names every check it skipped
and exits 0 (the checks themselves need a GPU; docs/gpu-and-hub.md)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_a_gpu_is_a_dry_run_listing_every_check():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    names = [n for n, _ in gpu_check.CHECKS]
    assert names[:2] == ["versions", "inputs"] and {"memory_handoff", "zero3_loop", "resume_device"} <= set(names)
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[:-1] == [f"SKIP {n} (no CUDA GPU here)" for n in names]
    assert lines[-1] == f"gpu_check: dry run (no CUDA GPU here): {len(names)} checks skipped, none run"
    bad = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--only", "nope"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--only: unknown check(s) nope" in bad.stderr
