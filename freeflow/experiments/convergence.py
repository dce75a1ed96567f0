"""Convergence: FD of the one-step student against training step, next to the teacher's 1/2/4/32-step FD.

The run is the ``mnist`` demo preset (batch 64, 1 thread) continued to ``--steps`` with a checkpoint every
``--ckpt-every`` steps; every ``--every``-th checkpoint's EMA student is scored on the fixed inputs of
:class:`~freeflow.experiments.common.Scorer` (1,500 samples, γ = 2), the last one with precision, recall and
class coverage too. ``--no-train`` scores what a (still running or stopped) run has so far.
"""
from __future__ import annotations

import argparse
import os

from .common import (
    Scorer,
    environment,
    load_teacher,
    plot,
    run_seconds,
    score_checkpoints,
    teacher_baselines,
    train_run,
    write_json,
)


def add_arguments(p):
    p.add_argument("--steps", type=int, default=10_000, help="training steps (default: 10000)")
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between checkpoints (default: 250)")
    p.add_argument("--every", type=int, default=2, help="score every N-th checkpoint (default: 2)")
    p.add_argument("--samples", type=int, default=1500, help="samples per FD (default: 1500)")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="train (resume) before scoring (default: on)")


def run(args) -> dict:
    run_dir = os.path.join(args.runs, "convergence")
    if args.train:
        train_run(run_dir, args.steps, args.ckpt_every)
    teacher, scorer = load_teacher(), Scorer(n=args.samples)
    baselines = teacher_baselines(scorer, teacher, os.path.join(args.out, "teacher_fd.json"))
    rows = score_checkpoints(scorer, teacher, run_dir, every=args.every)
    best = min(rows, key=lambda r: r["fd"])
    teacher32 = baselines["heun32"]["fd"]
    payload = {**environment(), "scorer": scorer.settings(), "run": run_dir, "steps_trained": rows[-1]["step"],
               "train_seconds": run_seconds(run_dir), "teacher": baselines, "curve": rows,
               "best": {"step": best["step"], "fd": best["fd"]},
               "final_over_teacher32": rows[-1]["fd"] / teacher32, "best_over_teacher32": best["fd"] / teacher32}
    write_json(os.path.join(args.out, "convergence.json"), payload)
    plot(os.path.join(args.out, "convergence.png"),
         {"student, 1 step (EMA)": ([r["step"] for r in rows[1:]], [r["fd"] for r in rows[1:]])},
         hlines={f"teacher Heun {n} (NFE {2 * n - 1})": baselines[f"heun{n}"]["fd"] for n in (1, 2, 4, 32)},
         title=f"MNIST demo: one-step student FD vs step ({scorer.n} samples, γ = {scorer.gw})")
    print(f"[convergence] step {rows[-1]['step']}: FD {rows[-1]['fd']:.2f} (best {best['fd']:.2f} at "
          f"{best['step']}); teacher Heun 32: {teacher32:.2f}")
    return payload
