"""Segment attention (selm/objective/attention.py) against the block-mask SDPA it replaces."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from selm.objective.attention import NAME, segment_attention, use_segments
from selm.objective.logprobs import ResponseLogps, batch_logps, collate_padded, collate_prefix, tokenize_pairs
from selm.tiny import build_tiny_model, build_tiny_tokenizer
from test_logprobs import PAIRS


def block_mask(seg_lens, T):
    """The prefix layout's mask, built independently of collate_prefix."""
    m = torch.zeros(len(seg_lens), 1, T, T, dtype=torch.bool)
    for b, lens in enumerate(seg_lens):
        P = lens[0]
        m[b, 0, :P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        s = P
        for L in lens[1:]:
            m[b, 0, s:s + L, :P] = True
            m[b, 0, s:s + L, s:s + L] = torch.ones(L, L, dtype=torch.bool).tril()
            s += L
        for t in range(s, T):
            m[b, 0, t, t] = True
    return m


@pytest.mark.parametrize("seg_lens, heads, kv_heads", [
    ([(5, 4, 7, 3), (9, 2, 2, 6), (3, 8, 1, 4)], 6, 2),  # three responses, grouped-query heads, padding
    ([(1, 1, 1, 1)], 2, 2),  # one-token prompt and responses
    ([(6, 5), (2, 9)], 4, 4),  # one response per row (scoring single responses)
    ([(4, 3, 6), (7, 1, 1)], 3, 1),  # chosen and rejected only (alpha = 0)
    ([(70, 40, 33, 51)], 2, 1),  # longer than the kernel's blocks
])
def test_equals_block_mask_sdpa_in_values_and_gradients(seg_lens, heads, kv_heads):
    torch.manual_seed(0)
    T, D = max(sum(lens) for lens in seg_lens) + 2, 8
    q = torch.randn(len(seg_lens), heads, T, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(len(seg_lens), kv_heads, T, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rep = heads // kv_heads
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=block_mask(seg_lens, T)).transpose(1, 2)
    got = segment_attention(q, k, v, seg_lens)
    real = torch.zeros(len(seg_lens), T, 1, 1, dtype=torch.float64)
    for b, lens in enumerate(seg_lens):
        real[b, :sum(lens)] = 1
    assert got.shape == want.shape
    assert_close(got * real, want * real, atol=1e-12, rtol=1e-12)
    assert (got * (1 - real)).abs().max() == 0  # padding positions are zero
    w = torch.randn_like(want) * real  # padding positions never reach a loss
    for a, b in zip(torch.autograd.grad((want * w).sum(), (q, k, v)), torch.autograd.grad((got * w).sum(), (q, k, v))):
        assert_close(a, b, atol=1e-12, rtol=1e-12)


def logps_and_grads(segments: bool, *, checkpointing: bool = False, collate=collate_prefix, autocast=None):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=1)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = ResponseLogps(model, segments=segments).train()
    ex = tokenize_pairs(tok, PAIRS, max_length=200, max_prompt_length=100, with_exploration=True)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = batch_logps(module, collate(ex, tok.pad_token_id))
    (out["chosen"] - 2 * out["rejected"] + 0.5 * out["explore"]).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}, model


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_logps_and_gradients_equal_the_block_mask_path(checkpointing):
    out_mask, grads_mask, model_mask = logps_and_grads(False, checkpointing=checkpointing)
    out_seg, grads_seg, model_seg = logps_and_grads(True, checkpointing=checkpointing)
    assert model_seg.config._attn_implementation == NAME and model_mask.config._attn_implementation == "sdpa"
    for kind in out_mask:
        assert_close(out_seg[kind], out_mask[kind], atol=1e-5, rtol=1e-5)
    for name in grads_mask:
        assert_close(grads_seg[name], grads_mask[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_equals_the_block_mask_path_within_bf16_tolerance():
    """Under autocast, rotary embeddings leave q and k in float32 and v in bf16; both paths cast as SDPA does."""
    out_mask, grads_mask, _ = logps_and_grads(False, autocast=torch.bfloat16)
    out_seg, grads_seg, _ = logps_and_grads(True, autocast=torch.bfloat16)
    for kind in out_mask:
        assert_close(out_seg[kind], out_mask[kind], atol=0.1, rtol=0.02)
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])
    a, b = flat(grads_mask), flat(grads_seg)
    assert torch.isfinite(b).all() and torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_switched_model_still_runs_sdpa_without_segments():
    """Padded batches, and plain calls (generation), on a model switched to segment attention."""
    out_plain, grads_plain, _ = logps_and_grads(False, collate=collate_padded)
    out_sw, grads_sw, model = logps_and_grads(True, collate=collate_padded)
    for kind in out_plain:
        assert_close(out_sw[kind], out_plain[kind], atol=1e-6, rtol=1e-6)
    for name in grads_plain:
        assert_close(grads_sw[name], grads_plain[name], atol=1e-6, rtol=1e-6)
    tok = build_tiny_tokenizer()
    plain = build_tiny_model(len(tok), seed=1).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [tok.pad_token_id, tok.pad_token_id, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        assert_close(model.eval()(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)


def test_other_attention_choices_are_kept(tmp_path):
    tok = build_tiny_tokenizer()
    eager = build_tiny_model(len(tok), seed=1)
    eager.config._attn_implementation = "eager"
    assert not use_segments(eager) and eager.config._attn_implementation == "eager"
    assert not ResponseLogps(eager).segments
    with pytest.raises(ValueError, match="cannot take segment attention"):
        ResponseLogps(eager, segments=True)
    # A switched model saves a config without the switch.
    model = build_tiny_model(len(tok), seed=1)
    assert ResponseLogps(model).segments
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_models_whose_attention_is_not_plain_causal_keep_sdpa():
    from transformers import MistralConfig, MistralForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    windowed = MistralForCausalLM(MistralConfig(sliding_window=4, **small))
    assert not use_segments(windowed) and windowed.config._attn_implementation == "sdpa"
    assert use_segments(MistralForCausalLM(MistralConfig(sliding_window=None, **small)))
    with pytest.raises(RuntimeError, match="cannot apply softcap"):
        from selm.objective.attention import hf_segment_attention

        q = torch.zeros(1, 2, 3, 8)
        hf_segment_attention(None, q, q, q, None, seg_lens=((1, 2),), softcap=50.0)
