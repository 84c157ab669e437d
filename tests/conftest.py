"""Shared test set-up.

Triton decides at import time whether its kernels run on the GPU or in the CPU interpreter, so the
interpreter is switched on here, before any lmforge module is imported, on machines without CUDA.
"""

import importlib.util
import os
import socket
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def free_loopback_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process group (network tests stay on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def one_cpu_thread():
    """torch on one intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``): tiny
    models are dominated by thread start-up, and on two shared cores one thread is several times faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def load_bench_script(name: str):
    """Import bench/<name>.py as the module ``name`` (registered in sys.modules: dataclasses look it up)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
