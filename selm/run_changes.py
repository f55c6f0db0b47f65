"""What a changed config (`--continue-with-new-config`) means for an existing run folder.

A stage is redone from its start when a setting it reads changed, or when a stage whose output it
reads is redone; every other finished stage stays done. Growing `loop.iterations` keeps the prompt
slices of the iterations already run and takes the new slices from the training prompts no slice has
yet; shrinking it is refused while the later iterations' folders are there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from selm.config import Config, ConfigError, config_to_dict
from selm.io import read_json, read_jsonl

# Settings that change how fast or how loudly a stage runs, never what it writes (keys inside the stage's section).
_NO_EFFECT = {
    "generate": {"num_threads", "vllm_gpu_memory_utilization", "vllm_enforce_eager"},
    "rank": {"batch_size", "endpoint.max_concurrency", "endpoint.timeout_s", "endpoint.max_retries",
             "endpoint.api_key_env"},
    "train": {"logging_steps", "report_to", "tensorboard", "save_every_steps", "num_threads", "release_memory"},
    # Switching evaluation off leaves the evaluations already done as they are.
    "evaluate": {"enabled"},
}


def _flat(d: dict, prefix: str, skip: set[str] = frozenset(), inner: str = "") -> dict:
    """{prefix + dotted key: value} of a section; `skip` holds dotted keys inside it."""
    out = {}
    for k, v in d.items():
        if f"{inner}{k}" in skip:
            continue
        if isinstance(v, dict) and k != "extra_body":
            out.update(_flat(v, f"{prefix}{k}.", skip, f"{inner}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stage_settings(cfg: Config, t: int, stage: str) -> dict:
    """The settings stage `stage` of iteration t reads, as {key: value} (per-iteration schedules
    resolved to iteration t's value)."""
    d = config_to_dict(cfg)
    common = {"seed": d["seed"], **_flat(d["model"], "model.")}
    if stage == "generate":
        return {**common, **_flat(d["generate"], "generate.", _NO_EFFECT["generate"])}
    if stage == "rank":
        return _flat(d["rank"], "rank.", _NO_EFFECT["rank"])
    if stage == "pair":
        return _flat(d["pair"], "pair.")
    if stage == "train":
        own = _flat(d["train"], "train.", _NO_EFFECT["train"] | {"alpha", "learning_rate"})
        alpha_key = f"loop.alphas[{t - 1}]" if cfg.loop.alphas else "train.alpha"
        lr_key = f"loop.learning_rates[{t - 1}]" if cfg.loop.learning_rates else "train.learning_rate"
        return {**common, **own, alpha_key: cfg.alpha_for_iteration(t), lr_key: cfg.lr_for_iteration(t)}
    if stage == "evaluate":
        gen = {k: d["generate"][k] for k in ("backend", "tensor_parallel_size")}
        return {**common, **_flat(d["evaluate"], "evaluate.", _NO_EFFECT["evaluate"]), **_flat(gen, "generate.")}
    raise ValueError(stage)


def _changed(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _inputs(t: int, stage: str) -> list[tuple[int, str]]:
    """The stages of the run whose output (t, stage) reads ("data" slices are handled apart)."""
    if stage == "generate":
        return [(t - 1, "train")] if t > 1 else []
    if stage == "evaluate":
        return [] if t == 0 else [(t, "train"), (0, "evaluate")] + ([(t - 1, "evaluate")] if t > 1 else [])
    if stage == "train":
        return [(t, "pair")] + ([(t - 1, "train")] if t > 1 else [])
    return [(t, {"rank": "generate", "pair": "rank"}[stage])]


def plan(old: Config, new: Config, out: Path) -> tuple[list[tuple[str, str]], tuple[list[list[dict]], list[dict]] | None]:
    """The stage folders of `out` to redo under `new` as (folder, why), in run order, and the new
    data split to write (None: the split on disk stands). Raises ConfigError when `new` would
    shrink the run under its existing iterations or when the prompts left cannot fill new slices."""
    from selm.layout import STAGES, stage_dir

    out = Path(out)
    later = sorted(int(p.name[5:]) for p in out.glob("iter_*") if p.name[5:].isdigit() and int(p.name[5:]) > new.loop.iterations)
    if later:
        raise ConfigError(f"loop.iterations: {new.loop.iterations} is fewer than the {later[-1]} iterations this run "
                          f"has; delete {', '.join(str(out / f'iter_{t}') for t in later)} to shrink it")
    split, slice_changed, eval_changed = None, set(), False
    if (out / "data" / "DONE.json").is_file():
        split = new_split(old, new, out / "data")
        kept, held = _on_disk(out / "data")
        slice_changed = {t for t, s in enumerate(split[0], 1) if t <= len(kept) and s != kept[t - 1]}
        eval_changed = split[1] != held
        if not slice_changed and not eval_changed and len(split[0]) <= len(kept):
            split = None
    redo: dict[tuple[int, str], str] = {}
    for t in range(0, new.loop.iterations + 1):
        for stage in STAGES if t else ("evaluate",):
            why = _changed(stage_settings(old, t, stage), stage_settings(new, t, stage)) if t <= old.loop.iterations else []
            if stage == "generate" and t in slice_changed:
                why.insert(0, f"its prompt slice data/train_{t}.jsonl changed")
            if stage == "evaluate" and eval_changed:
                why.insert(0, "the held-out prompts data/eval.jsonl changed")
            upstream = [f"iter_{a}/{b}" for a, b in _inputs(t, stage) if (a, b) in redo]
            if upstream and not why:
                why = [f"it reads {upstream[0]}, which is redone"]
            if why and stage_dir(out, t, stage).exists():
                redo[(t, stage)] = "; ".join(why[:3]) + (" ..." if len(why) > 3 else "")
    return [(f"iter_{t}/{s}", why) for (t, s), why in redo.items()], split


def apply(out: Path, redo: list[tuple[str, str]], split) -> None:
    """Remove the stage folders to redo (a training stage's checkpoint with them), then write the
    new split (data/DONE.json replaced last: a kill in between leaves the old count marked done,
    and the re-run plans again from there)."""
    from selm.data import write_split

    for folder, _ in redo:
        shutil.rmtree(Path(out) / folder)
    if redo or split is not None:  # the run is not finished any more
        (Path(out) / "DONE.json").unlink(missing_ok=True)
    if split is not None:  # the stages it changes are gone already; its DONE.json is replaced last
        write_split(Path(out) / "data", *split)


def _on_disk(d: Path) -> tuple[list[list[dict]], list[dict]]:
    """The slices and held-out prompts data/ holds (as many slices as its DONE.json counts)."""
    count = len(read_json(d / "DONE.json")["train_slices"])
    return [read_jsonl(d / f"train_{t}.jsonl") for t in range(1, count + 1)], read_jsonl(d / "eval.jsonl")


def new_split(old: Config, new: Config, d: Path) -> tuple[list[list[dict]], list[dict]]:
    """The split `new` asks for. With the data settings and seed unchanged, the slices on disk stay
    and new ones (loop.iterations grown) take the training prompts no slice has yet; otherwise the
    split is made afresh (and the iterations whose slice changed are redone)."""
    from selm.data import split_from_config

    same_data = old.seed == new.seed and config_to_dict(old.data) == config_to_dict(new.data)
    return split_from_config(new, kept=_on_disk(d)[0] if same_data else None)
