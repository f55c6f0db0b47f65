"""The generate stage: k sampled responses and the exploration response y0 for each prompt of an
iteration, from the iteration's start model (docs/method.md, "The online loop", step 2).

Input: prompts.jsonl rows {"prompt_id", "prompt": [messages], "chosen": str|null, "rejected": str|null}
(chosen/rejected are the dataset's own responses, when it has them).
Output, in stage_dir:
  generations.jsonl  one row per prompt, in input order:
                     {"prompt_id", "prompt", "candidates": [str], "sources": [str], "finished": [bool],
                      "exploration": y0, "exploration_finished": bool}
                     candidates are the k samples ("sample"), then y0 ("greedy" or "explore_sample")
                     if generate.exploration_as_candidate, then the dataset's pair ("dataset_chosen",
                     "dataset_rejected") if generate.use_dataset_pair and the row has them;
                     finished[i] is False when candidate i was cut at max_new_tokens (it never reached
                     the end-of-turn token; the pair stage may penalise it, and training does not
                     append an end of turn to it); the dataset's responses count as finished;
  stats.json         counts, mean response length, truncation rate (deterministic, like the outputs);
  DONE.json          written last: the stats plus timing (seconds, samples/s and tokens/s, where a
                     "sample" is any generated response, y0 included).

y0 is the greedy response (the authors) or one more sample with the samples' settings. Both come
from the same decoding pass as the samples, sharing each prompt's prefill. Given the seed, the output
is a function of the model and the prompts, so a redone stage writes the same generations.
"""

from __future__ import annotations

import time
from pathlib import Path

from selm import dist
from selm.chat import normalize_prompt, response_text_of
from selm.config import Config
from selm.io import InputError, atomic_write_json, atomic_write_jsonl, iter_jsonl, mark_done


def read_prompt_rows(path: Path) -> list[dict]:
    """Validated prompt rows: {"prompt_id": str, "prompt": messages, "chosen": str|None, "rejected": str|None}."""
    rows, seen = [], set()
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        pid = row.get("prompt_id")
        if not isinstance(pid, str) or not pid:
            raise InputError(f"{where}: field 'prompt_id': expected a non-empty string")
        if pid in seen:
            raise InputError(f"{where}: field 'prompt_id': duplicate {pid!r}")
        seen.add(pid)
        if "prompt" not in row:
            raise InputError(f"{where}: field 'prompt' is missing")
        out = {"prompt_id": pid, "prompt": normalize_prompt(row["prompt"], f"{where}: field 'prompt'")}
        for key in ("chosen", "rejected"):
            value = row.get(key)
            out[key] = None if value is None else response_text_of(value, f"{where}: field {key!r}")
        rows.append(out)
    if not rows:
        raise InputError(f"{path}: no prompts")
    return rows


def candidates_of(row: dict, samples: list, y0, y0_source: str, cfg) -> tuple[list[str], list[str], list[bool]]:
    """The responses to rank for one prompt, where each came from and whether it finished (parallel
    lists). samples and y0 are generation Samples (text, finished)."""
    cands, sources, finished = [s.text for s in samples], ["sample"] * len(samples), [s.finished for s in samples]
    if cfg.exploration_as_candidate:
        cands.append(y0.text)
        sources.append(y0_source)
        finished.append(y0.finished)
    if cfg.use_dataset_pair:
        for key in ("chosen", "rejected"):
            if row.get(key) is not None:
                cands.append(row[key])
                sources.append(f"dataset_{key}")
                finished.append(True)
    return cands, sources, finished


def run_generate(cfg: Config, model_path: Path, prompts_path: Path, stage_dir: Path, *, seed: int) -> dict:
    """Run the stage; returns the stats and timing (as written to DONE.json)."""
    from selm.engines.generation import generator_from_config
    from selm.engines.sampling import SamplingParams
    from selm.models import set_threads

    gc = cfg.generate
    t_start = time.perf_counter()
    set_threads(gc.num_threads)  # see GenerateConfig.num_threads and docs/performance.md, "Threads"
    rows = read_prompt_rows(Path(prompts_path))
    generator = generator_from_config(cfg, model_path, batch_size=gc.batch_size)

    k = gc.num_samples
    explore_sample = gc.exploration == "sample"
    # y0 sits right after the k samples: the greedy row, or sample number k+1 (its own random stream).
    params = SamplingParams(num_samples=k + int(explore_sample), temperature=gc.temperature, top_p=gc.top_p,
                            max_new_tokens=gc.max_new_tokens, include_greedy=not explore_sample, seed=seed)
    t_gen = time.perf_counter()
    outputs = generator.generate([r["prompt"] for r in rows], params, progress="generate")
    gen_seconds = time.perf_counter() - t_gen

    y0_source = "explore_sample" if explore_sample else "greedy"
    records = []
    for row, out in zip(rows, outputs):
        cands, sources, finished = candidates_of(row, out[:k], out[k], y0_source, gc)
        records.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"], "candidates": cands,
                        "sources": sources, "finished": finished, "exploration": out[k].text,
                        "exploration_finished": out[k].finished})

    generated = [s for out in outputs for s in out]
    n_tokens = sum(s.num_tokens for s in generated)
    stats = {
        "prompts": len(rows),
        "samples": k * len(rows),
        "responses": len(generated),
        "candidates": sum(len(r["candidates"]) for r in records),
        "dataset_candidates": sum(s.startswith("dataset_") for r in records for s in r["sources"]),
        "response_tokens_mean": n_tokens / len(generated),
        "response_chars_mean": sum(len(s.text) for s in generated) / len(generated),
        "truncated_fraction": sum(not s.finished for s in generated) / len(generated),
        "seed": seed,
    }
    # Timing goes in the done-marker only: stats.json must be identical when a stage is redone.
    timing = {
        "generation_seconds": gen_seconds,
        "samples_per_second": len(generated) / gen_seconds,
        "tokens_per_second": n_tokens / gen_seconds,
        "seconds": time.perf_counter() - t_start,
    }
    if dist.is_main():  # every rank holds the merged generations; one writes them
        stage_dir = Path(stage_dir)
        atomic_write_jsonl(stage_dir / "generations.jsonl", records)
        atomic_write_json(stage_dir / "stats.json", stats)
        mark_done(stage_dir, {**stats, **timing})
    return {**stats, **timing}
