"""Tangent-only ops: the PyTorch ops of a DiT that need a forward tangent but no Triton kernel.

They act on the (N, D) conditioning vector or are single GEMMs, so a kernel would not pay; each takes
and returns tangents explicitly (``*_jvp`` → ``(out, out_tangent)``, primal differentiable, tangent
detached, ``None`` tangent = zero) and works under ``torch.func`` / ``forward_ad`` through plain torch ops.

LayerNorm over the last dim (w, b optional: DiT's norms have none; statistics in fp32 for fp16/bf16)::

    x̂ = (x - μ)/σ,   σ = sqrt(Var[x] + eps),   y = x̂·w + b
    ẋ̂ = (ẋ - mean(ẋ) - x̂·mean(x̂·ẋ))/σ,          ẏ = ẋ̂·w

The fused Triton path of DiT blocks is the adaLN kernel family (``adaln.py``); ``normalize`` and
``normalize_tangent`` below are the reference it builds on, ``layer_norm`` the op for REPA's affine qk_norm.

Linear, primal and tangent rows in one GEMM (the weights carry no tangent)::

    y = x Wᵀ + b,   ẏ = ẋ Wᵀ

``linear_jvp`` stacks the M primal rows and the M tangent rows into one (2M, K) operand (one launch,
W read once). Backward runs through the primal rows only: dW = gᵀx and dx = gW never touch the tangent.

SiLU (on the conditioning vector)::

    y = c·σ(c),   ẏ = σ(c)·(1 + c·(1 - σ(c)))·ċ

Sinusoidal timestep embedding (GLIDE / DiT; ``t`` raw: DiT passes DDPM steps in [0, 1000), SiT/REPA and
FreeFlow's δ/γ embedders pass values in [0, 1])::

    ω_k = exp(-ln(max_period)·k/half),  k = 0..half-1,   emb(t) = [cos ωt, sin ωt]  (zero-padded if dim is odd)
    ėmb = [-ω sin(ωt)·ṫ, ω cos(ωt)·ṫ]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import autocast_cast, autocast_dtype
from ._launch import apply
from ._validate import accumulation_dtype, check_tangents, check_tensor

# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------


def linear(x, weight, bias=None):
    check_tensor("x", x, min_rank=1)
    return F.linear(x, weight, bias)


class _DualLinear(torch.autograd.Function):
    """(x, ẋ) → (x Wᵀ + b, ẋ Wᵀ) with one GEMM; gradients flow through the primal only."""

    @staticmethod
    def forward(x, tx, weight, bias):
        k = x.shape[-1]
        rows = torch.cat([x.reshape(-1, k), tx.reshape(-1, k).to(x.dtype)], dim=0)
        out = rows @ weight.t()
        y, ty = out.chunk(2, dim=0)
        # The primal is what later ops save for backward: give it its own storage so that keeping it
        # does not keep the tangent half of `out` alive too.
        y = y + bias if bias is not None else y.clone()
        lead = x.shape[:-1]
        return y.reshape(*lead, -1), ty.reshape(*lead, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # the tangent output never receives a gradient

    @staticmethod
    def backward(ctx, gy, _gty):
        x, weight = ctx.saved_tensors
        if gy is None:
            return None, None, None, None
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ weight).reshape(x.shape)
        if ctx.needs_input_grad[2]:
            gw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = g2.sum(0)
        return gx, None, gw, gb


def linear_jvp(x, tx, weight, bias=None):
    """(x Wᵀ + b, ẋ Wᵀ): primal differentiable w.r.t. x, W, b; tangent detached. tx=None → tangent None."""
    check_tensor("x", x, min_rank=1)
    check_tangents([("tx", tx, x)])
    if tx is None:
        return F.linear(x, weight, bias), None
    dtype = autocast_dtype(x.device)
    if dtype is None:
        return apply(_DualLinear, x, tx.detach(), weight, bias)
    # What autocast does to F.linear: the GEMM in its lower precision. The casts stay outside the Function
    # so that autograd returns fp32 gradients to fp32 parameters.
    x, tx, weight, bias = (autocast_cast(a, dtype) for a in (x, tx.detach(), weight, bias))
    with torch.autocast(x.device.type, enabled=False):
        return apply(_DualLinear, x, tx, weight, bias)


# ----------------------------------------------------------------------------------------------
# SiLU
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Timestep embedding
# ----------------------------------------------------------------------------------------------


def _frequencies(dim: int, max_period: float, t: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=_dtype(t), device=t.device) / half)


def _dtype(t):
    """fp32 like DiT (fp64 kept for gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check(t, dim):
    check_tensor("t", t, rank=1)
    if not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an int >= 2, got {dim!r}")


def _pad_odd(parts, dim, like):
    if dim % 2:
        parts.append(torch.zeros_like(like[:, :1]))
    return torch.cat(parts, dim=-1)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """(N,) → (N, dim) embedding [cos, sin] (fp32; fp64 for fp64 input)."""
    _check(t, dim)
    args = t.to(_dtype(t))[:, None] * _frequencies(dim, max_period, t)[None]
    return _pad_odd([torch.cos(args), torch.sin(args)], dim, args)


def timestep_embedding_jvp(t, tt, dim: int, max_period: float = 10000.0):
    """(embedding, its tangent along tt); the primal carries autograd, the tangent is detached."""
    _check(t, dim)
    check_tangents([("tt", tt, t)])
    freqs = _frequencies(dim, max_period, t)[None]
    args = t.to(_dtype(t))[:, None] * freqs
    emb = _pad_odd([torch.cos(args), torch.sin(args)], dim, args)
    if tt is None:
        return emb, None
    with torch.no_grad():
        a = args.detach()
        w_dt = freqs * tt.to(freqs.dtype)[:, None]
        temb = _pad_odd([-torch.sin(a) * w_dt, torch.cos(a) * w_dt], dim, a)
    return emb, temb
