"""`--jobs auto` for demo, sweep and study: one run per CPU core, within the study's run count and
what memory holds, one on a CUDA machine; and the flag's parsing."""

import pytest

from selm.studies import parallel


@pytest.fixture
def machine(monkeypatch):
    """Set the cores, available memory (GiB) and CUDA that auto_jobs sees."""
    import torch

    def set_(cores, gib, cuda=False):
        monkeypatch.setattr(parallel, "_cpu_cores", lambda: cores)
        monkeypatch.setattr(parallel, "_available_memory", lambda: None if gib is None else int(gib * 2**30))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    return set_


@pytest.mark.parametrize("cores, gib, runs, expected", [
    (2, 22, 4, 2),    # this VM: one run per core
    (8, 64, 4, 4),    # no more jobs than runs
    (8, 13, 8, 2),    # memory: 13 GiB holds two runs at 6 GiB
    (4, 5, 4, 1),     # under one run's worth of memory: still one
    (1, 22, 4, 1),
    (16, None, 4, 4),  # memory unknown: cores and runs decide
])
def test_auto_jobs(machine, cores, gib, runs, expected):
    machine(cores, gib)
    jobs, why = parallel.auto_jobs(runs)
    assert jobs == expected
    assert f"{cores} CPU core" in why and f"{runs} runs" in why


def test_auto_jobs_is_one_with_a_cuda_gpu(machine):
    machine(32, 256, cuda=True)
    assert parallel.auto_jobs(8) == (1, "a CUDA GPU: each run uses it")


def test_the_cores_are_the_affinity_mask():
    import os

    if hasattr(os, "sched_getaffinity"):
        assert parallel._cpu_cores() == len(os.sched_getaffinity(0))
    mem = parallel._available_memory()
    assert mem is None or mem > 0


def test_jobs_flag(capsys):
    from selm.cli import build_parser, main

    p = build_parser()
    assert p.parse_args(["demo"]).jobs is None  # auto by default
    assert p.parse_args(["demo", "--jobs", "auto"]).jobs is None
    assert p.parse_args(["sweep", "--jobs", "3"]).jobs == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as e:
            main(["study", "--preset", "evidence", "--jobs", bad])
        assert e.value.code == 2
        assert f"--jobs: expected a positive integer or auto, got '{bad}'" in capsys.readouterr().err


def test_a_study_says_how_many_runs_it_runs_at_once(tmp_path, capsys, machine, monkeypatch):
    """jobs=None (the command line's auto) is resolved before any run starts and said in one line."""
    from pathlib import Path

    from selm.config import load_yaml, resolve_relative_paths
    from selm.studies.study import Arm, run_study

    machine(2, 22)
    jobs_used = []
    monkeypatch.setattr(parallel, "run_tasks", lambda target, task_args, logs, jobs, progress=None: jobs_used.append(jobs))
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    base = resolve_relative_paths(load_yaml(tiny), tiny.parent)
    run_study(base, tmp_path / "s", [Arm("a", []), Arm("b", ["train.alpha=0"])], [0, 1], jobs=None)
    assert jobs_used == [2]
    assert "selm: 2 runs at a time (--jobs auto: 2 CPU cores, 4 runs, 22 GiB available at 6 GiB a run)" in \
        capsys.readouterr().out
