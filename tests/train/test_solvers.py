"""Sampling solvers against closed forms: discrete Euler/Heun recursions on a linear field, and the exact
probability-flow ODE of Gaussian data, whose solution from t = 1 to t = 0 is known in closed form."""
import math
import sys

import pytest
import torch

from freeflow import solvers


def gaussian_flow(m, s):
    """Exact velocity of the flow from N(0, 1) (t = 1) to N(m, s²) (t = 0) under x_t = (1-t)·x + t·n.

    Marginals are N((1-t)·m, σ_t²) with σ_t² = (1-t)²s² + t², and the ODE moves each point along its
    quantile, so the sample at t = 0 is exactly m + s·z.
    """
    def v(x, t):
        t = t.view(-1, *([1] * (x.dim() - 1)))
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        return -m + (t - (1 - t) * s ** 2) / var * (x - (1 - t) * m)

    return v


def _z(n=64, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


M, S = 0.7, 0.3


def _error(method, steps):
    z = _z()
    x = solvers.solve(gaussian_flow(M, S), z, method, steps)
    return (x - (M + S * z)).abs().max().item()


# -- time grid ------------------------------------------------------------------------------------

def test_time_grid_uniform_and_shifted():
    t = solvers.time_grid(4, dtype=torch.float64)
    assert t.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = solvers.time_grid(4, shift=3.0, dtype=torch.float64)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert bool((shifted[1:] < shifted[:-1]).all())


# -- discrete closed forms on v = λx ----------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3, 8])
def test_euler_linear_field_matches_recursion(steps):
    lam, z = 0.8, _z()
    x = solvers.euler(lambda x, t: lam * x, z, steps)
    # Each step multiplies by (1 + h·λ) with h = -1/steps.
    torch.testing.assert_close(x, z * (1 - lam / steps) ** steps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_heun_linear_field_matches_recursion(steps):
    lam, z, h = 0.8, _z(), -1.0 / steps
    x = solvers.heun(lambda x, t: lam * x, z, steps)
    # Heun multiplies by 1 + hλ + (hλ)²/2 per step; the last step is Euler (1 + hλ).
    factor = (1 + h * lam + (h * lam) ** 2 / 2) ** (steps - 1) * (1 + h * lam)
    torch.testing.assert_close(x, z * factor, rtol=1e-12, atol=1e-12)


def test_velocity_receives_per_row_times():
    z = _z(n=5).float()
    seen = []

    def v(x, t):
        assert t.shape == (5,) and t.dtype == z.dtype and t.device == z.device
        assert bool((t == t[0]).all())
        seen.append(t[0].item())
        return torch.zeros_like(x)

    solvers.heun(v, z, 4)
    # Predictor at 1, .75, .5, .25 and correctors at .75, .5, .25 — never t = 0.
    assert sorted(seen, reverse=True) == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]


# -- orders of accuracy on the exact Gaussian flow ----------------------------------------------

def test_euler_is_first_order():
    order = math.log2(_error("euler", 32) / _error("euler", 64))
    assert 0.85 < order < 1.15, order


def test_heun_is_second_order():
    errs = [_error("heun", n) for n in (16, 32, 64)]
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(1.8 < o < 2.2 for o in orders), orders
    assert errs[-1] < 1e-3


def test_dopri5_matches_exact_solution():
    z = _z()
    x, nfe = solvers.solve(gaussian_flow(M, S), z, "dopri5", rtol=1e-9, atol=1e-9, return_nfe=True)
    torch.testing.assert_close(x, M + S * z, rtol=0, atol=1e-6)
    assert nfe > 6


def test_dopri5_without_torchdiffeq_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # makes `import torchdiffeq` raise ImportError
    with pytest.raises(ImportError, match="pip install torchdiffeq"):
        solvers.dopri5(lambda x, t: x, _z())


# -- dispatch, NFE, validation ---------------------------------------------------------------------

@pytest.mark.parametrize("method,steps,expected", [("euler", 5, 5), ("heun", 5, 9), ("heun", 1, 1)])
def test_solve_counts_nfe_and_matches_direct_call(method, steps, expected):
    v, z = gaussian_flow(M, S), _z()
    x, nfe = solvers.solve(v, z, method, steps, return_nfe=True)
    assert nfe == expected == solvers.nfe(method, steps)
    torch.testing.assert_close(x, getattr(solvers, method)(v, z, steps), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,name", [
    (dict(method="rk4", steps=4), "method"),
    (dict(method="heun", steps=0), "steps"),
    (dict(method="heun", steps=2.0), "steps"),
    (dict(method="euler", steps=True), "steps"),
    (dict(method="euler", steps=None), "steps"),
    (dict(method="dopri5", steps=4), "steps"),
    (dict(method="euler", steps=4, shift=0.0), "shift"),
    (dict(method="dopri5", rtol=-1.0), "rtol"),
])
def test_solve_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        solvers.solve(lambda x, t: x, _z(), **kwargs)


def test_solve_rejects_bad_field_and_noise():
    with pytest.raises(ValueError, match="v must be callable"):
        solvers.solve(None, _z(), "euler", 2)
    with pytest.raises(ValueError, match="z must"):
        solvers.solve(lambda x, t: x, [1.0, 2.0], "euler", 2)
    with pytest.raises(ValueError, match="z must"):
        solvers.solve(lambda x, t: x, torch.zeros(3, dtype=torch.long), "euler", 2)


def test_t_start_integrates_the_remaining_interval_only():
    """From an exact intermediate state x(t0) the solvers reach the exact endpoint of the linear field."""
    import math

    from freeflow.solvers import solve

    a = 0.7  # dx/dt = a·x: x(t) = x(1)·exp(a(t - 1))
    z = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = 0.4
    x_t0 = z * math.exp(a * (t0 - 1.0))
    want = z * math.exp(-a)
    # heun's last step is Euler: its local error (a·h)²/2·|x| ≈ 2e-5 at h = 0.008 bounds the total
    for method, steps, tol in (("euler", 400, 1e-3), ("heun", 50, 5e-5), ("dopri5", None, 1e-7)):
        got = solve(lambda x, t: a * x, x_t0, method, steps, t_start=t0, rtol=1e-9, atol=1e-9)
        assert (got - want).abs().max().item() < tol, method
    with pytest.raises(ValueError, match="t_start must be"):
        solve(lambda x, t: x, z, "euler", 2, t_start=1.5)
