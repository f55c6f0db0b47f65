"""`selm eval pairwise`: the LLM pairwise judge against a real local HTTP server (log-probs or not,
malformed answers, 500s, timeouts, both presentation orders), AlpacaEval's file formats, and the
command end to end on two tiny models with a callable judge."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from helpers_cli import message_lines
from selm.cli import main
from selm.config import EndpointConfig, PairwiseEvalConfig, RankConfig
from selm.engines.llm_pairwise import LLMPairwiseRanker, parse_verdict, probability_of_a
from selm.engines.ranker_base import RankerError
from selm.io import InputError
from selm.evaluation.outputs import load_eval_prompts
from selm.evaluation.pairwise import run_pairwise

HERE = Path(__file__).parent
TINY_PROMPTS = HERE.parent / "selm" / "data" / "tiny_prompts.jsonl"
KEY_ENV = "SELM_TEST_PAIRWISE_KEY"


@pytest.fixture(autouse=True)
def _setup(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("SELM_CACHE", str(tmp_path / "cache"))
    # Retries wait 10 ms rather than 1 s.
    monkeypatch.setattr(LLMPairwiseRanker.__init__, "__defaults__", ("rank", 0.01))



def files(tmp_path, n=4):
    """AlpacaEval-format prompts, the model's answers as our JSONL ("good ..."), the baseline's as
    AlpacaEval's model_outputs.json ("bad ...", longer)."""
    prompts = [{"instruction": f"Question {i}?", "dataset": "toy"} for i in range(n)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    pids = [p["prompt_id"] for p in load_eval_prompts(tmp_path / "prompts.json")]
    (tmp_path / "model.jsonl").write_text("".join(json.dumps({"prompt_id": pid, "response": f"good {i}"}) + "\n"
                                                  for i, pid in enumerate(pids)))
    (tmp_path / "base.json").write_text(json.dumps([{"instruction": p["instruction"], "output": f"bad answer {i}",
                                                     "generator": "base-1"} for i, p in enumerate(prompts)]))
    return tmp_path / "prompts.json", tmp_path / "model.jsonl", tmp_path / "base.json"


def cfg_for(url, **kw) -> PairwiseEvalConfig:
    """judge_X: X of the judge (of its endpoint for an endpoint setting); the rest: pairwise settings."""
    judge = {k[6:]: v for k, v in kw.items() if k.startswith("judge_")}
    endpoint = {k: judge.pop(k) for k in list(judge) if k in {f.name for f in dataclasses.fields(EndpointConfig)}}
    rest = {k: v for k, v in kw.items() if not k.startswith("judge_")}
    return PairwiseEvalConfig(judge=RankConfig(kind="llm_pairwise", **judge, endpoint=EndpointConfig(
        url=url, model="judge-1", api_key_env=KEY_ENV, **endpoint)), bootstrap_samples=50, **rest)


def shown(body) -> tuple[str, str]:
    """(Response A, Response B) as the judge saw them."""
    text = body["messages"][-1]["content"]
    return (re.search(r"\[Response A\]\n(.*)\n\[End of Response A\]", text).group(1),
            re.search(r"\[Response B\]\n(.*)\n\[End of Response B\]", text).group(1))


def prefers_good(p_good=0.8, logprobs=True):
    """A judge that picks the answer starting with "good", with probability p_good (log-probs)."""
    def reply(body, headers, n):
        a, _ = shown(body)
        letter = "A" if a.startswith("good") else "B"
        other = "B" if letter == "A" else "A"
        lp = {"content": [{"token": letter, "logprob": math.log(p_good),
                           "top_logprobs": [{"token": letter, "logprob": math.log(p_good)},
                                            {"token": " " + other, "logprob": math.log(1 - p_good)}]}]}
        return (200, letter, 0, {"logprobs": lp}) if logprobs else (200, f"Response {letter}.", 0)
    return reply


def test_verdict_and_probability_parsing():
    assert [parse_verdict(t) for t in ("A", " b.", "Response B", "**A** is better", "Neither", "")] == \
        ["A", "B", "B", "A", None, None]
    assert probability_of_a({"A": math.log(0.6), " B": math.log(0.2), "C": 0.0}) == pytest.approx(0.75)
    assert probability_of_a({"A": -0.1}) == 1.0
    assert probability_of_a({"The": -0.1}) is None and probability_of_a(None) is None


def test_soft_preferences_from_logprobs_both_orders_and_the_key(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    s = judge_server(prefers_good(0.8))
    prompts, model, base = files(tmp_path)
    out = run_pairwise(cfg_for(s.url), str(model), str(base), prompts, tmp_path / "out")
    assert len(s.requests) == 8  # 4 prompts x 2 orders
    assert all(h.get("Authorization") == "Bearer sk-test-123" for _, h in s.requests)
    assert all(b["logprobs"] is True and b["top_logprobs"] == 5 and b["temperature"] == 0 for b, _ in s.requests)
    # Every prompt was seen with the model's answer as A once and as B once.
    for i in range(4):
        seen = sorted(shown(b) for b, _ in s.requests if f"good {i}" in shown(b))
        assert seen == [(f"bad answer {i}", f"good {i}"), (f"good {i}", f"bad answer {i}")]
    assert out["win_rate"] == pytest.approx(0.8)
    assert (out["model"], out["baseline"], out["order"]) == ("model", "base-1", "both")
    rows = [json.loads(l) for l in (tmp_path / "out" / "annotations.jsonl").read_text().splitlines()]
    assert [r["model_win"] for r in rows] == pytest.approx([0.8] * 4)
    assert [r["preference"] for r in rows] == pytest.approx([1.8] * 4)  # AlpacaEval: 2 = output_2 (the model)
    assert all(o["soft"] for r in rows for o in r["orders"])
    assert rows[0]["output_1"] == "bad answer 0" and rows[0]["output_2"] == "good 0"
    saved = json.loads((tmp_path / "out" / "pairwise.json").read_text())
    assert saved["win_rate_ci95"] == out["win_rate_ci95"] and saved["length_model_mean"] == pytest.approx(6.0)
    assert "sk-test-123" not in (tmp_path / "out" / "pairwise.json").read_text()


def test_position_bias_cancels_over_both_orders(judge_server, tmp_path):
    s = judge_server(lambda body, headers, n: (200, "A", 0))  # always the first shown, no log-probs
    prompts, model, base = files(tmp_path)
    out = run_pairwise(cfg_for(s.url), str(model), str(base), prompts, tmp_path / "out")
    assert out["win_rate"] == 0.5 and out["ties"] == 4
    rows = [json.loads(l) for l in (tmp_path / "out" / "annotations.jsonl").read_text().splitlines()]
    assert all([o["p_model"] for o in r["orders"]] == [1.0, 0.0] and not r["orders"][0]["soft"] for r in rows)


def test_random_order_is_one_request_per_prompt_and_seeded(judge_server, tmp_path):
    s = judge_server(lambda body, headers, n: (200, "A", 0))
    prompts, model, base = files(tmp_path, n=12)
    wins = []
    for seed in (3, 3, 4):
        run_pairwise(cfg_for(s.url, order="random", seed=seed), str(model), str(base), prompts, tmp_path / "o")
        rows = [json.loads(l) for l in (tmp_path / "o" / "annotations.jsonl").read_text().splitlines()]
        # The position-biased judge picks whoever is shown first: model_win says which order was drawn.
        assert all(r["model_win"] == (1.0 if r["orders"][0]["model_shown_as"] == "A" else 0.0) for r in rows)
        wins.append([r["model_win"] for r in rows])
    assert len(s.requests) == 36
    assert wins[0] == wins[1] and wins[0] != wins[2] and 0 < sum(wins[0]) < 12


def test_hard_verdicts_without_logprobs(judge_server, tmp_path):
    s = judge_server(prefers_good(logprobs=False))
    prompts, model, base = files(tmp_path)
    out = run_pairwise(cfg_for(s.url), str(model), str(base), prompts, tmp_path / "out")
    assert out["win_rate"] == 1.0 and out["wins"] == 4


def test_malformed_answers_fail_or_are_skipped(judge_server, tmp_path):
    def reply(body, headers, n):
        a, b = shown(body)
        return (200, "I cannot decide." if "good 1" in a + b else "A", 0)
    s = judge_server(reply)
    prompts, model, base = files(tmp_path)
    with pytest.raises(RankerError, match=r"pairwise.judge: prompt_id '[0-9a-f]+', model shown first: no A/B "
                                          r"verdict in the judge's reply 'I cannot decide.'"):
        run_pairwise(cfg_for(s.url), str(model), str(base), prompts, tmp_path / "out")
    assert not (tmp_path / "out" / "pairwise.json").exists()
    out = run_pairwise(cfg_for(s.url, judge_on_error="skip"), str(model), str(base), prompts, tmp_path / "out")
    assert (out["judged"], out["skipped"]) == (3, 1) and "I cannot decide" in out["skipped_prompts"][0]["reason"]


def test_500s_are_retried_then_reported_in_one_line(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-secret-9")
    s = judge_server(lambda body, headers, n: (500, "overloaded", 0) if n <= 2 else prefers_good()(body, headers, n))
    prompts, model, base = files(tmp_path, n=1)
    out = run_pairwise(cfg_for(s.url, judge_max_retries=2, judge_max_concurrency=1), str(model), str(base), prompts,
                       tmp_path / "out")
    assert out["win_rate"] == pytest.approx(0.8) and len(s.requests) == 4
    down = judge_server(lambda body, headers, n: (500, "down; key sk-secret-9", 0))
    with pytest.raises(RankerError) as e:
        run_pairwise(cfg_for(down.url, judge_max_retries=2), str(model), str(base), prompts, tmp_path / "out2")
    msg = str(e.value)
    assert "pairwise.judge.endpoint.url:" in msg and "HTTP 500" in msg and "3 attempts" in msg and "prompt_id" in msg
    assert "sk-secret-9" not in msg and "\n" not in msg


def test_timeouts_are_reported(judge_server, tmp_path):
    s = judge_server(lambda body, headers, n: (200, "A", 1.0))
    prompts, model, base = files(tmp_path, n=1)
    with pytest.raises(RankerError, match="timed out after 0.2 s"):
        run_pairwise(cfg_for(s.url, judge_timeout_s=0.2, judge_max_retries=1), str(model), str(base), prompts,
                     tmp_path / "out")


def test_llm_pairwise_as_a_ranker_aggregates_both_orders(judge_server):
    from selm.engines.registry import build_ranker

    s = judge_server(prefers_good(0.9))
    r = build_ranker(RankConfig(kind="llm_pairwise", url=s.url, judge_model="j"))
    scores = r.score([[{"role": "user", "content": "q"}]], [["good x", "bad y", "bad z"]])[0]
    # good beats each bad with 0.9 in both orders; bad vs bad: the judge picks B (not "good"), 0.1/0.9.
    assert scores[0] == pytest.approx(0.9)
    assert scores[1] == pytest.approx((0.1 + 0.5) / 2) and scores[2] == pytest.approx(scores[1])
    assert len(s.requests) == 6  # every ordered pair of 3


# ---------------------------------------------------------------------------------------------
# The command end to end


def _run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, message_lines(cap.err)


def test_cli_end_to_end_tiny_models_callable_judge(tmp_path, tiny_model_dir, capsys):
    from selm.tiny import save_tiny

    other = save_tiny(tmp_path / "other", seed=1)
    out = tmp_path / "out"
    argv = ["eval", "pairwise", str(other), "--baseline", str(tiny_model_dir), "--prompts", str(TINY_PROMPTS),
            "--judge-kind", "callable", "--judge-callable", "helpers_rank:length_score", "--max-new-tokens", "12",
            "--temperature", "1", "--bootstrap-samples", "100", "--output-dir", str(out), "--write-alpaca-outputs"]
    rc, text, _ = _run(argv, capsys)
    assert rc == 0
    res = json.loads((out / "pairwise.json").read_text())
    rows = [json.loads(l) for l in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(rows) == res["prompts"] == 32
    # The judge scores length: the longer answer wins, equal lengths tie; checked from the texts.
    expected = [0.5 if len(r["output_2"]) == len(r["output_1"]) else float(len(r["output_2"]) > len(r["output_1"]))
                for r in rows]
    assert [r["model_win"] for r in rows] == expected
    assert res["win_rate"] == pytest.approx(sum(expected) / 32)
    assert (res["wins"], res["ties"], res["losses"]) == (expected.count(1.0), expected.count(0.5), expected.count(0.0))
    assert res["length_model_mean"] == pytest.approx(sum(len(r["output_2"]) for r in rows) / 32)
    # 32 prompts of a length judge: cross-validation picks the strongest penalty, which zeroes the
    # model term; LC is then not measured (it used to read exactly 50% with a zero-width interval).
    assert res["lc_fit"]["coefficients"]["model"] == 0.0 and math.isnan(res["lc_win_rate"])
    assert "set the model term to 0 on these 32 prompts" in res["lc_fit"]["warning"]
    assert f"{100 * res['win_rate']:5.1f}%" in text and "length-controlled (LC)     n/a" in text
    # AlpacaEval's format, and it reads back as a file of outputs with the same answers.
    alpaca = json.loads((out / "model_outputs.json").read_text())
    assert set(alpaca[0]) == {"instruction", "output", "generator"}
    assert [a["output"] for a in alpaca] == [r["output_2"] for r in rows]
    # A second run (files as MODEL) generates nothing new: the baseline comes from the cache.
    cache = sorted((tmp_path / "cache" / "outputs").iterdir())
    assert len(cache) == 2
    argv[2] = str(out / "model_outputs.json")
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "out2")
    assert _run(argv, capsys)[0] == 0
    assert sorted((tmp_path / "cache" / "outputs").iterdir()) == cache
    again = json.loads((tmp_path / "out2" / "pairwise.json").read_text())
    assert (again["win_rate"], again["win_rate_ci95"], again["lc_fit"]) == (res["win_rate"], res["win_rate_ci95"], res["lc_fit"])


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    prompts, model, base = files(tmp_path)
    (tmp_path / "short.jsonl").write_text(model.read_text().splitlines()[0] + "\n")
    judge = ["--judge-kind", "callable", "--judge-callable", "selm.toy_judges:vowels_gold"]  # checked first
    cases = [
        (["--baseline", str(base), str(tmp_path / "short.jsonl"), *judge], "MODEL: .*short.jsonl has no output for prompt_id"),
        (["--baseline", str(tmp_path / "nowhere"), str(model), *judge], "--baseline: '.*nowhere' is neither a file of outputs"),
        (["--baseline", str(base), str(model), "--set", "pairwise.order=sideways"], r"pairwise.order \(--order\): 'sideways' is not one of"),
        (["--baseline", str(base), str(model), "--judge-kind", "callable"],
         r"pairwise.judge.callable \(--judge-callable\): required"),
        (["--baseline", str(base), str(model)], r"pairwise.judge.endpoint.url \(--judge-url\): required"),
        (["--baseline", str(base), str(model), "--judge-url", "http://x/v1"],
         r"pairwise.judge.endpoint.model \(--judge-model\): required"),
    ]
    for extra, pattern in cases:
        rc, _, err = _run(["eval", "pairwise", "--prompts", str(prompts), "--output-dir", str(tmp_path / "o"), *extra],
                          capsys)
        assert rc == 2 and len(err) == 1 and re.match(f"selm: error: {pattern}", err[0]), err
    assert not (tmp_path / "o").exists()


def test_prompt_formats_alpaca_json_jsonl_and_ours(tmp_path):
    rows = [{"instruction": "Say hi.", "dataset": "d", "instruction_difficulty": 0.3}, {"instruction": "Count."}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_eval_prompts(tmp_path / "a.json"), load_eval_prompts(tmp_path / "a.jsonl")
    assert a == b and [p["instruction"] for p in a] == ["Say hi.", "Count."]
    assert a[0]["prompt"] == [{"role": "user", "content": "Say hi."}] and a[0]["difficulty"] == 0.3
    ours = load_eval_prompts(TINY_PROMPTS)
    assert len(ours) == 32 and ours[0]["instruction"] == "Write one sentence about the weather."


def test_cli_outputs_writes_alpaca_model_outputs(tmp_path, tiny_model_dir, capsys):
    target = tmp_path / "model_outputs.json"
    argv = ["eval", "outputs", str(tiny_model_dir), "--prompts", str(TINY_PROMPTS), "--max-new-tokens", "6",
            "--temperature", "1", "--name", "tiny-0", "--output", str(target)]
    rc, text, _ = _run(argv, capsys)
    rows = json.loads(target.read_text())
    assert rc == 0 and text.startswith("32 outputs of tiny-0")
    assert [r["instruction"] for r in rows] == [p["instruction"] for p in load_eval_prompts(TINY_PROMPTS)]
    assert all(r["generator"] == "tiny-0" and isinstance(r["output"], str) for r in rows)
    rc, _, err = _run(["eval", "outputs", str(target), "--prompts", str(TINY_PROMPTS)], capsys)
    assert rc == 2 and "is a file of outputs" in err[0]


def test_a_judge_given_in_part_keeps_the_llm_pairwise_default():
    from selm.cli import _pairwise_config, build_parser
    from selm.config import describe_options, load_config

    defaults = {key: default for key, _, default, _ in describe_options()}
    assert (defaults["pairwise.judge.kind"], defaults["evaluate.judge.kind"]) == ("'llm_pairwise'", "'callable'")
    assert load_config(None, ["pairwise.judge.url=http://x/v1"]).pairwise.judge.kind == "llm_pairwise"
    assert load_config(None, ["evaluate.judge.url=http://x/v1"]).evaluate.judge.kind == "callable"
    args = build_parser().parse_args(["eval", "pairwise", "m", "--baseline", "b", "--prompts", "p",
                                      "--judge-url", "http://x/v1", "--judge-model", "j"])
    judge = _pairwise_config(args).judge
    assert (judge.kind, judge.endpoint.url, judge.endpoint.model) == ("llm_pairwise", "http://x/v1", "j")


def test_model_sources_run_folder_iter_k_and_files(tmp_path, tiny_model_dir):
    import shutil

    from selm.evaluation.outputs import resolve_answer_source

    run = tmp_path / "run"
    for t in (1, 2):
        shutil.copytree(tiny_model_dir, run / f"iter_{t}" / "train" / "model")
    (run / "iter_1" / "train" / "DONE.json").write_text("{}")  # iteration 2 did not finish
    assert resolve_answer_source(str(run), "MODEL") == (run / "iter_1" / "train" / "model", "run/iter_1")
    assert resolve_answer_source(str(run / "iter_2"), "MODEL") == (run / "iter_2" / "train" / "model", "run/iter_2")
    assert resolve_answer_source(str(tiny_model_dir), "MODEL")[0] == tiny_model_dir
    (tmp_path / "answers.jsonl").write_text("{}\n")
    assert resolve_answer_source(str(tmp_path / "answers.jsonl"), "MODEL") is None
    with pytest.raises(InputError, match=r"^--baseline: .*not a model folder"):
        resolve_answer_source(str(tmp_path), "--baseline")


def test_the_judge_endpoint_reaches_every_request_and_the_old_keys_still_work(judge_server, tmp_path, capsys,
                                                                            monkeypatch):
    from selm import config as config_module

    monkeypatch.setattr(config_module, "_WARNED", set())  # this process's deprecation lines start afresh
    monkeypatch.setenv(KEY_ENV, "sk-pw-1")
    s = judge_server(prefers_good())
    prompts, model, base = files(tmp_path, n=2)
    common = ["eval", "pairwise", str(model), "--baseline", str(base), "--prompts", str(prompts),
              "--set", "pairwise.bootstrap_samples=20"]
    extra = {"chat_template_kwargs": {"enable_thinking": False}}
    new = ["--set", f"pairwise.judge.endpoint.url={s.url}", "--judge-model", "pm",
           "--set", f"pairwise.judge.endpoint.extra_body={json.dumps(extra)}", "--judge-api-key-env", KEY_ENV]
    assert main(common + new + ["--output-dir", str(tmp_path / "new")]) == 0
    assert len(s.requests) == 4  # 2 prompts, both orders
    for body, headers in s.requests:
        assert body["model"] == "pm" and body["chat_template_kwargs"] == extra["chat_template_kwargs"]
        assert headers["Authorization"] == "Bearer sk-pw-1"
    assert "deprecated" not in capsys.readouterr().err
    old = ["--set", f"pairwise.judge.url={s.url}", "--set", "pairwise.judge.judge_model=pm",
           "--set", f"pairwise.judge.extra_body={json.dumps(extra)}", "--set", f"pairwise.judge.api_key_env={KEY_ENV}"]
    assert main(common + old + ["--output-dir", str(tmp_path / "old")]) == 0
    assert sorted(json.dumps(b, sort_keys=True) for b, _ in s.requests[4:]) == sorted(
        json.dumps(b, sort_keys=True) for b, _ in s.requests[:4])  # the same requests
    new_result, old_result = (json.loads((tmp_path / d / "pairwise.json").read_text()) for d in ("new", "old"))
    assert new_result["judge"] == old_result["judge"] == "llm_pairwise:pm"
    lines = [l for l in capsys.readouterr().err.splitlines() if "deprecated" in l]
    assert len(lines) == 4 and "selm: warning: pairwise.judge.url is deprecated; use pairwise.judge.endpoint.url" in lines
    # The timeout and retries are the section's; the error names the new key and its flag.
    slow = judge_server(lambda body, headers, n: (200, "A", 1.0))
    assert main(common + ["--judge-url", slow.url, "--judge-model", "pm", "--judge-timeout-s", "0.2",
                          "--judge-max-retries", "0", "--judge-max-concurrency", "1",
                          "--output-dir", str(tmp_path / "slow")]) == 2
    (err,) = message_lines(capsys.readouterr().err)
    assert err.startswith(f"selm: error: pairwise.judge.endpoint.url (--judge-url): {slow.url}/chat/completions: "
                          "timed out after 0.2 s (1 attempt;"), err
