"""Peak resident memory of selm's training stage on the demo's batch, in a clean subprocess.

    python benchmarks/memory.py [--model auto|smollm2|random-smollm2-135m|tiny|PATH] [--steps 3]
        [--batch-size 8] [--grad-accum 1] [--prompt-len 64] [--response-len 96] [--layout prefix] [--bf16]
        [--threads 1] [--set train.KEY=VALUE ...]

--model auto (the default) takes the demo model, a SmolLM2-135M safetensors folder under
~/.cache/selm/models/, and says so when it is missing and falls back to the tiny model (whose figure
says nothing about the target). random-smollm2-135m is a randomly initialised Llama of SmolLM2-135M's
shape (same parameter, optimizer and activation memory; byte tokenizer).

The child process runs ``selm.stages.train.run_train`` for --steps optimizer steps (max_steps, so the final
model save is not part of the figure) and reads its peak RSS (VmHWM in /proc/self/status) at three
points: after loading the model, after the reference log-prob pass, and at the end. VmHWM is reset
(/proc/self/clear_refs) after the reference pass so that the training phase has its own figure. The
overall peak is also read from the parent as the child's ru_maxrss. Target: <= 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_GB = 3.0


def vm_hwm() -> float:
    """Peak resident set size of this process so far, in bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return float("nan")


def vm_rss() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return float("nan")


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def child(spec: dict) -> dict:
    import selm.stages.train as tr
    import selm.training.reference as reference
    from selm.config import load_config

    marks: dict[str, float] = {}
    real_load, real_ref = tr.load_causal_lm, reference.reference_logps

    def load(*a, **k):
        model = real_load(*a, **k)
        marks.setdefault("after_load", vm_hwm())
        return model

    def ref(*a, **k):
        out = real_ref(*a, **k)
        marks["reference_pass"] = vm_hwm()
        marks["reset"] = reset_hwm()
        marks["rss_before_train"] = vm_rss()
        return out

    tr.load_causal_lm, reference.reference_logps = load, ref
    cfg = load_config(None, [
        f"train.batch_size={spec['batch_size']}", f"train.layout={spec['layout']}", f"train.bf16={str(spec['bf16']).lower()}",
        f"train.num_threads={spec['threads']}", "train.tensorboard=false", "train.alpha=0.001",
        f"train.max_length={spec['max_length']}", f"train.max_prompt_length={spec['max_prompt_length']}",
    ] + spec["overrides"])
    tr.run_train(cfg, Path(spec["pairs"]), Path(spec["model"]), Path(spec["out"]), max_steps=spec["steps"])
    marks["train_phase" if marks.get("reset") else "overall_in_child"] = vm_hwm()
    return marks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="auto", help="auto | smollm2 | random-smollm2-135m | tiny | a model folder")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=96)
    p.add_argument("--jitter", type=float, default=0.25)
    p.add_argument("--layout", choices=["prefix", "padded"], default="prefix")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE", help="extra config overrides")
    a = p.parse_args()

    from train_step import find_smollm2, make_pairs, resolve_model

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        name = a.model
        if name == "auto":
            if find_smollm2() is None:
                print("SmolLM2-135M is missing (no converted folder under ~/.cache/selm/models/): measuring the tiny "
                      "model instead; its figure says nothing about the 3 GB target (try --model random-smollm2-135m)")
                name = "tiny"
            else:
                name = "smollm2"
        model = resolve_model(name, tmp)
        from selm.models import load_tokenizer

        tok = load_tokenizer(model)
        pairs = tmp / "pairs.jsonl"
        make_pairs(tok, pairs, a.batch_size * a.grad_accum * (a.steps + 1), a.prompt_len, a.response_len, a.jitter, seed=0)
        longest = int(max(a.prompt_len, a.response_len) * (1 + a.jitter)) + 16
        spec = {"model": str(model), "pairs": str(pairs), "out": str(tmp / "train"), "steps": a.steps,
                "batch_size": a.batch_size, "layout": a.layout, "bf16": a.bf16, "threads": a.threads,
                "max_length": 2 * longest, "max_prompt_length": longest,
                "overrides": [f"train.grad_accum={a.grad_accum}"] + a.set}
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            sys.exit(f"child failed (exit {proc.returncode})")
        marks = json.loads(lines[-1][len("RESULT "):])
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        gb = lambda x: f"{x / 1e9:.2f} GB"
        print(f"model {name} ({model}); batch {a.batch_size} x {a.grad_accum} accumulated, prompt ~{a.prompt_len} / responses ~{a.response_len} "
              f"tokens, layout {a.layout}, {'bf16 autocast' if a.bf16 else 'fp32'}, {a.steps} steps, "
              f"overrides {a.set or 'none'}")
        print(f"  after model load        {gb(marks['after_load'])}")
        print(f"  reference pass (peak)   {gb(marks['reference_pass'])}")
        if "train_phase" in marks:
            print(f"  training steps (peak)   {gb(marks['train_phase'])}  (RSS at their start {gb(marks['rss_before_train'])})")
        print(f"peak RSS {gb(peak)} (target <= {TARGET_GB:g} GB: {'met' if peak <= TARGET_GB * 1e9 else 'MISSED'})")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
