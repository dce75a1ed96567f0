"""Checkpoints in the official key layouts and an independent functional DiT forward (test support).

Written from the published architecture (facebookresearch/DiT models.py, SiT, REPA sit.py) with plain
torch.nn.functional calls; it shares no code with freeflow.models.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def official_state_dict(*, hidden=64, depth=2, heads=4, patch=2, in_ch=4, size=8, num_classes=10,
                        learn_sigma=True, mlp_ratio=4.0, freq=256, qk_norm=False, projector=False,
                        extra_embedders=(), seed=0):
    """Random tensors under the official key names and shapes (pos_embed is the real sin-cos table)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    out_ch = 2 * in_ch if learn_sigma else in_ch
    mlp = int(hidden * mlp_ratio)
    hd = hidden // heads
    sd = {
        "pos_embed": torch.from_numpy(pos_embed_2d(hidden, size // patch)).float().unsqueeze(0),
        "x_embedder.proj.weight": r(hidden, in_ch, patch, patch), "x_embedder.proj.bias": r(hidden),
        "y_embedder.embedding_table.weight": r(num_classes + 1, hidden),
        "final_layer.linear.weight": r(patch * patch * out_ch, hidden),
        "final_layer.linear.bias": r(patch * patch * out_ch),
        "final_layer.adaLN_modulation.1.weight": r(2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": r(2 * hidden),
    }
    for name in ("t_embedder",) + tuple(extra_embedders):
        sd.update({f"{name}.mlp.0.weight": r(hidden, freq), f"{name}.mlp.0.bias": r(hidden),
                   f"{name}.mlp.2.weight": r(hidden, hidden), f"{name}.mlp.2.bias": r(hidden)})
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "attn.qkv.weight": r(3 * hidden, hidden), b + "attn.qkv.bias": r(3 * hidden),
            b + "attn.proj.weight": r(hidden, hidden), b + "attn.proj.bias": r(hidden),
            b + "mlp.fc1.weight": r(mlp, hidden), b + "mlp.fc1.bias": r(mlp),
            b + "mlp.fc2.weight": r(hidden, mlp), b + "mlp.fc2.bias": r(hidden),
            b + "adaLN_modulation.1.weight": r(6 * hidden, hidden), b + "adaLN_modulation.1.bias": r(6 * hidden),
        })
        if qk_norm:
            sd.update({b + "attn.q_norm.weight": 1 + r(hd), b + "attn.q_norm.bias": r(hd),
                       b + "attn.k_norm.weight": 1 + r(hd), b + "attn.k_norm.bias": r(hd)})
    if projector:  # REPA build_mlp(hidden, projector_dim, z_dim): Linear-SiLU-Linear-SiLU-Linear
        sd.update({"projectors.0.0.weight": r(32, hidden), "projectors.0.0.bias": r(32),
                   "projectors.0.2.weight": r(32, 32), "projectors.0.2.bias": r(32),
                   "projectors.0.4.weight": r(16, 32), "projectors.0.4.bias": r(16)})
    return sd


def pos_embed_2d(dim, grid):
    def axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([axis(dim // 2, gw), axis(dim // 2, gh)], axis=1)


def _temb(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _embed(sd, name, t):
    h = F.linear(_temb(t, sd[f"{name}.mlp.0.weight"].shape[1]), sd[f"{name}.mlp.0.weight"], sd[f"{name}.mlp.0.bias"])
    return F.linear(F.silu(h), sd[f"{name}.mlp.2.weight"], sd[f"{name}.mlp.2.bias"])


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def functional_block(b, h, cond, *, heads, qk_norm=False):
    """The published DiTBlock forward on one block's state dict ``b`` (keys without ``blocks.i.``)."""
    n, _, d = h.shape
    mod = F.linear(F.silu(cond), b["adaLN_modulation.1.weight"], b["adaLN_modulation.1.bias"])
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
    a = _modulate(F.layer_norm(h, (d,), eps=1e-6), sh1, sc1)
    qkv = F.linear(a, b["attn.qkv.weight"], b["attn.qkv.bias"]).reshape(n, -1, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    if qk_norm:
        q = F.layer_norm(q, (d // heads,), b["attn.q_norm.weight"], b["attn.q_norm.bias"])
        k = F.layer_norm(k, (d // heads,), b["attn.k_norm.weight"], b["attn.k_norm.bias"])
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, d)
    h = h + g1.unsqueeze(1) * F.linear(a, b["attn.proj.weight"], b["attn.proj.bias"])
    m = _modulate(F.layer_norm(h, (d,), eps=1e-6), sh2, sc2)
    m = F.gelu(F.linear(m, b["mlp.fc1.weight"], b["mlp.fc1.bias"]), approximate="tanh")
    return h + g2.unsqueeze(1) * F.linear(m, b["mlp.fc2.weight"], b["mlp.fc2.bias"])


def functional_final_layer(f, h, cond):
    """The published FinalLayer forward on its state dict ``f`` (keys without ``final_layer.``)."""
    sh, sc = F.linear(F.silu(cond), f["adaLN_modulation.1.weight"], f["adaLN_modulation.1.bias"]).chunk(2, dim=1)
    return F.linear(_modulate(F.layer_norm(h, (h.shape[-1],), eps=1e-6), sh, sc), f["linear.weight"],
                    f["linear.bias"])


def functional_dit(sd, x, t, y, *, heads, dt=None, gw=None, qk_norm=False, drop_sigma=False):
    """The published DiT forward, written out with functional ops on an official state dict."""
    n, c, hgt, wid = x.shape
    p = sd["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    cond = _embed(sd, "t_embedder", t) + sd["y_embedder.embedding_table.weight"][y]
    if dt is not None:
        cond = cond + _embed(sd, "dt_embedder", dt)
    if gw is not None:
        cond = cond + _embed(sd, "gw_embedder", gw)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        h = functional_block({k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")},
                             h, cond, heads=heads, qk_norm=qk_norm)
    h = functional_final_layer({k[len("final_layer."):]: v for k, v in sd.items() if k.startswith("final_layer.")},
                               h, cond)
    oc = h.shape[-1] // (p * p)
    gh, gw_ = hgt // p, wid // p
    out = torch.einsum("nhwpqc->nchpwq", h.reshape(n, gh, gw_, p, p, oc)).reshape(n, oc, hgt, wid)
    return out[:, :c] if drop_sigma else out


# -- FreeFlow's released layout and sampler (ShangyuanTong/FreeFlow) -----------------------------------
# Its models.py is DiT's with a ``dt_embedder`` and a ``gw_embedder`` (take_dt / take_gw), and all three
# timestep embedders name their MLP ``projs``. Its sampler feeds the noise end's time, dt = 1 and the guidance
# weight, and takes one step along the first C output channels.

def official_freeflow_state_dict(**kwargs):
    """Random tensors under the official FreeFlow student's key names and shapes."""
    sd = official_state_dict(**kwargs, extra_embedders=("dt_embedder", "gw_embedder"))
    return {k.replace("_embedder.mlp.", "_embedder.projs."): v for k, v in sd.items()}


def functional_freeflow(sd, x, t, y, dt, gw, *, heads, qk_norm=False):
    """The official FreeFlow network (keys ``*_embedder.projs.*``) on its state dict: all output channels."""
    mlp_named = {k.replace("_embedder.projs.", "_embedder.mlp."): v for k, v in sd.items()}
    return functional_dit(mlp_named, x, t, y, heads=heads, dt=dt, gw=gw, qk_norm=qk_norm)


def official_one_step(sd, z, y, gw, *, heads, qk_norm=False, noise_time=0, dt=None):
    """The official one-step rule from the noise end: ``z + dt·F(z, t=0, dt)`` (``z - dt·F`` at t = 1)."""
    n, c = z.shape[:2]
    dt = torch.ones(n) if dt is None else dt
    t = torch.full((n,), float(noise_time))
    f = functional_freeflow(sd, z, t, y, dt, gw, heads=heads, qk_norm=qk_norm)[:, :c]
    step = dt.view(-1, 1, 1, 1) * f
    return z + step if noise_time == 0 else z - step
