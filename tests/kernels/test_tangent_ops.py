"""Reference ops: each primal equals an independent formula written here with plain torch ops; each *_jvp equals
torch.func.jvp of its primal; each primal the project composes passes gradcheck (fp64)."""
import math

import pytest
import torch
from checks import default_dtype_fixture

import freeflow.kernels as K

R = "reference"
float64_default = default_dtype_fixture(torch.float64)  # exact comparisons and gradcheck


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _jvp_case(primal, primals, tangents):
    """torch.func.jvp over all primals jointly (None tangents → zeros)."""
    full = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
    return torch.func.jvp(primal, primals, full)


def _assert_close(a, b, rtol=1e-10):
    if isinstance(a, (tuple, list)):
        for x, y in zip(a, b):
            _assert_close(x, y, rtol)
        return
    if a is None:  # a None tangent means exactly zero
        assert not b.any()
        return
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


# (name, primal(*primals), jvp(*primals, *tangents) -> (out, tangent) or flattened, shapes)
def _cases():
    N, S, C = 2, 5, 7
    return {
        "layer_norm": (lambda x: K.layer_norm(x), lambda x, tx: K.layer_norm_jvp(x, tx), [(N, S, C)]),
        "layer_norm_affine": (
            lambda x, w, b: K.layer_norm(x, w, b),
            None,  # weight/bias carry no tangent: tested below
            [(N, S, C), (C,), (C,)],
        ),
        "silu": (K.silu, K.silu_jvp, [(N, C)]),
        "timestep": (lambda t: K.timestep_embedding(t, 9), lambda t, tt: K.timestep_embedding_jvp(t, tt, 9), [(N,)]),
        "linear": (
            lambda x: K.linear(x, _rand(4, C, seed=9), _rand(4, seed=10)),
            lambda x, tx: K.linear_jvp(x, tx, _rand(4, C, seed=9), _rand(4, seed=10)),
            [(N, S, C)],
        ),
        "gelu": (lambda h: K.gelu_tanh(h, backend=R), lambda h, th: K.gelu_tanh_jvp(h, th, backend=R), [(N, S, C)]),
        "bias_gelu": (
            lambda h: K.bias_gelu(h, _rand(C, seed=11), backend=R),
            lambda h, th: K.bias_gelu_jvp(h, _rand(C, seed=11), th, backend=R),
            [(N, S, C)],
        ),
        "modulate": (
            lambda x, b, s: K.adaln_modulate(x, b, s, backend=R),
            lambda x, b, s, tx, tb, ts: K.adaln_modulate_jvp(x, b, s, tx, tb, ts, backend=R),
            [(N, S, C), (N, C), (N, C)],
        ),
        "gated_residual": (
            lambda x, a, h: K.gated_residual(x, a, h, backend=R),
            lambda x, a, h, tx, ta, th: K.gated_residual_jvp(x, a, h, tx, ta, th, backend=R),
            [(N, S, C), (N, C), (N, S, C)],
        ),
        "gated_residual_modulate": (
            lambda x, a, h, b, s: K.gated_residual_modulate(x, a, h, b, s, backend=R),
            lambda x, a, h, b, s, *t: _regroup(K.gated_residual_modulate_jvp(x, a, h, b, s, *t, backend=R)),
            [(N, S, C), (N, C), (N, S, C), (N, C), (N, C)],
        ),
        "attention": (
            lambda q, k, v: K.attention(q, k, v, backend=R),
            lambda q, k, v, tq, tk, tv: K.attention_jvp(q, k, v, tq, tk, tv, backend=R),
            [(2, 3, 6, 4), (2, 3, 6, 4), (2, 3, 6, 4)],
        ),
        "attention_cross": (  # S_q != S_k and Dv != Dh
            lambda q, k, v: K.attention(q, k, v, scale=0.3, backend=R),
            lambda q, k, v, tq, tk, tv: K.attention_jvp(q, k, v, tq, tk, tv, scale=0.3, backend=R),
            [(1, 2, 5, 4), (1, 2, 7, 4), (1, 2, 7, 3)],
        ),
    }


def _timestep_formula(t, dim, max_period=10000.0):
    """GLIDE / DiT: [cos ωt, sin ωt] with ω_k = max_period^(-k/half), zero-padded when dim is odd."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype) / half)
    emb = torch.cat([torch.cos(t[:, None] * omega), torch.sin(t[:, None] * omega)], dim=-1)
    return torch.cat([emb, torch.zeros(len(t), dim - 2 * half, dtype=t.dtype)], dim=-1)


def _ln(x, eps=1e-6):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)


def _sdpa(q, k, v, scale=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def _independent():
    """Each case's primal written from its formula with plain torch ops (none of it goes through freeflow)."""
    C = 7
    return {
        "layer_norm": lambda x: _ln(x),
        "layer_norm_affine": lambda x, w, b: torch.nn.functional.layer_norm(x, (C,), w, b, 1e-6),
        "silu": lambda x: x * torch.sigmoid(x),
        "timestep": lambda t: _timestep_formula(t, 9),
        "linear": lambda x: x @ _rand(4, C, seed=9).t() + _rand(4, seed=10),
        "gelu": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))),
        "bias_gelu": lambda h: torch.nn.functional.gelu(h + _rand(C, seed=11), approximate="tanh"),
        "modulate": lambda x, b, s: _ln(x) * (1 + s[:, None]) + b[:, None],
        "gated_residual": lambda x, a, h: x + a[:, None] * h,
        "gated_residual_modulate": lambda x, a, h, b, s: (x + a[:, None] * h,
                                                          _ln(x + a[:, None] * h) * (1 + s[:, None]) + b[:, None]),
        "attention": _sdpa,
        "attention_cross": lambda q, k, v: _sdpa(q, k, v, scale=0.3),
    }


def _regroup(res):
    x_new, y, tx_new, ty = res
    return (x_new, y), (tx_new, ty)


CASES = _cases()
JVP_CASES = [k for k, v in CASES.items() if v[1] is not None]
INDEPENDENT = _independent()
assert set(INDEPENDENT) == set(CASES)
# K.silu and K.linear are F.silu and F.linear behind an argument check: gradcheck on them would test PyTorch.
GRADCHECK_CASES = [k for k in CASES if k not in ("silu", "linear")]


def _tangent_patterns(n):
    """All tangents together, then each one alone."""
    yield tuple(range(n))
    if n > 1:
        for i in range(n):
            yield (i,)


@pytest.mark.parametrize("name", JVP_CASES)
def test_jvp_matches_torch_func_jvp(name):
    primal, jvp, shapes = CASES[name]
    primals = tuple(_rand(*s, seed=i) for i, s in enumerate(shapes))
    for active in _tangent_patterns(len(shapes)):
        tangents = tuple(_rand(*s, seed=100 + i) if i in active else None for i, s in enumerate(shapes))
        want_out, want_tan = _jvp_case(primal, primals, tangents)
        out, tan = jvp(*primals, *tangents)
        _assert_close(out, want_out)
        _assert_close(tan, want_tan)
        for t in (tan if isinstance(tan, tuple) else (tan,)):
            assert t is None or not t.requires_grad


@pytest.mark.parametrize("name", list(CASES))
def test_primal_matches_independent_formula(name):
    primal, _, shapes = CASES[name]
    primals = tuple(_rand(*s, seed=i) for i, s in enumerate(shapes))
    _assert_close(primal(*primals), INDEPENDENT[name](*primals))


@pytest.mark.parametrize("name", JVP_CASES)
def test_jvp_all_tangents_none_returns_none(name):
    _, jvp, shapes = CASES[name]
    primals = tuple(_rand(*s, seed=i) for i, s in enumerate(shapes))
    out, tan = jvp(*primals, *([None] * len(shapes)))
    _assert_close(out, INDEPENDENT[name](*primals))
    assert tan is None or tan == (None, None)


@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_primal_gradcheck(name):
    primal, _, shapes = CASES[name]
    primals = tuple(_rand(*s, seed=i).requires_grad_() for i, s in enumerate(shapes))
    assert torch.autograd.gradcheck(primal, primals)


@pytest.mark.parametrize("name", JVP_CASES)
def test_jvp_primal_gradient_equals_primal_gradient(name):
    """The primal output of *_jvp backpropagates like the independent formula (tangents don't leak in)."""
    _, jvp, shapes = CASES[name]
    primals = tuple(_rand(*s, seed=i).requires_grad_() for i, s in enumerate(shapes))
    tangents = tuple(_rand(*s, seed=100 + i) for i, s in enumerate(shapes))
    out, _ = jvp(*primals, *tangents)
    ref = INDEPENDENT[name](*primals)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    w = [_rand(*o.shape, seed=7 + i) for i, o in enumerate(outs)]
    g = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(outs, w)), primals)
    g_ref = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(refs, w)), primals)
    _assert_close(g, g_ref)


def test_dual_linear_backprops_weight_and_bias_through_primal_rows_only():
    x, tx = _rand(3, 4, 5, seed=1).requires_grad_(), _rand(3, 4, 5, seed=2)
    w, b = _rand(6, 5, seed=3).requires_grad_(), _rand(6, seed=4).requires_grad_()
    y, ty = K.linear_jvp(x, tx, w, b)
    torch.testing.assert_close(ty, tx @ w.detach().t())
    (y.sin().sum()).backward()
    gx, gw, gb = x.grad, w.grad, b.grad
    x.grad = w.grad = b.grad = None
    torch.nn.functional.linear(x, w, b).sin().sum().backward()
    _assert_close((gx, gw, gb), (x.grad, w.grad, b.grad))


def test_dual_linear_under_autocast_is_what_autocast_makes_of_f_linear():
    """bf16 GEMM for both rows, bf16 primal and tangent, fp32 gradients for the fp32 parameters."""
    x, tx = _rand(3, 4, 5, seed=1).float().requires_grad_(), _rand(3, 4, 5, seed=2).float()
    w, b = _rand(6, 5, seed=3).float().requires_grad_(), _rand(6, seed=4).float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ty = K.linear_jvp(x, tx, w, b)
        y_ref, ty_ref = torch.nn.functional.linear(x, w, b), torch.nn.functional.linear(tx, w)
    assert y.dtype == ty.dtype == torch.bfloat16
    torch.testing.assert_close(ty, ty_ref)
    # our GEMM rounds to bf16 before + bias, addmm once after it: at most one bf16 ulp (<= 2^-7 |v|) apart
    assert (y.float() - y_ref.float()).abs().max() <= 2 ** -7 * y_ref.float().abs().max()
    upstream = _rand(3, 4, 6, seed=5).to(torch.bfloat16)
    y.backward(upstream)
    grads = (x.grad, w.grad, b.grad)
    x.grad = w.grad = b.grad = None
    y_ref.backward(upstream)
    assert all(g.dtype == torch.float32 for g in grads)
    for g, g_ref in zip(grads, (x.grad, w.grad, b.grad)):  # the same bf16 GEMMs, summed in another order
        torch.testing.assert_close(g, g_ref, rtol=2 ** -7, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone, and so must we
        y64, ty64 = K.linear_jvp(x.double(), tx.double(), w.double(), b.double())
    assert y64.dtype == ty64.dtype == torch.float64


def test_layer_norm_affine_jvp_matches_torch_func_jvp():
    x, tx = _rand(2, 5, 7, seed=1), _rand(2, 5, 7, seed=2)
    w, b = _rand(7, seed=3), _rand(7, seed=4)
    want = torch.func.jvp(lambda x: torch.nn.functional.layer_norm(x, (7,), w, b, 1e-5), (x,), (tx,))
    _assert_close(K.layer_norm_jvp(x, tx, w, b, eps=1e-5), want)


def test_layer_norm_matches_torch_layer_norm():
    x = _rand(3, 4, 9)
    _assert_close(K.layer_norm(x), torch.nn.functional.layer_norm(x, (9,), eps=1e-6))


def test_attention_matches_sdpa():
    q, k, v = (_rand(2, 3, 49, 8, seed=i) for i in range(3))
    _assert_close(K.attention(q, k, v, backend=R), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_low_precision_inputs_compute_in_fp32():
    x = _rand(2, 5, 16).to(torch.bfloat16)
    b, s = _rand(2, 16, seed=1).to(torch.bfloat16), _rand(2, 16, seed=2).to(torch.bfloat16)
    y = K.adaln_modulate(x, b, s, backend=R)
    assert y.dtype == torch.bfloat16
    want = torch.nn.functional.layer_norm(x.double(), (16,), eps=1e-6) * (1 + s.double()[:, None]) + b.double()[:, None]
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: K.adaln_modulate(_rand(2, 3), _rand(2, 3), _rand(2, 3)), "x must have rank 3"),
        (lambda: K.adaln_modulate(_rand(2, 3, 4), _rand(3, 4), _rand(2, 4)), r"shift must have shape \(2, 4\)"),
        (lambda: K.adaln_modulate_jvp(_rand(2, 3, 4), _rand(2, 4), _rand(2, 4), _rand(2, 3, 5), None, None),
         "tx must have shape"),
        (lambda: K.attention(_rand(2, 3, 4), _rand(2, 3, 4), _rand(2, 3, 4)), "q must have rank 4"),
        (lambda: K.attention(_rand(1, 2, 3, 4), _rand(1, 2, 3, 5), _rand(1, 2, 3, 4)), "k must have shape"),
        (lambda: K.gated_residual(_rand(2, 3, 4), _rand(2, 4), _rand(2, 3, 3)), "h must have shape"),
        (lambda: K.bias_gelu(_rand(2, 3, 4), _rand(5)), "bias must have shape"),
        (lambda: K.timestep_embedding(_rand(2, 1), 8), "t must have rank 1"),
        (lambda: K.adaln_modulate(_rand(2, 3, 4), _rand(2, 4), _rand(2, 4), backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
