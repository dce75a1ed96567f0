"""The adaLN family (modulate, gated residual, the fused seam): Triton kernels against the references,
torch.func.jvp and autograd (interpreted on CPU, compiled on CUDA: the ``device`` fixture)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from checks import make_check

import freeflow.kernels as K
from freeflow.kernels._dispatch import refresh_settings, use_triton
from freeflow.kernels.adaln import (
    adaln_modulate_jvp_reference,
    adaln_modulate_reference,
    gated_residual_jvp_reference,
    gated_residual_modulate_jvp_reference,
    gated_residual_modulate_reference,
    gated_residual_reference,
)

T = "triton"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
check = make_check(TOL)
SHAPES = [(2, 1, 64), (2, 49, 72), (2, 257, 40)]


def inputs(N, S, C, dtype, seed=0, device="cpu"):
    """x non-contiguous (token-major storage); shift/scale are chunks of one adaLN projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, N, C, generator=g).to(device, dtype).transpose(0, 1)
    mod = (0.5 * torch.randn(N, 2 * C, generator=g)).to(device, dtype)
    shift, scale = mod.chunk(2, dim=1)
    tx = torch.randn(N, S, C, generator=g).to(device, dtype)
    tshift, tscale = torch.randn(N, C, generator=g).to(device, dtype), torch.randn(N, C, generator=g).to(device, dtype)
    return (x, shift, scale), (tx, tshift, tscale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward(device, shape, dtype):
    primals, _ = inputs(*shape, dtype, device=device)
    assert not primals[1].is_contiguous() and (shape[1] == 1 or not primals[0].is_contiguous())
    leaves = [p.detach().clone().requires_grad_() for p in primals]
    ref_leaves = [p.detach().clone().requires_grad_() for p in primals]
    y = K.adaln_modulate(*leaves, backend=T)
    y_ref = adaln_modulate_reference(*ref_leaves)
    check(y, y_ref, dtype, "y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, g)
    for name, a, b in zip(("dx", "dshift", "dscale"), grads, grads_ref):
        check(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_jvp_matches_reference_and_func_jvp(device, shape, dtype):
    primals, tangents = inputs(*shape, dtype, seed=1, device=device)
    y, ty = K.adaln_modulate_jvp(*primals, *tangents, backend=T)
    y_ref, ty_ref = adaln_modulate_jvp_reference(*primals, *tangents)
    check(y, y_ref, dtype, "y")
    check(ty, ty_ref, dtype, "tangent vs reference")
    if dtype == torch.float32:  # torch.func.jvp through the reference, an independent derivation
        _, ty_func = torch.func.jvp(adaln_modulate_reference, primals, tangents)
        check(ty, ty_func, dtype, "tangent vs torch.func.jvp")


def test_none_tangents_are_zero_and_structural_none(device):
    (x, shift, scale), (tx, tshift, tscale) = inputs(2, 49, 72, torch.float32, seed=2, device=device)
    for keep in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]:
        tans = [t if k else None for t, k in zip((tx, tshift, tscale), keep)]
        _, ty = K.adaln_modulate_jvp(x, shift, scale, *tans, backend=T)
        full = [t if k else torch.zeros_like(t) for t, k in zip((tx, tshift, tscale), keep)]
        _, ty_func = torch.func.jvp(adaln_modulate_reference, (x, shift, scale), tuple(full))
        check(ty, ty_func, torch.float32, f"tangent with only {keep}")
    y, ty = K.adaln_modulate_jvp(x, shift, scale, None, None, None, backend=T)
    assert ty is None
    check(y, adaln_modulate_reference(x, shift, scale), torch.float32, "y")


def test_jvp_primal_differentiable_tangent_detached(device):
    (x, shift, scale), tangents = inputs(2, 49, 72, torch.float32, seed=3, device=device)
    leaves = [p.detach().clone().requires_grad_() for p in (x, shift, scale)]
    y, ty = K.adaln_modulate_jvp(*leaves, *tangents, backend=T)
    assert y.requires_grad and not ty.requires_grad
    grads = torch.autograd.grad(y.square().sum(), leaves)
    ref_leaves = [p.detach().clone().requires_grad_() for p in (x, shift, scale)]
    grads_ref = torch.autograd.grad(adaln_modulate_reference(*ref_leaves).square().sum(), ref_leaves)
    for a, b in zip(grads, grads_ref):
        check(a, b, torch.float32, "grad through the jvp op")


def test_torch_func_and_forward_ad_through_the_kernel(device):
    primals, tangents = inputs(2, 49, 72, torch.float32, seed=4, device=device)
    def fn(x, b, s):
        return K.adaln_modulate(x, b, s, backend=T)
    y, ty = torch.func.jvp(fn, primals, tangents)
    y_ref, ty_ref = torch.func.jvp(adaln_modulate_reference, primals, tangents)
    check(y, y_ref, torch.float32, "y")
    check(ty, ty_ref, torch.float32, "torch.func.jvp tangent")
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        ty_fwad = fwAD.unpack_dual(fn(*duals)).tangent
    check(ty_fwad, ty_ref, torch.float32, "forward_ad tangent")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(device)
    dx = torch.func.grad(lambda x: (fn(x, *primals[1:]) * g).sum())(primals[0])
    dx_ref = torch.func.grad(lambda x: (adaln_modulate_reference(x, *primals[1:]) * g).sum())(primals[0])
    check(dx, dx_ref, torch.float32, "torch.func.grad")


def test_dispatch_and_validation(device, monkeypatch):
    (x, shift, scale), _ = inputs(2, 1, 64, torch.float32, device=device)
    with pytest.raises(ValueError, match="shift"):
        K.adaln_modulate(x, shift[:, :-1], scale, backend=T)
    with pytest.raises(ValueError, match="x must have rank 3"):
        K.adaln_modulate(x[0], shift, scale, backend=T)
    with pytest.raises(ValueError, match="tscale"):
        K.adaln_modulate_jvp(x, shift, scale, None, None, scale[:1], backend=T)
    with pytest.raises(ValueError, match="backend"):
        K.adaln_modulate(x, shift, scale, backend="cuda")
    # Dispatch reads FREEFLOW_KERNELS at import and on refresh_settings(), not on every op call.
    try:
        monkeypatch.setenv("FREEFLOW_KERNELS", "reference")
        refresh_settings()
        assert not use_triton(x)
        monkeypatch.setenv("FREEFLOW_KERNELS", "auto")
        refresh_settings()
        assert use_triton(x)  # CUDA tensors, or CPU tensors + TRITON_INTERPRET=1
        monkeypatch.setenv("FREEFLOW_KERNELS", "cuda")
        refresh_settings()  # a bad value fails the op calls that need it, naming the variable
        with pytest.raises(ValueError, match="FREEFLOW_KERNELS must be one of"):
            K.adaln_modulate(x, shift, scale)
    finally:
        monkeypatch.undo()
        refresh_settings()  # leave no cached setting behind for the next test


# ---- gated residual (+ LayerNorm + modulate)


def residual_inputs(N, S, C, dtype, seed=0, device="cpu"):
    """(x, gate, h, shift, scale) and tangents; x, h non-contiguous, gate/shift/scale chunks of one projection."""
    g = torch.Generator().manual_seed(seed)
    def rnd(*s):
        return torch.randn(*s, generator=g)
    x = rnd(S, N, C).to(device, dtype).transpose(0, 1)
    h = rnd(N, S, 2 * C).to(device, dtype)[..., C:]
    gate, shift, scale = (0.5 * rnd(N, 3 * C)).to(device, dtype).chunk(3, dim=1)
    tangents = [rnd(N, S, C).to(device, dtype), rnd(N, C).to(device, dtype), rnd(N, S, C).to(device, dtype),
                rnd(N, C).to(device, dtype), rnd(N, C).to(device, dtype)]
    return [x, gate, h, shift, scale], tangents


def leaves(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_modulate_forward_backward(device, shape, dtype):
    primals, _ = residual_inputs(*shape, dtype, device=device)
    mine, ref = leaves(primals), leaves(primals)
    x_new, y = K.gated_residual_modulate(*mine, backend=T)
    x_ref, y_ref = gated_residual_modulate_reference(*ref)
    check(x_new, x_ref, dtype, "x'")
    check(y, y_ref, dtype, "y")
    g = torch.Generator().manual_seed(7)
    gx, gy = (torch.randn(x_new.shape, generator=g).to(device, dtype) for _ in range(2))
    grads = torch.autograd.grad((x_new, y), mine, (gx, gy))
    grads_ref = torch.autograd.grad((x_ref, y_ref), ref, (gx, gy))
    for name, a, b in zip(("dx", "dgate", "dh", "dshift", "dscale"), grads, grads_ref):
        check(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_modulate_fused_jvp(device, shape, dtype):
    primals, tangents = residual_inputs(*shape, dtype, seed=1, device=device)
    out = K.gated_residual_modulate_jvp(*primals, *tangents, backend=T)
    out_ref = gated_residual_modulate_jvp_reference(*primals, *tangents)
    for name, a, b in zip(("x'", "y", "tx'", "ty"), out, out_ref):
        check(a, b, dtype, name)
    if dtype == torch.float32:
        _, (tx_func, ty_func) = torch.func.jvp(gated_residual_modulate_reference, tuple(primals), tuple(tangents))
        check(out[2], tx_func, dtype, "tx' vs torch.func.jvp")
        check(out[3], ty_func, dtype, "ty vs torch.func.jvp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_alone(device, dtype):
    primals, tangents = residual_inputs(2, 49, 72, dtype, seed=2, device=device)
    x, gate, h = primals[:3]
    mine, ref = leaves((x, gate, h)), leaves((x, gate, h))
    out, tout = K.gated_residual_jvp(*mine, *tangents[:3], backend=T)
    out_ref, tout_ref = gated_residual_jvp_reference(*ref, *tangents[:3])
    check(out, out_ref, dtype, "x'")
    check(tout, tout_ref, dtype, "tx'")
    assert out.requires_grad and not tout.requires_grad
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(device, dtype)
    grads, grads_ref = torch.autograd.grad(out, mine, g), torch.autograd.grad(out_ref, ref, g)
    for name, a, b in zip(("dx", "dgate", "dh"), grads, grads_ref):
        check(a, b, dtype, name)
    check(K.gated_residual(x, gate, h, backend=T), gated_residual_reference(x, gate, h), dtype, "primal op")


def test_partial_and_none_tangents(device):
    primals, tangents = residual_inputs(2, 49, 72, torch.float32, seed=3, device=device)
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


def test_torch_func_jvp_forward_ad_and_grad_through_the_kernel(device):
    primals, tangents = residual_inputs(2, 49, 72, torch.float32, seed=4, device=device)
    def fn(*p):
        return K.gated_residual_modulate(*p, backend=T)
    out, tout = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    out_ref, tout_ref = torch.func.jvp(gated_residual_modulate_reference, tuple(primals), tuple(tangents))
    for name, a, b in zip(("x'", "y", "tx'", "ty"), (*out, *tout), (*out_ref, *tout_ref)):
        check(a, b, torch.float32, f"torch.func.jvp {name}")
    def res(x, a, h):
        return K.gated_residual(x, a, h, backend=T)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(res(*[fwAD.make_dual(p, t) for p, t in zip(primals[:3], tangents[:3])]))
    check(dual.tangent, gated_residual_jvp_reference(*primals[:3], *tangents[:3])[1], torch.float32, "forward_ad")
    def loss(h, fn):
        return sum(o.square().sum() for o in fn(primals[0], primals[1], h, *primals[3:]))
    check(torch.func.grad(loss)(primals[2], fn), torch.func.grad(loss)(primals[2], gated_residual_modulate_reference),
          torch.float32, "torch.func.grad dh")


def test_validation(device):
    primals, tangents = residual_inputs(2, 1, 64, torch.float32, device=device)
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
def test_backward_when_one_output_is_unused(device, used):
    primals, tangents = residual_inputs(2, 49, 72, torch.float32, seed=5, device=device)
    mine, ref = leaves(primals), leaves(primals)
    def pick(out):
        return out[0] if used == "x'" else out[1]
    out = pick(K.gated_residual_modulate_jvp(*mine, *tangents, backend=T))
    out_ref = pick(gated_residual_modulate_reference(*ref))
    grads = torch.autograd.grad(out.square().sum(), mine, allow_unused=True)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), ref, allow_unused=True)
    for name, a, b in zip(("dx", "dgate", "dh", "dshift", "dscale"), grads, grads_ref):
        if b is None:
            assert a is None or not a.any(), name
        else:
            check(a, b, torch.float32, name)
