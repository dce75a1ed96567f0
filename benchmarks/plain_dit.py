"""The plain-PyTorch baseline of the whole-step benchmark: a DiT/SiT written the way the official code is.

``nn.Linear`` / ``nn.LayerNorm`` / ``F.scaled_dot_product_attention`` / GELU(tanh) modules in the official
key layout (facebookresearch/DiT ``models.py``, which SiT and REPA share), with FreeFlow's ``dt_embedder`` and
``gw_embedder``: what a researcher writes without this toolkit. Its tangent comes from ``torch.func.jvp``,
which needs SDPA's math backend (the flash and memory-efficient backends have no forward-mode AD), so a
network built with ``math_attention=True`` pins that backend. It shares no code with ``freeflow.models``;
:meth:`PlainDiT.like` copies a ``freeflow.models.DiT``'s weights (and LoRA adapters) into one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq = freq

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq))


class LabelEmbedder(nn.Module):
    def __init__(self, rows, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(rows, hidden)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_ch, hidden):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, hidden, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, heads, math_attention):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.math_attention = math_attention

    def forward(self, x):
        n, s, d = x.shape
        q, k, v = self.qkv(x).reshape(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.math_attention:
            with sdpa_kernel(SDPBackend.MATH):
                o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(n, s, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, math_attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, math_attention)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_ch):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PlainDiT(nn.Module):
    """Official-layout DiT with ``forward(x, t, y, dt=None, gw=None)``; ``config`` is a freeflow ``DiTConfig``
    (read for its sizes only) and ``family`` the checkpoint convention, as the FreeFlow wrappers expect."""

    def __init__(self, config, family, *, math_attention=False):
        super().__init__()
        c = self.config = config
        self.family = family
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size, c.frequency_embedding_size)
        self.y_embedder = LabelEmbedder(c.num_classes + int(c.class_dropout_prob > 0), c.hidden_size)
        self.dt_embedder = TimestepEmbedder(c.hidden_size, c.frequency_embedding_size) if c.take_dt else None
        self.gw_embedder = TimestepEmbedder(c.hidden_size, c.frequency_embedding_size) if c.take_gw else None
        gh, gw = c.grid
        self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw, c.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, math_attention)
                                     for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)

    @classmethod
    def like(cls, dit, *, math_attention=False):
        """A plain network with ``dit``'s weights, LoRA adapters and trainable flags, on its device."""
        plain = cls(dit.config, dit.family, math_attention=math_attention).to(next(dit.parameters()).device)
        for name, module in dit.named_modules():
            if hasattr(module, "lora_A"):  # a freeflow.distill LoRALinear: adapt the same Linear the same way
                parent, _, child = name.rpartition(".")
                owner = plain.get_submodule(parent)
                setattr(owner, child, type(module)(getattr(owner, child), module.rank, module.scaling * module.rank))
        plain.load_state_dict(dit.state_dict())
        trainable = dict(dit.named_parameters())
        for name, p in plain.named_parameters():
            p.requires_grad_(trainable[name].requires_grad)
        return plain

    def forward(self, x, t, y, dt=None, gw=None):
        c = self.config
        h = self.x_embedder(x) + self.pos_embed
        cond = self.t_embedder(t) + self.y_embedder(y)
        if self.dt_embedder is not None:
            cond = cond + self.dt_embedder(dt)
        if self.gw_embedder is not None:
            cond = cond + self.gw_embedder(gw)
        for block in self.blocks:
            h = block(h, cond)
        h = self.final_layer(h, cond)
        n, p, oc = x.shape[0], c.patch_size, c.out_channels
        gh, gw_ = c.grid
        out = torch.einsum("nhwpqc->nchpwq", h.reshape(n, gh, gw_, p, p, oc)).reshape(n, oc, gh * p, gw_ * p)
        return out[:, : c.in_channels] if c.learn_sigma and self.family != "dit" else out
