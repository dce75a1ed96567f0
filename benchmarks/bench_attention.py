"""JVP flash attention vs the reference (materialised P): (O, Ȯ) + backward of O.

On CUDA: DiT-XL/2 attention (B=32, H=16, S=256, Dh=72) timed for both backends. On CPU: a small case;
the Triton path runs in the interpreter (timings there are not performance figures) and the device-
independent figures are the launch counts and the activation bytes saved for backward.

    TRITON_INTERPRET=1 pytest benchmarks/bench_attention.py --benchmark-only -s
"""
import pytest
import torch
from launches import device_and_backends, measure

import freeflow.kernels as K

DEVICE, BACKENDS = device_and_backends()
B, H, S, D = (32, 16, 256, 72) if DEVICE == "cuda" else (2, 4, 256, 72)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_jvp_backward(benchmark, backend):
    if backend not in BACKENDS:
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(B, H, S, D, generator=g).to(DEVICE, DTYPE).requires_grad_() for _ in range(3)]
    tangents = [torch.randn(B, H, S, D, generator=g).to(DEVICE, DTYPE) for _ in range(3)]
    do = torch.randn(B, H, S, D, generator=g).to(DEVICE, DTYPE)

    def forward():
        return K.attention_jvp(*qkv, *tangents, backend=backend)

    def run():
        o, _ = forward()
        o.backward(do)

    measure(benchmark, f"attention {backend} B={B} H={H} S={S} D={D} {DTYPE}", forward, run)
