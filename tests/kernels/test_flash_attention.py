"""JVP flash attention: Triton kernels vs the reference, SDPA's math path, torch.func and autograd
(interpreted on CPU, compiled on CUDA: the ``device`` fixture); dispatch, the backward choices and their settings."""
import math
import sys
import types
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from checks import make_check
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.nn.attention import SDPBackend, sdpa_kernel

import freeflow.kernels as K
import freeflow.kernels.flash_attention as fa
from freeflow.kernels.flash_attention import attention_jvp_reference, attention_reference, head_chunks

T = "triton"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
check = make_check(TOL)
# (B, H, S, Dh): S = 1, 49, 100, 257 (masked tails across several key blocks), DiT head dims 64 and 72
CASES = [(1, 2, 1, 64), (2, 1, 49, 72), (1, 2, 100, 72), (2, 1, 257, 64)]


@pytest.fixture(autouse=True)
def fresh_attention_settings():
    """Each test starts from the environment's attention settings and leaves no cached setting behind (autouse, so
    its teardown runs after monkeypatch has restored the environment)."""
    fa.refresh_settings()
    yield
    fa.refresh_settings()


@pytest.fixture
def triton_backward():
    """Our Triton backward kernels on every device: on CUDA the default backward is SDPA's (tested on its own)."""
    with fa.use_settings(backward="triton"):
        yield


def qkv(B, H, S, D, dtype, seed=0, device="cpu"):
    """q, k, v as DiT makes them: strided views of one (B, S, 3, H, D) projection (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    def proj():
        return torch.randn(B, S, 3, H, D, generator=g).to(device, dtype).permute(2, 0, 3, 1, 4).unbind(0)
    return proj(), proj()


def leaves(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CASES)
def test_fused_jvp_and_backward(device, shape, dtype, triton_backward):
    (q, k, v), tangents = qkv(*shape, dtype, device=device)
    assert shape[2] == 1 or not q.is_contiguous()
    mine, ref = leaves((q, k, v)), leaves((q, k, v))
    o, to = K.attention_jvp(*mine, *tangents, backend=T)
    o_ref, to_ref = attention_jvp_reference(*ref, *tangents)
    check(o, o_ref, dtype, "O")
    check(to, to_ref, dtype, "tangent")
    assert o.requires_grad and not to.requires_grad
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(o, mine, g), torch.autograd.grad(o_ref, ref, g)):
        check(a, b, dtype, name)


@pytest.mark.parametrize("shape", [(2, 1, 49, 72), (1, 2, 257, 64)])
def test_matches_sdpa_math_path_under_torch_func_jvp(device, shape):
    (q, k, v), tangents = qkv(*shape, torch.float32, seed=2, device=device)
    o, to = torch.func.jvp(lambda q, k, v: K.attention(q, k, v, backend=T), (q, k, v), tangents)
    with sdpa_kernel(SDPBackend.MATH):
        o_sdpa, to_sdpa = torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), tangents)
    check(o, o_sdpa, torch.float32, "O vs SDPA")
    check(to, to_sdpa, torch.float32, "tangent vs SDPA math path")
    with fwAD.dual_level():
        dual = K.attention(*[fwAD.make_dual(p, t) for p, t in zip((q, k, v), tangents)], backend=T)
        check(fwAD.unpack_dual(dual).tangent, to_sdpa, torch.float32, "forward_ad tangent")


def test_half_precision_and_cross_attention_with_scale(device, triton_backward):
    (q, k, v), (tq, tk, tv) = qkv(2, 2, 49, 64, torch.float16, seed=3, device=device)
    o, to = K.attention_jvp(q, k, v, tq, tk, tv, backend=T)
    o_ref, to_ref = attention_jvp_reference(q, k, v, tq, tk, tv)
    check(o, o_ref, torch.float16, "fp16 O")
    check(to, to_ref, torch.float16, "fp16 tangent")
    # S_q != S_k, Dv != Dh, explicit scale
    g = torch.Generator().manual_seed(4)
    shapes = [(2, 2, 49, 40), (2, 2, 17, 40), (2, 2, 17, 24)]
    q, k, v = (torch.randn(*s, generator=g).to(device) for s in shapes)
    tq, tk, tv = (torch.randn(*s, generator=g).to(device) for s in shapes)
    mine, ref = leaves((q, k, v)), leaves((q, k, v))
    o, to = K.attention_jvp(*mine, tq, tk, tv, scale=0.3, backend=T)
    o_ref, to_ref = attention_jvp_reference(*ref, tq, tk, tv, scale=0.3)
    check(o, o_ref, torch.float32, "cross O")
    check(to, to_ref, torch.float32, "cross tangent")
    gr = torch.randn(o.shape, generator=g).to(device)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(o, mine, gr), torch.autograd.grad(o_ref, ref, gr)):
        check(a, b, torch.float32, f"cross {name}")


@pytest.mark.parametrize("d, chunks", [(72, (64, 16)), (96, (64, 32)), (40, (32, 16)), (136, (128, 16)),
                                         (64, (64, 0)), (24, (32, 0)), (100, (128, 0)), (8, (16, 0))])
def test_head_dim_runs_as_at_most_two_power_of_two_chunks(d, chunks):
    main, tail = head_chunks(d)
    assert (main, tail) == chunks
    assert main + tail >= d and min(main, tail or 16) >= 16  # every column covered, every tile fits tl.dot


@pytest.mark.parametrize("split_qk, split_v", [(False, False), (True, False), (False, True), (True, True)])
def test_head_dim_72_with_and_without_the_split(device, monkeypatch, split_qk, split_v, triton_backward):
    """Every kernel with configs that run q/k's and v's Dh = 72 as 64 + 16 columns or padded to 128."""
    import triton

    for kernel in (fa._attn_fwd_kernel, fa._attn_bwd_dkdv_kernel, fa._attn_bwd_dq_kernel):
        config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT_QK": split_qk, "SPLIT_V": split_v},
                               num_warps=4, num_stages=2)
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
    (q, k, v), tangents = qkv(2, 1, 49, 72, torch.float32, seed=12, device=device)
    mine, ref = leaves((q, k, v)), leaves((q, k, v))
    o, to = K.attention_jvp(*mine, *tangents, backend=T)
    o_ref, to_ref = attention_jvp_reference(*ref, *tangents)
    check(o, o_ref, torch.float32, "O")
    check(to, to_ref, torch.float32, "tangent")
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(13)).to(device)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(o, mine, g), torch.autograd.grad(o_ref, ref, g)):
        check(a, b, torch.float32, name)


def test_split_value_head_dim_with_a_single_chunk_query_head_dim(device, triton_backward):
    """Dh = 64 (one chunk) with Dv = 72 (64 + 16): the value side's second chunk on its own, every kernel."""
    g = torch.Generator().manual_seed(11)
    shapes = [(2, 2, 33, 64), (2, 2, 49, 64), (2, 2, 49, 72)]
    q, k, v = (torch.randn(*s, generator=g).to(device) for s in shapes)
    tq, tk, tv = (torch.randn(*s, generator=g).to(device) for s in shapes)
    mine, ref = leaves((q, k, v)), leaves((q, k, v))
    o, to = K.attention_jvp(*mine, tq, tk, tv, backend=T)
    o_ref, to_ref = attention_jvp_reference(*ref, tq, tk, tv)
    check(o, o_ref, torch.float32, "O")
    check(to, to_ref, torch.float32, "tangent")
    gr = torch.randn(o.shape, generator=g).to(device)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(o, mine, gr), torch.autograd.grad(o_ref, ref, gr)):
        check(a, b, torch.float32, name)


def test_autocast_casts_inputs_like_sdpa(device):
    """Under bf16 autocast, fp32 q/k (an fp32 LayerNorm's output) meet a bf16 v: the op computes in bf16, as
    SDPA does, and the fp32 leaves still get fp32 gradients."""
    (q, k, v), (tq, tk, tv) = qkv(2, 2, 49, 72, torch.float32, seed=7, device=device)
    v = v.to(torch.bfloat16)
    mine, ref = leaves((q, k, v)), leaves((q, k, v))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        o = K.attention(*mine, backend=T)
        o_sdpa = F.scaled_dot_product_attention(*ref)
        o_jvp, to = K.attention_jvp(*(t.detach() for t in mine), tq, tk, tv, backend=T)
    assert o.dtype == o_sdpa.dtype == o_jvp.dtype == to.dtype == torch.bfloat16
    check(o, o_sdpa, torch.bfloat16, "O vs SDPA under autocast")
    bf16 = [t.detach().to(torch.bfloat16) for t in (q, k, v, tq, tk, tv)]
    o_ref, to_ref = attention_jvp_reference(*bf16)  # what the op sees once autocast has cast its inputs
    check(o_jvp, o_ref, torch.bfloat16, "O of attention_jvp under autocast")
    check(to, to_ref, torch.bfloat16, "tangent under autocast")
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(8)).to(device, torch.bfloat16)
    grads, grads_sdpa = torch.autograd.grad(o, mine, g), torch.autograd.grad(o_sdpa, ref, g)
    assert [a.dtype for a in grads] == [torch.float32, torch.float32, torch.bfloat16]
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_sdpa):
        check(a, b, torch.bfloat16, f"{name} under autocast")


def test_partial_and_none_tangents(device):
    (q, k, v), tangents = qkv(2, 1, 49, 72, torch.float32, seed=5, device=device)
    for keep in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        tans = [t if kp else None for t, kp in zip(tangents, keep)]
        _, to = K.attention_jvp(q, k, v, *tans, backend=T)
        full = tuple(t if kp else torch.zeros_like(t) for t, kp in zip(tangents, keep))
        _, to_func = torch.func.jvp(attention_reference, (q, k, v), full)
        check(to, to_func, torch.float32, f"tangent with only {keep}")
    o, to = K.attention_jvp(q, k, v, None, None, None, backend=T)
    assert to is None
    check(o, attention_reference(q, k, v), torch.float32, "O")


def test_meanflow_step_with_torch_func_jvp(device):
    """A MeanFlow-style step: u and du/dt by torch.func.jvp through a tiny attention net, then backward."""
    g = torch.Generator().manual_seed(6)
    B, H, S, D = 2, 2, 49, 64
    w_in = torch.randn(D, 3 * H * D, generator=g).to(device) * D ** -0.5
    w_out = torch.randn(H * D, D, generator=g).to(device) * (H * D) ** -0.5
    z, eps = torch.randn(B, S, D, generator=g).to(device), torch.randn(B, S, D, generator=g).to(device)
    t = torch.rand(B, 1, 1, generator=g).to(device)

    def step(backend):
        w = w_in.clone().requires_grad_()

        def u(z, t):
            qkv_ = ((z + t) @ w).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
            o = K.attention(*qkv_.unbind(0), backend=backend)
            return o.transpose(1, 2).reshape(B, S, H * D) @ w_out

        zt = (1 - t) * z + t * eps
        out, dudt = torch.func.jvp(u, (zt, t), (eps - z, torch.ones_like(t)))
        target = (eps - z - t * dudt).detach()
        loss = (out - target).square().mean()
        loss.backward()
        return loss.detach(), dudt.detach(), w.grad

    for name, a, b in zip(("loss", "du/dt", "dW"), step(T), step("reference")):
        check(a, b, torch.float32, f"MeanFlow {name}")


def test_validation(device):
    (q, k, v), _ = qkv(1, 2, 5, 64, torch.float32, device=device)
    with pytest.raises(ValueError, match="k must have shape"):
        K.attention(q, k[..., :-1], v, backend=T)
    with pytest.raises(ValueError, match="q must have rank 4"):
        K.attention(q[0], k, v, backend=T)
    with pytest.raises(ValueError, match="tv"):
        K.attention_jvp(q, k, v, None, None, v[:, :1], backend=T)
    with pytest.raises(ValueError, match="k must have q's dtype"):
        K.attention(q, k.half(), v, backend=T)
    with pytest.raises(ValueError, match="q must be float32, float16 or bfloat16"):
        K.attention(q.double(), k.double(), v.double(), backend=T)
    with pytest.raises(ValueError, match="head dims up to 256"):
        K.attention(*(torch.zeros(1, 1, 2, 300, device=device) for _ in range(3)), backend=T)


def test_primal_fast_path_dispatch(device, monkeypatch):
    """On CUDA (faked here), SDPA runs exactly when no tangent can be asked for; with a tangent the JVP kernel runs in
    fp16/bf16 and the reference in fp32 (``tangent_impl``: the fp32 kernel was measured slower), unless forced."""
    calls, launches = [], []

    def fake_sdpa(q, k, v, scale):
        calls.append("sdpa")
        return attention_reference(q, k, v, scale)

    forward = fa.attention_forward
    (q, k, v), tangents = qkv(1, 2, 49, 72, torch.float32, seed=7, device=device)
    assert fa.primal_impl(q, k, v) == ("sdpa" if device.type == "cuda" else "triton")  # real device decision
    assert fa.primal_impl(q, k, v, backend="reference") == "reference"
    monkeypatch.setattr(fa, "_on_cuda", lambda t: True)
    monkeypatch.setattr(fa, "_sdpa", fake_sdpa)
    monkeypatch.setattr(fa, "attention_forward", lambda *a, **kw: launches.append(1) or forward(*a, **kw))
    assert fa.primal_impl(q, k, v) == "sdpa"
    check(K.attention(q, k, v), attention_reference(q, k, v), torch.float32, "O via SDPA")
    assert calls == ["sdpa"]
    _, to = K.attention_jvp(q, k, v, None, None, None)  # no tangent: the primal fast path
    assert to is None and calls == ["sdpa"] * 2
    # fp32 with a tangent → the reference, never SDPA and never the kernel
    _, to_func = torch.func.jvp(attention_reference, (q, k, v), tangents)
    _, to = K.attention_jvp(q, k, v, *tangents)
    check(to, to_func, torch.float32, "fused tangent")
    _, to = torch.func.jvp(K.attention, (q, k, v), tangents)
    check(to, to_func, torch.float32, "torch.func.jvp tangent")
    _, to_q = torch.func.jvp(attention_reference, (q, k, v), (tangents[0], *map(torch.zeros_like, (k, v))))
    with fwAD.dual_level():
        dual = K.attention(fwAD.make_dual(q, tangents[0]), k, v)
        check(fwAD.unpack_dual(dual).tangent, to_q, torch.float32, "forward_ad tangent")
        assert fa.primal_impl(q, k, v) == "sdpa"  # a dual level without duals on q, k, v needs no tangent
    assert calls == ["sdpa"] * 2 and launches == []
    # ... unless forced: backend="triton", or FREEFLOW_ATTENTION_JVP=triton
    _, to = K.attention_jvp(q, k, v, *tangents, backend=T)
    check(to, to_func, torch.float32, "forced fused tangent")
    assert len(launches) == 1
    with fa.use_settings(tangent="triton"):
        _, to = torch.func.jvp(K.attention, (q, k, v), tangents)
    check(to, to_func, torch.float32, "forced torch.func.jvp tangent")
    assert len(launches) == 3  # AttentionFunction: the primal forward, then its jvp rule
    # fp16 with a tangent → the kernel
    half = [t.half() for t in (q, k, v, *tangents)]
    _, to = K.attention_jvp(*half)
    check(to, attention_jvp_reference(*half)[1], torch.float16, "fp16 fused tangent")
    assert len(launches) == 4 and calls == ["sdpa"] * 2


def test_attention_settings_are_cached_validated_and_overridable(monkeypatch):
    """FREEFLOW_ATTENTION / _BWD / _JVP are read once (not per call): a change shows after ``refresh_settings``; a bad
    value names its variable; ``use_settings`` overrides for a block and restores."""
    monkeypatch.delenv("FREEFLOW_ATTENTION", raising=False)
    monkeypatch.delenv("FREEFLOW_ATTENTION_BWD", raising=False)
    monkeypatch.delenv("FREEFLOW_ATTENTION_JVP", raising=False)
    assert fa.refresh_settings() == {"primal": "sdpa", "backward": None, "tangent": "auto"}
    monkeypatch.setenv("FREEFLOW_ATTENTION_BWD", "triton")
    assert fa.settings()["backward"] is None  # cached
    assert fa.refresh_settings()["backward"] == "triton"
    monkeypatch.setenv("FREEFLOW_ATTENTION", " Flash_Attn ")
    monkeypatch.setenv("FREEFLOW_ATTENTION_JVP", "triton")
    assert fa.refresh_settings() == {"primal": "flash_attn", "backward": "triton", "tangent": "triton"}
    with fa.use_settings(backward="sdpa", tangent="auto"):
        assert fa.settings() == {"primal": "flash_attn", "backward": "sdpa", "tangent": "auto"}
    assert fa.settings() == {"primal": "flash_attn", "backward": "triton", "tangent": "triton"}
    for name, value in (("FREEFLOW_ATTENTION", "bogus"), ("FREEFLOW_ATTENTION_BWD", "math"),
                        ("FREEFLOW_ATTENTION_JVP", "reference")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            fa.refresh_settings()
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="FREEFLOW_ATTENTION_BWD must be one of"):
        with fa.use_settings(backward="cudnn"):
            pass
    (q, k, v), _ = qkv(1, 2, 5, 64, torch.float32)
    half = [t.half() for t in (q, k, v)]
    monkeypatch.setattr(fa, "_on_cuda", lambda t: True)
    assert fa.refresh_settings()["primal"] == "sdpa" and fa.primal_impl(*half) == "sdpa"
    with fa.use_settings(primal="flash_attn"):
        monkeypatch.setattr(fa, "_flash_attn_func", lambda: None)  # chosen but not installed → SDPA
        assert fa.primal_impl(*half) == "sdpa"
        monkeypatch.setattr(fa, "_flash_attn_func", lambda: object())
        assert fa.primal_impl(*half) == "flash_attn"
        assert fa.primal_impl(q, k, v) == "sdpa"  # flash-attn takes fp16/bf16 only
    with fa.use_settings(primal="triton"):
        assert fa.primal_impl(q, k, v) == "triton"


def test_tangent_dispatch_rule():
    """The rule never picks a kernel measured slower than the eager reference: fp32 → reference on CUDA, fp16/bf16 →
    the kernel; off CUDA (the interpreter) and when forced, the kernel."""
    for (dtype, d), (kernel_ms, eager_ms) in fa.TANGENT_TIMINGS_H100.items():
        assert fa.tangent_impl(dtype, d, "cuda") == ("triton" if kernel_ms < eager_ms else "reference")
    assert fa.tangent_impl(torch.float32, 72, "cuda") == "reference"   # 15.7 ms against 0.59 ms
    assert fa.tangent_impl(torch.float32, 64, "cuda") == "reference"   # 0.64 ms against 0.39 ms
    assert fa.tangent_impl(torch.float32, 128, "cuda") == "reference"  # unmeasured: nearest measured head dim, 72
    assert fa.tangent_impl(torch.bfloat16, 72, "cuda") == "triton"     # 0.31 ms against 0.70 ms
    assert fa.tangent_impl(torch.bfloat16, 40, "cuda") == "triton"
    assert fa.tangent_impl(torch.float16, 72, "cuda") == "triton"      # bf16's tensor-core code
    assert fa.tangent_impl(torch.float32, 72, "cpu") == "triton"       # the interpreter: where tests prove it
    assert fa.tangent_impl(torch.float32, 72, "cuda", backend="triton") == "triton"
    with fa.use_settings(tangent="triton"):
        assert fa.tangent_impl(torch.float32, 72, "cuda") == "triton"


SDPA_BWD_CASES = [(2, 1, 49, 64), (2, 1, 49, 72), (1, 2, 257, 64), (1, 2, 257, 72)]


@pytest.mark.parametrize("shape", SDPA_BWD_CASES)
def test_sdpa_recompute_backward(device, shape):
    """FREEFLOW_ATTENTION_BWD=sdpa (the default on CUDA): the Functions save q, k, v only and the backward recomputes
    O with SDPA under autograd — through ``attention`` (AttentionFunction), ``attention_jvp`` (AttentionJVPFunction)
    and ``torch.func.jvp`` + backward, against autograd through the reference."""
    (q, k, v), tangents = qkv(*shape, torch.float32, seed=21, device=device)
    g = torch.randn(*shape[:3], shape[3], generator=torch.Generator().manual_seed(22)).to(device)
    ref = leaves((q, k, v))
    o_ref, to_ref = attention_jvp_reference(*ref, *tangents)
    want = torch.autograd.grad(o_ref, ref, g)
    with fa.use_settings(backward="sdpa", primal="triton"):  # primal="triton": AttentionFunction on CUDA too
        mine = leaves((q, k, v))
        o, to = K.attention_jvp(*mine, *tangents, backend=T)
        assert o.grad_fn.name() == "AttentionJVPFunctionBackward" and len(o.grad_fn.saved_tensors) == 3
        o_primal = K.attention(*mine, backend=T)
        assert o_primal.grad_fn.name() == "AttentionFunctionBackward" and len(o_primal.grad_fn.saved_tensors) == 3
        o_func, to_func = torch.func.jvp(lambda *x: K.attention(*x, backend=T), tuple(mine), tangents)
    check(o, o_ref, torch.float32, "O")
    check(to, to_ref, torch.float32, "tangent")
    check(to_func, to_ref, torch.float32, "torch.func.jvp tangent")
    for what, out in (("attention_jvp", o), ("attention", o_primal), ("torch.func.jvp", o_func)):
        for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(out, mine, g), want):
            check(a, b, torch.float32, f"{what} {name}")
    # the Triton backward (the interpreter's default) keeps O and LSE for its kernels
    o_triton, _ = K.attention_jvp(*mine, *tangents, backend=T)
    assert len(o_triton.grad_fn.saved_tensors) == (3 if device.type == "cuda" else 5)


def test_sdpa_recompute_backward_only_the_gradients_asked_for(device):
    (q, k, v), tangents = qkv(2, 1, 49, 72, torch.float32, seed=23, device=device)
    kk = k.detach().clone().requires_grad_()
    with fa.use_settings(backward="sdpa"):
        o, _ = K.attention_jvp(q, kk, v, *tangents, backend=T)
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(24)).to(device)
    (dk,) = torch.autograd.grad(o, kk, g)
    ref = kk.detach().clone().requires_grad_()
    check(dk, torch.autograd.grad(attention_reference(q, ref, v), ref, g)[0], torch.float32, "dk alone")


def _flash_attn_stand_in(signature="2.6", lse_units=1.0):
    """A module standing in for ``flash_attn.flash_attn_interface``: ``_flash_attn_backward`` with flash-attn 2.x's
    keyword names and contract — (B, S, H, D) tensors, the log-sum-exp (B, H, S) in natural-log units, gradients
    written into dq, dk, dv — computed from P = exp(scale·QKᵀ - lse) in fp32. ``lse_units`` ≠ 1 misreads the LSE."""
    calls = []

    def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, **rest):
        calls.append(rest)
        q, k, v, out, dout = (t.transpose(1, 2).float() for t in (q, k, v, out, dout))
        p = torch.exp(softmax_scale * q @ k.transpose(-1, -2) - softmax_lse[..., None] * lse_units)
        dv.copy_((p.transpose(-1, -2) @ dout).transpose(1, 2))
        dp = dout @ v.transpose(-1, -2)
        ds = p * (dp - (dout * out).sum(-1, keepdim=True))
        dq.copy_((softmax_scale * ds @ k).transpose(1, 2))
        dk.copy_((softmax_scale * ds.transpose(-1, -2) @ q).transpose(1, 2))
        return torch.empty(0)

    if signature == "2.6":
        def op(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size_left,
               window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
            assert (dropout_p, causal, window_size_left, window_size_right, softcap) == (0.0, False, -1, -1, 0.0)
            return backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, deterministic=deterministic)
    elif signature == "2.5":
        def op(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
               alibi_slopes, deterministic, rng_state=None):
            assert (dropout_p, causal, tuple(window_size)) == (0.0, False, (-1, -1))
            return backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, window_size=window_size)
    else:  # a future signature with a required argument this module does not know
        def op(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, sink):
            return backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale)
    module = types.ModuleType("flash_attn.flash_attn_interface")
    module._flash_attn_backward = op
    return module, calls


def _install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", module)
    monkeypatch.setattr(fa, "_on_cuda", lambda t: True)  # flash-attn runs on CUDA only
    fa.refresh_settings()


def _half_jvp_and_grads(device, seed, n=1):
    """fp16 (O, Ȯ) through the fused Function, then a backward, n times: those gradients, the reference's, and how
    many tensors each forward saved."""
    (q, k, v), tangents = qkv(2, 2, 49, 72, torch.float16, seed=seed, device=device)
    g = torch.randn(2, 2, 49, 72, generator=torch.Generator().manual_seed(seed + 1)).to(device, torch.float16)
    ref = leaves((q, k, v))
    want = torch.autograd.grad(attention_reference(*ref), ref, g)
    got, saved = [], []
    for _ in range(n):
        mine = leaves((q, k, v))
        o, _ = K.attention_jvp(*mine, *tangents, backend=T)
        saved.append(len(o.grad_fn.saved_tensors))
        got.append(torch.autograd.grad(o, mine, g))
    return got, want, saved


@pytest.mark.parametrize("signature", ["2.6", "2.5"])
def test_flash_attn_backward_gets_our_lse_in_its_layout(device, monkeypatch, signature):
    """FREEFLOW_ATTENTION_BWD=flash_attn: our LSE (log2 units) reaches flash-attn's backward as natural log in its
    (B, H, S) layout with q, k, v, O, dO as (B, S, H, D); checked against a stand-in for flash-attn's kernel (flash-attn
    is not installed here) across its 2.5 and 2.6 signatures. The first call is also checked against SDPA's backward."""
    module, calls = _flash_attn_stand_in(signature)
    _install(monkeypatch, module)
    with fa.use_settings(backward="flash_attn"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a correct flash-attn backward runs without a fallback warning
        got, want, saved = _half_jvp_and_grads(device, seed=31, n=2)
    assert saved == [5, 5] and len(calls) == 2  # O and LSE kept for it
    for grads in got:
        for name, a, b in zip(("dq", "dk", "dv"), grads, want):
            check(a, b, torch.float16, f"flash-attn {signature} {name}")


def test_flash_attn_backward_with_an_unknown_signature_falls_back_to_sdpa(device, monkeypatch):
    module, calls = _flash_attn_stand_in("future")
    _install(monkeypatch, module)
    with fa.use_settings(backward="flash_attn"), pytest.warns(RuntimeWarning, match="not a 2.x signature"):
        got, want, saved = _half_jvp_and_grads(device, seed=33)
    assert calls == [] and saved == [3]  # SDPA decided at the forward: q, k, v only
    for name, a, b in zip(("dq", "dk", "dv"), got[0], want):
        check(a, b, torch.float16, f"SDPA fallback {name}")


def test_flash_attn_backward_that_disagrees_with_sdpa_is_dropped(device, monkeypatch):
    """A flash-attn whose backward reads the LSE in other units (here: log2, as if unconverted) gives wrong gradients:
    the first call's check against SDPA catches it, warns once, and SDPA's gradients are returned then and after."""
    module, calls = _flash_attn_stand_in("2.6", lse_units=1 / math.log(2.0))
    _install(monkeypatch, module)
    with fa.use_settings(backward="flash_attn"), pytest.warns(RuntimeWarning, match="differ from SDPA's"):
        got, want, saved = _half_jvp_and_grads(device, seed=35, n=3)
    assert len(calls) == 1 and saved == [5, 3, 3]  # after the check it is neither called nor saved for
    for grads in got:
        for name, a, b in zip(("dq", "dk", "dv"), grads, want):
            check(a, b, torch.float16, f"after the check {name}")


@pytest.mark.parametrize("flash_attn", ["installed", "missing"])
def test_flash_attn_backward_under_torch_compile(device, monkeypatch, flash_attn):
    """FREEFLOW_ATTENTION_BWD=flash_attn in a compiled ``attention_jvp`` (fullgraph, the captured graphs run as
    captured). Dynamo asks whether flash-attn is usable without tracing the question (an import and a signature:
    a missing module is a graph break). Installed (the stand-in), the backward graph calls
    ``freeflow::attention_flash_attn_backward``, which feeds flash-attn our O and LSE and returns the reference's
    gradients, its first call checked against SDPA's; missing, the warning comes at tracing and SDPA's backward is
    traced instead."""
    if flash_attn == "installed":
        module, calls = _flash_attn_stand_in("2.6")
        _install(monkeypatch, module)
        expect = warnings.catch_warnings()  # no fallback to SDPA: flash-attn's backward is used
    else:
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # importing it raises ImportError
        monkeypatch.setattr(fa, "_on_cuda", lambda t: True)
        fa.refresh_settings()
        calls, expect = [], pytest.warns(RuntimeWarning, match="cannot be imported")
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    (q, k, v), tangents = qkv(2, 2, 49, 72, torch.float16, seed=37, device=device)
    g = torch.randn(2, 2, 49, 72, generator=torch.Generator().manual_seed(38)).to(device, torch.float16)
    ref = leaves((q, k, v))
    want = torch.autograd.grad(attention_reference(*ref), ref, g)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: K.attention_jvp(*a, backend=T), fullgraph=True,
                             backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    mine = leaves((q, k, v))
    with fa.use_settings(backward="flash_attn"), expect:
        if flash_attn == "installed":
            warnings.simplefilter("error", RuntimeWarning)
        o, _ = compiled(*mine, *tangents)
        got = torch.autograd.grad(o, mine, g)
    ops = [str(node.target) for gm in graphs for node in gm.graph.nodes if "freeflow" in str(node.target)]
    sdpa = any("scaled_dot_product" in str(node.target) for gm in graphs for node in gm.graph.nodes)
    if flash_attn == "installed":
        assert ops == ["freeflow.attention_jvp.default", "freeflow.attention_flash_attn_backward.default"], ops
        assert not sdpa and len(calls) == 1 and fa._FLASH_BWD == dict(checked=True, off=None)
    else:
        assert ops == ["freeflow.attention_jvp.default"] and sdpa, ops
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        check(a, b, torch.float16, f"compiled, flash-attn {flash_attn}: {name}")


def _fwd_meta(d, tq=True, tk=True, tv=True):
    """The forward kernel's launch flags for bf16 q, k, v of head dim d (what the pruning sees)."""
    width, tail = max(16, 1 << (d - 1).bit_length()), head_chunks(d)[1]
    return dict(HAS_TQ=tq, HAS_TK=tk, HAS_TV=tv, UPCAST=False, HEAD_D=width, HEAD_D2=tail, HEAD_DV=width,
                HEAD_DV2=tail)


def test_forward_configs_and_their_pruning_follow_the_compile_report():
    """The forward's autotune list and pruning against what the compile report measured (Triton 3.9, bf16, S = 256,
    every config compiled for sm_80 and sm_90; docs/kernels.md, "Forward configs")."""
    from freeflow.kernels._dispatch import gpu_launch_settings
    from freeflow.kernels._launch import smem_budget_override

    with gpu_launch_settings():  # the GPU list (the interpreter gets its first config only)
        configs = fa._configs(fa._FWD_TILES, split_qk_always=True)
    assert len(configs) == len(fa._FWD_TILES) > 1 and len(fa._FWD_CONFIGS) >= 1
    assert fa._FWD_CONFIGS[0].kwargs == configs[0].kwargs  # the interpreter runs the GPU list's first config

    def key(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["SPLIT_QK"],
                c.kwargs["SPLIT_V"])

    assert len({key(c) for c in configs}) == len(configs)  # each config once: a timing script can name each
    assert {key(c) for c in configs} >= {(64, 16, 4, 3, True, True), (64, 16, 4, 3, False, True),
                                         (64, 32, 4, 3, True, True), (64, 32, 4, 3, False, False)}
    prune = fa._pruner(fa._fwd_footprint, "fwd")

    def kept(d, **flags):
        with smem_budget_override(163 * 1024):  # A100's shared memory, the smaller of the two
            return {key(c) for c in prune(configs, _fwd_meta(d, **flags))}

    # head dim 64 with every tangent: all configs up to 128×64 with 8 warps compiled clean on both archs, and stay
    k64 = kept(64)
    assert {(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3)} <= {k[:4] for k in k64}
    assert all(k[1] < 128 for k in k64)  # BLOCK_N = 128 spilled 56–632 B with a tangent
    assert len(k64) == len({k[:4] for k in k64})  # split flags change nothing at 64: one config per tile set
    # head dim 72: the configs that spilled kilobytes on sm_80 are pruned — 128×64 (6.5 KB), 64×64 with 4 warps
    # (1.1 KB), q/k/v padded 64×32 (832 B) — and both layouts of 64×16 with 4 warps stay for the GPU to time
    k72 = kept(72)
    assert not k72 & {(128, 64, 8, 3, True, True), (64, 64, 4, 3, True, True), (64, 32, 4, 3, False, False)}
    assert {(64, 16, 4, 3, True, True), (64, 16, 4, 3, False, True), (128, 32, 8, 3, True, True)} <= k72
    assert all(k[1] < 128 for k in k72)
    # the primal keeps more, all but the BLOCK_N = 128 configs that spilled at 72
    primal = kept(72, tq=False, tk=False, tv=False)
    assert primal > k72 and {k for k in primal if k[1] == 128} == set()
    assert {k for k in kept(64, tq=False, tk=False, tv=False) if k[1] == 128}  # clean at 64: kept
