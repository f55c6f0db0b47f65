"""`selm demo`, `selm sweep` and `selm study`: studies on the packaged demo config (selm/configs/demo.yaml)
or on a study file (selm/configs/studies/*.yaml are the packaged presets).

The demo compares SELM with iterative DPO (alpha = 0) from the same start model, prompts and seeds;
the sweep varies alpha. Both end by writing the report (selm/studies/report.py).
"""

from __future__ import annotations

from pathlib import Path

from selm.config import apply_overrides, load_yaml, resolve_relative_paths

PACKAGED = Path(__file__).parent.parent / "configs" / "demo.yaml"
# The demo's --quick sizes: one seed, fewer prompts and tokens (measured to fit in 3 minutes; docs/demo.md).
QUICK = ["data.max_prompts=24", "data.max_eval_prompts=16", "generate.max_new_tokens=32", "evaluate.max_new_tokens=32"]


def _base(config: Path | None, quick: bool, overrides: list[str]) -> dict:
    path = Path(config) if config else PACKAGED
    base = resolve_relative_paths(load_yaml(path), path.resolve().parent)
    if quick:
        base = apply_overrides(base, QUICK)
    return apply_overrides(base, list(overrides))


def _analyse(out: Path, arm, seed: int) -> None:
    """Each run's share of the report (run_study's after_run)."""
    from selm.studies.analysis import analyse_run

    analyse_run(out, arm, seed)


def _finish(out: Path) -> Path:
    from selm.studies.analysis import implicit_rewards
    from selm.studies.report import build_report

    implicit_rewards(out)
    return build_report(out)


def run_demo(out: Path, *, quick: bool = False, seeds: list[int] | None = None, config: Path | None = None,
             overrides: list[str] = (), allow_config_change: bool = False, jobs: int | None = 1) -> Path:
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
              title="selm demo" + (" (quick)" if quick else ""), jobs=jobs, after_run=_analyse)
    return _finish(out)


def run_sweep(out: Path, *, alphas: list[float], seeds: list[int] | None = None, quick: bool = False,
              config: Path | None = None, overrides: list[str] = (), allow_config_change: bool = False,
              jobs: int | None = 1) -> Path:
    from selm.studies.study import Arm, run_study

    base = _base(config, quick, list(overrides))
    arms = [Arm(f"alpha_{a:g}", [f"train.alpha={a}"]) for a in alphas]
    run_study(base, out, arms, seeds or [0, 1], allow_config_change=allow_config_change, title="alpha sweep",
              jobs=jobs, after_run=_analyse)
    return _finish(out)


PRESETS = Path(__file__).parent.parent / "configs" / "studies"


def _deep_merge(into: dict, over: dict) -> dict:
    for k, v in over.items():
        into[k] = _deep_merge(dict(into.get(k) or {}), v) if isinstance(v, dict) else v
    return into


def load_study_spec(spec: Path | None = None, preset: str | None = None) -> tuple[dict, list, list[int], str]:
    """(base config dict, arms, seeds, title) from a study file: `config` (a config file, relative to
    the study file), `base` (keys merged over it), `seeds`, `arms` (each `name` and `set`: overrides)
    and `title`. `preset` names a packaged study file (selm/configs/studies/<preset>.yaml)."""
    from selm.config import ConfigError
    from selm.studies.study import Arm

    if preset is not None:
        names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        if preset not in names:
            raise ConfigError(f"--preset: unknown study preset {preset!r}; one of {', '.join(names)}")
        spec = PRESETS / f"{preset}.yaml"
    spec = Path(spec)
    data = load_yaml(spec)
    unknown = set(data) - {"title", "config", "base", "seeds", "arms"}
    if unknown:
        raise ConfigError(f"{spec}: unknown key(s) {', '.join(sorted(unknown))}; expected title, config, base, seeds, arms")
    where = spec.resolve().parent
    config = Path(data["config"]) if data.get("config") else PACKAGED
    config = config if config.is_absolute() else where / config
    base = resolve_relative_paths(load_yaml(config), config.resolve().parent)
    base = _deep_merge(base, resolve_relative_paths(dict(data.get("base") or {}), where))
    arms = data.get("arms")
    if not isinstance(arms, list) or not arms:
        raise ConfigError(f"{spec}: arms: a list of {{name, set}} entries is required")
    out = []
    for i, a in enumerate(arms):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not a["name"]:
            raise ConfigError(f"{spec}: arms[{i}]: needs a name")
        if "/" in a["name"] or a["name"].startswith("."):
            raise ConfigError(f"{spec}: arms[{i}].name: {a['name']!r} is used as a folder name; no '/' or leading '.'")
        sets = a.get("set") or []
        if not isinstance(sets, list) or not all(isinstance(x, str) and "=" in x for x in sets):
            raise ConfigError(f"{spec}: arms[{i}].set: a list of KEY=VALUE overrides")
        out.append(Arm(a["name"], list(sets)))
    if len({a.name for a in out}) != len(out):
        raise ConfigError(f"{spec}: arms: names must be distinct")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{spec}: seeds: a non-empty list of integers")
    return base, out, seeds, str(data.get("title") or spec.stem)


def run_study_file(out: Path, *, spec: Path | None = None, preset: str | None = None, seeds: list[int] | None = None,
                   overrides: list[str] = (), jobs: int | None = 1, allow_config_change: bool = False) -> Path:
    """`selm study`: the study described by a study file (or a packaged preset), then its report."""
    from selm.studies.study import run_study

    base, arms, spec_seeds, title = load_study_spec(spec, preset)
    base = apply_overrides(base, list(overrides))
    run_study(base, out, arms, seeds or spec_seeds, allow_config_change=allow_config_change, title=title, jobs=jobs,
              after_run=_analyse)
    return _finish(out)
