"""examples/slurm/selm.sbatch launches `selm run` with the torchrun flags the two-node test runs
(tests/test_two_nodes.py): the script runs here with stand-ins for srun, scontrol and torchrun that
record what torchrun would be given on node 1 of a 3-node job."""

import os
import stat
import subprocess
from pathlib import Path

from test_two_nodes import torchrun_flags

SBATCH = Path(__file__).resolve().parents[1] / "examples" / "slurm" / "selm.sbatch"
STANDINS = {
    # srun: run the command once, as the task of this node (its options dropped).
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/bin/bash\n[ "$*" = "show hostnames gpu-[07-09]" ] && printf "gpu-07\\ngpu-08\\ngpu-09\\n"\n',
    "torchrun": '#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n',
}


def test_the_sbatch_script_runs_torchrun_with_the_two_node_tests_flags(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in STANDINS.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(stat.S_IRWXU)
    args = tmp_path / "args"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "ARGS_FILE": str(args),
           "SLURM_JOB_NODELIST": "gpu-[07-09]", "SLURM_NNODES": "3", "SLURM_NODEID": "1"}
    proc = subprocess.run(["bash", str(SBATCH), "cfg.yaml", "/shared/run", "--set", "loop.iterations=3"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = args.read_text().splitlines()
    assert got == [*torchrun_flags("gpu-07:29500", 1, nnodes=3, nproc_per_node=8),
                   "-m", "selm.cli", "run", "cfg.yaml", "--output-dir", "/shared/run", "--set", "loop.iterations=3"]


def test_the_sbatch_script_refuses_a_missing_run_folder_with_its_usage(tmp_path):
    proc = subprocess.run(["bash", str(SBATCH), "cfg.yaml"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "usage: sbatch [--nodes N] examples/slurm/selm.sbatch CONFIG.yaml RUN_DIR" in proc.stderr
