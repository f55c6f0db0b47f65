"""`selm eval pairwise`: a model's answers against a baseline's on the same prompts, judged head to
head; raw and length-controlled win rates (selm/evaluation/winrate.py) with bootstrap intervals.

Writes OUTPUT_DIR/annotations.jsonl (one judged prompt per line, AlpacaEval's annotation keys:
output_1/generator_1 = the baseline, output_2/generator_2 = the model, preference in [1, 2] where 2 =
the model wins; plus ours: prompt_id, model_win = P(model wins) in [0, 1], the judge's replies) and
OUTPUT_DIR/pairwise.json (the metrics), each atomically, pairwise.json last.
"""

from __future__ import annotations

import random
from pathlib import Path

from selm.config import PairwiseEvalConfig, check_judge
from selm.engines.ranker_base import RankerError
from selm.engines.registry import build_ranker
from selm.evaluation.outputs import (generate_outputs, load_eval_prompts, read_outputs, resolve_answer_source,
                                     write_alpaca_outputs)
from selm.evaluation.winrate import lc_win_rate
from selm.io import atomic_write_json, atomic_write_jsonl
from selm.stats import mean, outcomes, preference_win_rate

KEY = "pairwise.judge"


def answers(source: str, flag: str, prompts: list[dict], prompts_file: Path, cfg: PairwiseEvalConfig) -> tuple[list[str], str]:
    """(one answer per prompt, the generator's name) from an outputs file or by generating (cached)."""
    model = resolve_answer_source(source, flag)
    if model is None:
        return read_outputs(source, prompts, flag)
    folder, name = model
    settings = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "batch_size": cfg.batch_size,
                "dtype": cfg.dtype, "seed": cfg.seed}
    texts, _ = generate_outputs(folder, prompts, prompts_file, settings, progress=f"{flag}: generate")
    return texts, name


def _llm_judgements(ranker, cfg: PairwiseEvalConfig, prompts, model_out, base_out) -> list[dict | str]:
    """Per prompt: {"model_win", "orders": [...]} or the error message of a skipped prompt. Every
    request of the set is sent at once (at most judge.endpoint.max_concurrency in flight)."""
    rng = random.Random(cfg.seed)
    shown = [["model", "baseline"] if cfg.order == "both" else [rng.choice(["model", "baseline"])] for _ in prompts]
    items, owner = [], []
    for k, (p, m, b) in enumerate(zip(prompts, model_out, base_out)):
        for first in shown[k]:
            a, c = (m, b) if first == "model" else (b, m)
            items.append((p["prompt"], a, c, f"prompt_id {p['prompt_id']!r}, model shown {'first' if first == 'model' else 'second'}"))
            owner.append((k, first))
    verdicts = ranker.judge(items)
    per_prompt: list[list] = [[] for _ in prompts]
    for (k, first), v in zip(owner, verdicts):
        if isinstance(v, RankerError):
            if cfg.judge.on_error == "fail":
                raise v
            per_prompt[k].append(str(v))
            continue
        per_prompt[k].append({"model_shown_as": "A" if first == "model" else "B", "verdict": v["verdict"],
                              "p_model": v["p_a"] if first == "model" else 1.0 - v["p_a"], "soft": v["soft"],
                              "reply": v["reply"]})
    out: list[dict | str] = []
    for orders in per_prompt:
        failed = [o for o in orders if isinstance(o, str)]
        out.append(failed[0] if failed else {"model_win": mean([o["p_model"] for o in orders]), "orders": orders})
    return out


def _ranker_judgements(ranker, cfg: PairwiseEvalConfig, prompts, model_out, base_out) -> list[dict | str]:
    """Both answers scored as the rank stage scores candidates; "pairwise" gives P(model beats
    baseline) over both orders, a pointwise judge's higher score wins."""
    from selm.engines.ranker_base import score_in_chunks
    from selm.stages.rank import PROMPTS_PER_CALL

    results = score_in_chunks(ranker, [p["prompt"] for p in prompts], [[m, b] for m, b in zip(model_out, base_out)],
                              [p["prompt_id"] for p in prompts], chunk_size=PROMPTS_PER_CALL, on_error=cfg.judge.on_error)
    out: list[dict | str] = []
    for result in results:
        if isinstance(result, str):
            out.append(result)
            continue
        win = result[0] if cfg.judge.kind == "pairwise" else outcomes([result[0]], [result[1]])[0]
        out.append({"model_win": float(win), "scores": {"model": result[0], "baseline": result[1]}})
    return out


def judge_all(cfg: PairwiseEvalConfig, prompts, model_out, base_out) -> list[dict | str]:
    with build_ranker(cfg.judge, key=KEY) as ranker:
        how = _llm_judgements if cfg.judge.kind == "llm_pairwise" else _ranker_judgements
        return how(ranker, cfg, prompts, model_out, base_out)


def metrics(annotations: list[dict], cfg: PairwiseEvalConfig) -> dict:
    """Raw and LC win rates (95% bootstrap intervals over prompts) and mean lengths in characters."""
    prefs = [a["model_win"] for a in annotations]
    lm, lb = [len(a["output_2"]) for a in annotations], [len(a["output_1"]) for a in annotations]
    diff = [a.get("instruction_difficulty") for a in annotations]
    difficulty = diff if all(d is not None for d in diff) else None
    raw = preference_win_rate(prefs, samples=cfg.bootstrap_samples, seed=cfg.seed)
    lc = lc_win_rate(prefs, lm, lb, difficulty, samples=cfg.bootstrap_samples, seed=cfg.seed)
    return {"win_rate": raw["win_rate"], "win_rate_ci95": raw["ci95"], "wins": raw["wins"], "ties": raw["ties"],
            "losses": raw["losses"], "lc_win_rate": lc["value"], "lc_win_rate_ci95": lc["ci95"],
            "lc_fit": {"C": lc["C"], "coefficients": lc["coefficients"], "difficulty_terms": difficulty is not None,
                       "warning": lc["warning"]},
            "length_model_mean": mean(lm), "length_baseline_mean": mean(lb)}


def run_pairwise(cfg: PairwiseEvalConfig, model: str, baseline: str, prompts_file: Path, out: Path, *,
                 write_alpaca: bool = False) -> dict:
    """Judge `model` against `baseline` on `prompts_file`; write out/annotations.jsonl and
    out/pairwise.json (see the module docstring). Returns the pairwise.json content."""
    check_judge(KEY, cfg.judge)  # before any answer is generated
    prompts = load_eval_prompts(prompts_file)
    model_out, model_gen = answers(model, "MODEL", prompts, Path(prompts_file), cfg)
    base_out, base_gen = answers(baseline, "--baseline", prompts, Path(prompts_file), cfg)
    if model_gen == base_gen:
        model_gen, base_gen = f"{model_gen} (model)", f"{base_gen} (baseline)"
    out = Path(out)
    if write_alpaca:
        write_alpaca_outputs(out / "model_outputs.json", prompts, model_out, model_gen)
        write_alpaca_outputs(out / "reference_outputs.json", prompts, base_out, base_gen)
    judged = judge_all(cfg, prompts, model_out, base_out)
    annotations, skipped = [], []
    for p, m, b, j in zip(prompts, model_out, base_out, judged):
        if isinstance(j, str):
            skipped.append({"prompt_id": p["prompt_id"], "reason": j})
            continue
        annotations.append({"prompt_id": p["prompt_id"], "instruction": p["instruction"],
                            "instruction_difficulty": p["difficulty"], "generator_1": base_gen, "output_1": b,
                            "generator_2": model_gen, "output_2": m, "preference": 1.0 + j["model_win"],
                            "annotator": _annotator(cfg), **j})
    if not annotations:
        raise RankerError(f"{KEY}: every prompt failed ({len(skipped)} skipped); first error: {skipped[0]['reason']}")
    result = {"model": model_gen, "baseline": base_gen, "judge": _annotator(cfg), "prompts": len(prompts),
              "judged": len(annotations), "skipped": len(skipped), "skipped_prompts": skipped,
              "order": cfg.order if cfg.judge.kind == "llm_pairwise" else None, "prompts_file": str(prompts_file),
              **metrics(annotations, cfg)}
    atomic_write_jsonl(out / "annotations.jsonl", annotations)
    atomic_write_json(out / "pairwise.json", result)
    return result


def _annotator(cfg: PairwiseEvalConfig) -> str:
    j = cfg.judge
    what = {"callable": j.callable, "pairwise": j.callable, "reward_model": j.model, "pairrm": j.model,
            "http_judge": j.endpoint.model, "llm_pairwise": j.endpoint.model}[j.kind]
    return f"{j.kind}:{what}"


def table(result: dict) -> str:
    """The metrics as a small text table (what the command prints)."""
    def pct(value: float, ci: list) -> str:
        lo, hi = ci
        if value != value:
            return "  n/a"
        return f"{100 * value:5.1f}%  " + (f"[{100 * lo:.1f}, {100 * hi:.1f}]" if lo == lo else "[n/a]")

    r = result
    skipped = f", {r['skipped']} skipped" if r["skipped"] else ""
    rows = [f"{r['model']} vs {r['baseline']}  (judge {r['judge']}; {r['judged']} prompts{skipped})",
            f"  win rate (ties half)     {pct(r['win_rate'], r['win_rate_ci95'])}   "
            f"wins {r['wins']}, ties {r['ties']}, losses {r['losses']}",
            f"  length-controlled (LC)   {pct(r['lc_win_rate'], r['lc_win_rate_ci95'])}",
            f"  mean length (chars)      model {r['length_model_mean']:.0f}, baseline {r['length_baseline_mean']:.0f}"]
    if r["lc_fit"]["warning"]:
        rows.append(f"  note: {r['lc_fit']['warning']}")
    return "\n".join(rows)
