"""DiT / SiT / REPA-SiT compatible transformer with explicit forward tangents.

Modules and ``state_dict`` keys follow facebookresearch/DiT ``models.py`` (and SiT / REPA, which share it):
``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table`` (with the null row),
fixed sin-cos ``pos_embed``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,adaLN_modulation.1}``,
``final_layer.{norm_final,linear,adaLN_modulation.1}``; REPA's optional ``attn.q_norm/k_norm``; FreeFlow's
``dt_embedder`` and ``gw_embedder``. The forward runs on ``freeflow.kernels`` ops; the blocks run the one
block schedule of ``freeflow.kernels.block`` (which ``patch_dit`` also runs), so the Triton backend fuses
every residual seam with the following LayerNorm + modulate (also across blocks), and ``forward_jvp``
computes the primal and its tangent in one pass with the explicit-tangent ops.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn

import freeflow.kernels as K
from freeflow.kernels._dispatch import check_backend
from freeflow.kernels.block import block_forward, block_jvp, chunks, final_layer_forward, modulate, modulation

from ..conventions import FAMILIES

# ---------------------------------------------------------------------------------------------
#                                   Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class DiTConfig:
    """Architecture of a DiT-family network (defaults: DiT-XL/2 at 256×256, i.e. 32×32×4 latents)."""
    input_size: int | tuple[int, int] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    qk_norm: bool = False
    take_dt: bool = False
    take_gw: bool = False
    frequency_embedding_size: int = 256

    def __post_init__(self):
        size = self.input_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2:
                raise ValueError(f"input_size must be an int or (H, W), got {size!r}")
            self.input_size = (int(size[0]), int(size[1]))
        sizes = self.input_size if isinstance(self.input_size, tuple) else (self.input_size,) * 2
        for name in ("patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if any(s % self.patch_size for s in sizes):
            raise ValueError(f"input_size {self.input_size} must be divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be divisible by 4 for the 2-D sin-cos position embedding, "
                             f"got {self.hidden_size}")

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.input_size if isinstance(self.input_size, tuple) else (self.input_size,) * 2
        return h // self.patch_size, w // self.patch_size

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["input_size"], tuple):
            d["input_size"] = list(d["input_size"])
        return d


# (hidden, depth, heads) of the published sizes; head dim 64 (S/B/L) and 72 (XL).
_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
# Small sizes for tests and the CPU demo.
_SMALL = {"T": (96, 4, 3), "M": (192, 6, 3)}


def _named_configs() -> dict[str, dict]:
    out = {}
    for size, (hidden, depth, heads) in {**_SIZES, **_SMALL}.items():
        for patch in (2, 4, 8):
            out[f"DiT-{size}/{patch}"] = dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=patch)
    return out


CONFIGS = _named_configs()


def config_from_name(name: str, **overrides) -> DiTConfig:
    """``"DiT-XL/2"`` (also ``SiT-``/``REPA-``/``FreeFlow-`` prefixes) plus field overrides."""
    key = "DiT-" + name.split("-", 1)[1] if "-" in name else name
    if key not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; expected one of {sorted(CONFIGS)} (any family prefix)")
    return DiTConfig(**{**CONFIGS[key], **overrides})


def _linear_jvp(layer, x, tx, bias=True):
    """``layer`` (a Linear) on ``x`` and its tangent → ``(y, ẏ)``; ``bias=False`` leaves the bias to a fused op.

    A layer that is not one plain weight (``freeflow.distill``'s LoRA: frozen base + low-rank update)
    brings its own ``linear_jvp`` and runs it on the same GEMM op, so nothing merges its weights here.
    """
    own = getattr(layer, "linear_jvp", None)
    if own is not None:
        return own(x, tx, bias=bias, op=K.linear_jvp)
    return K.linear_jvp(x, tx, layer.weight, layer.bias if bias else None)


# ---------------------------------------------------------------------------------------------
#                             Embedding layers (official key names)
# ---------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Scalar → vector: sinusoid (raw value, [cos, sin]) followed by Linear-SiLU-Linear (key ``mlp``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.forward_jvp(t, None)[0]

    def forward_jvp(self, t, tt):
        e, te = K.timestep_embedding_jvp(t, tt, self.frequency_embedding_size)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        # The sinusoid is fp32; the GEMM takes the layer's dtype (read from its parameters: an adapted fc1
        # has no single `weight`).
        h, th = _linear_jvp(fc1, e.to(next(fc1.parameters()).dtype), te)
        h, th = K.silu_jvp(h, th)
        return _linear_jvp(fc2, h, th)


class LabelEmbedder(nn.Module):
    """Class id → vector; row ``num_classes`` is the null (unconditional) class.

    Unlike DiT's, it never drops labels by itself in training mode: a trainer that wants classifier-free
    dropout replaces ids with ``num_classes`` explicitly, so a forward is a pure function of its inputs.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y):
        if y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"y must hold integer class ids, got dtype {y.dtype}")
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens, as a Conv2d (key ``proj``) run as one GEMM over patches."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)
        self.patch_size = patch_size

    def patchify(self, x):
        n, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def forward_jvp(self, x, tx):
        w = self.proj.weight.flatten(1)
        return K.linear_jvp(self.patchify(x), None if tx is None else self.patchify(tx), w, self.proj.bias)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """DiT/MAE fixed 2-D sin-cos embedding, (grid_h·grid_w, dim); the first half encodes the column."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)


# ---------------------------------------------------------------------------------------------
#                                   Transformer pieces
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention (timm layout: ``qkv``, ``proj``; optional affine ``q_norm``/``k_norm``)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def _heads(self, qkv):
        n, s, _ = qkv.shape
        return qkv.reshape(n, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _norm(self, norm, x, tx):
        if norm is None:
            return x, tx
        return K.layer_norm_jvp(x, tx, norm.weight, norm.bias, norm.eps)

    def forward(self, x, backend=None):
        return self.forward_jvp(x, None, backend)[0]

    def forward_jvp(self, x, tx, backend=None):
        n, s, d = x.shape
        qkv, tqkv = _linear_jvp(self.qkv, x, tx)
        q, k, v = self._heads(qkv)
        tq, tk, tv = self._heads(tqkv) if tqkv is not None else (None, None, None)
        q, tq = self._norm(self.q_norm, q, tq)
        k, tk = self._norm(self.k_norm, k, tk)
        if tq is None and tk is None and tv is None:
            o, to = K.attention(q, k, v, backend=backend), None
        else:
            o, to = K.attention_jvp(q, k, v, tq, tk, tv, backend=backend)
        o = o.transpose(1, 2).reshape(n, s, d)
        to = None if to is None else to.transpose(1, 2).reshape(n, s, d)
        return _linear_jvp(self.proj, o, to)


class Mlp(nn.Module):
    """fc1 → GELU(tanh) → fc2; fc1's bias is applied inside the fused bias-GELU op."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, backend=None):
        return self.forward_jvp(x, None, backend)[0]

    def forward_jvp(self, x, tx, backend=None):
        h, th = _linear_jvp(self.fc1, x, tx, bias=False)
        if th is None:
            h = K.bias_gelu(h, self.fc1.bias, backend=backend)
        else:
            h, th = K.bias_gelu_jvp(h, self.fc1.bias, th, backend=backend)
        return _linear_jvp(self.fc2, h, th)


class DiTBlock(nn.Module):
    """adaLN-Zero block. Its LayerNorms (``norm1``/``norm2``, no affine, eps 1e-6) run inside the fused
    modulate ops of ``freeflow.kernels.block``, which ``DiT`` chains across block boundaries."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, backend=None):
        """The official block call: tokens ``x`` (N, T, D) and conditioning ``c`` (N, D)."""
        return block_forward(self, x, c, *self.branches(backend), backend=backend)

    def branches(self, backend=None):
        """Attention and MLP as the ``(h, ḣ) → (out, out tangent)`` callables ``block_jvp`` runs."""
        return partial(self.attn.forward_jvp, backend=backend), partial(self.mlp.forward_jvp, backend=backend)


class FinalLayer(nn.Module):
    """adaLN LayerNorm + modulate and the linear patch decoder (``DiT`` fuses its norm into the last seam)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c, backend=None):
        """The official final-layer call: ``x`` (N, T, D), ``c`` (N, D) → patch outputs (N, T, p·p·C)."""
        return final_layer_forward(self, x, c, backend=backend)


# ---------------------------------------------------------------------------------------------
#                                          DiT
# ---------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Class-conditional DiT/SiT/REPA-SiT network, optionally a FreeFlow student (``take_dt``/``take_gw``).

    ``family`` records the checkpoint convention ("dit": DDPM ε-model, t in [0, 1000) and all 2C
    channels returned; "sit": t'=0 noise, velocity x - n; "repa"/"freeflow"/"internal": the internal
    convention t=1 noise, velocity n - x). ``backend`` selects the kernels (None = dispatch default).
    """

    def __init__(self, config: DiTConfig | None = None, *, family: str = "internal", backend: str | None = None,
                 **kwargs):
        super().__init__()
        if config is None:
            config = DiTConfig(**kwargs)
        elif kwargs:
            config = DiTConfig(**{**config.to_dict(), **kwargs})
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        check_backend(backend)
        self.config, self.family, self.backend = config, family, backend
        c = config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size, c.frequency_embedding_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        self.dt_embedder = TimestepEmbedder(c.hidden_size, c.frequency_embedding_size) if c.take_dt else None
        self.gw_embedder = TimestepEmbedder(c.hidden_size, c.frequency_embedding_size) if c.take_gw else None
        gh, gw = c.grid
        pos = torch.from_numpy(sincos_pos_embed(c.hidden_size, gh, gw)).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qk_norm) for _ in range(c.depth)]
        )
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self.initialize_weights()

    # -- initialisation (as DiT: xavier linears, adaLN-Zero) --------------------------------------
    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.t_embedder, self.dt_embedder, self.gw_embedder):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for emb in (self.dt_embedder, self.gw_embedder):  # new conditions start as no-ops
            if emb is not None:
                nn.init.zeros_(emb.mlp[2].weight)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    # -- shapes -----------------------------------------------------------------------------------
    def _check_inputs(self, x, t, y, dt, gw, tangents):
        c = self.config
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        n = x.shape[0]
        gh, gw_ = c.grid
        want = (n, c.in_channels, gh * c.patch_size, gw_ * c.patch_size)
        if tuple(x.shape) != want:
            raise ValueError(f"x must have shape {want} for this model, got {tuple(x.shape)}")
        for name, v, needed in (("t", t, True), ("y", y, True), ("dt", dt, c.take_dt), ("gw", gw, c.take_gw)):
            if v is None:
                if needed and name != "y":
                    raise ValueError(f"{name} is required by this model (take_{name}=True)")
                continue
            if not needed:
                raise ValueError(f"{name} was given but this model has no {name} input (take_{name}=False)")
            if v.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) to match x, got {tuple(v.shape)}")
        if y is None:
            raise ValueError("y (class ids, shape (N,)) is required")
        for name, tan, primal in tangents:
            if tan is not None and (primal is None or tan.shape != primal.shape):
                want = None if primal is None else tuple(primal.shape)
                raise ValueError(f"{name} must have shape {want} (the shape of its primal), got {tuple(tan.shape)}")

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x, t, y, dt=None, gw=None):
        """Network output (N, C_out, H, W); C_out = 2C for family "dit" with learn_sigma, else C."""
        return self.forward_jvp(x, t, y, dt, gw)[0]

    def forward_jvp(self, x, t, y, dt=None, gw=None, *, tx=None, tt=None, tdt=None, tgw=None):
        """(forward(x, t, y, dt, gw), its directional derivative along the given tangents).

        Any input may carry a tangent (None = zero; y is discrete). The primal output is differentiable;
        the tangent is computed without an autograd graph and is None when every tangent is None.
        """
        self._check_inputs(x, t, y, dt, gw, [("tx", tx, x), ("tt", tt, t), ("tdt", tdt, dt), ("tgw", tgw, gw)])
        cond, tcond = self._conditioning(t, y, dt, gw, tt, tdt, tgw)
        h, th = self.x_embedder.forward_jvp(x, tx)
        h = h + self.pos_embed.to(h.dtype)
        out, tout = self._trunk(h, th, cond, tcond)
        out = self._unpatchify(out)
        tout = None if tout is None else self._unpatchify(tout)
        if self.config.learn_sigma and self.family != "dit":  # SiT/REPA forwards drop the sigma half
            out = out[:, : self.config.in_channels]
            tout = None if tout is None else tout[:, : self.config.in_channels]
        return out, tout

    def _conditioning(self, t, y, dt, gw, tt, tdt, tgw):
        """c = t_emb + y_emb (+ dt_emb + gw_emb) and its tangent; returns SiLU(c), as every adaLN uses it."""
        c, tc = self.t_embedder.forward_jvp(t, tt)
        c = c + self.y_embedder(y)
        for emb, v, tv in ((self.dt_embedder, dt, tdt), (self.gw_embedder, gw, tgw)):
            if emb is not None:
                e, te = emb.forward_jvp(v, tv)
                c = c + e
                tc = te if tc is None else (tc if te is None else tc + te)
        return K.silu_jvp(c, tc)

    def _trunk(self, h, th, c, tc):
        """All blocks and the final layer, each residual seam fused with the LayerNorm + modulate after it."""
        be = self.backend
        mods = [modulation(*_linear_jvp(b.adaLN_modulation[1], c, tc)) for b in self.blocks]
        final, tfinal = _linear_jvp(self.final_layer.adaLN_modulation[1], c, tc)
        # a block's last seam normalises for the next block's attention; the last block's, for the final layer
        nexts = [(m.shift_msa, m.scale_msa, tm.shift_msa, tm.scale_msa) for m, tm in mods[1:]]
        nexts.append((*final.chunk(2, dim=1), *chunks(tfinal, 2)))
        (m, tm), x, tx = mods[0], h, th
        y, ty = modulate(x, tx, m.shift_msa, m.scale_msa, tm.shift_msa, tm.scale_msa, backend=be)
        for block, (m, tm), nxt in zip(self.blocks, mods, nexts):
            x, y, tx, ty = block_jvp(*block.branches(be), x, y, tx, ty, m, tm, *nxt, backend=be)
        return _linear_jvp(self.final_layer.linear, y, ty)

    def _unpatchify(self, x):
        """(N, T, p·p·C) → (N, C, H, W), patch pixels in (p, q, c) order as DiT."""
        c, p = self.config.out_channels, self.config.patch_size
        gh, gw = self.config.grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def extra_repr(self) -> str:
        return f"family={self.family!r}, backend={self.backend!r}"
