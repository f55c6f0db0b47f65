"""`selm status`: what is done, failed, unfinished or pending in a run folder (every stage), a study
folder (every run of it) or a standalone `selm train` folder, read from the files alone."""

from __future__ import annotations

import json
from pathlib import Path

from selm.config import Config, load_saved_config
from selm.io import DONE_MARKER, FAILED_MARKER, InputError, is_done, read_json
from selm.layout import ITERATION_GLOB, stage_dir, study_run
from selm.layout import STAGES
from selm.studies.study import Arm, arm_config


def status(out: Path) -> list[tuple[str, str, str]]:
    """(what, state, detail) rows for a run folder (every stage), a study folder (every run of it) or
    a standalone `selm train` folder."""
    out = Path(out)
    if (out / "study.json").is_file():
        return _study_status(out)
    if _is_training_folder(out):
        return [("train", *_state(out)), ("model", "done" if is_done(out) else "pending", "" if not is_done(out)
                 else f"{out / 'model'} (a standalone `selm train` folder)")]
    if not (out / "config.yaml").is_file():
        raise InputError(f"{out}: not a selm run folder (no config.yaml); `selm status` reads the folder given "
                         "to `selm run --output-dir`, `selm train --output-dir`, `selm demo`, `selm sweep` or `selm study`")
    cfg = load_saved_config(out / "config.yaml")
    rows = [("data", *_state(out / "data"))]
    for t, stage in run_stages(cfg):
        rows.append((f"iter_{t}/{stage}", *_state(stage_dir(out, t, stage))))
    done = sum(r[1] == "done" for r in rows)
    rows.append(("run", "done" if done == len(rows) else "not done", f"{done}/{len(rows)} stages done"))
    return rows


def run_stages(cfg: Config) -> list[tuple[int, str]]:
    """(iteration, stage) of every stage a full run executes, in order."""
    out = [(0, "evaluate")] if cfg.evaluate.enabled else []
    for t in range(1, cfg.loop.iterations + 1):
        out += [(t, s) for s in STAGES if s != "evaluate" or cfg.evaluate.enabled]
    return out


def _is_training_folder(out: Path) -> bool:
    """A standalone `selm train --output-dir` folder: training files and no run layout."""
    from selm.training.engine import CHECKPOINT
    from selm.training.metrics import METRICS, PARTIAL

    if (out / "data").exists() or any(out.glob(ITERATION_GLOB)):
        return False
    return any((out / name).exists() for name in ("model", METRICS, PARTIAL, CHECKPOINT))


def _study_status(out: Path) -> list[tuple[str, str, str]]:
    """One row per run of a demo or sweep folder (study.json), from each run folder's stages."""
    study = read_json(out / "study.json")
    rows = []
    for arm in study["arms"]:
        for seed in study["seeds"]:
            run = study_run(out, arm["name"], seed)
            stages = [("data", run / "data")] + [(f"iter_{t}/{s}", stage_dir(run, t, s))
                                                 for t, s in run_stages(arm_config(study["base"], Arm(**arm), seed))]
            states = [(name, _state(d)[0]) for name, d in stages]
            done = sum(st == "done" for _, st in states)
            failed = [name for name, st in states if st == "failed"]
            state = "done" if done == len(states) else "failed" if failed else "pending" if not run.exists() else "not done"
            detail = f"{done}/{len(states)} stages done" + (f"; {failed[0]} failed" if failed else "")
            rows.append((f"{arm['name']}/seed_{seed}", state, detail))
    report = out / "report.md"
    rows.append(("report", "done" if report.is_file() else "pending", str(report) if report.is_file() else ""))
    return rows


def _state(sd: Path) -> tuple[str, str]:
    """done | failed (FAILED.json: the error) | unfinished (what a killed or running stage left) | pending."""
    if is_done(sd):
        info = read_json(sd / DONE_MARKER)
        keys = ("pairs", "ties_dropped", "prompts", "steps", "gold_mean", "samples", "scored", "skipped")
        detail = ", ".join(f"{k}={info[k]:.4g}" if isinstance(info[k], float) else f"{k}={info[k]}"
                           for k in keys if k in info)
        return "done", detail
    if (sd / FAILED_MARKER).is_file():
        return "failed", f"{read_json(sd / FAILED_MARKER).get('error', '')} (fix it and re-run)"
    if sd.exists():
        progress = _training_progress(sd)
        if progress:
            return "unfinished", progress
        if sd.name == "train":  # the reference cache, if written, is kept
            return "unfinished", "stopped or running before its first step; a re-run starts the training"
        return "unfinished", "stopped or running; a re-run redoes it"
    return "pending", ""


def _training_progress(sd: Path) -> str:
    """"step 5/8 logged, checkpoint at step 4; a re-run resumes there" for a training folder."""
    from selm.training.engine import CHECKPOINT
    from selm.training.metrics import PARTIAL

    parts = []
    metrics = sd / PARTIAL
    if metrics.is_file():
        lines = [l for l in metrics.read_text(encoding="utf-8").splitlines() if l.strip()]
        try:
            last = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:  # a line cut by a kill
            last = json.loads(lines[-2]) if len(lines) > 1 else None
        if last and "step" in last:
            total = f"/{last['total_steps']}" if "total_steps" in last else ""
            parts.append(f"step {last['step']}{total} logged")
    ck = sd / CHECKPOINT / "state.json"
    if ck.is_file():
        parts.append(f"checkpoint at step {read_json(ck)['step']}; a re-run resumes there")
    elif parts:
        parts.append("no checkpoint yet; a re-run starts the training over")
    return ", ".join(parts)
