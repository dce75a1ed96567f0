"""LoRA adapters for the auxiliary network ``g_ψ`` (docs/design.md §3: "full copy, or LoRA for memory").

``add_lora(module, rank)`` swaps the chosen ``nn.Linear`` layers for :class:`LoRALinear`
(``W x + b + (α/r)·B A x`` with the base frozen, ``A`` Kaiming-uniform and ``B = 0``), so the adapted
network starts exactly equal to the original: ``g_ψ`` begins as the teacher. Only ``A`` and ``B``
need optimizer state and gradients, which is where the memory of a full copy goes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update ``(α/r)·B A``."""

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
    def weight(self):
        """The merged weight, for model code that reads ``linear.weight`` directly (fused kernels)."""
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A)

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        # Low-rank path kept factored: two thin GEMMs instead of materialising B A.
        update = Fn.linear(Fn.linear(x, self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * update


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
