"""patch_dit on an official-layout DiT (facebookresearch/DiT models.py, timm Attention/Mlp) built here."""



import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from checks import rel_err
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.nn.attention import SDPBackend, sdpa_kernel

from freeflow.kernels import patch_dit

# ----------------------------------------------------------------------------------------------
# The published architecture (timm's Attention / Mlp / PatchEmbed, DiT's embedders, block, final layer)
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # + the null class

    def forward(self, labels):
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, input_size=14, patch_size=2, in_channels=4, hidden_size=144, depth=2, num_heads=2,
                 mlp_ratio=4.0, num_classes=10, qk_norm=False):
        super().__init__()
        self.out_channels, self.patch_size = in_channels, patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(1, self.x_embedder.num_patches, hidden_size) * 0.02)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # DiT zero-initialises adaLN; random weights here so every path carries signal
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                nn.init.normal_(m.bias, std=0.1)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


# ----------------------------------------------------------------------------------------------


def model_and_inputs(qk_norm=False, seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = DiT(qk_norm=qk_norm).eval()  # S = (14/2)² = 49 tokens, head dim 144/2 = 72 (as DiT-XL)
    g = torch.Generator().manual_seed(seed + 1)
    x, t, y = torch.randn(2, 4, 14, 14, generator=g), torch.rand(2, generator=g), torch.tensor([3, 10])
    return model.to(device), (x.to(device), t.to(device), y.to(device))


@pytest.mark.parametrize("qk_norm", [False, True])  # REPA's blocks may use qk_norm
def test_patched_model_gives_the_same_outputs_and_gradients(device, qk_norm):
    model, (x, t, y) = model_and_inputs(qk_norm, device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x, t, y)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert patch_dit(model, backend="triton") is model
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    out_patched = model(x, t, y)
    assert rel_err(out_patched, out) <= 1e-4
    grads_patched = torch.autograd.grad(out_patched.square().sum(), list(model.parameters()))
    # k_norm.bias shifts every key's logit by the same q·b, which softmax ignores: its exact gradient is
    # zero and both sides hold rounding noise, so each gradient is measured against the largest one.
    scale = max(g.abs().max() for g in grads)
    for (name, _), a, b in zip(model.named_parameters(), grads_patched, grads):
        err = ((a - b).abs().max() / max(b.abs().max(), 1e-3 * scale)).item()
        assert err <= 1e-4, f"{name}: {err:.2e}"


@pytest.mark.parametrize("qk_norm", [False, True])
def test_patched_model_under_bf16_autocast(device, qk_norm):
    """Mixed precision as users run it: autocast hands the kernels bf16 activations, fp32 biases and fp32
    LayerNorm outputs; the patched model must take them and agree with the official model under autocast."""
    model, (x, t, y) = model_and_inputs(qk_norm, seed=5, device=device)
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        out = model(x, t, y)
        out_patched = patch_dit(model, backend="triton")(x, t, y)
    assert out_patched.dtype == out.dtype  # bf16 from the final linear
    assert rel_err(out_patched.float(), out.float()) <= 2e-2  # the GPU self-test's bf16 budget


def test_torch_func_jvp_through_patched_model_and_state_dict_roundtrip(device):
    model, (x, t, y) = model_and_inputs(seed=2, device=device)
    fresh, _ = model_and_inputs(seed=3, device=device)
    tx = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(device)
    tt = torch.ones_like(t)
    with sdpa_kernel(SDPBackend.MATH):  # SDPA's fused CPU kernels have no forward-AD formula
        out_ref, tout_ref = torch.func.jvp(lambda x, t: model(x, t, y), (x, t), (tx, tt))
    patch_dit(fresh, backend="triton").load_state_dict(model.state_dict())  # official keys load as-is
    out, tout = torch.func.jvp(lambda x, t: fresh(x, t, y), (x, t), (tx, tt))
    assert rel_err(out, out_ref) <= 1e-4
    assert rel_err(tout, tout_ref) <= 1e-4


def test_patched_model_under_torch_compile_fullgraph(device):
    """The drop-in recipe for compiled projects (docs/kernels.md): ``patch_dit(model)`` then
    ``torch.compile(model, fullgraph=True)``. Compiled with ``aot_eager``'s compilers (the captured graphs run as
    captured: the Triton kernels run in the interpreter on CPU), kept here to see what was captured: one forward graph
    holding the ``freeflow::`` ops, one backward graph holding their backward ops; outputs and gradients match the
    patched model run eagerly and the official one."""
    model, (x, t, y) = model_and_inputs(seed=6, device=device)
    params = list(model.parameters())
    out_ref = model(x, t, y)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), params)
    patch_dit(model, backend="triton")
    out_eager = model(x, t, y)
    grads_eager = torch.autograd.grad(out_eager.square().sum(), params)
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    out = compiled(x, t, y)
    grads = torch.autograd.grad(out.square().sum(), params)
    ops = [{node.target.name().split("::")[1] for node in gm.graph.nodes
            if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "freeflow"}
           for gm in graphs]
    forward = {"adaln_modulate", "gated_residual_modulate", "gated_residual", "bias_gelu"}
    if device.type != "cuda":  # on CUDA the primal attention is SDPA's fast path: aten ops, traced as they are
        forward.add("attention")
    assert len(graphs) == 2 and ops[0] == forward, ops
    assert ops[1] == ({f"{name}_backward" for name in forward}), ops
    assert rel_err(out, out_eager) <= 1e-5  # the same kernels on the same inputs
    assert rel_err(out, out_ref) <= 1e-4
    floor = 1e-3 * max(g.abs().max().item() for g in grads_ref)  # each gradient against the largest, as above
    for (name, _), a, b, c in zip(model.named_parameters(), grads, grads_eager, grads_ref):
        assert rel_err(a, b, floor) <= 1e-5, f"{name}: {rel_err(a, b, floor):.2e} against eager"
        assert rel_err(a, c, floor) <= 1e-4, f"{name}: {rel_err(a, c, floor):.2e} against the official model"


@pytest.mark.slow  # Inductor's code generation: about 20 s on 2 cores
def test_patched_model_compiles_under_inductor_on_the_reference_backend():
    """The same recipe with the reference ops, which Inductor compiles into its own CPU code: the official model's
    outputs and gradients, to round-off."""
    model, (x, t, y) = model_and_inputs(seed=7)
    params = list(model.parameters())
    out_ref = model(x, t, y)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), params)
    patch_dit(model, backend="reference")
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x, t, y)
    grads = torch.autograd.grad(out.square().sum(), params)
    assert rel_err(out, out_ref) <= 1e-5
    floor = 1e-3 * max(g.abs().max().item() for g in grads_ref)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        assert rel_err(a, b, floor) <= 1e-4, f"{name}: {rel_err(a, b, floor):.2e}"


def test_rejects_other_layouts():
    with pytest.raises(ValueError, match="blocks"):
        patch_dit(nn.Linear(4, 4))
    model, _ = model_and_inputs()
    del model.blocks[0].mlp.fc2
    with pytest.raises(ValueError, match=r"blocks\[0\]\.mlp must have fc1, fc2"):
        patch_dit(model)
    model, _ = model_and_inputs()
    model.blocks[1].norm2 = nn.LayerNorm(144)
    with pytest.raises(ValueError, match=r"blocks\[1\]\.norm2 must be nn.LayerNorm\(elementwise_affine=False\)"):
        patch_dit(model)
    with pytest.raises(ValueError, match="backend"):
        patch_dit(model_and_inputs()[0], backend="cuda")
