"""Population-based evolution of LoRA adapters: merges, operators, population, fitness."""
