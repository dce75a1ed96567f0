"""Teacher adapter: any velocity model → the internal convention, plus guided velocity.

Internal convention (docs/design.md §2): ``t = 0`` data, ``t = 1`` noise, ``x_t = (1 - t)·x + t·n`` and
``v(x_t, t) = E[n - x | x_t]``. Checkpoint families map onto it as follows:

    family                          time passed to the model     velocity returned
    "sit"                           t' = 1 - t                   v = -v'
    "repa", "freeflow", "internal"  t                            v   (tuple output → element 0)
    plain callable v(x, t, y)       t                            v
    "dit"                           DDPM ε-model: rejected (ValueError)

Guided velocity: ``u_γ = u(x|∅) + γ·(u(x|y) - u(x|∅))`` for rows whose ``t`` lies in the guidance
interval ``[lo, hi]`` (and ``γ ≠ 1``); the conditional velocity elsewhere. The unconditional rows ride
in the same forward as the conditional ones, and only for the rows that need them.
"""
from __future__ import annotations

import contextlib

import torch

from ..conventions import VELOCITY_FAMILIES, internal_velocity, native_time
from ..solvers import solve


def _resolve_family(model, family):
    family = family if family is not None else getattr(model, "family", None)
    if family is None:
        return "internal"
    if family == "dit":
        raise ValueError(
            "family='dit' is a DDPM ε-prediction model, not a velocity model; FreeFlow distills "
            "flow-matching teachers (family in {'sit', 'repa', 'freeflow', 'internal'} or a plain "
            "callable v(x, t, y) in the internal convention)")
    if family not in VELOCITY_FAMILIES:
        raise ValueError(f"family must be one of {VELOCITY_FAMILIES} or None, "
                         f"got {family!r}")
    return family


class TeacherAdapter:
    """Wraps a teacher model so that every call speaks the internal convention, without grad.

    ``model(x, t, y)`` is called with ``t`` a float tensor ``(N,)`` and ``y`` a LongTensor ``(N,)``;
    ``num_classes`` is the null (unconditional) class id. ``autocast_dtype`` (e.g. ``torch.bfloat16``)
    runs the teacher under autocast; the velocity is returned in the dtype of ``x``.
    """

    def __init__(self, model, num_classes, *, family=None, autocast_dtype=None):
        if not callable(model):
            raise ValueError(f"model must be callable as model(x, t, y), got {type(model).__name__}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int (it is also the null class id), "
                             f"got {num_classes!r}")
        self.model = model
        self.num_classes = num_classes
        self.family = _resolve_family(model, family)
        self.autocast_dtype = autocast_dtype

    def _autocast(self, device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def velocity(self, x, t, y):
        """Internal-convention velocity ``v(x, t | y)``; ``y = num_classes`` is unconditional."""
        with self._autocast(x.device):
            out = self.model(x, native_time(t, self.family), y)
        if isinstance(out, (tuple, list)):
            out = out[0]  # REPA returns (velocity, projector features)
        if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]  # learned-sigma heads: the velocity is the first half
        return internal_velocity(out.to(x.dtype), self.family)

    @torch.no_grad()
    def guided_velocity(self, x, t, y, gw, lo=0.0, hi=1.0):
        """``u_γ(x, t | y)`` with guidance ``gw`` (N,) applied only where ``lo <= t <= hi``.

        ``lo`` and ``hi`` may be floats or per-row tensors, so rows with different guidance
        intervals (prediction and correction) share one teacher forward.
        """
        n = x.shape[0]
        guided = (gw != 1.0) & (t >= lo) & (t <= hi)
        rows = guided.nonzero(as_tuple=True)[0]
        null = torch.full((rows.numel(),), self.num_classes, dtype=y.dtype, device=y.device)
        out = self.velocity(torch.cat([x, x[rows]]), torch.cat([t, t[rows]]), torch.cat([y, null]))
        cond, uncond = out[:n], out[n:]
        scale = gw[rows].to(out.dtype).view(-1, *([1] * (x.dim() - 1)))
        return cond.index_copy(0, rows, uncond + scale * (cond[rows] - uncond))

    def field(self, y, gw, lo=0.0, hi=1.0):
        """The guided velocity as an ODE right-hand side ``v(x, t)`` for fixed classes and guidance."""
        return lambda x, t: self.guided_velocity(x, t, y, gw, lo, hi)

    @torch.no_grad()
    def sample(self, z, y, gw, *, method="heun", steps=32, interval=(0.0, 1.0), t_start=1.0):
        """Integrate the guided ODE from ``z`` at ``t_start`` to data (``freeflow.solvers.solve``)."""
        return solve(self.field(y, gw, *interval), z, method, None if method == "dopri5" else steps,
                     t_start=t_start)


def as_teacher(teacher, num_classes, **kwargs):
    """``teacher`` itself if already a :class:`TeacherAdapter`, else a new adapter around it."""
    if isinstance(teacher, TeacherAdapter):
        return teacher
    return TeacherAdapter(teacher, num_classes, **kwargs)
