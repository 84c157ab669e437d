"""Loading models and tokenizers, LoRA adapters, and log-probabilities of a model's tokens."""
