"""Drop-in patching of official-layout DiT / SiT / REPA-SiT models onto the fused kernels.

The official repositories (facebookresearch/DiT, willisma/SiT, sihyun-yu/REPA) share one block:

    shift₁, scale₁, gate₁, shift₂, scale₂, gate₂ = adaLN_modulation(c).chunk(6)
    x = x + gate₁·attn(modulate(norm1(x), shift₁, scale₁))
    x = x + gate₂·mlp(modulate(norm2(x), shift₂, scale₂))

with timm's ``Attention`` (``qkv``, ``proj``, ``num_heads``, optional ``q_norm``/``k_norm``) and ``Mlp``
(``fc1``, GELU(tanh), ``fc2``), and a ``FinalLayer`` ``linear(modulate(norm_final(x), shift, scale))``.
``patch_dit`` rebinds the ``forward`` of those modules so the block runs the fused schedule of
``block.block_forward`` (the one ``freeflow.models`` runs)::

    h      = adaln_modulate(x, shift₁, scale₁)                       (LN + modulate, one kernel)
    x, h   = gated_residual_modulate(x, gate₁, attn(h), shift₂, scale₂)   (residual + next LN, one kernel)
    x      = gated_residual(x, gate₂, mlp(h))

where ``attn`` runs the flash kernel and ``mlp`` is fc1's GEMM without bias → ``bias_gelu`` → fc2.
Nothing is added, removed or renamed, so the ``state_dict`` is untouched and checkpoints load either
way; the model-level ``forward`` (which differs between DiT, SiT and REPA) is left as it is.
Every op dispatches as usual (``backend=`` or ``FREEFLOW_KERNELS``), so a patched model still runs
anywhere, and ``torch.func.jvp`` / ``forward_ad`` go through it (all ops have ``jvp`` rules).

The patch is a runtime transformation (instance-level ``forward``): apply it again after building
or unpickling a model. Like the rest of ``freeflow.kernels`` this file imports nothing from freeflow.
"""
from __future__ import annotations

import types

import torch.nn as nn
import torch.nn.functional as F

from ._dispatch import check_backend
from .block import block_forward, final_layer_forward
from .flash_attention import attention
from .gelu import bias_gelu

_ATTENTION = ("qkv", "proj", "num_heads")
_MLP = ("fc1", "fc2")
_BLOCK = ("attn", "mlp", "norm1", "norm2", "adaLN_modulation")
_FINAL = ("norm_final", "linear", "adaLN_modulation")


def patch_dit(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Swap the attention, adaLN modulate and MLP pieces of an official-layout DiT/SiT/REPA model for
    the fused kernels, in place, keeping its ``state_dict``; returns the model.

    ``backend`` (``"auto"``, ``"triton"``, ``"reference"``; None = the process default) is passed to
    every op. Raises ValueError when the model does not have the official structure.
    """
    check_backend(backend)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(f"model must have a non-empty ModuleList `blocks` (official DiT/SiT/REPA layout); "
                         f"{type(model).__name__} has {type(blocks).__name__}")
    final = getattr(model, "final_layer", None)
    if final is None:
        raise ValueError(f"model must have a `final_layer` (official DiT/SiT/REPA layout); "
                         f"{type(model).__name__} has none")
    for i, block in enumerate(blocks):
        _require(block, _BLOCK, f"blocks[{i}]")
        _require(block.attn, _ATTENTION, f"blocks[{i}].attn")
        _require(block.mlp, _MLP, f"blocks[{i}].mlp")
        for name in ("norm1", "norm2"):
            _require_plain_layer_norm(getattr(block, name), f"blocks[{i}].{name}")
        drop = getattr(block.attn, "attn_drop", None)
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            raise ValueError(f"blocks[{i}].attn.attn_drop must have p=0: the fused attention has no dropout")
        act = getattr(block.mlp, "act", None)
        if not (isinstance(act, nn.GELU) and act.approximate == "tanh"):
            raise ValueError(f"blocks[{i}].mlp.act must be nn.GELU(approximate='tanh'), got {act!r}")
    _require(final, _FINAL, "final_layer")
    _require_plain_layer_norm(final.norm_final, "final_layer.norm_final")

    for block in blocks:
        _bind(block.attn, _attention_forward, backend)
        _bind(block.mlp, _mlp_forward, backend)
        _bind(block, _block_forward, backend)
    _bind(final, _final_layer_forward, backend)
    return model


def _require(module, names, where):
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise ValueError(f"{where} must have {', '.join(names)} (official DiT/SiT/REPA layout); missing {missing}")


def _require_plain_layer_norm(norm, where):
    if not isinstance(norm, nn.LayerNorm) or norm.elementwise_affine:
        raise ValueError(f"{where} must be nn.LayerNorm(elementwise_affine=False), got {norm!r}")


def _bind(module, forward, backend):
    module.forward = types.MethodType(forward, module)
    module.freeflow_backend = backend


def _attention_forward(self, x):
    """timm Attention on the flash kernel: same projections, q/k norms, head split and scale."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = self.q_norm(q) if hasattr(self, "q_norm") else q
    k = self.k_norm(k) if hasattr(self, "k_norm") else k
    o = attention(q, k, v, getattr(self, "scale", None), backend=self.freeflow_backend)
    o = self.proj(o.transpose(1, 2).reshape(B, N, C))
    return self.proj_drop(o) if hasattr(self, "proj_drop") else o


def _mlp_forward(self, x):
    """timm Mlp with fc1's bias folded into the GELU kernel."""
    # An adapted fc1 (LoRA: frozen base + low-rank update, duck-typed by `linear_jvp`) runs its own
    # bias-free GEMMs; reading its weights would mean building the merged matrix every call.
    own = getattr(self.fc1, "linear_jvp", None)
    h = own(x, None, bias=False)[0] if own is not None else F.linear(x, self.fc1.weight)
    h = bias_gelu(h, self.fc1.bias, backend=self.freeflow_backend)
    # Identities in DiT (p = 0, no norm), applied for fidelity: timm >= 0.6 names them drop1 / norm /
    # drop2, older timm has one `drop` used twice.
    h = _first(self, ("drop1", "drop"), h)
    h = _first(self, ("norm",), h)
    return _first(self, ("drop2", "drop"), self.fc2(h))


def _first(module, names, h):
    """Apply the first of ``names`` that is a submodule of ``module`` (identity if none is)."""
    for name in names:
        sub = getattr(module, name, None)
        if isinstance(sub, nn.Module):
            return sub(h)
    return h


def _block_forward(self, x, c):
    """DiT block with the residual seam fused into the next LayerNorm + modulate."""
    # Tangents reach the patched modules through the ops' jvp rules (torch.func), so the branches take none;
    # under autocast they give bf16, which the official `x + gate * h` promotes to x's dtype, and so does this.
    def branch(module):
        return lambda h, _: (module(h).to(x.dtype), None)

    return block_forward(self, x, c, branch(self.attn), branch(self.mlp), backend=self.freeflow_backend)


def _final_layer_forward(self, x, c):
    return final_layer_forward(self, x, c, backend=self.freeflow_backend)


__all__ = ["patch_dit"]
