"""The DiT block seam: gated residual, optionally fused with the next LayerNorm + modulate.

    x' = x + a·h                          x, h: (N, S, C); a (gate): (N, C)
    ẋ' = ẋ + ȧ·h + a·ḣ
    y  = LN(x')·(1 + s) + b               (the next sub-block's adaLN modulate; tangent as in modulate.py)

``gated_residual_modulate`` returns both x' (the residual stream) and y (the next sub-block's input).

Kernel design. There is no separate kernel here: the adaLN kernel family of ``modulate.py`` takes the
residual through its ``HAS_RESIDUAL`` flag (and ``HAS_NORM=False`` for the plain gated residual), so
one pass reads x, a, h (and their tangents), writes x' (and ẋ'), and, fused, the LayerNorm statistics,
y and ẏ of the next sub-block: x' is never re-read. Its backward takes the gradients of both outputs
(g_x' from the residual stream, g_y from the next sub-block) in one pass and reduces d_a = Σ dx'·h
per sample next to d_shift, d_scale. The autograd Functions are ``modulate.AdaLNFunction`` /
``AdaLNJVPFunction``.
"""
from __future__ import annotations

import torch

from ._dispatch import use_triton
from ._validate import check_modulation, check_shape, check_tangents
from .modulate import AdaLNFunction, AdaLNJVPFunction, adaln_modulate_jvp_reference, adaln_modulate_reference


def _check(x, gate, h):
    check_modulation(x, "x", gate=gate)
    check_shape("h", h, x.shape)


def _check_triton(x, **others):
    """The kernels store x' and y in x's dtype: the other operands must share it."""
    for name, t in others.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype} on the Triton path, got {t.dtype}")


def _detach(t):
    return None if t is None else t.detach()


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
    _check(x, gate, h)
    if not use_triton(x, gate, h, backend=backend):
        return gated_residual_reference(x, gate, h)
    _check_triton(x, gate=gate, h=h)
    (x_new,) = AdaLNFunction.apply(x, gate, h, None, None, 1e-6, False)
    return x_new


def gated_residual_jvp(x, gate, h, tx, tgate, th, *, backend=None):
    """(x + gate·h, its tangent); primal differentiable, tangent detached (None if all tangents are)."""
    _check(x, gate, h)
    check_tangents([("tx", tx, x), ("tgate", tgate, gate), ("th", th, h)])
    if not use_triton(x, gate, h, tx, tgate, th, backend=backend):
        return gated_residual_jvp_reference(x, gate, h, tx, tgate, th)
    _check_triton(x, gate=gate, h=h, tx=tx, tgate=tgate, th=th)
    if tx is None and tgate is None and th is None:
        return gated_residual(x, gate, h, backend=backend), None
    x_new, tx_new = AdaLNJVPFunction.apply(
        x, gate, h, None, None, _detach(tx), _detach(tgate), _detach(th), None, None, 1e-6, False)
    return x_new, tx_new


def gated_residual_modulate(x, gate, h, shift, scale, eps: float = 1e-6, *, backend=None):
    """(x' = x + gate·h, LN(x')·(1 + scale) + shift)."""
    _check(x, gate, h)
    check_modulation(x, "x", shift=shift, scale=scale)
    if not use_triton(x, gate, h, shift, scale, backend=backend):
        return gated_residual_modulate_reference(x, gate, h, shift, scale, eps)
    _check_triton(x, gate=gate, h=h, shift=shift, scale=scale)
    x_new, y, _, _ = AdaLNFunction.apply(x, gate, h, shift, scale, eps, True)
    return x_new, y


def gated_residual_modulate_jvp(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale,
                                eps: float = 1e-6, *, backend=None):
    """(x', y, ẋ', ẏ) of ``gated_residual_modulate``; primals differentiable, tangents detached."""
    _check(x, gate, h)
    check_modulation(x, "x", shift=shift, scale=scale)
    check_tangents([("tx", tx, x), ("tgate", tgate, gate), ("th", th, h),
                    ("tshift", tshift, shift), ("tscale", tscale, scale)])
    if not use_triton(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, backend=backend):
        return gated_residual_modulate_jvp_reference(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps)
    _check_triton(x, gate=gate, h=h, shift=shift, scale=scale, tx=tx, tgate=tgate, th=th, tshift=tshift,
                  tscale=tscale)
    tangent_x = tx is not None or tgate is not None or th is not None
    tangent_y = tangent_x or tshift is not None or tscale is not None
    if not tangent_y:
        return (*gated_residual_modulate(x, gate, h, shift, scale, eps, backend=backend), None, None)
    x_new, y, _, _, *tangents = AdaLNJVPFunction.apply(
        x, gate, h, shift, scale, *map(_detach, (tx, tgate, th, tshift, tscale)), eps, True)
    tx_new = tangents.pop(0) if tangent_x else None
    return x_new, y, tx_new, tangents[0]
