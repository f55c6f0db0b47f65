"""MT-Bench-style single-answer grading: two-turn questions, each answer rated 1-10 by an LLM judge.

The model answers each question's first turn, then its second turn with its OWN first answer in the
conversation. The judge (an OpenAI-compatible endpoint, called concurrently through ChatClient)
rates the first answer from the first turn alone and the second answer with both turns shown; the
rating is read from ``[[n]]`` only. A reply without one is a failed parse: counted per turn and
reported, never a score.

Output folder (``--output-dir``, default ``<model folder or run folder>/eval/mtbench/<answers key>``)::

    answers/answers.jsonl   FastChat-like {"question_id", "category", "model_id", "choices": [{"index": 0,
                            "turns": [a1, a2]}], "num_tokens", "finished"}; DONE.json holds the key
    judge-<name>-<key>/     judgments.jsonl ({"question_id", "category", "turn", "score" (null: no
                            rating), "judgment", "finish_reason" ("length": cut at judge_max_tokens),
                            "judge"}), scores.json, DONE.json last

The answers are keyed by (model identity: its folder and its files' sizes and mtimes, or the answers
file's hash; the question file's hash; the generation settings), so judging again with another
judge reuses them, and a finished judge folder is not asked again.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm.config import Config, ModelConfig
from selm.io import (InputError, atomic_write_json, atomic_write_jsonl, ensure_stage, iter_jsonl, mark_done,
                     read_json, read_jsonl, sha256_file, sha256_json)
from selm.layout import ITERATION_GLOB
from selm.stats import grouped_bootstrap_ci, mean

PACKAGED_QUESTIONS = Path(__file__).resolve().parent.parent / "data" / "mtbench_questions.jsonl"
TURNS = 2

JUDGE_SYSTEM = (
    "You grade answers written by an AI assistant. Judge correctness first, then helpfulness, relevance, "
    "depth, clarity and honesty; length is no merit in itself. Be strict: 9-10 only for an answer that "
    "could hardly be improved, 1-3 for one that is wrong, off-topic or unhelpful. When a reference answer "
    "is given, use it to check correctness. Write a brief justification of a few sentences, then give "
    "your rating as a whole number from 1 to 10 in double square brackets on the last line, e.g. "
    "Rating: [[6]]"
)
FIRST_TURN = ("Rate the assistant's answer to the question.\n\n[Question]\n{q1}\n{ref}\n[Assistant's answer]\n{a1}\n"
              "[End of answer]")
SECOND_TURN = (
    "Below is a two-turn conversation. Rate ONLY the assistant's second answer, in the context of the "
    "whole conversation (the second question may build on the first answer).\n\n[User, turn 1]\n{q1}\n\n"
    "[Assistant, turn 1]\n{a1}\n\n[User, turn 2]\n{q2}\n{ref}\n[Assistant, turn 2: the answer to rate]\n"
    "{a2}\n[End of conversation]"
)
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


@dataclass(frozen=True)
class Question:
    question_id: Any
    category: str
    turns: tuple[str, str]
    reference: tuple[str, ...] | None = None


def load_questions(path: str | Path) -> list[Question]:
    """FastChat's question file: one JSON per line, {"question_id", "category", "turns": [t1, t2],
    optional "reference": [r1, r2]}. Errors name the file and line."""
    out, seen = [], set()
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for name in ("question_id", "turns"):
            if name not in rec:
                raise InputError(f"{where}: missing field {name!r}")
        qid, turns, ref = rec["question_id"], rec["turns"], rec.get("reference")
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise InputError(f"{where}: question_id: expected a number or a string, got {qid!r}")
        if qid in seen:
            raise InputError(f"{where}: duplicate question_id {qid!r}")
        seen.add(qid)
        if not (isinstance(turns, list) and len(turns) == TURNS
                and all(isinstance(t, str) and t.strip() for t in turns)):
            raise InputError(f"{where}: turns: expected a list of {TURNS} non-empty strings (question_id {qid!r})")
        if ref is not None and not (isinstance(ref, list) and len(ref) <= TURNS
                                    and all(isinstance(r, str) for r in ref)):
            raise InputError(f"{where}: reference: expected a list of up to {TURNS} strings (question_id {qid!r})")
        category = rec.get("category", "general")
        if not isinstance(category, str) or not category:
            raise InputError(f"{where}: category: expected a non-empty string (question_id {qid!r})")
        out.append(Question(qid, category, (turns[0], turns[1]), tuple(ref) if ref else None))
    if not out:
        raise InputError(f"{path}: no questions")
    return out


def load_answers(path: str | Path, questions: list[Question]) -> dict[Any, list[str]]:
    """A file of the model's answers: FastChat's {"question_id", "choices": [{"turns": [a1, a2]}]} or
    {"question_id", "turns": [a1, a2]}; every question must have one."""
    answers: dict[Any, list[str]] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        turns = rec["choices"][0].get("turns") if isinstance(rec.get("choices"), list) and rec["choices"] \
            and isinstance(rec["choices"][0], dict) else rec.get("turns")
        if "question_id" not in rec:
            raise InputError(f"{where}: missing field 'question_id'")
        if not (isinstance(turns, list) and len(turns) == TURNS and all(isinstance(t, str) for t in turns)):
            raise InputError(f"{where}: expected \"choices\": [{{\"turns\": [{TURNS} strings]}}] or \"turns\": "
                             f"[{TURNS} strings] (question_id {rec['question_id']!r})")
        answers[rec["question_id"]] = turns
    missing = [q.question_id for q in questions if q.question_id not in answers]
    if missing:
        raise InputError(f"{path}: no answer for question_id {missing[0]!r} "
                         f"({len(missing)} of {len(questions)} missing)")
    return answers


# ---------------------------------------------------------------------------------------------
# Which model, and where its results go


def resolve_model(spec: str, cfg: Config) -> tuple[Path, str, Path]:
    """(model folder, model id, default base folder) for a model folder, a folder holding model/, a run
    folder (its last trained iteration), "tiny", "pypi:PACKAGE" or a hub id in the local cache."""
    from selm.models import local_model_dir, materialize_model

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, path.resolve().name if path.name != "model" else _label(path), path
        if (path / "model" / "config.json").is_file():
            return path / "model", _label(path / "model"), path
        trained = sorted((d for d in path.glob(f"{ITERATION_GLOB}/train") if (d / "DONE.json").is_file()),
                         key=lambda d: int(d.parent.name.split("_")[1]) if d.parent.name[5:].isdigit() else -1)
        if not trained:
            raise InputError(f"model: {spec}: not a model folder (no config.json) nor a run folder with a finished "
                             "iteration")
        return trained[-1] / "model", f"{path.resolve().name}/{trained[-1].parent.name}", path
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-")
    if spec == "tiny" or spec.startswith("pypi:"):
        folder = materialize_model(ModelConfig(name_or_path=spec, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype),
                                   seed=cfg.seed)
        return folder, spec, Path("runs") / slug
    return local_model_dir(spec, "model"), spec, Path("runs") / slug


def _label(model_dir: Path) -> str:
    """"run/iter_2" for runs/run/iter_2/train/model, else the folder's own name."""
    parts = model_dir.resolve().parts
    if len(parts) >= 4 and parts[-2] == "train" and parts[-3].startswith("iter_"):
        return f"{parts[-4]}/{parts[-3]}"
    return parts[-1]


def model_identity(folder: Path) -> dict:
    """The folder and its files' names, sizes and modification times: a re-trained or re-converted
    model is a new identity, without hashing gigabytes of weights."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return {"folder": str(folder.resolve()), "files": files}


def generation_settings(cfg: Config) -> dict:
    m = cfg.mtbench
    return {"max_new_tokens": m.max_new_tokens, "temperature": m.temperature, "seed": cfg.seed,
            "dtype": cfg.model.dtype, "backend": cfg.generate.backend}


# ---------------------------------------------------------------------------------------------
# Answers


def generate_answers(cfg: Config, model_path: Path, questions: list[Question]) -> list[dict]:
    """The model's two answers per question: turn 2 is asked after its own turn-1 answer."""
    from selm.engines import generation
    from selm.engines.sampling import SamplingParams
    from selm.models import set_threads

    m, g = cfg.mtbench, cfg.generate
    set_threads(g.num_threads)
    # Turn 2 holds the model's own first answer: not cut to training's prompt length.
    generator = generation.generator_from_config(cfg, model_path, batch_size=m.batch_size, cut_prompts=False)
    greedy = m.temperature == 0

    def ask(conversations: list[list[dict]], turn: int) -> list:
        params = SamplingParams(num_samples=0 if greedy else 1, temperature=m.temperature, top_p=1.0,
                                max_new_tokens=m.max_new_tokens, include_greedy=greedy, seed=cfg.seed + turn - 1)
        return [row[0] for row in generator.generate(conversations, params, progress=f"mtbench: turn {turn}")]

    first = ask([[{"role": "user", "content": q.turns[0]}] for q in questions], 1)
    second = ask([[{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": a.text},
                   {"role": "user", "content": q.turns[1]}] for q, a in zip(questions, first)], 2)
    return [{"question_id": q.question_id, "category": q.category,
             "choices": [{"index": 0, "turns": [a.text, b.text]}],
             "num_tokens": [a.num_tokens, b.num_tokens], "finished": [a.finished, b.finished]}
            for q, a, b in zip(questions, first, second)]


def ensure_answers(folder: Path, key: str, build) -> list[dict]:
    """answers/ under `folder`: made once per key; a folder holding another key's answers is refused."""
    stage = folder / "answers"
    if (stage / "DONE.json").is_file() and read_json(stage / "DONE.json").get("key") != key:
        raise InputError(f"{folder}: holds answers of another model, question file or generation settings; "
                         "choose another --output-dir (or delete that folder)")

    def make(sd: Path) -> None:
        t0 = time.perf_counter()
        atomic_write_jsonl(sd / "answers.jsonl", build())
        mark_done(sd, {"key": key, "seconds": round(time.perf_counter() - t0, 3)})

    ensure_stage(stage, make)
    return read_jsonl(stage / "answers.jsonl")


# ---------------------------------------------------------------------------------------------
# Judging


def parse_judge_rating(text: str) -> float | None:
    """The last ``[[n]]`` in a judge's reply, if 1 <= n <= 10; anything else is no rating."""
    found = _RATING.findall(text or "")
    if not found:
        return None
    value = float(found[-1])
    return value if 1.0 <= value <= 10.0 else None


def _reference(q: Question, turn: int) -> str:
    if not q.reference or len(q.reference) < turn:
        return ""
    return f"\n[Reference answer]\n{q.reference[turn - 1]}\n"


def judge_messages(q: Question, answer: list[str], turn: int) -> list[dict]:
    """The judge's conversation for one answer; turn 2 shows both turns."""
    if turn == 1:
        user = FIRST_TURN.format(q1=q.turns[0], ref=_reference(q, 1), a1=answer[0])
    else:
        user = SECOND_TURN.format(q1=q.turns[0], a1=answer[0], q2=q.turns[1], ref=_reference(q, 2), a2=answer[1])
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def judge_answers(cfg: Config, questions: list[Question], answers: dict[Any, list[str]]) -> list[dict]:
    """One judgment per (question, turn), in that order; every request concurrently (ChatClient)."""
    from selm.engines.llm_client import endpoint_client

    m = cfg.mtbench
    client = endpoint_client(m.judge, "mtbench.judge")
    cells = [(q, t) for q in questions for t in range(1, TURNS + 1)]
    replies = client.complete([judge_messages(q, answers[q.question_id], t) for q, t in cells],
                              where=[f"question_id {q.question_id!r}, turn {t}" for q, t in cells],
                              temperature=0, max_tokens=m.judge_max_tokens)
    return [{"question_id": q.question_id, "category": q.category, "turn": t,
             "score": parse_judge_rating(r.text), "judgment": r.text, "finish_reason": r.finish_reason,
             "judge": m.judge.model}
            for (q, t), r in zip(cells, replies)]


def summarize(judgments: list[dict], *, samples: int, seed: int) -> dict:
    """Means per turn, per category and overall (over the ratings that parsed), failed parses per
    turn, and bootstrap 95% intervals over questions."""
    def block(rows: list[dict]) -> dict:
        scores = [r["score"] for r in rows if r["score"] is not None]
        by_q: dict[Any, list[float]] = {}
        for r in rows:
            if r["score"] is not None:
                by_q.setdefault(r["question_id"], []).append(r["score"])
        ci = grouped_bootstrap_ci(list(by_q.values()), samples=samples, seed=seed)
        return {"mean": mean(scores), "ci95": list(ci), "n": len(scores), "failed_parses": len(rows) - len(scores)}

    turns = {str(t): block([r for r in judgments if r["turn"] == t]) for t in range(1, TURNS + 1)}
    categories = {}
    for cat in sorted({r["category"] for r in judgments}):
        rows = [r for r in judgments if r["category"] == cat]
        per_turn = {str(t): mean([r["score"] for r in rows if r["turn"] == t and r["score"] is not None])
                    for t in range(1, TURNS + 1)}
        categories[cat] = {**block(rows), "turns": per_turn, "questions": len({r["question_id"] for r in rows})}
    return {"questions": len({r["question_id"] for r in judgments}), "turns": turns, "categories": categories,
            "overall": block(judgments)}


def format_table(scores: dict) -> str:
    """The printed summary: one row per category, then the overall row and the failed parses."""
    def f(x: float) -> str:
        return "   -  " if x != x else f"{x:6.2f}"

    width = max([len("overall")] + [len(c) for c in scores["categories"]])
    lines = [f"{'category':<{width}}  turn 1  turn 2     all   n"]
    for cat, c in scores["categories"].items():
        lines.append(f"{cat:<{width}}  {f(c['turns']['1'])}  {f(c['turns']['2'])}  {f(c['mean'])}  {c['n']:>2}")
    t, o = scores["turns"], scores["overall"]
    ci = (f"95% CI [{o['ci95'][0]:.2f}, {o['ci95'][1]:.2f}]" if o["n"] else "no rating parsed")
    lines.append(f"{'overall':<{width}}  {f(t['1']['mean'])}  {f(t['2']['mean'])}  {f(o['mean'])}  {o['n']:>2}"
                 f"   {ci} over {scores['questions']} questions")
    lines.append(f"replies without a [[rating]]: turn 1: {t['1']['failed_parses']}, turn 2: {t['2']['failed_parses']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command


def run_mtbench(cfg: Config, *, model: str | None = None, answers: str | Path | None = None,
                output_dir: str | Path | None = None) -> tuple[dict, Path]:
    """Answer (or read the answers), judge and score. Returns (scores, the judge folder)."""
    m = cfg.mtbench
    if (model is None) == (answers is None):
        raise InputError("mtbench: give a model (folder, run folder, tiny or pypi:PACKAGE) or --answers FILE, not both")
    for name in ("url", "model"):
        if not getattr(m.judge, name):
            raise InputError(f"mtbench.judge.{name}: a judge is required: --judge-url URL --judge-model NAME "
                             "(an OpenAI-compatible endpoint)")
    qpath = Path(m.questions) if m.questions else PACKAGED_QUESTIONS
    questions = load_questions(qpath)
    if answers is not None:
        apath = Path(answers)
        load_answers(apath, questions)  # checked before anything is written
        model_id, base = apath.stem, apath.parent
        key = sha256_json({"answers": sha256_file(apath), "questions": sha256_file(qpath)})
        build = lambda: _records_from_file(apath, questions, model_id)  # noqa: E731
    else:
        folder, model_id, base = resolve_model(model, cfg)
        key = sha256_json({"model": model_identity(folder), "questions": sha256_file(qpath),
                           "generation": generation_settings(cfg)})
        build = lambda: [{**r, "model_id": model_id} for r in generate_answers(cfg, folder, questions)]  # noqa: E731
    out = Path(output_dir) if output_dir else base / "eval" / "mtbench" / key[:12]
    records = ensure_answers(out, key, build)
    by_id = {r["question_id"]: r["choices"][0]["turns"] for r in records}

    judge = {"url": m.judge.url, "model": m.judge.model, "max_tokens": m.judge_max_tokens,
             "prompt": sha256_json([JUDGE_SYSTEM, FIRST_TURN, SECOND_TURN])[:12]}
    if m.judge.extra_body:  # (absent otherwise: judgments cached before the setting existed keep their key)
        judge["extra_body"] = m.judge.extra_body
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", m.judge.model).strip("-")[:40]
    jdir = out / f"judge-{slug}-{sha256_json({**judge, 'answers': key})[:8]}"

    def make(sd: Path) -> None:
        judgments = judge_answers(cfg, questions, by_id)
        scores = {"model_id": model_id, "judge": {k: judge[k] for k in ("url", "model", "extra_body") if k in judge},
                  **summarize(judgments, samples=m.bootstrap_samples, seed=cfg.seed),
                  "answers": str(out / "answers" / "answers.jsonl"), "questions_file": str(qpath)}
        atomic_write_jsonl(sd / "judgments.jsonl", judgments)
        atomic_write_json(sd / "scores.json", scores)
        mark_done(sd, {"overall": scores["overall"]["mean"]})

    ensure_stage(jdir, make)
    return read_json(jdir / "scores.json"), jdir


def _records_from_file(path: Path, questions: list[Question], model_id: str) -> list[dict]:
    answers = load_answers(path, questions)
    return [{"question_id": q.question_id, "category": q.category, "model_id": model_id,
             "choices": [{"index": 0, "turns": answers[q.question_id]}]} for q in questions]

