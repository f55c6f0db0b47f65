"""Token log-probs through the LM head without building the (tokens x vocabulary) logits at once.

log p(target_m) = z[m, target_m] - logsumexp_v z[m, v], with z = h @ W^T (optionally soft-capped,
z = cap * tanh(z / cap)). The plain way materialises z (M x V, e.g. 2,200 x 49,152 x 4 B = 0.43 GB)
plus its softmax and gradient; here the vocabulary is walked in chunks: the forward keeps a running
logsumexp and saves only h and the (M,) logsumexp, the backward recomputes each chunk's logits and
turns them into g * (onehot - softmax) in place. The values and gradients equal the plain head's
(tests/test_lmhead.py); the peak memory this saves in a training step is measured in BENCHMARKS.md
("Memory") and notes/train_benchmark.md.

The chunk width follows the number of rows: on a CPU each (rows x chunk) fp32 block is kept near
2 M elements (8 MB), which stays in the allocator's reused heap and the caches; much wider blocks
(4,096 columns: 37 MB at 2,269 rows) were page-faulted in afresh each time and made the head
slower (`benchmarks/lmhead_chunk.py`; the figures are in notes/train_benchmark.md). Accelerators
get far larger blocks (fewer kernel launches).
"""

from __future__ import annotations

import torch

CPU_BLOCK = 1 << 21  # elements of one (rows x chunk) fp32 block on a CPU
DEVICE_BLOCK = 1 << 26  # ... on an accelerator (256 MB)


def chunk_width(rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary columns per chunk: a multiple of 256 near block / rows, at least 256."""
    block = CPU_BLOCK if device.type == "cpu" else DEVICE_BLOCK
    return min(vocab, max(256, round(block / max(rows, 1) / 256) * 256))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would use for the head (autocast does not reach inside a Function)."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return h.dtype


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, chunk: int, cap: float):
        M, V = h.shape[0], weight.shape[0]
        lse = torch.full((M,), -float("inf"), dtype=torch.float32, device=h.device)
        picked = torch.zeros(M, dtype=torch.float32, device=h.device)
        rows = torch.arange(M, device=h.device)
        for s in range(0, V, chunk):
            z = (h @ weight[s:s + chunk].t()).float()  # (M, C)
            if cap:
                z = torch.tanh(z / cap) * cap
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
            inside = (target >= s) & (target < s + chunk)
            picked[inside] = z[rows[inside], target[inside] - s]
        ctx.save_for_backward(h, weight, target, lse)
        ctx.chunk, ctx.cap = chunk, cap
        return picked - lse

    @staticmethod
    def backward(ctx, g):
        h, weight, target, lse = ctx.saved_tensors
        chunk, cap = ctx.chunk, ctx.cap
        g = g.float()
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        rows = torch.arange(h.shape[0], device=h.device)
        for s in range(0, weight.shape[0], chunk):
            w = weight[s:s + chunk]
            z = (h @ w.t()).float()
            if cap:
                t = torch.tanh(z / cap)
                z = t * cap
            # d log p / d z = onehot(target) - softmax(z); scaled by the incoming gradient g.
            grad = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])
            inside = (target >= s) & (target < s + chunk)
            grad[rows[inside], target[inside] - s] += g[inside]
            if cap:
                grad.mul_(1 - t * t)  # through z = cap * tanh(raw / cap)
            grad = grad.to(h.dtype)
            grad_h.add_(grad @ w)
            if grad_w is not None:
                grad_w[s:s + chunk] = grad.t() @ h
        return grad_h.to(h.dtype), grad_w, None, None, None


def token_logps(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, softcap: float | None = None,
                chunk: int | None = None) -> torch.Tensor:
    """log p(target) under the LM head, float32, shape (M,).

    h: (M, H) hidden states that predict the tokens; weight: (V, H) output embedding (no bias);
    target: (M,) token ids; softcap: final_logit_softcapping of models that use it (Gemma 2);
    chunk: vocabulary columns per chunk (default: chunk_width).
    Under autocast the matmuls run in the autocast dtype, as the plain nn.Linear head would; the
    casts are outside the Function, so gradients reach the float32 weight through them.
    """
    dtype = _compute_dtype(h)
    chunk = chunk or chunk_width(h.shape[0], weight.shape[0], h.device)
    return _ChunkedTokenLogps.apply(h.to(dtype), weight.to(dtype), target, chunk, float(softcap or 0.0))
