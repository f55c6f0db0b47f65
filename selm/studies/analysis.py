"""Implicit rewards of trained models on held-out preference pairs (the paper's Fig. 4).

Held-out pairs: for each evaluation prompt (never trained on), two samples from the start model,
ranked by the GOLD judge: chosen = better, rejected = worse (ties dropped). The implicit reward of
model t is beta * (logp_t(y|x) - logp_start(y|x)), measured against the common start model so
that arms are comparable.

Each run scores its own models as soon as it has finished (analyse_run, called by the study in
the run's process), so under --jobs the scoring runs in parallel; the log-probs are cached per model
in analysis/implicit/ and the report only gathers them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selm.data import PairRecord
from selm.io import (DONE_MARKER, atomic_write_json, atomic_write_jsonl, exclusive_lock, is_done, mark_done, read_json,
                     read_jsonl, sha256_json)
from selm.layout import model_dir, study_run
from selm.studies.steps import Steps
from selm.studies.study import arm_config, arm_configs, Arm, load_study

HELDOUT_PROMPTS = 48


def heldout_pairs(out: Path) -> Path:
    """The study's held-out pairs (analysis/heldout/pairs.jsonl), made on first use."""
    d = Path(out) / "analysis"
    if is_done(d / "heldout"):
        return d / "heldout" / "pairs.jsonl"
    # Runs that finish together (--jobs) would each make the same pairs: one makes them, the others wait.
    with exclusive_lock(d / ".heldout.lock"):
        if not is_done(d / "heldout"):
            _make_heldout_pairs(out, d)
    return d / "heldout" / "pairs.jsonl"


def _make_heldout_pairs(out: Path, d: Path) -> None:
    from selm.stages.evaluate import gold_scores
    from selm.engines.generation import generate
    from selm.models import load_causal_lm, load_tokenizer, set_threads
    from selm.precision import generation_dtype

    study = load_study(out)
    first = Arm(**study["arms"][0])
    seed = study["seeds"][0]
    run = study_run(out, first.name, seed)
    cfg = arm_config(study["base"], first, seed)
    from selm.loop import start_model_path

    set_threads(cfg.generate.num_threads)
    model_path = start_model_path(cfg, run)
    # 48 prompts keep the cost of scoring every trained model small (it is forward passes of each
    # model over every pair) while giving intervals worth reading.
    prompts = read_jsonl(run / "data" / "eval.jsonl")[:HELDOUT_PROMPTS]
    tok = load_tokenizer(model_path)
    # In the generate stages' dtype (generate.dtype), as the start model's evaluation was generated.
    model = load_causal_lm(model_path, generation_dtype(cfg.generate.dtype, cfg.model.dtype, "cpu")).eval()
    samples = generate(model, tok, [p["prompt"] for p in prompts], num_samples=2,
                       temperature=max(cfg.generate.temperature, 1e-3), top_p=cfg.generate.top_p,
                       max_new_tokens=cfg.evaluate.max_new_tokens, greedy=False, batch_size=cfg.generate.batch_size,
                       seed=seed + 4242, progress="held-out pairs")
    del model
    rows = []
    flat_prompts = [p["prompt"] for p in prompts for _ in range(2)]
    gold = gold_scores(cfg, flat_prompts, [s for pair in samples for s in pair])
    for i, (p, (a, b)) in enumerate(zip(prompts, samples)):
        ga, gb = gold[2 * i], gold[2 * i + 1]
        if ga == gb:
            continue
        ch, rj = (a, b) if ga > gb else (b, a)
        rows.append({"prompt_id": p["prompt_id"], "prompt": p["prompt"], "chosen": ch, "rejected": rj,
                     "gold_chosen": max(ga, gb), "gold_rejected": min(ga, gb)})
    atomic_write_jsonl(d / "heldout" / "pairs.jsonl", rows)
    mark_done(d / "heldout", {"pairs": len(rows), "prompts": len(prompts)})


def _logps(model_path: Path, pairs: list[PairRecord], cfg) -> dict[str, torch.Tensor]:
    """Summed log-probs of chosen and rejected under the model at `model_path`, kind -> (N,) float32.

    Scored as training scores its reference (same scoring path, layout, precision and device: CUDA
    when there is one), so these log-probs match the ones training used.
    """
    from selm.objective.logprobs import model_logps, tokenize_pairs

    return model_logps(model_path, cfg, lambda tok: tokenize_pairs(
        tok, pairs, max_length=cfg.train.max_length, max_prompt_length=cfg.train.max_prompt_length,
        with_exploration=False), train_precision=True)[0]


def _scoring_key(out: Path, model_path: Path, cfg) -> str:
    """What a model's log-probs on the held-out pairs depend on: the pairs (their done-marker changes
    when they are remade), the model folder and its weight files (a retrained model has new files),
    and the scoring settings."""
    from selm.models import default_device
    from selm.precision import autocast_dtype

    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model_path).glob("*.safetensors"))
    tc = cfg.train
    return sha256_json({
        "pairs": (Path(out) / "analysis" / "heldout" / DONE_MARKER).read_text(encoding="utf-8"),
        "model": str(Path(model_path).resolve()), "weights": weights,
        "scoring": [tc.max_length, tc.max_prompt_length, tc.layout, str(autocast_dtype(tc.bf16, default_device())),
                    cfg.model.dtype]})


def heldout_logps(out: Path, model_path: Path, cfg) -> dict[str, list[float]]:
    """Log-probs of the held-out pairs' chosen and rejected under one model (kind -> per pair),
    cached in analysis/implicit/ and recomputed only when what they depend on changes."""
    import hashlib

    out, model_path = Path(out), Path(model_path)
    key = _scoring_key(out, model_path, cfg)
    name = hashlib.sha256(str(model_path.resolve()).encode()).hexdigest()[:16]
    dest = out / "analysis" / "implicit" / f"{name}.json"
    # Runs of one seed share a start model: the first to get here scores it, the others read the file.
    with exclusive_lock(dest.with_suffix(".lock")):
        if dest.is_file():
            old = read_json(dest)
            if old.get("key") == key:
                return old["logps"]
        rows = read_jsonl(out / "analysis" / "heldout" / "pairs.jsonl")
        pairs = [PairRecord(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
        logps = {k: v.tolist() for k, v in _logps(model_path, pairs, cfg).items()} if pairs else {}
        atomic_write_json(dest, {"key": key, "model": str(model_path), "logps": logps})
    return logps


def analyse_run(out: Path, arm: Arm, seed: int) -> None:
    """The report's numbers of one finished run, computed where the run ran, as soon as it has finished
    (so that under --jobs the runs' analyses run in parallel, and the report phase only gathers
    them): its exploration statistics, and the log-probs of the held-out pairs under its start model
    and its trained models (the pairs are made once, by the first run to get here)."""
    from selm.loop import start_model_path
    from selm.models import set_threads
    from selm.studies.exploration import run_exploration

    out = Path(out)
    study = load_study(out)
    cfg = arm_config(study["base"], arm, seed)
    run = study_run(out, arm.name, seed)
    set_threads(cfg.generate.num_threads)
    if arm.name == study["arms"][0]["name"] and seed == study["seeds"][0]:
        heldout_pairs(out)  # the pairs' own run makes them first, while runs finishing with it score exploration
    run_exploration(run, cfg)
    models = [start_model_path(cfg, run)] + [model_dir(run, t) for t in range(1, cfg.loop.iterations + 1)]
    models = [m for m in models if m.is_dir()]
    if len(models) >= 2:
        heldout_pairs(out)
        with Steps(f"analysis of {arm.name}/seed_{seed}: held-out log-probs", len(models)) as steps:
            for i, m in enumerate(models):
                steps.start("start model" if i == 0 else f"iteration {i}'s model")
                heldout_logps(out, m, cfg)
    # For the study's progress bar only: the numbers above are cached by what they depend on.
    mark_done(run / "analysis", {"models": len(models)})


def implicit_rewards(out: Path) -> Path:
    """Write analysis/implicit_rewards.json (per arm/seed/iteration means, and SELM - DPO)."""
    from selm.models import set_threads
    from selm.studies.plots import interval_summary

    out = Path(out)
    dest = out / "analysis" / "implicit_rewards.json"
    study = load_study(out)
    pairs_path = heldout_pairs(out)
    rows = read_jsonl(pairs_path)
    if not rows:
        return dest
    shared = next(iter(arm_configs(study).values()))
    T = shared.loop.iterations
    from selm.loop import start_model_path

    per: dict = {}
    start_cache: dict = {}
    runs = []  # (arm, seed, config, start model, trained models by iteration): counted first for the progress lines
    for a in study["arms"]:
        arm = Arm(**a)
        for s in study["seeds"]:
            cfg = arm_config(study["base"], arm, s)
            run = study_run(out, arm.name, s)
            models = {t: model_dir(run, t) for t in range(1, T + 1)}
            runs.append((arm, s, cfg, start_model_path(cfg, run), {t: m for t, m in models.items() if m.is_dir()}))
    total = len({str(r[3]) for r in runs}) + sum(len(r[4]) for r in runs)
    # Mostly read from analysis/implicit/ (each run's own analysis computed them): the lines show progress
    # only where a model is scored here.
    with Steps("report: implicit rewards", total) as steps:
        for arm, s, cfg, sp, models in runs:
            set_threads(cfg.generate.num_threads)
            if str(sp) not in start_cache:
                steps.start(f"start model of {arm.name} seed {s}")
                start_cache[str(sp)] = heldout_logps(out, sp, cfg)
            ref = start_cache[str(sp)]
            for t, m in models.items():
                steps.start(f"{arm.name} seed {s} iteration {t}")
                lp = heldout_logps(out, m, cfg)
                per[f"{arm.name}/{s}/{t}"] = {k: [cfg.train.beta * (x - y) for x, y in zip(lp[k], ref[k])] for k in lp}
    diff = []
    if {"selm", "dpo"} <= {a["name"] for a in study["arms"]}:
        for t in range(1, T + 1):
            entry = {"iteration": t}
            for kind in ("chosen", "rejected"):
                groups = []
                for s in study["seeds"]:
                    a, b = per.get(f"selm/{s}/{t}"), per.get(f"dpo/{s}/{t}")
                    if a and b:
                        groups.append([x - y for x, y in zip(a[kind], b[kind])])
                entry[kind] = interval_summary(groups, shared.evaluate.bootstrap_samples)
            diff.append(entry)
    atomic_write_json(dest, {
        "description": (f"{len(rows)} held-out pairs: two start-model samples per evaluation prompt, ranked by the "
                        "gold judge. Implicit reward = beta * (logp_model - logp_start). Positive: SELM assigns a "
                        "higher implicit reward than DPO."),
        "means": {k: {kind: sum(v[kind]) / len(v[kind]) for kind in v} for k, v in per.items()},
        "diff": diff,
    })
    return dest
