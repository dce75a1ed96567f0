"""The Triton ops as ``torch.library`` custom ops in the ``freeflow`` namespace: what ``torch.compile`` sees.

Dynamo cannot trace an ``autograd.Function`` that defines ``jvp`` ("Unsupported custom jvp"), and every Triton op
carries one for ``torch.func.jvp`` / ``forward_ad``. So each op is also registered as an opaque custom op
(``freeflow::<op>``) with a fake implementation (output shapes and dtypes for tracing) and its autograd through
``register_autograd``, whose backward is another custom op (``freeflow::<op>_backward``) wrapping the same
backward launch wrapper. A compiled graph holds these ops as single nodes that call the launch wrappers.

Why ``custom_op`` and not ``triton_op`` / ``wrap_triton``: our kernels are launched by wrappers that pick tiles,
warps and reduction chunks per shape (``_launch``), and attention's kernels use ``@triton.autotune`` with
``early_config_prune`` and ``@triton.heuristics``; ``wrap_triton`` would have to trace that host logic. An opaque
op keeps one launch path, the same code eager and compiled; what it gives up, Inductor fusing into or across the
kernels, it did not have before either.

Dispatch (``use_library_op``): the public ops call the custom op while tracing (Dynamo, ``torch.export``,
``make_fx``) and the ``autograd.Function`` through ``_launch.apply`` otherwise. Eager calls keep the Function
for two reasons: it carries the ``jvp`` rule that forward-mode AD needs (``torch.func.jvp``, ``forward_ad``,
custom ops have no forward-AD registration), and measured on the host it costs less per call than the custom
op's dispatcher round trip and generated ``autograd.Function`` (docs/kernels.md, "torch.compile and
torch.library"). ``forward_ad_active`` is the check an op needs when it must know whether a tangent may be asked
of it (attention's primal fast path); it is traceable by Dynamo outside forward-mode AD.

Conventions of the ops here: every argument positional; outputs never alias inputs (a gradient that passes
straight through is returned by the autograd formula, not by the op); an output that is absent by structure (a
zero tangent, the gradient of an absent bias) is a 0-element tensor (``absent``), which the public op turns back
into None from the same structural rule.
"""
from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
from torch._C._functorch import is_functorch_wrapped_tensor

NAMESPACE = "freeflow"
# Every op defined here, by name (the tests opcheck each; the C++ extension's ``freeflow::`` ops are not in it).
OPS: dict[str, torch._ops.OpOverload] = {}

__all__ = ["NAMESPACE", "OPS", "absent", "autograd_inside_op", "define_op", "forward_ad_active", "input_grads",
           "use_library_op"]


def forward_ad_active(*tensors: torch.Tensor | None) -> bool:
    """True when forward-mode AD may ask an op for a tangent: an input is a dual tensor (``forward_ad``,
    ``torch.func.jvp``) or lives inside a ``torch.func`` transform (whose levels may carry tangents that
    ``unpack_dual`` at this level does not see).

    Under Dynamo with no ``torch.func`` transform and no dual level active it is False without looking at the
    tensors: Dynamo cannot trace ``is_functorch_wrapped_tensor`` (a graph break, fatal under ``fullgraph=True``),
    and a compiled DiT must reach attention's primal fast path. With one active the checks below run as in eager
    code, graph break included: a compiled region then falls back to eager for it, as before the ops were
    registered (the custom ops have no forward-AD rule a compiled region could use instead)."""
    if torch.compiler.is_compiling() and not (torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0):
        return False
    if any(is_functorch_wrapped_tensor(t) for t in tensors if t is not None):
        return True
    # outside every forward_ad.dual_level() no tensor can be dual: skip the unpack_dual calls
    return fwAD._current_level >= 0 and any(fwAD.unpack_dual(t).tangent is not None
                                            for t in tensors if t is not None)


_FAKE, _PROXY = torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY


def use_library_op() -> bool:
    """True when a public op should call its ``freeflow::`` custom op rather than its ``autograd.Function``:
    under Dynamo or ``torch.export``, and under the tracers that run ops on fake or proxy tensors without Dynamo
    (``make_fx``, ``aot_function``, a ``FakeTensorMode``), where a Function's forward would launch a kernel on
    tensors that have no data. ~0.4 µs per call."""
    return (torch.compiler.is_compiling() or torch._C._get_dispatch_mode(_PROXY) is not None
            or torch._C._get_dispatch_mode(_FAKE) is not None)


def absent(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an output that is absent by structure (custom ops cannot return None)."""
    return like.new_empty(0)


def _autograd_keys():
    """The dispatch keys a custom op's autograd kernel excludes while it runs the implementation below autograd."""
    outside = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._AutoDispatchBelowAutograd():
        return torch._C._dispatch_tls_local_exclude_set() - outside


_AUTOGRAD_KEYS = _autograd_keys()


@contextlib.contextmanager
def autograd_inside_op():
    """Autograd back on inside an op implementation, for one that differentiates something itself (attention's
    flash-attn backward falls back to SDPA's backward, which recomputes O under autograd). The custom op's autograd
    kernel runs every implementation with autograd's dispatch keys excluded, even with no gradient asked of the op,
    so a graph recorded there would be empty; ``enable_grad`` alone does not undo that."""
    include, exclude = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude - _AUTOGRAD_KEYS), torch.enable_grad():
        yield


def input_grads(ctx, *grads):
    """A ``register_autograd`` backward's result: ``grads`` for the leading inputs, kept only where an input needs
    one, and None for the rest (tangents, eps). One formula then serves an op and its ``_jvp`` twin, whose extra
    inputs are the tangents."""
    need = ctx.needs_input_grad
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * (len(need) - len(grads))


def define_op(name: str, schema: str, impl, fake, *, backward=None, setup_context=None):
    """Register ``freeflow::name`` with ``schema`` (e.g. ``"(Tensor x, float eps) -> (Tensor, Tensor)"``), its
    implementation and fake, and (given ``backward``) its autograd; returns the op's default overload.

    Callers call the overload itself: ``CustomOpDef.__call__`` adds a Python layer per call. Importing the package
    twice (the ``freeflow/kernels`` symlink makes ``kernels`` importable on its own from the repository root)
    finds the op defined already; that registration is kept, its implementation is the same code."""
    namespace = getattr(torch.ops, NAMESPACE)
    if not hasattr(namespace, name):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
    OPS[name] = getattr(namespace, name).default
    return OPS[name]
