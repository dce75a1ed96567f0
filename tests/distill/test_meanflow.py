"""The data-based MeanFlow baseline (freeflow.distill.meanflow) and the two-time FlowMapStudent.

References are independent of the code under test: ``torch.func.jvp`` of the student's ``forward`` for its
``forward_jvp``; the closed-form flow map of Gaussian data (whose MeanFlow residual must vanish); hand-written
partial derivatives, guidance and adaptive weight for the loss gradient.
"""
import functools
import math

import pytest
import torch
from torch import nn

from freeflow.distill import MeanFlowConfig, MeanFlowDistiller, TeacherAdapter
from freeflow.models import DiT as _DiT
from freeflow.models import DiTConfig, FlowMapStudent

DiT = functools.partial(_DiT, backend="reference")
REL = 1e-5
NUM_CLASSES = 3


def _randomize(model, seed=0, std=0.05):
    """Non-zero weights everywhere (adaLN-Zero init and the zeroed embedders would hide most paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tiny_student(family, seed=3):
    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                    num_classes=NUM_CLASSES, learn_sigma=False)
    teacher = _randomize(DiT(cfg, family=family), seed=seed)
    return teacher, _randomize(FlowMapStudent.from_teacher(teacher), seed=seed + 1)


def _student_inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, 8, 8, generator=g)
    t = 0.1 + 0.9 * torch.rand(n, generator=g)
    delta = t * torch.rand(n, generator=g)
    gw = 1 + 2 * torch.rand(n, generator=g)
    y = torch.randint(0, NUM_CLASSES + 1, (n,), generator=g)
    return z, t, delta, y, gw


# ----------------------------------------------------------------------------- the two-time student

@pytest.mark.parametrize("family", ["internal", "sit"])
def test_student_without_time_is_the_noise_end_map_and_time_maps_by_family(family):
    _, student = _tiny_student(family)
    z, t, delta, y, gw = _student_inputs()
    net = student.net
    ones = torch.ones(3)
    with torch.no_grad():
        # today's call, written out: the network's time pinned at the noise end, output mapped by family
        old = -net(z, torch.zeros(3), y, dt=delta, gw=gw) if family == "sit" else net(z, ones, y, dt=delta, gw=gw)
        assert torch.equal(student(z, delta, y, gw), old)
        assert torch.equal(student(z, delta, y, gw, t=ones), old)
        assert torch.equal(student.forward_jvp(z, delta, y, gw)[0], old)
        # an intermediate time: t' = 1 - t and v = -v' for SiT, unchanged otherwise
        want = -net(z, 1 - t, y, dt=delta, gw=gw) if family == "sit" else net(z, t, y, dt=delta, gw=gw)
        torch.testing.assert_close(student(z, delta, y, gw, t=t), want, rtol=0, atol=0)
        assert not torch.allclose(want, old, atol=1e-4)  # the time input matters in this net


@pytest.mark.parametrize("family", ["internal", "sit"])
@pytest.mark.parametrize("at_noise_end", [False, True])
def test_student_forward_jvp_with_time_tangent_equals_torch_func_jvp(family, at_noise_end):
    _, student = _tiny_student(family)
    z, t, delta, y, gw = _student_inputs()
    if at_noise_end:
        t = torch.ones(3)
    g = torch.Generator().manual_seed(7)
    tz, tt, tdelta, tgw = (torch.randn(v.shape, generator=g) for v in (z, t, delta, gw))
    with torch.no_grad():
        want = torch.func.jvp(lambda z_, t_, d_, g_: student(z_, d_, y, g_, t=t_), (z, t, delta, gw),
                              (tz, tt, tdelta, tgw))
        got = student.forward_jvp(z, delta, y, gw, tz=tz, tdelta=tdelta, tgw=tgw, t=t, tt=tt)
        # the time tangent alone, too (the MeanFlow JVP has tt = 1 beside tz and tdelta)
        want_t = torch.func.jvp(lambda t_: student(z, delta, y, gw, t=t_), (t,), (torch.ones_like(t),))
        got_t = student.forward_jvp(z, delta, y, gw, t=t, tt=torch.ones_like(t))
    assert _rel(got[0], want[0]) <= REL and _rel(got[1], want[1]) <= REL
    assert _rel(got_t[1], want_t[1]) <= REL
    assert got_t[1].abs().max() > 1e-4  # a non-trivial time derivative, so a sign error would show


# ----------------------------------------------------------------------------- Gaussian data: exact flow map

def _gaussian(shape=(1, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(1, *shape, generator=g, dtype=torch.float64)
    s = 0.3 + torch.rand(1, *shape, generator=g, dtype=torch.float64)
    return m, s


def _col(v, like):
    return v.view(-1, *([1] * (like.dim() - 1)))


def _sigma(t, s):
    return torch.sqrt((1 - t) ** 2 * s ** 2 + t ** 2)


def gaussian_velocity(m, s):
    """E[n - x | x_t] for x ~ N(m, s²) per pixel: affine in x_t (internal convention)."""
    def v(x, t, y):
        t = _col(t, x)
        return -m + (t - (1 - t) * s ** 2) / _sigma(t, s) ** 2 * (x - (1 - t) * m)
    return v


class ExactMeanFlow(nn.Module):
    """u(x_t, t, δ) = (x_t - x_s)/δ with the closed-form ODE map of the Gaussian, times (1 + a)."""

    def __init__(self, m, s, a=0.0):
        super().__init__()
        self.m, self.s = m, s
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, z, delta, y, gw, t=None):
        t = torch.ones_like(delta) if t is None else t
        t, d = _col(t, z), _col(delta, z)
        s_ = t - d
        x_s = (1 - s_) * self.m + _sigma(s_, self.s) / _sigma(t, self.s) * (z - (1 - t) * self.m)
        return (z - x_s) / d * (1 + self.a)


def _gaussian_data(m, s, n, seed):
    g = torch.Generator().manual_seed(seed)
    return m + s * torch.randn(n, *m.shape[1:], generator=g, dtype=torch.float64), torch.zeros(n, dtype=torch.long)


def test_meanflow_residual_vanishes_for_the_exact_flow_map_of_gaussian_data():
    m, s = _gaussian()
    teacher = TeacherAdapter(gaussian_velocity(m, s), NUM_CLASSES)
    x, y = _gaussian_data(m, s, 256, seed=1)
    exact = MeanFlowDistiller(ExactMeanFlow(m, s), teacher, num_classes=NUM_CLASSES)
    out = exact.losses(x, y, generator=torch.Generator().manual_seed(2))
    assert out["pred_msq"] < 1e-20
    # the same draws with a 5 % error in u: Δ = 0.05·(u + δ·JVP) = 0.05·v, clearly non-zero
    off = MeanFlowDistiller(ExactMeanFlow(m, s, a=0.05), teacher, num_classes=NUM_CLASSES)
    bad = off.losses(x, y, generator=torch.Generator().manual_seed(2))
    assert bad["pred_msq"] > 1e-4
    # a student that ignores t (the FreeFlow student's map from t = 1 used at every t) is also wrong
    class FromNoiseOnly(ExactMeanFlow):
        def forward(self, z, delta, y, gw, t=None):
            return super().forward(z, delta, y, gw)
    pinned = MeanFlowDistiller(FromNoiseOnly(m, s), teacher, num_classes=NUM_CLASSES)
    assert pinned.losses(x, y, generator=torch.Generator().manual_seed(2))["pred_msq"] > 1e-3


# ----------------------------------------------------------------------------- the loss gradient

D = 4  # 1×2×2 samples


def conditional_velocity(x, t, y):
    """A nonlinear, class-dependent teacher (null class = NUM_CLASSES), so guidance changes the target."""
    t = _col(t, x)
    return torch.sin(x) * t - x + 0.3 * _col(y.to(x.dtype), x)


class AnalyticStudent(nn.Module):
    """F = tanh(z)·(1 + t²)·(1 + δ)·(1 + γ/10) + P: ∂L/∂P = ∂L/∂F, partial derivatives written by hand."""

    def __init__(self, shape):
        super().__init__()
        self.P = nn.Parameter(torch.zeros(shape, dtype=torch.float64))

    def forward(self, z, delta, y, gw, t=None):
        t = torch.ones_like(delta) if t is None else t
        t, d, g = _col(t, z), _col(delta, z), _col(gw, z)
        return torch.tanh(z) * (1 + t ** 2) * (1 + d) * (1 + g / 10) + self.P


class RecordingStudent(AnalyticStudent):
    """Same map, with a hand-written forward_jvp that records what the distiller passes."""

    def forward_jvp(self, z, delta, y, gw, *, tz=None, tdelta=None, tgw=None, t=None, tt=None):
        self.seen = dict(z=z, delta=delta, y=y, gw=gw, tz=tz, tdelta=tdelta, tgw=tgw, t=t, tt=tt)
        tc, d, g = _col(t, z), _col(delta, z), _col(gw, z)
        th = torch.tanh(z)
        f_z = (1 - th ** 2) * (1 + tc ** 2) * (1 + d) * (1 + g / 10)
        f_t = th * 2 * tc * (1 + d) * (1 + g / 10)
        f_d = th * (1 + tc ** 2) * (1 + g / 10)
        jvp = f_z * tz + f_t * _col(tt, z) + f_d * _col(tdelta, z)
        return self.forward(z, delta, y, gw, t=t), jvp


@pytest.mark.parametrize("power", [0.0, 1.0])
def test_loss_gradient_is_weighted_meanflow_residual(power):
    n = 16
    cfg = MeanFlowConfig(power=power, eps=0.05, guidance_interval=(0.2, 0.9))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    teacher = TeacherAdapter(conditional_velocity, NUM_CLASSES)

    rec = RecordingStudent((n, 1, 2, 2))
    out = MeanFlowDistiller(rec, teacher, cfg, num_classes=NUM_CLASSES).losses(x, y, torch.Generator().manual_seed(5))
    out["student"].backward()
    seen = rec.seen
    z, t, delta, gw = seen["z"], seen["t"], seen["delta"], seen["gw"]
    assert torch.equal(seen["y"], y) and seen["tgw"] is None
    assert torch.equal(seen["tt"], torch.ones(n, dtype=torch.float64))
    assert torch.equal(seen["tdelta"], torch.ones(n, dtype=torch.float64))
    assert ((0 < delta) & (delta <= t) & (t <= 1)).all() and ((1.5 <= gw) & (gw <= 2.5)).all()

    # the teacher's guided velocity at (x_t, t), written out: guided only inside [0.2, 0.9]
    null = torch.full_like(y, NUM_CLASSES)
    cond, uncond = conditional_velocity(z, t, y), conditional_velocity(z, t, null)
    inside = (t >= 0.2) & (t <= 0.9)
    v = torch.where(_col(inside, z), uncond + _col(gw, z) * (cond - uncond), cond)
    assert 0 < inside.sum() < n  # both kinds of rows are present
    torch.testing.assert_close(seen["tz"], v, rtol=1e-12, atol=1e-12)

    # MeanFlow residual Δ = F + δ·(f_z·v + f_t + f_δ) - v from hand derivatives
    tc, d, gc = _col(t, z), _col(delta, z), _col(gw, z)
    th = torch.tanh(z)
    F = th * (1 + tc ** 2) * (1 + d) * (1 + gc / 10)
    jvp = (1 - th ** 2) * (1 + tc ** 2) * (1 + d) * (1 + gc / 10) * v + th * 2 * tc * (1 + d) * (1 + gc / 10) \
        + th * (1 + tc ** 2) * (1 + gc / 10)
    delta_res = F + d * jvp - v
    msq = delta_res.pow(2).flatten(1).sum(1) / D
    w = (msq + cfg.eps) ** -power
    torch.testing.assert_close(rec.P.grad, 2 / (n * D) * _col(w, z) * delta_res, rtol=1e-10, atol=1e-14)
    assert math.isclose(out["pred_loss"], (w * msq).mean().item(), rel_tol=1e-10)
    assert math.isclose(out["pred_msq"], msq.mean().item(), rel_tol=1e-10)

    # the torch.func.jvp path (no forward_jvp) on the same draws gives the same hand-computed gradient
    plain = AnalyticStudent((n, 1, 2, 2))
    MeanFlowDistiller(plain, teacher, cfg, num_classes=NUM_CLASSES).losses(
        x, y, torch.Generator().manual_seed(5))["student"].backward()
    torch.testing.assert_close(plain.P.grad, 2 / (n * D) * _col(w, z) * delta_res, rtol=1e-10, atol=1e-14)


def test_draws_follow_the_time_law_and_replay_from_the_generator():
    n = 4000
    cfg = MeanFlowConfig(t_one_prob=0.25, delta_one_prob=0.25)
    x = torch.zeros(n, 1, 1, 1, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    rec = RecordingStudent((1, 1, 1, 1))
    distiller = MeanFlowDistiller(rec, lambda x_, t_, y_: -x_, cfg, num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    first = distiller.losses(x, y, torch.Generator().manual_seed(11))
    t, delta, z = rec.seen["t"], rec.seen["delta"], rec.seen["z"]
    tol = 4 * math.sqrt(0.25 * 0.75 / n)
    assert abs((t == 1).double().mean().item() - 0.25) < tol
    assert abs((delta == t).double().mean().item() - 0.25) < tol
    assert t.min() > 0 and ((delta >= 0) & (delta <= t)).all()
    inner = t < 1
    assert abs(t[inner].mean().item() - 0.5) < 0.03  # U(0, 1]
    ratio = (delta / t)[delta < t]
    assert abs(ratio.mean().item() - 0.5) < 0.03  # δ = t·U[0, 1)
    # x = 0, so x_t = t·n: the noise is standard normal
    noise = (z.flatten() / t)
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1
    # replay: the same generator seed gives the same step whatever the global RNG did in between
    torch.manual_seed(123)
    again = distiller.losses(x, y, torch.Generator().manual_seed(11))
    assert torch.equal(rec.seen["t"], t) and torch.equal(rec.seen["z"], z)
    assert (again["pred_loss"], again["pred_msq"]) == (first["pred_loss"], first["pred_msq"])
    other = distiller.losses(x, y, torch.Generator().manual_seed(12))
    assert not torch.equal(rec.seen["t"], t) and other["pred_msq"] != first["pred_msq"]


def test_flow_map_student_trains_through_forward_jvp_like_through_torch_func_jvp():
    """A SiT-family FlowMapStudent: its forward_jvp (negated time tangent) against torch.func.jvp of forward."""
    teacher, student = _tiny_student("sit")

    class NoJvp(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z, delta, y, gw, t=None):
            return self.inner(z, delta, y, gw, t=t)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    y = torch.tensor([0, 1, 2, 1])
    cfg = MeanFlowConfig(power=0.0)
    grads = []
    for model in (student, NoJvp(student)):
        student.zero_grad()
        out = MeanFlowDistiller(model, teacher, cfg, num_classes=NUM_CLASSES).losses(
            x, y, torch.Generator().manual_seed(3))
        out["student"].backward()
        grads.append((out["pred_msq"], torch.cat([p.grad.flatten() for p in student.parameters()
                                                     if p.requires_grad])))
    assert math.isfinite(grads[0][0]) and grads[0][1].abs().max() > 0
    assert math.isclose(grads[0][0], grads[1][0], rel_tol=1e-5)
    assert _rel(grads[0][1], grads[1][1]) <= 1e-4
    with torch.no_grad():  # sampling stays the ordinary one-step map from the noise end
        z = torch.randn(4, 1, 8, 8, generator=g)
        gw = torch.full((4,), 2.0)
        ones = torch.ones(4)
        torch.testing.assert_close(student.sample(z, y, gw), z - student(z, ones, y, gw, t=ones))


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("field, kwargs", [
    ("power", dict(power=-1.0)),
    ("power", dict(power="1")),
    ("eps", dict(eps=0.0)),
    ("eps", dict(eps=float("nan"))),
    ("gw_min/gw_max", dict(gw_min=3.0, gw_max=2.0)),
    ("gw_max", dict(gw_max=float("inf"))),
    ("guidance_interval", dict(guidance_interval=(0.6, 0.2))),
    ("guidance_interval", dict(guidance_interval=(0.0, 1.5))),
    ("guidance_interval", dict(guidance_interval=(0.0,))),
    ("t_one_prob", dict(t_one_prob=1.5)),
    ("delta_one_prob", dict(delta_one_prob=-0.1)),
])
def test_config_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"MeanFlowConfig.{field} must be"):
        MeanFlowConfig(**kwargs)


def test_config_accepts_defaults_and_fixed_guidance():
    c = MeanFlowConfig(gw_min=1.0, gw_max=1.0, guidance_interval=[0.0, 0.7])
    assert c.guidance_interval == (0.0, 0.7)
    d = MeanFlowConfig()
    assert (d.power, d.eps, d.gw_min, d.gw_max, d.t_one_prob, d.delta_one_prob) == (1.0, 1e-2, 1.5, 2.5, 0.25, 0.25)


def test_losses_reject_mismatched_batches():
    m, s = _gaussian()
    distiller = MeanFlowDistiller(ExactMeanFlow(m, s), gaussian_velocity(m, s), num_classes=NUM_CLASSES)
    x, y = _gaussian_data(m, s, 4, seed=0)
    with pytest.raises(ValueError, match=r"y must be class ids of shape \(4,\)"):
        distiller.losses(x, y[:3])
    with pytest.raises(ValueError, match="integer class ids"):
        distiller.losses(x, y.double())
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        distiller.losses(x.flatten()[:4], y)
    with pytest.raises(ValueError, match="must be a MeanFlowConfig"):
        MeanFlowDistiller(ExactMeanFlow(m, s), gaussian_velocity(m, s), config={}, num_classes=NUM_CLASSES)
