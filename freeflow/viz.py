"""PNG output: image grids (PIL), loss curves (matplotlib, optional), and latents decoded through the VAE."""
from __future__ import annotations

import os

import numpy as np
import torch

from .runlog import read_metrics

TITLE_HEIGHT = 16  # pixels above a grid for its title (PIL's default bitmap font is 11 px high)

SD_VAE_SCALE = 0.18215  # latent scaling of the SD VAE used by DiT/SiT/REPA


def load_vae(path, device):
    """diffusers' ``AutoencoderKL`` from a local folder (None for ``''``); errors name ``--vae``."""
    if not path:
        return None
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise ValueError("--vae needs the diffusers package (pip install 'freeflow[vae]')") from e
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--vae {path!r} is not a local folder with an AutoencoderKL")
    return AutoencoderKL.from_pretrained(path).to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(x, vae):
    """Latents → images in [-1, 1] through the VAE (``x`` itself when ``vae`` is None)."""
    if vae is None:
        return x
    return vae.decode(x / SD_VAE_SCALE).sample


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, C) uint8, as ADM's .npz convention."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (H', W', 3) uint8 array, ``nrow`` per row."""
    arr = to_uint8(images)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    n, h, w, _ = arr.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str, nrow: int, title: str | None = None) -> None:
    """A PNG grid of ``images`` (N, C, H, W) in [-1, 1], ``nrow`` per row, with an optional title strip."""
    from PIL import Image, ImageDraw

    grid = Image.fromarray(image_grid(images, nrow))
    if title:
        canvas = Image.new("RGB", (grid.width, grid.height + TITLE_HEIGHT), "white")
        canvas.paste(grid, (0, TITLE_HEIGHT))
        ImageDraw.Draw(canvas).text((4, 3), title, fill="black")
        grid = canvas
    grid.save(path)


def plot_losses(metrics_path: str, path: str, keys=("pred_loss", "corr_loss", "aux_loss")) -> bool:
    """Loss curves from a metrics JSONL file; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in read_metrics(metrics_path) if "step" in r and all(k in r for k in keys)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, k in zip(np.atleast_1d(axes), keys):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows])
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
