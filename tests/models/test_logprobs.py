"""lmforge.models.token_logprobs against log_softmax of the stock model's logits.

The reference runs the unmodified transformers model (same input ids, attention mask and position ids), takes
log_softmax of its full logits in float64 and gathers the next tokens: the obvious, memory-hungry way. The tiny
models come from conftest.build_tiny_model, with the output layer sharpened so that distributions are peaked
and Gemma's final-logit softcapping bites.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.cce.patch import patch
from lmforge.models.logprobs import TokenLogprobs, token_logprobs
from tests.models.conftest import TINY_MODEL_FAMILIES, TINY_VOCAB_SIZE, build_tiny_model

SOFTCAPS = {"gemma2": 2.0, "gemma3_text": 3.0}


def make_model(family: str, dtype: torch.dtype = torch.float32, *, seed: int = 0):
    overrides = {"final_logit_softcapping": SOFTCAPS[family]} if family in SOFTCAPS else {}
    model = build_tiny_model(family, dtype, seed=seed, **overrides)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25.0)
    return model


def padded_batch(*, seed: int = 1):
    """Four rows of length 10: unpadded, left-padded by 3, right-padded by 4, padded 1 left and 2 right; and a
    loss mask that scores the later part of each row (a response after a prompt)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, TINY_VOCAB_SIZE, (4, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    attention_mask[2, 6:] = 0
    attention_mask[3, :1] = 0
    attention_mask[3, 8:] = 0
    input_ids[attention_mask == 0] = 0  # the pad token
    loss_mask = torch.zeros_like(input_ids)
    loss_mask[0, 3:] = 1
    loss_mask[1, 6:] = 1
    loss_mask[2, 2:6] = 1
    loss_mask[3, 2:8] = 1
    loss_mask[3, 5] = 0  # a hole in the scored span is fine
    return input_ids, attention_mask, loss_mask


def stock_reference(model, input_ids, attention_mask, loss_mask):
    """(per-token log p, per-token entropy), (B, T) float64, zero where not scored, from the stock logits."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    log_probs = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    next_token = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    zeros = torch.zeros(input_ids.shape[0], 1, dtype=torch.float64)
    scored = loss_mask.bool()
    return (torch.cat([zeros, next_token], 1).where(scored, 0.0),
            torch.cat([zeros, entropy], 1).where(scored, 0.0))


def assert_grads_close(grads, reference, *, rtol):
    assert grads.keys() == reference.keys() and grads
    for name, expected in reference.items():
        scale = expected.abs().max().clamp_min(1e-30)
        error = float((grads[name].double() - expected.double()).abs().max() / scale)
        assert error < rtol, f"{name}: relative error {error:.3g}"


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", TINY_MODEL_FAMILIES)
def test_matches_stock_log_softmax_with_padding(family):
    model = make_model(family)
    input_ids, attention_mask, loss_mask = padded_batch()
    with torch.no_grad():
        result = token_logprobs(model, input_ids, attention_mask, loss_mask, return_entropy=True, impl="torch")
        expected, expected_entropy = stock_reference(model, input_ids, attention_mask, loss_mask)

    assert isinstance(result, TokenLogprobs)
    assert result.token_logprobs.shape == input_ids.shape and result.token_logprobs.dtype == torch.float32
    assert result.token_logprobs.abs().max() > 1.0  # peaked distributions, not a uniform ~log(259) everywhere
    torch.testing.assert_close(result.token_logprobs.double(), expected, rtol=1e-5, atol=1e-5)
    # entropy = lse - softmax-weighted logit cancels: float32 gives it to ~eps32 x |logit| absolute
    torch.testing.assert_close(result.token_entropies.double(), expected_entropy, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(result.sum_logprobs.double(), expected.sum(-1), rtol=1e-5, atol=1e-4)
    assert result.num_tokens.tolist() == loss_mask.sum(-1).tolist()
    assert bool((result.token_logprobs[loss_mask == 0] == 0).all())


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_float64_model_is_exact(family):
    # Gemma 2's stock eager attention gives NaN for left padding in float64 (fully masked softcapped rows), so
    # this uses right padding, which every family handles.
    model = make_model(family, torch.float64)
    input_ids, attention_mask, loss_mask = padded_batch()
    attention_mask[1], attention_mask[3] = 1, 1
    with torch.no_grad():
        result = token_logprobs(model, input_ids, attention_mask, loss_mask, return_entropy=True)
        expected, expected_entropy = stock_reference(model, input_ids, attention_mask, loss_mask)
    assert result.token_logprobs.dtype == torch.float64
    torch.testing.assert_close(result.token_logprobs, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.token_entropies, expected_entropy, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", TINY_MODEL_FAMILIES)
def test_gradients_equal_those_through_stock_logits(family):
    model = make_model(family)
    input_ids, attention_mask, loss_mask = padded_batch()
    weights = torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    result = token_logprobs(model, input_ids, attention_mask, loss_mask, return_entropy=True)
    ours = grads_of(model, (weights * result.token_logprobs).sum() + 0.3 * (weights * result.token_entropies).sum())
    expected, expected_entropy = stock_reference(model, input_ids, attention_mask, loss_mask)
    theirs = grads_of(model, (weights * expected).sum() + 0.3 * (weights * expected_entropy).sum())
    assert_grads_close(ours, theirs, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_padding_does_not_change_scores(family):
    model = make_model(family)
    sequence = torch.randint(3, TINY_VOCAB_SIZE, (1, 7), generator=torch.Generator().manual_seed(2))
    alone = token_logprobs(model, sequence).token_logprobs[0]

    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), sequence], 1)
    right = torch.cat([sequence, torch.zeros(1, 3, dtype=torch.long)], 1)
    batch = torch.cat([left, right])
    attention_mask = (torch.arange(10) >= 3).long().unsqueeze(0).repeat(2, 1)
    attention_mask[1] = (torch.arange(10) < 7).long()
    padded = token_logprobs(model, batch, attention_mask)  # default loss mask: every token after a real one
    assert padded.num_tokens.tolist() == [6, 6]
    torch.testing.assert_close(padded.token_logprobs[0, 3:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.token_logprobs[1, :7], alone, rtol=1e-5, atol=1e-5)
    assert alone[0] == 0 and alone[1:].abs().min() > 0


def test_peft_lora_with_adapter_enabled_and_disabled():
    from lmforge.models.lora import LoraAdapterConfig, attach_lora

    base = make_model("qwen2")
    policy = attach_lora(copy.deepcopy(base), LoraAdapterConfig(rank=4))
    with torch.no_grad():  # a fresh adapter is a no-op (B = 0); give it weight so it matters
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    input_ids, attention_mask, loss_mask = padded_batch()

    adapted = token_logprobs(policy, input_ids, attention_mask, loss_mask)
    expected, _ = stock_reference(policy, input_ids, attention_mask, loss_mask)
    torch.testing.assert_close(adapted.token_logprobs.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    # LoRA gradients equal those through the stock logits
    weights = torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(6))
    ours = grads_of(policy, (weights * adapted.token_logprobs).sum())
    theirs = grads_of(policy, (weights.double() * expected).sum())
    assert ours and all("lora_" in name for name in ours)
    assert_grads_close(ours, theirs, rtol=1e-5)

    with torch.no_grad(), policy.disable_adapter():
        reference = token_logprobs(policy, input_ids, attention_mask, loss_mask)
    with torch.no_grad():
        base_expected, _ = stock_reference(base, input_ids, attention_mask, loss_mask)
    torch.testing.assert_close(reference.token_logprobs.double(), base_expected, rtol=1e-5, atol=1e-5)
    assert float((reference.sum_logprobs - adapted.sum_logprobs.detach()).abs().max()) > 1e-2


def test_bfloat16_model_within_bfloat16_tolerance():
    model = make_model("llama", torch.bfloat16)
    model32 = copy.deepcopy(model).float()
    input_ids, attention_mask, loss_mask = padded_batch()
    with torch.no_grad():
        result = token_logprobs(model, input_ids, attention_mask, loss_mask)
        exact, _ = stock_reference(model32, input_ids, attention_mask, loss_mask)
        stock_bf16, _ = stock_reference(model, input_ids, attention_mask, loss_mask)
    stock_error = float((stock_bf16 - exact).abs().max())
    our_error = float((result.token_logprobs.double() - exact).abs().max())
    assert our_error <= max(2 * stock_error, 0.05)


def test_patched_model_scores_the_same():
    model = make_model("gemma")
    input_ids, attention_mask, loss_mask = padded_batch()
    before = token_logprobs(model, input_ids, attention_mask, loss_mask).token_logprobs
    after = token_logprobs(patch(model), input_ids, attention_mask, loss_mask).token_logprobs
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_nothing_scored_gives_zeros_that_can_backward():
    model = make_model("llama")
    input_ids, attention_mask, _ = padded_batch()
    result = token_logprobs(model, input_ids, attention_mask, torch.zeros_like(input_ids), return_entropy=True)
    assert result.num_tokens.tolist() == [0, 0, 0, 0]
    assert bool((result.token_logprobs == 0).all()) and bool((result.sum_logprobs == 0).all())
    assert bool((result.token_entropies == 0).all())
    result.sum_logprobs.sum().backward()
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters() if p.grad is not None)


def test_bad_inputs_raise_clear_errors():
    model = make_model("llama")
    input_ids, attention_mask, loss_mask = padded_batch()
    with pytest.raises(ValueError, match="column 0 and each row's first real token"):
        token_logprobs(model, input_ids, attention_mask, torch.ones_like(input_ids))
    left_first_real = loss_mask.clone()
    left_first_real[1, 3] = 1  # row 1's first real token (left padding 3): predicted from a pad position
    with pytest.raises(ValueError, match="token 3 of row 1"):
        token_logprobs(model, input_ids, attention_mask, left_first_real)
    holed = attention_mask.clone()
    holed[0, 5] = 0
    with pytest.raises(ValueError, match="attention_mask row 0 has padding between real tokens"):
        token_logprobs(model, input_ids, holed, None)
    with pytest.raises(ValueError, match="loss_mask must have the shape"):
        token_logprobs(model, input_ids, attention_mask, loss_mask[:, 1:])
    with pytest.raises(ValueError, match="only 0 and 1"):
        token_logprobs(model, input_ids, attention_mask * 2, loss_mask)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        token_logprobs(model, input_ids.float(), attention_mask, loss_mask)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
        token_logprobs(model, input_ids[0], None, None)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model("llama", vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    with pytest.raises(ValueError, match="no output layer"):
        token_logprobs(classifier, input_ids, attention_mask, loss_mask)
