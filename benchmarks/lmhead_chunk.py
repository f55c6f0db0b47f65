"""LM-head log-prob: forward + backward time by vocabulary chunk width, side by side in one process.

    python benchmarks/lmhead_chunk.py [--rows 2269] [--hidden 576] [--vocab 49152] [--threads 1]
        [--widths auto,1024,4096] [--repeats 5] [--fp32]

Shapes default to a SmolLM2-135M training micro-batch (8 pairs, ~2,269 response tokens) under bf16
autocast. Widths run in alternation, every repeat; medians are printed, then
``ratio=<median time at the widest width / median time at "auto">`` (> 1: auto is faster). Values
are checked to agree across widths before any time is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from selm.objective.lmhead import chunk_width, token_logps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2269)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--widths", default="auto,1024,4096", help="comma-separated; 'auto' = chunk_width()")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    h = (torch.randn(a.rows, a.hidden) * 0.5).requires_grad_()
    w = (torch.randn(a.vocab, a.hidden) * 0.05).requires_grad_()
    target = torch.randint(0, a.vocab, (a.rows,))
    auto = chunk_width(a.rows, a.vocab, h.device)
    widths = {x: (auto if x == "auto" else int(x)) for x in a.widths.split(",")}
    print(f"rows {a.rows}, hidden {a.hidden}, vocab {a.vocab}, {a.threads} thread(s), "
          f"{'fp32' if a.fp32 else 'bf16 autocast'}; auto width = {auto}", flush=True)
    times: dict[str, list[float]] = {x: [] for x in widths}
    values = {}
    for rep in range(a.repeats + 1):  # repeat 0 warms up and is not counted
        for name, width in widths.items():
            h.grad = w.grad = None
            t0 = time.perf_counter()
            with nullcontext() if a.fp32 else torch.autocast("cpu", dtype=torch.bfloat16):
                lp = token_logps(h, w, target, chunk=width)
            lp.sum().backward()
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
            else:
                values[name] = (lp.detach(), w.grad.clone())
    first = next(iter(values.values()))
    for name, (lp, gw) in values.items():
        torch.testing.assert_close(lp, first[0], atol=1e-3, rtol=1e-4, msg=f"width {name}: log-probs differ")
        torch.testing.assert_close(gw, first[1], atol=2e-2, rtol=2e-2, msg=f"width {name}: gradients differ")
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, v in times.items():
        print(f"width {name:>5} ({widths[name]:>5}): median {med[name]:.3f} s  (min {min(v):.3f}, {len(v)} repeats)")
    widest = max(widths, key=widths.get)
    print(f"ratio={med[widest] / med['auto'] if 'auto' in med else float('nan'):.3f}")


if __name__ == "__main__":
    main()
