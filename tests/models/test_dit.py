"""DiT forward_jvp against torch.func.jvp of the functional DiT in tests/official.py (written from the published
architecture; it shares no code with freeflow.models); gradients through its primal; the student at init.

These run the reference kernels (the Triton backend is compared with them in test_model_triton.py).
"""
import functools

import pytest
import torch
from official import functional_dit
from torch.nn.attention import SDPBackend, sdpa_kernel

from freeflow.models import DiT as _DiT
from freeflow.models import DiTConfig, FlowMapStudent, GuidedVelocityNet, config_from_name

DiT = functools.partial(_DiT, backend="reference")

REL = 1e-5


def _randomize(model, seed=0, std=0.05):
    """Non-zero weights everywhere (adaLN-Zero init would make most paths vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("q_norm.weight") else 0.0))
    return model


# S = 49 tokens (14×14 input, patch 2); head dim 72 (hidden 144, 2 heads) with qk_norm and a non-square input.
CONFIGS = {
    "S49": DiTConfig(input_size=14, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4,
                     num_classes=7, learn_sigma=True, take_dt=True, take_gw=True),
    "hd72": DiTConfig(input_size=(8, 12), patch_size=4, in_channels=2, hidden_size=144, depth=2, num_heads=2,
                      num_classes=5, learn_sigma=False, qk_norm=True, take_dt=True, take_gw=True),
}


def _inputs(cfg, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.input_size if isinstance(cfg.input_size, tuple) else (cfg.input_size,) * 2
    x = torch.randn(n, cfg.in_channels, h, w, generator=g)
    t, dt, gw = torch.rand(n, generator=g), torch.rand(n, generator=g), 1 + 3 * torch.rand(n, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)
    return x, t, y, dt, gw


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TANGENT_SETS = {"x": ("x",), "t": ("t",), "dt": ("dt",), "gw": ("gw",), "all": ("x", "t", "dt", "gw")}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("family", ["internal", "sit"])
@pytest.mark.parametrize("which", list(TANGENT_SETS))
def test_forward_jvp_equals_torch_func_jvp(cfg_name, family, which):
    cfg = CONFIGS[cfg_name]
    model = _randomize(DiT(cfg, family=family))
    x, t, y, dt, gw = _inputs(cfg)
    primals = {"x": x, "t": t, "dt": dt, "gw": gw}
    g = torch.Generator().manual_seed(5)
    tangents = {k: torch.randn(v.shape, generator=g) for k, v in primals.items() if k in TANGENT_SETS[which]}

    names = list(TANGENT_SETS[which])
    fixed = {k: v for k, v in primals.items() if k not in names}

    sd = model.state_dict()

    def published(*args):  # the independent functional DiT: shares no code with the model
        kw = {**fixed, **dict(zip(names, args))}
        return _functional(model, sd, kw["x"], kw["t"], y, kw["dt"], kw["gw"])

    def f(*args):
        kw = {**fixed, **dict(zip(names, args))}
        return model(kw["x"], kw["t"], y, dt=kw["dt"], gw=kw["gw"])

    args, targs = tuple(primals[k] for k in names), tuple(tangents[k] for k in names)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the math path has a forward-mode derivative on CPU
        want_out, want_tan = torch.func.jvp(published, args, targs)
        ad_out, ad_tan = torch.func.jvp(f, args, targs)  # our forward also runs under torch.func
        out, tan = model.forward_jvp(x, t, y, dt, gw, **{f"t{k}": v for k, v in tangents.items()})
    assert _rel(out, want_out) <= REL
    assert _rel(tan, want_tan) <= REL
    assert _rel(ad_out, want_out) <= REL and _rel(ad_tan, want_tan) <= REL


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_forward_jvp_primal_gradient_equals_published_forward_gradient(cfg_name):
    cfg = CONFIGS[cfg_name]
    model = _randomize(DiT(cfg))
    x, t, y, dt, gw = _inputs(cfg)
    w = torch.randn(model(x, t, y, dt, gw).shape, generator=torch.Generator().manual_seed(3))
    out, tan = model.forward_jvp(x, t, y, dt, gw, tdt=torch.ones_like(dt), tx=torch.randn_like(x))
    assert not tan.requires_grad
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads = torch.autograd.grad((out * w).sum(), params)
    # The reference: the published forward, written with plain functional ops, on the same parameter tensors.
    sd = {**dict(model.named_parameters()), "pos_embed": model.pos_embed}
    want = _functional(model, sd, x, t, y, dt, gw)
    ref = torch.autograd.grad((want * w).sum(), params)
    assert _rel(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref])) <= REL
    scale = max(g.abs().max() for g in ref)  # some gradients are exactly zero in theory (k_norm.bias)
    for (name, _), a, b in zip(named, grads, ref):
        assert (a - b).abs().max() <= REL * scale, name


def _functional(model, sd, x, t, y, dt, gw):
    """The independent functional DiT (tests/official.py) on ``sd``, with this model's heads and qk_norm."""
    cfg = model.config
    return functional_dit(sd, x, t, y, heads=cfg.num_heads, dt=dt, gw=gw, qk_norm=cfg.qk_norm,
                          drop_sigma=cfg.learn_sigma and model.family != "dit")


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("family", ["internal", "dit"])
def test_forward_jvp_without_tangents_is_the_published_forward(cfg_name, family):
    """No tangents: the tangent is None and the primal is the published DiT forward (an independent functional
    implementation; ``forward`` itself is ``forward_jvp(...)[0]``, so comparing the two would prove nothing)."""
    cfg = CONFIGS[cfg_name]
    model = _randomize(DiT(cfg, family=family))
    x, t, y, dt, gw = _inputs(cfg)
    with torch.no_grad():
        out, tan = model.forward_jvp(x, t, y, dt, gw)
        want = _functional(model, model.state_dict(), x, t, y, dt, gw)
    assert tan is None
    assert out.shape == want.shape == (2, cfg.out_channels if family == "dit" else cfg.in_channels, *x.shape[2:])
    assert _rel(out, want) <= REL


def test_learn_sigma_channels_follow_family():
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    assert DiT(cfg, family="dit")(x, t, y).shape == (2, 8, 8, 8)
    assert DiT(cfg, family="sit")(x, t, y).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("name", ["DiT-S/2", "SiT-B/4", "DiT-L/8", "REPA-XL/2", "DiT-T/2"])
def test_named_configs(name):
    cfg = config_from_name(name, input_size=32)
    assert cfg.hidden_size // cfg.num_heads in (32, 64, 72)
    if "XL" in name:
        assert (cfg.hidden_size, cfg.depth, cfg.num_heads) == (1152, 28, 16)


# --------------------------------- student --------------------------------------------------

@pytest.mark.parametrize("family, extra_depth", [("internal", 0), ("repa", 0), ("sit", 0), ("sit", 2)])
def test_student_at_init_is_one_euler_step_of_teacher(family, extra_depth):
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=3,
                    num_classes=6, learn_sigma=family == "sit")
    teacher = _randomize(DiT(cfg, family=family), seed=4)
    student = FlowMapStudent.from_teacher(teacher, extra_depth=extra_depth)
    assert len(student.net.blocks) == 2 + extra_depth
    z = torch.randn(3, 4, 8, 8)
    y = torch.tensor([0, 5, 6])
    gw = torch.tensor([1.0, 2.5, 4.0])
    ones = torch.ones(3)
    with torch.no_grad():
        # the teacher's velocity at the noise end, mapped to the internal convention by hand
        v = -teacher(z, torch.zeros(3), y) if family == "sit" else teacher(z, ones, y)
        x = student.sample(z, y, gw)
    assert (x - (z - v)).abs().max().item() <= 1e-6
    # δ and γ change nothing at initialisation (zeroed last Linear of the new embedders)
    with torch.no_grad():
        f_half = student(z, 0.5 * ones, y, 3 * ones)
    assert (f_half - v).abs().max().item() <= 1e-6
    if extra_depth:  # the appended blocks are in the forward pass: opening one's gates changes the output
        _randomize(student.net.blocks[-1], seed=5)
        with torch.no_grad():
            assert (student(z, ones, y, gw) - v).abs().max().item() > 1e-3


def test_student_extra_depth_must_be_a_nonnegative_integer():
    teacher = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=1, num_heads=3,
                            num_classes=6), family="internal")
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="extra_depth must be an integer >= 0"):
            FlowMapStudent.from_teacher(teacher, extra_depth=bad)


def test_student_forward_jvp_in_delta_equals_torch_func_jvp():
    cfg = CONFIGS["S49"]
    teacher = _randomize(DiT(DiTConfig(**{**cfg.to_dict(), "take_dt": False, "take_gw": False}), family="sit"))
    student = _randomize(FlowMapStudent.from_teacher(teacher), seed=9)
    z, _, y, delta, gw = _inputs(cfg)
    net, sd, zero = student.net, student.net.state_dict(), torch.zeros(len(z))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        # A SiT-family student: the network at its noise end (t' = 0), velocity negated into our convention,
        # written out on the functional DiT; and torch.func.jvp of the student's own forward.
        want = torch.func.jvp(lambda d: -_functional(net, sd, z, zero, y, d, gw), (delta,), (torch.ones_like(delta),))
        ad = torch.func.jvp(lambda d: student(z, d, y, gw), (delta,), (torch.ones_like(delta),))
        got = student.forward_jvp(z, delta, y, gw, tdelta=torch.ones_like(delta))
    assert _rel(got[0], want[0]) <= REL and _rel(got[1], want[1]) <= REL
    assert _rel(ad[1], want[1]) <= REL


def test_aux_net_starts_as_teacher_velocity():
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=1, num_heads=3, num_classes=6)
    teacher = _randomize(DiT(cfg, family="sit"), seed=2)
    aux = GuidedVelocityNet.from_teacher(teacher)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([1, 6])
    with torch.no_grad():
        torch.testing.assert_close(aux(x, t, y, torch.tensor([1.0, 3.0])), -teacher(x, 1 - t, y), rtol=0, atol=1e-6)


# --------------------------------- bad input ------------------------------------------------

def test_bad_inputs_name_the_argument():
    cfg = CONFIGS["S49"]
    model = DiT(cfg)
    x, t, y, dt, gw = _inputs(cfg)
    with pytest.raises(ValueError, match="x must be"):
        model(x[0], t, y, dt, gw)
    with pytest.raises(ValueError, match=r"x must have shape \(2, 3, 14, 14\)"):
        model(x[:, :2], t, y, dt, gw)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(x, t[:1], y, dt, gw)
    with pytest.raises(ValueError, match="dt is required"):
        model(x, t, y, None, gw)
    with pytest.raises(ValueError, match="tx must have shape"):
        model.forward_jvp(x, t, y, dt, gw, tx=torch.randn(2, 3, 7, 7))
    with pytest.raises(ValueError, match="gw was given"):
        DiT(DiTConfig(**{**cfg.to_dict(), "take_gw": False}))(x, t, y, dt, gw)
    with pytest.raises(ValueError, match="unknown model config"):
        config_from_name("DiT-Q/3")
    with pytest.raises(ValueError, match="family must be one of"):
        DiT(cfg, family="edm")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiTConfig(input_size=15, patch_size=2)
