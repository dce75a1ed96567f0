"""LoRA aux (freeflow.distill.lora) against an independent merged-weight reference, and proof that no merged
weight is formed.

The reference is a plain Linear (or a plain copy of the network, run with ``torch.func.functional_call``) whose
weight is ``W + s·B A``, written out here from the adapter's tensors; its gradients w.r.t. A and B come from
autograd through that product. Exact comparisons run in float64; the autocast ones in fp32 → bf16.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from checks import default_dtype_fixture
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import freeflow.kernels as K
from freeflow.distill import LoRALinear, add_lora, lora_parameters
from freeflow.kernels import patch_dit
from freeflow.models import DiT, DiTConfig, GuidedVelocityNet

float64_default = default_dtype_fixture(torch.float64)

AUX_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]  # what freeflow.train.build_aux adapts
EXACT = 1e-10
# bf16 keeps 8 significant bits (unit round-off u = 2^-8). The adapter and the merged layer round different
# intermediates (x Aᵀ, the two partial outputs and their sum vs the merged W'), each at most u relative to
# a term no larger than max|output|: a handful of u apart, never the O(1) of a missing or doubled update.
BF16_LAYER = 4 * 2 ** -8
BF16_NET = 2e-2  # the repository's whole-network bf16 budget (tests/kernels/test_patch.py, the GPU self-test)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _adapter(in_f=7, out_f=11, rank=3, alpha=4.5, bias=True, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = LoRALinear(base, rank, alpha)
    with torch.no_grad():  # B = 0 at init would make the update (and its gradient w.r.t. A) vanish
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=_gen(seed + 1), dtype=dtype) * 0.5)
    return layer


def _merged_ref(layer):
    """Leaf copies of A and B, and a function that builds ``W + s·B A`` from them (differentiable in A, B)."""
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    W = layer.base.weight.detach()
    return A, B, lambda: W + layer.scaling * (B @ A)


def _rel(a, b):
    """Normwise ‖a - b‖/‖b‖ in float64 (a gradient sums many rounded terms: the norm is the stable measure)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def _assert_close(a, b, tol=EXACT, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    err = _rel(a, b)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------- one layer


def test_starts_at_base_and_only_the_adapters_train():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    before = net(x).detach()
    add_lora(net, rank=2, alpha=4.0, targets=["0"])
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)  # B = 0: the adapted copy is the original
    params = lora_parameters(net)
    assert [tuple(p.shape) for p in params] == [(2, 4), (6, 2)]
    assert [p for p in net.parameters() if p.requires_grad] == params


def test_rejects_targets_matching_nothing_and_bad_rank():
    with pytest.raises(ValueError, match="targets"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), rank=1, targets=["attn"])
    with pytest.raises(ValueError, match="rank"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), rank=0)


def test_has_no_weight_to_read():
    """Code that reads ``layer.weight`` would merge per call; it must fail instead of doing so silently."""
    layer = _adapter()
    with pytest.raises(AttributeError, match="weight"):
        layer.weight  # noqa: B018


@pytest.mark.parametrize("alpha", [None, 4.5])  # s = 1 skips the scaling: both branches
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_the_merged_linear(alpha, bias):
    layer = _adapter(alpha=alpha, bias=bias)
    A, B, merged = _merged_ref(layer)
    b = None if layer.bias is None else layer.bias.detach()
    x = torch.randn(2, 5, 7, generator=_gen(2), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 5, 11, generator=_gen(3))

    y = layer(x)
    y_ref = F.linear(x_ref, merged(), b)
    _assert_close(y, y_ref, what="forward")
    assert _rel(y_ref, F.linear(x_ref, layer.base.weight, b)) > 0.1  # the update is no rounding-size term
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for got, want, what in ((x.grad, x_ref.grad, "dx"), (layer.lora_A.grad, A.grad, "dA"),
                            (layer.lora_B.grad, B.grad, "dB")):
        _assert_close(got, want, what=what)
    assert layer.base.weight.grad is None and (layer.base.bias is None or layer.base.bias.grad is None)


@pytest.mark.parametrize("op", [None, K.linear_jvp], ids=["torch", "kernels"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_jvp_matches_torch_func_jvp_of_the_merged_linear(op, bias):
    """Both GEMM ops (plain torch, the kernels' dual GEMM); ``bias=False`` is the fused bias-GELU call."""
    layer = _adapter(bias=True)
    A, B, merged = _merged_ref(layer)
    b = layer.bias.detach() if bias else None
    x = torch.randn(3, 4, 7, generator=_gen(4), requires_grad=True)
    tx = torch.randn(3, 4, 7, generator=_gen(5))
    g = torch.randn(3, 4, 11, generator=_gen(6))

    y, ty = layer.linear_jvp(x, tx, bias=bias, op=op)
    W = merged()
    y_ref, ty_ref = torch.func.jvp(lambda v: F.linear(v, W, b), (x.detach(),), (tx,))
    _assert_close(y, y_ref, what="primal")
    _assert_close(ty, ty_ref, what="tangent")
    assert not ty.requires_grad  # tangents are detached, as every *_jvp op's
    assert layer.linear_jvp(x, None, bias=bias, op=op)[1] is None

    x_ref = x.detach().clone().requires_grad_(True)
    (y * g).sum().backward()
    (F.linear(x_ref, merged(), b) * g).sum().backward()
    for got, want, what in ((x.grad, x_ref.grad, "dx"), (layer.lora_A.grad, A.grad, "dA"),
                            (layer.lora_B.grad, B.grad, "dB")):
        _assert_close(got, want, what=what)


@pytest.mark.parametrize("op", [None, K.linear_jvp], ids=["torch", "kernels"])
def test_under_bf16_autocast_is_what_autocast_makes_of_the_merged_linear(op):
    """bf16 GEMMs and outputs like F.linear under autocast, fp32 gradients for the fp32 adapters."""
    layer = _adapter(in_f=13, out_f=9, rank=5, dtype=torch.float32)
    A, B, merged = _merged_ref(layer)
    b = layer.bias.detach()
    x = torch.randn(4, 6, 13, generator=_gen(7), dtype=torch.float32, requires_grad=True)
    tx = torch.randn(4, 6, 13, generator=_gen(8), dtype=torch.float32)
    g = torch.randn(4, 6, 9, generator=_gen(9), dtype=torch.bfloat16)
    x_ref = x.detach().clone().requires_grad_(True)
    W = merged()  # built in fp32 outside autocast: the reference merges exactly, then autocast's GEMM rounds

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ty = layer.linear_jvp(x, tx, op=op)
        y_fwd = layer(x)
        y_ref, ty_ref = F.linear(x_ref, W, b), F.linear(tx, W.detach())
    for got, want, what in ((y, y_ref, "primal"), (ty, ty_ref, "tangent"), (y_fwd, y_ref, "forward")):
        assert got.dtype == torch.bfloat16, what
        _assert_close(got.float(), want.float(), BF16_LAYER, what)
    exact = F.linear(x.detach(), W.detach(), b)
    assert _rel(y_ref.float(), exact) > 1e-4  # autocast really ran the reference in bf16

    (y.float() * g.float()).sum().backward()
    (y_ref.float() * g.float()).sum().backward()
    for got, want, what in ((x.grad, x_ref.grad, "dx"), (layer.lora_A.grad, A.grad, "dA"),
                            (layer.lora_B.grad, B.grad, "dB")):
        assert got.dtype == torch.float32, what
        _assert_close(got, want, BF16_LAYER, what)


# ----------------------------------------------------------------------------- the aux network

# 15 tokens (6×10 input, patch 2), hidden 20, MLP 80, 3 samples: no activation or conditioning tensor has
# the (out, in) shape of an adapted weight, so the recorder below sees weights only.
CFG = DiTConfig(input_size=(6, 10), patch_size=2, in_channels=3, hidden_size=20, depth=2, num_heads=2,
                num_classes=5, learn_sigma=True)
RANK, ALPHA = 3, 4.5


def _randomize(module, seed, std=0.1):
    """Non-zero weights everywhere (adaLN-Zero and the zero gw_embedder output would hide most paths)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def _aux_pair(targets, seed=0, dtype=torch.float64):
    """(aux with adapters on ``targets``, the plain aux it was adapted from); a test gives the plain one the
    merged weights ``W + s·B A`` of the adapted layers."""
    teacher = _randomize(DiT(CFG, family="sit", backend="reference"), seed).to(dtype)
    aux = GuidedVelocityNet.from_teacher(teacher).to(dtype)  # the clone is built in the default dtype
    _randomize(aux.net.gw_embedder, seed + 1)
    plain = copy.deepcopy(aux).requires_grad_(False)
    torch.manual_seed(seed + 2)
    add_lora(aux.net, RANK, alpha=ALPHA, targets=targets)
    g = _gen(seed + 3)
    with torch.no_grad():  # B nonzero, so that the update and the gradient of A are there
        for m in _adapted(aux).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype) * 0.3)
    return aux, plain


def _adapted(aux):
    return {name: m for name, m in aux.named_modules() if isinstance(m, LoRALinear)}


def _merged_weights(aux):
    """Leaf copies of every adapter's (A, B) and the plain copy's weight dict ``W + s·B A`` built from them."""
    leaves, build = {}, {}
    for name, m in _adapted(aux).items():
        A, B, merged = _merged_ref(m)
        leaves[name] = (A, B)
        build[name + ".weight"] = merged
    return leaves, lambda: {k: f() for k, f in build.items()}


def _merged_copy(plain, weights):
    merged = copy.deepcopy(plain)
    with torch.no_grad():
        for k, w in weights.items():
            merged.get_parameter(k).copy_(w)
    return merged


def _inputs(n=3, seed=11, dtype=torch.float64):
    g = _gen(seed)
    x = torch.randn(n, CFG.in_channels, 6, 10, generator=g, dtype=dtype)
    t, gw = torch.rand(n, generator=g, dtype=dtype), 1 + 3 * torch.rand(n, generator=g, dtype=dtype)
    y = torch.randint(0, CFG.num_classes + 1, (n,), generator=g)
    return x, t, y, gw


@pytest.mark.parametrize("targets", [AUX_TARGETS, None], ids=["aux-targets", "every-linear"])
def test_aux_net_matches_its_merged_copy(targets):
    """GuidedVelocityNet.forward and its gradients; DiT.forward_jvp vs torch.func.jvp of the merged copy.
    ``None`` adapts every Linear (embedders, adaLN, final layer), so every call site of the model is covered."""
    aux, plain = _aux_pair(targets)
    assert len(_adapted(aux)) == (4 * CFG.depth if targets else 5 * CFG.depth + 6)
    leaves, weights = _merged_weights(aux)
    x, t, y, gw = _inputs()
    x.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)

    out = aux(x, t, y, gw)
    out_ref = torch.func.functional_call(plain, weights(), (x_ref, t, y, gw))
    _assert_close(out, out_ref, what="forward")
    assert _rel(out_ref, plain(x, t, y, gw)) > 0.05  # the adapters change the output materially
    g = torch.randn(out.shape, generator=_gen(12))
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    _assert_close(x.grad, x_ref.grad, what="dx")
    for name, m in _adapted(aux).items():
        _assert_close(m.lora_A.grad, leaves[name][0].grad, what=f"{name} dA")
        _assert_close(m.lora_B.grad, leaves[name][1].grad, what=f"{name} dB")

    tx, tt, tgw = (torch.randn(v.shape, generator=_gen(13 + i)) for i, v in enumerate((x, t, gw)))
    with torch.no_grad():
        W = {k.removeprefix("net."): w for k, w in weights().items()}
        want = torch.func.jvp(lambda x, t, gw: torch.func.functional_call(plain.net, W, (x, t, y), {"gw": gw}),
                              (x.detach(), t, gw), (tx, tt, tgw))
        got = aux.net.forward_jvp(x.detach(), t, y, gw=gw, tx=tx, tt=tt, tgw=tgw)
    _assert_close(got[0], want[0], what="forward_jvp primal")
    _assert_close(got[1], want[1], what="forward_jvp tangent")


def test_aux_net_under_bf16_autocast_matches_its_merged_copy():
    aux, plain = _aux_pair(AUX_TARGETS, seed=20, dtype=torch.float32)
    leaves, weights = _merged_weights(aux)
    x, t, y, gw = _inputs(seed=21, dtype=torch.float32)
    tx = torch.randn(x.shape, generator=_gen(22), dtype=torch.float32)
    W = weights()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aux(x, t, y, gw)
        out_ref = torch.func.functional_call(plain, W, (x, t, y, gw))
        with torch.no_grad():
            got = aux.net.forward_jvp(x, t, y, gw=gw, tx=tx)
            want = _merged_copy(plain, W).net.forward_jvp(x, t, y, gw=gw, tx=tx)
    assert out.dtype == out_ref.dtype
    _assert_close(out.float(), out_ref.float(), BF16_NET, "forward")
    _assert_close(got[0].float(), want[0].float(), BF16_NET, "forward_jvp primal")
    _assert_close(got[1].float(), want[1].float(), BF16_NET, "forward_jvp tangent")
    with torch.no_grad():
        exact = torch.func.functional_call(plain, W, (x, t, y, gw))
    assert _rel(out_ref.float(), exact) > 1e-4  # autocast really ran the reference in bf16
    g = torch.randn(out.shape, generator=_gen(23))
    (out.float() * g).sum().backward()
    (out_ref.float() * g).sum().backward()
    for name, m in _adapted(aux).items():
        for got_g, want_g, what in zip((m.lora_A.grad, m.lora_B.grad), leaves[name], ("dA", "dB")):
            assert got_g.dtype == torch.float32
            _assert_close(got_g, want_g.grad, BF16_NET, f"{name} {what}")


# ----------------------------------------------------------------------------- no merged weight


class _MadeShapes(TorchDispatchMode):
    """Every tensor an op allocates while active (views excluded: ``W.t()`` inside F.linear is no new matrix),
    forward and backward alike, as (op, shape)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.made += [(str(func), tuple(t.shape)) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def _weight_sized(made, layers):
    shapes = {s for m in layers for s in ((m.out_features, m.in_features), (m.in_features, m.out_features))}
    return sorted({(op, shape) for op, shape in made if shape in shapes})


def _forward_backward(aux, x, t, y, gw, tx):
    out = aux(x, t, y, gw)
    out_j, _ = aux.net.forward_jvp(x, aux.native_time(t), y, gw=gw, tx=tx)
    (out.square().sum() + out_j.square().sum()).backward()


def test_no_weight_sized_tensor_is_made_in_forward_forward_jvp_or_backward():
    """A merged ``W + s·B A``, or a gradient of it, is an (out, in) tensor made by mm/add/mul. The aux net's
    forward, forward_jvp and backward (into A, B and the input) must make none of an adapted layer's shape.
    The control, the same network with trainable plain Linears, shows the recorder sees weight gradients."""
    aux, plain = _aux_pair(AUX_TARGETS, seed=30, dtype=torch.float32)
    x, t, y, gw = _inputs(seed=31, dtype=torch.float32)
    x.requires_grad_(True)
    tx = torch.randn(x.shape, generator=_gen(32), dtype=torch.float32)
    layers = list(_adapted(aux).values())

    with _MadeShapes() as rec:
        _forward_backward(aux, x, t, y, gw, tx)
    assert any("mm" in op for op, _ in rec.made)  # the recorder saw the GEMMs
    assert all(m.lora_A.grad is not None and m.lora_B.grad is not None for m in layers)
    assert _weight_sized(rec.made, layers) == []

    for name in _adapted(aux):
        plain.get_submodule(name).requires_grad_(True)
    with _MadeShapes() as control:
        _forward_backward(plain, x, t, y, gw, tx)
    assert len({shape for _, shape in _weight_sized(control.made, layers)}) >= 3  # qkv, fc1/fc2ᵀ, proj dW


class _OfficialMlp(nn.Module):  # timm's Mlp as DiT builds it
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)


def _official_layout(dim=12, hidden=44, heads=2):
    """The module structure patch_dit requires (facebookresearch/DiT): blocks of timm Attention/Mlp + adaLN."""
    block = nn.Module()
    block.attn = nn.Module()
    block.attn.qkv, block.attn.proj, block.attn.num_heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads
    block.mlp = _OfficialMlp(dim, hidden)
    block.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    block.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    block.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
    final = nn.Module()
    final.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    final.linear, final.adaLN_modulation = nn.Linear(dim, 5), nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
    model = nn.Module()
    model.blocks, model.final_layer = nn.ModuleList([block]), final
    return model


def test_patched_official_mlp_runs_an_adapted_fc1_unmerged():
    """kernels.patch_dit's MLP takes fc1 without its bias (the bias goes into the GELU kernel): with a LoRA
    fc1 it must equal the merged MLP, train A and B, and make no (hidden, dim) matrix."""
    torch.manual_seed(40)
    model = patch_dit(_official_layout(), backend="reference")
    mlp = model.blocks[0].mlp
    add_lora(mlp, rank=3, alpha=4.5, targets=["fc1"])
    fc1 = mlp.fc1
    with torch.no_grad():
        fc1.lora_B.copy_(torch.randn(fc1.lora_B.shape, generator=_gen(41)) * 0.5)
    A, B, merged = _merged_ref(fc1)
    x = torch.randn(2, 7, 12, generator=_gen(42), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 7, 12, generator=_gen(43))

    with _MadeShapes() as rec:
        out = mlp(x)
        (out * g).sum().backward()
    assert _weight_sized(rec.made, [fc1]) == []
    fc2 = mlp.fc2
    out_ref = F.linear(F.gelu(F.linear(x_ref, merged(), fc1.bias.detach()), approximate="tanh"),
                       fc2.weight.detach(), fc2.bias.detach())
    (out_ref * g).sum().backward()
    _assert_close(out, out_ref, what="forward")
    for got, want, what in ((x.grad, x_ref.grad, "dx"), (fc1.lora_A.grad, A.grad, "dA"),
                            (fc1.lora_B.grad, B.grad, "dB")):
        _assert_close(got, want, what=what)
