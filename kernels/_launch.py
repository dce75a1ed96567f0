"""Launch settings and Triton plumbing shared by every kernel in ``freeflow.kernels``.

One place decides tile sizes, warps and grid shapes, so the op files hold only math. The settings
differ in the Triton interpreter (``TRITON_INTERPRET=1``): there each program instance runs as numpy
ops in Python, so per-op overhead dominates and bigger tiles are faster, while on a GPU the tile is
bounded by registers.

Triton is optional at import time (it is only installable on Linux x86-64): without it the kernels
below are still *defined* (the decorators become no-ops) but never launched, because dispatch
(``_dispatch.use_triton``) falls back to the references.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor
from torch._functorch.utils import unwrap_dead_wrappers

from ._dispatch import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is not installable

    class _NoTriton:
        """Stands in for ``triton``/``triton.language`` so kernel definitions still import."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # bare decorator
            return lambda fn: fn  # decorator factory (autotune, jit(...)) or Config(...)

    triton = tl = _NoTriton()

__all__ = ["triton", "tl", "LOG2E", "interpreting", "apply", "kernel_rule", "saved", "next_power_of_2",
           "last_dim_contiguous", "row_tiles", "reduction_chunks", "elementwise_tiles", "dot_settings",
           "fp32_dot_precision", "FP32_DOT_PRECISIONS"]

# log2(e): kernels run exp/log in base 2 (``exp2``, one MUFU op); a constexpr so @triton.jit code may read it.
LOG2E = tl.constexpr(1.4426950408889634)


def apply(function, *args):
    """``function.apply(*args)`` for the ops' autograd Functions, every argument of ``forward`` given positionally.

    ``Function.apply`` binds the arguments to ``inspect.signature(forward)`` on every call (for defaults and
    keywords): ~20 µs for 7 arguments, ~40 µs for 12 on the development machine, more than the rest of a kernel
    op's host time (``benchmarks/bench_overhead.py``). With all arguments positional the binding
    changes nothing, so outside ``torch.func`` transforms and ``torch.compile`` this calls the C ``apply`` that
    ``Function.apply`` ends in, after the same dead-wrapper unwrapping; inside them ``Function.apply`` itself runs
    (functorch and Dynamo route the call their own way)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*unwrap_dead_wrappers(args))


def plain(t):
    """The underlying tensor of a ``torch.func`` wrapper (identity for ordinary tensors and None)."""
    while isinstance(t, torch.Tensor) and is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def kernel_rule(rule):
    """Decorator for an autograd.Function's ``jvp``/``backward`` that launches kernels.

    Under ``torch.func.jvp``/``grad`` these rules receive functorch-wrapped tensors (and tensors
    they allocate get wrapped too), which have no storage a kernel can write to. The rules compute
    their results only through kernel launches, so running them on the raw values with functorch
    switched off is exact; torch wraps the returned tensors at the right level. Read saved tensors
    through ``saved(ctx)``.
    """

    @functools.wraps(rule)
    def run(ctx, *args):
        with torch._C._DisableFuncTorch():
            return rule(ctx, *map(plain, args))

    return run


def saved(ctx):
    return tuple(map(plain, ctx.saved_tensors))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels take explicit strides for every dim but the last, which must be unit-stride."""
    if t is None or t.stride()[-1] == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


# Shared memory per block (opt-in maximum, bytes) that config pruning assumes when no GPU is visible, and
# the override the compile report (``aot.py``) sets per target arch.
DEFAULT_SMEM_BUDGET = 163 * 1024  # A100; H100 has 227 KB
_smem_override: list[int] = []


@contextlib.contextmanager
def smem_budget_override(nbytes: int):
    _smem_override.append(nbytes)
    try:
        yield
    finally:
        _smem_override.pop()


def smem_budget() -> int:
    """Shared memory a block may use on the current device (the override inside ``smem_budget_override``)."""
    if _smem_override:
        return _smem_override[-1]
    if torch.cuda.is_available():
        return _smem_optin(torch.cuda.current_device())
    return DEFAULT_SMEM_BUDGET


@functools.cache
def _smem_optin(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", DEFAULT_SMEM_BUDGET))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    # A few waves per SM hide latency; in the interpreter 4 is enough to exercise the multi-chunk
    # path of the partial reductions without slowing the tests down.
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def row_tiles(C: int, S: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_C, num_warps) for kernels that normalise whole rows of length C.

    A program holds BLOCK_S full rows: the whole row must be on chip for the LayerNorm statistics.
    On a GPU a tile of ~4K fp32 values keeps every live row tensor in registers (DiT-XL's C = 1152
    pads to 2048 → 2 rows per program); the interpreter takes ~16K values per tile.
    """
    return _row_tiles(C, S, interpreting())


# Launch settings are looked up per launch and a model has a handful of shapes: compute each once.
@functools.lru_cache(maxsize=1024)
def _row_tiles(C: int, S: int, interpreting: bool) -> tuple[int, int, int]:
    BLOCK_C = max(16, next_power_of_2(C))
    budget = 16384 if interpreting else 4096
    BLOCK_S = max(1, min(next_power_of_2(S), budget // BLOCK_C))
    values = BLOCK_S * BLOCK_C
    num_warps = 4 if values <= 1024 else 8 if values <= 2048 else 16  # ≤ 8 fp32 values per thread and tensor
    return BLOCK_S, BLOCK_C, num_warps


@functools.lru_cache(maxsize=1024)
def reduction_chunks(N: int, S: int, BLOCK_S: int, device: torch.device) -> tuple[int, int]:
    """(chunks, tokens_per_chunk) for backward kernels that reduce over the S tokens of a sample.

    Each of the N·chunks programs sums its tokens into its own row of a (N, chunks, C) fp32 buffer,
    then one small torch ``sum`` finishes: no atomics, and the result is deterministic.
    """
    tiles = triton.cdiv(S, BLOCK_S)
    chunks = max(1, min(tiles, triton.cdiv(_programs_wanted(device), N)))
    tokens = triton.cdiv(tiles, chunks) * BLOCK_S
    return triton.cdiv(S, tokens), tokens


def elementwise_tiles(M: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for row-wise elementwise kernels over an (M, C) view."""
    return _elementwise_tiles(M, C, interpreting())


@functools.lru_cache(maxsize=1024)
def _elementwise_tiles(M: int, C: int, interpreting: bool) -> tuple[int, int, int]:
    budget = 16384 if interpreting else 2048
    BLOCK_C = max(16, min(next_power_of_2(C), 1024 if not interpreting else 4096))
    BLOCK_M = max(1, min(next_power_of_2(M), budget // BLOCK_C))
    return BLOCK_M, BLOCK_C, 4 if BLOCK_M * BLOCK_C <= 2048 else 8


FP32_DOT_PRECISIONS = ("tf32x3", "ieee", "tf32")


def fp32_dot_precision() -> str:
    """``tl.dot`` precision for fp32 inputs on a GPU: ``FREEFLOW_FP32_DOT`` (default ``tf32x3``).

    Read on every fp32 launch, unlike the dispatch settings: the compile report and the per-precision attention
    benchmark switch it within one process, and only fp32 attention pays the lookup."""
    return _fp32_dot_precision(os.environ.get("FREEFLOW_FP32_DOT"))


@functools.lru_cache(maxsize=16)
def _fp32_dot_precision(value: str | None) -> str:
    choice = (value or "").strip().lower() or "tf32x3"
    if choice not in FP32_DOT_PRECISIONS:
        raise ValueError(f"FREEFLOW_FP32_DOT must be one of {FP32_DOT_PRECISIONS}, got {choice!r}")
    return choice


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) for kernels built on ``tl.dot``.

    fp16/bf16 feed the tensor cores natively with fp32 accumulation. fp32 on a GPU takes
    ``FREEFLOW_FP32_DOT``: ``tf32x3`` (default) splits each operand into a TF32 head and remainder and sums
    three tensor-core products (error ~2^-21 relative, inside the 1e-4 contract); ``ieee`` runs the products
    on the FMA units, which spill kilobytes at head dim 72 and abort Triton 3.9's LLVM on one config;
    ``tf32`` is one tensor-core product (~2^-11, outside it). Which one compiles
    without spills depends on the Triton release (docs/kernels.md, "fp32 dot precision"), hence the knob.
    The interpreter has no bf16 arithmetic and no tensor cores: operands are upcast to fp32, IEEE products.
    """
    if interpreting():
        return True, "ieee"
    if dtype == torch.float32:
        return True, fp32_dot_precision()
    return False, "tf32"
