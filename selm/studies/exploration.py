"""Exploration statistics of a run (docs/method.md, "Exploration statistics"): per iteration, how
far the model moved (log-ratios against the start model and the previous iterate, on sampled
candidates and on y0), how diverse its candidates are, and what training-ranker rewards they reach.

Built from the files a run writes (generate, rank and pair stages, the iterates' model/ folders)
plus one no-grad scoring pass per model over the first `report.exploration_prompts` prompts of each
iteration, through the training's own scoring path (selm.objective.logprobs.score_logps). The
per-run result, per-prompt values included, is cached in RUN/analysis/exploration.json under a key
of its inputs, so `selm report` recomputes it only when a stage was redone or a setting changed.
The report sections that show it are in selm/studies/exploration_report.py.
"""

from __future__ import annotations

from pathlib import Path

from selm.io import DONE_MARKER, atomic_write_json, read_json, read_jsonl, sha256_json
from selm.layout import model_dir, stage_dir
from selm.stats import mean, outcomes
from selm.studies.steps import Steps

VERSION = 1  # bump when a statistic changes: cached results are then recomputed
CACHE = Path("analysis") / "exploration.json"

# Each log-ratio statistic of iteration t: (responses, model, reference), with model indices
# t (iteration t's trained model), t-1 (the previous iterate; 0 = the start model) and 0. The mean
# of log p_model(y) - log p_reference(y) over the responses (README of the module: docs/method.md).
DISTANCES = {
    "samples_vs_previous": lambda t: (f"samples_{t}", t, t - 1),
    "samples_vs_start": lambda t: (f"samples_{t}", t, 0),
    "own_samples_vs_previous": lambda t: (f"samples_{t + 1}", t, t - 1),
    "own_samples_vs_start": lambda t: (f"samples_{t + 1}", t, 0),
    "y0_vs_previous": lambda t: (f"y0_{t}", t, t - 1),
    "y0_vs_start": lambda t: ("y0_1", t, 0),
}


# ------------------------------------------------------------------------------------------------
# Pure statistics (hand-checked in tests/test_exploration.py).


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams of the texts (whitespace words; n-grams do not cross texts).
    None when the texts have no n-gram at all."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else None


def duplicate_share(texts: list[str]) -> float | None:
    """The share of texts that repeat an earlier one exactly: 1 - distinct / all."""
    return 1 - len(set(texts)) / len(texts) if texts else None


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def mean_pairwise_edit(texts: list[str]) -> float | None:
    """Mean over pairs of texts of their word-level edit distance divided by the longer one's word
    count (0: the same words, 1: nothing in common); two empty texts are at distance 0. None for
    fewer than two texts."""
    words = [t.split() for t in texts]
    dists = [edit_distance(a, b) / max(len(a), len(b), 1) for i, a in enumerate(words) for b in words[i + 1:]]
    return mean(dists) if dists else None


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def beats_start(best: dict[str, float], start_best: dict[str, float]) -> tuple[list[float], str]:
    """Per prompt: does its best candidate beat the start model's best (1, tie 0.5, 0)? "paired" on
    the prompts both have; when they share none (disjoint slices), "unpaired": the share of the start
    model's prompts whose best it beats (ties half), one value per prompt."""
    shared = sorted(set(best) & set(start_best))
    if shared:
        return outcomes([best[i] for i in shared], [start_best[i] for i in shared]), "paired"
    if not start_best:
        return [], "none"
    base = list(start_best.values())
    return [mean(outcomes([b] * len(base), base)) for b in best.values()], "unpaired"


def per_prompt_ratios(model: list[float], ref: list[float], tokens: list[int], prompt_of: list[int]
                      ) -> tuple[list[float], list[float]]:
    """Per prompt, the mean over its responses of log p_model - log p_ref (per sequence) and of
    that divided by the response's token count (per token), in the order prompts first appear."""
    seq: dict[int, list[float]] = {}
    tok: dict[int, list[float]] = {}
    for m, r, n, p in zip(model, ref, tokens, prompt_of):
        seq.setdefault(p, []).append(m - r)
        tok.setdefault(p, []).append((m - r) / max(n, 1))
    return [mean(v) for v in seq.values()], [mean(v) for v in tok.values()]


# ------------------------------------------------------------------------------------------------
# One run: read the stage files, score, compute.


def _generations(run: Path, t: int) -> list[dict] | None:
    d = stage_dir(run, t, "generate")
    return read_jsonl(d / "generations.jsonl") if (d / DONE_MARKER).is_file() else None


def _samples(row: dict) -> list[tuple[str, bool]]:
    """The k sampled candidates of a generations row (not y0, not the dataset's responses)."""
    fin = row.get("finished") or [True] * len(row["candidates"])
    return [(c, f) for c, s, f in zip(row["candidates"], row.get("sources") or [], fin) if s == "sample"]


def response_sets(run: Path, T: int, cap: int) -> dict[str, tuple[list[tuple], list[int]]]:
    """name -> (items (prompt, text, finished), prompt index of each item) for every iteration's
    samples ("samples_t") and exploration responses ("y0_t"), on its first `cap` prompts."""
    sets = {}
    for t in range(1, T + 1):
        rows = _generations(run, t)
        if rows is None:
            continue
        rows = rows[:cap]
        items = [(r["prompt"], text, fin, i) for i, r in enumerate(rows) for text, fin in _samples(r)]
        if items:
            sets[f"samples_{t}"] = ([x[:3] for x in items], [x[3] for x in items])
        sets[f"y0_{t}"] = ([(r["prompt"], r["exploration"], r.get("exploration_finished", True)) for r in rows],
                           list(range(len(rows))))
    return sets


def score_responses(model_path: Path, items: list[tuple], cfg) -> tuple[list[float], list[int]]:
    """Summed log-probs of each (prompt, response, finished) under the model, and each response's
    token count, scored as training scores its reference (tokenisation, truncation, layout) but in
    the weights' own precision (model.dtype), without train.bf16's autocast: small log-ratios want
    the precision, and bf16 autocast runs many times slower on a CPU without bf16 units (BENCHMARKS.md,
    "bf16 on a CPU without bf16 instructions")."""
    from selm.objective.logprobs import model_logps, tokenize_responses

    lp, ex = model_logps(model_path, cfg, lambda tok: tokenize_responses(
        tok, items, max_length=cfg.train.max_length, max_prompt_length=cfg.train.max_prompt_length), train_precision=False)
    return lp["chosen"].tolist(), [len(e.responses[0]) for e in ex]


def _models(run: Path, cfg, T: int) -> dict[int, Path]:
    """Model index -> folder: every finished iterate, and the start model (0) when there is one."""
    from selm.io import is_done

    models = {t: model_dir(run, t) for t in range(1, T + 1)
              if is_done(stage_dir(run, t, "train")) and (model_dir(run, t)).is_dir()}
    if models:
        from selm.loop import start_model_path

        models[0] = start_model_path(cfg, run)
    return models


def distances(run: Path, cfg, T: int, cap: int) -> dict[int, dict]:
    """Iteration -> {statistic: {"per_sequence": [per prompt], "per_token": [per prompt]}} for every
    DISTANCES entry whose responses and models exist. Each model scores all its responses in one pass."""
    from selm.models import set_threads

    if cap < 1:
        return {}
    sets, models = response_sets(run, T, cap), _models(run, cfg, T)
    wanted = {(t, name): spec(t) for t in models if t >= 1 for name, spec in DISTANCES.items()}
    wanted = {k: v for k, v in wanted.items() if v[0] in sets and v[1] in models and v[2] in models}
    needs: dict[int, set[str]] = {}
    for s, a, b in wanted.values():
        needs.setdefault(a, set()).add(s)
        needs.setdefault(b, set()).add(s)
    set_threads(cfg.generate.num_threads)
    logps: dict[tuple[str, int], list[float]] = {}
    tokens: dict[str, list[int]] = {}
    steps = Steps(f"report: exploration scoring of {run.parent.name}/{run.name}", len(needs))
    for j in sorted(needs):
        names = sorted(needs[j])
        steps.start("start model" if j == 0 else f"iteration {j}'s model")
        lp, n = score_responses(models[j], [it for s in names for it in sets[s][0]], cfg)
        start = 0
        for s in names:
            size = len(sets[s][0])
            logps[(s, j)] = lp[start:start + size]
            tokens.setdefault(s, n[start:start + size])
            start += size
    steps.close()
    out: dict[int, dict] = {}
    for (t, name), (s, a, b) in wanted.items():
        seq, tok = per_prompt_ratios(logps[(s, a)], logps[(s, b)], tokens[s], sets[s][1])
        out.setdefault(t, {})[name] = {"per_sequence": seq, "per_token": tok}
    return out


def diversity(rows: list[dict], cap: int) -> dict:
    """Diversity of the sampled candidates of one iteration: per prompt (within its k samples) and
    pooled over prompts. Edit distances on the first `cap` prompts only (quadratic in the words)."""
    per = [[text for text, _ in _samples(r)] for r in rows]
    per = [p for p in per if len(p) >= 2]
    pooled = [t for p in per for t in p]
    within = lambda f: [v for v in map(f, per) if v is not None]  # noqa: E731
    return {
        "prompts": len(per),
        "distinct_1": within(lambda p: distinct_n(p, 1)), "distinct_2": within(lambda p: distinct_n(p, 2)),
        "duplicates": within(duplicate_share),
        "edit_distance": [v for v in map(mean_pairwise_edit, per[:cap]) if v is not None],
        "distinct_1_across": distinct_n(pooled, 1), "distinct_2_across": distinct_n(pooled, 2),
        "duplicates_across": duplicate_share(pooled),
    }


def _best_scores(run: Path, t: int) -> dict[str, list[float]] | None:
    """prompt_id -> training-ranker scores of the model's own candidates (the dataset's left out)."""
    p = stage_dir(run, t, "rank") / "scores.jsonl"
    if not (stage_dir(run, t, "rank") / DONE_MARKER).is_file():
        return None
    out = {}
    for r in read_jsonl(p):
        srcs = r.get("sources") or ["sample"] * len(r["scores"])
        mine = [s for s, src in zip(r["scores"], srcs) if not str(src).startswith("dataset_")]
        if mine:
            out[r["prompt_id"]] = mine
    return out


def coverage(run: Path, t: int) -> dict | None:
    """Ranker scores of iteration t's candidates: all of them, each prompt's best and mean, whether
    its best beats the start model's best (iteration 1's candidates are the start model's), and the
    chosen-minus-rejected margin of the pairs."""
    scores = _best_scores(run, t)
    if scores is None:
        return None
    best = {pid: max(v) for pid, v in scores.items()}
    out = {"scores": [s for v in scores.values() for s in v], "best": list(best.values()),
           "mean": [mean(v) for v in scores.values()], "beats_start_best": [], "beats_kind": "none"}
    first = _best_scores(run, 1) if t > 1 else None
    if first:
        out["beats_start_best"], out["beats_kind"] = beats_start(best, {pid: max(v) for pid, v in first.items()})
    pairs = stage_dir(run, t, "pair")
    out["margin"] = ([p["score_chosen"] - p["score_rejected"] for p in read_jsonl(pairs / "pairs.jsonl")]
                     if (pairs / DONE_MARKER).is_file() else [])
    return out


def _key(run: Path, cfg, cap: int) -> str:
    """What the result depends on: each stage's done-marker (it changes whenever a stage is redone),
    the start model's settings, the cap and the scoring settings."""
    from selm.config import config_to_dict

    stages = {}
    for t in range(1, cfg.loop.iterations + 1):
        for s in ("generate", "rank", "pair", "train"):
            m = stage_dir(run, t, s) / DONE_MARKER
            stages[f"{t}/{s}"] = m.read_text(encoding="utf-8") if m.is_file() else None
            if s == "train":
                stages[f"{t}/model"] = (stage_dir(run, t, s) / "model").is_dir()
    tc = cfg.train
    return sha256_json({"version": VERSION, "stages": stages, "model": config_to_dict(cfg)["model"], "seed": cfg.seed,
                        "cap": cap, "scoring": [tc.max_length, tc.max_prompt_length, tc.layout]})


def run_exploration(run: Path, cfg, prompts: int | None = None) -> dict:
    """The exploration statistics of the run folder `run` (per-prompt values, per iteration), from
    RUN/analysis/exploration.json when its inputs have not changed, else computed and cached there.
    `prompts` overrides report.exploration_prompts."""
    run = Path(run)
    cap = cfg.report.exploration_prompts if prompts is None else prompts
    dest, key = run / CACHE, _key(run, cfg, cap)
    if dest.is_file():
        old = read_json(dest)
        if old.get("key") == key:
            return old
    T = cfg.loop.iterations
    dist = distances(run, cfg, T, cap)
    rows = []
    for t in range(1, T + 1):
        gens = _generations(run, t)
        rows.append({"iteration": t, "distance": dist.get(t, {}),
                     "diversity": diversity(gens, cap) if gens is not None else None, "coverage": coverage(run, t)})
    data = {"key": key, "prompts_scored": cap, "reference": cfg.train.reference,
            "temperature": cfg.generate.temperature, "top_p": cfg.generate.top_p, "per_iteration": rows}
    atomic_write_json(dest, data)
    return data
