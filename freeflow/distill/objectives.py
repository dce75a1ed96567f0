"""The two FreeFlow objectives, the auxiliary flow-matching loss, and the δ / r samplers (docs/design.md §3).

Notation (internal convention, docs/design.md §2): the student is ``F = F_θ(z, δ)`` with flow map
``f_θ(z, δ) = z - δ·F`` from the prior (``t = 1``) to ``t = 1 - δ``.

Prediction. ``G = F + δ·∂F/∂δ`` is the velocity the student's own path has at ``x̂ = f_θ(z, δ)``
(``d f_θ/dδ = -G`` and ``dx/dt = v`` with ``t = 1 - δ``), so the student follows the teacher when
``Δ = G - u_γ(x̂, 1 - δ) = 0``. The surrogate ``mean_i w_i‖F_i - sg(F_i - Δ_i)‖²/d`` with
``w_i = sg((‖Δ_i‖²/d + ε)^-k)`` pushes ``F`` against ``Δ``.

Correction. One-step samples ``x₁ = z' - F_θ(z', 1)`` are noised to ``x_r = (1 - r)·sg(x₁) + r·n``;
``Δ_c = g_ψ(x_r, r) - u_γ(x_r, r)`` is the gap between the student's and the teacher's marginal
velocities. Because ``v = -(t·score + x_t)/(1 - t)``, ``Δ_c ∝ score_teacher - score_student``
with a positive factor, so moving ``x₁`` along ``+Δ_c`` (``F`` along ``-Δ_c``) lowers the KL;
the surrogate ``λ·mean_i‖F_i - sg(F_i - Δ_c,i)‖²/d`` does exactly that.

Both surrogates are ``freeflow.losses.velocity_alignment_loss`` (A and B constants, grad to F only).
"""
from __future__ import annotations

import torch

from ..conventions import flow_map, rows
from ..losses import velocity_alignment_loss

DELTA_DISTRIBUTIONS = ("uniform", "logit_normal")
TANGENT_METHODS = ("jvp", "func_jvp", "finite_difference")


# ----------------------------------------------------------------------------- samplers

def sample_logit_normal(n, mean, std, *, generator=None, device=None):
    """``sigmoid(mean + std·ε)``: support (0, 1), so its range reaches both ends."""
    eps = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(mean + std * eps)


def sample_delta(n, *, dist="uniform", logit_mean=0.0, logit_std=1.0, one_prob=0.0,
                 generator=None, device=None):
    """Durations ``δ ∈ [0, 1]``: a base law, mixed with a point mass at ``δ = 1`` of weight ``one_prob``.

    The point mass spends part of the prediction batch on the one-step jump itself, which is the
    map that is sampled at inference.
    """
    if dist == "uniform":
        delta = torch.rand(n, generator=generator, device=device)
    elif dist == "logit_normal":
        delta = sample_logit_normal(n, logit_mean, logit_std, generator=generator, device=device)
    else:
        raise ValueError(f"delta_dist must be one of {DELTA_DISTRIBUTIONS}, got {dist!r}")
    # Drawn even when one_prob == 0 so the random stream does not depend on the setting.
    pick_one = torch.rand(n, generator=generator, device=device) < one_prob
    return torch.where(pick_one, torch.ones_like(delta), delta)


# ----------------------------------------------------------------------------- prediction

def student_and_tangent(student, z, delta, y, gw, *, method="jvp", fd_step=1e-3):
    """``(F, Ḟ)`` with ``F = F_θ(z, δ)`` differentiable and ``Ḟ = ∂F/∂δ`` detached.

    ``jvp`` uses ``student.forward_jvp(..., tdelta=1)`` when the student has it, otherwise
    ``torch.func.jvp`` over δ; ``func_jvp`` always takes ``torch.func.jvp`` through ``forward`` (forward-mode
    AD: what plain PyTorch code does, the baseline of ``benchmarks/bench_step.py``). ``finite_difference``
    adds a central difference of step ``fd_step`` under ``no_grad`` (one-sided where ``δ ± fd_step`` leaves [0, 1]).
    """
    if method in ("jvp", "func_jvp"):
        ones = torch.ones_like(delta)
        if method == "jvp" and hasattr(student, "forward_jvp"):
            F, F_dot = student.forward_jvp(z, delta, y, gw, tdelta=ones)
        else:
            F, F_dot = torch.func.jvp(lambda d: student(z, d, y, gw), (delta,), (ones,))
        return F, F_dot.detach()
    if method == "finite_difference":
        F = student(z, delta, y, gw)
        return F, finite_difference_tangent(student, z, delta, y, gw, fd_step)
    raise ValueError(f"tangent must be one of {TANGENT_METHODS}, got {method!r}")


@torch.no_grad()
def finite_difference_tangent(student, z, delta, y, gw, step):
    """``∂F/∂δ`` by a difference quotient over one batched forward of both stencil points."""
    hi = torch.where(delta + step > 1.0, delta, delta + step)
    lo = torch.where(delta - step < 0.0, delta, delta - step)
    F2 = student(torch.cat([z, z]), torch.cat([hi, lo]), torch.cat([y, y]), torch.cat([gw, gw]))
    F_hi, F_lo = F2.chunk(2)
    return (F_hi - F_lo) / rows(hi - lo, F_hi)


def prediction_targets(F, F_dot, z, delta):
    """``x̂ = sg(z - δ·F)`` (where the teacher is queried, at ``t = 1 - δ``) and ``G = sg(F + δ·Ḟ)``."""
    F = F.detach()
    return flow_map(z, delta, F), F + rows(delta, F) * F_dot.detach()


def prediction_loss(F, G, u, *, power=1.0, eps=1e-3):
    """``(loss, ‖Δ_i‖²/d)``: value ``mean_i w_i‖Δ_i‖²/d``, grad ``(2/(N d))·w_i·Δ_i`` to ``F``."""
    return velocity_alignment_loss(F, G, u, power=power, eps=eps, return_per_sample=True)


# ----------------------------------------------------------------------------- correction

def noised(x1, n, r):
    """``x_r = (1 - r)·sg(x₁) + r·n``: the student's samples on the interpolant at time ``r``."""
    r = rows(r, x1)
    return (1.0 - r) * x1.detach() + r * n


def adaptive_weight(msq, *, power=1.0, eps=1e-3):
    """``w_i = (‖Δ_i‖²/d + ε)^-k`` from the per-sample ``msq = ‖Δ_i‖²/d``: the prediction gradient is ``∝ w_i·Δ_i``."""
    return (msq.detach() + eps).pow(-power)


def balance_weight(delta_pred, delta_corr, *, alpha=1.0, eps=1e-8, reduce=None, pred_weights=None):
    """``λ = α·E‖Δ‖ / (E‖Δ_c‖ + ε)`` as a float, so the correction gradient is on the prediction's scale.

    ``pred_weights`` (per prediction row) replaces ``‖Δ_i‖`` by ``w_i·‖Δ_i‖``: the size of the prediction's
    gradient rather than of its residual. ``reduce`` (an all-reduce sum) makes the expectations global when each
    process holds a share of the batch.
    """
    pred = delta_pred.detach().flatten(1).norm(dim=1)
    if pred_weights is not None:
        pred = pred * pred_weights.to(pred.dtype)
    corr = delta_corr.detach().flatten(1).norm(dim=1)
    sums = torch.stack([pred.sum(), corr.sum(), pred.new_tensor(pred.numel()), pred.new_tensor(corr.numel())])
    if reduce is not None:
        sums = reduce(sums)
    return float(alpha * (sums[0] / sums[2]) / (sums[1] / sums[3] + eps))


def correction_loss(F1, g, u, *, scale):
    """``(loss, ‖Δ_c,i‖²/d)``: value ``mean_i‖Δ_c,i‖²/d``, grad ``(2/(N d))·λ·Δ_c,i`` to ``F(z', 1)``."""
    return velocity_alignment_loss(F1, g, u, power=0.0, scale=scale, return_per_sample=True)


def aux_flow_matching_loss(g, n, x1):
    """``mean ‖g_ψ(x_r, r) - (n - sg(x₁))‖²/d``: flow matching on the student's own samples."""
    return (g - (n - x1.detach())).pow(2).mean()
