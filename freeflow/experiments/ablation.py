"""Ablation: prediction only, correction only and both; k ∈ {0, 1}; correction guidance [0, 0.7] vs [0, 1].

Every variant is the ``mnist`` demo preset with one change, trained for ``--steps`` from the same seed, and
scored at each checkpoint (FD) and at the end (FD, precision, recall, class histogram of the feature net's
classifier, agreement with the conditioning label). "both" is the preset itself: when the convergence run
already holds a checkpoint at ``--steps`` its first ``--steps`` are used (the preset has no schedule that
depends on the step budget and CPU runs replay exactly, so a fresh run would repeat them bit for bit).
"""
from __future__ import annotations

import json
import os

from .common import (
    STUDY_BASE,
    Scorer,
    convergence_run,
    environment,
    load_teacher,
    plot,
    score_checkpoints,
    teacher_baselines,
    train_run,
    write_json,
)

# One change each from STUDY_BASE (k = 1, correction guidance [0, 0.7]); the last is the preset since then.
VARIANTS = {
    "both (k = 1, corr. guidance [0, 0.7])": STUDY_BASE,
    "prediction only": {**STUDY_BASE, "pred_fraction": 1.0},
    "correction only": {**STUDY_BASE, "pred_fraction": 0.0},
    "k = 0": {**STUDY_BASE, "power": 0.0},
    "corr. guidance [0, 1] (the mnist preset)": {"corr_guidance_interval": (0.0, 1.0)},
}


def add_arguments(p):
    p.add_argument("--steps", type=int, default=1000, help="training steps per variant (default: 1000)")
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between checkpoints (default: 250)")
    p.add_argument("--samples", type=int, default=1500, help="samples per FD (default: 1500)")
    p.add_argument("--only", default="", help="comma-separated variant numbers to run (1-based; default: all)")


def _run_dir(args, index, overrides):
    """Variant 1 is the convergence run's first ``--steps`` when that run got that far (same computation)."""
    shared = convergence_run(args.runs, args.steps) if overrides == STUDY_BASE else None
    return shared or os.path.join(args.runs, f"ablation-{index}")


def run(args) -> dict:
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(1, len(VARIANTS) + 1)
    if not set(chosen) <= set(range(1, len(VARIANTS) + 1)):
        raise ValueError(f"--only must list variant numbers in 1..{len(VARIANTS)}, got {args.only!r}")
    teacher, scorer = load_teacher(), Scorer(n=args.samples)
    baselines = teacher_baselines(scorer, teacher, os.path.join(args.out, "teacher_fd.json"))
    path = os.path.join(args.out, "ablation.json")
    results = {}
    if os.path.isfile(path):  # variants scored by an earlier (partial) call are kept
        with open(path) as f:
            results = json.load(f).get("variants", {})
    for index, (name, overrides) in enumerate(VARIANTS.items(), start=1):
        if index not in chosen:
            continue
        run_dir = _run_dir(args, index, overrides)
        train_run(run_dir, args.steps, args.ckpt_every, overrides)
        rows = score_checkpoints(scorer, teacher, run_dir, max_step=args.steps)
        results[name] = {"overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
                         "run": run_dir, "curve": rows, "final": rows[-1]}
        write_json(path, {**environment(), "scorer": scorer.settings(), "steps": args.steps,
                          "teacher": baselines, "variants": results})
    plot(os.path.join(args.out, "ablation.png"),
         {name: ([r["step"] for r in v["curve"]], [r["fd"] for r in v["curve"]]) for name, v in results.items()},
         hlines={f"teacher Heun {n}": baselines[f"heun{n}"]["fd"] for n in (2, 4, 32)},
         title=f"MNIST demo ablation: one-step FD vs step ({scorer.n} samples, γ = {scorer.gw})")
    return {"variants": results}
