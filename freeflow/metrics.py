"""Fréchet distance (FD) of MNIST-like images in the feature space of a small bundled classifier.

The demo cannot ship Inception, so its quality figure is an FID analogue: the penultimate activations of
``MnistFeatureNet`` (a compact CNN trained on the bundled digits, see ``freeflow/assets/README.md``) are
modelled as a Gaussian, and samples are compared with the statistics of the 5,000 real digits:

    FD = ‖μ₁ - μ₂‖² + tr Σ₁ + tr Σ₂ - 2·tr (Σ₁^½ Σ₂ Σ₁^½)^½

Images follow the project convention: tensors ``(N, 1, 28, 28)`` in ``[-1, 1]``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
FEATURE_NET_FILE = "mnist_features.pt"
STATS_FILE = "mnist_feature_stats.npz"
IMAGE_SHAPE = (1, 28, 28)


# ---------------------------------------------------------------------------------------------
#                                     Feature network
# ---------------------------------------------------------------------------------------------

class MnistFeatureNet(nn.Module):
    """LeNet-style CNN: two conv-ReLU-pool stages, a conv at 7×7, a ``feature_dim`` FC layer (the FD
    space, after ReLU as in FID's pooled features), and a linear classifier head."""

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 128, num_classes: int = 10,
                 dropout: float = 0.3):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        if c1 < 1 or c2 < 1:
            raise ValueError(f"channels must be two positive ints, got {channels!r}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        self.config = dict(channels=[c1, c2], feature_dim=int(feature_dim), num_classes=int(num_classes),
                           dropout=float(dropout))
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 7 * 7, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) in [-1, 1] → (N, feature_dim)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.drop(self.features(x)))


def save_feature_net(net: MnistFeatureNet, path) -> None:
    """State dict + config as plain tensors/containers, so ``torch.load(weights_only=True)`` reads it."""
    torch.save({"config": net.config, "state_dict": net.state_dict()}, str(path))


def load_feature_net(path=None) -> MnistFeatureNet:
    """The bundled feature network (or one saved with ``save_feature_net``), in eval mode on CPU."""
    path = Path(path) if path is not None else ASSETS_DIR / FEATURE_NET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"feature network {str(path)!r} not found; build it with "
                                "`python -m freeflow.pretrain --what features`")
    payload = torch.load(str(path), map_location="cpu", weights_only=True)
    net = MnistFeatureNet(**payload["config"])
    net.load_state_dict(payload["state_dict"])
    return net.eval()


# ---------------------------------------------------------------------------------------------
#                                     Statistics
# ---------------------------------------------------------------------------------------------

def _check_images(images):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (N, 1, 28, 28) in [-1, 1], got {got}")
    if images.shape[0] < 2:
        raise ValueError(f"images must hold at least 2 samples for a covariance, got {images.shape[0]}")


@torch.no_grad()
def extract_features(net: nn.Module, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Features (N, d) in float64. Images are clamped to [-1, 1] first, as a saved image would be,
    so a sampler's slight overshoot is not scored as a feature shift."""
    _check_images(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    was_training = net.training
    net.eval()
    try:
        feats = [net.features(chunk.float().clamp(-1, 1)).double().cpu()
                 for chunk in images.split(batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(feats).numpy()


def feature_statistics(net: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(μ (d,), Σ (d, d)) of the features of ``images``, float64; Σ unbiased (ddof 1), as pytorch-fid."""
    f = extract_features(net, images, batch_size)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def load_reference_stats(path=None) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of the real digits' features, from the bundled ``mnist_feature_stats.npz``."""
    path = Path(path) if path is not None else ASSETS_DIR / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"feature statistics {str(path)!r} not found; build them with "
                                "`python -m freeflow.pretrain --what stats`")
    with np.load(str(path)) as data:
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


# ---------------------------------------------------------------------------------------------
#                                     Fréchet distance
# ---------------------------------------------------------------------------------------------

def _as_float64(name, a, ndim):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds non-finite values")
    return a


def _psd_sqrt(sigma):
    """Symmetric square root of a (numerically) PSD matrix; round-off negative eigenvalues → 0."""
    w, q = np.linalg.eigh(0.5 * (sigma + sigma.T))
    return (q * np.sqrt(np.clip(w, 0.0, None))) @ q.T


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
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    # Round-off can push identical distributions a hair below zero.
    return float(max(fd, 0.0))


def mnist_fd(images: torch.Tensor, *, net: nn.Module | None = None, stats=None, batch_size: int = 500) -> float:
    """FD of ``images`` (N, 1, 28, 28) in [-1, 1] to the real digits (bundled net and stats by default).

    FD is biased upwards at small N; compare figures at the same N (the demo uses 2,000).
    """
    net = load_feature_net() if net is None else net
    mu_ref, sigma_ref = load_reference_stats() if stats is None else stats
    mu, sigma = feature_statistics(net, images, batch_size)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
