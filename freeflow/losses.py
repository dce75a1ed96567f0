"""The velocity-alignment loss shared by both FreeFlow objectives (docs/design.md §5).

``velocity_alignment_loss(F, A, B)`` has the value ``mean_i w_i·‖A_i - B_i‖²/d`` with the adaptive
weight ``w_i = 1/(‖A_i - B_i‖²/d + eps)^power`` (a constant), and its gradient w.r.t. ``F`` is
``(2/(N·d))·scale·w_i·(A_i - B_i)``. ``A`` and ``B`` are constants. This is the surrogate
``scale·mean_i w_i‖F_i - sg(F_i - Δ_i)‖²/d`` with ``Δ = A - B``, without materialising it.

It runs the fused op ``freeflow::velocity_alignment`` of the C++/CUDA extension ``freeflow._C``
(one pass over A and B, gradient written in the forward) when the extension is available for the
tensors' device, and the pure-PyTorch reference below otherwise; both give the same value,
per-sample terms and gradient. See docs/losses.md.
"""
from __future__ import annotations

import math
import numbers

import torch

from freeflow import _ext

DEFAULT_EPS = 1e-3
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Only the cheap import of a prebuilt library here; a JIT build waits for the first call.
_ext.load(allow_jit=False)


def velocity_alignment_loss(F, A, B, *, power=1.0, eps=DEFAULT_EPS, scale=1.0,
                            return_per_sample=False):
    """Fused velocity-alignment loss; ``(loss, per_sample)`` with ``return_per_sample=True``.

    F, A, B: tensors of one shape ``(N, ...)``, dtype (fp32, fp64, bf16, fp16) and device. ``F`` is
    the student output that receives the gradient; its values are never read. ``per_sample`` is
    ``‖A_i - B_i‖²/d`` in fp32 (fp64 for fp64 inputs), for logging. ``scale`` (λ) multiplies the
    gradient only; it may be a 0-dim tensor (e.g. a batch statistic), treated as a constant.
    """
    _check_args(F, A, B, power, eps, scale)
    if not torch.compiler.is_compiling():
        _ext.load()  # never inside a trace: building or importing is not traceable
    if not _ext.supports(F.device):
        return velocity_alignment_loss_reference(F, A, B, power=power, eps=eps, scale=scale,
                                                 return_per_sample=return_per_sample)
    tensor_scale = isinstance(scale, torch.Tensor)
    loss, per_sample, _ = torch.ops.freeflow.velocity_alignment(
        F, A, B, float(power), float(eps), 1.0 if tensor_scale else float(scale))
    if tensor_scale:
        loss = _scale_gradient(loss, scale)
    return (loss, per_sample) if return_per_sample else loss


def velocity_alignment_loss_reference(F, A, B, *, power=1.0, eps=DEFAULT_EPS, scale=1.0,
                                      return_per_sample=False):
    """Pure-PyTorch reference written out from the formula (fp32 or fp64 math); also the fallback."""
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    delta = (A.detach().to(acc) - B.detach().to(acc)).flatten(1)
    n, d = delta.shape
    per_sample = delta.pow(2).mean(1)
    w = (per_sample + eps).pow(-power)
    value = (w * per_sample).mean()
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().to(acc)
    grad = (scale * 2.0 / (n * d)) * w[:, None] * delta
    # value + (<F, grad> - sg(<F, grad>)): the bracket is exactly 0, so the value is exact, and
    # d/dF is exactly `grad`. (Without the bracket, value + inner would round to inner's ulp.)
    inner = (F.flatten(1).to(acc) * grad).sum()
    loss = (value + (inner - inner.detach())).to(F.dtype)
    return (loss, per_sample) if return_per_sample else loss


def _scale_gradient(loss, scale):
    """Same value as ``loss``; gradients reaching it are multiplied by the constant ``scale``.

    The fused op takes λ as a float; a tensor λ is applied to the incoming scalar gradient instead
    (no host sync, no extra pass over the gradient: the op's backward rescales once anyway).
    """
    scaled = loss * scale.detach().to(loss.dtype)
    return loss.detach() + (scaled - scaled.detach())


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_args(F, A, B, power, eps, scale) -> None:
    for name, t in (("F", F), ("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"velocity_alignment_loss: {name} must be a torch.Tensor, "
                             f"got {type(t).__name__}")
    if F.dtype not in SUPPORTED_DTYPES:
        raise ValueError("velocity_alignment_loss: F must be float32, float64, bfloat16 or "
                         f"float16, got {F.dtype}")
    if F.dim() < 2 or F.numel() == 0:
        raise ValueError("velocity_alignment_loss: F must be a non-empty (N, ...) tensor with at "
                         f"least one feature dimension, got shape {tuple(F.shape)}")
    for name, t in (("A", A), ("B", B)):
        if t.shape != F.shape:
            raise ValueError(f"velocity_alignment_loss: {name} must have F's shape "
                             f"{tuple(F.shape)}, got {tuple(t.shape)}")
        if t.dtype != F.dtype:
            raise ValueError(f"velocity_alignment_loss: {name} must have F's dtype {F.dtype}, "
                             f"got {t.dtype}")
        if t.device != F.device:
            raise ValueError(f"velocity_alignment_loss: {name} must be on F's device {F.device}, "
                             f"got {t.device}")
    if not (_is_real(power) and math.isfinite(power)):
        raise ValueError(f"velocity_alignment_loss: power must be a finite real number, got {power!r}")
    if not (_is_real(eps) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"velocity_alignment_loss: eps must be a finite number >= 0, got {eps!r}")
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or not scale.is_floating_point():
            raise ValueError("velocity_alignment_loss: a tensor scale must be a 0-dim floating "
                             f"tensor, got shape {tuple(scale.shape)} and dtype {scale.dtype}")
        if scale.device != F.device and scale.device.type != "cpu":
            raise ValueError(f"velocity_alignment_loss: scale must be on F's device {F.device} "
                             f"or the CPU, got {scale.device}")
    elif not (_is_real(scale) and math.isfinite(scale)):
        raise ValueError(f"velocity_alignment_loss: scale must be a finite real number or a 0-dim "
                         f"tensor, got {scale!r}")
