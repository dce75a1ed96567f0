"""Comparison helpers shared by the kernel tests (the Triton path against the references)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def fp32_default_dtype():
    """Tensors made without a dtype are fp32, whatever another test module set globally."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def rel_err(a, b, floor=0.0):
    """Normwise relative error max|a - b| / max(max|b|, floor) in fp32 (absolute where b is exactly zero)."""
    a, b = a.float(), b.float()
    scale = max(b.abs().max().item(), floor)
    return ((a - b).abs().max() / (scale if scale > 0 else 1.0)).item()


def make_check(tolerances):
    """``check(a, b, dtype, what)``: same dtype and shape, relative error within ``tolerances[dtype]``."""
    def check(a, b, dtype, what):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        err = rel_err(a, b)
        assert err <= tolerances[dtype], f"{what}: relative error {err:.2e} > {tolerances[dtype]:.0e}"
    return check
