"""Gated residual (+ LayerNorm + modulate): Triton kernel (interpreter) vs reference, torch.func.jvp, autograd."""



import pytest
import torch
import torch.autograd.forward_ad as fwAD
from kernel_checks import fp32_default_dtype, make_check, rel_err  # noqa: F401 (autouse fixture)

import freeflow.kernels as K
from freeflow.kernels.gated_residual import (
    gated_residual_jvp_reference,
    gated_residual_modulate_jvp_reference,
    gated_residual_modulate_reference,
    gated_residual_reference,
)

T = "triton"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
check = make_check(TOL)
SHAPES = [(2, 1, 64), (2, 49, 72), (2, 257, 40)]


def inputs(N, S, C, dtype, seed=0):
    """(x, gate, h, shift, scale) and tangents; x, h non-contiguous, gate/shift/scale chunks of one projection."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    x = rnd(S, N, C).to(dtype).transpose(0, 1)
    h = rnd(N, S, 2 * C).to(dtype)[..., C:]
    gate, shift, scale = (0.5 * rnd(N, 3 * C)).to(dtype).chunk(3, dim=1)
    tangents = [rnd(N, S, C).to(dtype), rnd(N, C).to(dtype), rnd(N, S, C).to(dtype),
                rnd(N, C).to(dtype), rnd(N, C).to(dtype)]
    return [x, gate, h, shift, scale], tangents


def leaves(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_modulate_forward_backward(shape, dtype):
    primals, _ = inputs(*shape, dtype)
    mine, ref = leaves(primals), leaves(primals)
    x_new, y = K.gated_residual_modulate(*mine, backend=T)
    x_ref, y_ref = gated_residual_modulate_reference(*ref)
    check(x_new, x_ref, dtype, "x'")
    check(y, y_ref, dtype, "y")
    g = torch.Generator().manual_seed(7)
    gx, gy = (torch.randn(x_new.shape, generator=g).to(dtype) for _ in range(2))
    grads = torch.autograd.grad((x_new, y), mine, (gx, gy))
    grads_ref = torch.autograd.grad((x_ref, y_ref), ref, (gx, gy))
    for name, a, b in zip(("dx", "dgate", "dh", "dshift", "dscale"), grads, grads_ref):
        check(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_modulate_fused_jvp(shape, dtype):
    primals, tangents = inputs(*shape, dtype, seed=1)
    out = K.gated_residual_modulate_jvp(*primals, *tangents, backend=T)
    out_ref = gated_residual_modulate_jvp_reference(*primals, *tangents)
    for name, a, b in zip(("x'", "y", "tx'", "ty"), out, out_ref):
        check(a, b, dtype, name)
    if dtype == torch.float32:
        _, (tx_func, ty_func) = torch.func.jvp(gated_residual_modulate_reference, tuple(primals), tuple(tangents))
        check(out[2], tx_func, dtype, "tx' vs torch.func.jvp")
        check(out[3], ty_func, dtype, "ty vs torch.func.jvp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_alone(dtype):
    primals, tangents = inputs(2, 49, 72, dtype, seed=2)
    x, gate, h = primals[:3]
    mine, ref = leaves((x, gate, h)), leaves((x, gate, h))
    out, tout = K.gated_residual_jvp(*mine, *tangents[:3], backend=T)
    out_ref, tout_ref = gated_residual_jvp_reference(*ref, *tangents[:3])
    check(out, out_ref, dtype, "x'")
    check(tout, tout_ref, dtype, "tx'")
    assert out.requires_grad and not tout.requires_grad
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    for name, a, b in zip(("dx", "dgate", "dh"), torch.autograd.grad(out, mine, g), torch.autograd.grad(out_ref, ref, g)):
        check(a, b, dtype, name)
    check(K.gated_residual(x, gate, h, backend=T), gated_residual_reference(x, gate, h), dtype, "primal op")


def test_partial_and_none_tangents():
    primals, tangents = inputs(2, 49, 72, torch.float32, seed=3)
    for keep in [(0, 1, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 1, 0), (1, 0, 0, 0, 1)]:
        tans = [t if k else None for t, k in zip(tangents, keep)]
        _, _, tx_new, ty = K.gated_residual_modulate_jvp(*primals, *tans, backend=T)
        full = tuple(t if k else torch.zeros_like(t) for t, k in zip(tangents, keep))
        _, (tx_func, ty_func) = torch.func.jvp(gated_residual_modulate_reference, tuple(primals), full)
        check(ty, ty_func, torch.float32, f"ty with tangents {keep}")
        if any(keep[:3]):
            check(tx_new, tx_func, torch.float32, f"tx' with tangents {keep}")
        else:
            assert tx_new is None  # zero by structure
    out = K.gated_residual_modulate_jvp(*primals, *[None] * 5, backend=T)
    assert out[2] is None and out[3] is None
    assert K.gated_residual_jvp(*primals[:3], None, None, None, backend=T)[1] is None


def test_torch_func_jvp_forward_ad_and_grad_through_the_kernel():
    primals, tangents = inputs(2, 49, 72, torch.float32, seed=4)
    fn = lambda *p: K.gated_residual_modulate(*p, backend=T)
    out, tout = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    out_ref, tout_ref = torch.func.jvp(gated_residual_modulate_reference, tuple(primals), tuple(tangents))
    for name, a, b in zip(("x'", "y", "tx'", "ty"), (*out, *tout), (*out_ref, *tout_ref)):
        check(a, b, torch.float32, f"torch.func.jvp {name}")
    res = lambda x, a, h: K.gated_residual(x, a, h, backend=T)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(res(*[fwAD.make_dual(p, t) for p, t in zip(primals[:3], tangents[:3])]))
    check(dual.tangent, gated_residual_jvp_reference(*primals[:3], *tangents[:3])[1], torch.float32, "forward_ad")
    loss = lambda h, fn: sum(o.square().sum() for o in fn(primals[0], primals[1], h, *primals[3:]))
    check(torch.func.grad(loss)(primals[2], fn), torch.func.grad(loss)(primals[2], gated_residual_modulate_reference),
          torch.float32, "torch.func.grad dh")


def test_validation():
    primals, tangents = inputs(2, 1, 64, torch.float32)
    x, gate, h, shift, scale = primals
    with pytest.raises(ValueError, match="h must have shape"):
        K.gated_residual_modulate(x, gate, h[:, :, :-1], shift, scale, backend=T)
    with pytest.raises(ValueError, match="gate"):
        K.gated_residual(x, gate[:1], h, backend=T)
    with pytest.raises(ValueError, match="th"):
        K.gated_residual_jvp(x, gate, h, None, None, tangents[1], backend=T)
    with pytest.raises(ValueError, match="h must have x's dtype"):
        K.gated_residual(x, gate, h.double(), backend=T)


@pytest.mark.parametrize("used", ["x'", "y"])
def test_backward_when_one_output_is_unused(used):
    primals, tangents = inputs(2, 49, 72, torch.float32, seed=5)
    mine, ref = leaves(primals), leaves(primals)
    pick = lambda out: out[0] if used == "x'" else out[1]
    out = pick(K.gated_residual_modulate_jvp(*mine, *tangents, backend=T))
    out_ref = pick(gated_residual_modulate_reference(*ref))
    grads = torch.autograd.grad(out.square().sum(), mine, allow_unused=True)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), ref, allow_unused=True)
    for name, a, b in zip(("dx", "dgate", "dh", "dshift", "dscale"), grads, grads_ref):
        if b is None:
            assert a is None or not a.any(), name
        else:
            check(a, b, torch.float32, name)
