"""Each objective's gradient equals the gradient of its written-out formula (docs/design.md §3).

References are written from the formulas with plain autograd: ``∂F/∂δ`` by reverse mode
(``autograd.grad`` of the summed output w.r.t. δ, each row depending only on its own δ), the
surrogates as ``w_i‖F_i - sg(F_i - Δ_i)‖²/d``. Everything runs in float64.
"""

import pytest
import torch
from checks import default_dtype_fixture
from torch import nn

from freeflow.conventions import one_step_sample
from freeflow.distill import (
    DistillConfig,
    Distiller,
    TeacherAdapter,
    aux_flow_matching_loss,
    balance_weight,
    correction_loss,
    noised,
    prediction_loss,
    prediction_targets,
    sample_delta,
    sample_logit_normal,
    student_and_tangent,
)

NUM_CLASSES = 3
D = 3


float64_default = default_dtype_fixture(torch.float64)


class MLPStudent(nn.Module):
    """F_θ(z, δ, y, γ): a smooth nonlinear map, so ∂F/∂δ and ∂F/∂θ are non-trivial."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(NUM_CLASSES, 4)
        self.net = nn.Sequential(nn.Linear(D + 4 + 2, 16), nn.Tanh(), nn.Linear(16, D))

    def forward(self, z, delta, y, gw):
        h = torch.cat([z, self.emb(y), torch.sin(3 * delta)[:, None], gw[:, None]], 1)
        return self.net(h) * (1 + delta[:, None] ** 2)


class JvpStudent(MLPStudent):
    """Has forward_jvp: the engine must use it instead of torch.func.jvp."""
    jvp_calls = 0

    def forward_jvp(self, z, delta, y, gw, *, tdelta):
        type(self).jvp_calls += 1
        d = delta.detach().requires_grad_(True)
        F = self.forward(z, d, y, gw)
        cols = [torch.autograd.grad(F[:, j].sum(), d, retain_graph=True)[0] for j in range(D)]
        F_dot = torch.stack(cols, 1) * tdelta[:, None]
        return self.forward(z, delta, y, gw), F_dot.detach()


def teacher_fn(x, t, y):
    """A nonlinear internal-convention velocity field with class dependence."""
    return torch.tanh(x) * (1 + t[:, None]) + 0.3 * y[:, None].to(x.dtype) - x * t[:, None] ** 2


class AuxNet(nn.Module):
    def __init__(self, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D + 2, 8), nn.Tanh(), nn.Linear(8, D))

    def forward(self, x, t, y, gw):
        return self.net(torch.cat([x, t[:, None], gw[:, None]], 1)) + teacher_fn(x, t, y)


def _batch(n=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=g)
    delta = torch.rand(n, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    gw = 1 + torch.rand(n, generator=g)
    return z, delta, y, gw


def reference_dF_ddelta(student, z, delta, y, gw):
    d = delta.detach().requires_grad_(True)
    F = student(z, d, y, gw)
    cols = [torch.autograd.grad(F[:, j].sum(), d, retain_graph=True)[0] for j in range(D)]
    return torch.stack(cols, 1)


def reference_prediction_surrogate(student, teacher, z, delta, y, gw, power, eps):
    """mean_i w_i‖F_i - sg(F_i - Δ_i)‖²/d with Δ = F + δ∂F/∂δ - u(z - δF, 1 - δ), w = sg(·)^-k."""
    F = student(z, delta, y, gw)
    F_dot = reference_dF_ddelta(student, z, delta, y, gw)
    Fd = F.detach()
    x_hat = z - delta[:, None] * Fd
    u = teacher(x_hat, 1 - delta, y)
    Delta = Fd + delta[:, None] * F_dot - u
    msq = Delta.pow(2).sum(1) / D
    w = (msq + eps).pow(-power)
    value = (w * msq).mean()
    surrogate = (w * (F - (Fd - Delta)).pow(2).sum(1) / D).mean()
    return value, surrogate


def _grads(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in module.parameters()]


def _engine_prediction(student, z, delta, y, gw, power, eps, method="jvp", fd_step=1e-3):
    F, F_dot = student_and_tangent(student, z, delta, y, gw, method=method, fd_step=fd_step)
    x_hat, G = prediction_targets(F, F_dot, z, delta)
    u = teacher_fn(x_hat, 1 - delta, y)
    loss, _ = prediction_loss(F, G, u, power=power, eps=eps)
    return loss


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("student_cls", [MLPStudent, JvpStudent])
def test_prediction_gradient_matches_written_out_formula(power, student_cls):
    student = student_cls()
    z, delta, y, gw = _batch()
    eps = 1e-3
    value, surrogate = reference_prediction_surrogate(student, teacher_fn, z, delta, y, gw, power, eps)
    expected = _grads(student, surrogate)
    before = JvpStudent.jvp_calls
    loss = _engine_prediction(student, z, delta, y, gw, power, eps)
    if student_cls is JvpStudent:
        assert JvpStudent.jvp_calls == before + 1, "forward_jvp must be preferred to torch.func.jvp"
    torch.testing.assert_close(loss.detach(), value.detach(), rtol=1e-10, atol=1e-12)
    for got, ref in zip(_grads(student, loss), expected):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_prediction_finite_difference_matches_formula_to_second_order():
    student = MLPStudent()
    z, delta, y, gw = _batch()
    delta = torch.tensor([0.0, 0.0004, 0.3, 0.5, 0.9997, 1.0])  # both one-sided ends included
    _, surrogate = reference_prediction_surrogate(student, teacher_fn, z, delta, y, gw, 1.0, 1e-3)
    expected = _grads(student, surrogate)
    loss = _engine_prediction(student, z, delta, y, gw, 1.0, 1e-3, method="finite_difference",
                              fd_step=1e-5)
    # One-sided differences at the ends are first order: error ≈ h·|∂²F/∂δ²| ~ 1e-5.
    for got, ref in zip(_grads(student, loss), expected):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_correction_and_balance_match_written_out_formula():
    student, aux = MLPStudent(), AuxNet()
    z, _, y, gw = _batch(n=5, seed=3)
    g = torch.Generator().manual_seed(4)
    r = torch.rand(5, generator=g)
    n = torch.randn(5, D, generator=g)
    delta_pred = torch.randn(7, D, generator=g)
    alpha, eps = 0.7, 1e-6
    ones = torch.ones(5)

    # Written out: x₁ = z - F(z, 1); x_r = (1-r)·sg(x₁) + r·n; Δ_c = g_ψ(x_r, r) - u(x_r, r);
    # λ = α·E‖Δ‖/(E‖Δ_c‖+ε); surrogate λ·mean_i‖F_i - sg(F_i - Δ_c,i)‖²/d.
    F1 = student(z, ones, y, gw)
    x_r = (1 - r[:, None]) * (z - F1).detach() + r[:, None] * n
    Delta_c = (aux(x_r, r, y, gw) - teacher_fn(x_r, r, y)).detach()
    lam_ref = alpha * delta_pred.norm(dim=1).mean() / (Delta_c.norm(dim=1).mean() + eps)
    surrogate = lam_ref * ((F1 - (F1.detach() - Delta_c)).pow(2).sum(1) / D).mean()
    expected = _grads(student, surrogate)

    F1 = student(z, ones, y, gw)
    x_r_engine = noised(z - F1, n, r)
    g_val = aux(x_r_engine, r, y, gw)
    u = teacher_fn(x_r_engine, r, y)
    lam = balance_weight(delta_pred, g_val.detach() - u, alpha=alpha, eps=eps)
    loss, msq = correction_loss(F1, g_val.detach(), u, scale=lam)
    assert lam == pytest.approx(float(lam_ref), rel=1e-12)
    torch.testing.assert_close(msq, Delta_c.pow(2).sum(1) / D, rtol=1e-12, atol=1e-14)
    for got, ref in zip(_grads(student, loss), expected):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)


def test_aux_flow_matching_gradient_and_isolation_from_student():
    student, aux = MLPStudent(), AuxNet()
    z, _, y, gw = _batch(n=5, seed=5)
    g = torch.Generator().manual_seed(6)
    r, n = torch.rand(5, generator=g), torch.randn(5, D, generator=g)
    x1 = z - student(z, torch.ones(5), y, gw)
    x_r = noised(x1, n, r)
    loss = aux_flow_matching_loss(aux(x_r, r, y, gw), n, x1)
    # Written out: mean over samples and dims of ‖g_ψ(x_r, r) - (n - x₁)‖², x₁ a constant.
    x1c = x1.detach()
    x_r_ref = (1 - r[:, None]) * x1c + r[:, None] * n
    reference = (aux(x_r_ref, r, y, gw) - (n - x1c)).pow(2).sum(1).div(D).mean()
    expected = _grads(aux, reference)
    student.zero_grad(set_to_none=True)
    for got, ref in zip(_grads(aux, loss), expected):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in student.parameters()), "aux loss must not reach the student"


# ----------------------------------------------------------------------------- samplers

def test_delta_sampler_ranges_and_point_mass():
    g = torch.Generator().manual_seed(0)
    n = 20000
    uni = sample_delta(n, dist="uniform", generator=g)
    assert 0.0 <= uni.min() and uni.max() <= 1.0 and abs(uni.mean().item() - 0.5) < 0.01
    mix = sample_delta(n, dist="logit_normal", logit_mean=-1.0, logit_std=0.5, one_prob=0.25,
                       generator=g)
    ones = (mix == 1.0).float().mean().item()
    assert abs(ones - 0.25) < 0.01
    rest = mix[mix < 1.0]
    logit = torch.log(rest / (1 - rest))
    assert abs(logit.mean().item() + 1.0) < 0.02 and abs(logit.std().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="delta_dist"):
        sample_delta(4, dist="beta")


def test_default_r_is_biased_to_high_noise_and_reaches_one():
    c = DistillConfig()
    r = sample_logit_normal(20000, c.r_logit_mean, c.r_logit_std,
                            generator=torch.Generator().manual_seed(0))
    assert r.median() > 0.6, "r must be biased to high noise"
    assert r.max() > 0.99 and r.min() > 0.0


# ----------------------------------------------------------------------------- engine

def _distiller(config=None, n_classes=NUM_CLASSES):
    return Distiller(JvpStudent(), teacher_fn, AuxNet(), config or DistillConfig(),
                     sample_shape=(D,), num_classes=n_classes)


class Recorder:
    """Wraps a callable and keeps detached copies of its inputs."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args):
        self.calls.append([a.detach().clone() for a in args])
        return self.fn(*args)


def _redraw(seed, n_pred, n_corr):
    """The engine's documented draw order: (z, y, γ, δ, δ=1 coin) then (z', y', γ', r, n)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_pred, D, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n_pred,), generator=gen)
    gw = 1.0 + torch.rand(n_pred, generator=gen)
    delta = torch.rand(n_pred, generator=gen)
    torch.rand(n_pred, generator=gen)
    z_c = torch.randn(n_corr, D, generator=gen)
    y_c = torch.randint(0, NUM_CLASSES, (n_corr,), generator=gen)
    gw_c = 1.0 + torch.rand(n_corr, generator=gen)
    r = torch.sigmoid(0.8 + 1.0 * torch.randn(n_corr, generator=gen))
    noise = torch.randn(n_corr, D, generator=gen)
    return (z, y, gw, delta), (z_c, y_c, gw_c, r, noise)


def _written_out_lambda(balance, Delta, Delta_c, cfg):
    """λ of each ``DistillConfig.balance`` reading, from the per-sample residuals."""
    if balance == "fixed":
        return torch.tensor(cfg.alpha)
    pred = Delta.norm(dim=1)
    if balance == "weighted":  # the prediction gradient's size: w_i·‖Δ_i‖, w_i = (‖Δ_i‖²/d + ε)^-k
        pred = pred * (Delta.pow(2).sum(1) / D + cfg.eps) ** -cfg.power
    return cfg.alpha * pred.mean() / (Delta_c.norm(dim=1).mean() + cfg.balance_eps)


@pytest.mark.parametrize("balance", ["residual", "weighted", "fixed"])
def test_engine_losses_match_written_out_objectives_on_the_drawn_batch(balance):
    student, aux = JvpStudent(), AuxNet()
    teacher = Recorder(teacher_fn)
    cfg = DistillConfig(gw_min=1.0, gw_max=2.0, pred_guidance_interval=(0.0, 1.0),
                        corr_guidance_interval=(0.0, 0.7), alpha=0.5, balance=balance)
    distiller = Distiller(student, teacher, aux, cfg, sample_shape=(D,), num_classes=NUM_CLASSES)
    out = distiller.losses(8, generator=torch.Generator().manual_seed(0))
    assert (out["n_pred"], out["n_corr"]) == (6, 2)
    engine_grads = _grads(student, out["student"])

    (z, y, gw, delta), (z_c, y_c, gw_c, r, noise) = _redraw(0, 6, 2)
    guided = TeacherAdapter(teacher_fn, NUM_CLASSES)

    def u_pred(x, t, y_):
        return guided.guided_velocity(x, t, y_, gw, 0.0, 1.0)

    _, pred_surrogate = reference_prediction_surrogate(student, u_pred, z, delta, y, gw, 1.0, 1e-3)
    F1 = student(z_c, torch.ones(2), y_c, gw_c)
    x_r = (1 - r[:, None]) * (z_c - F1).detach() + r[:, None] * noise
    torch.testing.assert_close(teacher.calls[0][0][6:8], x_r, rtol=0, atol=0)
    u_c = guided.guided_velocity(x_r, r, y_c, gw_c, 0.0, 0.7)
    Delta_c = (aux(x_r, r, y_c, gw_c) - u_c).detach()
    Delta = _prediction_delta(student, u_pred, z, delta, y, gw)
    lam = _written_out_lambda(balance, Delta, Delta_c, cfg)
    corr_surrogate = lam * ((F1 - (F1.detach() - Delta_c)).pow(2).sum(1) / D).mean()
    expected = _grads(student, pred_surrogate + corr_surrogate)
    assert out["lambda"] == pytest.approx(float(lam), rel=1e-10)
    for got, ref in zip(engine_grads, expected):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)

    aux_reference = (aux(x_r, r, y_c, gw_c) - (noise - (z_c - F1).detach())).pow(2).sum(1).div(D).mean()
    expected_aux = _grads(aux, aux_reference)
    for got, ref in zip(_grads(aux, out["aux"]), expected_aux):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)


def test_engine_aux_loss_alone_matches_written_out_flow_matching_on_fresh_correction_rows():
    """``Distiller.aux_loss`` (the extra updates of --aux-updates, --aux-warmup): only the correction draws, the
    student without grad, and the aux loss of the full step's formula."""
    student, aux = JvpStudent(), AuxNet()
    distiller = Distiller(student, teacher_fn, aux, DistillConfig(gw_min=1.0, gw_max=2.0), sample_shape=(D,),
                          num_classes=NUM_CLASSES)
    loss = distiller.aux_loss(8, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the correction draws of a batch of 8: 2 rows, in the documented order
    z_c = torch.randn(2, D, generator=gen)
    y_c = torch.randint(0, NUM_CLASSES, (2,), generator=gen)
    gw_c = 1.0 + torch.rand(2, generator=gen)
    r = torch.sigmoid(0.8 + 1.0 * torch.randn(2, generator=gen))
    noise = torch.randn(2, D, generator=gen)
    x1 = z_c - student(z_c, torch.ones(2), y_c, gw_c).detach()
    x_r = (1 - r[:, None]) * x1 + r[:, None] * noise
    reference = (aux(x_r, r, y_c, gw_c) - (noise - x1)).pow(2).sum(1).div(D).mean()
    for got, ref in zip(_grads(aux, loss), _grads(aux, reference)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    assert all(p.grad is None for p in student.parameters())  # the student only made the samples
    with pytest.raises(ValueError, match="needs correction rows"):
        _distiller(DistillConfig(pred_fraction=1.0)).aux_loss(8)


def _prediction_delta(student, u, z, delta, y, gw):
    F = student(z, delta, y, gw).detach()
    F_dot = reference_dF_ddelta(student, z, delta, y, gw)
    return F + delta[:, None] * F_dot - u(z - delta[:, None] * F, 1 - delta, y)


def test_engine_is_deterministic_and_graphs_are_separate():
    a = _distiller().losses(8, generator=torch.Generator().manual_seed(3))
    d = _distiller()
    b = d.losses(8, generator=torch.Generator().manual_seed(3))
    for key in ("pred_loss", "corr_loss", "lambda", "aux_loss", "pred_msq", "corr_msq"):
        assert a[key] == b[key]
    b["student"].backward()
    assert all(p.grad is None for p in d.aux.parameters())
    student_grads = [p.grad.clone() for p in d.student.parameters()]
    b["aux"].backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(d.student.parameters(), student_grads))


def test_prediction_only_config_needs_no_aux():
    d = Distiller(MLPStudent(), teacher_fn, None, DistillConfig(pred_fraction=1.0),
                  sample_shape=(D,), num_classes=NUM_CLASSES)
    out = d.losses(4, generator=torch.Generator().manual_seed(0))
    assert out["aux"] is None and out["n_corr"] == 0
    with pytest.raises(ValueError, match="aux"):
        Distiller(MLPStudent(), teacher_fn, None, DistillConfig(), sample_shape=(D,),
                  num_classes=NUM_CLASSES)


def test_correction_only_config_matches_the_written_out_correction_with_lambda_alpha():
    student, aux = JvpStudent(), AuxNet()
    cfg = DistillConfig(pred_fraction=0.0, gw_min=1.0, gw_max=2.0, corr_guidance_interval=(0.0, 0.7), alpha=0.5)
    distiller = Distiller(student, teacher_fn, aux, cfg, sample_shape=(D,), num_classes=NUM_CLASSES)
    out = distiller.losses(4, generator=torch.Generator().manual_seed(1))
    assert (out["n_pred"], out["n_corr"], out["pred_loss"], out["lambda"]) == (0, 4, 0.0, 0.5)

    _, (z_c, y_c, gw_c, r, noise) = _redraw(1, 0, 4)
    F1 = student(z_c, torch.ones(4), y_c, gw_c)
    x_r = (1 - r[:, None]) * (z_c - F1).detach() + r[:, None] * noise
    u_c = TeacherAdapter(teacher_fn, NUM_CLASSES).guided_velocity(x_r, r, y_c, gw_c, 0.0, 0.7)
    Delta_c = (aux(x_r, r, y_c, gw_c) - u_c).detach()
    surrogate = 0.5 * ((F1 - (F1.detach() - Delta_c)).pow(2).sum(1) / D).mean()
    assert out["corr_msq"] == pytest.approx(float(Delta_c.pow(2).sum(1).div(D).mean()), rel=1e-6)  # fp32 metric
    for got, ref in zip(_grads(student, out["student"]), _grads(student, surrogate)):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_one_step_sample_is_z_minus_F_at_one():
    student = MLPStudent()
    z, _, y, gw = _batch()
    expected = z - student(z, torch.ones(6), y, gw)
    torch.testing.assert_close(one_step_sample(student, z, y, gw), expected.detach(), rtol=0, atol=0)
    half = torch.full((6,), 0.5)
    torch.testing.assert_close(one_step_sample(student, z, y, gw, half),
                               (z - 0.5 * student(z, half, y, gw)).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("field,value", [
    ("pred_fraction", -0.1), ("pred_fraction", 1.5), ("power", -1.0), ("eps", 0.0),
    ("delta_dist", "beta"), ("delta_one_prob", 1.2), ("gw_min", 5.0),
    ("pred_guidance_interval", (0.5, 0.2)), ("corr_guidance_interval", (0.0, 1.5)),
    ("r_logit_std", 0.0), ("alpha", -1.0), ("tangent", "fd"), ("fd_step", 0.6),
    ("balance_eps", float("nan")), ("balance", "median"),
])
def test_bad_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"DistillConfig.{field}"):
        DistillConfig(**{field: value})


def test_batch_too_small_for_split_raises():
    with pytest.raises(ValueError, match="batch_size"):
        _distiller().losses(1)
