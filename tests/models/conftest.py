"""Fixtures for model tests: tiny random-weight models of the families we support, a tiny tokenizer,
model folders built from them, and the embedded default model converted once per test session.

Use them from any test under tests/models/:

    def test_something(tiny_model):
        model = tiny_model("qwen3", dtype=torch.bfloat16)      # a Qwen3ForCausalLM, ~0.1M parameters

    def test_other(tiny_model_folder):
        folder, model = tiny_model_folder("gemma2")            # saved with a tokenizer; load_model(folder) works

    def test_default(embedded_model):                           # converted once per session in a tmp LMFORGE_HOME
        model, tokenizer = load_model(embedded_model.folder)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import torch

# transformers model_type of each family; every one builds with build_tiny_model.
TINY_MODEL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
# The tiny tokenizer: ChatML specials (ids 0-2), then one token per byte (id = byte value + 3).
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB_SIZE = len(TINY_SPECIAL_TOKENS) + 256
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TINY_SIZES = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in the real models
    head_dim=16,  # Gemma's default head_dim is 256 whatever the hidden size; set it for every family
    max_position_embeddings=128,
    pad_token_id=0,  # <|endoftext|>
    bos_token_id=1,  # <|im_start|>
    eos_token_id=2,  # <|im_end|>
)


def build_tiny_model(family: str, dtype: torch.dtype = torch.float32, *, seed: int = 0, **config_overrides: Any):
    """A randomly initialised causal LM of ``family`` (a transformers model_type from TINY_MODEL_FAMILIES)
    with tiny sizes (2 layers, hidden 64, 4 query / 2 key-value heads, the tiny tokenizer's 259-token vocab),
    in eval mode.

    The same ``family``, ``seed`` and overrides give the same weights. ``config_overrides`` replace any config
    field, e.g. ``vocab_size=49152`` or ``tie_word_embeddings=True``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in TINY_MODEL_FAMILIES:
        raise ValueError(f"family must be one of {TINY_MODEL_FAMILIES}, got {family!r}")
    config = AutoConfig.for_model(family, **{**_TINY_SIZES, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer without merges, built like GPT-2/Qwen/Llama-3 tokenizers but tiny: the special
    tokens <|endoftext|> (0, padding), <|im_start|> (1) and <|im_end|> (2, eos), then one token per byte, so any
    text encodes to its UTF-8 bytes + 3 ("Hi" -> [75, 108]). It carries a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(TINY_SPECIAL_TOKENS)}
    for byte, character in enumerate(_byte_level_characters()):
        vocab[character] = len(TINY_SPECIAL_TOKENS) + byte
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=TINY_CHAT_TEMPLATE,
    )


def _byte_level_characters() -> list[str]:
    """The printable character byte-level BPE uses for each byte 0..255: printable Latin-1 bytes stand for
    themselves; the others (controls, space, ...) are shifted to code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(family, dtype=torch.float32, seed=0, **config_overrides)`` -> model."""
    return build_tiny_model


@pytest.fixture
def tiny_model_folder(tmp_path):
    """Factory: ``tiny_model_folder(family, dtype=torch.float32, seed=0, **config_overrides)`` -> (folder, model):
    the tiny model and the tiny tokenizer saved as a Hugging Face folder under tmp_path."""

    def make(family: str, dtype: torch.dtype = torch.float32, *, seed: int = 0, **config_overrides: Any):
        model = build_tiny_model(family, dtype, seed=seed, **config_overrides)
        folder = tmp_path / f"tiny-{family}-seed{seed}-{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(folder)
        build_tiny_tokenizer().save_pretrained(folder)
        return folder, model

    return make


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    home: Path  # the LMFORGE_HOME the conversion wrote into
    folder: Path  # the converted Hugging Face folder
    conversion_seconds: float  # wall time of the first load_model() call, conversion included


@pytest.fixture(scope="session")
def embedded_model(tmp_path_factory) -> EmbeddedModel:
    """The embedded default model, converted once per session into a temporary LMFORGE_HOME by the first
    ``load_model()`` call. Load it with ``load_model(embedded_model.folder)``; set LMFORGE_HOME to
    ``embedded_model.home`` (monkeypatch.setenv) to exercise ``load_model()`` without a path."""
    from lmforge.models.loading import embedded_model_folder, load_model

    home = tmp_path_factory.mktemp("lmforge_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMFORGE_HOME", str(home))
        started = time.perf_counter()
        load_model()
        conversion_seconds = time.perf_counter() - started
        folder = embedded_model_folder()
    return EmbeddedModel(home=home, folder=folder, conversion_seconds=conversion_seconds)
