"""Cut Cross-Entropy inside Hugging Face causal LMs: ``patch(model)`` / ``unpatch(model)``.

After ``patch(model)``, ``model(input_ids, labels=labels)`` returns the same loss (and gradients) as the
stock model, computed by :func:`lmforge.cce.linear_cross_entropy` from the final hidden states and the
``lm_head`` weight, so the tokens x vocabulary logit matrix never exists; the output's ``logits`` is None.
Calls without labels (inference, ``generate``) run the stock forward untouched.

One mechanism serves every family, with no per-family copy of a forward. A transformers causal LM's
forward is, in every family we support (Llama/SmolLM2, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text,
Phi-3, ...):

    hidden = self.<base_model>(...).last_hidden_state        # the body
    logits = lm_head(slice_logits_to_keep(hidden, logits_to_keep))
    logits = softcap(logits, config.final_logit_softcapping)  # Gemma 2/3 only
    loss = ForCausalLMLoss(logits, labels, ...)

so the patched forward calls the stock forward itself with ``labels=None`` and ``logits_to_keep`` set to an
empty index tensor (the head then projects zero positions), catches the body's output with a forward hook,
and computes the loss from those hidden states. Everything else the stock forward does (argument
deprecations, cache handling, masks, hidden-state and attention outputs, the output class) stays the
model's own. Because a family could scale its logits in a way this module does not know (Cohere's
``logit_scale``, Granite's ``logits_scaling``), ``patch`` first checks on four tokens that the model's logits
really are ``softcap(lm_head(body output))`` and refuses the model otherwise.

Loss semantics are those of transformers' ``ForCausalLMLoss``: labels are shifted left by one (or
``shift_labels`` is used as given), ``ignore_index`` (default -100) is skipped, the mean runs over
non-ignored tokens, and with ``num_items_in_batch`` (gradient accumulation) the loss is their sum divided by
``num_items_in_batch``. One deliberate difference: a batch whose labels are all ignored gives loss 0 with
zero gradients, where the stock mean gives NaN.

Sharded output layers. Under FSDP2 (``fully_shard``) a model's parameters are DTensors sharded by rows
outside their unit's forward. When the lm_head is in the root unit (the usual ``fully_shard`` of each
decoder layer, then of the model), its weight is already gathered while the patched forward runs. When
the lm_head is a unit of its own, FSDP re-shards it right after the stock forward's zero-position
projection, so the patched forward gathers it again through FSDP (``lm_head.unshard()``, the ZeRO-3
all-gather: V x D per rank for the duration of the loss), and FSDP reduce-scatters its gradient at the end
of the backward like any other unit's (and re-shards it; under no_grad it is re-sharded right away). That
gathers the head twice per forward (the zero-position projection did it once); keeping the lm_head in the
root unit gathers it once. Any other DTensor weight (a tensor-parallel plan) goes to
:func:`lmforge.cce.linear_cross_entropy` as it is: row-sharded on a 1-D mesh it runs vocabulary-parallel
(every rank sees the same tokens under tensor parallelism), otherwise it is gathered.

This module imports neither transformers nor PEFT; it works on any object with the methods they provide
(duck typing), so ``lmforge.cce`` stays usable on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.cce.api import IMPLS, linear_cross_entropy
from lmforge.cce.parallel import is_dtensor

# Where the patch keeps its state on the patched model (an instance attribute, so deepcopy carries it).
_STATE_ATTRIBUTE = "_lmforge_cce_patch"
# Set on a model once its logits were checked to be softcap(lm_head(body output)).
_VERIFIED_ATTRIBUTE = "_lmforge_cce_verified_head"
# Token ids the verification feeds the model; few enough to be free, enough for attention to matter.
_PROBE_LENGTH = 4


@dataclasses.dataclass
class _PatchState:
    impl: str
    filter_eps: Any
    train_only: bool
    # The instance-level forward the model had before patching (accelerate's device-map hooks put one
    # there), or None when the class's forward was in use. unpatch puts it back.
    previous_forward: Any
    signature: inspect.Signature


@dataclasses.dataclass(frozen=True)
class OutputLayer:
    """What turns final hidden states into logits: ``softcap(hidden @ weight.T + bias)``."""

    weight: torch.Tensor  # (V, D) lm_head weight (tied to the input embeddings in some models)
    bias: torch.Tensor | None  # (V,) or None
    softcap: float | None  # config.final_logit_softcapping: logits -> cap * tanh(logits / cap)


def patch(model: nn.Module, *, impl: str = "auto", filter_eps: Any = "auto", train_only: bool = False,
          verify: bool = True) -> nn.Module:
    """Make ``model(..., labels=...)`` compute its loss with Cut Cross-Entropy; return ``model``.

    Args:
        model: a transformers causal LM (``*ForCausalLM``), or a PEFT model around one (the model inside
            is patched; LoRA-style adapters only, not prompt learning).
        impl: lmforge.cce backend, "auto" (the GEMM path on CUDA, chunked torch elsewhere), "gemm",
            "triton" or "torch" (see :func:`lmforge.cce.linear_cross_entropy`).
        filter_eps: gradient-filter threshold passed to :func:`lmforge.cce.linear_cross_entropy`
            ("auto": none for float32, eps/32 for 16-bit weights on the Triton backend; None: exact).
        train_only: if True, labelled calls in eval mode (``model.eval()``) run the stock forward and return
            logits as well, for evaluation loops that compute metrics from logits.
        verify: check on a 4-token input that the model's logits are ``softcap(lm_head(hidden))``. Leave it
            on unless the model cannot run a forward at patch time (weights not yet materialised).

    Patching twice only updates the options. The model is changed in place (an instance-level
    ``forward``); :func:`unpatch` restores it exactly.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not (filter_eps is None or filter_eps == "auto"
            or (isinstance(filter_eps, (int, float)) and not isinstance(filter_eps, bool) and filter_eps >= 0)):
        raise ValueError(f"filter_eps must be 'auto', None or a number >= 0, got {filter_eps!r}")
    if not isinstance(train_only, bool):
        raise TypeError(f"train_only must be a bool, got {train_only!r}")
    causal_lm = unwrap_causal_lm(model)
    state = causal_lm.__dict__.get(_STATE_ATTRIBUTE)
    if state is not None:
        state.impl, state.filter_eps, state.train_only = impl, filter_eps, train_only
        return model
    if verify:
        verify_output_layer(causal_lm)

    previous_forward = causal_lm.__dict__.get("forward")
    # Arguments are named by the class's forward: an instance-level one (accelerate's hook) takes the same.
    class_forward = type(causal_lm).forward
    signature = inspect.signature(types.MethodType(class_forward, causal_lm))
    # A fresh function per patch whose __wrapped__ is the stock forward, so inspect.signature(model.forward)
    # still lists input_ids, attention_mask, position_ids, logits_to_keep... (generate and Trainer read it).
    # It is bound with MethodType rather than closed over the model, so copy.deepcopy binds it to the copy.
    forward = functools.update_wrapper(_make_patched_forward(), class_forward)
    causal_lm.__dict__[_STATE_ATTRIBUTE] = _PatchState(impl, filter_eps, train_only, previous_forward, signature)
    causal_lm.__dict__["forward"] = types.MethodType(forward, causal_lm)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the model's forward is exactly what it was before. A model that is not
    patched is returned unchanged. Returns ``model``."""
    causal_lm = unwrap_causal_lm(model, check=False)
    state = causal_lm.__dict__.pop(_STATE_ATTRIBUTE, None)
    if state is None:
        return model
    if state.previous_forward is None:
        causal_lm.__dict__.pop("forward", None)
    else:
        causal_lm.__dict__["forward"] = state.previous_forward
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model`` (or on the causal LM inside a PEFT model)."""
    return _STATE_ATTRIBUTE in unwrap_causal_lm(model, check=False).__dict__


def unwrap_causal_lm(model: nn.Module, *, check: bool = True) -> nn.Module:
    """The transformers causal LM inside ``model``: ``model`` itself, or the model a PEFT wrapper holds.

    With ``check`` it raises TypeError/ValueError, saying why, unless the model has what Cut Cross-Entropy
    needs: a body (``base_model``), a plain ``nn.Linear`` output layer (``get_output_embeddings()``), a
    forward taking ``labels`` and ``logits_to_keep``, the stock causal-LM loss, and no encoder-decoder.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    # PEFT: PeftModel.get_base_model() gives the transformers model (a few levels at most, never a cycle).
    for _ in range(4):
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            raise ValueError(f"PEFT prompt-learning adapters ({getattr(peft_config, 'peft_type', '?')}) add virtual "
                             f"tokens in the wrapper's forward; lmforge.cce supports LoRA-style adapters only")
        get_base_model = getattr(model, "get_base_model", None)
        if not callable(get_base_model):
            break
        inner = get_base_model()
        if inner is model:
            break
        model = inner
    if check:
        _check_causal_lm(model)
    return model


def _check_causal_lm(model: nn.Module) -> None:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{name} is not a transformers model (it has no .config); lmforge.cce patches causal LMs")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; lmforge.cce supports decoder-only causal LMs")
    output_layer(model)  # raises unless there is a plain linear head
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        raise ValueError(f"{name} has no separate body (base_model); lmforge.cce needs the hidden states the "
                         f"body hands to the output layer")
    parameters = inspect.signature(type(model).forward).parameters
    missing = [p for p in ("labels", "logits_to_keep") if p not in parameters]
    if missing:
        raise ValueError(f"{name}.forward takes no {' or '.join(missing)} argument; lmforge.cce needs a "
                         f"transformers causal LM (*ForCausalLM)")
    loss_name = getattr(getattr(model, "loss_function", None), "__name__", None)
    if loss_name != "ForCausalLMLoss":
        raise ValueError(f"{name} computes its loss with {loss_name!r}, not transformers' ForCausalLMLoss; "
                         f"lmforge.cce reproduces only the standard causal-LM cross-entropy")


def output_layer(model: nn.Module) -> OutputLayer:
    """The output layer of a causal LM (after :func:`unwrap_causal_lm`): weight, bias and softcap.

    Raises ValueError unless ``get_output_embeddings()`` is a plain ``torch.nn.Linear``: a LoRA-wrapped or
    quantised head computes something else than ``hidden @ weight.T``.
    """
    name = type(model).__name__
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(f"{name} has no output layer (get_output_embeddings() gives None); lmforge.cce needs a "
                         f"causal LM with an lm_head")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ValueError(f"{name}'s output layer is a {type(head).__name__}, not a plain torch.nn.Linear (adapted, "
                         f"quantised or otherwise wrapped heads are not supported); leave lm_head out of "
                         f"LoRA target_modules / modules_to_save")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0:
            raise ValueError(f"{name}.config.final_logit_softcapping must be None or > 0, got {softcap}")
    return OutputLayer(weight=head.weight, bias=head.bias, softcap=softcap)


@contextlib.contextmanager
def _catch_body_output(model: nn.Module):
    """Yield a list that receives the last hidden state each time the model's body runs."""
    caught: list[torch.Tensor] = []

    def hook(module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        caught.append(hidden if hidden is not None else output[0])

    handle = model.base_model.register_forward_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def final_hidden_states(model: nn.Module, forward=None, **inputs: Any) -> tuple[torch.Tensor, Any]:
    """Run a causal LM's forward without projecting any position to logits; return (hidden, output).

    ``hidden`` is the body's last hidden state (B, T, D), the input of the output layer; ``output`` is the
    model's own output object, whose logits cover zero positions (one position when the lm_head weight is a
    DTensor, see :func:`_skipping_index`). ``inputs`` are forward arguments (input_ids, attention_mask,
    position_ids, ...; no labels). ``forward`` defaults to ``model.forward``.
    """
    if "labels" in inputs or "logits_to_keep" in inputs:
        raise ValueError("final_hidden_states computes no loss and no logits: pass neither labels nor logits_to_keep")
    forward = model.forward if forward is None else forward
    no_positions = _skipping_index(model.get_output_embeddings().weight)
    with _catch_body_output(model) as caught:
        output = forward(**inputs, logits_to_keep=no_positions)
    if not caught:
        raise ValueError(f"{type(model).__name__}.forward did not call its body (base_model); lmforge.cce cannot "
                         f"find its final hidden states")
    return caught[-1], output


def _skipping_index(weight: torch.Tensor) -> torch.Tensor:
    """The ``logits_to_keep`` that skips the head: an empty index tensor, so slice_logits_to_keep keeps
    hidden_states[:, [], :] and the head projects nothing. A DTensor head (tensor-parallel plans) gets one
    position instead (B x V logits, nothing beside the loss): DTensor's sharding propagation fails on the
    empty product ("integer modulo by zero", torch 2.13)."""
    return torch.zeros(1 if is_dtensor(weight) else 0, dtype=torch.long, device=weight.device)


def head_operands(hidden: torch.Tensor, layer: OutputLayer):
    """(hidden, weight, bias) in the dtype the head's matmul would use: the autocast dtype under
    ``torch.autocast`` (as nn.Linear does), else as they are. Call lmforge.cce with autocast disabled."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        cast = (lambda t: None if t is None else t.to(dtype))
        return cast(hidden), cast(layer.weight), cast(layer.bias)
    return hidden, layer.weight, layer.bias


def causal_lm_loss(hidden: torch.Tensor, layer: OutputLayer, labels: torch.Tensor | None, *,
                   shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                   ignore_index: int = -100, impl: str = "auto", filter_eps: Any = "auto") -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``softcap(hidden @ W.T + b)``, computed without the logits.

    hidden: (..., D) final hidden states (after any logits_to_keep slicing); labels: ids of the same
    leading shape, shifted here (position t is scored against labels[..., t + 1]) unless ``shift_labels``
    is given. Returns a float32 scalar: the mean over non-ignored tokens, or their sum divided by
    ``num_items_in_batch`` when that is given; 0 (with zero gradients) when every token is ignored.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    if hidden_rows.shape[0] != targets.shape[0]:
        raise ValueError(f"labels give {targets.shape[0]} targets but the hidden states have {hidden_rows.shape[0]} "
                         f"positions (hidden {tuple(hidden.shape)}, labels {tuple(shift_labels.shape)})")
    # Only the scored rows go through the head: prompt tokens of instruction data are often the majority.
    scored = targets != ignore_index
    hidden_rows, targets = hidden_rows[scored], targets[scored]
    e, weight, bias = head_operands(hidden_rows, layer)
    if targets.numel() == 0:
        local_weight = weight.to_local() if is_dtensor(weight) else weight
        loss = e.sum() * 0.0 + local_weight.sum() * 0.0  # keeps the graph, so backward() gives zero gradients
        return loss.float()
    with torch.autocast(e.device.type, enabled=False):
        loss = linear_cross_entropy(e, weight, targets, bias=bias, softcap=layer.softcap,
                                    ignore_index=ignore_index, reduction="sum" if num_items_in_batch is not None
                                    else "mean", filter_eps=filter_eps, impl=impl)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _keep_positions(hidden: torch.Tensor, logits_to_keep: Any) -> torch.Tensor:
    """transformers' slice_logits_to_keep: which positions the head (and so the loss) sees."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)
    return hidden[:, logits_to_keep, :]


def _flat_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Every argument of a forward call by name (positional ones too; **kwargs merged in)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for the model's forward: {err}") from err
    flat: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("the model's forward got extra positional arguments; pass them by name")
        else:
            flat[name] = value
    return flat


def _stock_forward(model: nn.Module):
    """The forward the model had before patching, bound to it (an instance-level one if it had one)."""
    state = model.__dict__.get(_STATE_ATTRIBUTE)
    previous = state.previous_forward if state is not None else model.__dict__.get("forward")
    return previous if previous is not None else types.MethodType(type(model).forward, model)


def _make_patched_forward():
    def forward_with_cce(self, *args, **kwargs):
        state: _PatchState = self.__dict__[_STATE_ATTRIBUTE]
        stock_forward = _stock_forward(self)
        arguments = _flat_arguments(state.signature, args, kwargs)
        labels = arguments.pop("labels", None)
        # As stock: no labels, no loss (shift_labels alone does not ask for one).
        if labels is None or (state.train_only and not self.training):
            return stock_forward(*args, **kwargs)

        logits_to_keep = arguments.pop("logits_to_keep", 0)
        return_dict = arguments.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        hidden, output = final_hidden_states(self, stock_forward, return_dict=True, **arguments)
        unsharded_head = _unshard_fsdp_head(self)
        loss = causal_lm_loss(_keep_positions(hidden, logits_to_keep), output_layer(self), labels,
                              shift_labels=arguments.get("shift_labels"),
                              num_items_in_batch=arguments.get("num_items_in_batch"),
                              ignore_index=arguments.get("ignore_index", -100),
                              impl=state.impl, filter_eps=state.filter_eps)
        if unsharded_head is not None and not loss.requires_grad:
            unsharded_head.reshard()  # no backward will come to re-shard it
        # The model's own output class (cache, hidden_states, attentions kept), with the loss and no logits.
        fields = {name: value for name, value in output.items() if name not in ("loss", "logits")}
        result = type(output)(loss=loss, **fields)
        return result if return_dict else result.to_tuple()

    return forward_with_cce


def _unshard_fsdp_head(model: nn.Module) -> nn.Module | None:
    """If the output layer is an FSDP2 unit of its own whose weight is sharded now, gather it through FSDP
    (see the module docstring) and return the layer; else return None."""
    head = model.get_output_embeddings()
    if is_dtensor(getattr(head, "weight", None)) and callable(getattr(head, "unshard", None)) \
            and callable(getattr(head, "reshard", None)):
        head.unshard()
        return head
    return None


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's full value (for the one-time verification), any other tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def verify_output_layer(model: nn.Module) -> None:
    """Check on a few tokens that ``model``'s logits equal ``softcap(hidden @ W.T + b)`` of its body's last
    hidden state, and that ``logits_to_keep`` can skip the head; raise ValueError otherwise.

    This is what makes one generic mechanism safe: a family that scales its logits some other way is
    refused instead of being given a wrong loss. The model runs in eval mode under no_grad (its train/eval
    flags are restored). The result is remembered on the model instance.
    """
    causal_lm = unwrap_causal_lm(model)
    if causal_lm.__dict__.get(_VERIFIED_ATTRIBUTE):
        return
    name = type(causal_lm).__name__
    layer = output_layer(causal_lm)
    embeddings = causal_lm.get_input_embeddings()
    num_embeddings = getattr(embeddings, "num_embeddings", layer.weight.shape[0])
    device = getattr(embeddings, "weight", layer.weight).device
    if device.type == "meta":
        raise ValueError(f"{name}'s weights are on the meta device; load them before patching (or pass verify=False)")
    input_ids = (torch.arange(1, _PROBE_LENGTH + 1, device=device) % num_embeddings).unsqueeze(0)
    training = {module: module.training for module in causal_lm.modules()}
    stock_forward = _stock_forward(causal_lm)
    causal_lm.eval()
    try:
        with torch.no_grad():
            with _catch_body_output(causal_lm) as caught:
                stock = stock_forward(input_ids=input_ids, use_cache=False, return_dict=True)
            if not caught:
                raise ValueError(f"{name}.forward did not call its body (base_model); lmforge.cce cannot find "
                                 f"its final hidden states")
            hidden = caught[-1]
            skipped_hidden, skipped = final_hidden_states(causal_lm, stock_forward, input_ids=input_ids,
                                                          use_cache=False, return_dict=True)
    except ValueError:
        raise
    except Exception as err:  # an exotic model whose forward needs more than input_ids
        raise ValueError(f"could not run {name} on a {_PROBE_LENGTH}-token input to check its output layer "
                         f"({type(err).__name__}: {err}); pass verify=False only if you know its logits are "
                         f"softcap(lm_head(hidden))") from err
    finally:
        for module, mode in training.items():
            module.training = mode

    with torch.no_grad():
        logits = stock.logits.float()
        rebuilt = F.linear(hidden, _full(layer.weight), _full(layer.bias)).float()
        if layer.softcap is not None:
            rebuilt = torch.tanh(rebuilt / layer.softcap) * layer.softcap
    scale = max(float(logits.abs().max()), 1e-6)
    error = float((logits - rebuilt).abs().max()) / scale if logits.shape == rebuilt.shape else math.inf
    if not error <= 1e-2:
        raise ValueError(f"{name}'s logits are not softcap(lm_head(last hidden state)) (relative difference "
                         f"{error:.3g}); it transforms its logits in a way lmforge.cce does not reproduce "
                         f"(e.g. a logit scale), so it cannot be patched")
    kept = _skipping_index(layer.weight).numel()
    if skipped.logits is not None and skipped.logits.numel() != 0 and skipped.logits.shape[-2] != kept:
        raise ValueError(f"{name}.forward ignores a tensor logits_to_keep, so lmforge.cce cannot skip its logits")
    if not torch.allclose(skipped_hidden.float(), hidden.float(), rtol=1e-3, atol=1e-3 * scale):
        raise ValueError(f"{name}'s final hidden states change with logits_to_keep; lmforge.cce cannot patch it")
    causal_lm.__dict__[_VERIFIED_ATTRIBUTE] = True
