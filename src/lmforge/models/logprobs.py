"""Log-probabilities of chosen tokens under a causal LM, without the tokens x vocabulary logits.

    scores = token_logprobs(model, input_ids, attention_mask, loss_mask)
    scores.sum_logprobs      # (B,)   sum of log p(token) over the scored tokens of each row
    scores.token_logprobs    # (B, T) log p(input_ids[b, t] | input_ids[b, :t]); 0 where not scored
    scores.num_tokens        # (B,)   how many tokens of each row are scored

``loss_mask[b, t] = 1`` scores token t of row b, predicted from position t - 1. The model's body gives the
final hidden states, then :func:`lmforge.cce.token_logprobs` scores only the selected positions against the
output layer, so memory stays O(B x T x D) whatever the vocabulary. Everything is differentiable; this is
what preference losses (DPO, KTO) and evolution fitness call.

Padding: ``attention_mask`` marks the real tokens of each row, one contiguous run, padded on the left, the
right or both. Position ids count real tokens only (as ``generate`` does), so a row scores the same
whatever padding surrounds it.

PEFT: pass the PeftModel; the adapter's layers are part of the body. For the reference (base) model of a
preference loss, disable the adapter around the call:

    with torch.no_grad(), policy.disable_adapter():
        reference = token_logprobs(policy, input_ids, attention_mask, loss_mask)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lmforge.cce import token_logprobs as cce_token_logprobs
from lmforge.cce.patch import final_hidden_states, head_operands, output_layer, unwrap_causal_lm, verify_output_layer


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Scores of the tokens a loss mask selects (float32, differentiable)."""

    sum_logprobs: torch.Tensor  # (B,) sum over the scored tokens of each row
    token_logprobs: torch.Tensor  # (B, T) per token, 0 where not scored
    num_tokens: torch.Tensor  # (B,) int64 count of scored tokens
    token_entropies: torch.Tensor | None = None  # (B, T) entropy of the predicted distribution, 0 where not scored


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   loss_mask: torch.Tensor | None = None, *, return_entropy: bool = False, impl: str = "auto",
                   filter_eps: Any = "auto") -> TokenLogprobs:
    """Log-probabilities of the tokens selected by ``loss_mask`` under ``model``.

    Args:
        model: a transformers causal LM, or a PEFT model around one (see the module docstring).
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding (one contiguous run of 1s per row);
            None means no padding.
        loss_mask: (B, T) 1 where the token is scored. A scored token needs a real token before it, so
            column 0 and the first real token of a row cannot be scored. None scores every real token
            that has a real token before it.
        return_entropy: also return the entropy of each scored position's predicted distribution.
        impl, filter_eps: passed to :func:`lmforge.cce.token_logprobs`.

    Returns:
        :class:`TokenLogprobs`; gradients flow to every parameter that affects the scored tokens.
    """
    causal_lm = unwrap_causal_lm(model)
    input_ids, attention_mask, loss_mask = _check_inputs(input_ids, attention_mask, loss_mask)
    verify_output_layer(causal_lm)
    layer = output_layer(causal_lm)

    # Position ids count real tokens, so left padding does not shift positions (as in generate).
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden, _ = final_hidden_states(causal_lm, input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, use_cache=False)

    # Gather the rows that predict scored tokens: the head then only sees those, and padding positions'
    # hidden states (possibly garbage) never enter the computation.
    rows, columns = (index.to(hidden.device) for index in loss_mask.nonzero(as_tuple=True))
    if rows.numel() == 0:
        # Nothing scored: zeros that still take part in autograd, so a loss built on them can backward().
        scored = hidden.sum().float() * 0.0 + torch.zeros(0, device=hidden.device)
        scored_entropies = scored if return_entropy else None
    else:
        e, weight, bias = head_operands(hidden[rows, columns - 1], layer)
        targets = input_ids[rows, columns].to(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            scored = cce_token_logprobs(e, weight, targets, bias=bias, softcap=layer.softcap,
                                        return_entropy=return_entropy, filter_eps=filter_eps, impl=impl)
        scored, scored_entropies = scored if return_entropy else (scored, None)
    # float32, or float64 for a float64 model on the torch backend.
    zeros = hidden.new_zeros(input_ids.shape, dtype=scored.dtype)
    token_scores = zeros.index_put((rows, columns), scored)
    entropies = zeros.index_put((rows, columns), scored_entropies) if return_entropy else None
    return TokenLogprobs(
        sum_logprobs=token_scores.sum(dim=-1),
        token_logprobs=token_scores,
        num_tokens=loss_mask.sum(dim=-1).to(torch.int64),
        token_entropies=entropies,
    )


def _check_inputs(input_ids, attention_mask, loss_mask):
    """Validate the public inputs; return (input_ids, attention_mask as long, loss_mask as bool)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
    shape = tuple(input_ids.shape)

    def as_mask(name, mask):
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"{name} must have the shape of input_ids {shape}, got {tuple(mask.shape)}")
        if mask.device != input_ids.device:
            raise ValueError(f"{name} is on {mask.device} but input_ids on {input_ids.device}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must hold only 0 and 1")
        return mask.bool()

    real = torch.ones(shape, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
        else as_mask("attention_mask", attention_mask)
    # One contiguous run of real tokens per row: a run starts at t when real[t] and not real[t - 1].
    run_starts = real[:, :1].long().sum(-1) + (real[:, 1:] & ~real[:, :-1]).long().sum(-1)
    if bool((run_starts > 1).any()):
        row = int((run_starts > 1).nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} has padding between real tokens; only left and right padding "
                         f"are supported")
    # Token t can be scored when it and the token before it are real.
    scorable = torch.zeros_like(real)
    scorable[:, 1:] = real[:, 1:] & real[:, :-1]
    if loss_mask is None:
        scored = scorable
    else:
        scored = as_mask("loss_mask", loss_mask)
        bad = scored & ~scorable
        if bool(bad.any()):
            row, column = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"loss_mask scores token {column} of row {row}, but a scored token must be a real token "
                             f"(attention_mask 1) preceded by a real token; column 0 and each row's first real "
                             f"token cannot be scored")
    return input_ids, real.long(), scored
