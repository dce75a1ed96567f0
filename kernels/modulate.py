"""adaLN modulate: LayerNorm (no affine) followed by a per-sample scale and shift, with tangent.

    x̂ = (x - μ)/σ  (over C, eps 1e-6),   y = x̂·(1 + s) + b         x: (N, S, C); s, b: (N, C)
    ẏ = ẋ̂·(1 + s) + x̂·ṡ + ḃ,   ẋ̂ = (ẋ - mean(ẋ) - x̂·mean(x̂·ẋ))/σ
    backward: g_x̂ = g·(1 + s),  dx = (g_x̂ - mean(g_x̂) - x̂·mean(g_x̂·x̂))/σ,
              ds = Σ_tokens g·x̂,  db = Σ_tokens g
"""
from __future__ import annotations

import torch

from ._dispatch import check_backend
from ._validate import check_modulation, check_tangents
from .layer_norm import normalize, normalize_tangent


def adaln_modulate_reference(x, shift, scale, eps: float = 1e-6):
    check_modulation(x, "x", shift=shift, scale=scale)
    xhat, _ = normalize(x, eps)
    y = xhat * (1 + scale[:, None].to(xhat.dtype)) + shift[:, None].to(xhat.dtype)
    return y.to(x.dtype)


def modulate_tangent(xhat, rstd, scale, tx, tshift, tscale):
    """ẏ from the saved statistics; any tangent may be None (zero). Runs without a graph."""
    ty = torch.zeros_like(xhat)
    if tx is not None:
        ty = ty + normalize_tangent(xhat, rstd, tx) * (1 + scale[:, None].to(xhat.dtype))
    if tscale is not None:
        ty = ty + xhat * tscale[:, None].to(xhat.dtype)
    if tshift is not None:
        ty = ty + tshift[:, None].to(xhat.dtype)
    return ty


def adaln_modulate_jvp_reference(x, shift, scale, tx, tshift, tscale, eps: float = 1e-6):
    check_modulation(x, "x", shift=shift, scale=scale)
    check_tangents([("tx", tx, x), ("tshift", tshift, shift), ("tscale", tscale, scale)])
    xhat, rstd = normalize(x, eps)
    y = xhat * (1 + scale[:, None].to(xhat.dtype)) + shift[:, None].to(xhat.dtype)
    if tx is None and tshift is None and tscale is None:
        return y.to(x.dtype), None
    with torch.no_grad():
        ty = modulate_tangent(xhat.detach(), rstd.detach(), scale.detach(), tx, tshift, tscale)
    return y.to(x.dtype), ty.to(x.dtype)


def adaln_modulate(x, shift, scale, eps: float = 1e-6, *, backend=None):
    """LayerNorm(x)·(1 + scale) + shift for x (N, S, C), shift/scale (N, C)."""
    check_backend(backend)
    return adaln_modulate_reference(x, shift, scale, eps)


def adaln_modulate_jvp(x, shift, scale, tx, tshift, tscale, eps: float = 1e-6, *, backend=None):
    """(adaln_modulate(x, shift, scale), its tangent); primal differentiable, tangent detached."""
    check_backend(backend)
    return adaln_modulate_jvp_reference(x, shift, scale, tx, tshift, tscale, eps)
