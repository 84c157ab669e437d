"""Toy LoRA adapters shared by the evolution tests: a few small A/B matrices, seeded."""

import torch

SHAPES = {
    "base_model.model.q.lora_A.weight": (3, 8),
    "base_model.model.q.lora_B.weight": (5, 3),
    "base_model.model.v.lora_A.weight": (3, 8),
    "base_model.model.v.lora_B.weight": (4, 3),
}


def toy_adapter(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for key, shape in SHAPES.items()}
