"""Sampling ODE solvers in the internal convention: ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` (data).

Every solver takes a velocity callable ``v(x, t)`` with ``x`` shaped like ``z`` and ``t`` a ``(N,)`` tensor
(one time per row, dtype and device of ``z``), and returns the sample at ``t = 0``. They run under
``torch.no_grad()``: they are samplers, and a graph through dozens of network calls would only cost memory.

Number of function evaluations (NFE) for ``steps`` steps:

    euler   steps
    heun    2·steps - 1   (the last step is a plain Euler step, see ``heun``)
    dopri5  adaptive      (count it with ``solve(..., return_nfe=True)``)

Depends on torch only; ``dopri5`` imports torchdiffeq when called.
"""
from __future__ import annotations

import torch

METHODS = ("euler", "heun", "dopri5")


# ---------------------------------------------------------------------------------------------
#                                        Validation
# ---------------------------------------------------------------------------------------------

def _check_field(v, z):
    if not callable(v):
        raise ValueError(f"v must be callable as v(x, t), got {type(v).__name__}")
    if not isinstance(z, torch.Tensor) or z.dim() < 1 or z.shape[0] < 1:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a tensor (N, ...) with N >= 1, got {got}")
    if not z.is_floating_point():
        raise ValueError(f"z must be a floating-point tensor, got dtype {z.dtype}")


def _check_steps(steps):
    # bool is an int subclass; True would silently mean one step.
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def _check_t_start(t_start):
    if not isinstance(t_start, (int, float)) or isinstance(t_start, bool) or not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be a number in (0, 1], got {t_start!r}")


def _check_shift(shift):
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not shift > 0:
        raise ValueError(f"shift must be a positive number, got {shift!r}")


# ---------------------------------------------------------------------------------------------
#                                        Time grid
# ---------------------------------------------------------------------------------------------

def time_grid(steps: int, *, shift: float = 1.0, t_start: float = 1.0, device=None,
              dtype=torch.float32) -> torch.Tensor:
    """``steps + 1`` times from ``t_start`` down to 0 (exactly), uniform in ``s`` and mapped by
    ``t = t_start·shift·s / (1 + (shift - 1)·s)``.

    ``shift > 1`` spends more steps near the noise end (the SD3 / SiT "time shift"); ``shift = 1`` is uniform.
    ``t_start < 1`` starts from an intermediate state (e.g. a student's jump to ``t = 1 - δ``).
    """
    _check_steps(steps)
    _check_shift(shift)
    _check_t_start(t_start)
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = t_start * shift * s / (1.0 + (shift - 1.0) * s)
    # Pin the ends so the last step lands on t = 0 exactly whatever the rounding.
    t[0], t[-1] = t_start, 0.0
    return t.to(device=device, dtype=dtype)


def _times(t, z):
    return torch.full((z.shape[0],), float(t), dtype=z.dtype, device=z.device)


# ---------------------------------------------------------------------------------------------
#                                        Fixed-step solvers
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def euler(v, z: torch.Tensor, steps: int, *, shift: float = 1.0, t_start: float = 1.0) -> torch.Tensor:
    """Explicit Euler from t = 1 to t = 0 on ``time_grid(steps, shift)``; NFE = ``steps``."""
    _check_field(v, z)
    grid = time_grid(steps, shift=shift, t_start=t_start, dtype=torch.float64).tolist()
    x = z
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * v(x, _times(t, x))
    return x


@torch.no_grad()
def heun(v, z: torch.Tensor, steps: int, *, shift: float = 1.0, t_start: float = 1.0) -> torch.Tensor:
    """Heun's second-order method (explicit trapezoid) from t = 1 to t = 0; NFE = ``2·steps - 1``.

    The last step is a plain Euler step, as in EDM's sampler: its corrector would evaluate ``v`` at
    ``t = 0`` exactly, where a trained flow model is degenerate — at ``t = 0`` the noise is independent
    of ``x_t`` so the network learns ``v(x, 0) ≈ -x``, not the limit of ``v`` along the trajectory.
    Consequently ``heun(v, z, 1)`` is one Euler step, and the global order is 2 only up to that last
    step's O(h²) local error (still O(h²) globally).
    """
    _check_field(v, z)
    grid = time_grid(steps, shift=shift, t_start=t_start, dtype=torch.float64).tolist()
    x = z
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        d = v(x, _times(t, x))
        x_pred = x + h * d
        if t_next == 0.0:
            x = x_pred
        else:
            x = x + 0.5 * h * (d + v(x_pred, _times(t_next, x)))
    return x


# ---------------------------------------------------------------------------------------------
#                                        Adaptive solver
# ---------------------------------------------------------------------------------------------

def _torchdiffeq():
    try:
        import torchdiffeq
    except ImportError as e:
        raise ImportError("method 'dopri5' needs torchdiffeq: pip install torchdiffeq "
                          "(or pip install 'freeflow[sample]')") from e
    return torchdiffeq


@torch.no_grad()
def dopri5(v, z: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5, t_end: float = 0.0,
           t_start: float = 1.0) -> torch.Tensor:
    """Adaptive Dormand–Prince 5(4) (torchdiffeq) from ``t_start`` (default 1) to ``t_end``.

    The FSAL stage of the last accepted step evaluates ``v`` at ``t_end``; with ``t_end = 0`` that is the
    degenerate point described in ``heun`` (it only enters the error estimate, but can force small steps),
    so samplers of trained models may prefer e.g. ``t_end = 1e-3``.
    """
    _check_field(v, z)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
            raise ValueError(f"{name} must be a positive number, got {tol!r}")
    if not isinstance(t_end, (int, float)) or not 0.0 <= t_end < 1.0:
        raise ValueError(f"t_end must be a number in [0, 1), got {t_end!r}")
    odeint = _torchdiffeq().odeint

    def rhs(t, x):
        return v(x, t.to(x.dtype).expand(x.shape[0]))

    _check_t_start(t_start)
    if not t_end < t_start:
        raise ValueError(f"t_end must be below t_start, got t_end={t_end!r}, t_start={t_start!r}")
    ts = torch.tensor([float(t_start), float(t_end)], dtype=z.dtype, device=z.device)
    return odeint(rhs, z, ts, rtol=rtol, atol=atol, method="dopri5")[-1]


# ---------------------------------------------------------------------------------------------
#                                        Dispatch
# ---------------------------------------------------------------------------------------------

def nfe(method: str, steps: int) -> int:
    """Function evaluations of a fixed-step method (``dopri5`` is adaptive: count it with ``solve``)."""
    _check_steps(steps)
    if method == "euler":
        return steps
    if method == "heun":
        return 2 * steps - 1
    raise ValueError(f"method must be 'euler' or 'heun' for a fixed NFE, got {method!r}")


class _Counted:
    """Wraps a velocity field and counts calls (one call = one NFE, whatever the batch)."""

    def __init__(self, v):
        self.v, self.calls = v, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.v(x, t)


def solve(v, z: torch.Tensor, method: str = "heun", steps: int | None = None, *, shift: float = 1.0,
          rtol: float = 1e-5, atol: float = 1e-5, t_start: float = 1.0, return_nfe: bool = False):
    """Integrate ``dx/dt = v(x, t)`` from ``t_start`` (default 1) to 0 with ``method`` in {"euler", "heun", "dopri5"}.

    ``steps`` is required by the fixed-step methods and must be None for ``dopri5`` (whose accuracy is
    set by ``rtol``/``atol``). Returns the sample, or ``(sample, nfe)`` with ``return_nfe=True``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_field(v, z)
    counted = _Counted(v)
    if method == "dopri5":
        if steps is not None:
            raise ValueError(f"steps must be None for the adaptive method 'dopri5', got {steps!r}")
        x = dopri5(counted, z, rtol=rtol, atol=atol, t_start=t_start)
    else:
        _check_steps(steps)
        x = (euler if method == "euler" else heun)(counted, z, steps, shift=shift, t_start=t_start)
    return (x, counted.calls) if return_nfe else x
