"""One DiT block, forward_jvp + backward: kernel launches and activation bytes saved for backward, Triton vs reference.

The block is the steady-state step of ``freeflow.models.DiT``'s trunk with tangents on everything:
adaLN projection (dual GEMM) → attention (qkv dual GEMM, JVP attention, proj) → gated residual fused
with LN + modulate → MLP (fc1 dual GEMM, bias-GELU, fc2) → gated residual fused with the next block's
LN + modulate; then backward from both outputs to the inputs and weights. Launch counts are
device-independent (the Triton path runs in the interpreter on CPU, ``TRITON_INTERPRET=1``):

    TRITON_INTERPRET=1 pytest benchmarks/bench_block.py --benchmark-only -s
"""
import pytest
import torch
from launches import count_launches, device_and_backends, saved_activation_bytes, time_run

import freeflow.kernels as K
from freeflow.kernels.block import block_jvp, modulation
from freeflow.models import DiT

# DiT-S width/heads (head dim 64) at 256 tokens; launch counts do not depend on the sizes
N, S, HIDDEN, HEADS = 2, 256, 384, 6
RESULTS = {}


def _setup(device):
    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=HIDDEN, depth=1, num_heads=HEADS,
                num_classes=10, learn_sigma=False).to(device)
    block = model.blocks[0]
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    def rnd(*s):
        return torch.randn(*s, generator=g).to(device)
    x, y = rnd(N, S, HIDDEN), rnd(N, S, HIDDEN)
    c, nxt = rnd(N, HIDDEN), rnd(N, 2 * HIDDEN)
    tangents = [rnd(N, S, HIDDEN), rnd(N, S, HIDDEN), rnd(N, HIDDEN), rnd(N, 2 * HIDDEN)]
    grads = [rnd(N, S, HIDDEN), rnd(N, S, HIDDEN)]
    return block, [x, y, c, nxt], tangents, grads


def block_forward_jvp(block, x, y, c, nxt, tx, ty, tc, tnxt, backend):
    mod, tmod = modulation(*K.linear_jvp(c, tc, block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias))
    return block_jvp(*block.branches(backend), x, y, tx, ty, mod, tmod, *nxt.chunk(2, dim=1), *tnxt.chunk(2, dim=1),
                     backend=backend)


def _step(block, primals, tangents, grads, backend):
    leaves = [p.detach().requires_grad_() for p in primals]

    def forward():
        return block_forward_jvp(block, *leaves, *tangents, backend)

    def run():
        x, y, _, _ = forward()
        torch.autograd.backward((x, y), grads)

    return forward, run


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_forward_jvp_backward(benchmark, backend):
    device, backends = device_and_backends()
    if backend not in backends:
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1 (set before triton is imported)")
    block, primals, tangents, grads = _setup(device)
    forward, run = _step(block, primals, tangents, grads, backend)
    run()  # warm-up: compiles (GPU) / autotunes, so the counts below are one steady-state step
    counts = count_launches(run)
    fwd_counts = count_launches(lambda: forward())
    saved = saved_activation_bytes(forward, exclude=list(block.parameters()))
    total = sum(counts["triton"].values()) + sum(counts["aten"].values())
    info = {
        "triton_launches": sum(counts["triton"].values()),
        "aten_launches": sum(counts["aten"].values()),
        "total_launches": total,
        "forward_jvp_launches": sum(fwd_counts["triton"].values()) + sum(fwd_counts["aten"].values()),
        "saved_activation_bytes": saved,
        "triton_kernels": dict(counts["triton"]),
        "aten_ops": dict(counts["aten"]),
    }
    benchmark.extra_info.update(info)
    RESULTS[backend] = info
    print(f"\n[{backend}] one DiT block forward_jvp + backward (N={N}, S={S}, hidden={HIDDEN}, heads={HEADS}):"
          f" {total} launches ({info['triton_launches']} Triton + {info['aten_launches']} ATen;"
          f" forward_jvp alone {info['forward_jvp_launches']}), activations saved for backward {saved / 2**20:.2f} MiB")
    print(f"  Triton kernels: {dict(counts['triton'])}")
    print(f"  ATen ops: {dict(sorted(counts['aten'].items(), key=lambda kv: -kv[1]))}")
    rounds = 1 if device == "cpu" and backend == "triton" else 5  # the interpreter is slow
    time_run(benchmark, run, f"block {backend}", rounds=rounds)
