"""Suite-wide set-up, loaded before any test module.

Triton's interpreter mode is decided here, once, because Triton reads ``TRITON_INTERPRET`` when it is
first imported: test modules must not set it themselves (the outcome would depend on collection order).
An explicit ``TRITON_INTERPRET`` in the environment wins; otherwise the kernels run interpreted on CPU
tensors when no GPU is present, and compiled on CUDA tensors when one is.
"""
import os
import sys

import pytest
import torch

if "triton" in sys.modules:  # pragma: no cover - a plugin imported triton before us
    raise RuntimeError("triton was imported before tests/conftest.py could choose TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel tests put their tensors: CUDA when compiled kernels can run, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
