"""Loading models and tokenizers, LoRA adapters, and log-probabilities of a model's tokens."""

from lmforge.models.loading import load_model
from lmforge.models.logprobs import TokenLogprobs, token_logprobs
from lmforge.models.lora import LoraAdapterConfig, attach_lora, load_lora, save_lora

__all__ = ["LoraAdapterConfig", "TokenLogprobs", "attach_lora", "load_lora", "load_model", "save_lora",
           "token_logprobs"]
