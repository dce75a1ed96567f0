"""FreeFlow students and auxiliary velocity networks built from a teacher (docs/design.md §2).

Both wrap a ``DiT`` and speak the internal convention (t = 1 noise, velocity n - x) whatever the
teacher's family: for a SiT teacher the time input is mapped t' = 1 - t and the output negated.

* ``FlowMapStudent``: ``F_θ(z, δ)`` with the one-step map ``z - δ·F``. The network's time input is fixed at
  the noise end; δ and the guidance weight γ enter through ``dt_embedder`` / ``gw_embedder`` (zero-initialised
  last Linear), so at initialisation ``F_θ(z, δ) = v_teacher(z, t=1)``: one Euler step of the teacher.
  An optional start time ``t`` (default 1) makes the same network a two-time map ``u(x_t, t, δ)`` with
  ``x_{t-δ} = x_t - δ·u``, as the data-based MeanFlow baseline (``freeflow.distill.meanflow``) trains it.
* ``GuidedVelocityNet``: ``g_ψ(x, t, y, γ)``, the correction branch's estimate of the student's own
  velocity field, initialised as a copy of the teacher plus a zero-initialised ``gw_embedder``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..conventions import FLIPPED_FAMILIES, internal_velocity, native_time, one_step_sample
from .dit import DiT, DiTConfig


def _check_family(teacher: DiT):
    if not isinstance(teacher, DiT):
        raise ValueError(f"teacher must be a freeflow.models.DiT, got {type(teacher).__name__}")
    if teacher.family == "dit":
        raise ValueError("teacher family 'dit' is a DDPM ε-model, not a velocity model; FreeFlow needs a flow "
                         "teacher (family 'sit', 'repa', 'freeflow' or 'internal')")


def _clone_with(teacher: DiT, *, take_dt: bool, take_gw: bool, extra_depth: int = 0) -> DiT:
    """A copy of the teacher's network with extra conditioning embedders (zero last Linear) and
    ``extra_depth`` new blocks after the teacher's (adaLN-Zero: each starts as the identity)."""
    if not isinstance(extra_depth, int) or extra_depth < 0:
        raise ValueError(f"extra_depth must be an integer >= 0, got {extra_depth!r}")
    depth = teacher.config.depth
    cfg = DiTConfig(**{**teacher.config.to_dict(), "take_dt": take_dt, "take_gw": take_gw,
                       "depth": depth + extra_depth})
    net = DiT(cfg, family=teacher.family, backend=teacher.backend)
    missing, unexpected = net.load_state_dict(teacher.state_dict(), strict=False)
    grown = tuple(f"blocks.{i}." for i in range(depth, depth + extra_depth))
    new = [k for k in missing if not k.startswith(("dt_embedder.", "gw_embedder.", *grown))]
    if new or unexpected:
        raise ValueError(f"teacher state does not fit its clone: missing {new}, unexpected {unexpected}")
    for emb in (net.dt_embedder, net.gw_embedder):
        if emb is not None:  # same frequency features as the time embedder; output starts at zero
            emb.mlp[0].load_state_dict(net.t_embedder.mlp[0].state_dict())
            nn.init.zeros_(emb.mlp[2].weight)
            nn.init.zeros_(emb.mlp[2].bias)
    return net.to(next(teacher.parameters()).device)


def student_depth(state: dict) -> int:
    """Number of DiT blocks in a ``FlowMapStudent`` state dict (keys ``net.blocks.<i>.…``)."""
    return len({k.split(".")[2] for k in state if k.startswith("net.blocks.")})


class _ConventionMixin:
    net: DiT

    def native_time(self, t):
        return native_time(t, self.net.family)

    def internal_velocity(self, v):
        return internal_velocity(v, self.net.family)


class FlowMapStudent(_ConventionMixin, nn.Module):
    """``F_θ(z, δ, y, γ)``: the FreeFlow one-step flow map from the prior, ``x = z - δ·F``."""

    def __init__(self, net: DiT):
        super().__init__()
        if not (net.config.take_dt and net.config.take_gw):
            raise ValueError("net must be built with take_dt=True and take_gw=True")
        self.net = net

    @classmethod
    def from_teacher(cls, teacher: DiT, extra_depth: int = 0) -> FlowMapStudent:
        """The student that starts as one Euler step of ``teacher``; ``extra_depth`` appends that many
        identity-initialised blocks (more capacity than the teacher for the one-step map)."""
        _check_family(teacher)
        return cls(_clone_with(teacher, take_dt=True, take_gw=True, extra_depth=extra_depth))

    def _time(self, z, t=None):
        """The network's time input: the noise end (internal t = 1) when ``t`` is None, else ``t`` mapped."""
        if t is None:
            return self.native_time(torch.ones(z.shape[0], device=z.device, dtype=torch.float32))
        return self.native_time(t)

    def _time_tangent(self, tt):
        """Tangent of the native time along ``tt``: d(native)/dt = -1 for flipped families (t' = 1 - t)."""
        if tt is None:
            return None
        return -tt if self.net.family in FLIPPED_FAMILIES else tt

    def forward(self, z, delta, y, gw, t=None):
        """``F_θ(z, δ)`` from the noise end, or ``u_θ(x_t, t, δ)`` from time ``t`` (N,) when given.

        The map is ``x_{t-δ} = x_t - δ·F``; ``t=None`` means ``t = 1`` (the FreeFlow student).
        """
        return self.internal_velocity(self.net(z, self._time(z, t), y, dt=delta, gw=gw))

    def forward_jvp(self, z, delta, y, gw, *, tz=None, tdelta=None, tgw=None, t=None, tt=None):
        """(F, dF along the tangents); the trainer uses ``tdelta = 1`` for ∂F/∂δ.

        ``t`` as in :meth:`forward`; ``tt`` is a tangent on that (internal) time, so ``tz=v, tt=1, tdelta=1``
        gives MeanFlow's total derivative. For flipped families the network's time tangent is ``-tt``.
        """
        out, tout = self.net.forward_jvp(z, self._time(z, t), y, dt=delta, gw=gw, tx=tz,
                                         tt=self._time_tangent(tt), tdt=tdelta, tgw=tgw)
        return self.internal_velocity(out), self.internal_velocity(tout)

    def sample(self, z, y, gw, delta=None):
        """One-step sample ``z - δ·F(z, δ)`` (δ = 1: the data end); see :func:`freeflow.conventions.one_step_sample`."""
        return one_step_sample(self, z, y, gw, delta)


class GuidedVelocityNet(_ConventionMixin, nn.Module):
    """``g_ψ(x, t, y, γ)`` in the internal convention (the correction branch's auxiliary network)."""

    def __init__(self, net: DiT):
        super().__init__()
        if not net.config.take_gw:
            raise ValueError("net must be built with take_gw=True")
        self.net = net

    @classmethod
    def from_teacher(cls, teacher: DiT) -> GuidedVelocityNet:
        _check_family(teacher)
        return cls(_clone_with(teacher, take_dt=False, take_gw=True))

    def forward(self, x, t, y, gw):
        return self.internal_velocity(self.net(x, self.native_time(t), y, gw=gw))
