"""A whole DiT on the Triton kernels (interpreter) equals the reference backend: forward_jvp and backward."""



import pytest
import torch
import torch.nn as nn
from checks import default_dtype_fixture, rel_err

from freeflow.models import DiT

TOL = 1e-4  # fp32; attention's accumulation order dominates
BF16_TOL = 2e-2  # as the GPU self-test's bf16 budget
fp32_default_dtype = default_dtype_fixture(torch.float32)


def pair(device, seed=0, **config):
    """Two DiT students with identical random weights: backend "triton" and "reference"."""
    # 14/2 → S = 49 tokens, head dim 144/2 = 72 (as DiT-XL), FreeFlow's δ and γ inputs
    cfg = dict(input_size=14, patch_size=2, in_channels=4, hidden_size=144, depth=2, num_heads=2,
               num_classes=10, learn_sigma=False, take_dt=True, take_gw=True, **config)
    torch.manual_seed(seed)
    ref = DiT(backend="reference", **cfg)
    with torch.no_grad():  # adaLN-Zero would silence most paths: random weights carry signal everywhere
        for m in ref.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
                m.bias.normal_(0, 0.1)
    tri = DiT(backend="triton", **cfg)
    tri.load_state_dict(ref.state_dict())
    return tri.to(device), ref.to(device)


def inputs(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 14, 14, generator=g)
    t, dt, gw = torch.ones(2), torch.rand(2, generator=g), 1 + 3 * torch.rand(2, generator=g)
    y = torch.tensor([3, 10])  # 10 = the null class
    return tuple(v.to(device) for v in (x, t, y, dt, gw))


def compare_grads(tri, ref):
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    scale = max(g.abs().max().item() for g in grads.values())
    for n, p in tri.named_parameters():
        if n in grads:
            # k_norm-like shift invariances make some exact gradients ~0: measure against the largest
            err = rel_err(p.grad, grads[n], 1e-3 * scale)
            assert err <= TOL, f"grad {n}: {err:.2e}"
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("tangent_on", ["dt", "all"])
def test_forward_jvp_and_backward_match_reference(device, tangent_on):
    tri, ref = pair(device)
    x, t, y, dt, gw = inputs(device)
    g = torch.Generator().manual_seed(2)
    if tangent_on == "dt":  # FreeFlow's prediction pass: tangent 1 on δ only
        tangents = dict(tdt=torch.ones_like(dt))
    else:
        tangents = {k: torch.randn(shape, generator=g).to(device)
                    for k, shape in (("tx", x.shape), ("tt", 2), ("tdt", 2), ("tgw", 2))}
    outs = {}
    for name, model in (("triton", tri), ("reference", ref)):
        out, tout = model.forward_jvp(x, t, y, dt, gw, **tangents)
        assert out.requires_grad and not tout.requires_grad
        # the surrogate of docs/design.md §3: gradient through F only, with the tangent as a constant
        (out * (out + dt[:, None, None, None] * tout).detach()).sum().backward()
        outs[name] = (out.detach(), tout)
    for i, what in enumerate(("out", "tangent")):
        err = rel_err(outs["triton"][i], outs["reference"][i])
        assert err <= TOL, f"{what}: {err:.2e}"
    compare_grads(tri, ref)


def test_triton_model_under_torch_func_jvp_equals_its_forward_jvp(device):
    tri, ref = pair(device, seed=3, qk_norm=True)  # REPA's qk_norm path
    x, t, y, dt, gw = inputs(device, seed=4)
    out, tout = tri.forward_jvp(x, t, y, dt, gw, tdt=torch.ones_like(dt))
    def f(dt):
        return tri(x, t, y, dt, gw)

    out_func, tout_func = torch.func.jvp(f, (dt,), (torch.ones_like(dt),))
    assert rel_err(out_func, out) <= TOL and rel_err(tout_func, tout) <= TOL
    out_ref, tout_ref = ref.forward_jvp(x, t, y, dt, gw, tdt=torch.ones_like(dt))
    assert rel_err(out, out_ref) <= TOL and rel_err(tout, tout_ref) <= TOL


@pytest.mark.parametrize("qk_norm", [False, True])
def test_bf16_autocast_matches_the_reference_under_autocast(device, qk_norm):
    """A teacher runs under bf16 autocast on CUDA (freeflow.train's precision "auto"): the Triton model must
    accept the mixed dtypes autocast produces (fp32 biases, fp32 LayerNorm outputs) and agree with the reference."""
    tri, ref = pair(device, seed=5, qk_norm=qk_norm)
    x, t, y, dt, gw = inputs(device, seed=6)
    outs = []
    for model in (tri, ref):
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out, tout = model.forward_jvp(x, t, y, dt, gw, tdt=torch.ones_like(dt))
        outs.append((out.float(), tout.float()))
        assert out.dtype == torch.bfloat16
    with torch.no_grad():
        exact, _ = ref.forward_jvp(x, t, y, dt, gw, tdt=torch.ones_like(dt))
    assert rel_err(outs[0][0], outs[1][0]) <= BF16_TOL and rel_err(outs[0][1], outs[1][1]) <= BF16_TOL
    assert rel_err(outs[1][0], exact) > 1e-4  # autocast really ran the reference in bf16
