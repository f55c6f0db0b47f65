"""The evaluate stage: generate on held-out prompts with an iteration's model and score the
responses with the GOLD judge (configured apart from the training ranker).

Writes stage_dir/generations.jsonl ({prompt_id, prompt, response, gold, length_tokens, finished}),
metrics.json (mean gold reward with a bootstrap 95% interval, mean response length, the fraction cut
at evaluate.max_new_tokens, win rates against baseline evaluations with ties counting half) and
DONE.json last.
"""

from __future__ import annotations

import time
from pathlib import Path

from selm import dist
from selm.config import Config
from selm.io import InputError, atomic_write_json, atomic_write_jsonl, mark_done, read_jsonl
from selm.stats import bootstrap_ci, head_to_head, mean, preference_win_rate


def gold_scores(cfg: Config, prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """The gold judge's (evaluate.judge) score of each prompt's one response."""
    from selm.engines.ranker_base import score_in_chunks
    from selm.engines.registry import build_ranker

    with build_ranker(cfg.evaluate.judge, key="evaluate.judge") as ranker:
        scores = score_in_chunks(ranker, prompts, [[r] for r in responses], chunk_size=16)
    return [float(s[0]) for s in scores]


def compare(rows: list[dict], baseline_dir: Path, samples: int, seed: int) -> dict:
    """Win rate of `rows` over the baseline's generations, matched by prompt_id."""
    base = {r["prompt_id"]: r for r in read_jsonl(baseline_dir / "generations.jsonl")}
    missing = [r["prompt_id"] for r in rows if r["prompt_id"] not in base]
    if missing:
        raise InputError(f"{baseline_dir}/generations.jsonl: no response for prompt_id {missing[0]}")
    ids = [r["prompt_id"] for r in rows]
    return preference_win_rate(head_to_head({r["prompt_id"]: r for r in rows}, base, ids), samples=samples, seed=seed)


def run_evaluate(cfg: Config, model_path: Path, prompts_path: Path, stage_dir: Path, *,
                 baselines: dict[str, Path] | None = None, seed: int = 0) -> dict:
    from selm.engines.generation import generator_from_config
    from selm.engines.sampling import SamplingParams
    from selm.models import set_threads

    ev, gc = cfg.evaluate, cfg.generate
    set_threads(gc.num_threads)
    prompts = read_jsonl(prompts_path)
    t0 = time.perf_counter()
    # The generate stage's backend (and its engine settings); evaluate's own batch size and limits.
    generator = generator_from_config(cfg, model_path, batch_size=ev.batch_size)
    greedy = ev.temperature == 0
    params = SamplingParams(num_samples=0 if greedy else 1, temperature=ev.temperature, top_p=1.0,
                            max_new_tokens=ev.max_new_tokens, include_greedy=greedy, seed=seed)
    samples = [r[0] for r in generator.generate([p["prompt"] for p in prompts], params, progress="evaluate: generate")]
    del generator
    texts = [s.text for s in samples]
    gold = gold_scores(cfg, [p["prompt"] for p in prompts], texts)
    # finished=False: cut at evaluate.max_new_tokens before the end of turn.
    rows = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "response": s.text, "gold": g,
             "length_tokens": s.num_tokens, "finished": s.finished}  # as generated, not re-tokenised text
            for p, s, g in zip(prompts, samples, gold)]
    golds = [r["gold"] for r in rows]
    metrics = {
        "prompts": len(rows), "gold_mean": mean(golds),
        "gold_ci95": list(bootstrap_ci(golds, samples=ev.bootstrap_samples, seed=seed)),
        "length_tokens_mean": mean([r["length_tokens"] for r in rows]),
        "length_chars_mean": mean([len(r["response"]) for r in rows]),
        "cut_off_fraction": mean([float(not r["finished"]) for r in rows]),
        "win_rates": {name: compare(rows, Path(d), ev.bootstrap_samples, seed) for name, d in (baselines or {}).items()},
    }
    if dist.is_main():
        stage_dir = Path(stage_dir)
        atomic_write_jsonl(stage_dir / "generations.jsonl", rows)
        atomic_write_json(stage_dir / "metrics.json", metrics)
        # Timing goes in the marker, not metrics.json, so that a resumed run's metrics equal a fresh one's.
        # Tokens generated, for the report's cost table (selm/studies/cost.py).
        mark_done(stage_dir, {"gold_mean": metrics["gold_mean"], "seconds": time.perf_counter() - t0,
                              "tokens": sum(r["length_tokens"] for r in rows)})
    return metrics
