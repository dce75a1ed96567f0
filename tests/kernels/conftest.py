"""Fixtures of the kernel tests. TRITON_INTERPRET and the session ``device`` fixture come from tests/conftest.py;
comparison helpers (``rel_err``, ``make_check``) are in tests/kernel_checks.py, shared with tests/models."""
import pytest
import torch


@pytest.fixture(autouse=True)
def fp32_default_dtype():
    """Tensors made without a dtype are fp32, whatever another test module set globally."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)
