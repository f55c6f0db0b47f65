"""The pair stage: ranked candidates -> preference pairs (best vs worst).

Imports no model code. Output rows are TRL's conversational preference format plus
`exploration` (y0), so pairs.jsonl can be given to TRL's DPO trainer as it is::

    {"prompt": [messages], "chosen": [{"role": "assistant", "content": ...}], "rejected": [...],
     "exploration": [...], "prompt_id": ..., "score_chosen": float, "score_rejected": float, ...}
"""

from __future__ import annotations

import math
from pathlib import Path

from selm.io import InputError, atomic_write_jsonl, iter_jsonl, mark_done


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def pair_record(rec: dict, min_margin: float) -> dict | None:
    """Best vs worst of one prompt's scored candidates, or None for a tie (margin <= min_margin).
    Among equal scores the earliest candidate wins (deterministic)."""
    scores, cands = rec["scores"], rec["candidates"]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if not scores[best] - scores[worst] > min_margin:
        return None
    sources = rec.get("sources") or [""] * len(cands)
    return {
        "prompt_id": rec["prompt_id"], "prompt": rec["prompt"],
        "chosen": _assistant(cands[best]), "rejected": _assistant(cands[worst]),
        "exploration": _assistant(rec["exploration"]),
        "score_chosen": scores[best], "score_rejected": scores[worst],
        "source_chosen": sources[best], "source_rejected": sources[worst],
    }


def run_pair(scores_path: Path, stage_dir: Path, *, min_margin: float) -> dict:
    pairs, ties = [], 0
    for lineno, rec in iter_jsonl(scores_path):
        where = f"{scores_path}:{lineno}"
        for key in ("prompt_id", "prompt", "candidates", "scores", "exploration"):
            if key not in rec:
                raise InputError(f"{where}: missing field {key!r}")
        if len(rec["scores"]) != len(rec["candidates"]) or len(rec["candidates"]) < 2:
            raise InputError(f"{where}: needs >= 2 candidates and one score each (prompt_id {rec['prompt_id']})")
        if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in rec["scores"]):
            raise InputError(f"{where}: non-finite score (prompt_id {rec['prompt_id']})")
        p = pair_record(rec, min_margin)
        if p is None:
            ties += 1
        else:
            pairs.append(p)
    stats = {"prompts": len(pairs) + ties, "pairs": len(pairs), "ties_dropped": ties,
             "mean_margin": sum(p["score_chosen"] - p["score_rejected"] for p in pairs) / max(1, len(pairs))}
    stage_dir = Path(stage_dir)
    atomic_write_jsonl(stage_dir / "pairs.jsonl", pairs)
    mark_done(stage_dir, stats)
    return stats
