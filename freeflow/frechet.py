"""Fréchet distance between Gaussians fitted to features (the FID formula), in float64.

    FD = ‖μ₁ - μ₂‖² + tr Σ₁ + tr Σ₂ - 2·tr (Σ₁^½ Σ₂ Σ₁^½)^½

Feature-space agnostic: the MNIST demo uses a small bundled classifier (``freeflow.demo.features``);
ImageNet evaluation uses Inception-v3 pool features.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_float64(name, a, ndim):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds non-finite values")
    return a


def _psd_eigvals(w):
    """Eigenvalues of a PSD matrix with the round-off ones set to 0.

    Below ``d·ε·max(w)`` (numpy's ``matrix_rank`` tolerance) an eigenvalue is round-off of either sign. Its square
    root would not be: ~1e-8 for 1e-16, added once per null direction of a singular Σ, enough to make the distance
    depend on the argument order and on the BLAS build in the 8th digit."""
    w = np.asarray(w)
    tol = w.shape[0] * np.finfo(np.float64).eps * max(float(w.max()), 0.0)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma):
    """Symmetric square root of a (numerically) PSD matrix; round-off eigenvalues → 0."""
    w, q = np.linalg.eigh(0.5 * (sigma + sigma.T))
    return (q * np.sqrt(_psd_eigvals(w))) @ q.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein²) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64.

    The trace term uses the symmetric form tr (Σ₁^½ Σ₂ Σ₁^½)^½ — its eigenvalues are real and ≥ 0, so
    unlike ``scipy.linalg.sqrtm(Σ₁Σ₂)`` it needs no complex arithmetic nor an ε·I fix for singular Σ.
    Accepts numpy arrays or torch tensors.
    """
    mu1, mu2 = _as_float64("mu1", mu1, 1), _as_float64("mu2", mu2, 1)
    sigma1, sigma2 = _as_float64("sigma1", sigma1, 2), _as_float64("sigma2", sigma2, 2)
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"mu2 must have shape ({d},) like mu1, got {mu2.shape}")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match mu1, got {s.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    trace_sqrt = np.sqrt(_psd_eigvals(eig)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    # Round-off can push identical distributions a hair below zero.
    return float(max(fd, 0.0))
