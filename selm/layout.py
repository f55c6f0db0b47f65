"""Where things are in a run folder and a study folder: every reader and writer builds its paths here.

    run/data/                         prompts split into iterations and held-out
    run/iter_t/<stage>/               generate, rank, pair, train, evaluate (iter_0: evaluate only)
    run/iter_t/train/model/           the model iteration t trained
    study/<arm>/seed_<s>/             one run of a demo or sweep
"""

from __future__ import annotations

from pathlib import Path

ITERATION_GLOB = "iter_*"
STAGES = ("generate", "rank", "pair", "train", "evaluate")
"""An iteration's stages in order (iteration 0 has evaluate only)."""


def iter_dir(run: Path, t: int) -> Path:
    return Path(run) / f"iter_{t}"


def stage_dir(run: Path, t: int, stage: str) -> Path:
    return iter_dir(run, t) / stage


def model_dir(run: Path, t: int) -> Path:
    """The model iteration t trained (a Hugging Face folder)."""
    return stage_dir(run, t, "train") / "model"


def study_run(study: Path, arm: str, seed: int) -> Path:
    """The run folder of one arm and seed of a study."""
    return Path(study) / arm / f"seed_{seed}"
