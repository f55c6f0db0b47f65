"""Why prompt sharing uses a block mask and not a KV cache on CPUs: SDPA forward + backward time
for the two layouts' attention shapes, side by side in one process.

    python benchmarks/attention_layouts.py [--threads 1] [--repeats 7] [--fp32]

Shapes: SmolLM2-135M's attention (9 heads of 64) on a micro-batch of 8 pairs, prompt ~88 and three
responses ~100 tokens (max). "prefix": one (8 x 390) row per pair with the block mask of
selm/objective/logprobs.py; "cache": the prompts once (8 x 88, causal), then 24 response rows of 120 queries
over 88 cached + 120 own keys. The cache layout does half the (query, key) pairs, but PyTorch's
CPU flash kernel is slow on short sequences, so it does not win (notes/train_benchmark.md).
Prints medians per layer and ``ratio=<prefix time / cache time>`` (> 1: the cache layout is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HEADS, DIM = 9, 64


def block_mask(batch: int, prompt: int, response: int, kinds: int = 3) -> torch.Tensor:
    total = prompt + kinds * response
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = torch.zeros(batch, 1, total, total, dtype=torch.bool)
    mask[:, 0, :prompt, :prompt] = causal[:prompt, :prompt]
    for s in range(prompt, total, response):
        mask[:, 0, s:s + response, :prompt] = True
        mask[:, 0, s:s + response, s:s + response] = causal[:response, :response]
    return mask


def timed(parts, dtype) -> float:
    t0 = time.perf_counter()
    for rows, q_len, k_len, mask in parts:
        q, k, v = (torch.randn(rows, HEADS, n, DIM, dtype=dtype, requires_grad=True) for n in (q_len, k_len, k_len))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        out.sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 inputs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.float32 if a.fp32 else torch.bfloat16
    prompt, response, cached_rows, response_max = 88, 100, 24, 120
    cache_mask = torch.zeros(cached_rows, 1, response_max, prompt + response_max, dtype=torch.bool)
    cache_mask[:, 0, :, :prompt] = True
    cache_mask[:, 0, :, prompt:] = torch.ones(response_max, response_max, dtype=torch.bool).tril()
    layouts = {
        "prefix": [(8, prompt + 3 * response, prompt + 3 * response, block_mask(8, prompt, response))],
        "cache": [(8, prompt, prompt, None), (cached_rows, response_max, prompt + response_max, cache_mask)],
    }
    times = {name: [] for name in layouts}
    for rep in range(a.repeats + 1):  # repeat 0 warms up
        for name, parts in layouts.items():
            dt = timed(parts, dtype)
            if rep:
                times[name].append(dt)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"{a.threads} thread(s), {dtype}, per layer, {a.repeats} repeats:")
    for name, v in times.items():
        print(f"  {name:6s} fwd+bwd median {med[name] * 1e3:7.1f} ms (min {min(v) * 1e3:.1f})")
    print(f"ratio={med['prefix'] / med['cache']:.3f}")


if __name__ == "__main__":
    main()
