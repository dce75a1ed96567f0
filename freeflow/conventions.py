"""The project's one time/velocity convention, the checkpoint families mapped onto it, and the flow map.

Internal convention (docs/design.md, "Conventions"): ``t = 0`` data, ``t = 1`` noise,
``x_t = (1 - t)·x + t·n``, velocity ``v = n - x``; sampling integrates ``dx/dt = v`` from 1 to 0.

    family                          time the network expects     its output
    "sit"                           t' = 1 - t ("flipped")       v' = x - n = -v
    "repa", "freeflow", "internal"  t                            v
    "dit"                           DDPM ε-model, t ∈ [0, 1000)  ε (no velocity: not a flow teacher)

The FreeFlow student's flow map from the prior is ``f_θ(z, δ) = z - δ·F_θ(z, δ)``; its one-step sample
is ``f_θ(z, 1)``. This module is torch-only and loads no model code, so that ``freeflow.models`` and
``freeflow.distill`` can both use it without depending on each other.
"""
from __future__ import annotations

import torch

FAMILIES = ("dit", "sit", "repa", "freeflow", "internal")
FLIPPED_FAMILIES = ("sit",)
INTERNAL_FAMILIES = ("repa", "freeflow", "internal")
VELOCITY_FAMILIES = FLIPPED_FAMILIES + INTERNAL_FAMILIES


def native_time(t, family):
    """Internal time → the time the network of ``family`` expects."""
    return 1 - t if family in FLIPPED_FAMILIES else t


def internal_velocity(v, family):
    """The network's output → velocity in the internal convention (None stays None)."""
    return -v if (v is not None and family in FLIPPED_FAMILIES) else v


def rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row scalars ``(N,)`` shaped to broadcast against ``like`` ``(N, ...)``, in its dtype."""
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def flow_map(z: torch.Tensor, delta: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """``f(z, δ) = z - δ·F``: the state at ``t = 1 - δ`` reached from the prior sample ``z``."""
    return z - rows(delta, F) * F


@torch.no_grad()
def one_step_sample(student, z, y, gw, delta=None):
    """``z - δ·F_θ(z, δ)`` for any student ``student(z, delta, y, gw) -> F`` (δ = 1: the data end).

    The student's time input is fixed at the noise end, so its map starts only from ``t = 1``: there
    is no jump from an intermediate time to compose into several steps. For few-step quality, let the
    teacher finish from ``t = 1 - δ`` (``python -m freeflow.sample --mode handoff``).
    """
    if delta is None:
        delta = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
    return flow_map(z, delta, student(z, delta, y, gw))
