"""freeflow.losses.velocity_alignment_loss: the fused op of freeflow._C and its pure-PyTorch fallback.

Every check is against an independent reference: the docs/design.md §5 formula written out below in fp64
plain torch, autograd of the surrogate, gradcheck, and torch.library.opcheck.
"""
import json
import os
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

from freeflow import _ext
from freeflow.losses import DEFAULT_EPS, velocity_alignment_loss, velocity_alignment_loss_reference

# Relative tolerances of the acceptance criteria (fp16: same budget as bf16).
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CPU = torch.device("cpu")
# The CUDA kernel of freeflow._C is checked wherever a GPU is present; CPU machines (CI) check the host loops.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def formula(A, B, *, power, eps, scale):
    """docs/design.md §5 in fp64: (value, per-sample ‖Δ_i‖²/d, ∂value/∂F)."""
    delta = (A.detach().double() - B.detach().double()).reshape(A.shape[0], -1)
    n, d = delta.shape
    per_sample = (delta * delta).sum(1) / d
    w = 1.0 / (per_sample + eps) ** power
    value = (w * per_sample).sum() / n
    grad = (2.0 / (n * d)) * scale * w[:, None] * delta
    return value, per_sample, grad.reshape(A.shape)


def assert_rel(actual, expected, tol, upstream=None):
    """Relative closeness; fp16 gradients also get the subnormal rounding allowance.

    fp16 stores |x| < 2^-14 as subnormals spaced 2^-24 apart, so relative error is unbounded there.
    A gradient is rounded to fp16 by the forward (half a spacing) and rounded again after the
    backward multiplies it by the incoming gradient `upstream`: (1 + |upstream|)·2^-25 in all.
    """
    atol = 0.0
    if actual.dtype == torch.float16 and upstream is not None:
        atol = (1.0 + abs(upstream)) * 2.0 ** -25
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=atol)


def require_extension():
    if os.environ.get("FREEFLOW_NO_EXT") == "1":
        pytest.skip("FREEFLOW_NO_EXT=1: the extension is disabled on purpose")
    assert _ext.load(), f"freeflow._C could not be loaded: {_ext.STATE.reason}"
    assert _ext.supports(CPU)


@pytest.fixture(params=["extension", "reference"])
def impl(request):
    """The public function backed by freeflow._C, and the pure-PyTorch fallback on its own."""
    if request.param == "extension":
        require_extension()
        return velocity_alignment_loss
    return velocity_alignment_loss_reference


def inputs(shape, dtype, *, seed=0, requires_grad=True, device=CPU):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(requires_grad)
    A = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    B = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)
    return F, A, B


def on_device(impl, device):
    """The device the test runs on, after checking that the extension really runs there (no fallback)."""
    device = torch.device(device)
    if impl is velocity_alignment_loss and device.type == "cuda":
        assert _ext.supports(device), f"freeflow._C has no CUDA kernel: {_ext.STATE.reason}"
    return device


# (1, 3, 5, 7): N = 1 and odd sizes; (3, 4101): rows longer than one reduction chunk;
# (1, 8195): N = 1 with several chunks, the within-row parallel path.
SHAPES = [(1, 3, 5, 7), (5, 3, 7, 9), (3, 4101), (1, 8195)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("where", DEVICES)
def test_matches_formula(impl, dtype, power, shape, where):
    F, A, B = inputs(shape, dtype, device=on_device(impl, where))
    eps, scale, upstream = 0.05, 0.7, 1.5  # 1.5 is exact in every dtype
    loss, per_sample = impl(F, A, B, power=power, eps=eps, scale=scale, return_per_sample=True)
    assert loss.device == F.device and per_sample.device == F.device
    loss.backward(torch.tensor(upstream, dtype=dtype, device=F.device))
    value, per_sample_ref, grad_ref = formula(A, B, power=power, eps=eps, scale=scale)
    tol = TOL[dtype]
    assert loss.dtype == dtype and loss.shape == ()
    assert per_sample.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel(loss, value, tol)
    assert_rel(per_sample, per_sample_ref, tol)
    assert F.grad.dtype == dtype and F.grad.shape == F.shape
    assert_rel(F.grad, upstream * grad_ref, tol, upstream=upstream)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", DEVICES)
def test_non_contiguous_inputs(impl, dtype, where):
    device = on_device(impl, where)
    base_F, base_A, base_B = inputs((4, 6, 10, 3), dtype, requires_grad=False, device=device)
    F = base_F.transpose(1, 2).requires_grad_()  # (4, 10, 6, 3), permuted strides
    A = base_A.transpose(1, 2)
    B = torch.randn(4, 10, 12, 3, dtype=torch.float64).to(device, dtype)[:, :, ::2]  # sliced
    assert not (F.is_contiguous() or A.is_contiguous() or B.is_contiguous())
    loss, per_sample = impl(F, A, B, power=1.0, scale=2.0, return_per_sample=True)
    loss.backward()
    value, per_sample_ref, grad_ref = formula(A, B, power=1.0, eps=DEFAULT_EPS, scale=2.0)
    assert_rel(loss, value, TOL[dtype])
    assert_rel(per_sample, per_sample_ref, TOL[dtype])
    assert_rel(F.grad, grad_ref, TOL[dtype])


def test_tensor_scale_is_a_constant(impl):
    F, A, B = inputs((3, 2, 5), torch.float64)
    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = impl(F, A, B, power=0.5, scale=scale)
    loss.backward()
    value, _, grad_ref = formula(A, B, power=0.5, eps=DEFAULT_EPS, scale=0.3)
    assert_rel(loss, value, TOL[torch.float64])
    assert_rel(F.grad, grad_ref, TOL[torch.float64])
    assert scale.grad is None


def test_no_gradient_to_A_or_B(impl):
    F, A, B = inputs((2, 3, 4), torch.float32)
    A.requires_grad_()
    B.requires_grad_()
    impl(F, A, B).backward()
    assert F.grad is not None and A.grad is None and B.grad is None


def test_gradient_is_that_of_the_surrogate(impl):
    """∂/∂F equals autograd of λ·mean_i sg(w_i)·‖F_i - sg(F_i - Δ_i)‖²/d (docs/design.md §3), any k."""
    for power in (0.0, 0.5, 1.0):
        F, A, B = inputs((4, 3, 5), torch.float64)
        impl(F, A, B, power=power, scale=0.6).backward()
        F2 = F.detach().clone().requires_grad_()
        delta = (A - B).flatten(1)
        msd = delta.pow(2).mean(1)
        w = (msd + DEFAULT_EPS).pow(-power)
        surrogate = 0.6 * (w * (F2.flatten(1) - (F2.flatten(1) - delta).detach()).pow(2).mean(1)).mean()
        surrogate.backward()
        assert_rel(F.grad, F2.grad, TOL[torch.float64])


@pytest.mark.parametrize("where", DEVICES)
def test_gradcheck(impl, where):
    """With k = 0 and A = F the loss is mean‖F - B‖²/d, so the op's gradient must be its true one."""
    device = on_device(impl, where)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    target = torch.randn(3, 2, 5, generator=g, dtype=torch.float64).to(device)
    assert torch.autograd.gradcheck(lambda f: impl(f, f, target, power=0.0), (x,))
    assert torch.autograd.gradcheck(lambda f: 2.5 * impl(f, f, target, power=0.0, eps=0.0), (x,))


def test_extension_does_not_read_F():
    require_extension()
    F = torch.full((3, 4, 5), float("nan"), requires_grad=True)
    _, A, B = inputs((3, 4, 5), torch.float32, requires_grad=False)
    loss, per_sample = velocity_alignment_loss(F, A, B, return_per_sample=True)
    loss.backward()
    value, per_sample_ref, grad_ref = formula(A, B, power=1.0, eps=DEFAULT_EPS, scale=1.0)
    assert_rel(loss, value, TOL[torch.float32])
    assert_rel(F.grad, grad_ref, TOL[torch.float32])


def test_public_function_dispatches_to_the_extension():
    require_extension()
    F, A, B = inputs((2, 3), torch.float32)
    loss = velocity_alignment_loss(F, A, B)
    assert "freeflow_velocity_alignment" in loss.grad_fn.name()


def test_opcheck():
    require_extension()
    op = torch.ops.freeflow.velocity_alignment.default
    F, A, B = inputs((4, 6, 2), torch.float32)
    samples = [(F, A.transpose(1, 2).contiguous().transpose(1, 2), B),  # non-contiguous A
               inputs((1, 7), torch.bfloat16)]  # N = 1, low precision
    for F, A, B in samples:
        torch.library.opcheck(op, (F, A, B, 0.5, 1e-3, 0.7))
    grad_F = torch.randn(3, 4, 5)
    torch.library.opcheck(torch.ops.freeflow.velocity_alignment_backward.default,
                          (torch.tensor(1.5), grad_F))


def test_torch_compile_fullgraph_inductor():
    """Inductor traces through the op (fake impl + registered autograd); kept to the op alone, as
    the objectives call it, because every extra pointwise kernel costs a C++ compile on 2 cores."""
    require_extension()

    def step(F, A, B):
        return velocity_alignment_loss(F, A, B, power=0.5, scale=0.7, return_per_sample=True)

    F, A, B = inputs((3, 4, 5), torch.float32)
    loss, per_sample = torch.compile(step, fullgraph=True, dynamic=False)(F, A, B)
    loss.backward()
    value, per_sample_ref, grad_ref = formula(A, B, power=0.5, eps=DEFAULT_EPS, scale=0.7)
    assert_rel(loss, value, TOL[torch.float32])
    assert_rel(per_sample, per_sample_ref, TOL[torch.float32])
    assert_rel(F.grad, grad_ref, TOL[torch.float32])


def test_torch_compile_fullgraph_tensor_scale():
    """A tensor λ and an op feeding F trace into the same graph (AOT autograd, no codegen)."""
    require_extension()

    def step(F, A, B, lam):
        return velocity_alignment_loss(2.0 * F, A, B, power=1.0, scale=lam)

    F, A, B = inputs((2, 3, 4), torch.float64)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(F, A, B, torch.tensor(0.3, dtype=torch.float64))
    loss.backward()
    value, _, grad_ref = formula(A, B, power=1.0, eps=DEFAULT_EPS, scale=0.3)
    assert_rel(loss, value, TOL[torch.float64])
    assert_rel(F.grad, 2.0 * grad_ref, TOL[torch.float64])


def test_torch_compile_fullgraph_reference_fallback():
    def step(F, A, B):
        return velocity_alignment_loss_reference(F, A, B, power=1.0, scale=0.5,
                                                 return_per_sample=True)

    F, A, B = inputs((2, 3, 4), torch.float64)
    loss, per_sample = torch.compile(step, fullgraph=True, backend="aot_eager")(F, A, B)
    loss.backward()
    value, per_sample_ref, grad_ref = formula(A, B, power=1.0, eps=DEFAULT_EPS, scale=0.5)
    assert_rel(loss, value, TOL[torch.float64])
    assert_rel(per_sample, per_sample_ref, TOL[torch.float64])
    assert_rel(F.grad, grad_ref, TOL[torch.float64])


# --------------------------------------------------------------------------- bad inputs

def _bad_calls():
    F = torch.randn(2, 3, 4)
    return [
        ("A", lambda: velocity_alignment_loss(F, torch.randn(2, 3, 5), F), "A must have F's shape"),
        ("B", lambda: velocity_alignment_loss(F, F, torch.randn(3, 3, 4)), "B must have F's shape"),
        ("A dtype", lambda: velocity_alignment_loss(F, F.double(), F), "A must have F's dtype"),
        ("B dtype", lambda: velocity_alignment_loss(F, F, F.half()), "B must have F's dtype"),
        ("B device", lambda: velocity_alignment_loss(F, F, F.to("meta")), "B must be on F's device"),
        ("F dtype", lambda: velocity_alignment_loss(F.long(), F.long(), F.long()), "F must be float32"),
        ("F rank", lambda: velocity_alignment_loss(F[0, 0], F[0, 0], F[0, 0]), "F must be a non-empty"),
        ("F empty", lambda: velocity_alignment_loss(F[:0], F[:0], F[:0]), "F must be a non-empty"),
        ("A type", lambda: velocity_alignment_loss(F, F.numpy(), F), "A must be a torch.Tensor"),
        ("power", lambda: velocity_alignment_loss(F, F, F, power=float("nan")), "power must be"),
        ("eps", lambda: velocity_alignment_loss(F, F, F, eps=-1.0), "eps must be"),
        ("scale", lambda: velocity_alignment_loss(F, F, F, scale=torch.ones(2)), "tensor scale must"),
        ("scale", lambda: velocity_alignment_loss(F, F, F, scale="1"), "scale must be"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_value_error(case):
    _, call, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_op_itself_rejects_bad_arguments():
    require_extension()
    op = torch.ops.freeflow.velocity_alignment
    F = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="A must have F's shape"):
        op(F, torch.randn(2, 12), F, 1.0, 1e-3, 1.0)
    with pytest.raises(ValueError, match="B must have F's dtype"):
        op(F, F, F.double(), 1.0, 1e-3, 1.0)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        op(F, F, F, 1.0, -1e-3, 1.0)


# --------------------------------------------------------------------------- loader

@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has tried nothing yet and finds no library loaded."""
    monkeypatch.setattr(_ext, "STATE", _ext._State())
    monkeypatch.setattr(_ext, "_op_defined", lambda: False)
    monkeypatch.setattr(_ext, "_register_python_parts", lambda: None)  # the fakes load no library
    monkeypatch.delenv("FREEFLOW_NO_EXT", raising=False)


def _missing():
    raise ImportError("No module named 'freeflow._C'")


def test_loader_falls_back_with_one_warning(fresh_loader):
    def failing_build():
        raise RuntimeError("Error building extension 'freeflow_C'\nlong compiler output")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _ext.load(prebuilt=_missing, jit=failing_build)
        assert not _ext.load(prebuilt=_missing, jit=failing_build)  # decided once per process
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "pure-PyTorch" in message and "freeflow_C" in message
    assert not _ext.supports(CPU)


def test_loader_jit_builds_when_not_prebuilt(fresh_loader):
    built = []
    assert not _ext.load(allow_jit=False, prebuilt=_missing, jit=lambda: built.append(1))
    assert built == []  # import time: no build
    assert _ext.load(prebuilt=_missing, jit=lambda: built.append(1))
    assert built == [1] and _ext.STATE.source == "jit"


def test_loader_respects_freeflow_no_ext(fresh_loader, monkeypatch):
    monkeypatch.setenv("FREEFLOW_NO_EXT", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _ext.load(prebuilt=_missing, jit=_missing)


def test_public_function_falls_back_to_the_reference(monkeypatch):
    """Without the extension the public function computes the same loss and gradient in PyTorch."""
    monkeypatch.setattr(_ext, "STATE", _ext._State(final=True, reason="test: no extension"))
    F, A, B = inputs((3, 5), torch.float64)
    loss, per_sample = velocity_alignment_loss(F, A, B, power=0.5, scale=0.7, return_per_sample=True)
    loss.backward()
    assert "freeflow" not in loss.grad_fn.name()
    value, per_sample_ref, grad_ref = formula(A, B, power=0.5, eps=DEFAULT_EPS, scale=0.7)
    assert_rel(loss, value, TOL[torch.float64])
    assert_rel(per_sample, per_sample_ref, TOL[torch.float64])
    assert_rel(F.grad, grad_ref, TOL[torch.float64])


def test_jit_build_compiles_the_host_sources(monkeypatch, tmp_path):
    """What the JIT path hands to torch.utils.cpp_extension.load. The compile itself is the one
    `pip install` runs (same sources and flags); this suite JIT-builds for real only when no
    prebuilt library exists (see require_extension)."""
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(_ext, "cuda_build_possible", lambda: False)
    _ext.jit_build(build_directory=str(tmp_path / "build"))
    (kwargs,) = calls
    csrc = os.path.join(os.path.dirname(os.path.abspath(_ext.__file__)), "csrc")
    assert os.path.samefile(csrc, os.path.join(os.path.dirname(__file__), "..", "..", "csrc"))  # the checkout's
    names = sorted(os.path.basename(f) for f in kwargs["sources"])
    assert names == ["velocity_alignment.cpp"]  # no *_cuda.cpp binding without a CUDA torch
    assert all(os.path.isfile(f) for f in kwargs["sources"])
    assert kwargs["extra_include_paths"] == [csrc] and "-fopenmp" in kwargs["extra_cflags"]
    assert kwargs["is_python_module"] is False and kwargs["with_cuda"] is False
    assert os.path.isdir(kwargs["build_directory"])

    monkeypatch.setattr(_ext, "cuda_build_possible", lambda: True)
    calls.clear()
    _ext.jit_build(build_directory=str(tmp_path / "build_cuda"))
    names = sorted(os.path.basename(f) for f in calls[0]["sources"])
    assert names == ["velocity_alignment.cpp", "velocity_alignment_cuda.cpp",
                     "velocity_alignment_kernel.cu"]


def test_extension_sources_have_distinct_object_names():
    """setuptools' BuildExtension names each object after its source's stem, so x.cpp beside x.cu would both
    become x.o and ninja stops ("multiple rules generate x.o"): no two sources may share a stem."""
    stems = [os.path.splitext(os.path.basename(f))[0] for f in _ext.sources(True)]
    assert len(stems) == len(set(stems)) and len(stems) == 3, stems


@pytest.mark.slow
def test_host_sources_are_cpp17(tmp_path):
    """torch 2.11 and older compile extensions as C++17 (2.13 as C++20): the host sources must build as both."""
    import shutil
    import sysconfig

    from torch.utils.cpp_extension import include_paths
    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler on PATH (the extension's build needs one too)"
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{_ext._CSRC}"]
    for src in _ext.sources(False):
        done = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-fopenmp", *flags, src],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_installed_wheel_ships_the_sources_the_jit_fallback_compiles(tmp_path):
    """A non-editable install (a wheel, no checkout beside it) still finds csrc/ for the JIT build."""
    repo = os.path.join(os.path.dirname(__file__), "..", "..")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), repo], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "FREEFLOW_NO_EXT": "1"})
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("freeflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # The library and what the demo reads ship; the lab (experiments and the teacher only they use) does not.
    assert not [n for n in names if n.startswith("freeflow/experiments")]
    assert {"freeflow/train.py", "freeflow/kernels/flash_attention.py", "freeflow/assets/mnist_teacher_long.pt",
            "freeflow/assets/mnist_teacher_long_eval.pt", "freeflow/assets/mnist_features.pt"} <= set(names)
    assert "freeflow/assets/mnist_teacher.pt" not in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import json, os, freeflow._ext as e; "
             "print(json.dumps([e._CSRC, e.sources(False), e.sources(True)]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site), "FREEFLOW_NO_EXT": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    csrc, host, with_cuda = json.loads(out.stdout.strip().splitlines()[-1])
    assert os.path.realpath(csrc).startswith(os.path.realpath(site))  # the wheel's copy, not the checkout
    assert [os.path.basename(f) for f in host] == ["velocity_alignment.cpp"]
    assert sorted(os.path.basename(f) for f in with_cuda) == ["velocity_alignment.cpp", "velocity_alignment_cuda.cpp",
                                                              "velocity_alignment_kernel.cu"]
    for header in ("velocity_alignment.h", "velocity_alignment_op.h", "velocity_alignment_cuda.h"):
        assert os.path.isfile(os.path.join(csrc, header)), header
