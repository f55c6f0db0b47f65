"""The GPU check kit: what a CPU cannot show about selm's GPU paths, on one CUDA GPU in under 9 minutes.

    scripts/gpu_check.sh            # or: python scripts/gpu_check.py [--workdir DIR] [--only NAME ...]

Each check prints one line, PASS or FAIL with what it measured, then a summary; the exit status is
1 if any check failed. Without a CUDA GPU it is a dry run: it lists the checks it skipped and exits
0 (CI runs it that way). The checks, in order (each builds on the inputs of the first):

  versions        torch/transformers/accelerate/deepspeed/vllm versions; bf16 support; accelerate >= 1.8
  inputs          locally built models: a tiny Llama with head_dim 64 (vLLM's minimum), a random
                  ~0.8B Llama, a tiny PairRM; 40 pairs from the packaged tiny prompts
  cuda_train      `selm train` in this process on the ~0.8B model: bf16, gradient checkpointing,
                  grad_accum 2; finite metrics; peak GPU memory
  memory_handoff  right after that training, in the same process: what the GPU still holds, then a
                  vLLM engine at gpu_memory_utilization 0.9 must start and generate (finding 1)
  zero3_loop      `accelerate launch` ZeRO-3, 1 process: 2 iterations with vLLM, PairRM, bf16,
                  grad_accum 2, gradient checkpointing; no DeepSpeed autocast warning or assertion
                  (finding 2); the learning-rate trace equals a plain run's (one optimizer step
                  per step: finding 4); iteration 2's vLLM starts after ZeRO-3 training (finding 1)
  fsdp2_train     `accelerate launch` FSDP2, 1 process: training finishes with finite metrics
  pairrm_fp16     PairRM fp16 on the GPU against fp32 on the CPU: finite, same ranking
  resume_device   a checkpoint's optimizer state loads onto the CPU, not cuda:0 (finding 5)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS: list[tuple[str, object]] = []


def check(name: str):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


class Failed(Exception):
    """A check's finding (its message is the FAIL line)."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


def selm(*args: str, launcher: list[str] | None = None, env: dict | None = None, timeout: int = 240
         ) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "selm.cli", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def metrics(train_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def finite_losses(rows: list[dict]) -> bool:
    return bool(rows) and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


# --------------------------------------------------------------------------------------------
# The checks. `w` holds what earlier checks built (paths, results).


@check("versions")
def versions(w: dict) -> str:
    import importlib.metadata as md

    import torch

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    from packaging.version import Version

    found = {n: v(n) for n in ("torch", "transformers", "accelerate", "deepspeed", "vllm")}
    gpu = torch.cuda.get_device_name(0)
    w["bf16"] = torch.cuda.is_bf16_supported()
    expect(found["accelerate"] != "absent" and Version(found["accelerate"]) >= Version("1.8"),
           f"accelerate {found['accelerate']} < 1.8 steps DeepSpeed's optimizer every micro-batch")
    expect(found["vllm"] != "absent", "vllm is not installed (pip install 'selm[vllm]')")
    return f"{gpu}; bf16 {'yes' if w['bf16'] else 'no'}; " + ", ".join(f"{k} {x}" for k, x in found.items())


@check("inputs")
def inputs(w: dict) -> str:
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers_pairrm import save_tiny_pairrm  # tests/: a tiny PairRM checkpoint built locally
    from selm.tiny import build_tiny_tokenizer, save_tiny

    d = w["dir"]
    w["tiny64"] = save_tiny(d / "tiny64", seed=0, num_heads=1, num_kv_heads=1)
    w["pairrm"] = save_tiny_pairrm(d / "pairrm")
    tok = build_tiny_tokenizer()
    big = d / "llama-0.8b"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(big, safe_serialization=True)
    tok.save_pretrained(big)
    w["big"] = big
    n_params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "selm/data/tiny_prompts.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    words = "the a model answer helpful short long reason step because so then".split()
    pairs = [{"prompt_id": f"p{i}", "prompt": prompts[i % len(prompts)],
              "chosen": " ".join(rng.choices(words, k=30)), "rejected": " ".join(rng.choices(words, k=20)),
              "exploration": " ".join(rng.choices(words, k=25))} for i in range(40)]
    w["pairs"] = d / "pairs.jsonl"
    w["pairs"].write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return f"tiny64, PairRM, a random Llama of {n_params / 1e9:.2f}B parameters, {len(pairs)} pairs"


TRAIN_SETTINGS = ["train.bf16=true", "train.gradient_checkpointing=true", "train.grad_accum=2", "train.batch_size=4",
                  "train.max_length=256", "train.max_prompt_length=128",
                  "train.learning_rate=1e-6", "train.alpha=0.001", "train.beta=0.1"]


@check("cuda_train")
def cuda_train(w: dict) -> str:
    import torch

    from selm.config import load_config
    from selm.stages.train import run_train

    cfg = load_config(None, [f"model.name_or_path={w['big']}"] + TRAIN_SETTINGS)
    out = w["dir"] / "cuda_train"
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = run_train(cfg, w["pairs"], w["big"], out)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    rows = metrics(out)
    w["cuda_train_dir"] = out
    expect(finite_losses(rows), f"non-finite loss in {out / 'metrics.jsonl'}")
    expect((out / "model" / "config.json").is_file(), "no model/ saved")
    return f"{summary['steps']} steps in {seconds:.0f} s, peak {peak:.1f} GiB allocated, final loss {rows[-1]['loss']:.4f}"


@check("memory_handoff")
def memory_handoff(w: dict) -> str:
    import torch

    from selm.engines.sampling import SamplingParams
    from selm.engines.vllm_backend import VLLMGenerator

    reserved = torch.cuda.memory_reserved() / 2**30  # what training left cached in this process
    free, total = torch.cuda.mem_get_info()
    gen = VLLMGenerator(w["cuda_train_dir"] / "model", dtype="bfloat16", gpu_memory_utilization=0.9,
                        enforce_eager=True)
    out = gen.generate([[{"role": "user", "content": "hello"}]] * 4,
                       SamplingParams(num_samples=0, include_greedy=True, max_new_tokens=8))
    expect(len(out) == 4, "the engine returned no responses")
    expect(reserved < 1.0, f"training left {reserved:.1f} GiB reserved in this process (free memory at its end: "
                           "run_train should release it)")
    return f"after training: {reserved:.2f} GiB still reserved, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free; vLLM started"


def _lr_trace(train_dir: Path) -> list[float]:
    return [r["lr"] for r in metrics(train_dir) if "lr" in r]


@check("zero3_loop")
def zero3_loop(w: dict) -> str:
    out = w["dir"] / "zero3"
    sets = [f"model.name_or_path={w['tiny64']}", "generate.backend=vllm", "generate.vllm_enforce_eager=true",
            "rank.kind=pairrm", f"rank.model={w['pairrm']}", "loop.iterations=2",
            "train.save_every_steps=1"] + TRAIN_SETTINGS
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs/accelerate/zero3.yaml"), "--num_processes", "1"]
    proc = selm("run", str(ROOT / "configs/tiny.yaml"), "--output-dir", str(out),
                *[a for s in sets for a in ("--set", s)], launcher=launcher, timeout=300)
    (w["dir"] / "zero3.stderr").write_text(proc.stderr)
    expect(proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]} "
                                 f"(full stderr: {w['dir'] / 'zero3.stderr'})")
    autocast = [line for line in proc.stderr.splitlines() if "autocast" in line.lower()]
    expect(not any("AssertionError" in line for line in proc.stderr.splitlines()), "DeepSpeed asserted on autocast")
    expect(not autocast, f"DeepSpeed's autocast message (bf16 off inside the engine?): {autocast[0][:200]}")
    # The same pairs, trained without DeepSpeed: the learning-rate traces must agree step for step.
    plain = w["dir"] / "zero3_plain"
    ref = selm("train", str(ROOT / "configs/tiny.yaml"), "--pairs", str(out / "iter_1/pair/pairs.jsonl"),
               "--model", str(w["tiny64"]), "--output-dir", str(plain), *[a for s in TRAIN_SETTINGS for a in ("--set", s)])
    expect(ref.returncode == 0, f"plain reference run failed: {ref.stderr.strip().splitlines()[-1:]}")
    z3, base = _lr_trace(out / "iter_1/train"), _lr_trace(plain)
    expect(len(z3) == len(base) and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(z3, base)),
           f"learning-rate traces differ (ZeRO-3 {z3[:4]}..., plain {base[:4]}...): extra optimizer steps?")
    expect(finite_losses(metrics(out / "iter_2/train")), "iteration 2 has non-finite losses")
    return f"2 iterations; {len(z3)} optimizer steps in iteration 1, learning rates equal to a plain run's"


@check("fsdp2_train")
def fsdp2_train(w: dict) -> str:
    out = w["dir"] / "fsdp2"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs/accelerate/fsdp2.yaml"), "--num_processes", "1"]
    proc = selm("train", "--pairs", str(w["pairs"]), "--model", str(w["big"]), "--output-dir", str(out),
                *[a for s in TRAIN_SETTINGS for a in ("--set", s)], launcher=launcher, timeout=240)
    (w["dir"] / "fsdp2.stderr").write_text(proc.stderr)
    expect(proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    rows = metrics(out)
    expect(finite_losses(rows), "non-finite loss")
    norms = [r.get("grad_norm") for r in rows]
    return f"{len(rows)} steps, grad norms {norms[:3]} (compare with cuda_train's for the partial-norm finding)"


@check("pairrm_fp16")
def pairrm_fp16(w: dict) -> str:
    from selm.engines.pairrm import PairRM

    sources = ["What is the capital of France?", "Write a haiku about rain. " * 40]
    cands = [["Paris.", "Lyon, I think.", "It is Paris, the capital since 987."],
             ["Rain taps the roof", "drip " * 300, "Soft rain / on the old stone wall / the moss drinks"]]
    gpu = PairRM(w["pairrm"], device="cuda").rank_scores(sources, cands)
    cpu = PairRM(w["pairrm"], device="cpu").rank_scores(sources, cands)
    flat_g, flat_c = [x for r in gpu for x in r], [x for r in cpu for x in r]
    expect(all(math.isfinite(x) for x in flat_g), f"non-finite fp16 scores {gpu}")
    diff = max(abs(a - b) for a, b in zip(flat_g, flat_c))
    same_order = all(sorted(range(len(g)), key=g.__getitem__) == sorted(range(len(c)), key=c.__getitem__)
                     for g, c in zip(gpu, cpu))
    expect(diff < 0.05 or same_order, f"fp16 scores differ from fp32 by {diff:.3g} and rank differently")
    return f"max |fp16 - fp32| = {diff:.2e}; same ranking: {same_order}"


@check("resume_device")
def resume_device(w: dict) -> str:
    """Stop a training run (SIGTERM) once it has a checkpoint, show where its optimizer state was
    saved, then resume it to the end. On one GPU a load without map_location lands on cuda:0, the
    same device; under 8 ranks each would load onto cuda:0 (finding 5), so selm's resume must map it
    to the CPU. What this shows on one GPU: the saved device, and that the resume completes."""
    import signal

    import torch

    out = w["dir"] / "resume"
    args = ["train", "--pairs", str(w["pairs"]), "--model", str(w["big"]), "--output-dir", str(out),
            *[a for s in TRAIN_SETTINGS + ["train.save_every_steps=2"] for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "selm.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 180
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    expect(state.is_file(), f"no {state} to resume from (exit {proc.returncode})")
    saved_on = sorted({str(t.device) for t in _tensors(torch.load(state, weights_only=True))})
    again = selm(*args, timeout=240)
    expect(again.returncode == 0, f"resume failed: {again.stderr.strip().splitlines()[-1:]}")
    expect(finite_losses(metrics(out)), "non-finite loss after resuming")
    return f"optimizer state saved on {saved_on}; the resume completed with finite metrics"


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="selm's GPU check kit (see the module docstring).")
    parser.add_argument("--workdir", type=Path, default=None, help="where inputs and runs go (default: a temp dir)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks (inputs is always built)")
    parser.add_argument("--dry-run", action="store_true", help="list the checks without running them")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(1, str(ROOT / "tests"))
    import torch

    names = [n for n, _ in CHECKS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(unknown)}; the checks: {', '.join(names)}")
    if args.dry_run or not torch.cuda.is_available():
        why = "--dry-run" if args.dry_run else "no CUDA GPU here"
        for name in names:
            print(f"SKIP {name} ({why})")
        print(f"gpu_check: dry run ({why}): {len(names)} checks skipped, none run")
        return 0
    import tempfile

    w = {"dir": args.workdir or Path(tempfile.mkdtemp(prefix="selm-gpu-check-"))}
    w["dir"].mkdir(parents=True, exist_ok=True)
    results = []
    for name, fn in CHECKS:
        if args.only is not None and name not in args.only and name not in ("versions", "inputs"):
            continue
        t0 = time.perf_counter()
        try:
            detail, ok = fn(w), True
        except Failed as e:
            detail, ok = str(e), False
        except KeyboardInterrupt:  # gpu_check.sh's time limit (SIGINT): report what ran
            results.append((name, False))
            print(f"FAIL {name}: stopped by the time limit", flush=True)
            break
        except Exception as e:  # noqa: BLE001 -- a crashing check is a failed check; the others still run
            (w["dir"] / f"{name}.traceback").write_text(traceback.format_exc())
            detail, ok = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}", False
        results.append((name, ok))
        print(f"{'PASS' if ok else 'FAIL'} {name} ({time.perf_counter() - t0:.0f} s): {detail}", flush=True)
    failed = [n for n, ok in results if not ok]
    print(f"gpu_check: {len(results) - len(failed)} passed, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f"; files in {w['dir']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
