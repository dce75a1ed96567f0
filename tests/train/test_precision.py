"""Mixed precision (--precision): bf16 autocast for every network, fp32 master weights, state and loss math.

On this CPU machine bf16 runs through CPU autocast, the same code path as CUDA's. References: the fp32 run of
the same step (and, for scale, an fp32 run on other batches), and ``torch.func.jvp`` of the fp32 forward.
"""
import pytest
import torch
from checks import trained_like_

from freeflow.config import TrainConfig
from freeflow.distill import DistillConfig
from freeflow.models import DiT, DiTConfig, FlowMapStudent
from freeflow.train import build_parts, network_autocast, train_step

CPU = torch.device("cpu")


def _teacher(backend="reference"):
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=72, depth=2, num_heads=2,
                    num_classes=5, learn_sigma=False)
    teacher = DiT(cfg, family="internal", backend=backend)
    trained_like_(teacher)
    return teacher.requires_grad_(False)


def _train(teacher, precision, seed=0, steps=5):
    tc = TrainConfig(precision=precision, batch_size=16, lr=1e-3, aux_lr=1e-3, seed=seed)
    parts = build_parts(tc, DistillConfig(), teacher, CPU)
    start = {k: v.clone() for k, v in parts.student.state_dict().items()}
    losses = [train_step(parts, tc, step)[0] for step in range(1, steps + 1)]
    return parts, start, losses


def _norm(tensors):
    return sum(t.double().norm() ** 2 for t in tensors) ** 0.5


def test_precision_modes_pick_the_autocast_dtype():
    cuda = torch.device("cuda")
    assert network_autocast(TrainConfig(precision="auto"), cuda) is torch.bfloat16
    assert network_autocast(TrainConfig(precision="auto"), CPU) is None
    assert network_autocast(TrainConfig(precision="bf16"), CPU) is torch.bfloat16
    assert network_autocast(TrainConfig(precision="fp32"), cuda) is None


def test_bf16_training_stays_close_to_fp32():
    """Five steps under bf16 autocast against the fp32 run on the same batches: every loss term within 10 % of
    its fp32 scale over the run (at step 1 the aux is the teacher, so the correction residual is round-off) and
    the student's update within 30 % of fp32's (Adam normalises each coordinate, so bf16 round-off in a small
    gradient moves its update by up to the learning rate), and under half the gap between fp32 runs on other batches
    (measured: 0.20 against 0.47)."""
    teacher = _teacher()
    fp32, start, loss32 = _train(teacher, "fp32")
    bf16, _, loss16 = _train(teacher, "bf16")
    other, _, _ = _train(teacher, "fp32", seed=1)
    for key in ("pred_loss", "corr_loss", "aux_loss"):
        scale = max(abs(a[key]) for a in loss32)
        for a, b in zip(loss32, loss16):
            assert abs(a[key] - b[key]) <= 0.1 * scale, (key, a[key], b[key], scale)
    assert any(a[k] != b[k] for a, b in zip(loss32, loss16) for k in ("pred_loss", "aux_loss"))  # bf16 did run

    s32, s16, s_other = (p.student.state_dict() for p in (fp32, bf16, other))
    keys = [k for k in start if not torch.equal(s32[k], start[k])]
    update = _norm([s32[k] - start[k] for k in keys])
    bf16_gap = _norm([s16[k] - s32[k] for k in keys]) / update
    other_gap = _norm([s_other[k] - s32[k] for k in keys]) / update
    assert bf16_gap < 0.3, bf16_gap
    assert bf16_gap < 0.5 * other_gap, (bf16_gap, other_gap)


def test_bf16_keeps_fp32_master_weights_optimizer_state_and_ema():
    parts, _, losses = _train(_teacher(), "bf16", steps=2)
    for module in (parts.student, parts.ema, parts.aux):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    for opt in (parts.opt, parts.aux_opt):
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()]
        assert state and {t.dtype for t in state} == {torch.float32}
    assert losses[-1]["student"].dtype == torch.float32 and losses[-1]["aux"].dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bf16_tangent_matches_fp32_func_jvp(backend):
    """``forward_jvp`` under bf16 autocast (the Triton path runs in the interpreter) against ``torch.func.jvp``
    of the fp32 forward, to bf16 accuracy: normwise relative error below 2e-2 (bf16 keeps 8 bits, 3.9e-3 per
    rounding, over two blocks)."""
    student = FlowMapStudent.from_teacher(_teacher(backend))
    with torch.no_grad():
        for emb in (student.net.dt_embedder, student.net.gw_embedder):  # make δ and γ matter
            emb.mlp[2].weight.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 3, 8, 8, generator=g)
    delta, gw = torch.rand(3, generator=g), 1 + torch.rand(3, generator=g)
    y = torch.tensor([0, 4, 2])
    ref, ref_dot = torch.func.jvp(lambda d: student.forward(z, d, y, gw), (delta,), (torch.ones(3),))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_dot = student.forward_jvp(z, delta, y, gw, tdelta=torch.ones(3))
    assert out.dtype == out_dot.dtype == torch.bfloat16
    for got, want in ((out, ref), (out_dot, ref_dot)):
        err = ((got.float() - want).norm() / want.norm()).item()
        assert 0 < err < 2e-2, err


def test_cosine_schedule_follows_torch_cosine_annealing_and_reaches_the_optimizer():
    from freeflow.train import student_lr

    tc = TrainConfig(lr=3e-4, steps=10, lr_schedule="cosine")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=tc.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.steps)
    for step in range(1, tc.steps + 1):  # step k trains with the rate after k - 1 scheduler steps
        assert student_lr(tc, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()
    assert student_lr(TrainConfig(lr=3e-4, lr_schedule="constant"), 7) == 3e-4
    parts = build_parts(TrainConfig(lr=1e-3, steps=4, lr_schedule="cosine", batch_size=8), DistillConfig(),
                        _teacher(), CPU)
    tc = TrainConfig(lr=1e-3, steps=4, lr_schedule="cosine", batch_size=8)
    train_step(parts, tc, 3)
    assert parts.opt.param_groups[0]["lr"] == pytest.approx(student_lr(tc, 3)) and student_lr(tc, 3) < 1e-3


def test_aux_updates_step_the_aux_optimizer_that_many_times_per_student_step():
    teacher = _teacher()
    tc = TrainConfig(batch_size=8, aux_updates=3)
    parts = build_parts(tc, DistillConfig(), teacher, CPU)
    aux_before = [p.detach().clone() for p in parts.aux_params]
    for step in (1, 2):
        out, _ = train_step(parts, tc, step)
    assert out["aux"] is not None
    assert {int(parts.opt.state[p]["step"]) for p in parts.student_params} == {2}
    assert {int(parts.aux_opt.state[p]["step"]) for p in parts.aux_params} == {6}
    assert any(not torch.equal(a, p) for a, p in zip(aux_before, parts.aux_params))
