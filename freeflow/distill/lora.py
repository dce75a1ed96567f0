"""LoRA adapters for the auxiliary network ``g_ψ`` (docs/design.md §3: "full copy, or LoRA for memory").

``add_lora(module, rank)`` swaps the chosen ``nn.Linear`` layers for :class:`LoRALinear`
(``x Wᵀ + b + (α/r)·(x Aᵀ) Bᵀ`` with the base frozen, ``A`` Kaiming-uniform and ``B = 0``), so the adapted
network starts exactly equal to the original: ``g_ψ`` begins as the teacher. Only ``A`` and ``B``
need optimizer state and gradients, which is where the memory of a full copy goes.

The update stays factored in every path: ``B A`` (a full ``out × in`` matrix) is never formed, and
neither is its gradient. Model code that fuses a Linear with what follows (``freeflow.models``' DiT,
``freeflow.kernels.patch_dit``'s MLP) does not read ``layer.weight``; it calls the duck-typed

    layer.linear_jvp(x, tx, bias=True, op=None) -> (y, ẏ)

where ``op`` is the caller's ``linear_jvp(x, tx, weight, bias)`` (the kernels' dual GEMM, which also
applies autocast's casts); ``None`` uses plain ``F.linear``. This module imports neither the kernels nor
the models: they pass ``op`` in. ``LoRALinear`` has no ``weight``, so code that still reads one fails
instead of silently building the merged matrix.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import nn


def _linear_jvp(x, tx, weight, bias=None):
    """(x Wᵀ + b, ẋ Wᵀ) with plain torch ops (autocast applies to both GEMMs); the tangent is detached."""
    y = Fn.linear(x, weight, bias)
    if tx is None:
        return y, None
    with torch.no_grad():
        return y, Fn.linear(tx, weight)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update ``(α/r)·B A``, applied as two thin GEMMs."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.base = base
        base.requires_grad_(False)
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @property
    def bias(self):
        """The base's bias, for callers that apply it inside a fused op (``linear_jvp(..., bias=False)``)."""
        return self.base.bias

    def linear_jvp(self, x, tx=None, *, bias: bool = True, op=None):
        """``(x Wᵀ [+ b] + s·(x Aᵀ) Bᵀ, ẋ Wᵀ + s·(ẋ Aᵀ) Bᵀ)``, s = α/r; ``tx=None`` → tangent None.

        ``op(x, tx, weight, bias) -> (y, ẏ)`` runs each GEMM (default: ``F.linear``); the primal is
        differentiable w.r.t. ``x``, ``A`` and ``B`` and the base gets no gradient (it is frozen), so
        backward makes only ``r × in`` and ``out × r`` weight gradients.
        """
        op = _linear_jvp if op is None else op
        y, ty = op(x, tx, self.base.weight, self.base.bias if bias else None)
        a, ta = op(x, tx, self.lora_A, None)
        if self.scaling != 1:  # on the rank-r activation: r columns to scale instead of out_features
            a = a * self.scaling
            ta = None if ta is None else ta * self.scaling
        u, tu = op(a, ta, self.lora_B, None)
        return y + u, (None if ty is None else ty + tu)

    def forward(self, x):
        return self.linear_jvp(x)[0]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _selected(name, targets):
    return targets is None or any(t in name for t in targets)


def add_lora(module: nn.Module, rank: int, alpha: float | None = None, targets=None,
             freeze_base: bool = True) -> nn.Module:
    """Wrap every ``nn.Linear`` of ``module`` whose qualified name contains one of ``targets``
    (``None`` = all) in a :class:`LoRALinear`; in place, returns ``module``.

    ``freeze_base`` also freezes every other parameter (embeddings, norms), so that
    :func:`lora_parameters` are the only trainable ones.
    """
    if targets is not None and (isinstance(targets, str) or not all(isinstance(t, str) for t in targets)):
        raise ValueError(f"targets must be None or a list of name substrings, got {targets!r}")
    if freeze_base:
        module.requires_grad_(False)
    chosen = [name for name, m in module.named_modules()
              if isinstance(m, nn.Linear) and name and _selected(name, targets)]
    if not chosen:
        raise ValueError(f"targets={targets!r} matched no nn.Linear layer of {type(module).__name__}")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return module


def lora_parameters(module: nn.Module):
    """The trainable LoRA parameters (``lora_A``, ``lora_B``) of ``module``, for the aux optimizer."""
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
