"""``python -m freeflow.sample``: samples from a FreeFlow student or a teacher, as a PNG grid and/or an
ADM-style ``.npz`` (``arr_0``: uint8 ``[N, H, W, 3]``), on one process or several (``torchrun``).

Modes:
  student   one step, ``x = z - F_θ(z, 1)`` (1 NFE)
  handoff   the student jumps from t = 1 to t = 1 - δ, the teacher integrates the rest (few-step).
            FreeFlow's student maps only from the noise end (its time input is fixed at t = 1), so there is
            no flow-map jump from an intermediate time to compose; the teacher finishes instead.
  teacher   the teacher's ODE with CFG (Euler, Heun, or torchdiffeq's dopri5)

Latent models (4 channels) are decoded with diffusers' ``AutoencoderKL`` from a local ``--vae`` folder.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from .distill import TeacherAdapter
from .distributed import init_processes
from .models import FlowMapStudent, load_checkpoint
from .viz import save_grid, to_uint8

SD_VAE_SCALE = 0.18215  # latent scaling of the SD VAE used by DiT/SiT/REPA


def build_parser():
    p = argparse.ArgumentParser(prog="python -m freeflow.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("student", "handoff", "teacher"), default="student")
    p.add_argument("--student", default="", help="student checkpoint (FreeFlow official or student_ema.pt of a run)")
    p.add_argument("--teacher", default="", help="teacher checkpoint (teacher and handoff modes)")
    p.add_argument("--family", default="", help="override the inferred family of --teacher")
    p.add_argument("--num-samples", dest="n", type=int, default=64, help="number of samples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gw", type=float, default=1.5, help="guidance weight γ")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    p.add_argument("--solver", choices=("euler", "heun", "dopri5"), default="heun")
    p.add_argument("--steps", type=int, default=32, help="teacher steps (teacher and handoff modes)")
    p.add_argument("--delta", type=float, default=0.5, help="handoff: the student's jump δ (to t = 1 - δ)")
    p.add_argument("--class-label", type=int, default=-1, help="one class for all samples (-1: random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default="", help="local diffusers AutoencoderKL folder (latent models)")
    p.add_argument("--png", default="samples.png", help="grid output ('' to skip)")
    p.add_argument("--npz", default="", help="ADM-style .npz output ('' to skip)")
    p.add_argument("--nrow", type=int, default=8)
    return p


def validate(a):
    if a.n < 1 or a.batch_size < 1 or a.steps < 1:
        raise ValueError("--num-samples, --batch-size and --steps must be positive, "
                         f"got {a.n}, {a.batch_size}, {a.steps}")
    if a.mode in ("student", "handoff") and not a.student:
        raise ValueError(f"--mode {a.mode} needs --student PATH")
    if a.mode in ("teacher", "handoff") and not a.teacher:
        raise ValueError(f"--mode {a.mode} needs --teacher PATH")
    if not 0.0 < a.delta < 1.0 and a.mode == "handoff":
        raise ValueError(f"--delta must be in (0, 1) for handoff, got {a.delta}")
    lo, hi = a.guidance_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--guidance-interval must satisfy 0 <= LO <= HI <= 1, got {a.guidance_interval}")
    if not a.png and not a.npz:
        raise ValueError("nothing to write: give --png and/or --npz")


class Sampler:
    """Holds the loaded networks; ``__call__(z, y)`` → samples in model space."""

    def __init__(self, a, device):
        self.a = a
        self.student = self.teacher = None
        if a.student:
            net = load_checkpoint(a.student).to(device).eval()
            self.student = FlowMapStudent(net)
            self.config = net.config
        if a.teacher:
            model = load_checkpoint(a.teacher, family=a.family or None).to(device).eval()
            self.teacher = TeacherAdapter(model, model.config.num_classes)
            self.config = model.config

    @torch.no_grad()
    def __call__(self, z, y):
        a = self.a
        gw = torch.full((z.shape[0],), a.gw, device=z.device)
        if a.mode == "student":
            return self.student.sample(z, y, gw)
        solver = dict(method=a.solver, steps=a.steps, interval=tuple(a.guidance_interval))
        if a.mode == "teacher":
            return self.teacher.sample(z, y, gw, **solver)
        x = self.student.sample(z, y, gw, delta=torch.full_like(gw, a.delta))
        return self.teacher.sample(x, y, gw, t_start=1.0 - a.delta, **solver)


def decode(x, vae):
    if vae is None:
        return x
    return vae.decode(x / SD_VAE_SCALE).sample


def load_vae(path, device):
    if not path:
        return None
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise ValueError("--vae needs the diffusers package (pip install diffusers)") from e
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--vae {path!r} is not a local folder with an AutoencoderKL")
    return AutoencoderKL.from_pretrained(path).to(device).eval()


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        validate(a)
    except ValueError as e:
        print(f"python -m freeflow.sample: error: {e}", file=sys.stderr)
        return 2
    procs = init_processes()
    device, rank, world = procs.device, procs.rank, procs.world
    sampler = Sampler(a, device)
    vae = load_vae(a.vae, device)
    cfg = sampler.config
    shape = (cfg.in_channels, *(g * cfg.patch_size for g in cfg.grid))
    # Every rank draws the same global stream and keeps its own rows: results do not depend on world size.
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    z_all = torch.randn(a.n, *shape, generator=g)
    y_all = (torch.full((a.n,), a.class_label) if a.class_label >= 0
             else torch.randint(0, cfg.num_classes, (a.n,), generator=g))
    mine = procs.rows(a.n)
    parts = []
    for i in range(0, len(mine), a.batch_size):
        idx = mine[i: i + a.batch_size]
        x = decode(sampler(z_all[idx].to(device), y_all[idx].to(device)), vae)
        parts.append(x.float())
    local = torch.cat(parts) if parts else torch.empty(0, *shape, device=device)
    images = _gather(local, a.n, world).cpu()
    if rank == 0:
        if images.shape[1] not in (1, 3):
            print("[freeflow] latent samples without --vae: writing the first three channels", file=sys.stderr)
            images = images[:, :3]
        if a.png:
            save_grid(images[: a.nrow * a.nrow], a.png, a.nrow)
        if a.npz:
            arr = to_uint8(images)
            arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
            np.savez(a.npz, arr_0=arr)
        print(f"[freeflow] wrote {a.n} samples: {', '.join(p for p in (a.png, a.npz) if p)}")
    procs.close()
    return 0


def _gather(local, n, world):
    """Rows of every rank back in global order (on the collective's device: NCCL needs CUDA tensors)."""
    if world == 1:
        return local
    sizes = [len(range(r, n, world)) for r in range(world)]
    padded = local.new_zeros(max(sizes), *local.shape[1:])
    padded[: len(local)] = local
    chunks = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    out = local.new_empty(n, *local.shape[1:])
    for r in range(world):
        out[torch.arange(r, n, world)] = chunks[r][: sizes[r]]
    return out


if __name__ == "__main__":
    sys.exit(main())
