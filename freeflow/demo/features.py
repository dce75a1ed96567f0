"""The demo's FD space: ``MnistFeatureNet``, a compact CNN classifier trained on the bundled digits.

The demo cannot ship Inception, so its quality figure is an FID analogue: the penultimate activations of
``MnistFeatureNet`` are modelled as a Gaussian and compared (``freeflow.frechet``) with the statistics of
the 5,000 real digits. Images are tensors ``(N, 1, 28, 28)`` in ``[-1, 1]``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..frechet import frechet_distance
from . import ASSETS_DIR, FEATURE_NET_FILE, IMAGE_SHAPE, STATS_FILE
from .data import random_shift, split_indices


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
                                "`python -m freeflow.demo.assets --what features`")
    payload = torch.load(str(path), map_location="cpu", weights_only=True)
    net = MnistFeatureNet(**payload["config"])
    net.load_state_dict(payload["state_dict"])
    return net.eval()


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
                                "`python -m freeflow.demo.assets --what stats`")
    with np.load(str(path)) as data:
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def mnist_fd(images: torch.Tensor, *, net: nn.Module | None = None, stats=None, batch_size: int = 500) -> float:
    """FD of ``images`` (N, 1, 28, 28) in [-1, 1] to the real digits (bundled net and stats by default).

    FD is biased upwards at small N; compare figures at the same N (the demo uses 2,000).
    """
    net = load_feature_net() if net is None else net
    mu_ref, sigma_ref = load_reference_stats() if stats is None else stats
    mu, sigma = feature_statistics(net, images, batch_size)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


@dataclass
class FeatureNetResult:
    net: MnistFeatureNet
    heldout_accuracy: float
    train_accuracy: float
    seconds: float
    losses: list = field(default_factory=list)


def _accuracy(net, images, labels):
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(chunk).argmax(1) for chunk in images.split(500)])
    return (pred == labels).float().mean().item()


def train_feature_net(images, labels, *, epochs=10, batch_size=128, lr=1e-3, holdout=500, max_shift=2,
                      seed=0, net_kwargs=None, log=print) -> FeatureNetResult:
    """Train ``MnistFeatureNet`` on a seeded split with random-shift augmentation; report held-out accuracy."""
    if epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    torch.manual_seed(seed)
    net = MnistFeatureNet(**(net_kwargs or {}))
    train_idx, held_idx = split_indices(len(images), holdout, seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    total = epochs * math.ceil(len(train_idx) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    losses, start = [], time.time()
    for epoch in range(epochs):
        net.train()
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for batch in order.split(batch_size):
            x = random_shift(images[batch], max_shift, g)
            loss = F.cross_entropy(net(x), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        log(f"[features] epoch {epoch + 1}/{epochs} loss {np.mean(losses[-len(order) // batch_size:]):.4f}")
    heldout = _accuracy(net, images[held_idx], labels[held_idx])
    train = _accuracy(net, images[train_idx], labels[train_idx])
    return FeatureNetResult(net.eval(), heldout, train, time.time() - start, losses)
