"""One FreeFlow distillation step: configuration, the per-step losses, and one-step sampling.

Data flow of :meth:`Distiller.losses` (docs/design.md §3), for a batch of ``N`` drawn only from the prior:

    prediction rows (N·pred_fraction)           correction rows (the rest)
    z, y, γ, δ ~ p_δ                            z', y', γ', r ~ LogitNormal, n
    F, Ḟ = dual forward of F_θ(z, δ)            F₁ = F_θ(z', 1),  x₁ = z' - F₁
    x̂ = sg(z - δF),  G = sg(F + δḞ)             x_r = (1 - r)·sg(x₁) + r·n
              └──────── one teacher forward: u_γ(x̂, 1 - δ) and u_γ(x_r, r) ────────┘
    Δ = G - u                                   g = g_ψ(x_r, r, y', γ')  (with grad, for the aux)
                                                Δ_c = sg(g) - u,  λ = α·E‖Δ‖/(E‖Δ_c‖ + ε_λ)
    student loss = pred(F; G, u, k, ε) + corr(F₁; g, u, λ)        aux loss = ‖g - (n - sg(x₁))‖²/d

The student and aux losses are independent graphs; the caller (``freeflow.train``) owns the
optimizers, the gradient all-reduce, clipping and EMA. One-step sampling is
:func:`freeflow.conventions.one_step_sample` (``FlowMapStudent.sample``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields

import torch

from . import objectives as obj
from .teacher import as_teacher


@dataclass
class DistillConfig:
    """Hyperparameters of one distillation step. Defaults follow docs/design.md §3; see docs/distill.md."""

    pred_fraction: float = 0.75
    """Share of each batch used by the prediction objective; the rest is correction. 1.0 = no correction;
    0.0 = correction only (an ablation: λ is then the fixed ``alpha``, with no prediction residual to balance)."""
    power: float = 1.0
    """k of the adaptive weight ``w = (‖Δ‖²/d + eps)^-k`` (paper ablation: k = 1 best)."""
    eps: float = 1e-3
    """ε of the adaptive weight; bounds ``w`` by ``eps^-k`` once the student is close."""
    delta_dist: str = "uniform"
    """Base law of δ: "uniform" on [0, 1] or "logit_normal" (delta_logit_mean, delta_logit_std)."""
    delta_logit_mean: float = 0.0
    delta_logit_std: float = 1.0
    delta_one_prob: float = 0.0
    """Probability of replacing δ by exactly 1 (mixture with the one-step jump)."""
    gw_min: float = 1.0
    """γ ~ U[gw_min, gw_max] per sample, fed to the student and the teacher's guidance."""
    gw_max: float = 3.0
    pred_guidance_interval: tuple = (0.0, 1.0)
    """Teacher times t where the prediction target is guided; conditional velocity elsewhere."""
    corr_guidance_interval: tuple = (0.0, 0.7)
    """Same for the correction's teacher velocity (paper ablation: [0, 0.7] best)."""
    r_logit_mean: float = 0.8
    """r = sigmoid(mean + std·ε) of the correction; mean > 0 biases it to high noise."""
    r_logit_std: float = 1.0
    alpha: float = 1.0
    """α of the balance λ = α·E‖Δ‖/(E‖Δ_c‖ + balance_eps)."""
    balance_eps: float = 1e-6
    balance: str = "residual"
    """Which prediction magnitude λ matches: "residual" (E‖Δ‖ of the unweighted residual, the paper's formula),
    "weighted" (E[w‖Δ‖], the size of the gradient the prediction applies, adaptive weight w included) or "fixed"
    (λ = alpha, no balancing). docs/distill.md, "Readings of the paper"."""
    tangent: str = "jvp"
    """How ∂F/∂δ is computed: "jvp" (the student's explicit-tangent forward), "func_jvp" (torch.func.jvp through
    its plain forward: forward-mode AD, the plain-PyTorch way) or "finite_difference"."""
    fd_step: float = 1e-3
    """Step of the finite difference (raise it for bf16 students)."""

    def __post_init__(self):
        self.pred_guidance_interval = tuple(self.pred_guidance_interval)
        self.corr_guidance_interval = tuple(self.corr_guidance_interval)
        _check(0.0 <= self.pred_fraction <= 1.0, "pred_fraction", "a float in [0, 1]", self.pred_fraction)
        _check(self.power >= 0.0, "power", "k >= 0", self.power)
        _check(self.eps > 0.0, "eps", "a positive float", self.eps)
        _check(self.delta_dist in obj.DELTA_DISTRIBUTIONS, "delta_dist",
               f"one of {obj.DELTA_DISTRIBUTIONS}", self.delta_dist)
        _check(self.delta_logit_std > 0.0, "delta_logit_std", "a positive float", self.delta_logit_std)
        _check(0.0 <= self.delta_one_prob <= 1.0, "delta_one_prob", "a probability in [0, 1]",
               self.delta_one_prob)
        _check(self.gw_min <= self.gw_max, "gw_min/gw_max", "gw_min <= gw_max",
               (self.gw_min, self.gw_max))
        for name in ("pred_guidance_interval", "corr_guidance_interval"):
            lo_hi = getattr(self, name)
            _check(len(lo_hi) == 2 and 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0, name,
                   "(lo, hi) with 0 <= lo <= hi <= 1", lo_hi)
        _check(self.r_logit_std > 0.0, "r_logit_std", "a positive float", self.r_logit_std)
        _check(self.alpha >= 0.0, "alpha", "alpha >= 0", self.alpha)
        _check(self.balance_eps > 0.0, "balance_eps", "a positive float", self.balance_eps)
        _check(self.balance in BALANCE_MODES, "balance", f"one of {BALANCE_MODES}", self.balance)
        _check(self.tangent in obj.TANGENT_METHODS, "tangent", f"one of {obj.TANGENT_METHODS}",
               self.tangent)
        _check(0.0 < self.fd_step < 0.5, "fd_step", "a float in (0, 0.5)", self.fd_step)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                _check(math.isfinite(value), f.name, "a finite float", value)


BALANCE_MODES = ("residual", "weighted", "fixed")


def _check(ok, field, expected, got):
    if not ok:
        raise ValueError(f"DistillConfig.{field} must be {expected}, got {got!r}")


# ----------------------------------------------------------------------------- the engine

class Distiller:
    """Builds the FreeFlow losses for a student, a teacher and the auxiliary network ``g_ψ``.

    ``student(z, delta, y, gw) -> F`` (optionally ``forward_jvp(..., tdelta=)``); ``teacher`` a
    :class:`~freeflow.distill.TeacherAdapter` or anything it wraps; ``aux(x, t, y, gw) -> velocity``
    (may be None when ``config.pred_fraction == 1``); ``sample_shape`` the shape of one sample
    (e.g. ``(4, 32, 32)``); ``num_classes`` also the null class id.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the student (its forward and its tangent) and the aux
    network under autocast; their outputs come back in the parameters' dtype, so the targets, the adaptive
    weights, λ and every loss reduction stay in fp32 with fp32 master weights (the teacher has its own
    setting, ``TeacherAdapter(autocast_dtype=...)``).
    """

    def __init__(self, student, teacher, aux, config=None, *, sample_shape, num_classes, autocast_dtype=None):
        self.config = config if config is not None else DistillConfig()
        if not isinstance(self.config, DistillConfig):
            raise ValueError(f"config must be a DistillConfig, got {type(self.config).__name__}")
        if aux is None and self.config.pred_fraction < 1.0:
            raise ValueError("aux is None but DistillConfig.pred_fraction < 1 needs the auxiliary "
                             "network g_ψ for the correction objective")
        self.student = student
        self.teacher = as_teacher(teacher, num_classes)
        self.aux = aux
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        param = next(student.parameters())
        self.device = param.device
        self.dtype = param.dtype if param.is_floating_point() else torch.float32
        self.autocast_dtype = autocast_dtype

    def _networks(self):
        """Autocast for the student and aux forwards (a no-op without ``autocast_dtype``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _master(self, *outputs):
        """Network outputs in the master dtype: the loss math runs in fp32 whatever autocast computed in."""
        return tuple(None if t is None else t.to(self.dtype) for t in outputs)

    # -- random draws (all from `generator`, in a fixed order, so runs replay exactly)

    def split(self, batch_size):
        """``(n_pred, n_corr)``: the prediction / correction split of one batch."""
        n_pred = round(batch_size * self.config.pred_fraction)
        n_corr = batch_size - n_pred
        need_pred, need_corr = self.config.pred_fraction > 0.0, self.config.pred_fraction < 1.0
        if (need_pred and n_pred < 1) or (need_corr and n_corr < 1):
            raise ValueError(f"batch_size={batch_size} is too small for pred_fraction="
                             f"{self.config.pred_fraction}: both parts need at least one sample")
        return n_pred, n_corr

    def _draw_common(self, n, generator):
        kw = dict(generator=generator, device=self.device)
        z = torch.randn(n, *self.sample_shape, dtype=self.dtype, **kw)
        y = torch.randint(0, self.num_classes, (n,), **kw)
        c = self.config
        gw = c.gw_min + (c.gw_max - c.gw_min) * torch.rand(n, **kw)
        return z, y, gw.to(self.dtype)

    def _draw_prediction(self, n, generator):
        z, y, gw = self._draw_common(n, generator)
        c = self.config
        delta = obj.sample_delta(n, dist=c.delta_dist, logit_mean=c.delta_logit_mean,
                                 logit_std=c.delta_logit_std, one_prob=c.delta_one_prob,
                                 generator=generator, device=self.device)
        return z, y, gw, delta.to(self.dtype)

    def _draw_correction(self, n, generator):
        z, y, gw = self._draw_common(n, generator)
        c = self.config
        r = obj.sample_logit_normal(n, c.r_logit_mean, c.r_logit_std, generator=generator,
                                    device=self.device).to(self.dtype)
        noise = torch.randn(n, *self.sample_shape, dtype=self.dtype, generator=generator,
                            device=self.device)
        return z, y, gw, r, noise

    # -- the step

    def _teacher_targets(self, x_hat, delta, y, gw, x_r, r, y_c, gw_c):
        """Prediction and correction teacher velocities from one guided forward."""
        n_pred = x_hat.shape[0]
        (p_lo, p_hi), (c_lo, c_hi) = self.config.pred_guidance_interval, self.config.corr_guidance_interval
        lo = torch.cat([torch.full_like(delta, p_lo), torch.full_like(r, c_lo)])
        hi = torch.cat([torch.full_like(delta, p_hi), torch.full_like(r, c_hi)])
        u = self.teacher.guided_velocity(torch.cat([x_hat, x_r]), torch.cat([1.0 - delta, r]),
                                         torch.cat([y, y_c]), torch.cat([gw, gw_c]), lo, hi)
        return u[:n_pred], u[n_pred:]

    def losses(self, batch_size, generator=None, *, shard=None, reduce=None):
        """The student loss, the aux loss and float metrics of one step (see the module docstring).

        Returns a dict with ``"student"`` and ``"aux"`` (scalar tensors; ``"aux"`` is None when
        correction is off) and floats ``pred_loss``, ``pred_msq`` (mean ‖Δ‖²/d), ``corr_loss``,
        ``corr_msq`` (mean ‖Δ_c‖²/d), ``lambda``, ``aux_loss``, ``n_pred``, ``n_corr``.

        Several processes: ``shard=(rank, world)`` and ``reduce`` (an all-reduce sum of a tensor).
        Every rank draws the whole ``batch_size`` from the same generator and keeps its rows, and λ and
        the metrics use global sums, so that averaging the gradients over ranks gives exactly the
        one-process step on the same global batch.
        """
        c = self.config
        n_pred, n_corr = self.split(batch_size)
        rows = _shard_rows(shard, n_pred, n_corr)
        if n_pred == 0:
            return self._correction_only(n_corr, rows[1], generator, reduce)
        z, y, gw, delta = (t[rows[0]] for t in self._draw_prediction(n_pred, generator))
        with self._networks():
            F, F_dot = obj.student_and_tangent(self.student, z, delta, y, gw, method=c.tangent,
                                               fd_step=c.fd_step)
        F, F_dot = self._master(F, F_dot)
        x_hat, G = obj.prediction_targets(F, F_dot, z, delta)
        if n_corr == 0:
            u = self.teacher.guided_velocity(x_hat, 1.0 - delta, y, gw, *c.pred_guidance_interval)
            pred_loss, pred_msq = obj.prediction_loss(F, G, u, power=c.power, eps=c.eps)
            return {"student": pred_loss, "aux": None, **_metrics(pred_loss, pred_msq, n_pred, reduce=reduce)}

        F1, x1, x_r, r, yc, gwc, noise = self._correction_inputs(n_corr, rows[1], generator)
        u, u_c = self._teacher_targets(x_hat, delta, y, gw, x_r, r, yc, gwc)
        g = self._aux(x_r, r, yc, gwc)

        pred_loss, pred_msq = obj.prediction_loss(F, G, u, power=c.power, eps=c.eps)
        lam = self._balance(G - u, pred_msq, g.detach() - u_c, reduce)
        if not math.isfinite(lam):  # the loss op rejects a non-finite scale; say what went wrong instead
            raise FloatingPointError(f"non-finite balance weight lambda={lam}: the prediction or correction "
                                     "velocity difference is not finite")
        corr_loss, corr_msq = obj.correction_loss(F1, g.detach(), u_c, scale=lam)
        aux_loss = obj.aux_flow_matching_loss(g, noise, x1)
        metrics = _metrics(pred_loss, pred_msq, n_pred, corr_loss, corr_msq, lam, aux_loss, n_corr, reduce=reduce)
        return {"student": pred_loss + corr_loss, "aux": aux_loss, **metrics}

    def _balance(self, delta_pred, pred_msq, delta_corr, reduce):
        """λ of ``config.balance`` (a float: the correction's gradient scale)."""
        c = self.config
        if c.balance == "fixed":
            return float(c.alpha)
        weights = obj.adaptive_weight(pred_msq, power=c.power, eps=c.eps) if c.balance == "weighted" else None
        return obj.balance_weight(delta_pred, delta_corr, alpha=c.alpha, eps=c.balance_eps, reduce=reduce,
                                  pred_weights=weights)

    def aux_loss(self, batch_size, generator=None, *, shard=None):
        """The aux loss alone on fresh correction rows of a ``batch_size`` batch (the student only makes the
        samples, without grad): the extra aux updates of ``--aux-updates`` and the ``--aux-warmup``."""
        _, n_corr = self.split(batch_size)
        if n_corr == 0 or self.aux is None:
            raise ValueError("aux_loss needs correction rows: DistillConfig.pred_fraction < 1 and an aux network")
        rows = _shard_rows(shard, batch_size - n_corr, n_corr)[1]
        with torch.no_grad():
            _, x1, x_r, r, yc, gwc, noise = self._correction_inputs(n_corr, rows, generator)
        return obj.aux_flow_matching_loss(self._aux(x_r, r, yc, gwc), noise, x1)

    def _correction_inputs(self, n_corr, rows, generator):
        """``F₁ = F_θ(z', 1)`` (with grad), ``x₁``, ``x_r`` and the draws of the correction rows."""
        zc, yc, gwc, r, noise = (t[rows] for t in self._draw_correction(n_corr, generator))
        with self._networks():
            F1 = self.student(zc, torch.ones_like(r), yc, gwc)
        F1, = self._master(F1)
        x1 = zc - F1
        return F1, x1, obj.noised(x1, noise, r), r, yc, gwc, noise

    def _aux(self, x_r, r, y, gw):
        """``g_ψ(x_r, r, y, γ)`` (with grad, for the aux loss), under the networks' autocast."""
        with self._networks():
            g = self.aux(x_r, r, y, gw)
        return self._master(g)[0]

    def _correction_only(self, n_corr, rows, generator, reduce):
        """``pred_fraction = 0`` (ablation): the correction alone, scaled by the fixed λ = α."""
        c = self.config
        F1, x1, x_r, r, yc, gwc, noise = self._correction_inputs(n_corr, rows, generator)
        u_c = self.teacher.guided_velocity(x_r, r, yc, gwc, *c.corr_guidance_interval)
        g = self._aux(x_r, r, yc, gwc)
        corr_loss, corr_msq = obj.correction_loss(F1, g.detach(), u_c, scale=c.alpha)
        aux_loss = obj.aux_flow_matching_loss(g, noise, x1)
        zero = corr_loss.detach().new_zeros(())
        metrics = _metrics(zero, zero.reshape(1), 0, corr_loss, corr_msq, c.alpha, aux_loss, n_corr, reduce=reduce)
        return {"student": corr_loss, "aux": aux_loss, **metrics}


def _shard_rows(shard, n_pred, n_corr):
    """Row slices of this rank's share of the prediction and correction parts."""
    if shard is None:
        return slice(None), slice(None)
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    if n_pred % world or n_corr % world:
        raise ValueError(f"the prediction/correction split ({n_pred}, {n_corr}) of the global batch must be "
                         f"divisible by the number of processes {world}")
    p, q = n_pred // world, n_corr // world
    return slice(rank * p, (rank + 1) * p), slice(rank * q, (rank + 1) * q)


_AVERAGED = ("pred_loss", "pred_msq", "corr_loss", "corr_msq", "aux_loss")


def _metrics(pred_loss, pred_msq, n_pred, corr_loss=None, corr_msq=None, lam=0.0, aux_loss=None,
             n_corr=0, reduce=None):
    def t(v):
        return v.detach().float().reshape(()) if v is not None else pred_loss.new_zeros((), dtype=torch.float32)

    values = torch.stack([t(pred_loss), t(pred_msq.mean()), t(corr_loss),
                          t(corr_msq.mean() if corr_msq is not None else None), t(aux_loss)])
    if reduce is not None:  # equal shares per rank: the mean of the rank means is the global mean
        ones = torch.ones((), device=values.device)
        world = reduce(ones)
        values = reduce(values) / world
    out = dict(zip(_AVERAGED, values.tolist()))
    return {**out, "lambda": float(lam), "n_pred": n_pred, "n_corr": n_corr}
