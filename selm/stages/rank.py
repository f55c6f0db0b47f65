"""The rank stage: score every prompt's candidates with the training ranker.

Input (generations.jsonl, one record per prompt)::

    {"prompt_id": str, "prompt": [messages], "candidates": [str, ...],
     "sources": [str, ...] (e.g. "sample", "greedy", "dataset_chosen"), "exploration": str}

Output in stage_dir, each written atomically, DONE.json last:

- scores.jsonl: the same records plus "scores": [float, ...] (one per candidate, same order).
- stats.json:   {"prompts", "scored", "skipped", "skipped_prompts": [{"prompt_id", "reason"}],
                 "mean_score_by_source": {source: mean}, "candidates_per_prompt": {"min", "max", "mean"},
                 "ranker": kind}
- DONE.json:    stats plus the wall time (kept out of stats.json so reruns give identical files).

The output is a pure function of the input file and the ranker config. With ``on_error: fail``
the first ranker error stops the stage (its message names the prompt_id) and nothing is written;
with ``on_error: skip`` failing prompts are left out of scores.jsonl and listed in stats.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from selm import dist
from selm.chat import normalize_prompt
from selm.config import Config, RankConfig
from selm.io import InputError, atomic_write_json, atomic_write_jsonl, iter_jsonl, mark_done
from selm.engines.ranker_base import RankerError, score_in_chunks
from selm.engines.registry import build_ranker

PROMPTS_PER_CALL = 8


def read_generations(path: Path) -> list[dict]:
    """Records of generations.jsonl, checked; each gets a private "_messages" (normalized prompt)."""
    records, seen = [], set()
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for field in ("prompt_id", "prompt", "candidates"):
            if field not in rec:
                raise InputError(f"{where}: missing field {field!r}")
        pid = rec["prompt_id"]
        if pid in seen:
            raise InputError(f"{where}: duplicate prompt_id {pid!r}")
        seen.add(pid)
        cands = rec["candidates"]
        if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
            raise InputError(f"{where}: candidates: expected a non-empty list of strings (prompt_id {pid!r})")
        sources = rec.get("sources")
        if sources is not None and (not isinstance(sources, list) or len(sources) != len(cands)):
            raise InputError(f"{where}: sources: expected one per candidate (prompt_id {pid!r})")
        records.append({**rec, "_messages": normalize_prompt(rec["prompt"], f"{where}: prompt")})
    return records


def _stats(records: list[dict], scored: list[dict], skipped: list[dict], kind: str) -> dict:
    by_source: dict[str, list[float]] = {}
    for rec in scored:
        for src, s in zip(rec.get("sources") or ["candidate"] * len(rec["scores"]), rec["scores"]):
            by_source.setdefault(str(src), []).append(s)
    counts = [len(r["candidates"]) for r in records]
    return {
        "ranker": kind,
        "prompts": len(records),
        "scored": len(scored),
        "skipped": len(skipped),
        "skipped_prompts": skipped,
        "mean_score_by_source": {k: sum(v) / len(v) for k, v in sorted(by_source.items())},
        "candidates_per_prompt": {"min": min(counts, default=0), "max": max(counts, default=0),
                                  "mean": sum(counts) / max(1, len(counts))},
    }


def run_rank(cfg: Config, generations_path: Path, stage_dir: Path, *, ranker_cfg: RankConfig | None = None,
             key: str = "rank") -> dict:
    """Score generations_path into stage_dir (see the module docstring). Returns the stats dict."""
    from selm.models import set_threads

    rc = ranker_cfg or cfg.rank
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = read_generations(Path(generations_path))
    set_threads(cfg.generate.num_threads)

    with build_ranker(rc, key=key) as ranker:
        results = score_in_chunks(ranker, [r["_messages"] for r in records], [r["candidates"] for r in records],
                                  [r["prompt_id"] for r in records], chunk_size=PROMPTS_PER_CALL,
                                  on_error=rc.on_error, progress=key)
    scored, skipped = [], []
    for rec, result in zip(records, results):
        if isinstance(result, str):
            skipped.append({"prompt_id": rec["prompt_id"], "reason": result})
        else:
            scored.append({**{k: v for k, v in rec.items() if k != "_messages"}, "scores": result})
    if records and not scored:
        # Skipping everything is a broken ranker, not data: refuse rather than hand on nothing.
        raise RankerError(f"{key}: every prompt failed ({len(skipped)} skipped); first error: "
                          f"{skipped[0]['reason']}")

    stats = _stats(records, scored, skipped, rc.kind)
    if dist.is_main():
        atomic_write_jsonl(stage_dir / "scores.jsonl", scored)
        atomic_write_json(stage_dir / "stats.json", stats)
        mark_done(stage_dir, {**stats, "seconds": round(time.perf_counter() - t0, 3)})
    return stats
