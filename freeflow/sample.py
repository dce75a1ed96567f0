"""``python -m freeflow.sample``: samples from a FreeFlow student or a teacher, as a PNG grid and/or an
ADM-style ``.npz`` (``arr_0``: uint8 ``[N, H, W, 3]``, ``arr_1``: int64 class labels ``[N]``), on one process
or several (``torchrun``).

Modes:
  student   one step, ``x = z - F_θ(z, 1)`` (1 NFE)
  handoff   the student jumps from t = 1 to t = 1 - δ, the teacher integrates the rest (few-step).
            FreeFlow's student maps only from the noise end (its time input is fixed at t = 1), so there is
            no flow-map jump from an intermediate time to compose; the teacher finishes instead.
  teacher   the teacher's ODE with CFG (Euler, Heun, or torchdiffeq's dopri5)
  search    inference-time noise search (``freeflow.search``): the student draws ``--candidates`` noises per
            sample, ``--verifier`` scores their one-step samples, the teacher integrates the best noise

At scale: rows are grouped in shards of ``--shard-size``; the ranks take turns over shards, and each shard is
written as it is done (``NPZ.shards/shard_000012.npz``, uint8, atomically), so memory does not grow with
``--num-samples``. A killed run started again with the same arguments skips the shards already written. At the
end rank 0 streams the shards into the ``.npz`` and removes them. Every row's noise and class come from its own
generator (seeded by ``--seed`` and the row index), so the samples do not depend on the number of processes,
the batch size or the shard size.

Latent models (4 channels) are decoded with diffusers' ``AutoencoderKL`` from a local ``--vae`` folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zipfile

import numpy as np
import torch

from .checkpointing import atomic_path
from .distill import TeacherAdapter
from .distributed import init_processes
from .models import FlowMapStudent, load_checkpoint
from .viz import decode_latents, load_vae, save_grid, to_uint8


def build_parser():
    p = argparse.ArgumentParser(prog="python -m freeflow.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("student", "handoff", "teacher", "search"), default="student",
                   help="sampler (see the module docstring)")
    p.add_argument("--student", default="", help="student checkpoint (FreeFlow official or student_ema.pt of a run)")
    p.add_argument("--teacher", default="", help="teacher checkpoint (teacher, handoff and search modes)")
    p.add_argument("--family", default="", help="override the inferred family of --teacher")
    p.add_argument("--num-samples", dest="n", type=int, default=64, help="number of samples")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward, per process")
    p.add_argument("--shard-size", type=int, default=500, help="rows per shard file (memory per process ~ one shard)")
    p.add_argument("--gw", type=float, default=1.5, help="guidance weight γ")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="teacher times t where CFG applies")
    p.add_argument("--solver", choices=("euler", "heun", "dopri5"), default="heun", help="teacher ODE solver")
    p.add_argument("--steps", type=int, default=32, help="teacher steps (teacher, handoff and search modes)")
    p.add_argument("--delta", type=float, default=0.5, help="handoff: the student's jump δ (to t = 1 - δ)")
    p.add_argument("--candidates", type=int, default=8, help="search: noises scored per sample (K)")
    p.add_argument("--verifier", default="",
                   help="search: a TorchScript classifier file (scores log p(y|x)) or module:callable f(x, y) -> (N,)")
    p.add_argument("--class-label", type=int, default=-1, help="one class for all samples (-1: random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-row noise and class generators")
    p.add_argument("--vae", default="", help="local diffusers AutoencoderKL folder (latent models)")
    p.add_argument("--png", default="samples.png", help="grid output ('' to skip)")
    p.add_argument("--npz", default="", help="ADM-style .npz output ('' to skip)")
    p.add_argument("--nrow", type=int, default=8, help="grid: samples per row (the grid shows the first nrow²)")
    return p


def validate(a):
    if a.n < 1 or a.batch_size < 1 or a.steps < 1 or a.shard_size < 1 or a.candidates < 1:
        raise ValueError("--num-samples, --batch-size, --shard-size, --steps and --candidates must be positive, "
                         f"got {a.n}, {a.batch_size}, {a.shard_size}, {a.steps}, {a.candidates}")
    if a.mode in ("student", "handoff", "search") and not a.student:
        raise ValueError(f"--mode {a.mode} needs --student PATH")
    if a.mode in ("teacher", "handoff", "search") and not a.teacher:
        raise ValueError(f"--mode {a.mode} needs --teacher PATH")
    if a.mode == "search" and not a.verifier:
        raise ValueError("--mode search needs --verifier (a TorchScript classifier file or module:callable)")
    if not 0.0 < a.delta < 1.0 and a.mode == "handoff":
        raise ValueError(f"--delta must be in (0, 1) for handoff, got {a.delta}")
    lo, hi = a.guidance_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--guidance-interval must satisfy 0 <= LO <= HI <= 1, got {a.guidance_interval}")
    if not a.png and not a.npz:
        raise ValueError("nothing to write: give --png and/or --npz")
    if a.npz and not a.npz.endswith(".npz"):
        raise ValueError(f"--npz must end in .npz, got {a.npz!r}")


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row``'s own generator: numpy's SeedSequence of (seed, row), as a 63-bit int."""
    return int(np.random.SeedSequence([seed, row]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def draw(seed, rows, shape, num_classes, class_label=-1, candidates=1):
    """Noises ``(len(rows), *shape)`` (``(len(rows), candidates, *shape)`` when ``candidates > 1``) and classes.

    Row ``i`` draws ``randn(candidates, *shape)`` then ``randint(num_classes)`` from a CPU generator seeded
    with :func:`row_seed` ``(seed, i)``.
    """
    zs, ys = [], []
    for i in rows:
        g = torch.Generator().manual_seed(row_seed(seed, int(i)))
        zs.append(torch.randn(candidates, *shape, generator=g))
        ys.append(torch.randint(0, num_classes, (1,), generator=g))
    z = torch.stack(zs) if candidates > 1 else torch.cat(zs)
    y = torch.full((len(rows),), class_label) if class_label >= 0 else torch.cat(ys)
    return z, y


class Sampler:
    """Holds the loaded networks; ``__call__(z, y)`` → samples in model space."""

    def __init__(self, a, device, vae=None):
        self.a = a
        self.vae = vae
        self.student = self.teacher = self.search = None
        self.nfe = 0  # network evaluations per sample, reported by search mode
        if a.student:
            net = load_checkpoint(a.student).to(device).eval()
            self.student = FlowMapStudent(net)
            self.config = net.config
        if a.teacher:
            model = load_checkpoint(a.teacher, family=a.family or None).to(device).eval()
            self.teacher = TeacherAdapter(model, model.config.num_classes)
            self.config = model.config
        if a.mode == "search":
            from .search import NoiseSearch, load_verifier

            self.search = NoiseSearch(self.student, self.teacher, load_verifier(a.verifier, device),
                                      method=a.solver, steps=a.steps, interval=tuple(a.guidance_interval),
                                      decode=lambda x: decode_latents(x, vae))

    @torch.no_grad()
    def __call__(self, z, y):
        a = self.a
        gw = torch.full((z.shape[0],), a.gw, device=z.device)
        if a.mode == "student":
            return self.student.sample(z, y, gw)
        if a.mode == "search":
            out = self.search(z, y, gw)
            self.nfe = out.nfe
            return out.samples
        solver = dict(method=a.solver, steps=a.steps, interval=tuple(a.guidance_interval))
        if a.mode == "teacher":
            return self.teacher.sample(z, y, gw, **solver)
        x = self.student.sample(z, y, gw, delta=torch.full_like(gw, a.delta))
        return self.teacher.sample(x, y, gw, t_start=1.0 - a.delta, **solver)


def as_rgb_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, 3) uint8 (grey repeated; latents without a VAE: channels 0-2)."""
    arr = to_uint8(images[:, :3])
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


# -- shards ------------------------------------------------------------------------------------

def shard_dir(npz: str) -> str:
    return npz + ".shards"


def shard_file(folder: str, k: int) -> str:
    return os.path.join(folder, f"shard_{k:06d}.npz")


def _settings(a) -> dict:
    """What determines the samples: a folder of shards is resumed only under the same settings."""
    keys = ("mode", "student", "teacher", "family", "n", "shard_size", "gw", "guidance_interval", "solver", "steps",
            "delta", "class_label", "seed", "vae") + (("candidates", "verifier") if a.mode == "search" else ())
    return json.loads(json.dumps({k: getattr(a, k) for k in keys}))


def _check_settings(folder, a, main):
    path = os.path.join(folder, "settings.json")
    if main:
        os.makedirs(folder, exist_ok=True)
        settings = _settings(a)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise ValueError(f"--npz {a.npz!r}: the shards in {folder} were written with other settings "
                                 f"({', '.join(diff)}); remove that folder or choose another --npz")
        else:
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                json.dump(settings, f, indent=1)


def write_shard(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """One shard, atomically (temporary file + rename): a kill never leaves a shard that looks complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels)


def _npy_header(f, shape, dtype):
    np.lib.format.write_array_header_2_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})


def merge_shards(folder: str, num_shards: int, out: str) -> None:
    """Stream the shards, in order, into ADM's ``.npz`` (``arr_0`` images, ``arr_1`` labels): one shard in memory."""
    first = np.load(shard_file(folder, 0))
    hwc = first["images"].shape[1:]
    n = sum(np.load(shard_file(folder, k))["labels"].shape[0] for k in range(num_shards))
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, key, shape, dtype in (("arr_0.npy", "images", (n, *hwc), np.uint8),
                                        ("arr_1.npy", "labels", (n,), np.int64)):
            with zf.open(name, "w", force_zip64=True) as f:
                _npy_header(f, shape, dtype)
                for k in range(num_shards):
                    with np.load(shard_file(folder, k)) as shard:
                        f.write(np.ascontiguousarray(shard[key], dtype=dtype).tobytes())


def _grid_rows(folder, count):
    """The first ``count`` samples from the shards, as a float tensor in [-1, 1] for ``save_grid``."""
    parts, k = [], 0
    while sum(len(p) for p in parts) < count and os.path.exists(shard_file(folder, k)):
        with np.load(shard_file(folder, k)) as shard:
            parts.append(shard["images"])
        k += 1
    arr = np.concatenate(parts)[:count]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


# -- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        validate(a)
    except ValueError as e:
        print(f"python -m freeflow.sample: error: {e}", file=sys.stderr)
        return 2
    procs = init_processes()
    try:
        return run(a, procs)
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m freeflow.sample: error: {e}", file=sys.stderr)
        return 2
    finally:
        procs.close()


def run(a, procs) -> int:
    device, rank, world = procs.device, procs.rank, procs.world
    vae = load_vae(a.vae, device)
    sampler = Sampler(a, device, vae)
    cfg = sampler.config
    shape = (cfg.in_channels, *(g * cfg.patch_size for g in cfg.grid))
    if cfg.in_channels not in (1, 3) and vae is None and rank == 0:
        print("[freeflow] latent samples without --vae: writing the first three channels", file=sys.stderr)

    def generate(rows):
        out_images, out_labels = [], []
        for i in range(0, len(rows), a.batch_size):
            idx = rows[i: i + a.batch_size]
            z, y = draw(a.seed, idx, shape, cfg.num_classes, a.class_label,
                        a.candidates if a.mode == "search" else 1)
            x = decode_latents(sampler(z.to(device), y.to(device)), vae)
            out_images.append(as_rgb_uint8(x.float()))
            out_labels.append(y.numpy().astype(np.int64))
        return np.concatenate(out_images), np.concatenate(out_labels)

    if not a.npz:  # a grid only: rank 0 samples the rows it shows
        if rank == 0:
            images, _ = generate(range(min(a.n, a.nrow * a.nrow)))
            save_grid(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, a.png, a.nrow)
            print(f"[freeflow] wrote {a.png}")
        return 0

    folder = shard_dir(a.npz)
    _check_settings(folder, a, procs.main)
    procs.barrier()
    num_shards = -(-a.n // a.shard_size)
    done = skipped = 0
    for k in range(rank, num_shards, world):
        path = shard_file(folder, k)
        if os.path.exists(path):  # written by an earlier, interrupted run (renamed only once complete)
            skipped += 1
            continue
        images, labels = generate(range(k * a.shard_size, min((k + 1) * a.shard_size, a.n)))
        write_shard(path, images, labels)
        done += 1
    print(f"[freeflow] rank {rank}: {done} shards written, {skipped} already there"
          + (f"; {sampler.nfe} NFE per sample" if a.mode == "search" else ""), file=sys.stderr)
    procs.barrier()
    if rank == 0:
        if a.png:
            save_grid(_grid_rows(folder, min(a.n, a.nrow * a.nrow)), a.png, a.nrow)
        merge_shards(folder, num_shards, a.npz)
        shutil.rmtree(folder)
        print(f"[freeflow] wrote {a.n} samples: {', '.join(p for p in (a.png, a.npz) if p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
