"""The demo's class-conditional flow teacher: a small ``freeflow.models.DiT`` trained by flow matching.

Flow matching in the internal convention: ``x_t = (1 - t)·x + t·n``, target ``n - x``, labels dropped to
the null class (``num_classes``) for classifier-free guidance. Time is drawn from a mixture: with
probability ``uniform_frac`` (0.25) t ~ U[0, 1], otherwise t = sigmoid(N(0.5, 1)). The logit-normal part
concentrates the small CPU budget on t ≈ 0.4-0.85, where a first teacher trained with uniform t still had
its largest loss and where a sample's shape is decided; the uniform part keeps both ends covered, because
the student queries the teacher over all of [0, 1] (``t = 1 - δ`` for small δ is the noise end).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpointing import CheckpointDir
from ..ema import ema_update_, warmup_decay
from ..models import DiT, DiTConfig
from . import NUM_CLASSES

NULL_CLASS = NUM_CLASSES  # DiT's null (unconditional) class id is num_classes

# The teacher and the student share this architecture, so it is sized by what the demo's distillation
# can afford on 2 CPU cores: 49 tokens of 4×4 patches, 64 wide, 4 blocks (≈ 0.33 M parameters).
TEACHER_ARCH = dict(input_size=28, patch_size=4, in_channels=1, hidden_size=64, depth=4, num_heads=4,
                    mlp_ratio=4.0, num_classes=NUM_CLASSES, class_dropout_prob=0.1, learn_sigma=False)


@dataclass
class TeacherResult:
    model: DiT
    ema: DiT
    losses: list
    seconds: float
    steps: int


def sample_time(n, generator, *, logit_mean=0.5, logit_std=1.0, uniform_frac=0.25):
    """t from the mixture uniform_frac·U[0, 1] + (1 - uniform_frac)·sigmoid(N(logit_mean, logit_std²))."""
    uniform = torch.rand(n, generator=generator)
    logit_normal = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    pick_uniform = torch.rand(n, generator=generator) < uniform_frac
    return torch.where(pick_uniform, uniform, logit_normal)


def flow_matching_loss(model, x, y, generator, cfg_dropout=0.1, null_class=NULL_CLASS, uniform_frac=0.25):
    """Conditional flow matching in the internal convention, labels dropped to the null class w.p. ``cfg_dropout``."""
    n = torch.randn(x.shape, generator=generator)
    t = sample_time(x.shape[0], generator, uniform_frac=uniform_frac)
    drop = torch.rand(x.shape[0], generator=generator) < cfg_dropout
    y = torch.where(drop, torch.full_like(y, null_class), y)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x + tb * n
    return F.mse_loss(model(x_t, t, y), n - x)


def _lr_at(step, steps, lr, warmup):
    """Linear warm-up, then cosine decay to 10 % (the step budget is fixed, so end on a low rate)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_teacher(images, labels, *, steps, batch_size=64, lr=1e-3, warmup=200, ema_decay=0.999,
                  cfg_dropout=0.1, grad_clip=1.0, seed=0, arch=None, backend="reference", log_every=250,
                  log=print, checkpoint_dir=None, checkpoint_every=500) -> TeacherResult:
    """Train the class-conditional flow teacher; returns the raw and the EMA model (EMA is what ships).

    With ``checkpoint_dir`` the full state (model, EMA, optimiser, sampler generator, losses) is saved every
    ``checkpoint_every`` steps and training resumes from the newest readable checkpoint there, so a killed
    run continues where it stopped and ends bit-for-bit where an uninterrupted one would.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0.0 <= cfg_dropout < 1.0:
        raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
    torch.manual_seed(seed)
    model = DiT(DiTConfig(**(arch or TEACHER_ARCH)), family="internal", backend=backend)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    losses, first, spent = [], 0, 0.0
    ckpts = CheckpointDir(checkpoint_dir, keep=2) if checkpoint_dir is not None else None
    if ckpts is not None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every!r}")
        state, path = ckpts.load_newest_good()
        if state is not None:
            first, spent, losses = _restore(state, model, ema, opt, g, steps, path)
            log(f"[teacher] resumed from {path} at step {first}")
    start = time.time() - spent
    model.train()
    for step in range(first, steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        loss = flow_matching_loss(model, images[idx], labels[idx], g, cfg_dropout, model.config.num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        ema_update_(ema, model, warmup_decay(ema_decay, step))
        losses.append(loss.item())
        if ckpts is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            ckpts.save(step + 1, dict(step=step + 1, steps=steps, seconds=time.time() - start, losses=losses,
                                      model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                      generator=g.get_state()))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            elapsed = time.time() - start
            log(f"[teacher] step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                f"({elapsed / (step + 1):.3f} s/step, {elapsed / 60:.1f} min)")
    return TeacherResult(model.eval(), ema.eval(), losses, time.time() - start, steps)


def _restore(state, model, ema, opt, generator, steps, path):
    """Load a training checkpoint in place; returns (next step, seconds spent so far, losses so far)."""
    if state["steps"] != steps:
        raise ValueError(f"checkpoint {path} belongs to a {state['steps']}-step run, not steps={steps}: "
                         "the learning-rate schedule depends on the total, so point checkpoint_dir elsewhere")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    generator.set_state(state["generator"])
    return state["step"], state["seconds"], list(state["losses"])
