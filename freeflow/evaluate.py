"""The MNIST demo's evaluation: Fréchet distance in the bundled feature network's space.

FD of the one-step student and of the teacher at 1, 2, 4 and ``teacher_steps`` Heun steps (all with
CFG at the same γ, from the same noises), plus the mean per-sample L2 distance between student
samples and the teacher's ODE endpoints (the ``teacher_steps`` solution) from the same noises.
"""
from __future__ import annotations

import time

import torch


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
def evaluate_mnist(cfg, adapter, student, device, batch: int = 500) -> dict:
    from .metrics import mnist_fd
    from .train import teacher_samples

    tcfg = adapter.model.config
    shape = (tcfg.in_channels, *(g * tcfg.patch_size for g in tcfg.grid))
    common = dict(n=cfg.eval_samples, batch=batch, shape=shape, num_classes=tcfg.num_classes, gw=cfg.eval_gw,
                  seed=cfg.seed + 777, device=device)
    t0 = time.time()
    student_x = _generate(lambda z, y, gw: student.sample(z, y, gw), **common)
    result = {"eval_gw": cfg.eval_gw, "eval_samples": cfg.eval_samples,
              "fd_student_1step": mnist_fd(student_x)}
    for steps in sorted({1, 2, 4, cfg.teacher_steps}):
        x = _generate(lambda z, y, gw: teacher_samples(adapter, z, y, gw, steps), **common)
        result[f"fd_teacher_heun{steps}"] = mnist_fd(x)
        if steps == cfg.teacher_steps:
            per_sample = (student_x - x).flatten(1).norm(dim=1)
            result["student_to_teacher_endpoint_l2"] = float(per_sample.mean())
            result["student_to_teacher_endpoint_rmse_per_pixel"] = float(
                (student_x - x).pow(2).flatten(1).mean(1).sqrt().mean())
    result["eval_seconds"] = time.time() - t0
    _print_table(result, cfg.teacher_steps)
    return result


def _print_table(r, teacher_steps):
    print(f"\nFréchet distance in the MNIST feature space ({r['eval_samples']} samples, CFG γ={r['eval_gw']}):")
    print(f"  student, 1 step                 {r['fd_student_1step']:8.3f}")
    for k in sorted((k for k in r if k.startswith("fd_teacher_heun")), key=lambda k: int(k[15:])):
        s = int(k[15:])
        print(f"  teacher, Heun {s:>3} steps          {r[k]:8.3f}")
    print(f"  mean L2(student, teacher {teacher_steps}-step endpoint): {r['student_to_teacher_endpoint_l2']:.3f}"
          f" (RMSE/pixel {r['student_to_teacher_endpoint_rmse_per_pixel']:.3f})")
