"""Helpers shared by the test areas: comparisons (the Triton path against the references) and dtype fixtures."""
import pytest
import torch


def default_dtype_fixture(dtype: torch.dtype):
    """An autouse fixture: tensors made without a dtype are ``dtype`` in the module (or folder) that binds it,
    whatever another module set; the default dtype is process-global, so it is restored afterwards."""
    @pytest.fixture(autouse=True)
    def _default_dtype():
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        yield
        torch.set_default_dtype(old)
    return _default_dtype


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


@torch.no_grad()
def trained_like_(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Normal(0, std) into every trainable parameter, in place: trained-like weights, since DiT's adaLN-Zero init
    makes every block the identity (and the losses trivially small). Draws from the global generator."""
    for p in model.parameters():
        if p.requires_grad:
            p.normal_(0, std)
    return model
