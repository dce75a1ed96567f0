"""Evaluation of the demo: FD of teacher samplers (the asset record) and of a distilled student.

``evaluate_student`` scores the one-step student and the teacher at 1, 2, 4 and ``teacher_steps`` Heun
steps, all with CFG at the same γ and from the same noises, plus the mean per-sample L2 distance between
student samples and the teacher's ODE endpoints from the same noises.
"""
from __future__ import annotations

import time

import torch

from .. import solvers
from ..distill import TeacherAdapter
from .features import mnist_fd


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


@torch.no_grad()
def evaluate_student(student, adapter, *, samples, gw, teacher_steps, seed, device, batch=500) -> dict:
    """FD of the one-step ``student`` and of the teacher's Heun sampler at 1, 2, 4, ``teacher_steps`` steps."""
    tcfg = adapter.model.config
    shape = (tcfg.in_channels, *(g * tcfg.patch_size for g in tcfg.grid))
    common = dict(n=samples, batch=batch, shape=shape, num_classes=tcfg.num_classes, gw=gw, seed=seed,
                  device=device)
    t0 = time.time()
    student_x = _generate(student.sample, **common)
    result = {"eval_gw": gw, "eval_samples": samples, "fd_student_1step": mnist_fd(student_x)}
    for steps in sorted({1, 2, 4, teacher_steps}):
        x = _generate(lambda z, y, g, s=steps: adapter.sample(z, y, g, steps=s), **common)
        result[f"fd_teacher_heun{steps}"] = mnist_fd(x)
        if steps == teacher_steps:
            diff = (student_x - x).flatten(1)
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
