"""Evaluation of the demo: FD of teacher samplers (the asset record) and of a distilled student.

``evaluate_student`` scores the one-step student and the teacher at 1, 2, 4 and ``teacher_steps`` Heun
steps, all with CFG at the same γ and from the same noises, plus the mean per-sample L2 distance between
student samples and the teacher's ODE endpoints from the same noises.

The teacher's half (its FDs and its ``teacher_steps`` endpoints) is the same on every run with the same teacher
file and settings, so it is computed once: :func:`teacher_table` looks it up by a key (the teacher file's
SHA-256, samples, γ, steps, seed, batch, device type and autocast dtype) in the table shipped with the assets
(``mnist_teacher_long_eval.pt``, built by ``python -m freeflow.demo.assets --what table``) and in the user cache
(``$XDG_CACHE_HOME/freeflow``, else ``~/.cache/freeflow``), and computes and caches it when neither holds it.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from .. import solvers
from ..checkpointing import atomic_path
from ..distill import TeacherAdapter
from . import ASSETS_DIR
from .features import mnist_fd

TABLE_FILE = "mnist_teacher_long_eval.pt"  # the mnist preset's teacher table, shipped with the assets


def sample_teacher(model, n, *, gamma, method="heun", steps=32, seed=0, batch_size=500, labels=None):
    """``n`` samples (balanced classes 0..9 unless ``labels`` given) from noise seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    z = torch.randn((n, c.in_channels, *([c.input_size] * 2 if isinstance(c.input_size, int) else c.input_size)),
                    generator=g)
    y = torch.arange(n) % c.num_classes if labels is None else labels
    adapter = TeacherAdapter(model, c.num_classes)
    out = [adapter.sample(zb, yb, torch.full(yb.shape, float(gamma)), method=method, steps=steps)
           for zb, yb in zip(z.split(batch_size), y.split(batch_size))]
    return torch.cat(out)


def real_floor(images, net, stats, n, seed):
    """FD of ``n`` random real digits to the reference: the floor a perfect sampler reaches at this N
    (optimistic: these digits are inside the reference set)."""
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return mnist_fd(images[idx], net=net, stats=stats)


def evaluate_teacher(model, images, net, stats, *, gammas=(1.0, 1.5, 2.0, 2.5, 3.0), sweep_samples=500,
                     sweep_steps=8, samples=2000, step_list=(1, 2, 4, 8, 32), seed=0, log=print) -> dict:
    """γ sweep (Heun, ``sweep_steps``, ``sweep_samples``), then FD at each step count at the best γ."""
    fd = lambda x: mnist_fd(x, net=net, stats=stats)  # noqa: E731
    sweep = {}
    for gamma in gammas:
        t0 = time.time()
        sweep[str(gamma)] = fd(sample_teacher(model, sweep_samples, gamma=gamma, method="heun",
                                              steps=sweep_steps, seed=seed))
        log(f"[eval] sweep γ={gamma}: FD {sweep[str(gamma)]:.3f} ({time.time() - t0:.0f} s)")
    best = float(min(sweep, key=sweep.get))
    table = []  # a list, so the JSON record keeps the row order
    for method in ("heun", "euler"):
        for steps in step_list:
            t0 = time.time()
            x = sample_teacher(model, samples, gamma=best, method=method, steps=steps, seed=seed + 1)
            table.append(dict(method=method, steps=steps, nfe=solvers.nfe(method, steps), fd=fd(x),
                              seconds=time.time() - t0))
            log(f"[eval] {method} {steps} steps (NFE {table[-1]['nfe']}): FD {table[-1]['fd']:.3f}")
    floor = real_floor(images, net, stats, samples, seed + 2)
    log(f"[eval] real-data floor ({samples} digits): FD {floor:.3f}")
    return dict(gamma_sweep=sweep, sweep_samples=sweep_samples, sweep_steps=sweep_steps, gamma=best,
                samples=samples, table=table, real_floor=floor)


@torch.no_grad()
def _generate(fn, n, batch, shape, num_classes, gw, seed, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    outs = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        z = torch.randn(m, *shape, generator=g).to(device)
        y = torch.randint(0, num_classes, (m,), generator=g).to(device)
        outs.append(fn(z, y, torch.full((m,), gw, device=device)).cpu())
    return torch.cat(outs)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "freeflow"


def table_key(teacher_path, adapter, *, samples, gw, teacher_steps, seed, batch, device) -> dict:
    """What a teacher table depends on: a cached table is used only when every entry is equal."""
    return {"teacher_sha256": file_sha256(teacher_path), "samples": int(samples), "gw": float(gw),
            "heun_steps": sorted({1, 2, 4, int(teacher_steps)}), "seed": int(seed), "batch": int(batch),
            "device": torch.device(device).type, "autocast": str(adapter.autocast_dtype)}


def _cache_file(key: dict) -> Path:
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]
    return user_cache_dir() / f"teacher_table-{key['teacher_sha256'][:12]}-{digest}.pt"


def _lookup(key: dict):
    for path in (ASSETS_DIR / TABLE_FILE, _cache_file(key)):
        if path.is_file():
            try:
                record = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a torn or foreign file is a cache miss, never an error
                continue
            if record.get("key") == key:
                return record, path
    return None, None


@torch.no_grad()
def compute_teacher_table(adapter, key: dict, common: dict, endpoint_steps: int | None = None) -> dict:
    """The teacher's FD at each Heun step count of ``key`` and its endpoints at ``endpoint_steps`` (default: the
    largest), from the noises of ``common`` (the arguments of :func:`_generate`)."""
    endpoint_steps = max(key["heun_steps"]) if endpoint_steps is None else endpoint_steps
    fds, endpoints = {}, None
    for steps in sorted(set(key["heun_steps"]) | {endpoint_steps}):
        x = _generate(lambda z, y, g, s=steps: adapter.sample(z, y, g, steps=s), **common)
        fds[steps] = mnist_fd(x)
        if steps == endpoint_steps:
            endpoints = x
    return {"key": key, "fd": fds, "endpoints": endpoints.float().contiguous()}


def teacher_table(adapter, teacher_path, common: dict, *, write_to: Path | None = None) -> tuple[dict, str]:
    """``(table, where)``: the cached table for this teacher file and these settings, else a fresh one written to
    the user cache; ``where`` says which ("shipped", "cache" or "computed"). ``write_to`` computes it afresh
    whatever is cached and writes it there (the shipped table's build)."""
    key = table_key(teacher_path, adapter, samples=common["n"], gw=common["gw"],
                    teacher_steps=common.get("teacher_steps", 32), seed=common["seed"], batch=common["batch"],
                    device=common["device"])
    record, path = _lookup(key) if write_to is None else (None, None)
    if record is not None:
        return record, "shipped" if path.name == TABLE_FILE else "cache"
    gen = {k: v for k, v in common.items() if k != "teacher_steps"}
    record = compute_teacher_table(adapter, key, gen)
    target = Path(write_to) if write_to is not None else _cache_file(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(str(target)) as tmp:
            torch.save(record, tmp)
    except OSError as e:  # a read-only home only costs the next run the same computation
        print(f"[eval] teacher table not cached ({e})")
    return record, "computed"


@torch.no_grad()
def evaluate_student(student, adapter, *, samples, gw, teacher_steps, seed, device, batch=500,
                     teacher_path=None) -> dict:
    """FD of the one-step ``student`` and of the teacher's Heun sampler at 1, 2, 4, ``teacher_steps`` steps.

    With ``teacher_path`` (the teacher's file) the teacher's half comes from :func:`teacher_table`."""
    tcfg = adapter.model.config
    shape = (tcfg.in_channels, *(g * tcfg.patch_size for g in tcfg.grid))
    common = dict(n=samples, batch=batch, shape=shape, num_classes=tcfg.num_classes, gw=gw, seed=seed,
                  device=device)
    t0 = time.time()
    student_x = _generate(student.sample, **common)
    result = {"eval_gw": gw, "eval_samples": samples, "fd_student_1step": mnist_fd(student_x)}
    if teacher_path is not None and teacher_steps >= 4:  # a table holds the endpoints of its largest step count
        common_steps = {**common, "teacher_steps": teacher_steps}
        table, result["teacher_table"] = teacher_table(adapter, teacher_path, common_steps)
    else:
        key = {"heun_steps": sorted({1, 2, 4, teacher_steps})}
        table = compute_teacher_table(adapter, key, common, endpoint_steps=teacher_steps)
        result["teacher_table"] = "computed"
    for steps, fd in table["fd"].items():
        result[f"fd_teacher_heun{steps}"] = fd
    diff = (student_x - table["endpoints"]).flatten(1)
    result["student_to_teacher_endpoint_l2"] = float(diff.norm(dim=1).mean())
    result["student_to_teacher_endpoint_rmse_per_pixel"] = float(diff.pow(2).mean(1).sqrt().mean())
    result["eval_seconds"] = time.time() - t0
    print_table(result, teacher_steps)
    return result


def print_table(r, teacher_steps):
    print(f"\nFréchet distance in the MNIST feature space ({r['eval_samples']} samples, CFG γ={r['eval_gw']}):")
    print(f"  student, 1 step                 {r['fd_student_1step']:8.3f}")
    for k in sorted((k for k in r if k.startswith("fd_teacher_heun")), key=lambda k: int(k[15:])):
        print(f"  teacher, Heun {int(k[15:]):>3} steps          {r[k]:8.3f}")
    print(f"  mean L2(student, teacher {teacher_steps}-step endpoint): {r['student_to_teacher_endpoint_l2']:.3f}"
          f" (RMSE/pixel {r['student_to_teacher_endpoint_rmse_per_pixel']:.3f})")
