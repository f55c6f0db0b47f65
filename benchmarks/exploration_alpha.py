"""Does the optimism term move the model further from the start model on y0? (docs/method.md,
"Exploration statistics"). For each seed and alpha: configs/tiny.yaml without evaluation, the
whole loop, then the exploration statistics; prints the mean "start's y0: vs start" log-ratio per
response after each iteration.

    python benchmarks/exploration_alpha.py --alphas 0,1,5 --seeds 0,1,2,3,4 --out /tmp/exploration_alpha
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selm.config import load_config
from selm.loop import run_loop
from selm.studies.exploration import run_exploration

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alphas", default="0,1,5")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", type=Path, default=Path("/tmp/exploration_alpha"))
    ap.add_argument("--prompts", type=int, default=16, help="report.exploration_prompts (16: all 12 of each slice)")
    args = ap.parse_args()
    print("seed alpha  y0_vs_start per iteration")
    for seed in map(int, args.seeds.split(",")):
        for alpha in map(float, args.alphas.split(",")):
            cfg = load_config(TINY, [f"train.alpha={alpha}", f"seed={seed}", "evaluate.enabled=false"])
            out = args.out / f"seed_{seed}_alpha_{alpha:g}"
            run_loop(cfg, out)
            rows = run_exploration(out, cfg, args.prompts)["per_iteration"]
            vals = [r["distance"]["y0_vs_start"]["per_sequence"] for r in rows]
            print(seed, f"{alpha:g}", " ".join(f"{sum(v) / len(v):.3f}" for v in vals), flush=True)


if __name__ == "__main__":
    main()
