"""The ``freeflow::`` torch.library ops (kernels/_library.py): ``opcheck`` of every op,
``torch.compile(fullgraph=True)`` of each public op (forward + backward) against the references, tracing without
Dynamo (``make_fx``), and the dispatch rule (the custom op only under tracing; eager calls and forward-mode AD take
the autograd.Function). Interpreted on CPU, compiled on CUDA (the ``device`` fixture); odd sizes exercise the masks."""
import contextlib
import math
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from checks import make_check
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.proxy_tensor import make_fx

import freeflow.kernels as K
import freeflow.kernels.flash_attention as fa
from freeflow.kernels import _library
from freeflow.kernels.adaln import (
    adaln_modulate_jvp_reference,
    adaln_modulate_reference,
    gated_residual_jvp_reference,
    gated_residual_modulate_jvp_reference,
    gated_residual_modulate_reference,
    gated_residual_reference,
)
from freeflow.kernels.flash_attention import attention_jvp_reference, attention_reference
from freeflow.kernels.gelu import bias_gelu_jvp_reference, bias_gelu_reference

T = "triton"
TOL = {torch.float32: 1e-5}
check = make_check(TOL)
N, S, C, D = 2, 49, 72, 288  # D: the MLP width bias-GELU sees
HEADS = 2  # attention: (N, HEADS, S, C), head dim C = 72 as DiT-XL's
EPS = 1e-6
OPS = torch.ops.freeflow


def tensors(device, seed=0):
    """Primals (non-contiguous where a DiT's are: token-major x, h a column slice, chunks of one adaLN
    projection) and tangents, by name."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g)).to(device)

    gate, shift, scale = rnd(N, 3 * C, std=0.5).chunk(3, dim=1)
    t = dict(x=rnd(S, N, C).transpose(0, 1), h=rnd(N, S, 2 * C)[..., C:], gate=gate, shift=shift, scale=scale,
             fc=rnd(N, S, D + 8, std=3.0)[..., 8:], bias=rnd(D),
             tx=rnd(N, S, C), th=rnd(N, S, C), tgate=rnd(N, C), tshift=rnd(N, C), tscale=rnd(N, C), tfc=rnd(N, S, D))
    # q, k, v as a DiT makes them: strided views of one (N, S, 3, HEADS, C) projection
    q, k, v = rnd(N, S, 3, HEADS, C).permute(2, 0, 3, 1, 4).unbind(0)
    return dict(t, q=q, k=k, v=v, tq=rnd(N, HEADS, S, C), tk=rnd(N, HEADS, S, C), tv=rnd(N, HEADS, S, C))


def grad_leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def attention_saved(q, k, v, scale):
    """(O, LSE) as the attention forward saves them for its backward (LSE in log2 units, fp32), computed here with
    plain torch ops: the backward ops' opcheck needs consistent inputs, not the kernel's."""
    s = scale * q.float() @ k.float().transpose(-1, -2)
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype), torch.logsumexp(s, dim=-1) / math.log(2.0)


# ---- opcheck: every op, with the argument patterns the public ops use (None tangents, no bias, ...)


def opcheck_cases(device):
    """{case: (op, args)}; primals of the forward ops require grad, so the autograd registration is checked too."""
    t = tensors(device)
    x, gate, h, shift, scale = grad_leaves(t["x"], t["gate"], t["h"], t["shift"], t["scale"])
    fc, bias = grad_leaves(t["fc"], t["bias"])
    tx, th, tgate, tshift, tscale, tfc = (t[k] for k in ("tx", "th", "tgate", "tshift", "tscale", "tfc"))
    bf16 = {k: v.to(torch.bfloat16) for k, v in t.items()}
    with torch.no_grad():
        _, mean, rstd = OPS.adaln_modulate(t["x"], t["shift"], t["scale"], EPS)
        x_bf16, _, mean_bf16, rstd_bf16 = OPS.gated_residual_modulate(
            *(bf16[k] for k in ("x", "gate", "h", "shift", "scale")), EPS)
        x_new, _, mean_new, rstd_new = OPS.gated_residual_modulate(t["x"], t["gate"], t["h"], t["shift"], t["scale"],
                                                                   EPS)
    g = tensors(device, seed=1)  # upstream gradients
    seam_saved = (x_new, mean_new, rstd_new, t["scale"], t["gate"], t["h"])
    q, k, v = grad_leaves(t["q"], t["k"], t["v"])
    q16, k16, v16 = grad_leaves(bf16["q"], bf16["k"], bf16["v"])
    tq, tk, tv = t["tq"], t["tk"], t["tv"]
    sm = C ** -0.5
    qkv_saved = (t["q"], t["k"], t["v"], *attention_saved(t["q"], t["k"], t["v"], sm))
    qkv_saved_bf16 = (bf16["q"], bf16["k"], bf16["v"], *attention_saved(bf16["q"], bf16["k"], bf16["v"], sm))
    return {
        "adaln_modulate": (OPS.adaln_modulate, (x, shift, scale, EPS)),
        "adaln_modulate_jvp": (OPS.adaln_modulate_jvp, (x, shift, scale, tx, tshift, tscale, EPS)),
        "adaln_modulate_jvp-tscale": (OPS.adaln_modulate_jvp, (x, shift, scale, None, None, tscale, EPS)),
        # bf16 tokens, fp32 modulation (the Triton path allows it): y in x's dtype, d_shift/d_scale in scale's
        "adaln_modulate-bf16": (OPS.adaln_modulate, (*grad_leaves(bf16["x"]), shift, scale, EPS)),
        "adaln_modulate_backward": (OPS.adaln_modulate_backward, (g["x"], t["x"], mean, rstd, t["scale"])),
        "adaln_modulate_backward-bf16": (OPS.adaln_modulate_backward,
                                         (g["x"].to(torch.bfloat16), bf16["x"], mean, rstd, t["scale"])),
        "gated_residual": (OPS.gated_residual, (x, gate, h)),
        "gated_residual_jvp": (OPS.gated_residual_jvp, (x, gate, h, tx, tgate, th)),
        "gated_residual_jvp-th": (OPS.gated_residual_jvp, (x, gate, h, None, None, th)),
        "gated_residual_backward": (OPS.gated_residual_backward, (g["x"], t["gate"], t["h"])),
        "gated_residual_modulate": (OPS.gated_residual_modulate, (x, gate, h, shift, scale, EPS)),
        "gated_residual_modulate_jvp": (OPS.gated_residual_modulate_jvp,
                                        (x, gate, h, shift, scale, tx, tgate, th, tshift, tscale, EPS)),
        # ẋ' is zero by structure: the op returns its 0-element placeholder
        "gated_residual_modulate_jvp-tshift": (OPS.gated_residual_modulate_jvp,
                                               (x, gate, h, shift, scale, None, None, None, tshift, None, EPS)),
        "gated_residual_modulate_backward": (OPS.gated_residual_modulate_backward,
                                             (g["x"], g["h"], *seam_saved)),
        "gated_residual_modulate_backward-dy": (OPS.gated_residual_modulate_backward,
                                                (g["x"], None, *seam_saved)),
        "gated_residual_modulate_backward-bf16": (OPS.gated_residual_modulate_backward, (
            g["x"].to(torch.bfloat16), g["h"].to(torch.bfloat16), x_bf16, mean_bf16, rstd_bf16,
            *(bf16[k] for k in ("scale", "gate", "h")))),
        "bias_gelu": (OPS.bias_gelu, (fc, bias)),
        "bias_gelu-nobias": (OPS.bias_gelu, (fc, None)),
        "bias_gelu_jvp": (OPS.bias_gelu_jvp, (fc, bias, tfc)),
        "bias_gelu_backward": (OPS.bias_gelu_backward, (g["tfc"], t["fc"], t["bias"])),
        "bias_gelu_backward-nobias": (OPS.bias_gelu_backward, (g["tfc"], t["fc"], None)),
        "bias_gelu_backward-bf16": (OPS.bias_gelu_backward, (g["tfc"].to(torch.bfloat16), bf16["fc"], bf16["bias"])),
        # the last argument: the backward the forward commits to (Triton kernels from O and LSE, or SDPA recompute)
        "attention": (OPS.attention, (q, k, v, None, "triton")),
        "attention-sdpa": (OPS.attention, (q, k, v, 0.2, "sdpa")),
        "attention-bf16": (OPS.attention, (q16, k16, v16, None, "triton")),
        "attention_jvp": (OPS.attention_jvp, (q, k, v, tq, tk, tv, None, "triton")),
        "attention_jvp-tv-sdpa": (OPS.attention_jvp, (q, k, v, None, None, tv, None, "sdpa")),
        "attention_jvp-tq-bf16": (OPS.attention_jvp, (q16, k16, v16, bf16["tq"], None, None, None, "triton")),
        # no tangent at all: Ȯ is the 0-element placeholder
        "attention_jvp-none": (OPS.attention_jvp, (q, k, v, None, None, None, None, "triton")),
        "attention_backward": (OPS.attention_backward, (g["q"], *qkv_saved, sm)),
        "attention_backward-bf16": (OPS.attention_backward, (g["q"].to(torch.bfloat16), *qkv_saved_bf16, sm)),
        # without flash-attn (or off CUDA) its guard falls back to SDPA's backward inside the op
        "attention_flash_attn_backward-bf16": (OPS.attention_flash_attn_backward,
                                               (g["q"].to(torch.bfloat16), *qkv_saved_bf16, sm)),
    }


# Spelled out, not collected from opcheck_cases: building those runs kernels, which collection must not do.
OPCHECK_CASES = [
    "adaln_modulate", "adaln_modulate_jvp", "adaln_modulate_jvp-tscale", "adaln_modulate-bf16",
    "adaln_modulate_backward", "adaln_modulate_backward-bf16",
    "gated_residual", "gated_residual_jvp", "gated_residual_jvp-th", "gated_residual_backward",
    "gated_residual_modulate", "gated_residual_modulate_jvp", "gated_residual_modulate_jvp-tshift",
    "gated_residual_modulate_backward", "gated_residual_modulate_backward-dy", "gated_residual_modulate_backward-bf16",
    "bias_gelu", "bias_gelu-nobias", "bias_gelu_jvp", "bias_gelu_backward", "bias_gelu_backward-nobias",
    "bias_gelu_backward-bf16",
    "attention", "attention-sdpa", "attention-bf16", "attention_jvp", "attention_jvp-tv-sdpa", "attention_jvp-tq-bf16",
    "attention_jvp-none", "attention_backward", "attention_backward-bf16", "attention_flash_attn_backward-bf16",
]


def test_every_op_has_an_opcheck_case(device):
    assert set(_library.OPS) == {name.split("-")[0] for name in OPCHECK_CASES}
    assert list(opcheck_cases(device)) == OPCHECK_CASES


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # opcheck's own use
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(device, case):
    op, args = opcheck_cases(device)[case]
    try:
        with warnings.catch_warnings():
            # flash-attn's guard announces its fallback to SDPA once per process; the fallback is what runs here
            # unless flash-attn is installed and takes the inputs
            warnings.filterwarnings("ignore", "FREEFLOW_ATTENTION_BWD=flash_attn", RuntimeWarning)
            torch.library.opcheck(op, args)
    finally:
        fa.refresh_settings()  # forget the fallback: later tests start from the process's settings


# ---- torch.compile(fullgraph=True) of the public ops, forward + backward, against the references


def compile_recording(fn):
    """``torch.compile(fn, fullgraph=True)`` with ``aot_eager``'s compilers (the captured graphs run as they are,
    no code generation), keeping the forward and backward graphs AOTAutograd hands them."""
    graphs = []
    torch._dynamo.reset()  # every case compiles the same lambda's code: without a reset they count as recompiles

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep)), graphs


def called_ops(graphs):
    return {node.target._schema.name.split("::")[1] for gm in graphs for node in gm.graph.nodes
            if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == _library.NAMESPACE}


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


# public op, reference, primal names, tangent names (None: a zero tangent)
COMPILE_CASES = {
    "adaln_modulate": (K.adaln_modulate, adaln_modulate_reference, ("x", "shift", "scale"), ()),
    "adaln_modulate_jvp": (K.adaln_modulate_jvp, adaln_modulate_jvp_reference, ("x", "shift", "scale"),
                           ("tx", "tshift", "tscale")),
    "gated_residual": (K.gated_residual, gated_residual_reference, ("x", "gate", "h"), ()),
    "gated_residual_jvp": (K.gated_residual_jvp, gated_residual_jvp_reference, ("x", "gate", "h"),
                           ("tx", "tgate", "th")),
    "gated_residual_modulate": (K.gated_residual_modulate, gated_residual_modulate_reference,
                                ("x", "gate", "h", "shift", "scale"), ()),
    "gated_residual_modulate_jvp": (K.gated_residual_modulate_jvp, gated_residual_modulate_jvp_reference,
                                    ("x", "gate", "h", "shift", "scale"), ("tx", "tgate", "th", "tshift", "tscale")),
    "gated_residual_modulate_jvp-tscale": (K.gated_residual_modulate_jvp, gated_residual_modulate_jvp_reference,
                                           ("x", "gate", "h", "shift", "scale"), (None, None, None, None, "tscale")),
    "bias_gelu": (K.bias_gelu, bias_gelu_reference, ("fc", "bias"), ()),
    "bias_gelu_jvp": (K.bias_gelu_jvp, bias_gelu_jvp_reference, ("fc", "bias"), ("tfc",)),
    # FREEFLOW_ATTENTION_BWD forced (``*_bwd``): the Triton backward kernels, or SDPA's backward after a recompute
    "attention-triton_bwd": (K.attention, attention_reference, ("q", "k", "v"), ()),
    "attention-sdpa_bwd": (K.attention, attention_reference, ("q", "k", "v"), ()),
    "attention_jvp-triton_bwd": (K.attention_jvp, attention_jvp_reference, ("q", "k", "v"), ("tq", "tk", "tv")),
    "attention_jvp-sdpa_bwd": (K.attention_jvp, attention_jvp_reference, ("q", "k", "v"), ("tq", "tk", "tv")),
    "attention_jvp-tk-triton_bwd": (K.attention_jvp, attention_jvp_reference, ("q", "k", "v"), (None, "tk", None)),
}


def case_settings(case):
    """An attention case runs with its backward forced, and with the primal on the kernel: on CUDA ``attention``
    would take SDPA's fast path (plain aten ops, no op of ours to find in the graph)."""
    if not case.startswith("attention"):
        return contextlib.nullcontext()
    backward = next(part.removesuffix("_bwd") for part in case.split("-") if part.endswith("_bwd"))
    return fa.use_settings(primal="triton", backward=backward)


def backward_ops(case):
    """The ``freeflow::`` ops a case's backward graph calls. The SDPA recompute has none: it is traced as plain ops."""
    name = case.split("-")[0]
    if name.startswith("attention"):
        return set() if "sdpa_bwd" in case else {"attention_backward"}
    family = "adaln_modulate" if name.startswith("adaln") else "bias_gelu" if name.startswith("bias") else (
        "gated_residual_modulate" if "modulate" in name else "gated_residual")
    return {f"{family}_backward"}


def calls_sdpa(graphs):
    return any("scaled_dot_product" in str(node.target) for gm in graphs for node in gm.graph.nodes)


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_fullgraph_compile_forward_backward(device, case):
    op, reference, primal_names, tangent_names = COMPILE_CASES[case]
    t = tensors(device, seed=2)
    tangents = [None if k is None else t[k] for k in tangent_names]
    mine, ref = grad_leaves(*(t[k] for k in primal_names)), grad_leaves(*(t[k] for k in primal_names))
    compiled, graphs = compile_recording(lambda *a: op(*a, backend=T))
    with case_settings(case):  # the backward is chosen when the forward is traced
        out = _outputs(compiled(*mine, *tangents))
    out_ref = _outputs(reference(*ref, *tangents))
    assert len(out) == len(out_ref)
    for i, (a, b) in enumerate(zip(out, out_ref)):
        if b is None:
            assert a is None, f"output {i} is zero by structure"
        else:
            check(a, b, torch.float32, f"output {i}")
    # primal outputs carry autograd, tangents (the second half of a jvp op's outputs) are detached
    primal = out[:len(out) // 2] if tangent_names else out
    assert all(o.requires_grad for o in primal) and not any(o.requires_grad for o in out[len(primal):] if o is not None)
    g = torch.Generator().manual_seed(3)
    ups = [torch.randn(o.shape, generator=g).to(device) for o in primal]
    grads = torch.autograd.grad(primal, mine, ups)
    grads_ref = torch.autograd.grad(out_ref[:len(primal)], ref, ups)
    for name, a, b in zip(primal_names, grads, grads_ref):
        check(a, b, torch.float32, f"d{name}")
    # the kernels ran inside the graphs: the op forward, its backward op in the backward graph
    assert called_ops(graphs) == {case.split("-")[0]} | backward_ops(case), called_ops(graphs)
    assert calls_sdpa(graphs) == ("sdpa_bwd" in case)


def test_compiled_attention_follows_the_backward_setting(device):
    """The backward choice is an argument of the traced op, read while Dynamo traces the public op: changing
    FREEFLOW_ATTENTION_BWD (here ``use_settings``) recompiles, and each graph runs its own backward, same gradients."""
    t = tensors(device, seed=6)
    compiled, graphs = compile_recording(lambda q, k, v: K.attention(q, k, v, backend=T))
    grads = {}
    for backward in ("triton", "sdpa"):
        mine = grad_leaves(t["q"], t["k"], t["v"])
        with fa.use_settings(primal="triton", backward=backward):
            o = compiled(*mine)
        grads[backward] = torch.autograd.grad(o, mine, t["tq"])
    fw_triton, bw_triton, fw_sdpa, bw_sdpa = graphs
    assert called_ops([bw_triton]) == {"attention_backward"} and not calls_sdpa([bw_triton])
    assert called_ops([bw_sdpa]) == set() and calls_sdpa([bw_sdpa])
    for name, a, b in zip(("dq", "dk", "dv"), grads["sdpa"], grads["triton"]):
        check(a, b, torch.float32, name)


# ---- tracing without Dynamo, and the dispatch rule


def test_attention_ops_reject_an_unknown_backward(device):
    t = tensors(device, seed=7)
    with pytest.raises(ValueError, match="backward must be one of"):
        OPS.attention(t["q"], t["k"], t["v"], None, "cudnn")
    with pytest.raises(ValueError, match="backward must be one of"):
        OPS.attention_jvp(t["q"], t["k"], t["v"], t["tq"], None, None, None, "math")


def test_make_fx_traces_the_library_op(device):
    t = tensors(device, seed=4)
    args = (t["x"], t["gate"], t["h"], t["shift"], t["scale"], t["tx"], None, t["th"], None, t["tscale"])
    def fn(*a):
        return K.gated_residual_modulate_jvp(*a, backend=T)
    gm = make_fx(fn, tracing_mode="symbolic")(*args)
    assert called_ops([gm]) == {"gated_residual_modulate_jvp"}
    for i, (a, b) in enumerate(zip(gm(*args), gated_residual_modulate_jvp_reference(*args))):
        check(a, b, torch.float32, f"output {i}")


def test_eager_calls_take_the_autograd_function(device):
    """Eager calls keep the Function (cheaper per call than the custom op; docs/kernels.md): its node is the
    output's grad_fn, while the custom op's would be a generated ``GeneratedBackwardFor_freeflow_...`` node."""
    t = tensors(device, seed=5)
    x, shift, scale = grad_leaves(t["x"], t["shift"], t["scale"])
    assert not _library.use_library_op()
    assert type(K.adaln_modulate(x, shift, scale, backend=T).grad_fn).__name__ == "AdaLNFunctionBackward"
    assert type(K.bias_gelu_jvp(*grad_leaves(t["fc"], t["bias"]), t["tfc"], backend=T)[0].grad_fn).__name__ == (
        "BiasGELUJVPFunctionBackward")
    q, k, v = grad_leaves(t["q"], t["k"], t["v"])
    assert type(K.attention_jvp(q, k, v, t["tq"], None, None, backend=T)[0].grad_fn).__name__ == (
        "AttentionJVPFunctionBackward")
    with fa.use_settings(primal="triton"):  # on CUDA the primal would take SDPA's fast path
        assert type(K.attention(q, k, v, backend=T).grad_fn).__name__ == "AttentionFunctionBackward"


def test_forward_ad_active(device):
    x, tx = torch.randn(3, device=device), torch.randn(3, device=device)
    assert not _library.forward_ad_active(x, None)
    with fwAD.dual_level():
        assert not _library.forward_ad_active(x)  # inside a dual level, but no dual tensor
        assert _library.forward_ad_active(x, fwAD.make_dual(x, tx), None)
    seen = []
    torch.func.jvp(lambda a: seen.append(_library.forward_ad_active(a)) or a * 2, (x,), (tx,))
    torch.func.vmap(lambda a: seen.append(_library.forward_ad_active(a)) or a * 2)(x[None])
    assert seen == [True, True]  # wrapped by a transform: a tangent may be asked for at some level
    # Dynamo traces it outside forward-mode AD (attention's dispatch asks it while a DiT is compiled)
    compiled, _ = compile_recording(lambda a: a * 2 if _library.forward_ad_active(a) else a + 1)
    assert torch.equal(compiled(x), x + 1)
