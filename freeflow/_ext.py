"""Loader of the C++/CUDA extension ``freeflow._C`` and the Python half of its op registrations.

Resolution order, tried once per process:

1. ``import freeflow._C`` — built ahead of time by ``pip install --no-build-isolation .``;
2. a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory
   keyed by the torch/Python/CUDA versions, reused by later processes (``FREEFLOW_EXT_CACHE``
   overrides the location);
3. otherwise the pure-PyTorch reference, announced by one warning.

``FREEFLOW_NO_EXT=1`` skips 1 and 2 silently (same switch as ``setup.py``).

Loading the library runs its ``TORCH_LIBRARY`` blocks, which define ``freeflow::velocity_alignment``
and ``freeflow::velocity_alignment_backward`` and their CPU/CUDA kernels; this module then adds what
is best written in Python: the fake (meta) implementation for ``torch.compile`` and the autograd
formula (backward = incoming scalar × the gradient stored by the forward).
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import warnings
from dataclasses import dataclass

import torch

OP = "freeflow::velocity_alignment"
# The C++/CUDA sources ship inside the package (freeflow/csrc: a link to the top-level csrc/ in a checkout,
# copied files in a wheel), so the JIT fallback also works from an installed, non-editable package.
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


@dataclass
class _State:
    final: bool = False  # nothing more will be tried in this process
    loaded: bool = False
    source: str = "none"  # "prebuilt", "jit", "preloaded" or "none"
    reason: str = ""  # why the extension is not in use
    cuda: bool = False  # the loaded library has CUDA kernels


STATE = _State()


def sources(with_cuda: bool) -> list[str]:
    """csrc/ files of the extension: ``*_cuda.cpp`` bindings and ``*.cu`` kernels only with CUDA."""
    cpp = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")))
    if not with_cuda:
        return [f for f in cpp if not f.endswith("_cuda.cpp")]
    return cpp + sorted(glob.glob(os.path.join(_CSRC, "*.cu")))


def cuda_build_possible() -> bool:
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def cache_dir() -> str:
    """Where the JIT build lives; one directory per torch/Python/CUDA combination (ABI)."""
    root = os.environ.get("FREEFLOW_EXT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "freeflow", "ext")
    tag = f"{torch.__version__}|{sys.version_info[:2]}|{torch.version.cuda}|{cuda_build_possible()}"
    return os.path.join(root, hashlib.sha1(tag.encode()).hexdigest()[:12])


def jit_build(build_directory: str | None = None, verbose: bool = False) -> None:
    """Compile csrc/ with ninja and load it into this process (ninja skips up-to-date objects)."""
    from torch.utils import cpp_extension

    with_cuda = cuda_build_possible()
    srcs = sources(with_cuda)
    if not srcs:
        raise RuntimeError(f"no C++ sources in {_CSRC}")
    build_directory = build_directory or cache_dir()
    os.makedirs(build_directory, exist_ok=True)
    cpp_extension.load(
        name="freeflow_C",
        sources=srcs,
        extra_include_paths=[_CSRC],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3"],
        with_cuda=with_cuda,
        build_directory=build_directory,
        is_python_module=False,
        verbose=verbose,
    )


def _import_prebuilt() -> None:
    import freeflow._C  # noqa: F401  (loading the library registers the ops)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:160]


def load(*, allow_jit: bool = True, prebuilt=_import_prebuilt, jit=jit_build) -> bool:
    """Make the ops available if at all possible; True when they are. Safe to call repeatedly.

    ``allow_jit=False`` only tries the prebuilt library (cheap, done at import); a later call may
    still JIT-build. Once a JIT build has been attempted the outcome is final for the process.
    """
    if STATE.loaded:
        return True
    if STATE.final:
        return False
    if os.environ.get("FREEFLOW_NO_EXT") == "1":
        STATE.final, STATE.reason = True, "disabled by FREEFLOW_NO_EXT=1"
        return False
    if _op_defined():  # the library was already loaded by other means (torch.ops.load_library)
        STATE.source = "preloaded"
    else:
        try:
            prebuilt()
            STATE.source = "prebuilt"
        except ImportError as exc:
            STATE.reason = f"freeflow._C is not built ({_first_line(exc)})"
            if not allow_jit:
                return False
            STATE.final = True
            try:
                jit()
                STATE.source = "jit"
            except Exception as jit_exc:  # no compiler, build error, ...: fall back, loudly once
                STATE.reason += f" and its JIT build failed: {_first_line(jit_exc)}"
                warnings.warn(f"freeflow: C++ extension unavailable: {STATE.reason}; "
                              "velocity_alignment_loss uses the pure-PyTorch reference (full "
                              "build log: python -c 'from freeflow import _ext; "
                              "_ext.jit_build(verbose=True)')", RuntimeWarning, stacklevel=3)
                return False
    _register_python_parts()
    STATE.loaded, STATE.final, STATE.reason = True, True, ""
    STATE.cuda = _has_kernel("CUDA")
    return True


def supports(device: torch.device) -> bool:
    """Whether the loaded extension has a kernel for tensors on ``device``."""
    return STATE.loaded and (device.type == "cpu" or (device.type == "cuda" and STATE.cuda))


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(OP, dispatch_key)
    except RuntimeError:  # "operator ... does not exist"
        return False


def _op_defined() -> bool:
    return _has_kernel("CPU")


_registered = False


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake(OP)
    def _velocity_alignment_fake(F, A, B, power, eps, scale):
        # Mirrors allocate_velocity_alignment_outputs in csrc/velocity_alignment_op.h.
        stat = torch.float64 if F.dtype == torch.float64 else torch.float32
        return (F.new_empty(()), F.new_empty((F.shape[0],), dtype=stat),
                F.new_empty(F.shape))

    @torch.library.register_fake(OP + "_backward")
    def _velocity_alignment_backward_fake(grad_loss, grad_F):
        return torch.empty_like(grad_F)

    def setup_context(ctx, inputs, output):
        _, per_sample, grad_F = output
        ctx.save_for_backward(grad_F)
        ctx.mark_non_differentiable(per_sample, grad_F)
        # per_sample and grad_F get no gradient: without this autograd would zero-fill a tensor of
        # F's size for grad_F's "gradient" in every backward (a full extra write).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, _grad_per_sample, _grad_grad_F):
        (grad_F,) = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            grad = torch.ops.freeflow.velocity_alignment_backward(grad_loss, grad_F)
        # A and B are constants by definition (stop-gradient), whatever their requires_grad says.
        return grad, None, None, None, None, None

    torch.library.register_autograd(OP, backward, setup_context=setup_context)
