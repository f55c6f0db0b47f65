"""Studies: several arms (config variants) x several seeds of the online loop, side by side.

The demo is a study with arms "selm" (alpha > 0) and "dpo" (alpha = 0); the alpha sweep is one arm
per alpha. Layout::

    DIR/study.json                     arms, seeds, base config
    DIR/<arm>/seed_<s>/                an ordinary run folder (selm status works on it)
    DIR/analysis/heldout_pairs.jsonl   held-out chosen/rejected for implicit rewards
    DIR/analysis/implicit_rewards.json
    DIR/report.md, DIR/plots/*.png     (selm report DIR rebuilds them)

Arms differ only in training settings, so within a seed they share the start model's evaluation
and iteration 1's generate/rank/pair stages (same model, prompts and seed give the same files):
those are computed once and copied, not recomputed.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from selm.config import Config, ConfigError, apply_overrides, config_from_dict, upgrade_keys
from selm.io import atomic_write_json, is_done, read_json
from selm.layout import study_run

SHAREABLE = ("iter_0/evaluate", "iter_1/generate", "iter_1/rank", "iter_1/pair")


@dataclass
class Arm:
    name: str
    overrides: list[str] = field(default_factory=list)


def arm_config(base: dict, arm: Arm, seed: int) -> Config:
    data = apply_overrides(copy.deepcopy(base), list(arm.overrides) + [f"seed={seed}"])
    return config_from_dict(data)


def arm_configs(study: dict) -> dict[str, Config]:
    """Each arm's config (at the study's first seed), read from study.json with the config's defaults.
    Arms differ only in their overrides: any of them gives the settings they share (iterations,
    bootstrap samples)."""
    return {a["name"]: arm_config(study["base"], Arm(**a), study["seeds"][0]) for a in study["arms"]}


def same_study(saved: dict, spec: dict) -> bool:
    """Whether a saved study.json asks for the same study as `spec`, old key spellings in either base
    config (rank.url, ...) counting as their new ones."""
    return {**saved, "base": upgrade_keys(saved.get("base"))} == {**spec, "base": upgrade_keys(spec.get("base"))}


def _training_only(overrides: list[str]) -> bool:
    return all(o.split("=", 1)[0].startswith(("train.", "loop.learning_rates")) for o in overrides)


def run_study(base: dict, out: Path, arms: list[Arm], seeds: list[int], *, allow_config_change: bool = False,
              title: str = "study", jobs: int | None = 1, after_run=None) -> Path:
    """Run every arm x seed (resuming what is done). `jobs` > 1 runs that many arm-seed runs at once,
    one process each (studies/parallel.py); None chooses from the CPU cores and memory
    (parallel.auto_jobs). Results are the same for any number of jobs. `after_run(out, arm, seed)`,
    a module-level function, runs in each run's process once its loop has finished (the report's
    per-run analysis)."""
    from tqdm.auto import tqdm

    from selm.loop import preflight, stage_count

    out = Path(out)
    if jobs is None:
        from selm.studies.parallel import auto_jobs

        jobs, why = auto_jobs(len(arms) * len(seeds))
        print(f"selm: {jobs} run{'s' * (jobs != 1)} at a time (--jobs auto: {why})", flush=True)
    if jobs < 1:
        raise ConfigError("--jobs: must be >= 1")
    cfgs = {(a.name, s): arm_config(base, a, s) for a in arms for s in seeds}  # validate all before running
    # Before study.json is written, so that a corrected re-run is not refused as a change. Arms share
    # the data, model and rankers (they differ in training settings): the first config checks them.
    preflight(next(iter(cfgs.values())))
    out.mkdir(parents=True, exist_ok=True)
    spec = {"title": title, "arms": [{"name": a.name, "overrides": a.overrides} for a in arms], "seeds": seeds,
            "base": base}
    spec_path = out / "study.json"
    if spec_path.is_file() and not same_study(read_json(spec_path), spec) and not allow_config_change:
        raise ConfigError(f"{spec_path}: this study was started with different arms, seeds or config; "
                          "pass --continue-with-new-config to go on with the new one")
    atomic_write_json(spec_path, spec)
    # Each run's analysis (after_run) is one more step of the bar: it takes a while on real models.
    total = sum(stage_count(c) for c in cfgs.values()) + (len(cfgs) if after_run is not None else 0)
    bar = tqdm(total=total, desc=title, unit="stage", position=0)
    try:  # closed before a stop or an error is printed, so the message gets a line of its own
        if jobs > 1 and len(arms) * len(seeds) > 1:
            from selm.studies.parallel import done_stages, run_tasks

            runs = [(study_run(out, a.name, s), cfgs[(a.name, s)].loop.iterations) for a in arms for s in seeds]

            def progress():
                n = done_stages(runs, analysis=after_run is not None)
                if n != bar.n:  # a refresh writes a whole line when stderr is not a terminal
                    bar.n = n
                    bar.refresh()

            # First arms first: the other arms of a seed wait for its shared stages (see _run_arm).
            order = [(i, s) for i in range(len(arms)) for s in seeds]
            run_tasks(_run_arm, [(base, out, arms, i, s, allow_config_change, None, None, True, after_run)
                                 for i, s in order],
                      [out / "logs" / f"{arms[i].name}_seed_{s}.log" for i, s in order], jobs, progress=progress)
            progress()
        else:
            first_run: Path | None = None
            for s in seeds:
                for i in range(len(arms)):
                    _run_arm(base, out, arms, i, s, allow_config_change, first_run, bar, after_run=after_run)
                first_run = first_run or study_run(out, arms[0].name, s)
    finally:
        bar.close()
    return out


def _run_arm(base: dict, out: Path, arms: list[Arm], i: int, s: int, allow_config_change: bool,
             first_run: Path | None, bar=None, wait: bool = False, after_run=None) -> None:
    """Arm i of seed s. Arms after the first copy the first arm's shareable stages (with `wait`, they
    wait for them: another process is computing them), and the start model's evaluation is copied
    from `first_run` (another seed's run; else this seed's first arm) where it is the same computation."""
    import time

    from selm.loop import run_loop

    arm, first = arms[i], study_run(out, arms[0].name, s)
    cfg = arm_config(base, arm, s)
    run_dir = study_run(out, arm.name, s)
    if i > 0 and _training_only(arm.overrides) and _training_only(arms[0].overrides):
        while wait and not all(is_done(first / rel) for rel in SHAREABLE if rel.startswith("iter_1")):
            time.sleep(2.0)
        _share(first, run_dir)
    elif i > 0 or first_run is not None:
        _share_start_eval(cfg, first_run or first, run_dir)
    started = []

    def tick(t, stage):
        # Called before each stage: the previous one of this run has finished.
        if bar is not None:
            bar.update(1 if started else 0)
            bar.set_postfix_str(f"{arm.name} seed {s} iter {t} {stage}")
        started.append(stage)

    run_loop(cfg, run_dir, allow_config_change=allow_config_change, on_stage=tick)
    if bar is not None:
        bar.update(1)
    if after_run is not None:
        if bar is not None:
            bar.set_postfix_str(f"{arm.name} seed {s} analysis")
        after_run(out, arm, s)
        if bar is not None:
            bar.update(1)


def _share(src: Path, dst: Path) -> None:
    """Copy finished stages that do not depend on training settings (see the module docstring)."""
    for rel in SHAREABLE:
        a, b = src / rel, dst / rel
        if is_done(a) and not is_done(b):
            if b.exists():
                shutil.rmtree(b)
            shutil.copytree(a, b)
    if is_done(src / "data") and not is_done(dst / "data"):
        shutil.copytree(src / "data", dst / "data", dirs_exist_ok=True)
    if (src / "start_model").is_dir() and not (dst / "start_model").exists():
        shutil.copytree(src / "start_model", dst / "start_model")


def _share_start_eval(cfg, src: Path, dst: Path) -> None:
    """Across seeds, the start model's GREEDY evaluation on the same held-out file is the same
    computation; copy it instead of redoing it. (The tiny model is built from the seed: not shared.)"""
    from selm.loop import check_config, prepare_data

    if cfg.model.name_or_path == "tiny" or cfg.evaluate.temperature != 0 or not is_done(src / "iter_0" / "evaluate"):
        return
    dst.mkdir(parents=True, exist_ok=True)
    check_config(cfg, dst, allow_change=False)
    prepare_data(cfg, dst)
    same = (src / "data" / "eval.jsonl").read_bytes() == (dst / "data" / "eval.jsonl").read_bytes()
    b = dst / "iter_0" / "evaluate"
    if same and not is_done(b):
        if b.exists():
            shutil.rmtree(b)
        shutil.copytree(src / "iter_0" / "evaluate", b)


def load_study(out: Path) -> dict:
    p = Path(out) / "study.json"
    if not p.is_file():
        raise ConfigError(f"{out}: not a study folder (no study.json)")
    return read_json(p)
