"""Two "nodes" on one machine: `torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 1` with a c10d
rendezvous, started twice, one shared run folder -- as a 2-node cluster job with a shared file system.
This is the check for every local-vs-global rank question: each process is LOCAL_RANK 0 of its node,
so a decision keyed on the local rank (who writes, who reads the state on disk) shows up here.

The pair counts of configs/tiny.yaml with these settings divide evenly among the ranks on every step
(an uneven last step hangs until the training engine pads it with zero-weight passes)."""

import subprocess
import time
from pathlib import Path

import pytest

from test_distributed import BIN, SETTINGS, TINY, assert_same_run, env, free_port, kill_tree, one_process  # noqa: F401

NODES = 2


def torchrun_flags(endpoint: str, node_rank: int, nnodes: int = NODES, nproc_per_node: int = 1) -> list[str]:
    """The launcher flags of one node; examples/slurm/selm.sbatch builds the same ones from Slurm
    (tests/test_slurm_example.py)."""
    return ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc_per_node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint]


def nodes(out: Path) -> list[subprocess.Popen]:
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = ["-m", "selm.cli", "run", str(TINY), "--output-dir", str(out), *SETTINGS, "--set", "train.batch_size=2"]
    return [subprocess.Popen([str(BIN / "torchrun"), *torchrun_flags(endpoint, i), *cmd], env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for i in range(NODES)]


def finish(procs: list[subprocess.Popen], timeout=900) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-4000:]
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    out = tmp_path_factory.mktemp("nodes") / "two"
    return out, finish(nodes(out))


@pytest.mark.slow
def test_two_nodes_equal_one_process(one_process, two_nodes):  # noqa: F811
    out, stdout = two_nodes
    assert_same_run(one_process, out)
    assert sum(s.count("run folder:") for s in stdout) == 1  # the global main rank alone reports
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("checkpoint"))


@pytest.mark.slow
def test_a_node_killed_mid_training_resumes_to_the_same_result(two_nodes, tmp_path):
    ref, _ = two_nodes
    out = tmp_path / "killed"
    train = out / "iter_1" / "train"
    procs = nodes(out)
    try:
        t0 = time.time()
        while not (train / "checkpoint" / "state.json").is_file():
            assert all(p.poll() is None for p in procs) and time.time() - t0 < 600, "ended before a checkpoint"
            time.sleep(0.02)
        kill_tree(procs[1])
        # The surviving node's rank fails at its next collective; its launcher then stops.
        procs[0].communicate(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    assert procs[0].returncode != 0 and not (train / "DONE.json").exists()
    finish(nodes(out))
    assert_same_run(ref, out)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("checkpoint"))
