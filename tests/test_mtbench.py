"""`selm eval mtbench` end to end on the tiny model with a judge server on 127.0.0.1 started here:
scores per turn and category equal hand-computed values, replies without [[n]] are counted and not
scored, turn 2 is asked (and judged) after the model's own first answer, answers are cached across
judges, and bad input or a judge that stays down is one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from helpers_cli import message_lines
from helpers_rank import JudgeServer
from selm.cli import main
from selm.config import Config
from selm.engines import generation
from selm.evaluation.mtbench import (PACKAGED_QUESTIONS, format_table, load_questions, parse_judge_rating,
                                     resolve_model, summarize)

# Six questions in three categories; the judge's reply is keyed on the marker in the question text.
QUESTIONS = [{"question_id": i, "category": cat, "turns": [f"Q{i}T1: name a colour.", f"Q{i}T2: and another one?"]}
             for i, cat in zip(range(1, 7), ["alpha", "alpha", "beta", "beta", "gamma", "gamma"])]
QUESTIONS[0]["reference"] = ["REF-ONE", "REF-TWO"]
# (question, turn) -> a reply that has no valid [[n]]: not scored, counted.
MALFORMED = {(2, 2): "I would give it a four.", (4, 2): "Rating: 4", (5, 1): "Rating: [[11]]"}


def _judge_reply(body, headers, n):
    text = body["messages"][1]["content"]
    qid = int(re.search(r"Q(\d+)T1", text).group(1))
    turn = 2 if "Rate ONLY the assistant's second answer" in text else 1
    return 200, MALFORMED.get((qid, turn), "Short and right. [[7]]" if turn == 1 else "Ignores the ask. [[4]]"), 0


@pytest.fixture
def judge():
    with JudgeServer(_judge_reply) as server:
        yield server


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


@pytest.fixture
def generations(monkeypatch):
    """Records each build_generator call and the conversations each generate call got."""
    calls = {"builds": 0, "prompts": []}
    real = generation.build_generator

    def build(*args, **kwargs):
        calls["builds"] += 1
        inner = real(*args, **kwargs)

        class Recording:
            def generate(self, prompts, params, progress=None):
                calls["prompts"].append([list(p) for p in prompts])
                return inner.generate(prompts, params, progress)

        return Recording()

    monkeypatch.setattr(generation, "build_generator", build)
    return calls


def _argv(model, questions, judge, out, *extra):
    return ["eval", "mtbench", str(model), "--questions", str(questions), "--judge-url", judge.url,
            "--judge-model", "judge-a", "--max-new-tokens", "12", "--temperature", "1.0", "--output-dir", str(out),
            *extra]


def test_scores_failed_parses_and_the_second_turn_follows_the_models_own_answer(
        tmp_path, tiny_model_dir, questions, judge, generations, capsys):
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dir, questions, judge, out)) == 0
    printed = capsys.readouterr().out
    jdir = next(out.glob("judge-judge-a-*"))
    scores = json.loads((jdir / "scores.json").read_text())
    # Turn 1: 7 everywhere but question 5 ([[11]] is out of range); turn 2: 4 but questions 2 and 4.
    assert scores["turns"]["1"] == {**scores["turns"]["1"], "mean": 7.0, "n": 5, "failed_parses": 1}
    assert scores["turns"]["2"] == {**scores["turns"]["2"], "mean": 4.0, "n": 4, "failed_parses": 2}
    assert scores["overall"]["mean"] == pytest.approx((5 * 7 + 4 * 4) / 9) and scores["overall"]["n"] == 9
    assert scores["overall"]["failed_parses"] == 3
    cats = scores["categories"]
    assert {c: cats[c]["mean"] for c in cats} == {"alpha": 6.0, "beta": 6.0, "gamma": 5.0}
    assert cats["gamma"]["turns"] == {"1": 7.0, "2": 4.0} and cats["gamma"]["failed_parses"] == 1
    lo, hi = scores["overall"]["ci95"]
    assert 4.0 <= lo <= scores["overall"]["mean"] <= hi <= 7.0
    assert "replies without a [[rating]]: turn 1: 1, turn 2: 2" in printed
    assert re.search(r"overall\s+7\.00\s+4\.00\s+5\.67\s+9", printed)

    judgments = [json.loads(line) for line in (jdir / "judgments.jsonl").read_text().splitlines()]
    assert [(j["question_id"], j["turn"]) for j in judgments] == [(q, t) for q in range(1, 7) for t in (1, 2)]
    assert [j["score"] for j in judgments if (j["question_id"], j["turn"]) in MALFORMED] == [None] * 3

    answers = {r["question_id"]: r["choices"][0]["turns"]
               for r in map(json.loads, (out / "answers" / "answers.jsonl").read_text().splitlines())}
    assert any(a[0].strip() for a in answers.values())  # sampled bytes: the check below is not vacuous
    turn1, turn2 = generations["prompts"]
    assert turn1[0] == [{"role": "user", "content": QUESTIONS[0]["turns"][0]}]
    for i, conv in enumerate(turn2):
        assert conv == [{"role": "user", "content": QUESTIONS[i]["turns"][0]},
                        {"role": "assistant", "content": answers[i + 1][0]},
                        {"role": "user", "content": QUESTIONS[i]["turns"][1]}]
    for body, _ in judge.requests:
        text = body["messages"][1]["content"]
        qid = int(re.search(r"Q(\d+)T1", text).group(1))
        if "Rate ONLY" in text:  # the judge of turn 2 sees both turns, the first answer included
            assert f"{QUESTIONS[qid - 1]['turns'][1]}" in text and f"\n{answers[qid][0]}\n" in text
            assert f"\n{answers[qid][1]}\n" in text
        else:
            assert "T2:" not in text and f"\n{answers[qid][0]}\n" in text
        assert ("REF-ONE" in text) == (qid == 1 and "Rate ONLY" not in text)
        assert body["temperature"] == 0 and body["model"] == "judge-a"


def test_answers_are_cached_across_judges_and_a_finished_judge_is_not_asked_again(
        tmp_path, tiny_model_dir, questions, judge, generations, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    argv = ["eval", "mtbench", str(model), "--questions", str(questions), "--judge-url", judge.url,
            "--max-new-tokens", "8"]
    assert main(argv + ["--judge-model", "judge-a"]) == 0
    assert generations["builds"] == 1 and len(judge.requests) == 12
    (folder,) = (model / "eval" / "mtbench").iterdir()  # the default: next to the model
    answers = (folder / "answers" / "answers.jsonl").read_text()
    assert main(argv + ["--judge-model", "judge-b"]) == 0  # another judge: same answers, new judgments
    assert generations["builds"] == 1 and len(judge.requests) == 24
    assert len(list(folder.glob("judge-judge-*"))) == 2
    assert main(argv + ["--judge-model", "judge-b"]) == 0  # done: nothing asked, nothing generated
    assert generations["builds"] == 1 and len(judge.requests) == 24
    assert (folder / "answers" / "answers.jsonl").read_text() == answers
    assert main(argv + ["--judge-model", "judge-a", "--max-new-tokens", "9"]) == 0  # other settings: new answers
    assert generations["builds"] == 2 and len(list((model / "eval" / "mtbench").iterdir())) == 2
    assert "scores: " in capsys.readouterr().out


def test_a_folder_of_other_answers_is_refused(tmp_path, tiny_model_dir, questions, judge, capsys):
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dir, questions, judge, out)) == 0
    assert main(_argv(tiny_model_dir, questions, judge, out, "--max-new-tokens", "5")) == 2
    assert "holds answers of another model, question file or generation settings" in capsys.readouterr().err


def test_an_answers_file_is_judged_without_a_model(tmp_path, questions, judge, capsys):
    answers = tmp_path / "mine.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "choices": [{"index": 0, "turns": [
        f"answer {q['question_id']}", "second"]}]}) + "\n" for q in QUESTIONS))
    out = tmp_path / "out"
    assert main(["eval", "mtbench", "--answers", str(answers), "--questions", str(questions), "--judge-url",
                 judge.url, "--judge-model", "j", "--output-dir", str(out)]) == 0
    scores = json.loads(next(out.glob("judge-*/scores.json")).read_text())
    assert scores["model_id"] == "mine" and scores["turns"]["1"]["mean"] == 7.0
    assert any("\nanswer 3\n" in b["messages"][1]["content"] for b, _ in judge.requests)
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "turns": ["a", "b"]}) + "\n"
                               for q in QUESTIONS[:5]))
    assert main(["eval", "mtbench", "--answers", str(answers), "--questions", str(questions), "--judge-url",
                 judge.url, "--judge-model", "j", "--output-dir", str(tmp_path / "o2")]) == 2
    assert message_lines(capsys.readouterr().err) == [
        f"selm: error: {answers}: no answer for question_id 6 (1 of 6 missing)"]
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("line,message", [
    ('{"question_id": 3, "category": "x", "turns": ["only one"]}', "turns: expected a list of 2 non-empty strings (question_id 3)"),
    ('{"category": "x", "turns": ["a", "b"]}', "missing field 'question_id'"),
    ('{"question_id": 1, "turns": ["a", "b"]}', "duplicate question_id 1"),
    ('{"question_id": 3, "turns": ["a", "b"], "reference": "r"}', "reference: expected a list of up to 2 strings"),
    ('{"question_id": 3, "turns": ["a", "b"', "invalid JSON"),
])
def test_a_bad_question_file_is_one_line_with_file_and_line(tmp_path, tiny_model_dir, judge, capsys, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n\n" + line + "\n")
    rc = main(_argv(tiny_model_dir, path, judge, tmp_path / "out"))
    assert rc == 2
    err = message_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"selm: error: {path}:3: {message}"), err
    assert not (tmp_path / "out").exists() and not judge.requests


def test_a_judge_that_stays_down_is_one_redacted_line_and_nothing_is_marked_done(
        tmp_path, tiny_model_dir, questions, capsys, monkeypatch):
    monkeypatch.setenv("SELM_TEST_MTBENCH_KEY", "sk-mtbench-secret")
    out = tmp_path / "out"
    with JudgeServer(lambda body, headers, n: (500, f"boom {headers.get('Authorization')}", 0)) as down:
        rc = main(_argv(tiny_model_dir, questions, down, out, "--max-retries", "0", "--api-key-env",
                        "SELM_TEST_MTBENCH_KEY"))
    err = message_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch(rf"selm: error: mtbench\.judge\.url \(--judge-url\): {re.escape(down.url)}/chat/completions: HTTP 500 "
                        r"Internal Server Error: boom Bearer \*\*\* \(1 attempt; question_id \d, turn \d\)", err[0])
    assert (out / "answers" / "DONE.json").is_file()  # the answers are kept for the next try
    assert not list(out.glob("judge-*/DONE.json")) and not list(out.glob("judge-*/scores.json"))
    with JudgeServer(lambda body, headers, n: (200, "[[5]]", 0.6)) as slow:
        rc = main(_argv(tiny_model_dir, questions, slow, out, "--max-retries", "0", "--timeout-s", "0.2"))
    err = message_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and re.search(r"timed out after 0.2 s \(1 attempt; question_id \d, turn \d\)$",
                                                   err[0]), err


def test_a_judge_is_required(tmp_path, tiny_model_dir, capsys):
    assert main(["eval", "mtbench", str(tiny_model_dir), "--output-dir", str(tmp_path / "o")]) == 2
    assert "mtbench.judge.url: a judge is required" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,value", [
    ("Fine. [[7]]", 7.0), ("[[ 9.5 ]]", 9.5), ("first [[3]], on reflection [[8]]", 8.0), ("[[10]]", 10.0),
    ("Rating: 7", None), ("[7]", None), ("[[0]]", None), ("[[11]]", None), ("", None),
])
def test_parse_judge_rating_only_reads_double_brackets(text, value):
    assert parse_judge_rating(text) == value


def test_the_packaged_questions_are_sixteen_in_eight_categories():
    qs = load_questions(PACKAGED_QUESTIONS)
    cats = [q.category for q in qs]
    assert len(qs) == 16 and len(set(cats)) == 8 and all(cats.count(c) == 2 for c in cats)


def test_summary_of_a_hand_made_table():
    rows = [{"question_id": q, "category": c, "turn": t, "score": s}
            for q, c, t, s in [(1, "a", 1, 8.0), (1, "a", 2, 6.0), (2, "b", 1, 4.0), (2, "b", 2, None)]]
    s = summarize(rows, samples=200, seed=0)
    assert s["overall"]["mean"] == 6.0 and s["overall"]["n"] == 3 and s["overall"]["failed_parses"] == 1
    assert s["turns"]["1"]["mean"] == 6.0 and s["turns"]["2"] == {**s["turns"]["2"], "mean": 6.0, "failed_parses": 1}
    assert s["categories"]["b"]["mean"] == 4.0 and s["categories"]["b"]["turns"]["2"] != s["categories"]["b"]["turns"]["2"]
    # Resampling questions: {8, 6} (mean 7) or {4}; the pooled mean is between 4 and 7.
    lo, hi = s["overall"]["ci95"]
    assert lo == 4.0 and hi == 7.0
    assert "overall    6.00    6.00    6.00   3   95% CI [4.00, 7.00] over 2 questions" in format_table(s)


def test_a_judge_that_never_rates_is_said_so_not_printed_as_nan():
    rows = [{"question_id": q, "category": "a", "turn": t, "score": None} for q in (1, 2) for t in (1, 2)]
    table = format_table(summarize(rows, samples=50, seed=0))
    assert "nan" not in table
    assert "no rating parsed over 2 questions" in table and "turn 1: 2, turn 2: 2" in table


def test_a_run_folder_means_its_last_trained_iteration(tmp_path, tiny_model_dir):
    for t in (1, 2, 10):
        shutil.copytree(tiny_model_dir, tmp_path / "run" / f"iter_{t}" / "train" / "model")
    for t in (1, 2):  # iteration 10 did not finish
        (tmp_path / "run" / f"iter_{t}" / "train" / "DONE.json").write_text("{}")
    folder, label, base = resolve_model(str(tmp_path / "run"), Config())
    assert folder == tmp_path / "run" / "iter_2" / "train" / "model" and label == "run/iter_2"
    assert base == tmp_path / "run"
    assert resolve_model(str(folder), Config())[1] == "run/iter_2"
    with pytest.raises(Exception, match="not a model folder"):
        resolve_model(str(tmp_path), Config())


def test_tiny_by_name_goes_under_runs(tmp_path, questions, judge, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELM_CACHE", str(tmp_path / "cache"))
    assert main(["eval", "mtbench", "tiny", "--questions", str(questions), "--judge-url", judge.url,
                 "--judge-model", "j", "--max-new-tokens", "4", "--debug"]) == 0
    (scores,) = (tmp_path / "runs" / "tiny" / "eval" / "mtbench").glob("*/judge-j-*/scores.json")
    assert json.loads(scores.read_text())["model_id"] == "tiny"
    assert capsys.readouterr().out.splitlines()[-1] == f"scores: {scores.relative_to(tmp_path)}"


def test_help_documents_every_mtbench_option(capsys):
    from selm.config import describe_options

    with pytest.raises(SystemExit):
        main(["eval", "mtbench", "--help"])
    text = capsys.readouterr().out
    keys = [(k.split(".", 1)[1], doc) for k, _, _, doc in describe_options() if k.startswith("mtbench.")]
    assert len(keys) == 13
    for name, doc in keys:
        assert f"--{name.replace('_', '-').replace('.', '-')}" in text and doc.split()[0] in text, name
    for flag in ("--answers", "--config", "--output-dir", "--set", "model"):
        assert flag in text


def test_judge_extra_body_reaches_every_request_and_keys_the_judgments(tmp_path, questions, judge, capsys):
    answers = tmp_path / "mine.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "turns": ["a", "b"]}) + "\n"
                               for q in QUESTIONS))
    out = tmp_path / "out"
    argv = ["eval", "mtbench", "--answers", str(answers), "--questions", str(questions), "--judge-url", judge.url,
            "--judge-model", "j", "--output-dir", str(out)]
    regex = r"[^\[\]]{0,600}\[\[(10|[1-9])\]\]"
    extra = json.dumps({"structured_outputs": {"regex": regex}})
    assert main(argv + ["--set", f"mtbench.judge.extra_body={extra}"]) == 0
    assert len(judge.requests) == 12
    assert all(b["structured_outputs"] == {"regex": regex} and b["temperature"] == 0 for b, _ in judge.requests)
    (scores,) = out.glob("judge-*/scores.json")
    assert json.loads(scores.read_text())["judge"]["extra_body"] == {"structured_outputs": {"regex": regex}}
    # Without it: other judgments (not the cached ones), and requests without the field.
    assert main(argv) == 0
    assert len(judge.requests) == 24 and "structured_outputs" not in judge.requests[-1][0]
    assert len(list(out.glob("judge-*"))) == 2
    # A field selm sets itself is refused in one line, before any request.
    assert main(argv + ["--set", 'mtbench.judge.extra_body={"temperature": 1}']) == 2
    assert message_lines(capsys.readouterr().err) == [
        "selm: error: mtbench.judge.extra_body (--judge-extra-body): temperature is set by selm itself; remove it"]
    assert main(argv + ["--set", "mtbench.judge.extra_body=[1]"]) == 2
    assert "mtbench.judge.extra_body (--judge-extra-body): expected a mapping" in capsys.readouterr().err
    assert len(judge.requests) == 24


def test_the_judge_section_reaches_every_request_and_the_old_keys_and_flags_still_work(
        tmp_path, questions, judge_server, capsys, monkeypatch):
    from selm import config as config_module

    monkeypatch.setattr(config_module, "_WARNED", set())  # this process's deprecation lines start afresh
    monkeypatch.setenv("SELM_TEST_MT_KEY", "sk-mt-1")
    server = judge_server(_judge_reply)
    answers = tmp_path / "mine.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "turns": ["a", "b"]}) + "\n"
                               for q in QUESTIONS))
    extra = {"chat_template_kwargs": {"enable_thinking": False}}
    (tmp_path / "c.yaml").write_text(json.dumps({"mtbench": {"judge": {
        "url": server.url, "model": "jm", "api_key_env": "SELM_TEST_MT_KEY", "extra_body": extra}}}))
    common = ["eval", "mtbench", "--answers", str(answers), "--questions", str(questions),
              "--output-dir", str(tmp_path / "out")]
    assert main(common + ["--config", str(tmp_path / "c.yaml")]) == 0
    assert len(server.requests) == 12
    for body, headers in server.requests:
        assert body["model"] == "jm" and body["chat_template_kwargs"] == extra["chat_template_kwargs"]
        assert headers["Authorization"] == "Bearer sk-mt-1"
    assert "deprecated" not in capsys.readouterr().err
    # The old keys (--set) and flags (--api-key-env) name the same judge: its judgments are reused.
    old = ["--set", f"mtbench.judge_url={server.url}", "--set", "mtbench.judge_model=jm",
           "--set", f"mtbench.judge_extra_body={json.dumps(extra)}", "--api-key-env", "SELM_TEST_MT_KEY"]
    assert main(common + old) == 0
    assert len(server.requests) == 12 and len(list((tmp_path / "out").glob("judge-*"))) == 1
    lines = [l for l in capsys.readouterr().err.splitlines() if "deprecated" in l]
    assert lines == [f"selm: warning: mtbench.{k} is deprecated; use mtbench.judge.{v}"
                     for k, v in (("judge_url", "url"), ("judge_model", "model"), ("judge_extra_body", "extra_body"))]
    # The timeout is the section's (old flag --timeout-s, new --judge-max-retries): one line naming the new key.
    slow = judge_server(lambda body, headers, n: (200, "[[5]]", 1.0))
    assert main(common + ["--judge-url", slow.url, "--judge-model", "slow", "--timeout-s", "0.2",
                          "--judge-max-retries", "0", "--judge-max-concurrency", "1"]) == 2
    (err,) = message_lines(capsys.readouterr().err)
    assert err.startswith(f"selm: error: mtbench.judge.url (--judge-url): {slow.url}/chat/completions: "
                          "timed out after 0.2 s (1 attempt;"), err
    assert len(slow.requests) == 1
