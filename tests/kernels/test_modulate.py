"""adaLN modulate: the Triton kernel (interpreter) against the reference, torch.func.jvp and autograd."""



import pytest
import torch
import torch.autograd.forward_ad as fwAD
from kernel_checks import fp32_default_dtype, make_check, rel_err  # noqa: F401 (autouse fixture)

import freeflow.kernels as K
from freeflow.kernels.modulate import adaln_modulate_jvp_reference, adaln_modulate_reference

T = "triton"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
check = make_check(TOL)
SHAPES = [(2, 1, 64), (2, 49, 72), (2, 257, 40)]


def inputs(N, S, C, dtype, seed=0):
    """x non-contiguous (token-major storage); shift/scale are chunks of one adaLN projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, N, C, generator=g).to(dtype).transpose(0, 1)
    mod = (0.5 * torch.randn(N, 2 * C, generator=g)).to(dtype)
    shift, scale = mod.chunk(2, dim=1)
    tx = torch.randn(N, S, C, generator=g).to(dtype)
    tshift, tscale = torch.randn(N, C, generator=g).to(dtype), torch.randn(N, C, generator=g).to(dtype)
    return (x, shift, scale), (tx, tshift, tscale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward(shape, dtype):
    primals, _ = inputs(*shape, dtype)
    assert not primals[1].is_contiguous() and (shape[1] == 1 or not primals[0].is_contiguous())
    leaves = [p.detach().clone().requires_grad_() for p in primals]
    ref_leaves = [p.detach().clone().requires_grad_() for p in primals]
    y = K.adaln_modulate(*leaves, backend=T)
    y_ref = adaln_modulate_reference(*ref_leaves)
    check(y, y_ref, dtype, "y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, g)
    for name, a, b in zip(("dx", "dshift", "dscale"), grads, grads_ref):
        check(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_jvp_matches_reference_and_func_jvp(shape, dtype):
    primals, tangents = inputs(*shape, dtype, seed=1)
    y, ty = K.adaln_modulate_jvp(*primals, *tangents, backend=T)
    y_ref, ty_ref = adaln_modulate_jvp_reference(*primals, *tangents)
    check(y, y_ref, dtype, "y")
    check(ty, ty_ref, dtype, "tangent vs reference")
    if dtype == torch.float32:  # torch.func.jvp through the reference, an independent derivation
        _, ty_func = torch.func.jvp(adaln_modulate_reference, primals, tangents)
        check(ty, ty_func, dtype, "tangent vs torch.func.jvp")


def test_none_tangents_are_zero_and_structural_none():
    (x, shift, scale), (tx, tshift, tscale) = inputs(2, 49, 72, torch.float32, seed=2)
    for keep in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]:
        tans = [t if k else None for t, k in zip((tx, tshift, tscale), keep)]
        _, ty = K.adaln_modulate_jvp(x, shift, scale, *tans, backend=T)
        full = [t if k else torch.zeros_like(t) for t, k in zip((tx, tshift, tscale), keep)]
        _, ty_func = torch.func.jvp(adaln_modulate_reference, (x, shift, scale), tuple(full))
        check(ty, ty_func, torch.float32, f"tangent with only {keep}")
    y, ty = K.adaln_modulate_jvp(x, shift, scale, None, None, None, backend=T)
    assert ty is None
    check(y, adaln_modulate_reference(x, shift, scale), torch.float32, "y")


def test_jvp_primal_differentiable_tangent_detached():
    (x, shift, scale), tangents = inputs(2, 49, 72, torch.float32, seed=3)
    leaves = [p.detach().clone().requires_grad_() for p in (x, shift, scale)]
    y, ty = K.adaln_modulate_jvp(*leaves, *tangents, backend=T)
    assert y.requires_grad and not ty.requires_grad
    grads = torch.autograd.grad(y.square().sum(), leaves)
    ref_leaves = [p.detach().clone().requires_grad_() for p in (x, shift, scale)]
    grads_ref = torch.autograd.grad(adaln_modulate_reference(*ref_leaves).square().sum(), ref_leaves)
    for a, b in zip(grads, grads_ref):
        check(a, b, torch.float32, "grad through the jvp op")


def test_torch_func_and_forward_ad_through_the_kernel():
    primals, tangents = inputs(2, 49, 72, torch.float32, seed=4)
    fn = lambda x, b, s: K.adaln_modulate(x, b, s, backend=T)
    y, ty = torch.func.jvp(fn, primals, tangents)
    y_ref, ty_ref = torch.func.jvp(adaln_modulate_reference, primals, tangents)
    check(y, y_ref, torch.float32, "y")
    check(ty, ty_ref, torch.float32, "torch.func.jvp tangent")
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        ty_fwad = fwAD.unpack_dual(fn(*duals)).tangent
    check(ty_fwad, ty_ref, torch.float32, "forward_ad tangent")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
    dx = torch.func.grad(lambda x: (fn(x, *primals[1:]) * g).sum())(primals[0])
    dx_ref = torch.func.grad(lambda x: (adaln_modulate_reference(x, *primals[1:]) * g).sum())(primals[0])
    check(dx, dx_ref, torch.float32, "torch.func.grad")


def test_dispatch_and_validation(monkeypatch):
    (x, shift, scale), _ = inputs(2, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="shift"):
        K.adaln_modulate(x, shift[:, :-1], scale, backend=T)
    with pytest.raises(ValueError, match="x must have rank 3"):
        K.adaln_modulate(x[0], shift, scale, backend=T)
    with pytest.raises(ValueError, match="tscale"):
        K.adaln_modulate_jvp(x, shift, scale, None, None, scale[:1], backend=T)
    with pytest.raises(ValueError, match="backend"):
        K.adaln_modulate(x, shift, scale, backend="cuda")
    monkeypatch.setenv("FREEFLOW_KERNELS", "reference")
    assert not K.use_triton(x)
    monkeypatch.setenv("FREEFLOW_KERNELS", "auto")
    assert K.use_triton(x)  # CPU tensors + TRITON_INTERPRET=1
