"""The vocabulary-chunked LM-head log-probs equal the plain logsumexp path: values and gradients."""

import pytest
import torch

from selm.objective.lmhead import chunk_width, token_logps


def plain(h, w, target, cap=None):
    z = (h @ w.t()).float()
    if cap:
        z = torch.tanh(z / cap) * cap
    return z.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(z, -1)


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("chunk", [7, 64, 1000, None])  # uneven last chunk, several, one chunk, the default
def test_values_and_gradients_equal_the_plain_path(cap, chunk):
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(13, 16, generator=g, dtype=torch.float64)
    w0 = torch.randn(100, 16, generator=g, dtype=torch.float64)
    target = torch.randint(0, 100, (13,), generator=g)
    target[0], target[1] = 0, 99  # both ends of the vocabulary
    weights = torch.randn(13, generator=g, dtype=torch.float64)
    out = []
    for fn in (lambda h, w: plain(h, w, target, cap), lambda h, w: token_logps(h, w, target, softcap=cap, chunk=chunk)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(h, w)
        (y.double() * weights).sum().backward()
        out.append((y.double(), h.grad, w.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # log-probabilities, so never above 0
    assert (out[1][0] <= 0).all()


def test_bf16_autocast_matches_the_plain_head_under_autocast():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 32, generator=g)
    w = torch.randn(300, 32, generator=g, requires_grad=True)
    target = torch.randint(0, 300, (20,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(h, w).float()
        ref = ref.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(ref, -1)
        ours = token_logps(h, w, target, chunk=64)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=2e-2)
    ours.sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_chunk_width_keeps_cpu_blocks_small_and_aligned():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # A SmolLM2-135M micro-batch: ~2 M-element fp32 blocks (8 MB), not 4,096 columns (37 MB).
    assert chunk_width(2269, 49152, cpu) == 1024
    assert chunk_width(4538, 49152, cpu) == 512  # twice the rows, half the columns
    for rows in (1, 100, 2269, 10_000, 1_000_000):
        w = chunk_width(rows, 49152, cpu)
        assert w % 256 == 0 and 256 <= w <= 49152
    assert chunk_width(1_000_000, 49152, cpu) == 256  # never below 256 columns
    assert chunk_width(1, 300, cpu) == 300  # never wider than the vocabulary
    assert chunk_width(2269, 128_256, cuda) > chunk_width(2269, 128_256, cpu)  # fewer kernel launches
