"""The DiT block seam: gated residual, optionally fused with the next LayerNorm + modulate.

    x' = x + a·h                          x, h: (N, S, C); a (gate): (N, C)
    ẋ' = ẋ + ȧ·h + a·ḣ
    y  = LN(x')·(1 + s) + b               (the next sub-block's adaLN modulate; tangent as in modulate.py)

``gated_residual_modulate`` returns both x' (the residual stream) and y (the next sub-block's input).
"""
from __future__ import annotations

import torch

from ._dispatch import check_backend
from ._validate import check_modulation, check_shape, check_tangents
from .modulate import adaln_modulate_jvp_reference, adaln_modulate_reference


def _check(x, gate, h):
    check_modulation(x, "x", gate=gate)
    check_shape("h", h, x.shape)


def residual_tangent(gate, h, tx, tgate, th):
    """ẋ' = ẋ + ȧ·h + a·ḣ with None meaning zero; None if all tangents are None."""
    terms = []
    if tx is not None:
        terms.append(tx)
    if tgate is not None:
        terms.append(tgate[:, None] * h)
    if th is not None:
        terms.append(gate[:, None] * th)
    if not terms:
        return None
    return sum(terms[1:], terms[0])


def gated_residual_reference(x, gate, h):
    _check(x, gate, h)
    return x + gate[:, None] * h


def gated_residual_jvp_reference(x, gate, h, tx, tgate, th):
    _check(x, gate, h)
    check_tangents([("tx", tx, x), ("tgate", tgate, gate), ("th", th, h)])
    out = x + gate[:, None] * h
    with torch.no_grad():
        tout = residual_tangent(gate.detach(), h.detach(), tx, tgate, th)
    return out, tout


def gated_residual_modulate_reference(x, gate, h, shift, scale, eps: float = 1e-6):
    x_new = gated_residual_reference(x, gate, h)
    return x_new, adaln_modulate_reference(x_new, shift, scale, eps)


def gated_residual_modulate_jvp_reference(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale,
                                          eps: float = 1e-6):
    """Returns (x', y, ẋ', ẏ)."""
    x_new, tx_new = gated_residual_jvp_reference(x, gate, h, tx, tgate, th)
    y, ty = adaln_modulate_jvp_reference(x_new, shift, scale, tx_new, tshift, tscale, eps)
    return x_new, y, tx_new, ty


def gated_residual(x, gate, h, *, backend=None):
    """x + gate·h for x, h (N, S, C) and gate (N, C)."""
    check_backend(backend)
    return gated_residual_reference(x, gate, h)


def gated_residual_jvp(x, gate, h, tx, tgate, th, *, backend=None):
    check_backend(backend)
    return gated_residual_jvp_reference(x, gate, h, tx, tgate, th)


def gated_residual_modulate(x, gate, h, shift, scale, eps: float = 1e-6, *, backend=None):
    """(x' = x + gate·h, LN(x')·(1 + scale) + shift)."""
    check_backend(backend)
    return gated_residual_modulate_reference(x, gate, h, shift, scale, eps)


def gated_residual_modulate_jvp(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale,
                                eps: float = 1e-6, *, backend=None):
    """(x', y, ẋ', ẏ) of ``gated_residual_modulate``; primals differentiable, tangents detached."""
    check_backend(backend)
    return gated_residual_modulate_jvp_reference(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps)
