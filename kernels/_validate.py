"""Argument checks shared by the ops: every failure names the argument and what was expected."""
from __future__ import annotations

import torch


def check_tensor(name: str, t, *, rank: int | None = None, min_rank: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")
    if min_rank is not None and t.dim() < min_rank:
        raise ValueError(f"{name} must have rank >= {min_rank}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_shape(name: str, t, shape) -> None:
    """``shape`` is a tuple or a ``torch.Size``. Checked on every op call: the common case costs two attribute
    reads and one comparison; ``check_tensor`` runs only to word a failure."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        check_tensor(name, t)
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_tangents(pairs) -> None:
    """Each (name, tangent, primal): a tangent is None (zero) or has its primal's shape."""
    for name, tangent, primal in pairs:
        if tangent is not None:
            check_shape(name, tangent, primal.shape)


def check_modulation(x, x_name: str, **cond) -> None:
    """x is (N, S, C) tokens; each conditioning tensor is (N, C), one row per sample."""
    check_tensor(x_name, x, rank=3)
    n, _, c = x.shape
    for name, t in cond.items():
        check_shape(name, t, (n, c))


def check_same_dtype(x, x_name: str, pairs) -> None:
    """Each (name, tensor) of ``pairs`` is None or has x's dtype: the kernels write their outputs in x's dtype."""
    dtype = x.dtype
    for name, t in pairs:
        if t is not None and t.dtype != dtype:
            raise ValueError(f"{name} must have {x_name}'s dtype {dtype} on the Triton path, got {t.dtype}")


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """Math dtype for references: low-precision storage is computed in fp32, like the kernels."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def zeros_if_none(t, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.zeros_like(like, dtype=dtype) if t is None else t


def detached(t):
    """``t.detach()``, None for None: tangents enter the fused Functions as constants."""
    return None if t is None else t.detach()
