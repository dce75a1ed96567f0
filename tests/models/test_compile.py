"""torch.compile(fullgraph=True) of the model's tangent forward: one graph, the same numbers as eager.

The reference backend compiles under Inductor (CPU code generation); the Triton backend (kernels in the
interpreter here) is captured whole and run by ``aot_eager``, which keeps our ``freeflow::`` ops opaque, as
Inductor does with them on a GPU. ``dynamo.reset()`` between cases keeps one case's graphs from serving another.
"""
import pytest
import torch
from checks import rel_err, trained_like_

from freeflow.models import DiT, DiTConfig, FlowMapStudent

# Inductor's code generation takes 10-60 s on 2 cores: the fast lane (-m "not slow") keeps the aot_eager capture
CASES = [pytest.param("reference", "inductor", marks=pytest.mark.slow), ("triton", "aot_eager")]


def _student(backend):
    torch.manual_seed(0)
    # 49 tokens, head dim 72 (DiT-XL's), as the kernel tests use
    cfg = DiTConfig(input_size=14, patch_size=2, in_channels=4, hidden_size=144, depth=2, num_heads=2, num_classes=5,
                    learn_sigma=True)
    teacher = DiT(cfg, family="sit", backend=backend)
    trained_like_(teacher)
    student = FlowMapStudent.from_teacher(teacher)
    with torch.no_grad():
        for emb in (student.net.dt_embedder, student.net.gw_embedder):
            emb.mlp[2].weight.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 14, 14, generator=g)
    delta, gw, y = torch.rand(2, generator=g), 1 + torch.rand(2, generator=g), torch.tensor([1, 4])
    return student, (z, delta, y, gw)


def _prediction(student, z, delta, y, gw):
    """FreeFlow's prediction pass: F and ∂F/∂δ and a loss on F (its backward runs through the compiled graph's)."""
    F, F_dot = student.forward_jvp(z, delta, y, gw, tdelta=torch.ones_like(delta))
    return F, F_dot, (F * (F.detach() + delta.view(-1, 1, 1, 1) * F_dot)).mean()


def _step(prediction, student, inputs):
    F, F_dot, loss = prediction(student, *inputs)
    grads = torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad])
    return F.detach(), F_dot, grads


@pytest.mark.parametrize("backend, compile_backend", CASES)
def test_student_forward_jvp_and_backward_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    student, inputs = _student(backend)
    eager = _step(_prediction, student, inputs)
    compiled = _step(torch.compile(_prediction, fullgraph=True, backend=compile_backend), student, inputs)
    assert rel_err(compiled[0], eager[0]) < 1e-5
    assert rel_err(compiled[1], eager[1]) < 1e-5
    for a, b in zip(compiled[2], eager[2]):
        assert rel_err(a, b, floor=1e-3 * max(g.abs().max().item() for g in eager[2])) < 1e-4
