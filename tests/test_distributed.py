"""Several processes on CPU (gloo): the whole tiny loop under `torchrun --nproc_per_node 2` and under
`accelerate launch --config_file configs/accelerate/zero3.yaml` (DeepSpeed ZeRO-3) writes the same
files as one process with the same global batch, and a 2-process run killed with SIGKILL mid-training
resumes to the same result. Launchers pick a free rendezvous port; a distributed timeout of a few
minutes turns a hang into a failure."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent
# The tiny config trains with batch 4 in one process; two processes of batch 2 make the same
# global batch. Checkpoints every step exercise sharded saving and give a kill something to resume.
SETTINGS = ["--set", "train.save_every_steps=1"]
WEIGHT_TOL = dict(atol=5e-4, rtol=0)  # float sums in another order, carried through 2 iterations


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "DS_ACCELERATOR": "cpu", "SELM_DIST_TIMEOUT_MINUTES": "4",
            # DeepSpeed's CPU comm op, compiled once by the test set-up into this venv.
            "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args):
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "selm.cli", *map(str, args)]


def accelerate_zero3(*args, module="selm.cli"):
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "zero3.yaml"),
            "--num_processes", "2", "--main_process_port", str(free_port()), "-m", module, *map(str, args)]


def run(cmd, timeout=600):
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def files(out: Path) -> dict[str, Path]:
    """The run's record files (weights and metrics are compared with a tolerance, the rest exactly)."""
    keep = (".jsonl", ".json", ".safetensors")
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file() and p.suffix in keep
            and "tb" not in p.parts and p.name not in ("DONE.json", "ref_logps.safetensors", "environment.json")}


def metrics(p: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in p.read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys()
    for rel in fa:
        if rel.endswith(".safetensors"):
            wa, wb = load_file(fa[rel]), load_file(fb[rel])
            assert wa.keys() == wb.keys(), rel
            for k in wa:
                assert_close(wa[k], wb[k], **WEIGHT_TOL, msg=f"{rel}: {k}")
        elif rel.endswith("metrics.jsonl"):
            ma, mb = metrics(fa[rel]), metrics(fb[rel])
            assert [r["step"] for r in ma] == [r["step"] for r in mb], rel
            for ra, rb in zip(ma, mb):
                assert ra.keys() == rb.keys()
                for k in ra:
                    assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-4), f"{rel}: step {ra['step']} {k}"
        else:  # generations, scores, pairs, evaluations, stats: byte for byte
            assert fa[rel].read_bytes() == fb[rel].read_bytes(), rel


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "one"
    run([sys.executable, "-m", "selm.cli", "run", TINY, "--output-dir", out, *SETTINGS])
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "two"
    proc = run(torchrun("run", TINY, "--output-dir", out, *SETTINGS, "--set", "train.batch_size=2"))
    return out, proc


@pytest.mark.slow
def test_torchrun_loop_equals_one_process(one_process, two_processes):
    out, proc = two_processes
    assert_same_run(one_process, out)
    # The main rank alone reports; the run folder is complete and says so.
    assert proc.stdout.count("run folder:") == 1
    assert [e["processes"] for e in json.loads((out / "environment.json").read_text())] == [2]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("checkpoint"))
    status = run([sys.executable, "-m", "selm.cli", "status", out]).stdout
    assert "run " in status and "done" in status.splitlines()[-1] and "pending" not in status


@pytest.mark.slow
def test_zero3_loop_equals_one_process(one_process, tmp_path):
    import deepspeed  # noqa: F401 -- installed by the test set-up: a missing one fails, never skips

    out = tmp_path / "zero3"
    run(accelerate_zero3("run", TINY, "--output-dir", out, *SETTINGS, "--set", "train.batch_size=2"))
    assert_same_run(one_process, out)
    # Each iteration's model is one consolidated safetensors folder (the 16-bit gather), loadable as is.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "iter_2" / "train" / "model")
    assert sum(p.numel() for p in model.parameters()) > 10_000


def _kill_when(cmd, condition, limit=300, extra_env=None) -> bool:
    """Start a launcher and SIGKILL it and every process under it once `condition()`. The ranks are
    killed by id: torchrun starts each worker in a session of its own, out of the launcher's
    process group."""
    proc = subprocess.Popen(cmd, env={**env(), **(extra_env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < limit:
            if condition():
                kill_tree(proc)
                return True
            time.sleep(0.02)
        return False
    finally:
        if proc.poll() is None:
            kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it, by id."""
    import psutil

    tree = [psutil.Process(proc.pid)]
    tree += tree[0].children(recursive=True)
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.communicate()
    # The ranks are not our children: wait until they are gone before anything is relaunched.
    psutil.wait_procs(tree[1:], timeout=30)


@pytest.mark.slow
def test_two_process_run_killed_mid_training_resumes_to_the_same_result(two_processes, tmp_path):
    ref, _ = two_processes
    out = tmp_path / "killed"
    cmd = torchrun("run", TINY, "--output-dir", out, *SETTINGS, "--set", "train.batch_size=2")
    train = out / "iter_1" / "train"
    killed = _kill_when(cmd, lambda: (train / "checkpoint" / "state.json").is_file())
    assert killed and not (train / "DONE.json").exists()  # stopped mid-training, a checkpoint saved
    run(torchrun("run", TINY, "--output-dir", out, *SETTINGS, "--set", "train.batch_size=2"))
    assert_same_run(ref, out)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("checkpoint"))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_one_step_and_the_rerun_equals_the_uninterrupted(
        two_processes, tmp_path):
    """As a cluster scheduler stops a job: SIGTERM to the launcher alone. torchrun passes it on to the
    ranks (and SIGKILLs them 30 s later); they finish the current step, save one checkpoint there and
    stop together."""
    import psutil

    ref, _ = two_processes
    out = tmp_path / "termed"
    cmd = torchrun("run", TINY, "--output-dir", out, *SETTINGS, "--set", "train.batch_size=2",
                   "--set", "train.save_every_steps=3")  # a stop between scheduled saves saves its own
    train = out / "iter_1" / "train"
    partial = train / "metrics.jsonl.partial"
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        t0 = time.time()
        while not (partial.is_file() and partial.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.time() - t0 < 300, "the run ended before training"
            time.sleep(0.01)
        ranks = psutil.Process(proc.pid).children(recursive=True)
        t_signal = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        gone, alive = psutil.wait_procs(ranks, timeout=60)
        took = time.time() - t_signal
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not alive and took < 60, (took, alive)
    assert proc.returncode != 0
    # Each rank stopped by itself at a safe point (not SIGKILLed by the launcher after its grace period).
    assert err.count("selm: stopped by SIGTERM") == 2, err[-3000:]
    assert not (train / "DONE.json").exists() and not (train / "model").exists()
    step = json.loads((train / "checkpoint" / "state.json").read_text())["step"]
    logged = [json.loads(line)["step"] for line in partial.read_text().splitlines()]
    assert logged == list(range(1, step + 1)), (logged, step)  # saved at the last step taken, not before
    done = [p.parent for p in out.rglob("DONE.json")]
    assert all(p.parent.name != "iter_1" or p.name in ("generate", "rank", "pair") for p in done), done
    run(torchrun("run", TINY, "--output-dir", out, *SETTINGS, "--set", "train.batch_size=2",
                 "--set", "train.save_every_steps=3"))
    assert_same_run(ref, out)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("checkpoint"))


@pytest.mark.slow
def test_zero3_training_killed_mid_way_resumes_from_its_sharded_checkpoint(one_process, tmp_path):
    import deepspeed  # noqa: F401 -- installed by the test set-up

    pairs = one_process / "iter_1" / "pair" / "pairs.jsonl"
    args = ["train", "--pairs", pairs, "--set", "train.batch_size=2", "--set", "train.epochs=4",
            "--set", "train.save_every_steps=1", "--set", "train.learning_rate=5e-3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(accelerate_zero3(*args, "--output-dir", full))
    assert _kill_when(accelerate_zero3(*args, "--output-dir", killed),
                      lambda: (killed / "checkpoint" / "state.json").is_file())
    assert not (killed / "DONE.json").exists()
    # The engine's own shards: one optimizer-state file per process.
    shards = list((killed / "checkpoint").rglob("*optim_states.pt"))
    assert len(shards) == 2, sorted(p.name for p in (killed / "checkpoint").rglob("*"))
    run(accelerate_zero3(*args, "--output-dir", killed))
    a, b = load_file(full / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    for k in a:
        assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    assert metrics(full / "metrics.jsonl") == metrics(killed / "metrics.jsonl")


@pytest.mark.slow
def test_zero3_stops_on_a_nan_loss_naming_the_step_the_term_and_the_pair(tmp_path):
    """DeepSpeed takes its optimizer step inside the backward pass and, with fp16, skips overflowing
    steps by itself; neither may hide a NaN: the run stops as the one-process path does
    (tests/test_nonfinite.py), here with the NaN on one rank only."""
    import deepspeed  # noqa: F401 -- installed by the test set-up

    from selm.config import load_config
    from selm.io import atomic_write_jsonl
    from selm.training.plan import StepPlan, micro_batches
    from test_nonfinite import PAIRS

    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    atomic_write_jsonl(pairs, PAIRS)
    sets = ["train.batch_size=2", "train.save_every_steps=1", "train.tensorboard=false"]
    cmd = accelerate_zero3("explore", "train", "--pairs", pairs, "--output-dir", out,
                           *[a for s in sets for a in ("--set", s)], module="poisoned_cli")
    proc = subprocess.run(cmd, env={**env(), "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])},
                          capture_output=True, text=True, timeout=600)
    tc = load_config(None, [f"{s}" for s in sets]).train
    bad = micro_batches(StepPlan.build(len(PAIRS), tc, 0, 2).steps[1], 0, 2, tc.batch_size)[0][1]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("selm: error")]
    assert lines, proc.stderr[-4000:]
    assert f"optimizer step 2 of 2: NaN or infinity in loss/explore of pairs [{bad}]" in lines[0], lines
    assert f"prompt_ids 'p{bad}'" in lines[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl.partial").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["loss/explore"] != rows[-1]["loss/explore"]  # NaN
    assert not (out / "model").exists() and not (out / "DONE.json").exists() and not (out / "checkpoint").exists()


def test_fsdp_without_a_launcher_is_refused_with_a_clear_line(one_process, tmp_path):
    pairs = one_process / "iter_1" / "pair" / "pairs.jsonl"
    proc = subprocess.run([sys.executable, "-m", "selm.cli", "train", "--pairs", pairs, "--output-dir", tmp_path / "f"],
                          env={**env(), "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a launcher" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "f" / "DONE.json").exists()


@pytest.mark.slow
def test_fsdp2_loop_killed_mid_training_resumes_from_its_sharded_checkpoint_to_one_process_result(one_process, tmp_path):
    """FSDP2 on CPUs under torchrun (selm shards each decoder layer, then the root): SIGKILL once a
    sharded checkpoint exists, relaunch, and the whole loop equals one process with the same global
    batch; every model folder is a plain Hugging Face folder."""
    out = tmp_path / "fsdp"
    fsdp_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    cmd = torchrun("run", TINY, "--output-dir", out, *SETTINGS, "--set", "train.batch_size=2")
    train = out / "iter_1" / "train"
    killed = _kill_when(cmd, lambda: (train / "checkpoint" / "state.json").is_file(), extra_env=fsdp_env)
    assert killed and not (train / "DONE.json").exists()
    assert list((train / "checkpoint").glob("*.distcp"))  # the engine's own shards
    proc = subprocess.run(cmd, env={**env(), **fsdp_env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(one_process, out)
    assert json.loads((train / "DONE.json").read_text())["engine"] == "fsdp2"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "iter_2" / "train" / "model") is not None


@pytest.mark.slow
def test_lora_under_ddp_killed_mid_training_resumes_to_the_same_result(tmp_path):
    from selm.io import atomic_write_jsonl
    from test_train import PAIRS

    pairs = tmp_path / "pairs.jsonl"
    atomic_write_jsonl(pairs, PAIRS)
    # Dropout on: each process's own random stream must come back on resume.
    args = ["train", "--pairs", pairs, "--set", "train.batch_size=2", "--set", "train.epochs=3",
            "--set", "train.save_every_steps=1", "--set", "train.learning_rate=5e-3", "--set", "train.lora.r=4",
            "--set", "train.lora.dropout=0.2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(torchrun(*args, "--output-dir", full))
    assert _kill_when(torchrun(*args, "--output-dir", killed), lambda: (killed / "checkpoint" / "state.json").is_file())
    assert not (killed / "DONE.json").exists()
    run(torchrun(*args, "--output-dir", killed))
    a, b = load_file(full / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    for k in a:
        assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    assert metrics(full / "metrics.jsonl") == metrics(killed / "metrics.jsonl")
    assert json.loads((full / "DONE.json").read_text())["trainable_parameters"] == 8192  # r=4 adapters only


def test_lora_under_zero3_is_refused_with_a_clear_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "exploration": "d"}) + "\n")
    # What `accelerate launch --config_file configs/accelerate/zero3.yaml` sets for each process.
    proc = subprocess.run([sys.executable, "-m", "selm.cli", "train", "--pairs", pairs, "--output-dir", tmp_path / "z",
                           "--set", "train.lora.r=4"], env={**env(), "ACCELERATE_USE_DEEPSPEED": "true"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "train.lora.r (--lora-r): LoRA is not supported under ZeRO-3/FSDP" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "z" / "DONE.json").exists()


@pytest.mark.slow
def test_zero3_loop_ranks_with_a_reward_model_loaded_whole_after_training(tmp_path):
    """Iteration 2's rank stage runs in the processes that just trained under ZeRO-3 (transformers'
    DeepSpeed setting is then on, and a plain load would partition the reward model's weights): the
    ranker loads whole, and its scores equal those of the same model in a fresh process."""
    import deepspeed  # noqa: F401 -- installed by the test set-up

    from selm.config import RankConfig
    from selm.engines.registry import build_ranker
    from selm.io import read_jsonl
    from test_rankers import _save_reward_model

    rm = _save_reward_model(tmp_path / "rm", None)
    out = tmp_path / "run"
    run(accelerate_zero3("run", TINY, "--output-dir", out, "--set", "train.batch_size=2", "--set", "evaluate.enabled=false",
                         "--set", "rank.kind=reward_model", "--set", f"rank.model={rm}"))
    rows = read_jsonl(out / "iter_2" / "rank" / "scores.jsonl")
    assert rows and (out / "iter_2" / "rank" / "DONE.json").is_file()
    with build_ranker(RankConfig(kind="reward_model", model=str(rm))) as ranker:
        fresh = ranker.score([r["prompt"] for r in rows], [r["candidates"] for r in rows])
    for r, f in zip(rows, fresh):
        assert r["scores"] == pytest.approx(f, abs=1e-5)
