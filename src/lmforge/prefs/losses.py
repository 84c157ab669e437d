"""Preference losses for multi-turn tool-using agents: M-DPO and M-KTO (Xiong et al., 2024).

A trajectory interleaves tokens the policy wrote with tokens it did not (the prompt, the tool
outputs fed back after each code call). The multi-turn losses are DPO and KTO with one change: the
log-probability of a trajectory sums only over the policy's own tokens of all turns, because the
tool outputs are produced by the environment, not the policy, and cancel between pi and ref in the
paper's derivation. Single-turn mode (the paper's baseline) counts every token after the prompt,
tool outputs included. Both modes are only a choice of mask:

    per-token log-probs (B, T) --sequence_logps(mask)--> summed log-probs (B,) --> m_dpo_loss / m_kto_loss

with ``mask`` the trajectory's policy mask (multi-turn) or ``single_turn_mask(policy_mask)``.
The losses take summed log-probability tensors of shape (B,), so the trainer is free to compute
them however is cheapest (Cut Cross-Entropy's per-token log-probs, a precomputed reference, ...).

M-DPO, per pair, with h = (log pi(w) - log ref(w)) - (log pi(l) - log ref(l)):

    sigmoid   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing, cDPO)
    ipo       (h - 1 / (2 beta))^2
    hinge     max(0, 1 - beta h)

plus optionally ``nll_coef`` times the per-token negative log-likelihood of the chosen
trajectories' policy tokens (averaged over all those tokens of the batch, as the paper's code and
TRL's ``"sft"`` term do). With ``normalize=True`` each log-ratio is divided by its trajectory's
token count first (TRL always does this for ``ipo``; ``sigmoid`` + ``normalize`` is TRL's
``sigmoid_norm``).

M-KTO, per trajectory, with r = log pi(y) - log ref(y) and z0 = max(0, mean(KL pairs)) detached:

    desirable     lambda_D (1 - sigmoid(beta (r - z0)))
    undesirable   lambda_U (1 - sigmoid(beta (z0 - r)))

where the KL pairs are completions scored under mismatched prompts (as in the KTO paper and TRL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

M_DPO_VARIANTS = ("sigmoid", "ipo", "hinge")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Masks and summed log-probabilities
# --------------------------------------------------------------------------------------------


def _check_mask(name: str, mask, shape: torch.Size | None = None) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or float tensor, got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seq_len), got shape {tuple(mask.shape)}")
    if shape is not None and mask.shape != shape:
        raise ValueError(f"{name} must have the shape of per_token_logps {tuple(shape)}, "
                         f"got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def single_turn_mask(policy_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The single-turn baseline's mask: every token from the first policy token on.

    Multi-turn training scores only the policy's own tokens (``policy_mask``); the single-turn
    baseline treats the whole continuation after the prompt as the response, so tool outputs
    between the policy's turns count as if the policy had written them.

    Args:
        policy_mask: (B, T) bool (or 0/1) mask of the tokens the policy generated, aligned with the
            per-token log-probs it will mask.
        attention_mask: optional (B, T) mask of real (non-padding) tokens. Pass it when rows are
            right-padded: without it, padding after the last token would count too.

    Returns:
        (B, T) bool mask. A row without any policy token is all False.
    """
    policy = _check_mask("policy_mask", policy_mask)
    # cumsum > 0 switches on at the first policy token and stays on to the end of the row.
    after_prompt = policy.cumsum(dim=-1) > 0
    if attention_mask is not None:
        after_prompt = after_prompt & _check_mask("attention_mask", attention_mask, policy.shape)
    return after_prompt


def sequence_logps(per_token_logps: torch.Tensor, mask: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Sum (or, with ``normalize``, average) per-token log-probs over the masked tokens of each row.

    Args:
        per_token_logps: (B, T) float log-probabilities of each target token.
        mask: (B, T) bool (or 0/1) mask of the tokens to count; nonzero means counted.
        normalize: divide each row's sum by its number of counted tokens (a row with none gives 0).

    Returns:
        (B,) tensor: float64 for float64 input, float32 otherwise (a bf16 running sum over a
        thousand tokens would keep only about three significant digits).

    Masked positions are selected out with ``torch.where`` rather than multiplied by 0, so a
    ``-inf`` or NaN at a padding position cannot leak into the sum.
    """
    if not isinstance(per_token_logps, torch.Tensor):
        raise TypeError(f"per_token_logps must be a torch.Tensor, got {type(per_token_logps).__name__}")
    if per_token_logps.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"per_token_logps must be a float tensor, got {per_token_logps.dtype}")
    if per_token_logps.dim() != 2:
        raise ValueError(f"per_token_logps must have shape (batch, seq_len), got shape "
                         f"{tuple(per_token_logps.shape)}")
    keep = _check_mask("mask", mask, per_token_logps.shape)
    if keep.device != per_token_logps.device:
        raise ValueError(f"mask is on {keep.device} but per_token_logps is on {per_token_logps.device}")
    logps = per_token_logps.to(_loss_dtype(per_token_logps))
    total = torch.where(keep, logps, torch.zeros((), dtype=logps.dtype, device=logps.device)).sum(dim=-1)
    if normalize:
        total = total / keep.sum(dim=-1).clamp(min=1).to(total.dtype)
    return total


# --------------------------------------------------------------------------------------------
# Validation shared by both losses
# --------------------------------------------------------------------------------------------


def _check_logps(named: dict[str, torch.Tensor], same_shape: bool = True) -> None:
    """Every entry: a 1-D, non-empty float tensor; all on one device; of one shape if asked."""
    first_name, first = None, None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor of summed log-probs, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D with shape (batch,), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty; a loss needs at least one example")
        if first is None:
            first_name, first = name, t
            continue
        if same_shape and t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has shape "
                             f"{tuple(first.shape)}; they must be equal")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def _check_positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def _check_nonnegative_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def _check_counts(name: str, counts, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token counts, got {type(counts).__name__}")
    if counts.dtype == torch.bool or counts.dtype.is_complex:
        raise TypeError(f"{name} must be an integer or float tensor, got {counts.dtype}")
    if counts.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (one count per example), "
                         f"got {tuple(counts.shape)}")
    if counts.device != like.device:
        raise ValueError(f"{name} is on {counts.device} but the log-probs are on {like.device}")
    return counts


def _loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # Summed log-probs are large numbers whose differences matter; bf16 keeps ~3 significant
    # digits, so the loss math runs in at least float32 (autograd casts the gradient back).
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------
# M-DPO
# --------------------------------------------------------------------------------------------


@dataclass
class MDPOOutput:
    """Result of :func:`m_dpo_loss`.

    ``loss`` carries the gradient; every other tensor is detached and per pair (B,) unless noted.
    Rewards are ``beta * (log pi - log ref)`` of the summed log-probs, as TRL logs them (also when
    the loss itself was length-normalised).
    """

    loss: torch.Tensor  # scalar: mean preference loss + nll_coef * nll_loss
    pair_losses: torch.Tensor  # preference loss of each pair, without the NLL term
    nll_loss: torch.Tensor  # scalar: per-token NLL of the chosen policy tokens (0 if nll_coef == 0)
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracies: torch.Tensor  # 1.0 where chosen_rewards > rejected_rewards
    reward_margins: torch.Tensor  # chosen_rewards - rejected_rewards
    chosen_logps: torch.Tensor  # policy log-probs of the chosen trajectories, as given
    rejected_logps: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Batch means under TRL's metric names (``rewards/chosen``, ``logps/rejected``, ...)."""
        return {
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/accuracies": self.reward_accuracies.mean().item(),
            "rewards/margins": self.reward_margins.mean().item(),
            "logps/chosen": self.chosen_logps.mean().item(),
            "logps/rejected": self.rejected_logps.mean().item(),
            "nll_loss": self.nll_loss.item(),
        }


def m_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    variant: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_coef: float = 0.0,
    normalize: bool = False,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
) -> MDPOOutput:
    """Multi-turn DPO loss from summed trajectory log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) log pi of each pair's preferred and
            dispreferred trajectory, summed over the policy's tokens (see :func:`sequence_logps`).
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference model, summed
            over the same tokens. Gradients, if any, flow into them too; pass them detached.
        beta: inverse temperature of the implicit reward (for ``ipo``: the regulariser tau).
        variant: ``"sigmoid"`` (DPO), ``"ipo"`` or ``"hinge"`` (SLiC), see the module docstring.
        label_smoothing: eps of conservative DPO, the assumed probability that a pair's label is
            flipped, in [0, 0.5). Only for ``variant="sigmoid"``.
        nll_coef: weight of the chosen trajectories' per-token NLL added to the loss (RPO-style);
            needs ``chosen_token_counts``.
        normalize: divide each log-ratio by its trajectory's token count (needs both count tensors).
        chosen_token_counts, rejected_token_counts: (B,) number of tokens each summed log-prob
            covers (``mask.sum(-1)`` of the mask given to :func:`sequence_logps`). Counts below 1
            are treated as 1.

    Returns:
        :class:`MDPOOutput` with the scalar ``loss`` (mean over pairs) and TRL's statistics.
    """
    inputs = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    _check_logps(inputs)
    beta = _check_positive_finite("beta", beta)
    if variant not in M_DPO_VARIANTS:
        raise ValueError(f"variant must be one of {M_DPO_VARIANTS}, got {variant!r}")
    label_smoothing = _check_nonnegative_finite("label_smoothing", label_smoothing)
    if label_smoothing >= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and variant != "sigmoid":
        raise ValueError(f"label_smoothing applies to variant='sigmoid' only, got variant={variant!r} "
                         f"with label_smoothing={label_smoothing}")
    nll_coef = _check_nonnegative_finite("nll_coef", nll_coef)
    if nll_coef > 0 and chosen_token_counts is None:
        raise ValueError("nll_coef > 0 needs chosen_token_counts (the per-token NLL divides by them)")
    if normalize and (chosen_token_counts is None or rejected_token_counts is None):
        raise ValueError("normalize=True needs chosen_token_counts and rejected_token_counts")

    dtype = _loss_dtype(*inputs.values())
    pc, pr, rc, rr = (t.to(dtype) for t in inputs.values())
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr

    chosen_counts = rejected_counts = None
    if chosen_token_counts is not None:
        chosen_counts = _check_counts("chosen_token_counts", chosen_token_counts, pc).to(dtype).clamp(min=1)
    if rejected_token_counts is not None:
        rejected_counts = _check_counts("rejected_token_counts", rejected_token_counts, pc).to(dtype).clamp(min=1)

    if normalize:
        delta = chosen_logratios / chosen_counts - rejected_logratios / rejected_counts
    else:
        delta = chosen_logratios - rejected_logratios

    if variant == "sigmoid":
        pair_losses = -F.logsigmoid(beta * delta)
        if label_smoothing > 0:
            # cDPO: the expected DPO loss when each label is wrong with probability eps.
            pair_losses = (1 - label_smoothing) * pair_losses - label_smoothing * F.logsigmoid(-beta * delta)
    elif variant == "ipo":
        pair_losses = (delta - 1 / (2 * beta)) ** 2
    else:  # hinge
        pair_losses = torch.relu(1 - beta * delta)

    loss = pair_losses.mean()
    if nll_coef > 0:
        # Token-weighted mean over the whole batch: long chosen trajectories weigh more, as in a
        # plain SFT cross-entropy over their tokens.
        nll_loss = -pc.sum() / chosen_counts.sum()
        loss = loss + nll_coef * nll_loss
    else:
        nll_loss = torch.zeros((), dtype=dtype, device=pc.device)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return MDPOOutput(
        loss=loss,
        pair_losses=pair_losses.detach(),
        nll_loss=nll_loss.detach(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracies=(chosen_rewards > rejected_rewards).to(dtype),
        reward_margins=chosen_rewards - rejected_rewards,
        chosen_logps=pc.detach(),
        rejected_logps=pr.detach(),
    )


# --------------------------------------------------------------------------------------------
# M-KTO
# --------------------------------------------------------------------------------------------


@dataclass
class MKTOOutput:
    """Result of :func:`m_kto_loss`.

    ``loss`` carries the gradient; the rest is detached. ``chosen_*`` hold the desirable examples
    of the batch in order, ``rejected_*`` the undesirable ones; either may be empty.
    """

    loss: torch.Tensor  # scalar: mean of `losses`
    losses: torch.Tensor  # (B,) weighted loss of each trajectory, in input order
    kl: torch.Tensor  # scalar z0 used as the reference point (detached, >= 0)
    chosen_rewards: torch.Tensor  # beta * (log pi - log ref) of the desirable trajectories
    rejected_rewards: torch.Tensor  # same for the undesirable ones
    chosen_logps: torch.Tensor  # policy log-probs of the desirable trajectories
    rejected_logps: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Batch means under TRL's KTO metric names; a class absent from the batch is left out."""
        out = {"kl": self.kl.item()}
        if self.chosen_rewards.numel():
            out["rewards/chosen"] = self.chosen_rewards.mean().item()
            out["logps/chosen"] = self.chosen_logps.mean().item()
        if self.rejected_rewards.numel():
            out["rewards/rejected"] = self.rejected_rewards.mean().item()
            out["logps/rejected"] = self.rejected_logps.mean().item()
        if self.chosen_rewards.numel() and self.rejected_rewards.numel():
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def kto_kl_estimate(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(kl_policy_logps - kl_ref_logps)), detached.

    The inputs are log-probs of completions paired with *other* prompts of the batch, so the mean
    log-ratio estimates KL(pi || ref) without rewarding the policy for the specific completions it
    is trained on. It is detached: KTO uses it as a baseline, not something to optimise.
    """
    _check_logps({"kl_policy_logps": kl_policy_logps, "kl_ref_logps": kl_ref_logps})
    dtype = _loss_dtype(kl_policy_logps, kl_ref_logps)
    kl = (kl_policy_logps.detach().to(dtype) - kl_ref_logps.detach().to(dtype)).mean()
    return kl.clamp(min=0)


def m_kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_desirable: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> MKTOOutput:
    """Multi-turn KTO loss from summed trajectory log-probs.

    Args:
        policy_logps, ref_logps: (B,) log pi and log ref of each trajectory, summed over the
            policy's tokens (see :func:`sequence_logps`).
        is_desirable: (B,) bool, True for a desirable (e.g. correct) trajectory.
        kl_policy_logps, kl_ref_logps: (K,) log pi and log ref of completions paired with
            mismatched prompts, for the reference point z0 (see :func:`kto_kl_estimate`). K need
            not equal B. No gradient flows into them.
        beta: inverse temperature of the implicit reward.
        desirable_weight, undesirable_weight: lambda_D and lambda_U, > 0.

    Returns:
        :class:`MKTOOutput`; ``loss`` is the mean over all B trajectories of their weighted losses
        (TRL's reduction: the weights scale, they do not renormalise).

    In a multi-process run z0 should be the mean over all processes (TRL gathers it); call
    :func:`kto_kl_estimate` on gathered tensors if that matters, since this function only sees
    its own batch.
    """
    _check_logps({"policy_logps": policy_logps, "ref_logps": ref_logps})
    if not isinstance(is_desirable, torch.Tensor):
        raise TypeError(f"is_desirable must be a torch.Tensor, got {type(is_desirable).__name__}")
    if is_desirable.dtype != torch.bool:
        raise TypeError(f"is_desirable must be a bool tensor, got {is_desirable.dtype}")
    if is_desirable.shape != policy_logps.shape:
        raise ValueError(f"is_desirable must have shape {tuple(policy_logps.shape)}, "
                         f"got {tuple(is_desirable.shape)}")
    if is_desirable.device != policy_logps.device:
        raise ValueError(f"is_desirable is on {is_desirable.device} but policy_logps is on "
                         f"{policy_logps.device}")
    beta = _check_positive_finite("beta", beta)
    desirable_weight = _check_positive_finite("desirable_weight", desirable_weight)
    undesirable_weight = _check_positive_finite("undesirable_weight", undesirable_weight)
    kl = kto_kl_estimate(kl_policy_logps, kl_ref_logps)
    if kl.device != policy_logps.device:
        raise ValueError(f"kl_policy_logps is on {kl.device} but policy_logps is on {policy_logps.device}")

    dtype = _loss_dtype(policy_logps, ref_logps)
    logratios = policy_logps.to(dtype) - ref_logps.to(dtype)
    kl = kl.to(dtype)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(is_desirable, desirable_losses, undesirable_losses)

    rewards = beta * logratios.detach()
    policy = policy_logps.detach().to(dtype)
    return MKTOOutput(
        loss=losses.mean(),
        losses=losses.detach(),
        kl=kl,
        chosen_rewards=rewards[is_desirable],
        rejected_rewards=rewards[~is_desirable],
        chosen_logps=policy[is_desirable],
        rejected_logps=policy[~is_desirable],
    )
