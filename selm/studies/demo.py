"""`selm demo` and `selm sweep`: studies on the packaged demo config (selm/configs/demo.yaml).

The demo compares SELM with iterative DPO (alpha = 0) from the same start model, prompts and seeds;
the sweep varies alpha. Both end by writing the report (selm/studies/report.py).
"""

from __future__ import annotations

from pathlib import Path

from selm.config import apply_overrides, load_yaml, resolve_relative_paths

PACKAGED = Path(__file__).parent.parent / "configs" / "demo.yaml"
# The demo's --quick sizes: one seed, fewer prompts and tokens (measured to fit in 3 minutes; README).
QUICK = ["data.max_prompts=24", "data.max_eval_prompts=16", "generate.max_new_tokens=32", "evaluate.max_new_tokens=32"]


def _base(config: Path | None, quick: bool, overrides: list[str]) -> dict:
    path = Path(config) if config else PACKAGED
    base = resolve_relative_paths(load_yaml(path), path.resolve().parent)
    if quick:
        base = apply_overrides(base, QUICK)
    return apply_overrides(base, list(overrides))


def _finish(out: Path) -> Path:
    from selm.studies.analysis import implicit_rewards
    from selm.studies.report import build_report

    implicit_rewards(out)
    return build_report(out)


def run_demo(out: Path, *, quick: bool = False, seeds: list[int] | None = None, config: Path | None = None,
             overrides: list[str] = (), allow_config_change: bool = False) -> Path:
    from selm.config import config_from_dict
    from selm.studies.study import Arm, run_study

    base = _base(config, quick, list(overrides))
    alpha = config_from_dict(base).train.alpha
    if alpha == 0:
        from selm.config import ConfigError

        raise ConfigError("train.alpha: the demo compares SELM (alpha > 0) with DPO (alpha = 0); set alpha > 0")
    seeds = seeds or ([0] if quick else [0, 1])
    arms = [Arm("selm", [f"train.alpha={alpha}"]), Arm("dpo", ["train.alpha=0"])]
    run_study(base, out, arms, seeds, allow_config_change=allow_config_change,
              title="selm demo" + (" (quick)" if quick else ""))
    return _finish(out)


def run_sweep(out: Path, *, alphas: list[float], seeds: list[int] | None = None, quick: bool = False,
              config: Path | None = None, overrides: list[str] = (), allow_config_change: bool = False) -> Path:
    from selm.studies.study import Arm, run_study

    base = _base(config, quick, list(overrides))
    arms = [Arm(f"alpha_{a:g}", [f"train.alpha={a}"]) for a in alphas]
    run_study(base, out, arms, seeds or [0, 1], allow_config_change=allow_config_change, title="alpha sweep")
    return _finish(out)
