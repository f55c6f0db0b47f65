"""Hand-computed checks of the objectives (selm/objective/losses.py).

Worked example used throughout (beta = 0.5):
    policy chosen -1.0, policy rejected -2.0, ref chosen -1.5, ref rejected -1.5
    chosen log-ratio  = -1.0 - (-1.5) =  0.5
    rejected log-ratio = -2.0 - (-1.5) = -0.5
    DPO logit = beta * (0.5 - (-0.5)) = 0.5
    DPO loss = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.4740770
    rewards: chosen 0.5 * 0.5 = 0.25, rejected 0.5 * -0.5 = -0.25
Exploration (alpha = 0.1): policy y0 -3.0, ref y0 -2.0
    SELM term = alpha * beta * (-3.0 - (-2.0)) = 0.1 * 0.5 * -1.0 = -0.05  -> total 0.4240770
    XPO term  = alpha * -3.0 = -0.3
IPO (beta = 0.25): (1.0 - 1 / (2 * 0.25))^2 = (1 - 2)^2 = 1.0
"""

import math

import pytest
import torch
from torch.testing import assert_close

from selm.objective.losses import dpo_loss, ipo_loss, preference_objective, selm_explore_term, selm_loss, xpo_explore_term


def t(*v, grad=False):
    return torch.tensor(v, dtype=torch.float64, requires_grad=grad)


def test_dpo_loss_hand_computed():
    losses, rc, rr = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5)
    assert_close(losses, t(math.log1p(math.exp(-0.5))))
    assert_close(losses, t(0.4740770), atol=1e-7, rtol=0)
    assert_close(rc, t(0.25))
    assert_close(rr, t(-0.25))


def test_selm_loss_hand_computed():
    losses, rc, rr = selm_loss(t(-1.0), t(-2.0), t(-3.0), t(-1.5), t(-1.5), t(-2.0), beta=0.5, alpha=0.1)
    assert_close(losses, t(0.4740770 - 0.05), atol=1e-7, rtol=0)
    assert_close(rc, t(0.25))
    assert_close(rr, t(-0.25))


def test_selm_alpha_zero_is_exactly_dpo():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(7, generator=g) * 10 for _ in range(6)]
    a = selm_loss(*x, beta=0.1, alpha=0.0)
    b = dpo_loss(x[0], x[1], x[3], x[4], beta=0.1)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_ipo_and_xpo_hand_computed():
    losses, _, _ = ipo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.25)
    assert_close(losses, t(1.0))
    assert_close(xpo_explore_term(t(-3.0), alpha=0.1), t(-0.3))
    assert_close(selm_explore_term(t(-3.0), t(-2.0), beta=0.5, alpha=0.1), t(-0.05))


def test_batch_shapes_and_detached_rewards():
    pc, pr = t(-1.0, -3.0, grad=True), t(-2.0, -1.0, grad=True)
    losses, rc, rr = dpo_loss(pc, pr, t(-1.5, -2.0), t(-1.5, -2.0), beta=0.1)
    assert losses.shape == rc.shape == rr.shape == (2,)
    assert losses.requires_grad and not rc.requires_grad and not rr.requires_grad


def test_gradient_signs():
    """Minimising the loss raises chosen, lowers rejected, and (SELM term) lowers the policy's y0."""
    pc, pr, pe = t(-1.0, grad=True), t(-2.0, grad=True), t(-3.0, grad=True)
    re = t(-2.0, grad=True)
    losses, _, _ = selm_loss(pc, pr, pe, t(-1.5), t(-1.5), re, beta=0.5, alpha=0.1)
    losses.sum().backward()
    assert pc.grad.item() < 0  # gradient descent increases logp(chosen)
    assert pr.grad.item() > 0  # ... and decreases logp(rejected)
    assert_close(pe.grad, t(0.1 * 0.5))  # d/d pe = alpha * beta > 0: descent lowers logp(y0)
    assert re.grad is None or re.grad.abs().sum() == 0  # the reference part carries no gradient
    # DPO gradient magnitude: beta * (1 - sigmoid(0.5)) on each side.
    assert_close(pc.grad, t(-0.5 * (1 - torch.sigmoid(torch.tensor(0.5, dtype=torch.float64)).item())))
    assert_close(pr.grad, -pc.grad)


@pytest.mark.parametrize("loss,explore", [("sigmoid", "selm"), ("sigmoid", "xpo"), ("ipo", "selm")])
def test_preference_objective_composes(loss, explore):
    lp = {"chosen": t(-1.0), "rejected": t(-2.0), "explore": t(-3.0)}
    ref = {"chosen": t(-1.5), "rejected": t(-1.5), "explore": t(-2.0)}
    out = preference_objective(lp, ref, loss=loss, explore=explore, beta=0.5, alpha=0.1)
    pair = {"sigmoid": 0.4740770, "ipo": (1.0 - 1.0) ** 2}[loss]
    term = {"selm": -0.05, "xpo": -0.3}[explore]
    assert_close(out["loss_pair"], t(pair), atol=1e-7, rtol=0)
    assert_close(out["loss_explore"], t(term))
    assert_close(out["loss"], out["loss_pair"] + out["loss_explore"])
