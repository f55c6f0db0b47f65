"""SIGTERM is handled like Ctrl-C: the run stops at a safe point (training: after the current
optimizer step, with a checkpoint), says how to resume, exits 143, and the re-run equals an
uninterrupted run."""

import json
import signal
import subprocess
import time

import pytest

from helpers_cli import message_lines
from test_loop import TINY, _snapshot, env, reference_run, selm_cmd  # noqa: F401 (fixture)


def _term_when(out, condition, limit=300):
    """Start `selm run`, send SIGTERM once `condition(out)` holds; (exit status, stderr)."""
    proc = subprocess.Popen(selm_cmd("run", TINY, "--output-dir", out), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < limit:
        if condition(out):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=limit)
    return proc.returncode, err


def _training(out):
    partial = out / "iter_1" / "train" / "metrics.jsonl.partial"
    return partial.is_file() and partial.read_text().count("\n") >= 1


@pytest.mark.slow
def test_sigterm_stops_at_a_safe_point_and_the_rerun_equals_an_uninterrupted_run(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "run"
    rc, err = _term_when(out, _training)
    assert rc == 143, err[-2000:]
    lines = message_lines(err)
    assert lines[-1].startswith("selm: stopped by SIGTERM; re-run the same command to continue"), lines
    assert "Traceback" not in err
    train = out / "iter_1" / "train"
    assert not (train / "DONE.json").exists() and not (train / "model").exists()
    # Stopped after a whole optimizer step, with a checkpoint at that step (tiny.yaml saves every 2
    # steps; the stop saves one wherever it lands), and metrics up to it.
    step = json.loads((train / "checkpoint" / "state.json").read_text())["step"]
    rows = [json.loads(l) for l in (train / "metrics.jsonl.partial").read_text().splitlines()]
    assert step >= 1 and [r["step"] for r in rows][:step] == list(range(1, step + 1))

    # A second stop, outside training (iteration 2's generation), then the re-run to the end.
    rc, err = _term_when(out, lambda o: (o / "iter_2" / "generate").exists())
    assert rc in (0, 143), err[-2000:]
    proc = subprocess.run(selm_cmd("run", TINY, "--output-dir", out), env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _snapshot(ref), _snapshot(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("checkpoint"))
