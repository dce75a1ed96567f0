"""JVP flash attention: Triton kernels vs the reference, SDPA's math path, torch.func and autograd
(interpreted on CPU, compiled on CUDA: the ``device`` fixture)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from checks import make_check
from torch.nn.attention import SDPBackend, sdpa_kernel

import freeflow.kernels as K
import freeflow.kernels.flash_attention as fa
from freeflow.kernels.flash_attention import attention_jvp_reference, attention_reference, head_chunks

T = "triton"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
check = make_check(TOL)
# (B, H, S, Dh): S = 1, 49, 100, 257 (masked tails across several key blocks), DiT head dims 64 and 72
CASES = [(1, 2, 1, 64), (2, 1, 49, 72), (1, 2, 100, 72), (2, 1, 257, 64)]


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
def test_fused_jvp_and_backward(device, shape, dtype):
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


def test_half_precision_and_cross_attention_with_scale(device):
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
def test_head_dim_72_with_and_without_the_split(device, monkeypatch, split_qk, split_v):
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


def test_split_value_head_dim_with_a_single_chunk_query_head_dim(device):
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
    """On CUDA (faked here), SDPA runs exactly when no tangent can be asked for; the JVP kernel otherwise."""
    import torch.autograd.forward_ad as fwAD

    import freeflow.kernels.flash_attention as fa
    calls = []

    def fake_sdpa(q, k, v, scale):
        calls.append("sdpa")
        return attention_reference(q, k, v, scale)

    (q, k, v), tangents = qkv(1, 2, 49, 72, torch.float32, seed=7, device=device)
    assert fa.primal_impl(q, k, v) == ("sdpa" if device.type == "cuda" else "triton")  # real device decision
    assert fa.primal_impl(q, k, v, backend="reference") == "reference"
    monkeypatch.setattr(fa, "_on_cuda", lambda t: True)
    monkeypatch.setattr(fa, "_sdpa", fake_sdpa)
    assert fa.primal_impl(q, k, v) == "sdpa"
    check(K.attention(q, k, v), attention_reference(q, k, v), torch.float32, "O via SDPA")
    assert calls == ["sdpa"]
    _, to = K.attention_jvp(q, k, v, None, None, None)  # no tangent: the primal fast path
    assert to is None and calls == ["sdpa"] * 2
    # any tangent → the JVP kernel, never SDPA
    _, to = K.attention_jvp(q, k, v, *tangents)
    _, to_func = torch.func.jvp(attention_reference, (q, k, v), tangents)
    check(to, to_func, torch.float32, "fused tangent")
    _, to = torch.func.jvp(K.attention, (q, k, v), tangents)
    check(to, to_func, torch.float32, "torch.func.jvp tangent")
    _, to_q = torch.func.jvp(attention_reference, (q, k, v), (tangents[0], *map(torch.zeros_like, (k, v))))
    with fwAD.dual_level():
        dual = K.attention(fwAD.make_dual(q, tangents[0]), k, v)
        check(fwAD.unpack_dual(dual).tangent, to_q, torch.float32, "forward_ad tangent")
        assert fa.primal_impl(q, k, v) == "sdpa"  # a dual level without duals on q, k, v needs no tangent
    assert calls == ["sdpa"] * 2
    monkeypatch.setenv("FREEFLOW_ATTENTION", "triton")
    assert fa.primal_impl(q, k, v) == "triton"
    monkeypatch.setenv("FREEFLOW_ATTENTION", "flash_attn")
    monkeypatch.setattr(fa, "_flash_attn_func", lambda: None)  # chosen but not installed → SDPA
    assert fa.primal_impl(q.half(), k.half(), v.half()) == "sdpa"
    monkeypatch.setattr(fa, "_flash_attn_func", lambda: object())
    assert fa.primal_impl(q.half(), k.half(), v.half()) == "flash_attn"
    assert fa.primal_impl(q, k, v) == "sdpa"  # flash-attn takes fp16/bf16 only
    monkeypatch.setenv("FREEFLOW_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="FREEFLOW_ATTENTION"):
        fa.primal_impl(q, k, v)
