"""Backend selection shared by every op in ``freeflow.kernels``.

An op runs its Triton kernel for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``
(the Triton interpreter, used by the test-suite); otherwise the pure-PyTorch reference.
``FREEFLOW_KERNELS=reference|triton|auto`` overrides the choice for the whole process, and every op
takes ``backend=`` to override it per call (the models pass their own ``backend`` through).

Both variables are read at import and again by ``refresh_settings()``, not per call: dispatch runs on every
op call, and one ``os.environ`` lookup costs ~0.5 µs (~1.4 µs for an unset variable, the usual case), as much
as the rest of the decision. A process that changes them after importing ``freeflow.kernels`` — a test
using ``monkeypatch.setenv`` — calls ``refresh_settings()`` afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "reference", "triton")


# Dynamo takes the result as a constant: traced through functools.cache, it warns (once per process) that the
# cache is ignored.
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    return _triton_importable()


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


_gpu_settings: list[bool] = []
# The environment as last read by refresh_settings (module globals: the cheapest lookup on the hot path).
_backend: str | None = None  # FREEFLOW_KERNELS, None when its value is invalid (then _backend_error says why)
_backend_error: str | None = None
_interpret = False  # TRITON_INTERPRET=1


def refresh_settings() -> None:
    """Read ``FREEFLOW_KERNELS`` and ``TRITON_INTERPRET`` from the environment again (see the module docstring).
    An invalid ``FREEFLOW_KERNELS`` raises at the first op call that needs it, as before, not here."""
    global _backend, _backend_error, _interpret
    backend = os.environ.get("FREEFLOW_KERNELS", "auto").strip().lower() or "auto"
    if backend in BACKENDS:
        _backend, _backend_error = backend, None
    else:
        _backend, _backend_error = None, f"FREEFLOW_KERNELS must be one of {BACKENDS}, got {backend!r}"
    _interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"


refresh_settings()


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read at ``import triton``)
    and launch settings are not forced to the GPU ones (``gpu_launch_settings``)."""
    return _interpret and not _gpu_settings


@contextlib.contextmanager
def gpu_launch_settings():
    """Launch wrappers pick their GPU tiles, warps and dot settings inside this block, even under the
    interpreter: the compile report (``aot``) records launches this way. Dispatch is unaffected: CPU tensors
    still take the Triton path when the interpreter is on."""
    _gpu_settings.append(True)
    try:
        yield
    finally:
        _gpu_settings.pop()


def check_backend(backend: str | None, name: str = "backend") -> str:
    """Validate a backend name (None means the process default, ``FREEFLOW_KERNELS``)."""
    if backend is None:
        if _backend_error is not None:
            raise ValueError(_backend_error)
        return _backend
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {backend!r}")
    return backend


def use_triton(*tensors: torch.Tensor | None, backend: str | None = None) -> bool:
    """True when the Triton kernel should run for these tensors under ``backend``: all of them (None aside) on
    CUDA, or all on the CPU with the interpreter on."""
    backend = check_backend(backend)
    if backend == "reference":
        return False
    # Tensor.is_cuda / is_cpu are flags; Tensor.device builds a torch.device per call (~4x the cost).
    cuda = cpu = other = False
    for t in tensors:
        if t is not None:
            if t.is_cuda:
                cuda = True
            elif t.is_cpu:
                cpu = True
            else:
                other = True
    runnable = not other and cuda != cpu and (cuda or _interpret) and triton_available()
    if backend == "triton" and not runnable:
        devices = sorted({t.device.type for t in tensors if t is not None})
        raise RuntimeError(
            "backend='triton' was requested but Triton cannot run here: it needs CUDA tensors, or CPU "
            f"tensors with TRITON_INTERPRET=1 set before triton is imported (devices: {devices}, "
            f"triton importable: {triton_available()})"
        )
    return runnable


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives matrix products on ``device`` now, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """Autocast's own rule: floating tensors other than float64 are cast, everything else is left alone."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def autocast_inputs(device: torch.device, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The inputs of an op that autocast treats like a matrix product (SDPA, a Linear's bias add), cast to
    the autocast dtype when autocast is on for ``device``; unchanged otherwise. The cast is differentiable,
    so fp32 leaves still get fp32 gradients."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(autocast_cast(t, dtype) for t in tensors)
