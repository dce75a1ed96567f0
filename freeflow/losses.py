"""The velocity-alignment loss shared by both FreeFlow objectives (DESIGN §5).

``velocity_alignment_loss(F, A, B)`` has the value ``mean_i w_i·‖A_i - B_i‖²/d`` with the adaptive
weight ``w_i = 1/(‖A_i - B_i‖²/d + eps)^power`` (a constant), and its gradient w.r.t. ``F`` is
``(2/(N·d))·scale·w_i·(A_i - B_i)``. ``A`` and ``B`` are constants. This is the surrogate
``scale·mean_i w_i‖F_i - sg(F_i - Δ_i)‖²/d`` with ``Δ = A - B``, without materialising it.
"""
from __future__ import annotations

import torch

DEFAULT_EPS = 1e-3


def velocity_alignment_loss_reference(F, A, B, *, power=1.0, eps=DEFAULT_EPS, scale=1.0,
                                      return_per_sample=False):
    """Pure-PyTorch reference written out from the formula (fp32 or fp64 math)."""
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    delta = (A.detach().to(acc) - B.detach().to(acc)).flatten(1)
    n, d = delta.shape
    per_sample = delta.pow(2).mean(1)
    w = (per_sample + eps).pow(-power)
    value = (w * per_sample).mean()
    grad = (scale * 2.0 / (n * d)) * w[:, None] * delta
    # value + <F, grad> - sg(<F, grad>): the value is exact and d/dF is exactly `grad`.
    inner = (F.flatten(1).to(acc) * grad).sum()
    loss = (value + inner - inner.detach()).to(F.dtype)
    return (loss, per_sample) if return_per_sample else loss


velocity_alignment_loss = velocity_alignment_loss_reference
