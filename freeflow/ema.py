"""Exponential moving average of a model's parameters (one helper for the trainer and the demo teacher)."""
from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 - decay)·model`` over the floating-point parameters, in one fused call."""
    e = [p for p in ema.parameters() if p.is_floating_point()]
    m = [p.detach() for p in model.parameters() if p.is_floating_point()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


def warmup_decay(decay: float, step: int) -> float:
    """``min(decay, (1 + step)/(10 + step))``: early averages do not remember the random init (timm, Karras)."""
    return min(decay, (1 + step) / (10 + step))
