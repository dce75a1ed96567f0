"""The adaLN family of a DiT block: modulate, gated residual, and the fused seam, with tangents.

adaLN modulate, LayerNorm (no affine) followed by a per-sample scale and shift::

    x̂ = (x - μ)/σ  (over C, eps 1e-6),   y = x̂·(1 + s) + b         x: (N, S, C); s, b: (N, C)
    ẏ = ẋ̂·(1 + s) + x̂·ṡ + ḃ,   ẋ̂ = (ẋ - mean(ẋ) - x̂·mean(x̂·ẋ))/σ
    backward: g_x̂ = g·(1 + s),  dx = (g_x̂ - mean(g_x̂) - x̂·mean(g_x̂·x̂))/σ,
              ds = Σ_tokens g·x̂,  db = Σ_tokens g

The block seam, gated residual optionally fused with the next LayerNorm + modulate::

    x' = x + a·h                          x, h: (N, S, C); a (gate): (N, C)
    ẋ' = ẋ + ȧ·h + a·ḣ
    y  = LN(x')·(1 + s) + b               (``gated_residual_modulate`` returns x' and y)

Kernel design. One forward kernel (``_adaln_fwd_kernel``) serves modulate, the gated residual and the
fused gated-residual + modulate seam through constexpr flags:
``HAS_RESIDUAL`` first forms x' = x + a·h (rounded to the storage dtype, so the statistics see the
same x' the unfused ops and the backward see) and stores it; ``HAS_NORM`` normalises and modulates;
the tangent flags (``HAS_TX``, ``HAS_TGATE``, ``HAS_TH``, ``HAS_TSHIFT``, ``HAS_TSCALE``) add the
forward tangents in the same pass, skipping the terms whose tangent is zero. A program owns BLOCK_S
whole rows of one sample (the row must be on chip for μ, σ), computes in fp32 and saves μ and 1/σ
per row (8 bytes/token) for the backward. The backward kernel (``_adaln_bwd_kernel``) recomputes x̂
from the saved x' and statistics; a program owns a chunk of one sample's tokens and writes its
partial Σ g·x̂, Σ g (and Σ dx'·h for the gate) to its own row of a fp32 buffer, which one torch sum
finishes: no atomics, deterministic. Fused, one pass reads x, a, h (and their tangents) and writes x'
(and ẋ'), the statistics, y and ẏ of the next sub-block: x' is never re-read; the backward takes the
gradients of both outputs (g_x' from the residual stream, g_y from the next sub-block) in one pass and
reduces d_a = Σ dx'·h per sample next to d_shift, d_scale.

Autograd. ``AdaLNFunction`` (primal; its ``jvp`` rule runs the fused kernel, so ``torch.func.jvp``
and ``forward_ad`` work) and ``AdaLNJVPFunction`` (primal and tangents in one launch; tangents are
non-differentiable outputs) share the backward. Both are in ``setup_context`` style. Under
``torch.compile`` (and other tracers) the public ops call the ``freeflow::`` custom ops defined below instead
(``_library``: Dynamo cannot trace a Function with ``jvp``); they run the same launch wrappers.
"""
from __future__ import annotations

import torch

from ._dispatch import use_triton
from ._launch import apply, kernel_rule, last_dim_contiguous, reduction_chunks, row_tiles, saved, tl, triton
from ._library import absent, define_op, input_grads, use_library_op
from ._validate import (
    check_modulation,
    check_same_dtype,
    check_shape,
    check_tangents,
    check_tensor,
    detached,
    zeros_if_none,
)
from .tangent_ops import normalize, normalize_tangent


def adaln_modulate_reference(x, shift, scale, eps: float = 1e-6):
    check_modulation(x, "x", shift=shift, scale=scale)
    return _modulate_reference(x, shift, scale, eps)


def _modulate_reference(x, shift, scale, eps):
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
    return _modulate_jvp_reference(x, shift, scale, tx, tshift, tscale, eps)


def _modulate_jvp_reference(x, shift, scale, tx, tshift, tscale, eps):
    xhat, rstd = normalize(x, eps)
    y = xhat * (1 + scale[:, None].to(xhat.dtype)) + shift[:, None].to(xhat.dtype)
    if tx is None and tshift is None and tscale is None:
        return y.to(x.dtype), None
    with torch.no_grad():
        ty = modulate_tangent(xhat.detach(), rstd.detach(), scale.detach(), tx, tshift, tscale)
    return y.to(x.dtype), ty.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _adaln_fwd_kernel(
    X, Gate, H, Shift, Scale,            # primal inputs (Gate, H only with HAS_RESIDUAL)
    XOut, Y, Mean, Rstd,                 # x' (HAS_RESIDUAL), y, μ, 1/σ (HAS_NORM)
    TX, TGate, TH, TShift, TScale,       # input tangents (each behind its HAS_* flag)
    TXOut, TY,                           # ẋ' (HAS_RESIDUAL and TANGENT_X), ẏ (TANGENT_Y)
    stride_xn, stride_xs, stride_hn, stride_hs, stride_txn, stride_txs, stride_thn, stride_ths,
    stride_gate, stride_shift, stride_scale, stride_tgate, stride_tshift, stride_tscale,
    S, C, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr,
    HAS_TX: tl.constexpr, HAS_TGATE: tl.constexpr, HAS_TH: tl.constexpr,
    HAS_TSHIFT: tl.constexpr, HAS_TSCALE: tl.constexpr,
    TANGENT_X: tl.constexpr, TANGENT_Y: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < S)[:, None] & col_ok[None, :]
    out = n * S * C + rows[:, None] * C + cols[None, :]  # outputs are freshly allocated, contiguous

    x = tl.load(X + n * stride_xn + rows[:, None] * stride_xs + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        a = tl.load(Gate + n * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        h = tl.load(H + n * stride_hn + rows[:, None] * stride_hs + cols[None, :], mask=mask, other=0.0)
        h = h.to(tl.float32)
        x_new = (x + a * h).to(XOut.dtype.element_ty)
        tl.store(XOut + out, x_new, mask=mask)
        x = x_new.to(tl.float32)
    if TANGENT_X:
        tx = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        if HAS_TX:
            tx += tl.load(TX + n * stride_txn + rows[:, None] * stride_txs + cols[None, :],
                          mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            if HAS_TGATE:
                ta = tl.load(TGate + n * stride_tgate + cols, mask=col_ok, other=0.0).to(tl.float32)
                tx += ta[None, :] * h
            if HAS_TH:
                th = tl.load(TH + n * stride_thn + rows[:, None] * stride_ths + cols[None, :],
                             mask=mask, other=0.0).to(tl.float32)
                tx += a * th
            tl.store(TXOut + out, tx.to(TXOut.dtype.element_ty), mask=mask)
            # LN's tangent sees ẋ' as stored, like the unfused ops do
            tx = tx.to(TXOut.dtype.element_ty).to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        tl.store(Mean + n * S + rows, mean, mask=rows < S)
        tl.store(Rstd + n * S + rows, rstd, mask=rows < S)
        xhat = xc * rstd[:, None]
        s = tl.load(Scale + n * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        b = tl.load(Shift + n * stride_shift + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + out, (xhat * (1.0 + s) + b).to(Y.dtype.element_ty), mask=mask)
        if TANGENT_Y:
            ty = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
            if TANGENT_X:
                mean_tx = tl.sum(tx, axis=1) / C
                mean_xhat_tx = tl.sum(xhat * tx, axis=1) / C
                txhat = (tx - mean_tx[:, None] - xhat * mean_xhat_tx[:, None]) * rstd[:, None]
                ty += txhat * (1.0 + s)
            if HAS_TSCALE:
                ts = tl.load(TScale + n * stride_tscale + cols, mask=col_ok, other=0.0).to(tl.float32)
                ty += xhat * ts[None, :]
            if HAS_TSHIFT:
                tb = tl.load(TShift + n * stride_tshift + cols, mask=col_ok, other=0.0).to(tl.float32)
                ty += tb[None, :]
            tl.store(TY + out, ty.to(TY.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    DY, DXOut, XN, Mean, Rstd, Scale, Gate, H,   # g_y, g_x' (from the residual stream), saved values
    DX, DH, DShift, DScale, DGate,               # dx, dh; per-chunk partial sums (N, chunks, C) fp32
    stride_dyn, stride_dys, stride_dxon, stride_dxos, stride_xnn, stride_xns, stride_hn, stride_hs,
    stride_scale, stride_gate,
    S, C, chunks, tokens_per_chunk,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, HAS_DXOUT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    start = chunk * tokens_per_chunk
    end = tl.minimum(start + tokens_per_chunk, S)
    d_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    d_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    d_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_NORM:
        s = tl.load(Scale + n * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        a = tl.load(Gate + n * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    for s0 in range(start, end, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        mask = (rows < end)[:, None] & col_ok[None, :]
        out = n * S * C + rows[:, None] * C + cols[None, :]
        dx = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        if HAS_NORM:
            g = tl.load(DY + n * stride_dyn + rows[:, None] * stride_dys + cols[None, :],
                        mask=mask, other=0.0).to(tl.float32)
            x = tl.load(XN + n * stride_xnn + rows[:, None] * stride_xns + cols[None, :],
                        mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + n * S + rows, mask=rows < end, other=0.0)
            rstd = tl.load(Rstd + n * S + rows, mask=rows < end, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            d_scale += tl.sum(g * xhat, axis=0)
            d_shift += tl.sum(g, axis=0)
            g_xhat = g * (1.0 + s)
            mean_g = tl.sum(g_xhat, axis=1) / C
            mean_gx = tl.sum(g_xhat * xhat, axis=1) / C
            dx += (g_xhat - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        if HAS_DXOUT:
            dx += tl.load(DXOut + n * stride_dxon + rows[:, None] * stride_dxos + cols[None, :],
                          mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            tl.store(DX + out, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            h = tl.load(H + n * stride_hn + rows[:, None] * stride_hs + cols[None, :],
                        mask=mask, other=0.0).to(tl.float32)
            tl.store(DH + out, (a * dx).to(DH.dtype.element_ty), mask=mask)
            d_gate += tl.sum(dx * h, axis=0)
    part = (n * chunks + chunk) * C + cols
    if HAS_NORM:
        tl.store(DShift + part, d_shift, mask=col_ok)
        tl.store(DScale + part, d_scale, mask=col_ok)
    if HAS_RESIDUAL:
        tl.store(DGate + part, d_gate, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------


# Tensor.stride() returns the whole tuple for the price of one Tensor.stride(dim).
def _strides2(t):
    """(stride over N, stride over S) of a (N, S, C) tensor, or zeros for an absent one."""
    return t.stride()[:2] if t is not None else (0, 0)


def _stride1(t):
    return t.stride()[0] if t is not None else 0


def adaln_forward(x, shift=None, scale=None, eps=1e-6, gate=None, h=None,
                  tx=None, tgate=None, th=None, tshift=None, tscale=None, *, norm=True):
    """Launch the fused forward. Returns (x', y, μ, 1/σ, ẋ', ẏ); absent parts are None.

    Residual mode when ``gate``/``h`` are given; ``norm=False`` stops after x' = x + a·h. A tangent
    output is produced only when some input tangent it depends on is given.
    """
    residual = h is not None
    x, h, tx, th = (last_dim_contiguous(t) for t in (x, h, tx, th))
    gate, shift, scale, tgate, tshift, tscale = (
        last_dim_contiguous(t) for t in (gate, shift, scale, tgate, tshift, tscale))
    N, S, C = x.shape
    tangent_x = tx is not None or (residual and (tgate is not None or th is not None))
    tangent_y = norm and (tangent_x or tshift is not None or tscale is not None)
    # empty_like / new_empty cost 1-2 µs less per allocation than torch.empty(shape, device=, dtype=).
    x_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual else None
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if norm else None
    mean = x.new_empty((N, S), dtype=torch.float32) if norm else None
    rstd = torch.empty_like(mean) if norm else None
    tx_out = torch.empty_like(x_out) if residual and tangent_x else None
    ty = torch.empty_like(y) if tangent_y else None
    BLOCK_S, BLOCK_C, num_warps = row_tiles(C, S)
    grid = (N, triton.cdiv(S, BLOCK_S))
    _adaln_fwd_kernel[grid](
        x, gate, h, shift, scale,
        x_out, y, mean, rstd,
        tx, tgate, th, tshift, tscale,
        tx_out, ty,
        *_strides2(x), *_strides2(h), *_strides2(tx), *_strides2(th),
        _stride1(gate), _stride1(shift), _stride1(scale), _stride1(tgate), _stride1(tshift), _stride1(tscale),
        S, C, eps,
        HAS_RESIDUAL=residual, HAS_NORM=norm,
        HAS_TX=tx is not None, HAS_TGATE=tgate is not None, HAS_TH=th is not None,
        HAS_TSHIFT=tshift is not None, HAS_TSCALE=tscale is not None,
        TANGENT_X=tangent_x, TANGENT_Y=tangent_y,
        BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    if not residual and tangent_x:
        tx_out = tx  # ẋ' is ẋ when there is no residual: callers never need it, but keep it defined
    return x_out, y, mean, rstd, tx_out, ty


def adaln_backward(dy, dx_out, xn, mean, rstd, scale, gate=None, h=None, *, norm=True):
    """Gradients (dx, dh, d_gate, d_shift, d_scale) of ``adaln_forward``'s primal outputs.

    ``dy``: gradient of y (norm mode); ``dx_out``: gradient reaching x' directly (residual mode);
    ``xn``: the tensor that was normalised (x' or x). Absent results are None.
    """
    residual = h is not None
    ref = dy if dy is not None else dx_out
    N, S, C = ref.shape
    dy, dx_out, xn, h = (last_dim_contiguous(t) for t in (dy, dx_out, xn, h))
    BLOCK_S, BLOCK_C, num_warps = row_tiles(C, S)
    chunks, tokens = reduction_chunks(N, S, BLOCK_S, ref.device)
    # empty_like / new_empty cost 1-2 µs less per allocation than torch.empty(shape, device=, dtype=).
    dx = torch.empty_like(xn, memory_format=torch.contiguous_format) if norm else dx_out
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if residual else None
    d_shift, d_scale, d_gate = (ref.new_empty((N, chunks, C), dtype=torch.float32) if on else None
                                for on in (norm, norm, residual))
    _adaln_bwd_kernel[(N, chunks)](
        dy, dx_out, xn, mean, rstd, scale, gate, h,
        dx, dh, d_shift, d_scale, d_gate,
        *_strides2(dy), *_strides2(dx_out), *_strides2(xn), *_strides2(h),
        _stride1(scale), _stride1(gate),
        S, C, chunks, tokens,
        HAS_RESIDUAL=residual, HAS_NORM=norm, HAS_DXOUT=dx_out is not None,
        BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    d_gate, d_shift, d_scale = (None if part is None else part.sum(1).to(like.dtype)
                                for part, like in ((d_gate, gate), (d_shift, scale), (d_scale, scale)))
    return dx, dh, d_gate, d_shift, d_scale


# ----------------------------------------------------------------------------------------------
# autograd Functions (one pair for the whole family: modulate, gated residual, and both fused)
# ----------------------------------------------------------------------------------------------


def _primal(residual, norm, x_out, y, mean, rstd):
    """The primal outputs of the family's Functions, in order: x' (residual), then y, μ, 1/σ (norm)."""
    return ((x_out,) if residual else ()) + ((y, mean, rstd) if norm else ())


class AdaLNFunction(torch.autograd.Function):
    """Primal outputs (x'?, y?, μ?, 1/σ?) of the family; ``jvp`` runs the fused tangent kernel."""

    @staticmethod
    def forward(x, gate, h, shift, scale, eps, norm):
        x_out, y, mean, rstd, _, _ = adaln_forward(x, shift, scale, eps, gate, h, norm=norm)
        return _primal(h is not None, norm, x_out, y, mean, rstd)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gate, h, shift, scale, eps, norm = inputs
        _save_for_backward(ctx, x, gate, h, scale, eps, norm, output)
        ctx.save_for_forward(x, gate, h, shift, scale)

    @staticmethod
    @kernel_rule
    def backward(ctx, *grads):
        return _backward(ctx, grads) + (None, None)

    @staticmethod
    @kernel_rule
    def jvp(ctx, tx, tgate, th, tshift, tscale, _teps, _tnorm):
        x, gate, h, shift, scale = saved(ctx)
        residual, norm = ctx.residual, ctx.norm
        _, _, _, _, tx_out, ty = adaln_forward(
            x, shift, scale, ctx.eps, gate, h, tx, tgate, th, tshift, tscale, norm=norm)
        return _primal(residual, norm, zeros_if_none(tx_out, x) if residual else None,
                       zeros_if_none(ty, x) if norm else None, None, None)


class AdaLNJVPFunction(torch.autograd.Function):
    """Primal outputs followed by the tangents (ẋ'?, ẏ?) that are not zero by structure; one launch."""

    @staticmethod
    def forward(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps, norm):
        x_out, y, mean, rstd, tx_out, ty = adaln_forward(
            x, shift, scale, eps, gate, h, tx, tgate, th, tshift, tscale, norm=norm)
        residual = h is not None
        out = _primal(residual, norm, x_out, y, mean, rstd)
        if residual and tx_out is not None:
            out += (tx_out,)
        if ty is not None:
            out += (ty,)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps, norm = inputs
        _save_for_backward(ctx, x, gate, h, scale, eps, norm, output)
        ctx.mark_non_differentiable(*output[(h is not None) + 3 * norm:])

    @staticmethod
    @kernel_rule
    def backward(ctx, *grads):
        return _backward(ctx, grads) + (None,) * 7


def _save_for_backward(ctx, x, gate, h, scale, eps, norm, output):
    residual = h is not None
    ctx.residual, ctx.norm, ctx.eps = residual, norm, eps
    if norm:
        # The backward normalises x' (an output when the residual is fused) with the saved statistics.
        xn, mean, rstd = (output[0] if residual else x), output[residual + 1], output[residual + 2]
        ctx.save_for_backward(xn, mean, rstd, scale, gate, h)
        ctx.mark_non_differentiable(mean, rstd)
    else:
        ctx.save_for_backward(None, None, None, scale, gate, h)
    ctx.set_materialize_grads(False)  # unused outputs (stats, tangents) must not cost zero-fill launches


def _backward(ctx, grads):
    """Input gradients (x, gate, h, shift, scale) from the gradients of the outputs (primal ones first)."""
    xn, mean, rstd, scale, gate, h = saved(ctx)
    residual = ctx.residual
    g_x_out = grads[0] if residual else None
    g_y = grads[residual] if ctx.norm else None
    if g_y is None and g_x_out is None:
        return (None,) * 5
    # With y unused only the residual stream carries gradient: run the kernel without its norm part.
    norm = ctx.norm and g_y is not None
    dx, dh, d_gate, d_shift, d_scale = adaln_backward(g_y, g_x_out, xn, mean, rstd, scale, gate, h, norm=norm)
    return tuple(g if need else None for g, need in zip((dx, d_gate, dh, d_shift, d_scale), ctx.needs_input_grad))


# ----------------------------------------------------------------------------------------------
# torch.library ops (``_library``): what torch.compile traces; the public ops call them while compiling.
# Same launch wrappers as the Functions above; the backward ops are split by mode so that every output exists
# (the residual-only backward passes g_x' straight through as dx, which an op may not return).
# ----------------------------------------------------------------------------------------------


def _fresh(x):
    """A fake of a launch wrapper's output shaped like ``x``: the wrappers allocate contiguous outputs."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _stats(x):
    return x.new_empty(x.shape[:2], dtype=torch.float32)


def _per_sample(ref, like):
    """A fake (N, C) reduction of ``ref`` (N, S, C), in ``like``'s dtype (``adaln_backward``'s casts)."""
    return like.new_empty((ref.shape[0], ref.shape[2]))


def _modulate_impl(x, shift, scale, eps):
    _, y, mean, rstd, _, _ = adaln_forward(x, shift, scale, eps)
    return y, mean, rstd


def _modulate_fake(x, shift, scale, eps):
    return _fresh(x), _stats(x), _stats(x)


def _modulate_jvp_impl(x, shift, scale, tx, tshift, tscale, eps):
    _, y, mean, rstd, _, ty = adaln_forward(x, shift, scale, eps, tx=tx, tshift=tshift, tscale=tscale)
    return y, mean, rstd, absent(x) if ty is None else ty


def _modulate_jvp_fake(x, shift, scale, tx, tshift, tscale, eps):
    tangent = tx is not None or tshift is not None or tscale is not None
    return _fresh(x), _stats(x), _stats(x), _fresh(x) if tangent else absent(x)


def _modulate_setup(ctx, inputs, output):
    x, _, scale = inputs[:3]
    _, mean, rstd = output[:3]
    ctx.save_for_backward(x, mean, rstd, scale)
    ctx.mark_non_differentiable(*output[1:])  # μ, 1/σ and (jvp op) the tangent
    ctx.set_materialize_grads(False)  # as in the Functions: unused outputs must not cost zero-fill launches


def _modulate_grads(ctx, dy, *_):
    if dy is None:
        return input_grads(ctx)
    dx, d_shift, d_scale = _modulate_backward_op(dy, *ctx.saved_tensors)
    return input_grads(ctx, dx, d_shift, d_scale)


def _modulate_backward_impl(dy, x, mean, rstd, scale):
    dx, _, _, d_shift, d_scale = adaln_backward(dy, None, x, mean, rstd, scale)
    return dx, d_shift, d_scale


def _modulate_backward_fake(dy, x, mean, rstd, scale):
    return _fresh(x), _per_sample(x, scale), _per_sample(x, scale)


def _residual_impl(x, gate, h):
    return adaln_forward(x, gate=gate, h=h, norm=False)[0]


def _residual_fake(x, gate, h):
    return _fresh(x)


def _residual_jvp_impl(x, gate, h, tx, tgate, th):
    x_out, _, _, _, tx_out, _ = adaln_forward(x, gate=gate, h=h, tx=tx, tgate=tgate, th=th, norm=False)
    return x_out, absent(x) if tx_out is None else tx_out


def _residual_jvp_fake(x, gate, h, tx, tgate, th):
    return _fresh(x), _fresh(x) if tx is not None or tgate is not None or th is not None else absent(x)


def _residual_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:3])  # gate, h
    if isinstance(output, tuple):
        ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _residual_grads(ctx, dx_out, *_):
    if dx_out is None:
        return input_grads(ctx)
    dh, d_gate = _residual_backward_op(dx_out, *ctx.saved_tensors)
    return input_grads(ctx, dx_out, d_gate, dh)


def _residual_backward_impl(dx_out, gate, h):
    _, dh, d_gate, _, _ = adaln_backward(None, dx_out, None, None, None, None, gate, h, norm=False)
    return dh, d_gate


def _residual_backward_fake(dx_out, gate, h):
    return _fresh(h), _per_sample(h, gate)


def _seam_impl(x, gate, h, shift, scale, eps):
    x_out, y, mean, rstd, _, _ = adaln_forward(x, shift, scale, eps, gate, h)
    return x_out, y, mean, rstd


def _seam_fake(x, gate, h, shift, scale, eps):
    return _fresh(x), _fresh(x), _stats(x), _stats(x)


def _seam_jvp_impl(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps):
    x_out, y, mean, rstd, tx_out, ty = adaln_forward(x, shift, scale, eps, gate, h, tx, tgate, th, tshift, tscale)
    return (x_out, y, mean, rstd, absent(x) if tx_out is None else tx_out, absent(x) if ty is None else ty)


def _seam_jvp_fake(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps):
    tangent_x = tx is not None or tgate is not None or th is not None
    tangent_y = tangent_x or tshift is not None or tscale is not None
    return (_fresh(x), _fresh(x), _stats(x), _stats(x), _fresh(x) if tangent_x else absent(x),
            _fresh(x) if tangent_y else absent(x))


def _seam_setup(ctx, inputs, output):
    _, gate, h, _, scale = inputs[:5]
    x_out, _, mean, rstd = output[:4]
    # The backward normalises x' (an output) with the saved statistics.
    ctx.save_for_backward(x_out, mean, rstd, scale, gate, h)
    ctx.mark_non_differentiable(*output[2:])  # μ, 1/σ and (jvp op) the tangents
    ctx.set_materialize_grads(False)


def _seam_grads(ctx, dx_out, dy, *_):
    xn, mean, rstd, scale, gate, h = ctx.saved_tensors
    if dy is None:  # y unused: only the residual stream carries gradient
        if dx_out is None:
            return input_grads(ctx)
        dh, d_gate = _residual_backward_op(dx_out, gate, h)
        return input_grads(ctx, dx_out, d_gate, dh)
    dx, dh, d_gate, d_shift, d_scale = _seam_backward_op(dy, dx_out, xn, mean, rstd, scale, gate, h)
    return input_grads(ctx, dx, d_gate, dh, d_shift, d_scale)


def _seam_backward_impl(dy, dx_out, xn, mean, rstd, scale, gate, h):
    return adaln_backward(dy, dx_out, xn, mean, rstd, scale, gate, h)


def _seam_backward_fake(dy, dx_out, xn, mean, rstd, scale, gate, h):
    return _fresh(xn), _fresh(h), _per_sample(xn, gate), _per_sample(xn, scale), _per_sample(xn, scale)


_modulate_backward_op = define_op(
    "adaln_modulate_backward",
    "(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor scale) -> (Tensor, Tensor, Tensor)",
    _modulate_backward_impl, _modulate_backward_fake)
_modulate_op = define_op(
    "adaln_modulate", "(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)",
    _modulate_impl, _modulate_fake, backward=_modulate_grads, setup_context=_modulate_setup)
_modulate_jvp_op = define_op(
    "adaln_modulate_jvp", "(Tensor x, Tensor shift, Tensor scale, Tensor? tx, Tensor? tshift, Tensor? tscale, "
    "float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    _modulate_jvp_impl, _modulate_jvp_fake, backward=_modulate_grads, setup_context=_modulate_setup)
_residual_backward_op = define_op(
    "gated_residual_backward", "(Tensor dx_out, Tensor gate, Tensor h) -> (Tensor, Tensor)",
    _residual_backward_impl, _residual_backward_fake)
_residual_op = define_op(
    "gated_residual", "(Tensor x, Tensor gate, Tensor h) -> Tensor",
    _residual_impl, _residual_fake, backward=_residual_grads, setup_context=_residual_setup)
_residual_jvp_op = define_op(
    "gated_residual_jvp",
    "(Tensor x, Tensor gate, Tensor h, Tensor? tx, Tensor? tgate, Tensor? th) -> (Tensor, Tensor)",
    _residual_jvp_impl, _residual_jvp_fake, backward=_residual_grads, setup_context=_residual_setup)
_seam_backward_op = define_op(
    "gated_residual_modulate_backward", "(Tensor dy, Tensor? dx_out, Tensor xn, Tensor mean, Tensor rstd, "
    "Tensor scale, Tensor gate, Tensor h) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _seam_backward_impl, _seam_backward_fake)
_seam_op = define_op(
    "gated_residual_modulate", "(Tensor x, Tensor gate, Tensor h, Tensor shift, Tensor scale, float eps) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _seam_impl, _seam_fake, backward=_seam_grads, setup_context=_seam_setup)
_seam_jvp_op = define_op(
    "gated_residual_modulate_jvp", "(Tensor x, Tensor gate, Tensor h, Tensor shift, Tensor scale, Tensor? tx, "
    "Tensor? tgate, Tensor? th, Tensor? tshift, Tensor? tscale, float eps) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _seam_jvp_impl, _seam_jvp_fake, backward=_seam_grads, setup_context=_seam_setup)


# ----------------------------------------------------------------------------------------------
# Public ops. Each validates its arguments once, then dispatches; the private entries below take
# arguments their caller has already checked.
# ----------------------------------------------------------------------------------------------


def _check_modulate(x, shift, scale):
    """x (N, S, C); shift, scale (N, C)."""
    check_tensor("x", x, rank=3)
    rows = (x.shape[0], x.shape[2])
    check_shape("shift", shift, rows)
    check_shape("scale", scale, rows)


def _check_residual(x, gate, h):
    """x, h (N, S, C); gate (N, C). Returns (N, C) for the conditioning tensors that follow."""
    check_tensor("x", x, rank=3)
    rows = (x.shape[0], x.shape[2])
    check_shape("gate", gate, rows)
    check_shape("h", h, x.shape)
    return rows


def _check_seam(x, gate, h, shift, scale):
    rows = _check_residual(x, gate, h)
    check_shape("shift", shift, rows)
    check_shape("scale", scale, rows)


def _modulate_triton(x, shift, scale, eps):
    if use_library_op():
        return _modulate_op(x, shift, scale, eps)[0]
    return apply(AdaLNFunction, x, None, None, shift, scale, eps, True)[0]


def _modulate_jvp_triton(x, shift, scale, tx, tshift, tscale, eps):
    if use_library_op():
        y, _, _, ty = _modulate_jvp_op(x, shift, scale, tx, tshift, tscale, eps)
        return y, ty
    y, _, _, ty = apply(AdaLNJVPFunction, x, None, None, shift, scale, detached(tx), None, None, detached(tshift),
                        detached(tscale), eps, True)
    return y, ty


def adaln_modulate(x, shift, scale, eps: float = 1e-6, *, backend=None):
    """LayerNorm(x)·(1 + scale) + shift for x (N, S, C), shift/scale (N, C)."""
    _check_modulate(x, shift, scale)
    if not use_triton(x, shift, scale, backend=backend):
        return _modulate_reference(x, shift, scale, eps)
    return _modulate_triton(x, shift, scale, eps)


def adaln_modulate_jvp(x, shift, scale, tx, tshift, tscale, eps: float = 1e-6, *, backend=None):
    """(adaln_modulate(x, shift, scale), its tangent); primal differentiable, tangent detached."""
    _check_modulate(x, shift, scale)
    check_tangents([("tx", tx, x), ("tshift", tshift, shift), ("tscale", tscale, scale)])
    if not use_triton(x, shift, scale, tx, tshift, tscale, backend=backend):
        return _modulate_jvp_reference(x, shift, scale, tx, tshift, tscale, eps)
    if tx is None and tshift is None and tscale is None:
        return _modulate_triton(x, shift, scale, eps), None
    return _modulate_jvp_triton(x, shift, scale, tx, tshift, tscale, eps)


# ----------------------------------------------------------------------------------------------
# Gated residual (+ LayerNorm + modulate): the same kernels with HAS_RESIDUAL
# ----------------------------------------------------------------------------------------------


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
    _check_residual(x, gate, h)
    return _residual_reference(x, gate, h)


def _residual_reference(x, gate, h):
    return x + gate[:, None] * h


def gated_residual_jvp_reference(x, gate, h, tx, tgate, th):
    _check_residual(x, gate, h)
    check_tangents([("tx", tx, x), ("tgate", tgate, gate), ("th", th, h)])
    return _residual_jvp_reference(x, gate, h, tx, tgate, th)


def _residual_jvp_reference(x, gate, h, tx, tgate, th):
    out = _residual_reference(x, gate, h)
    with torch.no_grad():
        tout = residual_tangent(gate.detach(), h.detach(), tx, tgate, th)
    return out, tout


def gated_residual_modulate_reference(x, gate, h, shift, scale, eps: float = 1e-6):
    _check_seam(x, gate, h, shift, scale)
    return _seam_reference(x, gate, h, shift, scale, eps)


def _seam_reference(x, gate, h, shift, scale, eps):
    x_new = _residual_reference(x, gate, h)
    return x_new, _modulate_reference(x_new, shift, scale, eps)


def gated_residual_modulate_jvp_reference(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale,
                                          eps: float = 1e-6):
    """Returns (x', y, ẋ', ẏ)."""
    _check_seam(x, gate, h, shift, scale)
    check_tangents([("tx", tx, x), ("tgate", tgate, gate), ("th", th, h),
                    ("tshift", tshift, shift), ("tscale", tscale, scale)])
    return _seam_jvp_reference(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps)


def _seam_jvp_reference(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps):
    x_new, tx_new = _residual_jvp_reference(x, gate, h, tx, tgate, th)
    y, ty = _modulate_jvp_reference(x_new, shift, scale, tx_new, tshift, tscale, eps)
    return x_new, y, tx_new, ty


def _residual_triton(x, gate, h):
    if use_library_op():
        return _residual_op(x, gate, h)
    return apply(AdaLNFunction, x, gate, h, None, None, 1e-6, False)[0]


def _seam_triton(x, gate, h, shift, scale, eps):
    if use_library_op():
        x_new, y, _, _ = _seam_op(x, gate, h, shift, scale, eps)
        return x_new, y
    x_new, y, _, _ = apply(AdaLNFunction, x, gate, h, shift, scale, eps, True)
    return x_new, y


def gated_residual(x, gate, h, *, backend=None):
    """x + gate·h for x, h (N, S, C) and gate (N, C)."""
    _check_residual(x, gate, h)
    if not use_triton(x, gate, h, backend=backend):
        return _residual_reference(x, gate, h)
    check_same_dtype(x, "x", (("gate", gate), ("h", h)))
    return _residual_triton(x, gate, h)


def gated_residual_jvp(x, gate, h, tx, tgate, th, *, backend=None):
    """(x + gate·h, its tangent); primal differentiable, tangent detached (None if all tangents are)."""
    _check_residual(x, gate, h)
    check_tangents([("tx", tx, x), ("tgate", tgate, gate), ("th", th, h)])
    if not use_triton(x, gate, h, tx, tgate, th, backend=backend):
        return _residual_jvp_reference(x, gate, h, tx, tgate, th)
    check_same_dtype(x, "x", (("gate", gate), ("h", h), ("tx", tx), ("tgate", tgate), ("th", th)))
    if tx is None and tgate is None and th is None:
        return _residual_triton(x, gate, h), None
    if use_library_op():
        x_new, tx_new = _residual_jvp_op(x, gate, h, tx, tgate, th)
        return x_new, tx_new
    x_new, tx_new = apply(AdaLNJVPFunction, x, gate, h, None, None, detached(tx), detached(tgate), detached(th),
                          None, None, 1e-6, False)
    return x_new, tx_new


def gated_residual_modulate(x, gate, h, shift, scale, eps: float = 1e-6, *, backend=None):
    """(x' = x + gate·h, LN(x')·(1 + scale) + shift)."""
    _check_seam(x, gate, h, shift, scale)
    if not use_triton(x, gate, h, shift, scale, backend=backend):
        return _seam_reference(x, gate, h, shift, scale, eps)
    check_same_dtype(x, "x", (("gate", gate), ("h", h), ("shift", shift), ("scale", scale)))
    return _seam_triton(x, gate, h, shift, scale, eps)


def gated_residual_modulate_jvp(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale,
                                eps: float = 1e-6, *, backend=None):
    """(x', y, ẋ', ẏ) of ``gated_residual_modulate``; primals differentiable, tangents detached."""
    _check_seam(x, gate, h, shift, scale)
    check_tangents([("tx", tx, x), ("tgate", tgate, gate), ("th", th, h),
                    ("tshift", tshift, shift), ("tscale", tscale, scale)])
    if not use_triton(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, backend=backend):
        return _seam_jvp_reference(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps)
    check_same_dtype(x, "x", (("gate", gate), ("h", h), ("shift", shift), ("scale", scale), ("tx", tx),
                              ("tgate", tgate), ("th", th), ("tshift", tshift), ("tscale", tscale)))
    tangent_x = tx is not None or tgate is not None or th is not None
    if not tangent_x and tshift is None and tscale is None:
        return (*_seam_triton(x, gate, h, shift, scale, eps), None, None)
    if use_library_op():
        x_new, y, _, _, tx_new, ty = _seam_jvp_op(x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, eps)
        return x_new, y, tx_new if tangent_x else None, ty
    x_new, y, _, _, *tangents = apply(AdaLNJVPFunction, x, gate, h, shift, scale, detached(tx), detached(tgate),
                                      detached(th), detached(tshift), detached(tscale), eps, True)
    tx_new = tangents.pop(0) if tangent_x else None
    return x_new, y, tx_new, tangents[0]
