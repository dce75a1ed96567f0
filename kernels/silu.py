"""SiLU with forward tangent: y = c·σ(c),  ẏ = σ(c)·(1 + c·(1 - σ(c)))·ċ.

Applied to the (N, D) conditioning vector only, so it stays a PyTorch op (no kernel is worth a launch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_tangents, check_tensor


def silu(x):
    check_tensor("x", x)
    return F.silu(x)


def silu_jvp(x, tx):
    """(SiLU(x), its tangent along tx); the primal carries autograd, the tangent is detached."""
    check_tensor("x", x)
    check_tangents([("tx", tx, x)])
    y = F.silu(x)
    if tx is None:
        return y, None
    with torch.no_grad():
        s = torch.sigmoid(x.detach())
        ty = s * (1 + x.detach() * (1 - s)) * tx
    return y, ty
