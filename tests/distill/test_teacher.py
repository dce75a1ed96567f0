"""Teacher adapter: checkpoint conventions → internal convention, and the guided velocity."""
import pytest
import torch
from torch import nn

from freeflow.distill import TeacherAdapter

NUM_CLASSES = 3
D = 4


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    e = torch.randn(NUM_CLASSES + 1, D, generator=g, dtype=torch.float64)
    return W, b, e


W, B, E = _params()


def internal_velocity(x, t, y):
    """The closed-form reference, written in the internal convention (t = 1 noise, v = E[n - x])."""
    return x @ W.T + t[:, None] * B + E[y]


class SiTLinear(nn.Module):
    """The same field stored the SiT way: time t' = 1 - t, velocity v' = -v."""
    family = "sit"

    def forward(self, x, t_sit, y):
        return -(x @ W.T + (1.0 - t_sit)[:, None] * B + E[y])


class RepaLinear(nn.Module):
    """The same field stored the REPA way: internal convention, forward returns (out, zs)."""
    family = "repa"

    def forward(self, x, t, y):
        return x @ W.T + t[:, None] * B + E[y], [torch.zeros(x.shape[0], 7, dtype=x.dtype)]


def _inputs(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, t, y


def test_sit_and_repa_twins_give_the_closed_form_internal_velocity():
    x, t, y = _inputs()
    expected = internal_velocity(x, t, y)
    sit = TeacherAdapter(SiTLinear(), NUM_CLASSES).velocity(x, t, y)
    repa = TeacherAdapter(RepaLinear(), NUM_CLASSES).velocity(x, t, y)
    torch.testing.assert_close(sit, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(repa, expected, rtol=1e-12, atol=1e-12)


def test_plain_callable_and_family_override():
    x, t, y = _inputs()
    expected = internal_velocity(x, t, y)
    torch.testing.assert_close(TeacherAdapter(internal_velocity, NUM_CLASSES).velocity(x, t, y),
                               expected, rtol=1e-12, atol=1e-12)
    # A SiT-convention callable without a `family` attribute, told its family explicitly.
    sit_fn = SiTLinear().forward
    torch.testing.assert_close(TeacherAdapter(sit_fn, NUM_CLASSES, family="sit").velocity(x, t, y),
                               expected, rtol=1e-12, atol=1e-12)


def test_learned_sigma_head_keeps_the_velocity_half():
    x, t, y = _inputs()

    def learned_sigma(x, t, y):
        return torch.cat([internal_velocity(x, t, y), torch.full_like(x, 99.0)], 1)

    out = TeacherAdapter(learned_sigma, NUM_CLASSES).velocity(x, t, y)
    torch.testing.assert_close(out, internal_velocity(x, t, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["dit", "ddpm", "SiT"])
def test_unsupported_families_raise(family):
    with pytest.raises(ValueError, match="family"):
        TeacherAdapter(internal_velocity, NUM_CLASSES, family=family)


def test_bad_num_classes_raise():
    with pytest.raises(ValueError, match="num_classes"):
        TeacherAdapter(internal_velocity, 0)


def test_guided_velocity_formula_interval_and_single_batched_forward():
    x, t, y = _inputs(n=8)
    t = torch.tensor([0.0, 0.1, 0.5, 0.7, 0.70001, 0.9, 1.0, 0.3], dtype=torch.float64)
    gw = torch.tensor([2.0, 1.5, 3.0, 2.5, 2.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    calls = []

    def recording(x_, t_, y_):
        calls.append(y_.clone())
        return internal_velocity(x_, t_, y_)

    u = TeacherAdapter(recording, NUM_CLASSES).guided_velocity(x, t, y, gw, 0.0, 0.7)

    null = torch.full_like(y, NUM_CLASSES)
    cond, uncond = internal_velocity(x, t, y), internal_velocity(x, t, null)
    inside = (t <= 0.7)[:, None]
    expected = torch.where(inside, uncond + gw[:, None] * (cond - uncond), cond)
    torch.testing.assert_close(u, expected, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1, "conditional and unconditional rows must share one forward"
    # Unconditional rows only where guidance applies: t in [0, 0.7] and gw != 1 → rows 0..3.
    assert calls[0].tolist() == y.tolist() + [NUM_CLASSES] * 4


def test_guided_velocity_per_row_intervals():
    x, t, y = _inputs(n=4)
    t = torch.tensor([0.8, 0.8, 0.2, 0.2], dtype=torch.float64)
    gw = torch.full((4,), 2.0, dtype=torch.float64)
    lo = torch.tensor([0.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.7, 1.0, 1.0], dtype=torch.float64)
    u = TeacherAdapter(internal_velocity, NUM_CLASSES).guided_velocity(x, t, y, gw, lo, hi)
    cond = internal_velocity(x, t, y)
    guided = 2.0 * cond - internal_velocity(x, t, torch.full_like(y, NUM_CLASSES))
    expected = torch.stack([guided[0], cond[1], guided[2], cond[3]])
    torch.testing.assert_close(u, expected, rtol=1e-12, atol=1e-12)


def test_sit_guidance_is_applied_in_internal_time():
    x, t, y = _inputs()
    t = torch.tensor([0.1, 0.2, 0.6, 0.8, 0.9, 0.95], dtype=torch.float64)
    gw = torch.full((6,), 3.0, dtype=torch.float64)
    u = TeacherAdapter(SiTLinear(), NUM_CLASSES).guided_velocity(x, t, y, gw, 0.0, 0.7)
    cond = internal_velocity(x, t, y)
    uncond = internal_velocity(x, t, torch.full_like(y, NUM_CLASSES))
    expected = torch.where((t <= 0.7)[:, None], uncond + 3.0 * (cond - uncond), cond)
    torch.testing.assert_close(u, expected, rtol=1e-12, atol=1e-12)


def test_teacher_calls_carry_no_grad_and_bf16_autocast_returns_input_dtype():
    torch.manual_seed(0)
    net = nn.Linear(D, D)

    def model(x, t, y):
        return net(x) * t[:, None]

    x = torch.randn(5, D)
    t = torch.rand(5)
    y = torch.zeros(5, dtype=torch.long)
    out = TeacherAdapter(model, NUM_CLASSES, autocast_dtype=torch.bfloat16).velocity(x, t, y)
    assert out.dtype == torch.float32 and not out.requires_grad
    expected = (x @ net.weight.T + net.bias) * t[:, None]
    # bf16 has an 8-bit mantissa: relative rounding 2^-8 on inputs, weights and the product.
    torch.testing.assert_close(out, expected.detach(), rtol=2e-2, atol=2e-2)
