"""Record formats and loading.

Pair record (the training stage's input; TRL's conversational preference format plus y0)::

    {"prompt": str | [messages], "chosen": str | [assistant message], "rejected": ...,
     "exploration": ...}

The pair stage also writes prompt_id, score_chosen/score_rejected and source_chosen/source_rejected,
which training does not read.
``exploration`` is y0, the reference model's own response; it may be absent only when alpha = 0.
Optional ``finished_chosen`` / ``finished_rejected`` / ``finished_exploration`` (bool, default true):
false marks a response cut at the generation limit, which is trained without an end-of-turn token.
Files may be JSONL, Parquet, or a `datasets` folder (save_to_disk). Errors name the file and row.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from selm.chat import Messages, normalize_prompt, response_text_of
from selm.io import InputError, iter_jsonl


@dataclass
class PairRecord:
    prompt: Messages
    chosen: str
    rejected: str
    exploration: str | None = None
    prompt_id: str | None = None
    finished: tuple[bool, bool, bool] = (True, True, True)
    """Whether chosen, rejected and exploration ended with the end of turn (False: cut at the limit)."""


def iter_rows(path: str | Path, split: str | None = None, split_key: str = "data.split",
              revision: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (location, row) from a JSONL file, a Parquet file, a `datasets` folder or a hub dataset
    id (at `revision`; selm/hub.py). location is "file:line" (JSONL) or "file row N" for error
    messages. `split` picks one split of a DatasetDict; `split_key` is the setting that names it."""
    from selm import hub

    if not Path(path).exists() and hub.is_repo_id(str(path)):
        import datasets

        ds, name = hub.load_dataset(str(path), split, revision), split or ""
        if isinstance(ds, datasets.DatasetDict):  # several splits and none named is refused, as for a folder
            name = _pick_split(Path(path), list(ds), split, split_key)
            ds = ds[name]
        for i, row in enumerate(ds):
            yield f"{path}{'[' + name + ']' if name else ''} row {i}", dict(row)
        return
    path = Path(path)
    if path.is_dir():
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets is a dependency
            raise InputError(f"{path}: a folder needs the `datasets` package") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise InputError(f"{path}: not a `datasets` folder saved with save_to_disk ({e})") from None
        name = ""
        if isinstance(ds, datasets.DatasetDict):
            name = _pick_split(path, list(ds), split, split_key)
            ds = ds[name]
        for i, row in enumerate(ds):
            yield f"{path}{'[' + name + ']' if name else ''} row {i}", dict(row)
    elif path.suffix == ".parquet":
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise InputError(f"{path}: cannot read Parquet ({e})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path} row {i}", row
    else:
        for lineno, row in iter_jsonl(path):
            yield f"{path}:{lineno}", row


def _pick_split(path: Path, splits: list[str], split: str | None, split_key: str) -> str:
    """The split to read: the one named, or the only one. Several and none named is refused rather
    than guessed (UltraFeedback-binarized starts with train_sft, not the preference split)."""
    if split is not None:
        if split not in splits:
            raise InputError(f"{split_key}: {path} has no split {split!r}; its splits: {', '.join(splits)}")
        return split
    if len(splits) == 1:
        return splits[0]
    how = f"name one with {split_key} or " if split_key else ""
    raise InputError(f"{path}: a `datasets` folder with several splits ({', '.join(splits)}); "
                     f"{how}give one split's own folder, e.g. {path / splits[0]}")


def pair_from_row(row: dict, where: str, *, need_exploration: bool) -> PairRecord:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row or row[key] is None:
            raise InputError(f"{where}: missing field {key!r}")
    prompt = row["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        raise InputError(f"{where}: field 'prompt' ends with an assistant turn")
    messages = normalize_prompt(prompt, f"{where}: field 'prompt'")
    chosen = _response(row["chosen"], messages, f"{where}: field 'chosen'")
    rejected = _response(row["rejected"], messages, f"{where}: field 'rejected'")
    exploration = row.get("exploration")
    if exploration is None:
        exploration = row.get("reference_response")  # the authors' datasets name y0 this way
    if exploration is None:
        if need_exploration:
            raise InputError(f"{where}: missing field 'exploration' (needed when train.alpha > 0; "
                             "for DPO pairs without it train with --set train.alpha=0)")
    else:
        exploration = _response(exploration, messages, f"{where}: field 'exploration'")
    pid = row.get("prompt_id")
    finished = []
    for key in ("finished_chosen", "finished_rejected", "finished_exploration"):
        value = row.get(key, True)
        if value is None:
            value = True
        if not isinstance(value, bool):
            raise InputError(f"{where}: field {key!r}: expected true or false, got {value!r}")
        finished.append(value)
    return PairRecord(messages, chosen, rejected, exploration, str(pid) if pid is not None else None,
                      tuple(finished))


def _response(value: Any, prompt: Messages, where: str) -> str:
    # UltraFeedback-style rows store the whole conversation (prompt turns + answer); accept that too.
    if isinstance(value, list) and len(value) > 1 and isinstance(value[-1], dict):
        if value[:-1] != prompt and [m.get("content") for m in value[:-1]] != [m["content"] for m in prompt]:
            raise InputError(f"{where}: the conversation does not start with the row's prompt")
        value = value[-1:]
    return response_text_of(value, where)


def load_pairs(path: str | Path, *, need_exploration: bool, strict: bool = False, warn: bool = True) -> list[PairRecord]:
    """The pairs of a file, less those whose chosen and rejected are the same response (and equally
    finished): such a row carries no preference, only noise, so it is dropped with a warning line
    that counts it (unless not `warn`) -- or, `strict`, refused."""
    rows = [(where, pair_from_row(row, where, need_exploration=need_exploration)) for where, row in iter_rows(path, None, "")]
    same = [where for where, p in rows if (p.chosen, p.finished[0]) == (p.rejected, p.finished[1])]
    if same and strict:
        raise InputError(f"{same[0]}: chosen and rejected are the same response ({len(same)} of {len(rows)} pairs "
                         "are); such a pair carries no preference")
    if same and warn:
        from selm import dist

        if dist.is_main():
            print(f"selm: warning: {path}: dropped {len(same)} of {len(rows)} pairs whose chosen and rejected are the "
                  f"same response (first: {same[0]}); they carry no preference", file=sys.stderr, flush=True)
    pairs = [p for where, p in rows if where not in set(same)]
    if not pairs:
        raise InputError(f"{path}: no pairs" + (" whose chosen and rejected differ" if rows else ""))
    return pairs


# ---------------------------------------------------------------------------------------------
# Prompt sets for the online loop.


def prompt_id_of(messages: Messages) -> str:
    import hashlib
    import json

    # A plain single-turn prompt hashes its text, as UltraFeedback's prompt_id does.
    text = messages[0]["content"] if len(messages) == 1 else json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_from_row(row: dict, where: str, prompt_field: str = "prompt") -> dict:
    """A prompt row -> {"prompt_id", "prompt" (messages), "chosen", "rejected"} (the last two are the
    dataset's own responses, or None). Accepts plain rows and UltraFeedback-binarized rows as they are."""
    if prompt_field in row and row[prompt_field] is not None:
        raw = row[prompt_field]
    elif isinstance(row.get("messages"), list) or isinstance(row.get("chosen"), list):
        conv = row.get("messages") if isinstance(row.get("messages"), list) else row["chosen"]
        raw = conv[:-1] if conv and isinstance(conv[-1], dict) and conv[-1].get("role") == "assistant" else conv
    else:
        raise InputError(f"{where}: missing field {prompt_field!r}")
    messages = normalize_prompt(raw, f"{where}: field {prompt_field!r}")
    out = {"prompt_id": str(row.get("prompt_id") or prompt_id_of(messages)), "prompt": messages,
           "chosen": None, "rejected": None}
    if row.get("chosen") is not None and row.get("rejected") is not None:
        out["chosen"] = _response(row["chosen"], messages, f"{where}: field 'chosen'")
        out["rejected"] = _response(row["rejected"], messages, f"{where}: field 'rejected'")
    return out


def load_prompts(path: str | Path, prompt_field: str = "prompt", split: str | None = None,
                 split_key: str = "data.split", revision: str | None = None) -> list[dict]:
    """Load a prompt set; a prompt repeated under the same id is kept once (first occurrence). One id
    given to two different prompts is refused: results are keyed by id, so one of them would be lost.
    `split` picks one split of a `datasets` folder (`split_key` names the setting, for errors)."""
    seen: dict[str, tuple[str, Messages]] = {}
    out = []
    for where, row in iter_rows(path, split, split_key, revision):
        rec = prompt_from_row(row, where, prompt_field)
        first = seen.get(rec["prompt_id"])
        if first is not None:
            if first[1] != rec["prompt"]:
                raise InputError(f"{where}: prompt_id {rec['prompt_id']!r} is already used by a different prompt "
                                 f"at {first[0]}")
            continue
        seen[rec["prompt_id"]] = (where, rec["prompt"])
        out.append(rec)
    if not out:
        raise InputError(f"{path}: no prompts")
    return out


def split_prompts(prompts: list[dict], *, iterations: int, eval_size: int, max_prompts: int | None,
                  slices: str, shuffle: bool, seed: int, has_eval_file: bool, per_iteration: int | None = None,
                  kept: list[list[dict]] | None = None) -> tuple[list[list[dict]], list[dict]]:
    """Split into per-iteration training slices and a held-out evaluation set (disjoint).

    The training prompts are taken in one fixed order (shuffled with `seed`). `kept`: the slices of
    the iterations a run already has, which stay as they are; the slices after them take, in that
    order, the training prompts no kept slice has (so a run grown from T to T' iterations keeps its
    first T slices, and equals a T'-iteration run whenever the slices do not depend on T:
    `per_iteration`, or `max_prompts` grown with the iterations)."""
    import random

    prompts = list(prompts)
    if shuffle:
        random.Random(seed).shuffle(prompts)
    used = {r["prompt_id"] for s in kept or [] for r in s}
    # A kept slice's prompt is never held out (prompts added to a file of an extended run can
    # reorder it); held-out prompts are those of the ordered file no kept slice has.
    held = [] if has_eval_file else [r for r in prompts if r["prompt_id"] not in used][:eval_size]
    held_ids = {r["prompt_id"] for r in held}
    train = [r for r in prompts if r["prompt_id"] not in held_ids]
    if max_prompts is not None:
        train = train[:max_prompts]
    parts = _slices(train, iterations, slices, per_iteration)
    if not kept or slices == "all" or _ids(parts[:len(kept)]) == _ids(kept[:len(parts)]):
        return parts, held
    pool = [r for r in train if r["prompt_id"] not in used]
    out = list(kept[:iterations])
    for t in range(len(kept) + 1, iterations + 1):
        need = len(parts[t - 1])
        if len(pool) < need:
            raise InputError(f"loop.iterations: iteration {t} needs {need} training prompts and {len(pool)} are left "
                             f"after the {len(used)} that iterations 1..{len(kept)} use; add prompts to data.prompts "
                             "or raise data.max_prompts (set data.prompts_per_iteration in runs you mean to extend)")
        out.append(pool[:need])
        pool = pool[need:]
    return out, held


def _ids(parts: list[list[dict]]) -> list[list[str]]:
    return [[r["prompt_id"] for r in s] for s in parts]


def _slices(train: list[dict], iterations: int, slices: str, per_iteration: int | None) -> list[list[dict]]:
    if per_iteration is not None:
        if slices == "disjoint" and len(train) < per_iteration * iterations:
            raise InputError(f"data.prompts_per_iteration: {iterations} slices of {per_iteration} need "
                             f"{per_iteration * iterations} training prompts, there are {len(train)}")
        step = per_iteration if slices == "disjoint" else 0
        return [train[t * step:t * step + per_iteration] for t in range(iterations)]
    if slices == "all":
        return [train] * iterations
    if len(train) < iterations:
        raise InputError(f"data.prompts: {len(train)} training prompts cannot make {iterations} disjoint slices")
    size, extra = divmod(len(train), iterations)
    parts, start = [], 0
    for t in range(iterations):
        end = start + size + (1 if t < extra else 0)
        parts.append(train[start:end])
        start = end
    return parts


def split_from_config(cfg, kept: list[list[dict]] | None = None) -> tuple[list[list[dict]], list[dict]]:
    """The run's training slices and held-out prompts, from the prompt files `cfg` (a Config) names.
    `kept`: the slices the run already has, which stay (split_prompts)."""
    from selm.config import ConfigError

    d = cfg.data
    if not d.prompts:
        raise ConfigError("data.prompts: required to run the loop")
    prompts = load_prompts(d.prompts, d.prompt_field, d.split, "data.split", d.revision)
    # eval_split without eval_prompts: the held-out prompts are another split of the same folder.
    eval_source = d.eval_prompts or (d.prompts if d.eval_split else None)
    eval_rows = (load_prompts(eval_source, d.prompt_field, d.eval_split, "data.eval_split", d.revision)
                 if eval_source else None)
    slices, held = split_prompts(prompts, iterations=cfg.loop.iterations, eval_size=d.eval_size,
                                 max_prompts=d.max_prompts, slices=d.slices, shuffle=d.shuffle,
                                 seed=cfg.seed, has_eval_file=eval_rows is not None,
                                 per_iteration=d.prompts_per_iteration, kept=kept)
    if eval_rows is not None:
        train_ids = {r["prompt_id"] for s in slices for r in s}
        held = [r for r in eval_rows if r["prompt_id"] not in train_ids]  # held-out means held out
    if d.max_eval_prompts is not None:
        held = held[:d.max_eval_prompts]
    return slices, held


def write_split(d: Path, slices: list[list[dict]], held: list[dict]) -> None:
    """The run's data/ folder: train_<t>.jsonl per iteration, eval.jsonl, and its done-marker last."""
    from selm.io import atomic_write_jsonl, mark_done

    for t, part in enumerate(slices, 1):
        atomic_write_jsonl(d / f"train_{t}.jsonl", part)
    atomic_write_jsonl(d / "eval.jsonl", held)
    mark_done(d, {"train_slices": [len(s) for s in slices], "eval": len(held)})
