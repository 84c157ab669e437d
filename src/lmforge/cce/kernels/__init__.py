"""Triton kernels of Cut Cross-Entropy, one kernel per file."""
