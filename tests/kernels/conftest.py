"""Fixtures of the kernel tests. TRITON_INTERPRET and the session ``device`` fixture come from tests/conftest.py;
comparison helpers (``rel_err``, ``make_check``) are in tests/checks.py, shared with tests/models."""
import torch
from checks import default_dtype_fixture

fp32_default_dtype = default_dtype_fixture(torch.float32)
