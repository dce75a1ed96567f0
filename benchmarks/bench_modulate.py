"""adaLN modulate and the fused gated-residual seam vs the references: forward + tangent, then backward.

On CUDA: DiT-XL/2 sizes (N=32, S=256, C=1152) in bf16; on CPU a smaller batch in fp32 with the Triton
path in the interpreter (launch counts and saved bytes are the device-independent figures).

    TRITON_INTERPRET=1 pytest benchmarks/bench_modulate.py --benchmark-only -s
"""
import pytest
import torch
from launches import device_and_backends, measure

import freeflow.kernels as K

DEVICE, BACKENDS = device_and_backends()
N, S, C = (32, 256, 1152) if DEVICE == "cuda" else (2, 256, 1152)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _tensors(*shapes, grad=False):
    g = torch.Generator().manual_seed(len(shapes))
    return [torch.randn(*s, generator=g).to(DEVICE, DTYPE).requires_grad_(grad) for s in shapes]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_adaln_modulate_jvp_backward(benchmark, backend):
    if backend not in BACKENDS:
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    primals = _tensors((N, S, C), (N, C), (N, C), grad=True)
    tangents = _tensors((N, S, C), (N, C), (N, C))
    gy = _tensors((N, S, C))[0]

    def forward():
        return K.adaln_modulate_jvp(*primals, *tangents, backend=backend)

    def run():
        forward()[0].backward(gy)

    measure(benchmark, f"adaln_modulate {backend} N={N} S={S} C={C} {DTYPE}", forward, run)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gated_residual_modulate_jvp_backward(benchmark, backend):
    if backend not in BACKENDS:
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    primals = _tensors((N, S, C), (N, C), (N, S, C), (N, C), (N, C), grad=True)
    tangents = _tensors((N, S, C), (N, C), (N, S, C), (N, C), (N, C))
    gx, gy = _tensors((N, S, C), (N, S, C))

    def forward():
        return K.gated_residual_modulate_jvp(*primals, *tangents, backend=backend)

    def run():
        x_new, y, _, _ = forward()
        torch.autograd.backward((x_new, y), (gx, gy))

    measure(benchmark, f"gated_residual_modulate {backend} N={N} S={S} C={C} {DTYPE}", forward, run)
