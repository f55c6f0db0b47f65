"""Rankers: the callable and pairwise functions, a tiny reward model with its own tokenizer and
template, and the HTTP judge against a local server (auth header, retries, timeouts, redaction)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from selm.config import RankConfig
from selm.engines.ranker_base import RankerError, score_in_chunks
from selm.engines.rankers import HttpJudgeRanker, PairwiseRanker, RewardModelRanker, parse_rating
from selm.engines.registry import build_ranker

HERE = Path(__file__).parent
P = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def _helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


# ---------------------------------------------------------------------------------------------
# callable and pairwise


def test_callable_ranker_scores_each_prompt():
    r = build_ranker(RankConfig(kind="callable", callable="helpers_rank:length_score"))
    assert r.score([P, P], [["a", "bbb"], ["cc"]]) == [[1.0, 3.0], [2.0]]
    r.close()


@pytest.mark.parametrize("spec,message", [
    ("helpers_rank", "rank.callable: expected \"module:function\", got 'helpers_rank'"),
    ("no_such_module_xyz:f", "rank.callable: cannot import 'no_such_module_xyz:f': No module named 'no_such_module_xyz'"),
    ("helpers_rank:missing", "rank.callable: cannot import 'helpers_rank:missing': module 'helpers_rank' has no attribute"),
    ("helpers_rank:not_a_function", "rank.callable: 'helpers_rank:not_a_function' is not callable"),
])
def test_bad_callable_path_names_the_key(spec, message):
    with pytest.raises(RankerError) as e:
        build_ranker(RankConfig(kind="callable", callable=spec))
    assert str(e.value).startswith(message)
    with pytest.raises(RankerError, match=r"^evaluate\.judge\.callable: "):
        build_ranker(RankConfig(kind="pairwise", callable=spec), key="evaluate.judge")


def test_score_in_chunks_keeps_order_and_pins_a_failure_on_its_prompt():
    """Chunks of 2 over 5 prompts; prompt p3 makes the ranker fail. on_error None: the chunk's error
    as it is; "skip": p3's reason in its place and every other prompt scored, in input order;
    "fail": the one-prompt error, naming p3."""
    r = build_ranker(RankConfig(kind="callable", callable="helpers_rank:length_score"))
    texts = ["a", "b", "c", "RAISE", "e"]
    prompts = [[{"role": "user", "content": t}] for t in texts]
    cands = [["x" * (i + 1)] for i in range(5)]
    ids = [f"p{i}" for i in range(5)]
    with pytest.raises(RankerError, match="raised ValueError: boom"):
        score_in_chunks(r, prompts, cands, ids, chunk_size=2)
    out = score_in_chunks(r, prompts, cands, ids, chunk_size=2, on_error="skip")
    assert out[:3] == [[1.0], [2.0], [3.0]] and out[4] == [5.0]
    assert isinstance(out[3], str) and "p3" in out[3]
    with pytest.raises(RankerError, match="'p3'"):
        score_in_chunks(r, prompts, cands, ids, chunk_size=2, on_error="fail")
    assert score_in_chunks(r, prompts[:3], cands[:3], chunk_size=2) == [[1.0], [2.0], [3.0]]


@pytest.mark.parametrize("text,message", [
    ("NAN", "rank: prompt_id 'p7': non-finite score nan"),
    ("SHORT", "rank: prompt_id 'p7': 1 scores for 2 candidates"),
    ("RAISE", "rank.callable: 'helpers_rank:length_score' raised ValueError: boom (prompt_id 'p7')"),
])
def test_bad_scores_name_the_prompt(text, message):
    r = build_ranker(RankConfig(kind="callable", callable="helpers_rank:length_score"))
    prompts = [P, [{"role": "user", "content": text}]]
    with pytest.raises(RankerError) as e:
        r.score(prompts, [["x", "y"], ["x", "y"]], ids=["p0", "p7"])
    assert str(e.value) == message
    with pytest.raises(RankerError, match="prompt 1"):  # without ids: the index
        r.score(prompts, [["x", "y"], ["x", "y"]])


def test_pairwise_aggregation_by_hand():
    """q_ij = (p_ij + 1 - p_ji) / 2, score_i = mean_j q_ij, with the table in helpers_rank:
        q_ab = (0.8 + 0.6) / 2 = 0.7   q_ba = 0.3
        q_ac = (0.6 + 0.4) / 2 = 0.5   q_ca = 0.5
        q_bc = (0.9 + 0.7) / 2 = 0.8   q_cb = 0.2
        a = (0.7 + 0.5) / 2 = 0.60,  b = (0.3 + 0.8) / 2 = 0.55,  c = (0.5 + 0.2) / 2 = 0.35
    """
    r = build_ranker(RankConfig(kind="pairwise", callable="helpers_rank:table_pairwise"))
    assert isinstance(r, PairwiseRanker)
    (scores,) = r.score([P], [["a", "b", "c"]])
    assert scores == pytest.approx([0.60, 0.55, 0.35], abs=1e-12)
    assert sum(scores) == pytest.approx(1.5)  # each pair hands out exactly one unit of probability
    assert r.score([P], [["a"]]) == [[0.5]]


def test_pairwise_rejects_non_probabilities():
    r = build_ranker(RankConfig(kind="pairwise", callable="helpers_rank:bad_pairwise"))
    with pytest.raises(RankerError, match=r"returned 1.5 for candidates \(0, 1\) of prompt_id 'q'; expected a probability"):
        r.score([P], [["a", "b"]], ids=["q"])


# ---------------------------------------------------------------------------------------------
# reward model

RM_TEMPLATE = (  # deliberately NOT the policy's ChatML
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


def _save_reward_model(path: Path, template: str | None) -> Path:
    import torch
    from transformers import LlamaForSequenceClassification

    from selm.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=False)
    if template:
        tok.chat_template = template
    config = build_tiny_model(len(tok), layers=1).config
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a larger head, so that scores differ by more than the tolerance
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    assert list(path.glob("*.safetensors"))
    return path


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    return {"template": _save_reward_model(root / "templated", RM_TEMPLATE),
            "plain": _save_reward_model(root / "plain", None)}


def _rm(path, **kw) -> RewardModelRanker:
    r = build_ranker(RankConfig(kind="reward_model", model=str(path), **kw))
    assert isinstance(r, RewardModelRanker)
    return r


def test_reward_model_uses_its_own_template_and_tokenizer(reward_models):
    import torch

    r = _rm(reward_models["template"])
    head, body, closing = r.format(P, "yo")
    assert (head, body, closing) == ("### user:\nhi<|im_end|>\n### assistant:\n", "yo", "<|im_end|>\n")
    ids = r.encode(P, "yo")
    assert r.tokenizer.decode(ids) == head + body + closing
    assert "<|im_start|>" not in r.tokenizer.decode(ids)
    with torch.no_grad():
        direct = r.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert r.score([P], [["yo"]])[0][0] == pytest.approx(direct, abs=1e-6)

    plain = _rm(reward_models["plain"])
    sys_prompt = [{"role": "system", "content": "be nice"}] + P
    assert "".join(plain.format(sys_prompt, "yo")) == "System: be nice\n\nUser: hi\n\nAssistant: yo"


@pytest.mark.parametrize("which", ["template", "plain"])
def test_reward_model_batched_equals_one_at_a_time(reward_models, which):
    prompts = [P, [{"role": "user", "content": "a much longer question, is it not?"}], P]
    cands = [["short", "a rather longer response here", ""], ["mid length", "x"], ["yes"]]
    batched = _rm(reward_models[which], batch_size=4).score(prompts, cands)
    single = _rm(reward_models[which], batch_size=1)
    alone = [single.score([p], [[c]])[0][0] for p, cs in zip(prompts, cands) for c in cs]
    flat = [s for row in batched for s in row]
    assert [len(row) for row in batched] == [3, 2, 1]
    assert flat == pytest.approx(alone, abs=1e-5)
    assert max(flat) - min(flat) > 1e-3  # the check is not vacuous


def test_reward_model_truncation_keeps_prompt_end_and_response_start(reward_models):
    prompt = [{"role": "user", "content": "x" * 200 + "END"}]
    plain = _rm(reward_models["plain"], max_length=40)
    ids = plain.encode(prompt, "START" + "y" * 200)
    text = plain.tokenizer.decode(ids)
    assert len(ids) == 40 and "END\n\nAssistant: START" in text  # the byte tokenizer: 1 char = 1 token
    templated = _rm(reward_models["template"], max_length=50)
    ids = templated.encode(prompt, "START" + "y" * 200)
    text = templated.tokenizer.decode(ids)
    assert len(ids) == 50 and "END<|im_end|>\n### assistant:\nSTART" in text and text.endswith("y<|im_end|>\n")


def test_reward_model_refuses_pickled_weights(tmp_path, reward_models):
    folder = tmp_path / "binonly"
    folder.mkdir()
    (folder / "config.json").write_text((reward_models["plain"] / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(RankerError, match=r"^rank\.model: .*only pickled weights"):
        _rm(folder)
    with pytest.raises(RankerError, match=r"^rank\.model: 'nowhere/rm' is not a local folder"):
        _rm("nowhere/rm")


# ---------------------------------------------------------------------------------------------
# HTTP judge



def _http(url, **kw) -> HttpJudgeRanker:
    cfg = RankConfig(kind="http_judge", url=url, judge_model="judge-1", api_key_env="SELM_TEST_JUDGE_KEY", **kw)
    return HttpJudgeRanker(cfg, backoff_s=0.01)


def test_http_judge_and_llm_pairwise_send_their_extra_body(judge_server):
    server = judge_server(lambda body, headers, n: (200, "[[7]]", 0))
    extra = {"structured_outputs": {"regex": "\\[\\[[0-9]\\]\\]"}}
    _http(server.url, extra_body=extra).score([P], [["a", "bb"]])
    pairwise = build_ranker(RankConfig(kind="llm_pairwise", url=server.url, judge_model="judge-1", extra_body=extra))
    assert len(server.requests) == 2 and all(b["structured_outputs"] == extra["structured_outputs"]
                                             for b, _ in server.requests)
    assert pairwise.client.extra_body == extra


@pytest.mark.parametrize("text,value", [
    ("Rating: 7", 7.0), ("[[8]]", 8.0), ("Clear and correct. Rating: [[9]]", 9.0), ("6", 6.0), ("7/10", 7.0),
    ("Rating: **6**", 6.0), ("rating is 4.5.", 4.5), ("I refuse.", None), ("[[11]]", None), ("Rating: 0", None),
])
def test_parse_rating(text, value):
    assert parse_rating(text) == value


def test_http_judge_rates_and_sends_the_key_only_when_set(judge_server, monkeypatch):
    server = judge_server(lambda body, headers, n: (200, f"Rating: [[{len(body['messages'][1]['content']) % 10 + 1}]]", 0))
    monkeypatch.delenv("SELM_TEST_JUDGE_KEY", raising=False)
    r = build_ranker(RankConfig(kind="http_judge", url=server.url, judge_model="judge-1",
                                api_key_env="SELM_TEST_JUDGE_KEY"))
    scores = r.score([P], [["a", "bb"]])
    assert all(1 <= s <= 10 for s in scores[0]) and scores[0][0] != scores[0][1]
    # The two ratings are requested concurrently: they may reach the server in either order.
    assert all(b["model"] == "judge-1" and b["temperature"] == 0 and "Authorization" not in h
               for b, h in server.requests)
    assert sorted("[Assistant's response to rate]\na\n" in b["messages"][1]["content"]
                  for b, _ in server.requests) == [False, True]
    monkeypatch.setenv("SELM_TEST_JUDGE_KEY", "sk-test-secret")
    r.score([P], [["a"]])
    assert server.requests[-1][1]["Authorization"] == "Bearer sk-test-secret"
    assert not any("sk-test-secret" in str(v) for v in vars(r).values())  # read per call, never kept


def test_http_judge_retries_a_500_then_succeeds(judge_server):
    server = judge_server(lambda body, headers, n: (500, "overloaded", 0) if n == 1 else (200, "Rating: 3", 0))
    assert _http(server.url, max_retries=2).score([P], [["a"]]) == [[3.0]]
    assert len(server.requests) == 2


def test_http_judge_gives_up_after_retries_and_on_4xx(judge_server):
    server = judge_server(lambda body, headers, n: (503, "down", 0))
    with pytest.raises(RankerError, match=r"^rank\.endpoint\.url: .*/v1/chat/completions: HTTP 503 .*\(3 attempts; prompt_id 'z'\)"):
        _http(server.url, max_retries=2).score([P], [["a"]], ids=["z"])
    assert len(server.requests) == 3
    server = judge_server(lambda body, headers, n: (401, "bad key", 0))
    with pytest.raises(RankerError, match=r"HTTP 401 .*\(1 attempt; prompt 0\)"):
        _http(server.url, max_retries=2).score([P], [["a"]])
    assert len(server.requests) == 1


def test_http_judge_times_out_cleanly(judge_server):
    server = judge_server(lambda body, headers, n: (200, "Rating: 5", 0.6))
    t0 = time.perf_counter()
    with pytest.raises(RankerError, match=r"timed out after 0.2 s \(2 attempts; prompt 0\)"):
        _http(server.url, timeout_s=0.2, max_retries=1).score([P], [["a"]])
    assert time.perf_counter() - t0 < 2.0


def test_http_judge_unparseable_reply(judge_server):
    server = judge_server(lambda body, headers, n: (200, "It is quite good.", 0))
    with pytest.raises(RankerError, match=r"^rank: prompt 0: no 1-10 rating in the judge's reply 'It is quite good.'"):
        _http(server.url).score([P], [["a"]])


def test_http_judge_scores_a_batch_concurrently_and_never_pays_twice(judge_server):
    """Six ratings in flight at once; when one prompt fails, the rank stage's one-by-one retry
    of the batch re-sends only the failed request."""
    def reply(body, headers, n):
        if "BAD" in body["messages"][1]["content"]:
            return 400, "rejected", 0
        return 200, f"[[{len(body['messages'][1]['content']) % 10 + 1}]]", 0.2
    server = judge_server(reply)
    r = _http(server.url, max_concurrency=6)
    prompts = [[{"role": "user", "content": t}] for t in ("x", "yy", "zzz")]
    scores = r.score(prompts, [["a", "bb"]] * 3)
    assert server.peak == 6 and len(server.requests) == 6
    assert scores == r.score(prompts, [["a", "bb"]] * 3)  # same ratings (reused, not re-sent)
    assert len(server.requests) == 6
    cands = [["a", "bb"], ["c", "BAD"], ["dd", "e"]]
    with pytest.raises(RankerError, match=r"HTTP 400 .*\(1 attempt; prompt 1\)$"):
        r.score(prompts, cands)
    sent = len(server.requests)
    assert r.score([prompts[0]], [cands[0]]) and r.score([prompts[2]], [cands[2]])
    with pytest.raises(RankerError):
        r.score([prompts[1]], [cands[1]])
    assert len(server.requests) == sent + 1


def test_http_judge_redacts_the_key_from_errors(judge_server, monkeypatch):
    monkeypatch.setenv("SELM_TEST_JUDGE_KEY", "sk-echoed-secret")
    server = judge_server(lambda body, headers, n: (400, f"bad header {headers['Authorization']}", 0))
    with pytest.raises(RankerError) as e:
        _http(server.url).score([P], [["a"]])
    assert "sk-echoed-secret" not in str(e.value) and "Bearer ***" in str(e.value)


def test_reward_model_loads_whole_on_the_process_device(reward_models, monkeypatch):
    """After a ZeRO-3 training stage in the same process transformers' DeepSpeed setting is on, and
    a plain load would partition the weights (zero.Init): the ranker loads whole (the guard the
    generator uses), onto models.default_device() (a stand-in device here), in its dtype."""
    import contextlib

    import torch

    from selm import models
    from selm.engines.rankers import scoring_dtype

    state = {"guarded": False, "loads": []}
    real_guard = models.whole_weights

    @contextlib.contextmanager
    def guard():
        with real_guard():
            state["guarded"] = True
            try:
                yield
            finally:
                state["guarded"] = False

    from transformers import AutoModelForSequenceClassification

    real_load = AutoModelForSequenceClassification.from_pretrained.__func__

    def load(cls, *args, **kwargs):
        state["loads"].append((state["guarded"], kwargs["dtype"]))
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(models, "whole_weights", guard)
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(load))
    monkeypatch.setattr(models, "default_device", lambda: torch.device("meta"))
    r = _rm(reward_models["plain"])
    assert state["loads"] == [(True, torch.float32)]
    assert r.device == torch.device("meta") and {p.device.type for p in r.model.parameters()} == {"meta"}
    # Half precision on GPUs: bf16 where native, else fp16; fp32 on a CPU.
    from selm import precision

    for native, want in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        assert scoring_dtype(torch.device("cuda", 0)) == want
    assert scoring_dtype(torch.device("cpu")) == torch.float32
