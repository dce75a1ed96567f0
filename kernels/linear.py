"""Linear layer with forward tangent, primal and tangent rows in one GEMM.

    y = x Wᵀ + b,   ẏ = ẋ Wᵀ          (the weights carry no tangent: tangents are w.r.t. inputs)

``linear_jvp`` stacks the M primal rows and the M tangent rows into one (2M, K) operand so that both
go through a single GEMM (one launch, W read once). Backward runs through the primal rows only:
the tangent is a stop-gradient quantity, so dW = gᵀx and dx = gW never touch the tangent half.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_tangents, check_tensor


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
    return _DualLinear.apply(x, tx.detach(), weight, bias)
