"""One adaLN-Zero DiT block on the fused ops: the schedule ``freeflow.models`` and ``patch_dit`` both run.

The official block (facebookresearch/DiT ``models.py``; SiT and REPA share it)::

    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaLN_modulation(c).chunk(6)
    x = x + gate_msa·attn(modulate(norm1(x), shift_msa, scale_msa))
    x = x + gate_mlp·mlp(modulate(norm2(x), shift_mlp, scale_mlp))

Every residual add is a seam whose output the next LayerNorm + modulate reads, so one kernel does both
(``gated_residual_modulate``), across block boundaries too::

    y     = LN(x)·(1 + scale_msa) + shift_msa                           first block only
    x, y  = seam(x, gate_msa, attn(y), shift_mlp, scale_mlp)
    x, y  = seam(x, gate_mlp, mlp(y), next shift, next scale)           next block's msa pair, or the final layer's

L blocks and the final layer thus take 2L + 1 adaLN launches instead of 4L + 1. ``block_jvp`` is one block of
that chain with forward tangents alongside (None = zero: then the tangent-free op runs); ``block_forward`` is
the official call ``block(x, c)``, whose last seam has no norm after it. Attention and MLP come in as
callables ``(h, ḣ) → (out, out tangent)``, so the same schedule runs ``freeflow.models``' modules and the timm
modules of an official model patched by ``patch_dit``.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .adaln import (
    adaln_modulate,
    adaln_modulate_jvp,
    gated_residual,
    gated_residual_jvp,
    gated_residual_modulate,
    gated_residual_modulate_jvp,
)


class Modulation(NamedTuple):
    """adaLN-Zero's six per-sample vectors (N, C), in the order ``adaLN_modulation`` emits them."""
    shift_msa: Tensor | None
    scale_msa: Tensor | None
    gate_msa: Tensor | None
    shift_mlp: Tensor | None
    scale_mlp: Tensor | None
    gate_mlp: Tensor | None


def chunks(t, n):
    """``t.chunk(n, dim=1)``, or n Nones for an absent (zero) tangent."""
    return (None,) * n if t is None else t.chunk(n, dim=1)


def modulation(m, tm=None) -> tuple[Modulation, Modulation]:
    """An adaLN output (N, 6C) and its tangent → their named chunks (tangent chunks are None without one)."""
    return Modulation(*m.chunk(6, dim=1)), Modulation(*chunks(tm, 6))


def modulate(x, tx, shift, scale, tshift, tscale, eps=1e-6, *, backend=None):
    """LN(x)·(1 + scale) + shift and its tangent → (y, ẏ)."""
    if tx is None and tshift is None and tscale is None:
        return adaln_modulate(x, shift, scale, eps, backend=backend), None
    return adaln_modulate_jvp(x, shift, scale, tx, tshift, tscale, eps, backend=backend)


def seam(x, tx, gate, h, tgate, th, shift=None, scale=None, tshift=None, tscale=None, eps=1e-6, *, backend=None):
    """x' = x + gate·h, then y = LN(x')·(1 + scale) + shift unless ``shift`` is None → (x', y, ẋ', ẏ)."""
    plain = tx is None and tgate is None and th is None
    if shift is None:
        if plain:
            return gated_residual(x, gate, h, backend=backend), None, None, None
        x, tx = gated_residual_jvp(x, gate, h, tx, tgate, th, backend=backend)
        return x, None, tx, None
    if plain and tshift is None and tscale is None:
        return (*gated_residual_modulate(x, gate, h, shift, scale, eps, backend=backend), None, None)
    return gated_residual_modulate_jvp(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps,
                                       backend=backend)


def block_jvp(attn, mlp, x, y, tx, ty, mod: Modulation, tmod: Modulation, next_shift=None, next_scale=None,
              tnext_shift=None, tnext_scale=None, *, eps=1e-6, backend=None):
    """One block from the residual stream ``x`` and its modulated input ``y`` (with tangents) → (x', y', ẋ', ẏ'),
    y' being x' through the next LayerNorm + modulate (None when ``next_shift`` is None)."""
    a, ta = attn(y, ty)
    x, y, tx, ty = seam(x, tx, mod.gate_msa, a, tmod.gate_msa, ta, mod.shift_mlp, mod.scale_mlp,
                        tmod.shift_mlp, tmod.scale_mlp, eps, backend=backend)
    f, tf = mlp(y, ty)
    return seam(x, tx, mod.gate_mlp, f, tmod.gate_mlp, tf, next_shift, next_scale, tnext_shift, tnext_scale, eps,
                backend=backend)


def block_forward(block, x, c, attn, mlp, *, backend=None):
    """The official call ``block(x, c)`` (x (N, T, C), c (N, C)) of a module with ``adaLN_modulation``,
    ``norm1`` and ``norm2``."""
    # Under autocast the residual stays fp32 (the fp32 pos_embed promotes it) while the adaLN linear gives bf16;
    # the official `x + gate * h` promotes to x's dtype, and so do the ops here.
    mod, tmod = modulation(block.adaLN_modulation(c).to(x.dtype))
    y, _ = modulate(x, None, mod.shift_msa, mod.scale_msa, None, None, block.norm1.eps, backend=backend)
    return block_jvp(attn, mlp, x, y, None, None, mod, tmod, eps=block.norm2.eps, backend=backend)[0]


def final_layer_forward(final, x, c, *, backend=None):
    """The official call ``final_layer(x, c)``: LN + modulate, then the linear patch decoder."""
    shift, scale = final.adaLN_modulation(c).to(x.dtype).chunk(2, dim=1)
    return final.linear(adaln_modulate(x, shift, scale, final.norm_final.eps, backend=backend))
