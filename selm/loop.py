"""The online loop: for t = 1..T, generate -> rank -> pair -> train -> evaluate (docs/method.md).

The loop only sequences stages; each stage reads files and writes files in the run folder::

    DIR/config.yaml                    the resolved config of the run (saved once preflight passed)
    DIR/config_changes.log             what each --continue-with-new-config changed
    DIR/start_model/                   the built-in tiny model (when model.name_or_path is "tiny")
    DIR/data/                          train_<t>.jsonl slices, eval.jsonl
    DIR/iter_0/evaluate/               the start model on the held-out prompts (the baseline)
    DIR/iter_<t>/{generate,rank,pair,train,evaluate}/

Every stage folder gets DONE.json last (FAILED.json with the error if it failed). A re-run skips finished stages, wipes an unfinished one and
redoes it from its start -- except training, which resumes from its last checkpoint (io.ensure_stage;
ITERATION_STAGES says which stage reads which and which resumes).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

from selm import dist
from selm.config import Config, ConfigError, check_for_loop, config_to_dict, load_yaml, save_config, upgrade_keys
from selm.io import (DONE_MARKER, InputError, atomic_write_jsonl, clean_stale_temporaries, ensure_stage, is_done,
                     is_done_everywhere, mark_done, on_main, read_json)
from selm.data import split_from_config, write_split
from selm.layout import STAGES, model_dir, stage_dir


def preflight(cfg: Config, out: Path | None = None) -> None:
    """Check what can be checked from the config before a run starts (and before its config.yaml is
    saved, so that a corrected re-run is not refused as a config change): the loop's required keys,
    that the prompts load and split, that the start model, reward models and callables are there, and
    that the metric loggers asked for are installed. Raises ConfigError / InputError naming the key."""
    from selm.engines.rankers import import_function
    from selm.models import check_model_source, local_model_dir

    check_for_loop(cfg)
    if out is None or not is_done(Path(out) / "data"):
        split_from_config(cfg)
    check_model_source(cfg.model)
    judges = [("rank", cfg.rank)] + ([("evaluate.judge", cfg.evaluate.judge)] if cfg.evaluate.enabled else [])
    for key, rc in judges:
        if rc.kind in ("callable", "pairwise"):
            import_function(rc.callable, key)
        elif rc.kind in ("reward_model", "pairrm"):
            local_model_dir(rc.model, f"{key}.model", rc.revision)
    check_loggers(cfg)


def check_loggers(cfg: Config) -> None:
    """The metric loggers of train.report_to are installed (before any work starts)."""
    import importlib.util

    if "wandb" in cfg.train.loggers() and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.report_to: 'wandb' needs the wandb package (pip install wandb)")


def check_config(cfg: Config, out: Path, allow_change: bool) -> None:
    """Save the config into the run folder once the run can start (preflight); refuse a different
    one for an existing run unless `allow_change`. An allowed change first removes the stages it
    affects (run_changes.plan: they are redone from their start) and says which and why."""
    check_for_loop(cfg)
    path = Path(out) / "config.yaml"
    # None: nothing saved yet. The main rank's view of the folder decides for every rank.
    # Old key spellings (rank.url, ...) in a saved config are the same settings as their new ones.
    diffs = on_main(lambda: _diff(upgrade_keys(load_yaml(path)), config_to_dict(cfg), config_to_dict(Config()))
                    if path.is_file() else None)
    if diffs is not None:
        if diffs and not allow_change:
            shown = "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "")
            raise ConfigError(f"{path}: this run was started with a different config ({shown}); "
                              "pass --continue-with-new-config to go on with the new one")
    preflight(cfg, out)
    if diffs:
        from selm import run_changes
        from selm.config import load_saved_config

        redo, split = run_changes.plan(load_saved_config(path), cfg, out)
    dist.barrier()  # every rank has read the saved config before the main rank replaces it
    if dist.is_main() and diffs != []:
        if diffs:
            for folder, why in redo:
                print(f"selm: redoing {folder} from its start ({why})", flush=True)
            run_changes.apply(out, redo, split)
            with open(Path(out) / "config_changes.log", "a", encoding="utf-8") as f:
                f.write("; ".join(diffs) + "\n")
        save_config(cfg, path)
    dist.barrier()


_ABSENT = object()


def _diff(old, new, defaults=None, prefix="") -> list[str]:
    """Differences between the saved and the new config as "key: old -> new". A key the saved config
    lacks (written before the key existed) that keeps its default is no change."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        defaults = defaults if isinstance(defaults, dict) else {}
        for k in sorted(set(old) | set(new)):
            o = old.get(k, _ABSENT)
            if o is _ABSENT and new.get(k) == defaults.get(k, _ABSENT):
                continue
            out += _diff(None if o is _ABSENT else o, new.get(k), defaults.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def start_model_path(cfg: Config, out: Path) -> Path:
    from selm.models import materialize_model

    with dist.main_first():  # the main rank builds or converts it; the others then find it there
        return materialize_model(cfg.model, run_dir=Path(out), seed=cfg.seed)


def model_for_iteration(cfg: Config, out: Path, t: int) -> Path:
    """The model that starts iteration t (and, by default, is its reference): iteration t-1's output."""
    if t == 1:
        return start_model_path(cfg, out)
    prev = stage_dir(out, t - 1, "train")
    if not is_done_everywhere(prev):
        raise InputError(f"{prev}: not finished; iteration {t} starts from iteration {t - 1}'s model")
    return model_dir(out, t - 1)


def prepare_data(cfg: Config, out: Path) -> Path:
    d = Path(out) / "data"
    ensure_stage(d, partial(_split_data, cfg))
    return d


def _split_data(cfg: Config, d: Path) -> None:
    write_split(d, *split_from_config(cfg))


def _seed(cfg: Config, t: int) -> int:
    return cfg.seed * 1000 + t


def _generate(cfg: Config, out: Path, t: int, sd: Path) -> None:
    from selm.stages.generate import run_generate

    run_generate(cfg, model_for_iteration(cfg, out, t), out / "data" / f"train_{t}.jsonl", sd, seed=_seed(cfg, t))


def _rank(cfg: Config, out: Path, t: int, sd: Path) -> None:
    from selm.stages.rank import run_rank

    run_rank(cfg, stage_dir(out, t, "generate") / "generations.jsonl", sd)


def _pair(cfg: Config, out: Path, t: int, sd: Path) -> None:
    from selm.stages.pair import run_pair

    stats = run_pair(stage_dir(out, t, "rank") / "scores.jsonl", sd, min_margin=cfg.pair.min_margin,
                     missing_eos_penalty=cfg.pair.missing_eos_penalty)
    if stats["pairs"] == 0:
        raise InputError(f"{sd}: iteration {t} produced no preference pairs "
                         f"({stats['ties_dropped']} ties); lower pair.min_margin or add candidates")


def reference_for_iteration(cfg: Config, out: Path, t: int) -> Path | None:
    """Iteration t's reference model when it is not the model that starts the iteration (None):
    the run's start model from iteration 2 on, with train.reference "initial"."""
    if cfg.train.reference == "initial" and t >= 2:
        return start_model_path(cfg, out)
    return None


def _train(cfg: Config, out: Path, t: int, sd: Path) -> None:
    from selm.stages.train import run_train

    # The iteration's alpha goes in through the config, so the stage's config.yaml, its reference
    # cache key and DONE.json all record the alpha it trained with.
    cfg_t = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, alpha=cfg.alpha_for_iteration(t)))
    run_train(cfg_t, stage_dir(out, t, "pair") / "pairs.jsonl", model_for_iteration(cfg, out, t), sd,
              ref_model_path=reference_for_iteration(cfg, out, t), learning_rate=cfg.lr_for_iteration(t),
              seed=_seed(cfg, t))


class Stage(NamedTuple):
    after: str | None
    """The stage of the same iteration whose output this one reads."""
    run: Callable[[Config, Path, int, Path], None]
    """run(cfg, run folder, iteration, stage folder): writes the stage folder, DONE.json last."""
    resumes: bool = False
    """Continues from its own checkpoint (and keeps its reference cache) instead of starting over."""


# The stages of an iteration before its evaluation (which also runs for iteration 0: _evaluate).
ITERATION_STAGES = {
    "generate": Stage(None, _generate),
    "rank": Stage("generate", _rank),
    "pair": Stage("rank", _pair),
    "train": Stage("pair", _train, resumes=True),
}
assert STAGES == (*ITERATION_STAGES, "evaluate")  # layout.STAGES names them for readers


def stage_count(cfg: Config) -> int:
    """Stages a full run executes (for progress bars)."""
    per_iter = len(STAGES) - (0 if cfg.evaluate.enabled else 1)
    return cfg.loop.iterations * per_iter + (1 if cfg.evaluate.enabled else 0)


def run_stage(cfg: Config, out: Path, t: int, stage: str) -> dict:
    """Run one stage of iteration t if it is not done; its inputs must be done. Returns its marker."""
    out = Path(out)
    if stage == "evaluate":
        return _evaluate(cfg, out, t)
    if stage not in ITERATION_STAGES:
        raise InputError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    spec = ITERATION_STAGES[stage]
    _check_iteration(cfg, t, first=1)

    def build(sd: Path) -> None:
        prepare_data(cfg, out)
        prev = stage_dir(out, t, spec.after) if spec.after else None
        if prev and not is_done_everywhere(prev):
            raise InputError(f"{prev}: not finished; run `selm {spec.after}` for iteration {t} first")
        spec.run(cfg, out, t, sd)

    return ensure_stage(stage_dir(out, t, stage), build, resume=spec.resumes)


def _check_iteration(cfg: Config, t: int, first: int) -> None:
    # Before the stage folder exists: an iteration out of range names no folder of the run, and
    # nothing is created for it (not even a FAILED.json in a stray iter_99/).
    if t < first or t > cfg.loop.iterations:
        raise InputError(f"--iteration: must be in {first}..{cfg.loop.iterations}, got {t}")


def _evaluate(cfg: Config, out: Path, t: int) -> dict:
    """Evaluate iteration t's model (t = 0: the start model, the baseline) if not done; returns its marker."""
    _check_iteration(cfg, t, first=0)

    def build(sd: Path) -> None:
        from selm.stages.evaluate import run_evaluate

        prepare_data(cfg, out)
        if not cfg.evaluate.enabled:
            raise ConfigError("evaluate.enabled: is false")
        if t == 0:
            model = start_model_path(cfg, out)
            baselines = {}
        else:
            train = stage_dir(out, t, "train")
            if not is_done_everywhere(train):
                raise InputError(f"{train}: not finished; nothing to evaluate for iteration {t}")
            model = model_dir(out, t)
            baselines = {"start": _evaluated(cfg, out, 0)}
            if t > 1:
                baselines["previous"] = _evaluated(cfg, out, t - 1)
        run_evaluate(cfg, model, out / "data" / "eval.jsonl", sd, baselines=baselines, seed=cfg.seed)

    return ensure_stage(stage_dir(out, t, "evaluate"), build)


def _evaluated(cfg: Config, out: Path, t: int) -> Path:
    _evaluate(cfg, out, t)
    return stage_dir(out, t, "evaluate")


def run_loop(cfg: Config, out: Path, *, allow_config_change: bool = False, on_stage=None) -> dict:
    """Run every unfinished stage of every iteration. `on_stage(t, stage)` is called before each
    stage (done or not), e.g. to drive an outer progress bar."""
    out = Path(out)
    on_stage = on_stage or (lambda t, stage: None)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        # A run killed while writing the start model or config.yaml leaves its temporary behind here;
        # the stages clean their own folders.
        clean_stale_temporaries(out)
    check_config(cfg, out, allow_config_change)
    from selm.environment import record_environment

    record_environment(out, config_to_dict(cfg))
    prepare_data(cfg, out)
    evaluate = cfg.evaluate.enabled and on_main(lambda: (out / "data" / "eval.jsonl").stat().st_size > 0)
    if evaluate:
        on_stage(0, "evaluate")
        _evaluated(cfg, out, 0)
    for t in range(1, cfg.loop.iterations + 1):
        for stage in STAGES:
            if stage == "evaluate" and not evaluate:
                continue
            on_stage(t, stage)
            run_stage(cfg, out, t, stage)
    summary = on_main(lambda: summarize(out, cfg.loop.iterations))
    if dist.is_main():
        mark_done(out, summary)
    dist.barrier()
    return summary


def summarize(out: Path, iterations: int) -> dict:
    """Per-iteration headline numbers, read back from the stage files."""
    rows = []
    for t in range(0, iterations + 1):
        row: dict = {"iteration": t}
        ev = stage_dir(out, t, "evaluate") / "metrics.json"
        if ev.is_file():
            m = read_json(ev)
            row["gold_mean"] = m["gold_mean"]
            for name, w in m.get("win_rates", {}).items():
                row[f"win_rate_vs_{name}"] = w["win_rate"]
        pair = stage_dir(out, t, "pair") / DONE_MARKER
        if pair.is_file():
            row["pairs"] = read_json(pair).get("pairs")
        rows.append(row)
    return {"iterations": rows}
