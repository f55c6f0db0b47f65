"""The pair stage: ranked candidates -> preference pairs (best vs worst).

Imports no model code. Output rows are TRL's conversational preference format plus
`exploration` (y0), so pairs.jsonl can be given to TRL's DPO trainer as it is::

    {"prompt": [messages], "chosen": [{"role": "assistant", "content": ...}], "rejected": [...],
     "exploration": [...], "prompt_id": ..., "score_chosen": float, "score_rejected": float,
     "finished_chosen": bool, "finished_rejected": bool, "finished_exploration": bool, ...}

finished_* is False for a response cut at max_new_tokens (from the generate stage); training then
does not append an end-of-turn token to it. With pair.missing_eos_penalty, such candidates are
ranked as if their score were that much lower (TRL's online trainers do the same).
"""

from __future__ import annotations

import math
from pathlib import Path

from selm import dist
from selm.io import InputError, atomic_write_jsonl, iter_jsonl, mark_done


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def pair_record(rec: dict, min_margin: float, missing_eos_penalty: float | None = None) -> dict | None:
    """Best vs worst of one prompt's scored candidates, or None for a tie (margin <= min_margin,
    on penalised scores). Among equal scores the earliest candidate wins (deterministic)."""
    scores, cands = rec["scores"], rec["candidates"]
    finished = rec.get("finished") or [True] * len(cands)
    penalty = missing_eos_penalty or 0.0
    ranked = [s - (0.0 if f else penalty) for s, f in zip(scores, finished)]
    best = max(range(len(ranked)), key=lambda i: (ranked[i], -i))
    worst = min(range(len(ranked)), key=lambda i: (ranked[i], i))
    if not ranked[best] - ranked[worst] > min_margin:
        return None
    sources = rec.get("sources") or [""] * len(cands)
    return {
        "prompt_id": rec["prompt_id"], "prompt": rec["prompt"],
        "chosen": _assistant(cands[best]), "rejected": _assistant(cands[worst]),
        "exploration": _assistant(rec["exploration"]),
        "score_chosen": scores[best], "score_rejected": scores[worst],
        "source_chosen": sources[best], "source_rejected": sources[worst],
        "finished_chosen": bool(finished[best]), "finished_rejected": bool(finished[worst]),
        "finished_exploration": bool(rec.get("exploration_finished", True)),
    }


def _check(rec: dict, where: str) -> None:
    for key in ("prompt_id", "prompt", "candidates", "scores", "exploration"):
        if key not in rec:
            raise InputError(f"{where}: missing field {key!r}")
    pid = rec["prompt_id"]
    if len(rec["scores"]) != len(rec["candidates"]) or len(rec["candidates"]) < 2:
        raise InputError(f"{where}: needs >= 2 candidates and one score each (prompt_id {pid})")
    if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in rec["scores"]):
        raise InputError(f"{where}: non-finite score (prompt_id {pid})")
    finished = rec.get("finished")
    if finished is not None and (not isinstance(finished, list) or len(finished) != len(rec["candidates"])
                                 or not all(isinstance(f, bool) for f in finished)):
        raise InputError(f"{where}: field 'finished': expected one true/false per candidate (prompt_id {pid})")
    if not isinstance(rec.get("exploration_finished", True), bool):
        raise InputError(f"{where}: field 'exploration_finished': expected true/false (prompt_id {pid})")


def run_pair(scores_path: Path, stage_dir: Path, *, min_margin: float, missing_eos_penalty: float | None = None) -> dict:
    pairs, ties, unfinished = [], 0, 0
    for lineno, rec in iter_jsonl(scores_path):
        _check(rec, f"{scores_path}:{lineno}")
        unfinished += sum(not f for f in rec.get("finished") or [])
        p = pair_record(rec, min_margin, missing_eos_penalty)
        if p is None:
            ties += 1
        else:
            pairs.append(p)
    n = max(1, len(pairs))
    stats = {"prompts": len(pairs) + ties, "pairs": len(pairs), "ties_dropped": ties,
             "mean_margin": sum(p["score_chosen"] - p["score_rejected"] for p in pairs) / n,
             "unfinished_candidates": unfinished,
             "unfinished_chosen": sum(not p["finished_chosen"] for p in pairs),
             "unfinished_rejected": sum(not p["finished_rejected"] for p in pairs)}
    if dist.is_main():  # cheap: every rank computes the pairs, one writes them
        stage_dir = Path(stage_dir)
        atomic_write_jsonl(stage_dir / "pairs.jsonl", pairs)
        mark_done(stage_dir, stats)
    return stats
