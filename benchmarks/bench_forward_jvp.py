"""One FreeFlow prediction step: student forward + ∂F/∂δ + loss on the primal + backward.

Explicit tangents (``FlowMapStudent.forward_jvp``: the tangent is computed once, without a graph) vs the
same step through ``torch.func.jvp`` (forward-mode AD; autograd also records the tangent computation).
DiT-S/2 student on 32×32×4 inputs (256 tokens), CPU, reference kernels.

    pytest benchmarks/bench_forward_jvp.py --benchmark-only
"""
import pytest
import torch
from memory import peak_bytes, saved_for_backward_bytes

from freeflow.models import DiT, FlowMapStudent, config_from_name

BATCH = 8


@pytest.fixture(scope="module")
def setup():
    # One thread: on a shared 2-core machine OpenMP's spinning workers dominate elementwise ops and make
    # side-by-side timings meaningless; one thread measures the work itself.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = DiT(config_from_name("SiT-S/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=False),
                  backend="reference")
    for p in teacher.parameters():  # trained-like weights: adaLN-Zero init would skip most of the work
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    student = FlowMapStudent.from_teacher(teacher)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(BATCH, 4, 32, 32, generator=g)
    y = torch.randint(0, 1000, (BATCH,), generator=g)
    delta, gw = torch.rand(BATCH, generator=g), 1 + 2 * torch.rand(BATCH, generator=g)
    u = torch.randn(BATCH, 4, 32, 32, generator=g)
    return student, (z, delta, y, gw, u)


def _loss(F, Fdot, delta, u):
    G = (F + delta.view(-1, 1, 1, 1) * Fdot).detach()
    return (F - (F - (G - u)).detach()).pow(2).mean()


def step_explicit(student, z, delta, y, gw, u):
    F, Fdot = student.forward_jvp(z, delta, y, gw, tdelta=torch.ones_like(delta))
    _loss(F, Fdot, delta, u).backward()


def step_func_jvp(student, z, delta, y, gw, u):
    F, Fdot = torch.func.jvp(lambda d: student(z, d, y, gw), (delta,), (torch.ones_like(delta),))
    _loss(F, Fdot, delta, u).backward()


STEPS = {"explicit_forward_jvp": step_explicit, "torch_func_jvp": step_func_jvp}


@pytest.mark.parametrize("impl", list(STEPS))
def test_prediction_step(benchmark, setup, impl):
    student, inputs = setup
    fn = STEPS[impl]

    def run():
        student.zero_grad(set_to_none=True)
        fn(student, *inputs)

    benchmark.group = "prediction step, DiT-S/2, 32x32x4, batch 8, CPU"
    benchmark.extra_info["peak_bytes"] = peak_bytes(run)
    benchmark.extra_info["saved_for_backward_bytes"] = saved_for_backward_bytes(
        lambda: _forward_only(impl, student, *inputs))
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


def _forward_only(impl, student, z, delta, y, gw, u):
    """The graph-building part of a step (no backward), for the saved-tensor count."""
    if impl == "explicit_forward_jvp":
        F, Fdot = student.forward_jvp(z, delta, y, gw, tdelta=torch.ones_like(delta))
    else:
        F, Fdot = torch.func.jvp(lambda d: student(z, d, y, gw), (delta,), (torch.ones_like(delta),))
    return _loss(F, Fdot, delta, u)
