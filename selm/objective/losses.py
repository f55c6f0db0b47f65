"""Preference objectives as pure functions of summed log-prob tensors.

Every function takes per-example SUMMED response log-probs (see ``selm.objective.logprobs``) of shape (B,)
and returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape (B,). Losses are
per-example (the caller averages); rewards are the detached implicit rewards
``beta * (logp_theta - logp_ref)`` used for metrics.

Equation numbers refer to Zhang et al. 2024, "Self-Exploring Language Models" (arXiv 2405.19332).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    # r_theta(x, y) = beta * log(pi_theta(y|x) / pi_ref(y|x)), detached: a metric, not a loss.
    return (beta * (policy_logps - ref_logps)).detach()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (sigmoid / Bradley-Terry) loss, the first term of Eq. 4.2.

    losses = -log sigmoid(beta * ((pc - rc) - (pr - rr)))

    Args: four tensors of shape (B,) with summed response log-probs; beta > 0.
    Returns: losses (B,), chosen_rewards (B,), rejected_rewards (B,), rewards detached.
    """
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * logits)
    return (
        losses,
        _implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta),
        _implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta),
    )


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO loss (Azar et al. 2023, Eq. 17) on summed log-probs.

    losses = ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2

    Here beta plays the role of IPO's tau (regularisation strength). TRL's default IPO averages
    log-probs over tokens; with summed log-probs, as here, the scale of beta differs accordingly.
    Shapes as in ``dpo_loss``.
    """
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = (logits - 1.0 / (2.0 * beta)) ** 2
    return (
        losses,
        _implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta),
        _implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta),
    )


def selm_explore_term(policy_explore_logps: Tensor, ref_explore_logps: Tensor, *, beta: float, alpha: float) -> Tensor:
    """SELM's optimism term, the second term of Eq. 4.2: alpha * beta * (logp_theta(y0) - logp_ref(y0)).

    y0 is the reference model's own response. The reference part carries no gradient (it only shifts
    the value); minimising the term lowers the policy's log-prob of y0, i.e. moves mass away from what
    the reference already says (Eq. 4.3: maximises KL(pi_ref || pi_theta)).
    Shapes: (B,) in, (B,) out.
    """
    return alpha * beta * (policy_explore_logps - ref_explore_logps.detach())


def xpo_explore_term(policy_explore_logps: Tensor, *, alpha: float) -> Tensor:
    """XPO's exploration term (Xie et al. 2024): alpha * logp_theta(y0), y0 ~ pi_ref. No beta, no
    reference subtraction. Shapes: (B,) in, (B,) out."""
    return alpha * policy_explore_logps


def selm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    policy_explore_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    ref_explore_logps: Tensor,
    *,
    beta: float,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The SELM objective (Eq. 4.2, as in the authors' code): DPO loss + alpha*beta*(pe - re).

    alpha = 0 returns exactly ``dpo_loss``. Shapes: six (B,) tensors in; three (B,) tensors out.
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    if alpha != 0:
        losses = losses + selm_explore_term(policy_explore_logps, ref_explore_logps, beta=beta, alpha=alpha)
    return losses, chosen_rewards, rejected_rewards


PAIRWISE_LOSSES = {"sigmoid": dpo_loss, "ipo": ipo_loss}


def preference_objective(
    logps: dict[str, Tensor], ref: dict[str, Tensor], *, loss: str, explore: str, beta: float, alpha: float
) -> dict[str, Tensor]:
    """Combine a pairwise loss and an exploration term, as selected by config.

    ``logps``/``ref`` map "chosen", "rejected", "explore" to (B,) tensors. Returns per-example
    tensors: "loss" (total), "loss_pair", "loss_explore", "rewards_chosen", "rewards_rejected".
    """
    pair, rc, rr = PAIRWISE_LOSSES[loss](logps["chosen"], logps["rejected"], ref["chosen"], ref["rejected"], beta=beta)
    if alpha == 0:
        term = torch.zeros_like(pair)
    elif explore == "selm":
        term = selm_explore_term(logps["explore"], ref["explore"], beta=beta, alpha=alpha)
    elif explore == "xpo":
        term = xpo_explore_term(logps["explore"], alpha=alpha)
    else:
        raise ValueError(f"unknown exploration term {explore!r}")
    return {"loss": pair + term, "loss_pair": pair, "loss_explore": term, "rewards_chosen": rc, "rewards_rejected": rr}
