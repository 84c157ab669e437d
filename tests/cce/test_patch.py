"""lmforge.cce.patch against the stock transformers models it patches.

Reference: the same model unpatched (transformers' own logits + ForCausalLMLoss). Each test builds tiny
random-weight models from configs (tests/models/conftest.py's factory, imported as plain functions since
its fixtures are not visible from tests/cce/), with the output layer sharpened so that the predicted
distributions are peaked (logits of a few units, not ~0.1 as at initialisation) and softcapping bites.
"""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch

from lmforge.cce.patch import is_patched, output_layer, patch, unpatch, unwrap_causal_lm
from tests.models.conftest import TINY_MODEL_FAMILIES, TINY_VOCAB_SIZE, build_tiny_model

# Small caps so that tanh(logits / cap) is far from linear for the sharpened logits.
SOFTCAPS = {"gemma2": 2.0, "gemma3_text": 3.0}


def make_model(family: str, dtype: torch.dtype = torch.float32, *, seed: int = 0, **overrides):
    """A tiny model in train mode whose output layer gives logits of a few units."""
    if family in SOFTCAPS:
        overrides.setdefault("final_logit_softcapping", SOFTCAPS[family])
    model = build_tiny_model(family, dtype, seed=seed, **overrides)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25.0)
    return model.train()


def make_batch(batch: int = 3, length: int = 11, *, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, TINY_VOCAB_SIZE, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[1, -3:] = -100  # right padding
    return input_ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


def assert_grads_close(grads, reference, *, rtol):
    assert grads.keys() == reference.keys()
    for name, expected in reference.items():
        scale = expected.abs().max().clamp_min(1e-30)
        error = float((grads[name].float() - expected.float()).abs().max() / scale)
        assert error < rtol, f"{name}: relative error {error:.3g}"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("family", TINY_MODEL_FAMILIES)
def test_loss_and_all_gradients_match_stock_float32(family):
    model = make_model(family)
    input_ids, labels = make_batch()
    stock, stock_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert stock.logits is not None

    assert patch(model, impl="torch") is model
    patched, patched_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)

    assert patched.logits is None
    assert type(patched) is type(stock)
    assert relative_error(patched.loss, stock.loss) < 1e-5
    assert len(patched_grads) == len(list(model.parameters()))  # every parameter got a gradient
    assert_grads_close(patched_grads, stock_grads, rtol=1e-5)


def test_softcapping_is_applied():
    # Gemma 2 with and without its cap give clearly different losses, and each patched loss matches its stock one.
    input_ids, labels = make_batch()
    losses = {}
    for cap in (2.0, None):
        model = make_model("gemma2", final_logit_softcapping=cap)
        assert output_layer(model).softcap == cap
        stock = model(input_ids=input_ids, labels=labels).loss
        patched = patch(model)(input_ids=input_ids, labels=labels).loss
        assert relative_error(patched, stock) < 1e-5
        losses[cap] = float(patched.detach())
    assert abs(losses[2.0] - losses[None]) > 0.1


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_num_items_in_batch_gradient_accumulation(family):
    # Two micro-batches, each normalised by the token count of the whole accumulated batch (as Trainer does).
    model = make_model(family)
    input_ids, labels = make_batch(batch=4)
    num_items = (labels[:, 1:] != -100).sum()

    def accumulated(model):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for rows in (slice(0, 2), slice(2, 4)):
            loss = model(input_ids=input_ids[rows], labels=labels[rows], num_items_in_batch=num_items).loss
            loss.backward()
            total += float(loss.detach())
        return total, {name: p.grad.clone() for name, p in model.named_parameters()}

    stock_total, stock_grads = accumulated(model)
    patched_total, patched_grads = accumulated(patch(model))
    assert abs(patched_total - stock_total) / abs(stock_total) < 1e-5
    assert_grads_close(patched_grads, stock_grads, rtol=1e-5)
    # and it is the mean over the whole batch, not the mean of the micro-batch means
    assert abs(patched_total - float(model(input_ids=input_ids, labels=labels).loss.detach())) < 1e-4


def test_shift_labels_and_ignore_index_kwargs_as_stock():
    model = make_model("qwen3")
    input_ids, labels = make_batch()
    shift_labels = torch.roll(input_ids, -1, dims=1)
    shift_labels[:, -1] = 7  # scored: stock uses shift_labels as given, without padding the end
    shift_labels[2, :3] = -1
    inputs = dict(input_ids=input_ids, labels=labels, shift_labels=shift_labels, ignore_index=-1)
    stock, stock_grads = loss_and_grads(model, **inputs)
    patched, patched_grads = loss_and_grads(patch(model), **inputs)
    assert relative_error(patched.loss, stock.loss) < 1e-5
    assert_grads_close(patched_grads, stock_grads, rtol=1e-5)


def test_packed_logits_to_keep_mask_with_shift_labels():
    # A boolean logits_to_keep selects positions (packed training); the loss then covers those positions only.
    model = make_model("mistral")
    input_ids, labels = make_batch()
    keep = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(3)) < 0.6
    shift_labels = torch.randint(3, TINY_VOCAB_SIZE, (int(keep.sum()),), generator=torch.Generator().manual_seed(4))
    inputs = dict(input_ids=input_ids, labels=labels, shift_labels=shift_labels, logits_to_keep=keep)
    try:
        stock, stock_grads = loss_and_grads(model, **inputs)
    except (IndexError, TypeError) as err:  # e.g. the H200 machine's older transformers: no reference to compare
        pytest.skip(f"this transformers' stock model does not take a boolean logits_to_keep: {err}")
    patched, patched_grads = loss_and_grads(patch(model), **inputs)
    assert relative_error(patched.loss, stock.loss) < 1e-5
    assert_grads_close(patched_grads, stock_grads, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_bfloat16_within_bfloat16_tolerance(family):
    # The reference is the stock model in float32 with the same (bf16-representable) weights; both the stock bf16
    # run and the patched bf16 run are compared with it, and the patched error must be of the same order.
    model = make_model(family, torch.bfloat16)
    model32 = copy.deepcopy(model).float()
    input_ids, labels = make_batch()
    reference, reference_grads = loss_and_grads(model32, input_ids=input_ids, labels=labels)
    stock, _ = loss_and_grads(model, input_ids=input_ids, labels=labels)
    patched, patched_grads = loss_and_grads(patch(model, impl="torch"), input_ids=input_ids, labels=labels)
    assert patched.loss.dtype == torch.float32
    stock_error = relative_error(stock.loss, reference.loss)
    assert relative_error(patched.loss, reference.loss) < max(2 * stock_error, 1e-3)
    assert_grads_close(patched_grads, reference_grads, rtol=0.05)  # stock bf16 is off by 0.015-0.03 here


def test_output_layer_with_bias():
    model = make_model("llama")
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.normal_(0, 2.0, generator=torch.Generator().manual_seed(9))
    model.lm_head = biased
    input_ids, labels = make_batch()
    stock, stock_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    patched, patched_grads = loss_and_grads(patch(model), input_ids=input_ids, labels=labels)
    assert "lm_head.bias" in patched_grads
    assert relative_error(patched.loss, stock.loss) < 1e-5
    assert_grads_close(patched_grads, stock_grads, rtol=1e-5)


def test_all_labels_ignored_gives_zero_loss_and_zero_gradients():
    model = patch(make_model("llama"))
    input_ids, _ = make_batch()
    output, grads = loss_and_grads(model, input_ids=input_ids, labels=torch.full_like(input_ids, -100))
    assert float(output.loss.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


@pytest.mark.parametrize("family", TINY_MODEL_FAMILIES)
def test_logits_and_generate_unchanged_after_patch(family):
    model = make_model(family).eval()
    input_ids, _ = make_batch(batch=2, length=6)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding, as in batched generation
    stock_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    settings = dict(attention_mask=attention_mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    stock_tokens = model.generate(input_ids, **settings)

    patch(model)
    assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, stock_logits)
    assert torch.equal(model.generate(input_ids, **settings), stock_tokens)
    # generate decides what to pass by reading forward's signature: it must still be the stock one
    parameters = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "position_ids", "labels", "logits_to_keep"} <= set(parameters)


def test_unpatch_restores_exactly():
    model = make_model("qwen2")
    input_ids, labels = make_batch()
    before = dict(model.__dict__)
    stock = model(input_ids=input_ids, labels=labels)

    patch(model)
    assert is_patched(model) and "forward" in model.__dict__
    assert unpatch(model) is model
    assert not is_patched(model)
    assert model.__dict__.keys() - before.keys() <= {"_lmforge_cce_verified_head"}
    assert "forward" not in model.__dict__ and model.forward.__func__ is type(model).forward
    restored = model(input_ids=input_ids, labels=labels)
    assert torch.equal(restored.logits, stock.logits) and torch.equal(restored.loss, stock.loss)
    assert unpatch(model) is model  # unpatching an unpatched model is a no-op


def test_patch_twice_updates_options_and_one_unpatch_restores():
    model = make_model("llama")
    patch(model, impl="torch")
    wrapper = model.__dict__["forward"]
    patch(model, impl="auto", train_only=True)
    assert model.__dict__["forward"] is wrapper
    assert model.__dict__["_lmforge_cce_patch"].train_only is True
    unpatch(model)
    assert "forward" not in model.__dict__


def test_an_existing_instance_forward_is_kept_and_restored():
    # accelerate's device-map hooks install an instance-level forward; patch must call it and give it back.
    model = make_model("llama")
    calls = []
    stock_forward = model.forward

    @functools.wraps(stock_forward)  # as accelerate does
    def hooked_forward(*args, **kwargs):
        calls.append(1)
        return stock_forward(*args, **kwargs)

    model.forward = hooked_forward
    input_ids, labels = make_batch()
    stock = model(input_ids=input_ids, labels=labels).loss
    patch(model)
    calls.clear()
    patched = model(input_ids=input_ids, labels=labels).loss
    assert calls and relative_error(patched, stock) < 1e-5
    unpatch(model)
    assert model.__dict__["forward"] is hooked_forward


def test_return_dict_false_and_outputs_passed_through():
    model = make_model("gemma")
    input_ids, labels = make_batch()
    stock = model(input_ids=input_ids, labels=labels, output_hidden_states=True)
    patch(model)
    patched = model(input_ids=input_ids, labels=labels, output_hidden_states=True)
    assert len(patched.hidden_states) == len(stock.hidden_states)
    for ours, theirs in zip(patched.hidden_states, stock.hidden_states):
        assert torch.equal(ours, theirs)
    as_tuple = model(input_ids, None, None, None, None, labels, return_dict=False)  # labels passed positionally
    assert isinstance(as_tuple, tuple) and relative_error(as_tuple[0], stock.loss) < 1e-5
    stock_tuple = unpatch(model)(input_ids, None, None, None, None, labels, return_dict=False)
    assert len(as_tuple) == len(stock_tuple) - 1  # the same entries less the logits
    assert not any(isinstance(t, torch.Tensor) and t.shape[-1:] == (TINY_VOCAB_SIZE,) for t in as_tuple)


def test_train_only_leaves_evaluation_to_the_stock_forward():
    model = patch(make_model("llama"), train_only=True)
    input_ids, labels = make_batch()
    assert model(input_ids=input_ids, labels=labels).logits is None
    model.eval()
    evaluated = model(input_ids=input_ids, labels=labels)
    assert evaluated.logits is not None and evaluated.logits.shape == (*input_ids.shape, TINY_VOCAB_SIZE)


def test_deepcopy_of_a_patched_model_is_patched_on_the_copy():
    model = patch(make_model("phi3"))
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    with torch.no_grad():
        clone.get_output_embeddings().weight.mul_(0.5)
    input_ids, labels = make_batch()
    expected = unpatch(copy.deepcopy(clone))(input_ids=input_ids, labels=labels).loss
    output = clone(input_ids=input_ids, labels=labels)
    assert output.logits is None and relative_error(output.loss, expected) < 1e-5
    assert relative_error(model(input_ids=input_ids, labels=labels).loss, expected) > 1e-3


def test_autocast_matches_stock_autocast():
    # Forward under autocast, backward outside it, as PyTorch recommends and Trainer does.
    model = make_model("llama")
    input_ids, labels = make_batch()

    def autocast_loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        return loss, {name: p.grad.clone() for name, p in model.named_parameters()}

    stock, stock_grads = autocast_loss_and_grads(model)
    patched, patched_grads = autocast_loss_and_grads(patch(model))
    assert relative_error(patched, stock) < 1e-2
    assert_grads_close(patched_grads, stock_grads, rtol=0.1)


def test_peft_lora_model_is_patched_underneath():
    from lmforge.models.lora import LoraAdapterConfig, attach_lora

    model = attach_lora(make_model("qwen3"), LoraAdapterConfig(rank=4))
    with torch.no_grad():  # a fresh adapter is a no-op (B = 0); give it weight so it matters
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    input_ids, labels = make_batch()
    stock, stock_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert stock_grads and all("lora_" in name for name in stock_grads)

    assert patch(model) is model
    assert is_patched(model) and is_patched(model.get_base_model())
    patched, patched_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert patched.logits is None and relative_error(patched.loss, stock.loss) < 1e-5
    assert_grads_close(patched_grads, stock_grads, rtol=1e-5)

    with model.disable_adapter():
        base_loss = model(input_ids=input_ids, labels=labels).loss
    unpatch(model)
    with model.disable_adapter():
        assert relative_error(base_loss, model(input_ids=input_ids, labels=labels).loss) < 1e-5
    assert relative_error(base_loss, stock.loss) > 1e-4  # the adapter did change the loss

    model.eval()
    patch(model)
    tokens = model.generate(input_ids=input_ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tokens.shape == (3, 7)


def test_lora_on_the_output_layer_is_refused():
    from lmforge.models.lora import LoraAdapterConfig, attach_lora

    model = attach_lora(make_model("llama"), LoraAdapterConfig(rank=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        patch(model)


def test_unsupported_models_raise_clear_errors():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    classifier = AutoModelForSequenceClassification.from_config(AutoConfig.for_model("llama", **sizes))
    with pytest.raises(ValueError, match="no output layer"):
        patch(classifier)
    bart = AutoConfig.for_model("bart", vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                decoder_ffn_dim=32)
    with pytest.raises(ValueError, match="encoder-decoder"):
        patch(AutoModelForSeq2SeqLM.from_config(bart))
    # Cohere multiplies its logits by logit_scale: the check on a few tokens must refuse it rather than give a
    # wrong loss.
    cohere = AutoModelForCausalLM.from_config(AutoConfig.for_model("cohere", logit_scale=0.25, **sizes))
    with pytest.raises(ValueError, match="logits are not softcap"):
        patch(cohere)
    assert not is_patched(cohere)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch("llama")
    with pytest.raises(ValueError, match="impl"):
        patch(make_model("llama"), impl="cuda")
    with pytest.raises(ValueError, match="filter_eps"):
        patch(make_model("llama"), filter_eps=-1)


def test_custom_loss_function_is_refused():
    model = make_model("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="ForCausalLMLoss"):
        patch(model)


def test_unwrap_causal_lm_returns_the_model_inside_peft():
    from lmforge.models.lora import LoraAdapterConfig, attach_lora

    inner = make_model("llama")
    assert unwrap_causal_lm(inner) is inner
    assert unwrap_causal_lm(attach_lora(inner, LoraAdapterConfig(rank=2))) is inner
