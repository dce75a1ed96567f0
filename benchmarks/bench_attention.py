"""JVP flash attention vs the reference (materialised P), and on CUDA vs SDPA and flash-attn.

On CUDA: DiT-XL/2 attention (B=32, H=16, S=256, Dh=72) in bf16. ``test_attention_jvp_backward`` times
(O, Ȯ) + backward of O for both backends; ``test_primal_against_baselines`` times forward and
forward+backward of the primal for the Triton kernel, SDPA and (when importable) flash-attn, with GPU
execution times from ``triton.testing.do_bench`` and TFLOP/s against the chip's dense bf16 peak
(A100 312, H100 989 TFLOP/s). On CPU: a small case; the Triton path runs in the interpreter (timings
there are not performance figures) and the device-independent figures are the launch counts and the
activation bytes saved for backward.

    TRITON_INTERPRET=1 pytest benchmarks/bench_attention.py --benchmark-only -s
"""
import pytest
import torch
import torch.nn.functional as F
from launches import device_and_backends, gpu_ms, measure

import freeflow.kernels as K
from freeflow.kernels.flash_attention import AttentionFunction

DEVICE, BACKENDS = device_and_backends()
B, H, S, D = (32, 16, 256, 72) if DEVICE == "cuda" else (2, 4, 256, 72)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0}


def peak_tflops():
    """Dense bf16 tensor-core peak of this GPU (None when unknown)."""
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def inputs(seed=0, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, H, S, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]
    tangents = [torch.randn(B, H, S, D, generator=g).to(DEVICE, dtype) for _ in range(3)]
    do = torch.randn(B, H, S, D, generator=g).to(DEVICE, dtype)
    return qkv, tangents, do


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_jvp_backward(benchmark, backend):
    if backend not in BACKENDS:
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    qkv, tangents, do = inputs()

    def forward():
        return K.attention_jvp(*qkv, *tangents, backend=backend)

    def run():
        o, _ = forward()
        o.backward(do)

    measure(benchmark, f"attention {backend} B={B} H={H} S={S} D={D} {DTYPE}", forward, run)


def _primal_impls():
    impls = {"triton": lambda q, k, v: AttentionFunction.apply(q, k, v, None)[0],
             "sdpa": F.scaled_dot_product_attention}
    try:
        from flash_attn import flash_attn_func
        impls["flash_attn"] = lambda q, k, v: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    except Exception:
        pass
    return impls


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU timings need CUDA")
def test_primal_against_baselines(benchmark):
    """Forward and forward+backward of O = softmax(QKᵀ/√d)V: Triton vs SDPA vs flash-attn, TFLOP/s and % of peak."""
    qkv, tangents, do = inputs(1)
    flops_fwd = 4 * B * H * S * S * D  # two GEMMs of 2·S·S·D
    peak = peak_tflops()
    rows = []
    for name, fn in _primal_impls().items():
        fwd = gpu_ms(lambda fn=fn: fn(*qkv))
        both = gpu_ms(lambda fn=fn: torch.autograd.backward(fn(*qkv), do))
        for what, ms, flops in (("fwd", fwd, flops_fwd), ("fwd+bwd", both, 3.5 * flops_fwd)):
            tflops = flops / ms / 1e9
            frac = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
            rows.append((name, what, ms, tflops, frac))
            benchmark.extra_info[f"{name}_{what}_ms"] = ms
    # the fused JVP pass (O and Ȯ, ~3× the primal FLOPs) for reference
    ms = gpu_ms(lambda: K.attention_jvp(*qkv, *tangents))
    rows.append(("triton jvp", "O+Ȯ", ms, 3 * flops_fwd / ms / 1e9,
                 f"{100 * 3 * flops_fwd / ms / 1e9 / peak:.1f}%" if peak else "n/a"))
    print(f"\nattention B={B} H={H} S={S} D={D} {DTYPE} on {torch.cuda.get_device_name()}")
    for name, what, ms, tflops, frac in rows:
        print(f"  {name:<12} {what:<8} {ms:8.3f} ms {tflops:7.1f} TFLOP/s {frac:>7} of dense bf16 peak")
    benchmark.pedantic(lambda: torch.cuda.synchronize(), rounds=1, iterations=1)


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU timings need CUDA")
def test_fp32_tangent_by_dot_precision(benchmark, monkeypatch):
    """fp32 (O, Ȯ) + backward at the same shape for each ``FREEFLOW_FP32_DOT`` against the eager reference: which
    fp32 dot precision the installed Triton compiles well (the IEEE path spilled under Triton 3.6)."""
    qkv, tangents, do = inputs(2, torch.float32)

    def step(backend):
        o, _ = K.attention_jvp(*qkv, *tangents, backend=backend)
        o.backward(do)

    rows = [("reference", gpu_ms(lambda: step("reference")))]
    for precision in ("ieee", "tf32x3", "tf32"):
        monkeypatch.setenv("FREEFLOW_FP32_DOT", precision)
        rows.append((precision, gpu_ms(lambda: step("triton"))))
        benchmark.extra_info[f"{precision}_ms"] = rows[-1][1]
    print(f"\nfp32 attention_jvp + backward B={B} H={H} S={S} D={D} on {torch.cuda.get_device_name()}")
    for name, ms in rows:
        print(f"  {name:<10} {ms:8.3f} ms ({rows[0][1] / ms:.2f}x the reference)")
    benchmark.pedantic(lambda: torch.cuda.synchronize(), rounds=1, iterations=1)
