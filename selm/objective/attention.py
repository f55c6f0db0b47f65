"""Attention for the prefix layout that computes only the blocks the block mask allows.

A prefix row is ``prompt | response_1 | ... | response_K | padding``: the prompt attends to itself
causally; each response to the whole prompt and to itself causally. Run as one masked SDPA over the
row, a CPU computes every (query, key) pair of the (P + sum L)^2 square, masked or not; at the
paper's lengths (prompt 512, three responses of 512) that is 4.2 M pairs per head, of which only
1.3 M are needed. Here each row is split into the blocks that are needed:

- the prompt over itself, causal;
- every response over the prompt, one unmasked block for all K responses;
- each response over itself, causal;

each a call of PyTorch's CPU flash-attention kernel, which skips the upper triangle when causal.
A response's two blocks are merged through their log-sum-exps (the softmax over prompt and own
keys together). The backward pass runs the kernel's backward on each block with the merged output
and log-sum-exp, which gives each block its exact share of the gradient (the same identity ring
attention uses), so nothing but q, k, v, the output and the log-sum-exp is saved: as much as one
SDPA saves. Equal to the block-mask path in outputs and gradients (tests/test_attention.py).

Used through transformers' attention interface under the name ``selm_segments`` for prefix batches
on CPUs (the kernels are CPU ones); anything else (padded batches, other devices) gets SDPA with the
block or padding mask, as before.
"""

from __future__ import annotations

import torch

NAME = "selm_segments"

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _blocks(lens: tuple[int, ...]):
    """(query slice, key slice, causal) of one row whose prompt and responses have lengths `lens`."""
    P, R = lens[0], sum(lens[1:])
    out = [(slice(0, P), slice(0, P), True)]
    if R:
        out.append((slice(P, P + R), slice(0, P), False))
    s = P
    for L in lens[1:]:
        out.append((slice(s, s + L), slice(s, s + L), True))
        s += L
    return out


def _merge(o_acc, lse_acc, o, lse):
    """Softmax over the union of two key sets from each set's (output, log-sum-exp)."""
    new = torch.logaddexp(lse_acc, lse)
    o_acc = o_acc * torch.exp(lse_acc - new).unsqueeze(-1) + o * torch.exp(lse - new).unsqueeze(-1)
    return o_acc, new


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg_lens, scale):
        """q: (B, H, T, D); k, v: (B, Hkv, T, D); seg_lens: per row (P, L_1, ..., L_K).
        Returns (B, T, H, D), padding positions zero."""
        B, H, T, D = q.shape
        buf = q.new_zeros(B, T, H, D)  # the output, in the layout the caller wants
        out = buf.transpose(1, 2)  # (B, H, T, D) view, the kernel's
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # the kernel's log-sum-exp dtype
        lse = q.new_zeros(B, H, T, dtype=acc)
        for b, lens in enumerate(seg_lens):
            P, n = lens[0], sum(lens)
            qb, kb, vb = q[b:b + 1], k[b:b + 1], v[b:b + 1]
            o, l = _fwd(qb[:, :, :P], kb[:, :, :P], vb[:, :, :P], 0.0, True, scale=scale)
            out[b:b + 1, :, :P], lse[b:b + 1, :, :P] = o, l
            if n == P:
                continue
            # Every response over the prompt, in one call; then each over itself, merged in.
            o_r, l_r = _fwd(qb[:, :, P:n], kb[:, :, :P], vb[:, :, :P], 0.0, False, scale=scale)
            o_r = o_r.to(acc)
            s = P
            for L in lens[1:]:
                o, l = _fwd(qb[:, :, s:s + L], kb[:, :, s:s + L], vb[:, :, s:s + L], 0.0, True, scale=scale)
                i = slice(s - P, s - P + L)
                o_r[:, :, i], l_r[:, :, i] = _merge(o_r[:, :, i], l_r[:, :, i], o.to(acc), l)
                s += L
            out[b:b + 1, :, P:n], lse[b:b + 1, :, P:n] = o_r.to(out.dtype), l_r
        ctx.save_for_backward(q, k, v, buf, lse)
        ctx.seg_lens, ctx.scale = seg_lens, scale
        return buf

    @staticmethod
    def backward(ctx, grad):
        q, k, v, buf, lse = ctx.saved_tensors
        out, grad = buf.transpose(1, 2), grad.transpose(1, 2)  # (B, H, T, D), as the kernel's
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b, lens in enumerate(ctx.seg_lens):
            for qs, ks, causal in _blocks(lens):
                # The merged output and log-sum-exp: each block's exact share of the gradient.
                g_q, g_k, g_v = _bwd(grad[b:b + 1, :, qs], q[b:b + 1, :, qs], k[b:b + 1, :, ks], v[b:b + 1, :, ks],
                                     out[b:b + 1, :, qs], lse[b:b + 1, :, qs], 0.0, causal, scale=ctx.scale)
                dq[b:b + 1, :, qs] += g_q
                dk[b:b + 1, :, ks] += g_k
                dv[b:b + 1, :, ks] += g_v
        return dq, dk, dv, None, None


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_lens, scale: float | None = None
                      ) -> torch.Tensor:
    """Prefix-layout attention. q: (B, H, T, D); k, v: (B, Hkv, T, D) with H a multiple of Hkv;
    seg_lens: per row a tuple (P, L_1, ..., L_K) of prompt and response lengths, in row order
    from position 0 (positions after their sum are padding). Returns (B, T, H, D)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # As SDPA under autocast: one dtype for all three (rotary embeddings leave q, k in float32 and v
    # in the autocast dtype). Cast outside the Function, so gradients flow back through the casts.
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.promote_types(
        torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _SegmentAttention.apply(q, k, v, tuple(tuple(int(x) for x in r) for r in seg_lens), float(scale))


def hf_segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         seg_lens=None, **kwargs):
    """transformers' attention-interface signature; `seg_lens` arrives through the model's kwargs.
    Without it (a padded batch, generation, tensors off the CPU) this is plain SDPA with the mask."""
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:  # use_segments refuses such models; this guards the rest
            raise RuntimeError(f"attention '{NAME}' cannot apply {name}")
    if seg_lens is None or query.device.type != "cpu":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return segment_attention(query, key, value, seg_lens, scaling), None


UNSUPPORTED = ("sliding_window", "softcap", "s_aux")  # attention-interface arguments segments do not apply


def _plain_causal(config) -> bool:
    """No sliding windows, logit soft-capping or attention sinks: the attention the blocks reproduce."""
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "sliding_window", None) and getattr(
            config, "use_sliding_window", True):
        return False
    return not any("sliding" in str(t) for t in getattr(config, "layer_types", None) or ())


def use_segments(model) -> bool:
    """Switch `model` to segment attention where it can take it: a transformers model that takes its
    attention function from the attention interface, runs SDPA (a user's eager or flash-attention
    choice is kept) and has plain causal attention (no sliding window, soft-capping or sinks).
    Batches without seg_lens still get SDPA. Returns whether it did."""
    config = getattr(model, "config", None)
    if not getattr(model, "_supports_attention_backend", False) or config is None or not _plain_causal(config):
        return False
    if config._attn_implementation == NAME:
        return True
    if config._attn_implementation not in (None, "sdpa"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, hf_segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA gets, for batches without seg_lens
    config._attn_implementation = NAME
    return True
