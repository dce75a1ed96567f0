"""GELU (tanh approximation) and bias + GELU, with forward tangent.

    g(h) = ½·h·(1 + T),   T = tanh(c·(h + 0.044715·h³)),   c = √(2/π)
    g'(h) = ½·(1 + T) + ½·h·(1 - T²)·c·(1 + 3·0.044715·h²)
    bias_gelu(h, b) = g(h + b),   tangent g'(h + b)·ḣ   (b is a parameter: no tangent)

In a DiT MLP, ``fc1``'s GEMM runs without its bias and ``bias_gelu`` adds it, so the bias add, the
activation and (on the JVP path) its derivative are one elementwise pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import check_backend
from ._validate import accumulation_dtype, check_tangents, check_tensor

GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_tanh_derivative(h: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(GELU_C * (h + GELU_A * h.pow(3)))
    return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * GELU_C * (1 + 3 * GELU_A * h * h)


def _check_bias(h, bias):
    if bias is not None:
        check_tensor("bias", bias, rank=1)
        if bias.shape[0] != h.shape[-1]:
            raise ValueError(f"bias must have shape ({h.shape[-1]},) to match h's last dim, got {tuple(bias.shape)}")


def gelu_tanh(h, *, backend=None):
    return bias_gelu(h, None, backend=backend)


def gelu_tanh_jvp(h, th, *, backend=None):
    return bias_gelu_jvp(h, None, th, backend=backend)


def bias_gelu_reference(h, bias=None):
    """GELU(tanh)(h + bias)."""
    check_tensor("h", h, min_rank=1)
    _check_bias(h, bias)
    return F.gelu(h if bias is None else h + bias, approximate="tanh")


def bias_gelu_jvp_reference(h, bias, th):
    """(GELU(h + bias), its tangent along th); primal differentiable, tangent detached."""
    check_tensor("h", h, min_rank=1)
    _check_bias(h, bias)
    check_tangents([("th", th, h)])
    a = h if bias is None else h + bias
    y = F.gelu(a, approximate="tanh")
    if th is None:
        return y, None
    with torch.no_grad():
        af = a.detach().to(accumulation_dtype(a))
        ty = (gelu_tanh_derivative(af) * th.to(af.dtype)).to(h.dtype)
    return y, ty


def bias_gelu(h, bias=None, *, backend=None):
    """GELU(tanh)(h + bias) for h (..., C), bias (C,) or None."""
    check_backend(backend)
    return bias_gelu_reference(h, bias)


def bias_gelu_jvp(h, bias, th, *, backend=None):
    """(bias_gelu(h, bias), its tangent along th); primal differentiable, tangent detached."""
    check_backend(backend)
    return bias_gelu_jvp_reference(h, bias, th)
