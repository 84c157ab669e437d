"""Shared test set-up.

Triton decides at import time whether its kernels run on the GPU or in the CPU interpreter, so the
interpreter is switched on here, before any lmforge module is imported, on machines without CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device():
    return DEVICE
