"""SIGTERM is handled like Ctrl-C: the run stops at a safe point (training: after the current
optimizer step, with a checkpoint), says how to resume, exits 128 + the signal (143, 130), and the
re-run equals an uninterrupted run."""

import json
import signal
import subprocess
import time

import pytest
import torch

from helpers_cli import message_lines
from test_loop import TINY, env, reference_run, rerun_equals_reference, selm_cmd  # noqa: F401 (fixture)


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
    rerun_equals_reference(out, ref)


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_command_maps_each_signal_to_its_status_and_says_how_to_resume(monkeypatch, capsys, signum, status):
    import os

    import selm.cli as cli

    def killed(args):  # the signal arrives while a command runs
        os.kill(os.getpid(), signum)
        time.sleep(5)
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(cli, "_dispatch", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["status", "x"]) == status
    err = message_lines(capsys.readouterr().err)
    assert err == [f"selm: stopped by {signal.Signals(signum).name}; re-run the same command to continue "
                   "(finished stages are kept; training resumes from its last checkpoint)"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back


def test_ctrl_c_in_training_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path, tiny_model_dir,
                                                                                       monkeypatch):
    import os

    from safetensors.torch import load_file

    import selm.stages.train as train_mod
    from selm import signals
    from selm.config import load_config
    from selm.io import atomic_write_jsonl

    pairs = tmp_path / "pairs.jsonl"
    atomic_write_jsonl(pairs, [{"prompt": f"q{i}", "chosen": "a good answer", "rejected": "no", "exploration": "hm"}
                               for i in range(8)])
    cfg = load_config(None, ["train.batch_size=2", "train.learning_rate=1e-2", "train.save_every_steps=3",
                             "train.tensorboard=false"])
    real, steps = train_mod.train_step, []

    def interrupted_at_step_2(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # mid-step: noted, acted on after the step
        return real(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(train_mod, "train_step", interrupted_at_step_2)
    previous = signals.install()
    try:
        with pytest.raises(signals.Interrupted):
            train_mod.run_train(cfg, pairs, tiny_model_dir, out)
    finally:
        signals.restore(previous)
    assert len(steps) == 2 and not (out / "DONE.json").exists()
    # Step 2 is off the every-3-steps schedule: the stop saved its own checkpoint there.
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(train_mod, "train_step", real)
    train_mod.run_train(cfg, pairs, tiny_model_dir, out)
    train_mod.run_train(cfg, pairs, tiny_model_dir, tmp_path / "clean")
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "clean" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# `selm study --jobs N`: one process per arm-seed run


def _study(spec, out):
    """`selm study` as a terminal starts it: its own process group, which a Ctrl-C signals as a whole."""
    return subprocess.Popen(selm_cmd("study", spec, "--jobs", "2", "--output-dir", out, "--set",
                                     "train.save_every_steps=100000", "--set", "train.epochs=120"),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait(proc, condition, limit=300):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None and time.time() - t0 < limit, "the study ended or stalled before the cue"
        time.sleep(0.01)


def _children(pid):
    from pathlib import Path

    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _steps(train):
    partial = train / "metrics.jsonl.partial"
    return partial.read_text().count("\n") if partial.is_file() else 0


@pytest.mark.slow
def test_a_study_stops_each_training_worker_after_its_step_on_ctrl_c_and_when_its_parent_dies(tmp_path):
    import os

    from test_loop import ROOT

    spec = tmp_path / "study.yaml"
    spec.write_text(f"config: {ROOT / 'configs' / 'tiny.yaml'}\nseeds: [0, 1]\narms: [{{name: dpo, set: [train.alpha=0]}}]\n")
    out = tmp_path / "out"
    trains = [out / "dpo" / f"seed_{s}" / "iter_1" / "train" for s in (0, 1)]

    # Ctrl-C at the terminal signals the whole foreground group. Each worker must get one signal (the
    # parent's), so training stops after its step with a checkpoint there (the scheduled saves are set
    # beyond the end); two signals (the terminal's, then the parent's) would stop it at once, unsaved.
    proc = _study(spec, out)
    _wait(proc, lambda: all(_steps(t) >= 1 for t in trains))
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    lines = message_lines(err)
    assert lines and lines[-1].startswith("selm: stopped by SIGINT; re-run the same command"), err[-2000:]
    for t in trains:
        assert not (t / "DONE.json").exists()
        step = json.loads((t / "checkpoint" / "state.json").read_text())["step"]
        assert 1 <= step <= _steps(t)
        assert "stopped by SIGINT" in (out / "logs" / f"dpo_{t.parents[1].name}.log").read_text()

    # The parent killed outright (SIGKILL, the OOM killer): its workers notice (within PARENT_POLL_S)
    # and stop at their next safe point, with a checkpoint, instead of running on unseen. (Training is
    # 360 steps here, so that it cannot finish within that poll even on an idle machine.)
    before = {t: json.loads((t / "checkpoint" / "state.json").read_text())["step"] for t in trains}
    proc = _study(spec, out)
    _wait(proc, lambda: len(_children(proc.pid)) >= 2 and all(_steps(t) > before[t] for t in trains))
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    t0 = time.time()
    while any(os.path.exists(f"/proc/{w}") for w in workers):
        assert time.time() - t0 < 120, "workers outlived their parent"
        time.sleep(0.2)
    for t in trains:
        assert not (t / "DONE.json").exists()
        assert json.loads((t / "checkpoint" / "state.json").read_text())["step"] > before[t]

    # And the study resumes to the end.
    proc = _study(spec, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert all((out / "dpo" / f"seed_{s}" / "DONE.json").exists() for s in (0, 1))
