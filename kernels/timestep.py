"""Sinusoidal timestep embedding (GLIDE / DiT), with forward tangent.

    ω_k = exp(-ln(max_period)·k/half),  k = 0..half-1,   emb(t) = [cos(ω t), sin(ω t)]  (zero-padded if dim is odd)
    d emb/dt · ṫ = [-ω sin(ω t)·ṫ, ω cos(ω t)·ṫ]

``t`` is used raw: DiT passes DDPM steps in [0, 1000), SiT/REPA and FreeFlow's δ/γ embedders pass values in [0, 1].
"""
from __future__ import annotations

import math

import torch

from ._validate import check_tangents, check_tensor


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
