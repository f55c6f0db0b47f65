"""Attention for prompt sharing on CPUs: SDPA forward + backward time of three ways to compute it,
side by side in one process.

    python benchmarks/attention_layouts.py [--prompt 88] [--response 100] [--batch 8] [--threads 1]
                                           [--repeats 7] [--fp32]

Shapes: SmolLM2-135M's attention (9 query heads, 3 key/value heads of 64) on a micro-batch of
--batch pairs, each a prompt and three responses of the given lengths.

- "prefix": one row per pair with the block mask of selm/objective/logprobs.py, one masked SDPA;
- "segments": the same rows through selm/objective/attention.py, which computes only the blocks
  the mask allows (the default for prefix batches on CPUs);
- "cache": the prompts once (causal), then 3 x batch response rows over the prompt's keys and their
  own (the KV-cache way to share a prompt; its padded rows are left out, which flatters it).

Prints medians per layer and ``ratio=<prefix time / segments time>`` (> 1: segments are faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from selm.objective.attention import segment_attention

HEADS, KV_HEADS, DIM = 9, 3, 64


def block_mask(batch: int, prompt: int, response: int, kinds: int = 3) -> torch.Tensor:
    total = prompt + kinds * response
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = torch.zeros(batch, 1, total, total, dtype=torch.bool)
    mask[:, 0, :prompt, :prompt] = causal[:prompt, :prompt]
    for s in range(prompt, total, response):
        mask[:, 0, s:s + response, :prompt] = True
        mask[:, 0, s:s + response, s:s + response] = causal[:response, :response]
    return mask


def qkv(rows: int, q_len: int, k_len: int, dtype):
    return (torch.randn(rows, HEADS, q_len, DIM, dtype=dtype, requires_grad=True),
            torch.randn(rows, KV_HEADS, k_len, DIM, dtype=dtype, requires_grad=True),
            torch.randn(rows, KV_HEADS, k_len, DIM, dtype=dtype, requires_grad=True))


def sdpa_parts(parts, dtype) -> float:
    t0 = time.perf_counter()
    for rows, q_len, k_len, mask in parts:
        q, k, v = qkv(rows, q_len, k_len, dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        out.sum().backward()
    return time.perf_counter() - t0


def segments(batch: int, prompt: int, response: int, dtype) -> float:
    total = prompt + 3 * response
    q, k, v = qkv(batch, total, total, dtype)
    t0 = time.perf_counter()
    segment_attention(q, k, v, [(prompt, response, response, response)] * batch).sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=88)
    p.add_argument("--response", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 inputs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.float32 if a.fp32 else torch.bfloat16
    P, R, B = a.prompt, a.response, a.batch
    cache_mask = torch.zeros(3 * B, 1, R, P + R, dtype=torch.bool)
    cache_mask[:, 0, :, :P] = True
    cache_mask[:, 0, :, P:] = torch.ones(R, R, dtype=torch.bool).tril()
    layouts = {
        "prefix": lambda: sdpa_parts([(B, P + 3 * R, P + 3 * R, block_mask(B, P, R))], dtype),
        "segments": lambda: segments(B, P, R, dtype),
        "cache": lambda: sdpa_parts([(B, P, P, None), (3 * B, R, P + R, cache_mask)], dtype),
    }
    times = {name: [] for name in layouts}
    for rep in range(a.repeats + 1):  # repeat 0 warms up
        for name, run in layouts.items():
            dt = run()
            if rep:
                times[name].append(dt)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"{a.threads} thread(s), {dtype}, batch {B}, prompt {P}, 3 responses of {R}; per layer, {a.repeats} repeats:")
    for name, v in times.items():
        print(f"  {name:8s} fwd+bwd median {med[name] * 1e3:8.1f} ms (min {min(v) * 1e3:.1f})")
    print(f"prefix / cache = {med['prefix'] / med['cache']:.3f}")
    print(f"ratio={med['prefix'] / med['segments']:.3f}")


if __name__ == "__main__":
    main()
