"""Several runs of a study at once, one process per arm-seed run (`jobs` > 1).

Why processes: the stages run at one thread by default (docs/performance.md, "Threads": two threads
on a 2-core machine gain little and can lose much), so a one-process study leaves the other cores idle.
Runs are the unit of work (a seed would be too coarse: three seeds on two processes take two
rounds); an arm that shares its seed's first stages waits for them (study._run_arm). Each worker
writes its own progress to DIR/logs/<arm>_seed_<s>.log; the parent shows one bar counting finished
stages across the study.

A failure in one run stops the others at their next safe point (SIGTERM, as a scheduler would) and
is raised in the parent with its own message, so the command line prints the usual one line. Ctrl-C
or SIGTERM to the parent is passed on to each worker once, as the signal the parent got; the re-run
continues every seed where it stopped. Workers live in their own session, so a terminal's Ctrl-C
reaches only the parent (else a training worker would get two signals, the terminal's and the
parent's, and the second stops it at once, without its step's checkpoint), and each worker watches
its parent: if the parent dies without passing a signal on (SIGKILL, OOM killer), the worker stops
itself at its next safe point instead of running on unseen.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from pathlib import Path

from selm.io import is_done
from selm.layout import stage_dir

POLL_S = 2.0
PARENT_POLL_S = 1.0
# Memory one run may take at its peak, for --jobs auto: a demo run (SmolLM2-135M in fp32, AdamW
# states, a training step's activations) peaked at 5.3 GB.
RUN_MEMORY_BYTES = 6 * 2**30


def _cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a Slurm allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _available_memory() -> int | None:
    """Bytes of memory available to new processes, None where unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError, AttributeError):
        return None


def auto_jobs(runs: int) -> tuple[int, str]:
    """--jobs auto: (runs at once, why). One run per CPU core (each stage runs at its own thread
    count, one by default), no more than the study has runs or memory holds at RUN_MEMORY_BYTES a
    run; one on a machine with a CUDA GPU, where each run uses the GPUs itself."""
    import torch

    if torch.cuda.is_available():
        return 1, "a CUDA GPU: each run uses it"
    cores, mem = _cpu_cores(), _available_memory()
    by_memory = max(1, mem // RUN_MEMORY_BYTES) if mem is not None else cores
    jobs = max(1, min(cores, runs, by_memory))
    why = f"{cores} CPU core{'s' * (cores != 1)}, {runs} run{'s' * (runs != 1)}"
    if mem is not None:
        why += f", {mem / 2**30:.0f} GiB available at {RUN_MEMORY_BYTES // 2**30} GiB a run"
    return jobs, why


def done_stages(runs: list[tuple[Path, int]], analysis: bool = False) -> int:
    """Finished stages over the study's runs ((run folder, iterations) each), for the progress bar;
    with `analysis`, each run's analysis (its RUN/analysis done-marker) counts as one more."""
    n = 0
    for run, T in runs:
        n += analysis and is_done(run / "analysis")
        n += is_done(run / "iter_0" / "evaluate")
        n += sum(is_done(stage_dir(run, t, s)) for t in range(1, T + 1)
                 for s in ("generate", "rank", "pair", "train", "evaluate"))
    return n


def _worker(target, args: tuple, log: str, errors, callable_dirs: list) -> None:
    from selm import config, signals

    os.setsid()  # out of the terminal's process group: Ctrl-C reaches the parent only
    signals.install()
    _watch_parent(os.getppid())
    # Folders where config files' callables live (found when the parent read the configs).
    config.CALLABLE_DIRS[:] = callable_dirs
    # Progress bars and warnings of this seed go to its log, not into the parent's terminal.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        target(*args)
    except KeyboardInterrupt as e:
        name = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
        print(f"selm: stopped by {name}; re-running the study continues this run where it stopped", file=sys.stderr)
        raise SystemExit(1)
    except BaseException as e:  # noqa: BLE001 -- handed to the parent, which raises it
        errors.put((type(e).__module__, type(e).__name__, str(e)))
        raise SystemExit(1)


def _watch_parent(parent: int) -> None:
    """SIGTERM to this process (a stop at its next safe point) once `parent` is gone."""

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _rebuild(module: str, name: str, message: str) -> BaseException:
    """The worker's exception in the parent: same type where it can be rebuilt from its message
    (InputError, ConfigError, OSError subclasses lose their errno: they become RuntimeError)."""
    import importlib

    try:
        cls = getattr(importlib.import_module(module), name)
        if issubclass(cls, Exception) and not issubclass(cls, OSError):
            return cls(message)
    except Exception:  # noqa: BLE001
        pass
    return RuntimeError(f"{name}: {message}")


def run_tasks(target, task_args: list[tuple], logs: list[Path], jobs: int, *, progress=None) -> None:
    """Run ``target(*args)`` for each entry of `task_args` in its own spawned process, at most `jobs`
    at a time; `progress()` is called every POLL_S seconds while they run."""
    from selm.config import CALLABLE_DIRS

    ctx = mp.get_context("spawn")  # no fork of a process that may hold torch threads
    errors = ctx.Queue()
    waiting = list(zip(task_args, logs))
    running: list = []
    failure = None
    try:
        while waiting or running:
            while waiting and len(running) < jobs and failure is None:
                args, log = waiting.pop(0)
                Path(log).parent.mkdir(parents=True, exist_ok=True)
                p = ctx.Process(target=_worker, args=(target, args, str(log), errors, list(CALLABLE_DIRS)),
                                daemon=False)
                p.start()
                running.append(p)
            time.sleep(POLL_S)
            if progress:
                progress()
            for p in [p for p in running if not p.is_alive()]:
                running.remove(p)
                if p.exitcode != 0 and failure is None:
                    failure = p
                    waiting.clear()
                    _stop(running, signal.SIGTERM)
        if failure is not None:
            if not errors.empty():
                raise _rebuild(*errors.get())
            raise RuntimeError(f"a study worker exited with status {failure.exitcode}; see its log under logs/")
    except KeyboardInterrupt as e:
        # Pass on the signal the parent got (Ctrl-C: SIGINT); the workers report it as theirs.
        _stop(running, getattr(e, "signum", signal.SIGINT))
        raise


def _stop(procs: list, signum: int, timeout_s: float = 120.0) -> None:
    """Ask the workers to stop at their next safe point, wait, then kill what is left."""
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signum)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
