"""Scaled dot-product attention with a forward tangent (the JVP flash attention's reference).

    s = scale·Q Kᵀ,  P = softmax(s),  O = P V                      q, k, v: (B, H, S, Dh)
    ṡ = scale·(Q̇ Kᵀ + Q K̇ᵀ),   Ṗ = P ⊙ (ṡ - rowsum(P ⊙ ṡ))
    Ȯ = Ṗ V + P V̇ = Σ_j p_j ṡ_j v_j - (Σ_j p_j ṡ_j)·O + Σ_j p_j v̇_j

The reference materialises P (B·H·S² values) and computes in fp32 for fp16/bf16 inputs. It is
written with plain tensor ops so autograd and forward-mode AD (``torch.func.jvp``) go through it;
SDPA's CPU kernels have no forward-AD formula.
"""
from __future__ import annotations

import torch

from ._dispatch import check_backend
from ._validate import accumulation_dtype, check_tangents, check_tensor


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, rank=4)
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"k must have shape ({b}, {h}, S_k, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape ({b}, {h}, {k.shape[2]}, Dv) to match k {tuple(k.shape)}, got {tuple(v.shape)}")


def default_scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _probs(q, k, scale):
    acc = accumulation_dtype(q)
    return torch.softmax(scale * (q.to(acc) @ k.to(acc).transpose(-1, -2)), dim=-1)


def attention_reference(q, k, v, scale=None):
    _check(q, k, v)
    scale = default_scale(q, scale)
    p = _probs(q, k, scale)
    return (p @ v.to(p.dtype)).to(q.dtype)


def attention_jvp_reference(q, k, v, tq, tk, tv, scale=None):
    """(O, Ȯ): O differentiable w.r.t. q, k, v; Ȯ detached. Any tangent may be None (zero)."""
    _check(q, k, v)
    check_tangents([("tq", tq, q), ("tk", tk, k), ("tv", tv, v)])
    scale = default_scale(q, scale)
    p = _probs(q, k, scale)
    o = p @ v.to(p.dtype)
    if tq is None and tk is None and tv is None:
        return o.to(q.dtype), None
    with torch.no_grad():
        acc, pd = p.dtype, p.detach()
        to = torch.zeros_like(o)
        if tq is not None or tk is not None:
            ds = torch.zeros_like(pd)
            if tq is not None:
                ds += tq.to(acc) @ k.detach().to(acc).transpose(-1, -2)
            if tk is not None:
                ds += q.detach().to(acc) @ tk.to(acc).transpose(-1, -2)
            ds *= scale
            dp = pd * (ds - (pd * ds).sum(-1, keepdim=True))
            to += dp @ v.detach().to(acc)
        if tv is not None:
            to += pd @ tv.to(acc)
    return o.to(q.dtype), to.to(q.dtype)


def attention(q, k, v, scale=None, *, backend=None):
    """Drop-in for ``F.scaled_dot_product_attention(q, k, v, scale=scale)`` (no mask, no dropout)."""
    check_backend(backend)
    return attention_reference(q, k, v, scale)


def attention_jvp(q, k, v, tq, tk, tv, scale=None, *, backend=None):
    """One pass computing (O, Ȯ); ``o`` differentiable w.r.t. q, k, v, ``o_tangent`` detached."""
    check_backend(backend)
    return attention_jvp_reference(q, k, v, tq, tk, tv, scale)
