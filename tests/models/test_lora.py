"""Tests of lmforge.models.lora: our LoRA settings, default target modules per family, PEFT wiring checked
against the LoRA formula in float64, save/load round trips, and error messages."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from lmforge.models.loading import load_model
from lmforge.models.lora import (
    LoraAdapterConfig,
    attach_lora,
    check_lora_folder,
    default_lora_target_modules,
    load_lora,
    save_lora,
    to_peft_config,
)
from tests.models.conftest import TINY_MODEL_FAMILIES, build_tiny_model

LLAMA_LIKE_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
EXPECTED_DEFAULT_TARGETS = {family: LLAMA_LIKE_TARGETS for family in TINY_MODEL_FAMILIES}
EXPECTED_DEFAULT_TARGETS["phi3"] = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]  # fused projections
INPUT_IDS = torch.tensor([[1, 75, 108, 35, 55, 53, 2, 0]])


def _logits(model, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _randomise_lora_weights(model, seed: int = 1) -> None:
    """PEFT starts B at zero (a no-op adapter); give A and B random values so round trips mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


# --------------------------------------------------------------------------------------------------
# Settings


def test_settings_map_onto_peft_lora_config():
    model = build_tiny_model("llama")
    config = LoraAdapterConfig(rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True)
    peft_config = to_peft_config(config, model)
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (4, 8.0, 0.1)
    assert set(peft_config.target_modules) == {"q_proj", "v_proj"}
    assert peft_config.use_rslora is True and peft_config.bias == "none"
    assert peft_config.task_type == "CAUSAL_LM"


def test_settings_round_trip_through_yaml():
    config = LoraAdapterConfig(rank=16, alpha=32, dropout=0.05, target_modules=["q_proj"])
    text = yaml.safe_dump(config.to_dict())
    assert LoraAdapterConfig.from_dict(yaml.safe_load(text)) == config
    assert LoraAdapterConfig.from_dict(yaml.safe_load("rank: 4\nalpha: 8\n")) == LoraAdapterConfig(rank=4, alpha=8.0)


@pytest.mark.parametrize(
    "settings, error, message",
    [
        (dict(rank=0), ValueError, "rank must be a positive integer"),
        (dict(rank=2.5), ValueError, "rank"),
        (dict(rank=True), ValueError, "rank"),
        (dict(alpha=0), ValueError, "alpha must be a positive number"),
        (dict(alpha="16"), ValueError, "alpha"),
        (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
        (dict(dropout=-0.1), ValueError, "dropout"),
        (dict(target_modules="q_proj"), TypeError, "target_modules must be a list"),
        (dict(target_modules=[]), ValueError, "non-empty list"),
        (dict(target_modules=["q_proj", ""]), ValueError, "non-empty strings"),
        (dict(use_rslora="yes"), TypeError, "use_rslora"),
    ],
)
def test_bad_settings_are_rejected(settings, error, message):
    with pytest.raises(error, match=message):
        LoraAdapterConfig(**settings)


def test_unknown_settings_are_rejected():
    with pytest.raises(ValueError, match=r"unknown LoRA setting\(s\) \['r'\]"):
        LoraAdapterConfig.from_dict({"r": 8})


# --------------------------------------------------------------------------------------------------
# Default target modules


@pytest.mark.parametrize("family", TINY_MODEL_FAMILIES)
def test_default_targets_are_the_attention_and_mlp_projections(family):
    model = build_tiny_model(family)
    targets = default_lora_target_modules(model)
    assert targets == EXPECTED_DEFAULT_TARGETS[family]

    peft_model = attach_lora(model, LoraAdapterConfig(rank=2))
    adapted = sorted(name for name, module in peft_model.named_modules() if hasattr(module, "lora_A"))
    layers = model.config.num_hidden_layers
    assert len(adapted) == layers * len(targets)  # every block, every projection, nothing else
    assert not any("lm_head" in name or "embed" in name for name in adapted)
    # The trainable parameter count equals rank * (in + out) summed over the adapted layers, nothing more.
    base = build_tiny_model(family)
    expected = sum(
        2 * (module.in_features + module.out_features)
        for name, module in base.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets and ".layers." in name
    )
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected


def test_moe_routers_and_gates_are_not_targets():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config)
    linear_leaf_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "shared_expert_gate" in linear_leaf_names  # a linear layer with one output: a gate, not a projection
    assert default_lora_target_modules(model) == LLAMA_LIKE_TARGETS


def test_a_model_without_blocks_has_no_default_targets():
    with pytest.raises(ValueError, match="pass target_modules explicitly"):
        default_lora_target_modules(nn.Sequential(nn.Linear(4, 4)))


# --------------------------------------------------------------------------------------------------
# What the adapter computes


def test_fresh_adapter_leaves_outputs_unchanged_and_freezes_the_base():
    base_logits = _logits(build_tiny_model("qwen3"))
    model = attach_lora(build_tiny_model("qwen3"))
    assert torch.equal(_logits(model), base_logits)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapted_layer_matches_the_lora_formula_in_float64(use_rslora):
    rank, alpha = 4, 12.0
    model = attach_lora(build_tiny_model("mistral"), LoraAdapterConfig(rank=rank, alpha=alpha, use_rslora=use_rslora))
    _randomise_lora_weights(model)
    layer = model.get_base_model().model.layers[1].self_attn.k_proj
    weight = layer.base_layer.weight.double()
    lora_a = layer.lora_A["default"].weight.double()
    lora_b = layer.lora_B["default"].weight.double()
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    inputs = torch.randn(3, 5, weight.shape[1], generator=torch.Generator().manual_seed(0))
    expected = inputs.double() @ weight.T + scale * (inputs.double() @ lora_a.T @ lora_b.T)
    with torch.no_grad():
        actual = layer(inputs)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual.double(), inputs.double() @ weight.T, atol=1e-3)  # the adapter does act


# --------------------------------------------------------------------------------------------------
# Save and load


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_save_then_load_gives_identical_outputs(family, tmp_path):
    model = attach_lora(build_tiny_model(family), LoraAdapterConfig(rank=4, alpha=8))
    _randomise_lora_weights(model)
    adapted_logits = _logits(model)
    assert not torch.equal(adapted_logits, _logits(build_tiny_model(family)))

    folder = save_lora(model, tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    saved_config = json.loads((folder / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "LORA" and saved_config["r"] == 4 and saved_config["lora_alpha"] == 8
    assert sorted(saved_config["target_modules"]) == EXPECTED_DEFAULT_TARGETS[family]
    with safe_open(folder / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and all(re.search(r"\.lora_[AB]\.weight$", name) for name in names)  # adapter only, no base

    loaded = load_lora(build_tiny_model(family), folder)
    assert torch.equal(_logits(loaded), adapted_logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    trainable = load_lora(build_tiny_model(family), folder, trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    model = attach_lora(build_tiny_model("llama"), LoraAdapterConfig(rank=2))
    folder = save_lora(model, tmp_path / "adapter")
    with pytest.raises(FileExistsError, match="adapter"):
        save_lora(model, folder)
    _randomise_lora_weights(model, seed=5)
    save_lora(model, folder, overwrite=True)
    assert torch.equal(_logits(load_lora(build_tiny_model("llama"), folder)), _logits(model))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_load_model_attaches_or_loads_an_adapter(tiny_model_folder, tmp_path):
    folder, _ = tiny_model_folder("gemma3_text")
    model, _ = load_model(folder, lora=LoraAdapterConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    assert default_lora_target_modules(model) == LLAMA_LIKE_TARGETS  # the base is still seen through the wrapper
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    assert any(p.requires_grad for p in model.parameters())
    _randomise_lora_weights(model)
    adapter = save_lora(model, tmp_path / "adapter")

    reloaded, _ = load_model(folder, lora=adapter)
    assert torch.equal(_logits(reloaded), _logits(model))
    with pytest.raises(TypeError, match="lora must be"):
        load_model(folder, lora={"rank": 2})
    with pytest.raises(FileNotFoundError, match="no-such-adapter"):
        load_model(folder, lora=tmp_path / "no-such-adapter")


# --------------------------------------------------------------------------------------------------
# Errors


def test_unknown_target_modules_list_the_real_names():
    with pytest.raises(ValueError, match=r"\['query'\] match no module.*qkv_proj"):
        attach_lora(build_tiny_model("phi3"), LoraAdapterConfig(target_modules=["qkv_proj", "query"]))


def test_wrong_model_types_are_rejected(tmp_path):
    peft_model = attach_lora(build_tiny_model("llama"))
    with pytest.raises(TypeError, match="already carries PEFT adapters"):
        attach_lora(peft_model)
    with pytest.raises(TypeError, match="peft.PeftModel"):
        save_lora(build_tiny_model("llama"), tmp_path / "adapter")


def test_bad_adapter_folders_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-adapter"):
        load_lora(build_tiny_model("llama"), tmp_path / "missing-adapter")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        check_lora_folder(empty)

    folder = save_lora(attach_lora(build_tiny_model("llama")), tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(str(weights)) + ".*truncated"):
        load_lora(build_tiny_model("llama"), folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        check_lora_folder(folder)

    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        check_lora_folder(folder)


def test_adapter_for_another_model_shape_is_a_clear_error(tmp_path):
    folder = save_lora(attach_lora(build_tiny_model("llama", hidden_size=64)), tmp_path / "adapter")
    with pytest.raises(ValueError, match="(?s)" + re.escape(str(folder)) + ".*size mismatch"):
        load_lora(build_tiny_model("llama", hidden_size=32, head_dim=8), folder)
