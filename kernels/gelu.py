"""GELU (tanh approximation) and bias + GELU, with forward tangent.

    g(h) = ½·h·(1 + T),   T = tanh(c·(h + 0.044715·h³)),   c = √(2/π)
    g'(h) = ½·(1 + T) + ½·h·(1 - T²)·c·(1 + 3·0.044715·h²)
    bias_gelu(h, b) = g(h + b),   tangent g'(h + b)·ḣ   (b is a parameter: no tangent)

In a DiT MLP, ``fc1``'s GEMM runs without its bias and ``bias_gelu`` adds it, so the bias add, the
activation and (on the JVP path) its derivative are one elementwise pass.

Kernel design. ``_bias_gelu_fwd_kernel`` tiles the (M, C) rows, computes a = h + b, g(a) and (behind
the tangent flags) g'(a)·(ḣ + ḃ) in fp32 from one read of h; tanh is formed from ``exp2`` (no
libdevice, so it runs in the interpreter too). The backward kernel recomputes g'(a) from the saved
pre-activation h (nothing else is saved: 0 extra bytes) and reduces d_bias over rows into per-chunk
fp32 partials (no atomics), finished by one torch sum. Autograd: ``BiasGELUFunction`` (primal; its
``jvp`` rule launches the tangent-only variant) and ``BiasGELUJVPFunction`` (both in one launch); under
``torch.compile`` the custom ops ``freeflow::bias_gelu`` / ``freeflow::bias_gelu_jvp`` (``_library``) instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import autocast_inputs, use_triton
from ._launch import (
    LOG2E,
    apply,
    elementwise_tiles,
    kernel_rule,
    last_dim_contiguous,
    reduction_chunks,
    saved,
    tl,
    triton,
)
from ._library import absent, define_op, input_grads, use_library_op
from ._validate import accumulation_dtype, check_same_dtype, check_tangents, check_tensor

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
    return _bias_gelu_reference(h, bias)


def _bias_gelu_reference(h, bias):
    return F.gelu(h if bias is None else h + bias, approximate="tanh")


def bias_gelu_jvp_reference(h, bias, th):
    """(GELU(h + bias), its tangent along th); primal differentiable, tangent detached."""
    check_tensor("h", h, min_rank=1)
    _check_bias(h, bias)
    check_tangents([("th", th, h)])
    return _bias_gelu_jvp_reference(h, bias, th)


def _bias_gelu_jvp_reference(h, bias, th):
    a = h if bias is None else h + bias
    y = F.gelu(a, approximate="tanh")
    if th is None:
        return y, None
    with torch.no_grad():
        af = a.detach().to(accumulation_dtype(a))
        ty = (gelu_tanh_derivative(af) * th.to(af.dtype)).to(h.dtype)
    return y, ty


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gelu_tanh_and_derivative(a):
    """(g(a), g'(a)) in fp32, tanh formed from exp2 (no libdevice in the interpreter)."""
    u = 0.7978845608028654 * (a + 0.044715 * a * a * a)  # c·(a + 0.044715·a³), c = √(2/π)
    u = tl.minimum(tl.maximum(u, -15.0), 15.0)  # tanh(±15) is ±1 in fp32; keeps e^{2u} finite
    T = 1.0 - 2.0 / (tl.exp2(u * (2.0 * LOG2E)) + 1.0)  # tanh(u) = 1 - 2/(e^{2u} + 1), 2·log2(e)
    g = 0.5 * a * (1.0 + T)
    dg = 0.5 * (1.0 + T) + 0.5 * a * (1.0 - T * T) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
    return g, dg


@triton.jit
def _bias_gelu_fwd_kernel(
    H, Bias, TH, TBias,          # h (M, C), bias (C,), tangents ḣ (M, C), ḃ (C,)
    Y, TY,                       # g(h + b), g'(h + b)·(ḣ + ḃ)   (contiguous (M, C))
    M, C, stride_hm, stride_thm,
    HAS_BIAS: tl.constexpr, STORE_Y: tl.constexpr, HAS_TH: tl.constexpr, HAS_TBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < M)[:, None] & col_ok[None, :]
    a = tl.load(H + rows[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    g, dg = _gelu_tanh_and_derivative(a)
    out = rows[:, None] * C + cols[None, :]
    if STORE_Y:
        tl.store(Y + out, g.to(Y.dtype.element_ty), mask=mask)
    if HAS_TH or HAS_TBIAS:
        t = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        if HAS_TH:
            t += tl.load(TH + rows[:, None] * stride_thm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_TBIAS:
            t += tl.load(TBias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(TY + out, (dg * t).to(TY.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY, H, Bias,                 # g_y (M, C), saved h, bias
    DH, DBias,                   # dh = g_y·g'(h + b) (contiguous); per-chunk partial Σ_rows dh (chunks, C) fp32
    M, C, stride_dym, stride_hm, rows_per_chunk,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    start = chunk * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, M)
    if HAS_BIAS:
        b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    d_bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & col_ok[None, :]
        a = tl.load(H + rows[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            a += b
        _, dg = _gelu_tanh_and_derivative(a)
        g = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = tl.where(mask, g * dg, 0.0)
        tl.store(DH + rows[:, None] * C + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
        d_bias += tl.sum(dh, axis=0)
    if HAS_BIAS:
        tl.store(DBias + chunk * C + cols, d_bias, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------


def _rows(t, C):
    """(M, C) view of a (..., C) tensor with a unit-stride last dim."""
    return None if t is None else last_dim_contiguous(t.reshape(-1, C))


def bias_gelu_forward(h, bias=None, th=None, tbias=None, *, store_y=True):
    """Launch the fused forward: (y or None, ẏ or None), shaped like h."""
    C = h.shape[-1]
    h2, th2 = _rows(h, C), _rows(th, C)
    M = h2.shape[0]
    tangent = th is not None or tbias is not None
    # empty_like / new_empty cost 1-2 µs less per allocation than torch.empty(shape, device=, dtype=).
    y = torch.empty_like(h2, memory_format=torch.contiguous_format) if store_y else None
    ty = torch.empty_like(h2, memory_format=torch.contiguous_format) if tangent else None
    BLOCK_M, BLOCK_C, num_warps = elementwise_tiles(M, C)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(C, BLOCK_C))
    _bias_gelu_fwd_kernel[grid](
        h2, bias, th2, tbias, y, ty, M, C, h2.stride(0), th2.stride(0) if th2 is not None else 0,
        HAS_BIAS=bias is not None, STORE_Y=store_y, HAS_TH=th is not None, HAS_TBIAS=tbias is not None,
        BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    shape = h.shape
    return None if y is None else y.view(shape), None if ty is None else ty.view(shape)


def bias_gelu_backward(dy, h, bias=None):
    """(dh, dbias or None) of y = g(h + bias)."""
    C = h.shape[-1]
    dy2, h2 = _rows(dy, C), _rows(h, C)
    M = h2.shape[0]
    BLOCK_M, BLOCK_C, num_warps = elementwise_tiles(M, C)
    col_blocks = triton.cdiv(C, BLOCK_C)
    chunks, rows = reduction_chunks(col_blocks, M, BLOCK_M, h.device)
    dh = torch.empty_like(h2, memory_format=torch.contiguous_format)
    d_bias = h2.new_empty((chunks, C), dtype=torch.float32) if bias is not None else None
    _bias_gelu_bwd_kernel[(chunks, col_blocks)](
        dy2, h2, bias, dh, d_bias, M, C, dy2.stride(0), h2.stride(0), rows,
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return dh.view(h.shape), None if bias is None else d_bias.sum(0).to(bias.dtype)


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------


class BiasGELUFunction(torch.autograd.Function):
    """y = g(h + bias); ``jvp`` runs the tangent kernel (ẏ = g'(h + b)·(ḣ + ḃ)) without rewriting y."""

    @staticmethod
    def forward(h, bias):
        return bias_gelu_forward(h, bias)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    @kernel_rule
    def backward(ctx, dy):
        return _backward(ctx, dy)

    @staticmethod
    @kernel_rule
    def jvp(ctx, th, tbias):
        h, bias = saved(ctx)
        ty = bias_gelu_forward(h, bias, th, tbias if bias is not None else None, store_y=False)[1]
        return torch.zeros_like(h) if ty is None else ty


class BiasGELUJVPFunction(torch.autograd.Function):
    """(y, ẏ) in one launch; ẏ is a non-differentiable output."""

    @staticmethod
    def forward(h, bias, th):
        return bias_gelu_forward(h, bias, th)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # ẏ gets no gradient: no zero-fill launch for it

    @staticmethod
    @kernel_rule
    def backward(ctx, dy, _dty):
        return _backward(ctx, dy) + (None,)


def _backward(ctx, dy):
    if dy is None:
        return None, None
    h, bias = saved(ctx)
    dh, d_bias = bias_gelu_backward(dy, h, bias)
    return dh if ctx.needs_input_grad[0] else None, d_bias if ctx.needs_input_grad[1] else None


# ----------------------------------------------------------------------------------------------
# torch.library ops (``_library``): what torch.compile traces; the public ops call them while compiling.
# ----------------------------------------------------------------------------------------------


def _fresh(h):
    """A fake of a launch wrapper's output shaped like ``h``: the wrappers allocate contiguous outputs."""
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _bias_gelu_impl(h, bias):
    return bias_gelu_forward(h, bias)[0]


def _bias_gelu_fake(h, bias):
    return _fresh(h)


def _bias_gelu_jvp_impl(h, bias, th):
    return bias_gelu_forward(h, bias, th)


def _bias_gelu_jvp_fake(h, bias, th):
    return _fresh(h), _fresh(h)


def _bias_gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])  # h, bias
    if isinstance(output, tuple):
        ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _bias_gelu_grads(ctx, dy, *_):
    if dy is None:
        return input_grads(ctx)
    h, bias = ctx.saved_tensors
    dh, d_bias = _bias_gelu_backward_op(dy, h, bias)
    return input_grads(ctx, dh, None if bias is None else d_bias)


def _bias_gelu_backward_impl(dy, h, bias):
    dh, d_bias = bias_gelu_backward(dy, h, bias)
    return dh, absent(h) if d_bias is None else d_bias


def _bias_gelu_backward_fake(dy, h, bias):
    return _fresh(h), absent(h) if bias is None else bias.new_empty(bias.shape)


_bias_gelu_backward_op = define_op(
    "bias_gelu_backward", "(Tensor dy, Tensor h, Tensor? bias) -> (Tensor, Tensor)",
    _bias_gelu_backward_impl, _bias_gelu_backward_fake)
_bias_gelu_op = define_op(
    "bias_gelu", "(Tensor h, Tensor? bias) -> Tensor",
    _bias_gelu_impl, _bias_gelu_fake, backward=_bias_gelu_grads, setup_context=_bias_gelu_setup)
_bias_gelu_jvp_op = define_op(
    "bias_gelu_jvp", "(Tensor h, Tensor? bias, Tensor th) -> (Tensor, Tensor)",
    _bias_gelu_jvp_impl, _bias_gelu_jvp_fake, backward=_bias_gelu_grads, setup_context=_bias_gelu_setup)


def _autocast_bias_add(h, bias, th=None):
    """Under autocast, h + bias is the bias add of the Linear before it, so h, bias (and ḣ) take the
    autocast dtype as ``F.linear(x, W, bias)`` would; without a bias the op is elementwise and keeps h's dtype."""
    if bias is None:
        return h, bias, th
    return autocast_inputs(h.device, h, bias, th)


def bias_gelu(h, bias=None, *, backend=None):
    """GELU(tanh)(h + bias) for h (..., C), bias (C,) or None. Autocast: see ``_autocast_bias_add``."""
    check_tensor("h", h, min_rank=1)
    _check_bias(h, bias)
    h, bias, _ = _autocast_bias_add(h, bias)
    if not use_triton(h, bias, backend=backend):
        return _bias_gelu_reference(h, bias)
    # The kernel writes y in h's dtype; a bias of another dtype would change the result dtype.
    check_same_dtype(h, "h", (("bias", bias),))
    if use_library_op():
        return _bias_gelu_op(h, bias)
    return apply(BiasGELUFunction, h, bias)


def bias_gelu_jvp(h, bias, th, *, backend=None):
    """(bias_gelu(h, bias), its tangent along th); primal differentiable, tangent detached."""
    check_tensor("h", h, min_rank=1)
    _check_bias(h, bias)
    check_tangents([("th", th, h)])
    h, bias, th = _autocast_bias_add(h, bias, th)
    if not use_triton(h, bias, th, backend=backend):
        return _bias_gelu_jvp_reference(h, bias, th)
    check_same_dtype(h, "h", (("bias", bias),))
    if th is None:
        return (_bias_gelu_op(h, bias) if use_library_op() else apply(BiasGELUFunction, h, bias)), None
    if use_library_op():
        y, ty = _bias_gelu_jvp_op(h, bias, th)
        return y, ty
    return apply(BiasGELUJVPFunction, h, bias, th.detach())
