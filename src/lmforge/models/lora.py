"""LoRA adapters through PEFT: attach a new adapter, save it, load it back.

Adapters are stored as standard PEFT folders (adapter_config.json + adapter_model.safetensors), so
anything that reads PEFT adapters reads ours. Our :class:`LoraAdapterConfig` is a plain dataclass (YAML and
JSON friendly) that maps one-to-one onto ``peft.LoraConfig``:

    rank -> r,  alpha -> lora_alpha,  dropout -> lora_dropout,  target_modules -> target_modules,
    use_rslora -> use_rslora   (bias="none", task_type="CAUSAL_LM")

A LoRA layer computes ``W x + (alpha / rank) * B A x`` (``alpha / sqrt(rank)`` with use_rslora), with ``B``
starting at zero so a fresh adapter leaves the model's outputs unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.models.loading import check_safetensors_file, write_directory_atomically

ADAPTER_CONFIG_FILENAME = "adapter_config.json"
ADAPTER_WEIGHTS_FILENAME = "adapter_model.safetensors"
# Linear layers inside transformer blocks that must not get LoRA: mixture-of-experts routers and gates
# ("gate", "router", "shared_expert_gate"). Adapting one changes which experts run rather than what they
# compute, and a one-output gate gains nothing from a low-rank update. ("gate_proj" is an MLP projection.)
_ROUTER_LAYER_NAME = re.compile(r"(^|_)(gate|router)$")
# A module path inside a stack of blocks has a numeric component after a name: "model.layers.3.self_attn.q_proj".
_BLOCK_INDEX = re.compile(r"\.\d+(\.|$)")


@dataclasses.dataclass
class LoraAdapterConfig:
    """Settings of a new LoRA adapter.

    rank: rank r of the update ``B A`` (A is r x in_features, B is out_features x r).
    alpha: scale numerator; the update is multiplied by ``alpha / rank``.
    dropout: dropout probability on the adapter's input during training (0 turns it off).
    target_modules: names of the linear layers to adapt, matched as PEFT does (a module whose name is, or
        ends with ".<name>"); None adapts every linear layer inside the transformer blocks (attention q/k/v/o
        and the MLP projections), see :func:`default_lora_target_modules`.
    use_rslora: scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA) instead of ``alpha / rank``.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not isinstance(self.target_modules, (list, tuple)):
                raise TypeError(
                    f"target_modules must be a list of module names or None, got {self.target_modules!r}"
                )
            if not self.target_modules or not all(isinstance(n, str) and n for n in self.target_modules):
                raise ValueError(
                    f"target_modules must be a non-empty list of non-empty strings, got {self.target_modules!r}"
                )
            self.target_modules = list(self.target_modules)
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoraAdapterConfig:
        """Build from a mapping (e.g. parsed YAML); unknown keys are an error, not silently ignored."""
        if not isinstance(values, Mapping):
            raise TypeError(f"LoRA settings must be a mapping, got {type(values).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LoRA setting(s) {unknown}; known settings are {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the model's repeated transformer blocks, e.g.
    ``["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]`` for Llama-like models
    or ``["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]`` for Phi-3.

    Found from the module tree rather than a table per family: every ``nn.Linear`` whose path has a block
    index ("layers.3.") counts, which keeps the output head and embeddings out; MoE routers and gates are
    left out. Mixture-of-experts models whose experts are fused 3-D parameters (Mixtral, Qwen3-MoE in
    transformers 5) have no per-expert linear layers, so only their attention (and any shared-expert MLP)
    is adapted.
    """
    names = set()
    for path, module in _base_model(model).named_modules():
        if not isinstance(module, nn.Linear) or not _BLOCK_INDEX.search(path):
            continue
        components = path.split(".")
        if any(component.startswith("lora_") for component in components):
            continue  # the A and B matrices of an adapter already attached
        if components[-1] == "base_layer":
            components.pop()  # the original layer inside a LoRA wrapper: report the wrapper's name
        leaf_name = components[-1]
        if not _ROUTER_LAYER_NAME.search(leaf_name):
            names.add(leaf_name)
    if not names:
        raise ValueError(
            f"found no linear layers inside transformer blocks of {type(model).__name__}; pass target_modules "
            f"explicitly in LoraAdapterConfig"
        )
    return sorted(names)


def to_peft_config(config: LoraAdapterConfig, model: nn.Module) -> Any:
    """The ``peft.LoraConfig`` for ``config`` on ``model`` (default target modules resolved from the model)."""
    from peft import LoraConfig as PeftLoraConfig

    if not isinstance(config, LoraAdapterConfig):
        raise TypeError(f"config must be a LoraAdapterConfig, got {type(config).__name__}")
    if config.target_modules is None:
        target_modules = default_lora_target_modules(model)
    else:
        target_modules = config.target_modules
        _check_target_modules_exist(model, target_modules)
    return PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target_modules,
        use_rslora=config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: nn.Module, config: LoraAdapterConfig | None = None) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with a new trainable LoRA adapter (named "default").

    Only the adapter's parameters require gradients afterwards; the base weights are frozen. The base model
    is modified in place (its linear layers are replaced by LoRA layers), as PEFT does.
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise TypeError("model already carries PEFT adapters; attach_lora needs a plain transformers model")
    peft_config = to_peft_config(config if config is not None else LoraAdapterConfig(), model)
    return get_peft_model(model, peft_config)


def save_lora(model: Any, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save the adapter(s) of a ``PeftModel`` as a standard PEFT folder (adapter_config.json and
    adapter_model.safetensors); the folder appears atomically. Returns its path."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"model must be a peft.PeftModel (see attach_lora), got {type(model).__name__}")
    folder = Path(folder).expanduser()
    with write_directory_atomically(folder, overwrite=overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=True)
    return folder


def load_lora(model: nn.Module, folder: str | os.PathLike, *, trainable: bool = False) -> Any:
    """Load the PEFT LoRA adapter saved in ``folder`` onto ``model``; return the ``peft.PeftModel``.

    ``trainable=False`` (the default) loads it for inference, with every parameter frozen; pass True to keep
    training it. The base model is modified in place.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise TypeError("model already carries PEFT adapters; load_lora needs a plain transformers model")
    folder = Path(folder).expanduser()
    check_lora_folder(folder)
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as err:
        # load_state_dict lists every mismatching tensor; the first few say enough.
        reason = str(err) if len(str(err)) <= 600 else str(err)[:600] + " ..."
        raise ValueError(
            f"could not load the LoRA adapter in {folder} onto {type(model).__name__} (was it trained on another "
            f"base model?): {reason}"
        ) from err


def check_lora_folder(folder: str | os.PathLike) -> None:
    """Raise FileNotFoundError/ValueError naming ``folder`` unless it holds a complete PEFT LoRA adapter."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA adapter folder {folder} does not exist")
    config_path = folder / ADAPTER_CONFIG_FILENAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG_FILENAME}")
    try:
        adapter_config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    peft_type = adapter_config.get("peft_type") if isinstance(adapter_config, dict) else None
    if peft_type != "LORA":
        raise ValueError(f"{config_path} describes a {peft_type!r} adapter, not a LoRA adapter")
    weights_path = folder / ADAPTER_WEIGHTS_FILENAME
    if weights_path.is_file():
        check_safetensors_file(weights_path)
    elif not (folder / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"{folder} has {ADAPTER_CONFIG_FILENAME} but no {ADAPTER_WEIGHTS_FILENAME}")


def _base_model(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _check_target_modules_exist(model: nn.Module, target_modules: list[str]) -> None:
    module_paths = [path for path, _ in _base_model(model).named_modules()]
    missing = [
        name for name in target_modules if not any(path == name or path.endswith("." + name) for path in module_paths)
    ]
    if missing:
        linear_names = sorted(
            {path.rsplit(".", 1)[-1] for path, m in _base_model(model).named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"target_modules {missing} match no module of {type(model).__name__}; its linear layers are named "
            f"{linear_names}"
        )

