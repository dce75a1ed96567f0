"""Bias + GELU(tanh): Triton kernel vs the reference, torch.func.jvp and autograd (on the ``device`` fixture)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from checks import make_check

import freeflow.kernels as K
from freeflow.kernels.gelu import bias_gelu_jvp_reference, bias_gelu_reference

T = "triton"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
check = make_check(TOL)
# (leading dims, C): DiT's MLP hidden is 4·hidden; odd widths and tokens exercise the masks
SHAPES = [((2, 1), 256), ((2, 49), 288), ((2, 257), 40)]


def inputs(lead, C, dtype, seed=0, device="cpu"):
    """h non-contiguous (a column slice of a wider GEMM output); values span GELU's curved region."""
    g = torch.Generator().manual_seed(seed)
    h = (3 * torch.randn(*lead, C + 8, generator=g)).to(device, dtype)[..., 8:]
    bias = torch.randn(C, generator=g).to(device, dtype)
    th = torch.randn(*lead, C, generator=g).to(device, dtype)
    return h, bias, th


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,C", SHAPES)
def test_forward_backward(device, lead, C, dtype):
    h, bias, _ = inputs(lead, C, dtype, device=device)
    assert not h.is_contiguous()
    mine = [t.detach().clone().requires_grad_() for t in (h, bias)]
    ref = [t.detach().clone().requires_grad_() for t in (h, bias)]
    y, y_ref = K.bias_gelu(*mine, backend=T), bias_gelu_reference(*ref)
    check(y, y_ref, dtype, "y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    for name, a, b in zip(("dh", "dbias"), torch.autograd.grad(y, mine, g), torch.autograd.grad(y_ref, ref, g)):
        check(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,C", SHAPES)
def test_fused_jvp(device, lead, C, dtype):
    h, bias, th = inputs(lead, C, dtype, seed=1, device=device)
    y, ty = K.bias_gelu_jvp(h, bias, th, backend=T)
    y_ref, ty_ref = bias_gelu_jvp_reference(h, bias, th)
    check(y, y_ref, dtype, "y")
    check(ty, ty_ref, dtype, "tangent")
    if dtype == torch.float32:
        _, ty_func = torch.func.jvp(lambda h: bias_gelu_reference(h, bias), (h,), (th,))
        check(ty, ty_func, dtype, "tangent vs torch.func.jvp")


def test_no_bias_none_tangent_and_detached(device):
    h, _, th = inputs((2, 49), 288, torch.float32, seed=2, device=device)
    y, ty = K.gelu_tanh_jvp(h, th, backend=T)
    check(y, torch.nn.functional.gelu(h, approximate="tanh"), torch.float32, "gelu_tanh")
    check(ty, torch.func.jvp(lambda h: torch.nn.functional.gelu(h, approximate="tanh"), (h,), (th,))[1],
          torch.float32, "gelu_tanh tangent")
    y, ty = K.bias_gelu_jvp(h, None, None, backend=T)
    assert ty is None
    hl = h.detach().clone().requires_grad_()
    y, ty = K.bias_gelu_jvp(hl, None, th, backend=T)
    assert y.requires_grad and not ty.requires_grad
    # saturation: tanh formed from exp2 must reach ±1 without inf/nan
    big = torch.tensor([-60.0, -12.0, 0.0, 12.0, 60.0], device=device)
    check(K.gelu_tanh(big, backend=T), bias_gelu_reference(big), torch.float32, "saturated y")


def test_autocast_bias_add_is_the_linears(device):
    """Under bf16 autocast, bias_gelu(x Wᵀ, b) with DiT's fp32 fc1 bias is what autocast makes of
    gelu(F.linear(x, W, b)): bf16 out, fp32 gradient for b. Without a bias the op keeps h's dtype."""
    g = torch.Generator().manual_seed(9)
    x, w, th = (torch.randn(*s, generator=g).to(device) for s in ((2, 49, 24), (40, 24), (2, 49, 40)))
    b, b_ref = (torch.randn(40, generator=torch.Generator().manual_seed(10)).to(device).requires_grad_()
                for _ in range(2))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        h = torch.nn.functional.linear(x, w)
        y = K.bias_gelu(h, b, backend=T)
        y_ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b_ref), approximate="tanh")
        y_jvp, ty = K.bias_gelu_jvp(h, b.detach(), th, backend=T)
        y_fp32 = K.gelu_tanh(x, backend=T)
    assert y.dtype == y_ref.dtype == y_jvp.dtype == ty.dtype == torch.bfloat16 and y_fp32.dtype == torch.float32
    check(y, y_ref, torch.bfloat16, "y under autocast")
    _, ty_ref = bias_gelu_jvp_reference(h, b.detach().to(torch.bfloat16), th.to(torch.bfloat16))
    check(ty, ty_ref, torch.bfloat16, "tangent under autocast")
    up = torch.randn(y.shape, generator=g).to(device, torch.bfloat16)
    (gb,), (gb_ref,) = torch.autograd.grad(y, [b], up), torch.autograd.grad(y_ref, [b_ref], up)
    assert gb.dtype == torch.float32
    check(gb, gb_ref, torch.bfloat16, "bias gradient under autocast")


def test_torch_func_jvp_forward_ad_and_grad_through_the_kernel(device):
    h, bias, th = inputs((2, 49), 288, torch.float32, seed=4, device=device)
    tbias = torch.randn(bias.shape, generator=torch.Generator().manual_seed(9)).to(device)
    def fn(h, b):
        return K.bias_gelu(h, b, backend=T)
    _, ty = torch.func.jvp(fn, (h, bias), (th, tbias))
    _, ty_ref = torch.func.jvp(bias_gelu_reference, (h, bias), (th, tbias))
    check(ty, ty_ref, torch.float32, "torch.func.jvp (h and bias tangents)")
    with fwAD.dual_level():
        ty_fwad = fwAD.unpack_dual(fn(fwAD.make_dual(h, th), bias)).tangent
    check(ty_fwad, bias_gelu_jvp_reference(h, bias, th)[1], torch.float32, "forward_ad")
    def loss(b, f):
        return f(h, b).square().sum()
    check(torch.func.grad(loss)(bias, fn), torch.func.grad(loss)(bias, bias_gelu_reference), torch.float32,
          "torch.func.grad dbias")


def test_validation(device):
    h, bias, th = inputs((2, 1), 256, torch.float32, device=device)
    with pytest.raises(ValueError, match="bias must have shape"):
        K.bias_gelu(h, bias[:-1], backend=T)
    with pytest.raises(ValueError, match="th"):
        K.bias_gelu_jvp(h, bias, th[..., :-1], backend=T)
    with pytest.raises(ValueError, match="bias must have h's dtype"):
        K.bias_gelu(h, bias.double(), backend=T)
    with pytest.raises(ValueError, match="h must be a floating-point"):
        K.bias_gelu(h.long(), None, backend=T)
