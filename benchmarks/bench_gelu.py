"""Bias + GELU(tanh) with tangent vs the reference: forward + tangent, then backward (dh, dbias).

On CUDA: DiT-XL/2's MLP hidden (N·S = 8192 rows × 4608) in bf16; on CPU fewer rows in fp32 with the
Triton path in the interpreter.

    TRITON_INTERPRET=1 pytest benchmarks/bench_gelu.py --benchmark-only -s
"""
import pytest
import torch
from launches import device_and_backends, measure

import freeflow.kernels as K

DEVICE, BACKENDS = device_and_backends()
M, C = (32 * 256, 4608) if DEVICE == "cuda" else (512, 4608)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bias_gelu_jvp_backward(benchmark, backend):
    if backend not in BACKENDS:
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(M, C, generator=g).to(DEVICE, DTYPE).requires_grad_()
    bias = torch.randn(C, generator=g).to(DEVICE, DTYPE).requires_grad_()
    th, gy = (torch.randn(M, C, generator=g).to(DEVICE, DTYPE) for _ in range(2))

    def forward():
        return K.bias_gelu_jvp(h, bias, th, backend=backend)

    def run():
        forward()[0].backward(gy)

    measure(benchmark, f"bias_gelu {backend} M={M} C={C} {DTYPE}", forward, run)
