"""Host time per op call, with every Triton launch stubbed out: what the Python side of each op costs.

On an H100 one DiT block (N=2, S=256, hidden 384) ran at 0.8x the reference's speed with the kernels: the
block is launch-bound, so the host time per op call decides. Here each kernel's launch is a counter
(``launches.stubbed_launches``) and the tensors are tiny, so an op call's time is its dispatch, argument
checks, autocast queries, ``autograd.Function`` plumbing, launch-wrapper work and the few ATen ops around the
kernels: the time the host needs before the GPU could start. Each op runs on the Triton path (launches
stubbed, GPU launch settings) and on the reference path (for comparison: the reference launches more, but
its ops run for real on tiny tensors here), then one DiT block ``forward_jvp`` + backward
(``bench_block.block_forward_jvp``) at a tiny width. Inputs are fp32 (a student's default) and require grad, so
each call builds its autograd graph as in training. On a CUDA machine the same code measures host time
there (the GPU is idle but for the ATen ops).

    pytest benchmarks/bench_overhead.py --benchmark-only
    python benchmarks/bench_overhead.py [--json OUT.json]     # the table of µs per call
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time

import pytest
import torch
from bench_block import _step
from launches import stubbed_launches

import freeflow.kernels as K
from freeflow.models import DiT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
# Tiny sizes: the ATen ops' own work stays far below their dispatch cost.
N, S, C, HEADS, HEAD_DIM = 2, 8, 64, 2, 32


def _rand(*shape, grad=False, generator):
    return torch.randn(*shape, generator=generator).to(DEVICE, DTYPE).requires_grad_(grad)


def _ops():
    """{op name: (call(backend), has a Triton kernel)}. Primals require grad; tangents do not."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=False):
        return _rand(*shape, grad=grad, generator=g)

    x, h = r(N, S, C, grad=True), r(N, S, C, grad=True)
    gate, shift, scale = (r(N, C, grad=True) for _ in range(3))
    tx, th = r(N, S, C), r(N, S, C)
    tgate, tshift, tscale = (r(N, C) for _ in range(3))
    q, k, v = (r(N, HEADS, S, HEAD_DIM, grad=True) for _ in range(3))
    tq, tk, tv = (r(N, HEADS, S, HEAD_DIM) for _ in range(3))
    fc, bias, tfc = r(N, S, 4 * C, grad=True), r(4 * C, grad=True), r(N, S, 4 * C)
    weight, wbias = r(C, C, grad=True), r(C, grad=True)
    cond, tcond = r(N, C, grad=True), r(N, C)
    t, tt = torch.rand(N, generator=g).to(DEVICE), torch.rand(N, generator=g).to(DEVICE)
    return {
        "adaln_modulate": (lambda b: K.adaln_modulate(x, shift, scale, backend=b), True),
        "adaln_modulate_jvp": (lambda b: K.adaln_modulate_jvp(x, shift, scale, tx, tshift, tscale, backend=b), True),
        "gated_residual": (lambda b: K.gated_residual(x, gate, h, backend=b), True),
        "gated_residual_jvp": (lambda b: K.gated_residual_jvp(x, gate, h, tx, tgate, th, backend=b), True),
        "gated_residual_modulate": (lambda b: K.gated_residual_modulate(x, gate, h, shift, scale, backend=b), True),
        "gated_residual_modulate_jvp": (lambda b: K.gated_residual_modulate_jvp(
            x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, backend=b), True),
        "bias_gelu": (lambda b: K.bias_gelu(fc, bias, backend=b), True),
        "bias_gelu_jvp": (lambda b: K.bias_gelu_jvp(fc, bias, tfc, backend=b), True),
        "attention": (lambda b: K.attention(q, k, v, backend=b), True),
        "attention_jvp": (lambda b: K.attention_jvp(q, k, v, tq, tk, tv, backend=b), True),
        # no kernel: one implementation, measured once
        "linear_jvp": (lambda b: K.linear_jvp(x, tx, weight, wbias), False),
        "silu_jvp": (lambda b: K.silu_jvp(cond, tcond), False),
        "layer_norm_jvp": (lambda b: K.layer_norm_jvp(x, tx), False),
        "timestep_embedding_jvp": (lambda b: K.timestep_embedding_jvp(t, tt, C), False),
    }


def _block():
    """backend → one forward_jvp + backward step of a DiT block at a tiny width (``bench_block._step``)."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=C, depth=1, num_heads=HEADS,
                num_classes=10, learn_sigma=False).to(DEVICE, DTYPE)
    block = model.blocks[0]
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    primals = [_rand(N, S, C, generator=g), _rand(N, S, C, generator=g), _rand(N, C, generator=g),
               _rand(N, 2 * C, generator=g)]
    tangents = [_rand(N, S, C, generator=g), _rand(N, S, C, generator=g), _rand(N, C, generator=g),
                _rand(N, 2 * C, generator=g)]
    grads = [_rand(N, S, C, generator=g), _rand(N, S, C, generator=g)]
    return lambda backend: _step(block, primals, tangents, grads, backend)[1]


@contextlib.contextmanager
def one_thread():
    """ATen on one CPU thread: on tiny tensors more threads only add wake-ups (and, on a shared machine, waits
    for a core), which a GPU host does not pay for its launches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, seconds=0.5, round_s=1e-3) -> float:
    """The fastest round's mean time per call, in µs. A round lasts ~1 ms, less than a scheduler time slice, so
    on a shared machine some rounds run undisturbed: the fastest estimates the time on an idle host."""
    estimate = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        fn()
        _sync()
        estimate = min(estimate, time.perf_counter() - start)
    calls = max(1, int(round_s / estimate))
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _launches(fn) -> int:
    with stubbed_launches() as counts:
        fn("triton")
    return sum(counts.values())


def measure_all(seconds=0.5) -> dict:
    """{"ops": {name: {"triton_us", "reference_us", "launches"}}, "block": {...}} on this machine."""
    ops = {}
    for name, (fn, has_kernel) in _ops().items():
        row = {"launches": _launches(fn) if has_kernel else 0}
        with stubbed_launches():
            row["triton_us"] = per_call_us(functools.partial(fn, "triton"), seconds)
        row["reference_us"] = per_call_us(functools.partial(fn, "reference"), seconds) if has_kernel else None
        ops[name] = row
    step = _block()
    block = {"launches": _launches(lambda b: step(b)())}
    assert block["launches"] > 0, "the block did not reach a kernel: the Triton path was not taken"
    with stubbed_launches():
        block["triton_us"] = per_call_us(step("triton"), seconds)
    block["reference_us"] = per_call_us(step("reference"), seconds)
    return {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
            "sizes": dict(N=N, S=S, C=C, heads=HEADS, head_dim=HEAD_DIM, dtype=str(DTYPE)), "ops": ops,
            "block": block}


def table(result: dict) -> str:
    lines = ["| op | Triton path (launches stubbed) | reference | stubbed launches |", "|---|---|---|---|"]
    for name, row in result["ops"].items():
        ref = "—" if row["reference_us"] is None else f"{row['reference_us']:.1f} µs"
        lines.append(f"| `{name}` | {row['triton_us']:.1f} µs | {ref} | {row['launches'] or '—'} |")
    b = result["block"]
    lines.append(f"| one DiT block, forward_jvp + backward | {b['triton_us']:.1f} µs | {b['reference_us']:.1f} µs "
                 f"| {b['launches']} |")
    return "\n".join(lines)


# ---- pytest-benchmark: one test per (op, path) and the block ----------------------------------------------


def _bench(benchmark, fn, launches):
    benchmark.extra_info["stubbed_launches"] = launches
    benchmark(fn)
    benchmark.extra_info["us_per_call"] = benchmark.stats.stats.min * 1e6


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("op", list(_ops()))
def test_op_host_time(benchmark, op, path):
    fn, has_kernel = _ops()[op]
    if path == "reference" and not has_kernel:
        pytest.skip("one implementation: measured on the Triton row")
    launches = _launches(fn) if has_kernel else 0
    sdpa = op == "attention" and DEVICE == "cuda"  # the primal fast path: SDPA, no Triton launch
    if path == "triton" and has_kernel and not sdpa:
        assert launches > 0, f"{op} did not reach a kernel: the Triton path was not taken"
    if path == "reference":
        _bench(benchmark, lambda: fn("reference"), 0)
        return
    with stubbed_launches():
        _bench(benchmark, lambda: fn("triton"), launches)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_block_host_time(benchmark, path):
    step = _block()
    if path == "reference":
        _bench(benchmark, step("reference"), 0)
        return
    launches = _launches(lambda b: step(b)())
    assert launches > 0
    with stubbed_launches():
        _bench(benchmark, step("triton"), launches)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--seconds", type=float, default=0.5, help="time spent per figure")
    args = p.parse_args(argv)
    with one_thread():
        result = measure_all(args.seconds)
    print(f"{result['device']}, torch {result['torch']}, {result['sizes']}: µs per call")
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
