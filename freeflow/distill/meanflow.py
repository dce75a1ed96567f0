"""Data-based flow-map distillation in MeanFlow form: the baseline FreeFlow is compared with.

Internal convention (docs/design.md §2): ``x_t = (1 - t)·x + t·n`` (``t = 0`` data, ``t = 1`` noise),
velocity ``v = n - x``, ``dx_t/dt = v``. The student is a two-time map: ``u_θ(x_t, t, δ)`` with

    x_s = x_t - δ·u(x_t, t, δ),    s = t - δ,    u(x_t, t, δ) = (1/δ)·∫_{t-δ}^{t} v(x_τ, τ) dτ,

the *average* velocity along the ODE path through ``x_t`` (``δ → 0`` gives ``v`` itself; ``t = δ = 1`` is
the one-step sampler ``z - u(z, 1, 1)``). Differentiating ``δ·u(x_t, t, δ) = ∫_s^t v dτ`` in ``t`` at
fixed ``s`` (so ``dδ/dt = 1``), with ``x_t`` moving along the path (``dx_t/dt = v``), gives the MeanFlow
identity

    u = v(x_t, t) - δ·(∂_x u·v + ∂_t u + ∂_δ u),

whose bracket is one forward-mode derivative: the JVP of ``u_θ`` along the tangents
``(tz, tt, tdelta) = (v, 1, 1)``. The residual of the identity is therefore

    F = u_θ(x_t, t, δ),    G = sg(F + δ·JVP),    Δ = G - v,

and the loss is the prediction surrogate of docs/design.md §3,
:func:`freeflow.distill.objectives.prediction_loss` ``(F, G, v, power=k, eps=ε)``: value
``mean_i w_i‖Δ_i‖²/d``, gradient ``(2/(N d))·w_i·Δ_i`` into ``F``, ``w_i = sg((‖Δ_i‖²/d + ε)^-k)``. This
is MeanFlow's regression of ``F`` on ``sg(v - δ·JVP)`` with FreeFlow's adaptive weight.

*Data-based*: unlike FreeFlow (which reads only the prior), ``x_t`` is built by noising real, possibly
augmented, data ``x`` with fresh ``n ~ N(0, I)``, and ``v`` is not the conditional ``n - x`` but the
teacher's guided velocity ``u_γ(x_t, t, y)`` (``TeacherAdapter.guided_velocity``, guidance interval of the
config) — a distillation of the teacher, restricted to the states the data visits. When the data do not
match the teacher's own distribution (augmentation), the student learns the teacher's map on the wrong
states; that mismatch is what the comparison with FreeFlow measures.

Times: ``t = 1`` with probability ``t_one_prob`` (the prior end the one-step sampler starts from), else
``t ~ U(0, 1]``; ``δ = t`` (the jump to data) with probability ``delta_one_prob``, else ``δ = t·U``,
``U ~ U[0, 1)``. Random draws come from ``generator`` in this fixed order: ``n``, ``t``, the ``t = 1``
coin, ``U``, the ``δ = t`` coin, ``γ`` (coins drawn even at probability 0, so the stream does not depend
on the settings). Sampling is the ordinary one-step ``student.sample(z, y, gw)`` (``t = δ = 1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from . import objectives as obj
from .teacher import as_teacher


@dataclass
class MeanFlowConfig:
    """Hyperparameters of one data-based MeanFlow distillation step (see the module docstring)."""

    power: float = 1.0
    """k of the adaptive weight ``w = (‖Δ‖²/d + eps)^-k`` (0 = plain mean squared residual)."""
    eps: float = 1e-2
    """ε of the adaptive weight; bounds ``w`` by ``eps^-k``."""
    gw_min: float = 1.5
    """γ ~ U[gw_min, gw_max] per sample, fed to the student and to the teacher's guidance."""
    gw_max: float = 2.5
    """Upper end of the γ range (``gw_min <= gw_max``; equal values fix γ)."""
    guidance_interval: tuple = (0.0, 1.0)
    """Teacher times t where the target velocity is guided; the conditional velocity elsewhere."""
    t_one_prob: float = 0.25
    """Probability that t = 1 exactly: the prior end, where the one-step sampler starts."""
    delta_one_prob: float = 0.25
    """Probability that δ = t: the jump all the way to data (with t = 1: the one-step map itself)."""

    def __post_init__(self):
        self.guidance_interval = tuple(self.guidance_interval)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "guidance_interval":
                _check(isinstance(value, (int, float)) and not isinstance(value, bool), f.name, "a real number",
                       value)
                _check(math.isfinite(value), f.name, "a finite float", value)
        _check(self.power >= 0.0, "power", "k >= 0", self.power)
        _check(self.eps > 0.0, "eps", "a positive float", self.eps)
        _check(self.gw_min <= self.gw_max, "gw_min/gw_max", "gw_min <= gw_max", (self.gw_min, self.gw_max))
        lo_hi = self.guidance_interval
        _check(len(lo_hi) == 2 and all(isinstance(v, (int, float)) for v in lo_hi)
               and 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0, "guidance_interval",
               "(lo, hi) with 0 <= lo <= hi <= 1", lo_hi)
        for name in ("t_one_prob", "delta_one_prob"):
            p = getattr(self, name)
            _check(0.0 <= p <= 1.0, name, "a probability in [0, 1]", p)


def _check(ok, field, expected, got):
    if not ok:
        raise ValueError(f"MeanFlowConfig.{field} must be {expected}, got {got!r}")


class MeanFlowDistiller:
    """The data-based MeanFlow losses for a two-time student and a teacher.

    ``student(z, delta, y, gw, t=t) -> u`` (e.g. :class:`freeflow.models.FlowMapStudent`), optionally
    ``student.forward_jvp(z, delta, y, gw, *, tz, tdelta, t, tt) -> (u, u̇)``; without it
    ``torch.func.jvp`` over ``(z, t, δ)`` is used. ``teacher``: a :class:`~freeflow.distill.TeacherAdapter`
    or anything it wraps; ``num_classes`` is also the null class id.
    """

    def __init__(self, student, teacher, config=None, *, num_classes):
        self.config = config if config is not None else MeanFlowConfig()
        if not isinstance(self.config, MeanFlowConfig):
            raise ValueError(f"config must be a MeanFlowConfig, got {type(self.config).__name__}")
        self.student = student
        self.teacher = as_teacher(teacher, num_classes)
        self.num_classes = num_classes
        param = next(iter(student.parameters()), None) if hasattr(student, "parameters") else None
        self.device = None if param is None else param.device
        self.dtype = param.dtype if param is not None and param.is_floating_point() else None

    # -- random draws (all from `generator`, in a fixed order, so runs replay exactly)

    def draw(self, x, generator=None):
        """``(n, t, δ, γ)`` for a batch of data ``x`` (N, ...): noise, times and guidance weights."""
        c = self.config
        kw = dict(generator=generator, device=x.device)
        n_rows = x.shape[0]
        noise = torch.randn(x.shape, dtype=x.dtype, **kw)
        t = 1.0 - torch.rand(n_rows, **kw)  # U(0, 1]
        t = torch.where(torch.rand(n_rows, **kw) < c.t_one_prob, torch.ones_like(t), t)
        delta = t * torch.rand(n_rows, **kw)  # t·U[0, 1)
        delta = torch.where(torch.rand(n_rows, **kw) < c.delta_one_prob, t, delta)
        gw = c.gw_min + (c.gw_max - c.gw_min) * torch.rand(n_rows, **kw)
        return noise, t.to(x.dtype), delta.to(x.dtype), gw.to(x.dtype)

    def _check_batch(self, x, y):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be a batch of data (N, ...) with at least 2 dimensions, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be class ids of shape ({x.shape[0]},) to match x {tuple(x.shape)}, got {got}")
        if y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"y must hold integer class ids, got dtype {y.dtype}")
        if x.shape[0] < 1:
            raise ValueError("x must hold at least one sample")

    def student_and_jvp(self, x_t, t, delta, y, gw, v):
        """``(F, JVP)``: ``F = u_θ(x_t, t, δ)`` differentiable, JVP along ``(v, 1, 1)`` on ``(x_t, t, δ)`` detached."""
        ones = torch.ones_like(t)
        if hasattr(self.student, "forward_jvp"):
            F, F_dot = self.student.forward_jvp(x_t, delta, y, gw, tz=v, tdelta=ones, t=t, tt=ones)
        else:
            F, F_dot = torch.func.jvp(lambda z_, t_, d_: self.student(z_, d_, y, gw, t=t_),
                                      (x_t, t, delta), (v, ones, ones))
        return F, F_dot.detach()

    def losses(self, x, y, generator=None):
        """The student loss and float metrics of one step on the data batch ``(x, y)``.

        Returns ``{"student": scalar tensor (grad to the student), "pred_loss": float, "pred_msq": float}``
        with ``pred_msq`` = mean ‖Δ‖²/d. ``x`` (N, ...) is moved to the student's device and dtype.
        """
        self._check_batch(x, y)
        c = self.config
        x = x.to(device=x.device if self.device is None else self.device,
                 dtype=x.dtype if self.dtype is None else self.dtype)
        y = y.to(x.device)
        noise, t, delta, gw = self.draw(x, generator)
        r = t.view(-1, *([1] * (x.dim() - 1)))
        x_t = (1.0 - r) * x + r * noise
        v = self.teacher.guided_velocity(x_t, t, y, gw, *c.guidance_interval)
        F, F_dot = self.student_and_jvp(x_t, t, delta, y, gw, v)
        G = F.detach() + delta.view_as(r).to(F.dtype) * F_dot
        loss, msq = obj.prediction_loss(F, G, v, power=c.power, eps=c.eps)
        return {"student": loss, "pred_loss": float(loss.detach()), "pred_msq": float(msq.detach().mean())}
