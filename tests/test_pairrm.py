"""PairRM (rank.kind: pairrm) on a tiny randomly initialised DeBERTa-v2 built locally: the input
layout and truncation, the head against a hand computation from the raw weights, the ranking from
both orders of every pair, batch independence, both checkpoint layouts, and bad folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selm.config import ConfigError, RankConfig, check_for_loop, config_from_dict
from selm.engines import pairrm as pr
from selm.engines.ranker_base import RankerError
from selm.engines.rankers import PairRMRanker
from selm.engines.registry import build_ranker
from selm.io import InputError, atomic_write_jsonl
from selm.stages.rank import run_rank
from selm.tiny import build_tiny_tokenizer

from helpers_pairrm import save_tiny_pairrm, tiny_deberta_config

CANDS = ["The capital of France is Paris.", "paris", "I do not know, sorry!!", "Lyon? Marseille? Paris."]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_pairrm(tmp_path_factory.mktemp("pairrm") / "hf", seed=0)


@pytest.fixture(scope="module")
def model(ckpt):
    return pr.PairRM(ckpt, device="cpu")


def _tokens(m, ids):
    return m.tokenizer.convert_ids_to_tokens(ids)


def test_input_is_three_segments_with_markers_and_pairrm_truncation(ckpt):
    m = pr.PairRM(ckpt, device="cpu")
    ids, marks = m.encode("ab", "xy", "z")
    assert _tokens(m, ids) == ["[CLS]", "<|source|>", "a", "b", "[SEP]", "[CLS]", "<|candidate1|>", "x", "y", "[SEP]",
                               "[CLS]", "<|candidate2|>", "z", "[SEP]"]
    assert marks == (1, 6, 11)
    # Lengths shrunk so truncation shows: source segment <= 8 tokens, cut at its end; each candidate
    # gets (8 + 2*6 - len(source segment)) // 2 tokens.
    m.source_max_length, m.candidate_max_length = 8, 6
    ids, marks = m.encode("abcdefghij", "0123456789", "short")
    toks = _tokens(m, ids)
    assert toks == ["[CLS]", "<|source|>", "a", "b", "c", "d", "e", "[SEP]",
                    "[CLS]", "<|candidate1|>", "0", "1", "2", "[SEP]",
                    "[CLS]", "<|candidate2|>", "s", "h", "o", "[SEP]"]
    assert marks == (1, 9, 15)
    # A short source leaves room: (20 - 5) // 2 = 7 tokens per candidate.
    ids, _ = m.encode("ab", "0123456789", "z")
    assert _tokens(m, ids)[4:13] == ["[SEP]", "[CLS]", "<|candidate1|>", "0", "1", "2", "3", "[SEP]", "[CLS]"]
    # Marker and separator text inside a response cannot forge a segment or a marker.
    ids, marks = m.encode("q", "a<|candidate2|>b[SEP]c", "d")
    toks = _tokens(m, ids)
    assert toks[4:12] == ["[CLS]", "<|candidate1|>", "a", "Ġ", "b", "Ġ", "c", "[SEP]"]
    assert toks.count("<|candidate2|>") == 1 and toks[marks[2]] == "<|candidate2|>"


def _manual_logit(ckpt, m, source, a, b) -> float:
    """The head computed by hand from the raw weights: [h_src; h_a] and [h_src; h_b] through
    Linear(2H,H) - tanh - Linear(H,1), difference."""
    w = load_file(str(ckpt / "model.safetensors"))
    ids, marks = m.encode(source, a, b)
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        h = m.model.pretrained_model(input_ids=torch.tensor([ids]), attention_mask=mask).last_hidden_state[0]
    # The encoder inside the module carries the checkpoint's weights.
    assert torch.equal(m.model.pretrained_model.embeddings.word_embeddings.weight,
                       w["pretrained_model.embeddings.word_embeddings.weight"])

    def head(x):
        y = torch.tanh(x @ w["head_layer.1.weight"].T + w["head_layer.1.bias"])
        return (y @ w["head_layer.4.weight"].T + w["head_layer.4.bias"]).mean()

    src, ha, hb = h[marks[0]], h[marks[1]], h[marks[2]]
    return float(head(torch.cat([src, ha])) - head(torch.cat([src, hb])))


def test_compare_is_the_head_on_the_marker_states(ckpt, model):
    got = model.compare([("What is the capital of France?", CANDS[0], CANDS[2]),
                         ("What is the capital of France?", CANDS[2], CANDS[0])])
    want = [_manual_logit(ckpt, model, "What is the capital of France?", CANDS[0], CANDS[2]),
            _manual_logit(ckpt, model, "What is the capital of France?", CANDS[2], CANDS[0])]
    assert got == pytest.approx(want, abs=1e-5)
    # The random model has a position bias: the two orders do not simply negate each other.
    assert abs(got[0] + got[1]) > 1e-3


def test_scores_combine_both_orders_of_every_pair(model):
    src = "What is the capital of France?"
    scores = model.rank_scores([src], [CANDS])[0]
    k = len(CANDS)
    L = {(i, j): model.compare([(src, CANDS[i], CANDS[j])])[0] for i in range(k) for j in range(k) if i != j}
    want = [sum(L[i, j] - L[j, i] for j in range(k) if j != i) / k for i in range(k)]
    assert scores == pytest.approx(want, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == k  # the model tells them apart
    # Two candidates: the better one is the one whose combined log-odds L(a,b) - L(b,a) is positive.
    a, b = CANDS[0], CANDS[2]
    two = model.rank_scores([src], [[a, b]])[0]
    combined = L[0, 2] - L[2, 0]
    assert two == pytest.approx([combined / 2, -combined / 2], abs=1e-5)
    # Swapping the order of the candidates swaps their scores (the position bias cancels).
    assert model.rank_scores([src], [[b, a]])[0] == pytest.approx(two[::-1], abs=1e-5)
    perm = [2, 0, 3, 1]
    permuted = model.rank_scores([src], [[CANDS[i] for i in perm]])[0]
    assert permuted == pytest.approx([scores[i] for i in perm], abs=1e-5)


def test_single_candidate_scores_zero(model):
    assert model.rank_scores(["x"], [["only one"]]) == [[0.0]]


def test_batching_does_not_change_scores(ckpt):
    prompts = ["What is the capital of France?", "Say hi.", "A much longer prompt " * 5]
    cands = [CANDS, ["hi", "hello there", "no"], ["x" * 40, "y"]]
    one = pr.PairRM(ckpt, device="cpu", batch_size=1)
    many = pr.PairRM(ckpt, device="cpu", batch_size=7)
    together = many.rank_scores(prompts, cands)
    alone = [one.rank_scores([p], [c])[0] for p, c in zip(prompts, cands)]
    for t, a in zip(together, alone):
        assert t == pytest.approx(a, abs=1e-5)


def test_ranker_interface_and_conversation_source(ckpt, model):
    r = build_ranker(RankConfig(kind="pairrm", model=str(ckpt), batch_size=4))
    assert isinstance(r, PairRMRanker)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    got = r.score([prompt, prompt], [CANDS, CANDS[:2]], ids=["a", "b"])
    assert got[0] == pytest.approx(model.rank_scores([prompt[0]["content"]], [CANDS])[0], abs=1e-5)
    assert len(got[1]) == 2
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert pr.source_text(convo) == "SYSTEM: Be brief.\nUSER: Hi"
    r.close()
    r.close()


def test_blender_layout_loads_the_same_weights(tmp_path, monkeypatch, model):
    # llm-blender/PairRM's own folder names only its backbone (DeBERTa-v3-large); shrink that here.
    monkeypatch.setattr(pr, "DEBERTA_V3_LARGE", tiny_deberta_config())
    path = save_tiny_pairrm(tmp_path / "blender", seed=0, layout="blender")
    blender = pr.PairRM(path, device="cpu")
    assert (blender.source_max_length, blender.candidate_max_length) == (1224, 412)
    triples = [("q", CANDS[0], CANDS[1]), ("q", CANDS[1], CANDS[0])]
    assert blender.compare(triples) == pytest.approx(model.compare(triples), abs=1e-6)


def test_bin_only_folder_is_refused_with_a_conversion_that_works(ckpt, model, tmp_path):
    path = tmp_path / "bin"
    shutil.copytree(ckpt, path)
    (path / "model.safetensors").unlink()
    torch.save(load_file(str(ckpt / "model.safetensors")), path / "pytorch_model.bin")
    with pytest.raises(RankerError) as e:
        build_ranker(RankConfig(kind="pairrm", model=str(path)))
    msg = str(e.value)
    assert msg.startswith(f"rank.model: {path}: only pickled weights (pytorch_model.bin); selm loads safetensors only")
    command = msg.split("convert it once: ", 1)[1]
    assert command.startswith("python -c ")
    code = command[len("python -c "):].strip('"')
    subprocess.run([sys.executable, "-c", code], check=True)
    converted = pr.PairRM(path, device="cpu")
    assert converted.compare([("q", "a", "b")]) == pytest.approx(model.compare([("q", "a", "b")]), abs=1e-6)


def test_bad_folders_name_the_key(ckpt, tmp_path):
    def err(path, key="rank"):
        with pytest.raises(RankerError) as e:
            build_ranker(RankConfig(kind="pairrm", model=str(path)), key=key)
        return str(e.value)

    assert err(tmp_path / "missing").startswith("rank.model: ")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in err(empty, key="evaluate.judge") and err(empty).startswith("rank.model: ")
    # No weights at all.
    nw = tmp_path / "noweights"
    shutil.copytree(ckpt, nw)
    (nw / "model.safetensors").unlink()
    assert "no .safetensors weights found" in err(nw)
    # Some other model's config.
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    (other / "config.json").write_text('{"model_type": "llama"}')
    assert "not a PairRM checkpoint" in err(other)
    # Weights without the pairwise head.
    headless = tmp_path / "headless"
    shutil.copytree(ckpt, headless)
    w = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v for k, v in w.items() if not k.startswith("head_layer.")}, str(headless / "model.safetensors"))
    assert "the weights do not fit PairRM's DeBERTa-v2 + head (missing head_layer.1.weight" in err(headless)
    # A tokenizer without PairRM's markers.
    notok = tmp_path / "notok"
    shutil.copytree(ckpt, notok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (notok / f).unlink()
    t = build_tiny_tokenizer(chat_template=False)
    t.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
    t.save_pretrained(notok)
    assert "the tokenizer lacks PairRM's token <|source|>" in err(notok)
    # A llm-blender folder whose backbone is not DeBERTa-v3-large.
    wrong = tmp_path / "wrong"
    shutil.copytree(ckpt, wrong)
    (wrong / "config.json").write_text('{"ranker_type": "pairranker", "model_name": "roberta-large"}')
    assert "is not microsoft/deberta-v3-large" in err(wrong)


def test_config_requires_the_folder():
    cfg = config_from_dict({"data": {"prompts": "p.jsonl"}, "rank": {"kind": "pairrm"}})
    with pytest.raises(ConfigError, match=r"^rank\.model: required when rank\.kind is 'pairrm'"):
        check_for_loop(cfg)
    with pytest.raises(InputError, match=r"^rank\.model: required"):
        pr.load_pairrm(RankConfig(kind="pairrm"), "rank")
    # A gold judge scores one answer per prompt; PairRM has nothing to compare it with.
    judged = config_from_dict({"data": {"prompts": "p.jsonl"}, "rank": {"kind": "pairrm", "model": "x"},
                               "evaluate": {"judge": {"kind": "pairrm", "model": "x"}}})
    with pytest.raises(ConfigError, match=r"^evaluate\.judge\.kind: 'pairrm' cannot score single responses"):
        check_for_loop(judged)


def test_rank_stage_writes_pairrm_scores(ckpt, model, tmp_path):
    gens = tmp_path / "generations.jsonl"
    atomic_write_jsonl(gens, [
        {"prompt_id": "a", "prompt": [{"role": "user", "content": "What is the capital of France?"}],
         "candidates": CANDS[:3], "sources": ["greedy", "dataset_chosen", "dataset_rejected"]},
        {"prompt_id": "b", "prompt": "Say hi.", "candidates": ["hi", "no"], "sources": ["greedy", "dataset_chosen"]},
    ])
    cfg = config_from_dict({"data": {"prompts": "p.jsonl"}, "rank": {"kind": "pairrm", "model": str(ckpt)}})
    stats = run_rank(cfg, gens, tmp_path / "rank")
    assert stats["ranker"] == "pairrm" and stats["scored"] == 2
    rows = [json.loads(l) for l in (tmp_path / "rank" / "scores.jsonl").read_text().splitlines()]
    want = model.rank_scores(["What is the capital of France?", "Say hi."], [CANDS[:3], ["hi", "no"]])
    for row, w in zip(rows, want):
        assert row["scores"] == pytest.approx(w, abs=1e-5)
    assert (tmp_path / "rank" / "DONE.json").is_file()
