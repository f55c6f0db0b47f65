"""Summed response log-probs (selm/objective/logprobs.py) against a plain per-token loop on a tiny model."""

import pytest
import torch
from torch.testing import assert_close

from selm.chat import end_of_turn_ids, prompt_text
from selm.data import PairRecord
from selm.objective.logprobs import (KINDS, ResponseLogps, batch_logps, collate_padded, collate_prefix, score_logps,
                                     tokenize_pairs, truncate)
from selm.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok_model():
    tok = build_tiny_tokenizer()
    return tok, build_tiny_model(len(tok), seed=1).eval()


def plain_logps(model, prompt, response):
    """Reference implementation: full forward, log_softmax, add the response tokens one by one."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(response))


PAIRS = [
    PairRecord([{"role": "user", "content": "Say hi"}], "Hi there, friend!", "no", "hello"),
    PairRecord([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
                {"role": "assistant", "content": "Yes?"}, {"role": "user", "content": "Name a colour."}],
               "Blue.", "I would rather talk about something else entirely.", "Red, or maybe green."),
    PairRecord([{"role": "user", "content": "x" * 40}], "short", "a much longer rejected answer here", "y0"),
]


@pytest.mark.parametrize("collate", [collate_padded, collate_prefix])
def test_batched_logps_equal_plain_loop(tok_model, collate):
    tok, model = tok_model
    ex = tokenize_pairs(tok, PAIRS, max_length=200, max_prompt_length=100, with_exploration=True)
    with torch.no_grad():
        got = batch_logps(ResponseLogps(model), collate(ex, tok.pad_token_id))
        for k, kind in enumerate(KINDS):
            want = torch.tensor([plain_logps(model, e.prompt, e.responses[k]) for e in ex], dtype=torch.float32)
            assert_close(got[kind], want, atol=2e-4, rtol=1e-5)


def test_prefix_and_padded_layouts_agree_with_gradients(tok_model):
    tok, _ = tok_model
    ex = tokenize_pairs(tok, PAIRS, max_length=200, max_prompt_length=100, with_exploration=True)
    grads = []
    for collate in (collate_padded, collate_prefix):
        model = build_tiny_model(len(tok), seed=1)
        out = batch_logps(ResponseLogps(model), collate(ex, tok.pad_token_id))
        sum(v.sum() for v in out.values()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_response_ends_with_end_of_turn_and_excludes_prompt(tok_model):
    tok, _ = tok_model
    ex = tokenize_pairs(tok, PAIRS[:1], max_length=200, max_prompt_length=100, with_exploration=True)[0]
    eot = end_of_turn_ids(tok)
    assert tok.decode(ex.prompt) == prompt_text(tok, PAIRS[0].prompt)
    for r in ex.responses:
        assert r[-1] in eot and sum(t in eot for t in r) == 1
    assert tok.decode(ex.responses[0][:-1]) == "Hi there, friend!"


def test_truncation_prompt_from_left_each_response_by_its_own_length():
    prompt, resp = list(range(10)), list(range(100, 120))
    p, r = truncate(prompt, resp, max_length=16, max_prompt_length=6)
    assert p == list(range(4, 10))  # the start of the prompt is cut, the latest turn kept
    assert r == list(range(100, 110))  # 6 + 10 = 16
    tok = build_tiny_tokenizer()
    pair = PairRecord([{"role": "user", "content": "q"}], "c", "r", "e" * 50)
    ex = tokenize_pairs(tok, [pair], max_length=40, max_prompt_length=20, with_exploration=True)[0]
    # chosen and rejected are short; only the exploration response is cut, by its own length.
    assert len(ex.prompt) + len(ex.responses[2]) == 40
    assert len(ex.responses[0]) == len(ex.responses[1]) == 2


def test_plain_fallback_without_chat_template():
    tok = build_tiny_tokenizer(chat_template=False)
    pair = PairRecord([{"role": "user", "content": "Hi"}], "Hello", "Go away", None)
    ex = tokenize_pairs(tok, [pair], max_length=100, max_prompt_length=50, with_exploration=False)[0]
    assert tok.decode(ex.prompt) == "User: Hi\n\nAssistant:"
    assert tok.decode(ex.responses[0]) == " Hello<|endoftext|>"
    assert len(ex.responses) == 2


@pytest.mark.parametrize("collate", [collate_padded, collate_prefix])
def test_score_logps_equals_per_example_in_input_order(tok_model, collate):
    tok, _ = tok_model
    # Lengths out of order, so the length sort has to put the results back.
    pairs = [PAIRS[1], PAIRS[0], PAIRS[2], PAIRS[0]]
    ex = tokenize_pairs(tok, pairs, max_length=200, max_prompt_length=100, with_exploration=True)
    module = ResponseLogps(build_tiny_model(len(tok), seed=1)).train()  # not the shared eval-mode fixture
    got = score_logps(module, ex, batch_size=2, collate=collate, pad_id=tok.pad_token_id, device="cpu")
    assert module.training  # the mode it was in comes back
    module.eval()
    with torch.no_grad():
        one = [batch_logps(module, collate([e], tok.pad_token_id)) for e in ex]
    for kind in KINDS:
        assert got[kind].dtype == torch.float32 and got[kind].device.type == "cpu"
        assert_close(got[kind], torch.cat([o[kind] for o in one]), atol=1e-5, rtol=1e-5)
    # A shard (as one process of several would score) gives the full run's rows, in its own order.
    idx = [3, 0, 2]
    part = score_logps(module, ex, batch_size=2, collate=collate, pad_id=tok.pad_token_id, device="cpu", indices=idx)
    for kind in KINDS:
        assert_close(part[kind], got[kind][idx], atol=1e-5, rtol=1e-5)
