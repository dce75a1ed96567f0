"""LayerNorm over the last dimension, with forward tangent.

    x̂ = (x - μ)/σ,   σ = sqrt(Var[x] + eps),   y = x̂·w + b   (w, b optional: DiT's norms have none)
    ẋ̂ = (ẋ - mean(ẋ) - x̂·mean(x̂·ẋ))/σ,          ẏ = ẋ̂·w

Statistics are computed in fp32 for fp16/bf16 inputs. The fused Triton path for DiT blocks is the
adaLN modulate kernel (``freeflow.kernels.modulate``); this module is the reference it builds on and
the op used for the affine ``qk_norm`` of REPA-style attention.
"""
from __future__ import annotations

import torch

from ._validate import accumulation_dtype, check_tangents, check_tensor


def normalize(x: torch.Tensor, eps: float):
    """Returns (x̂, rstd) in the accumulation dtype; rstd keeps the reduced dim."""
    xf = x.to(accumulation_dtype(x))
    xc = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return xc * rstd, rstd


def normalize_tangent(xhat: torch.Tensor, rstd: torch.Tensor, tx: torch.Tensor) -> torch.Tensor:
    tx = tx.to(xhat.dtype)
    return (tx - tx.mean(-1, keepdim=True) - xhat * (xhat * tx).mean(-1, keepdim=True)) * rstd


def layer_norm(x, weight=None, bias=None, eps: float = 1e-6):
    """LayerNorm of the last dim (reference; differentiable, forward-AD compatible)."""
    check_tensor("x", x, min_rank=1)
    xhat, _ = normalize(x, eps)
    y = xhat
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def layer_norm_jvp(x, tx, weight=None, bias=None, eps: float = 1e-6):
    """(LayerNorm(x), its tangent along tx). The primal carries autograd; the tangent is detached."""
    check_tensor("x", x, min_rank=1)
    check_tangents([("tx", tx, x)])
    xhat, rstd = normalize(x, eps)
    y = xhat if weight is None else xhat * weight
    if bias is not None:
        y = y + bias
    if tx is None:
        return y.to(x.dtype), None
    with torch.no_grad():
        ty = normalize_tangent(xhat.detach(), rstd.detach(), tx)
        if weight is not None:
            ty = ty * weight
    return y.to(x.dtype), ty.to(x.dtype)
