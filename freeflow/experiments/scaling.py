"""Scaling: does the gap to the teacher close with compute? FD against prior samples seen, for a time budget.

The demo preset (the long teacher, γ ∈ [1, 2]) at ``--batch-size`` (1,024 by default: a GPU's batch) trains for
``--minutes`` of wall time on ``--device``: ``python -m freeflow.train`` runs as a child process and is stopped
at the deadline (SIGTERM, then SIGKILL), which the trainer survives by design (atomic checkpoints every
``--ckpt-every`` steps, all kept). Every ``--every``-th checkpoint's EMA student is then scored on the fixed
inputs of :class:`~freeflow.experiments.common.Scorer` at γ = 1.25, the last one with precision and recall,
and the curve is written against prior samples seen (steps × batch), beside the CPU curves of the probes (batch
64; ``CPU_CURVES``) when ``--out`` holds them. ``OUT/scaling-b{batch}-{device}.json`` / ``.png``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from .common import Scorer, checkpoint_steps, environment, load_teacher, plot, score_checkpoints, write_json
from .probes import BASE, GW

# The CPU curves (batch 64, one thread) drawn beside the run, when ``--out`` holds them: the preset as shipped
# (its δ law is the logit-normal probe's) and the preset before the probes.
CPU_CURVES = {"delta-logit-normal": "batch 64, CPU (the preset, seed 0)",
              "base": "batch 64, CPU (the preset before the probes, seed 0)"}


def add_arguments(p):
    p.add_argument("--batch-size", type=int, default=1024, help="global batch (default: 1024)")
    p.add_argument("--minutes", type=float, default=6.0, help="training wall time before the stop (default: 6)")
    p.add_argument("--device", default="auto", help="'cuda', 'cpu' or 'auto' (CUDA when available)")
    p.add_argument("--steps", type=int, default=1_000_000, help="upper bound on the steps (default: 1,000,000)")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    p.add_argument("--every", type=int, default=1, help="score every N-th checkpoint (default: 1)")
    p.add_argument("--samples", type=int, default=1500, help="samples per FD (default: 1500)")


def _train_for(argv: list[str], seconds: float, env: dict) -> dict:
    """Run the trainer until it finishes or ``seconds`` pass; stop it at the deadline. Returns how it ended."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "freeflow.train", *argv], env=env)
    try:
        code = proc.wait(timeout=seconds)
        return {"stopped_at_deadline": False, "exit_code": code, "seconds": time.time() - start}
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return {"stopped_at_deadline": True, "exit_code": proc.returncode, "seconds": time.time() - start}


def run(args) -> dict:
    if args.batch_size < 4 or args.minutes <= 0 or args.ckpt_every < 1 or args.every < 1:
        raise ValueError("--batch-size must be >= 4 and --minutes, --ckpt-every, --every positive")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be 'cuda', 'cpu' or 'auto', got {args.device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    name = f"scaling-b{args.batch_size}-{device}"
    run_dir = os.path.join(args.runs, name)
    argv = ["--preset", "mnist", "--out", run_dir, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
            "--ckpt-every", str(args.ckpt_every), "--keep-checkpoints", "1000000", "--sample-every", "1000000000",
            "--no-evaluate", "--teacher-ckpt", BASE["teacher_ckpt"], "--gw-min", str(BASE["gw_min"]),
            "--gw-max", str(BASE["gw_max"])]
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if checkpoint_steps(run_dir):
        ended = {"stopped_at_deadline": None, "note": "scored an existing run; not trained again"}
    else:
        os.makedirs(run_dir, exist_ok=True)
        print(f"[scaling] python -m freeflow.train {' '.join(argv)} (for {args.minutes} min)", flush=True)
        ended = _train_for(argv, args.minutes * 60, env)
    if not checkpoint_steps(run_dir):
        raise ValueError(f"the run wrote no checkpoint in {args.minutes} min ({ended}): give it more --minutes or a "
                         "smaller --ckpt-every")
    teacher, scorer = load_teacher(BASE["teacher_ckpt"]), Scorer(n=args.samples, gw=GW)
    rows = score_checkpoints(scorer, teacher, run_dir, every=args.every)
    for row in rows:
        row["prior_samples"] = row["step"] * args.batch_size
    payload = {**environment(), "device": device, "batch_size": args.batch_size, "minutes": args.minutes,
               "run": run_dir, "training": ended, "scorer": scorer.settings(), "curve": rows}
    if device == "cuda":
        payload["gpu"] = torch.cuda.get_device_name(0)
    write_json(os.path.join(args.out, f"{name}.json"), payload)
    curves = {f"batch {args.batch_size}, {device}": ([r["prior_samples"] for r in rows[1:]],
                                                    [r["fd"] for r in rows[1:]])}
    for probe, label in CPU_CURVES.items():
        path = os.path.join(args.out, "probes", f"{probe}-seed0.json")
        if os.path.isfile(path):
            with open(path) as f:
                cpu = json.load(f)["curve"][1:]
            curves[label] = ([r["step"] * 64 for r in cpu], [r["fd"] for r in cpu])
    plot(os.path.join(args.out, f"{name}.png"), curves, xlabel="prior samples seen (steps × batch)", xlog=True,
         title=f"MNIST demo preset: one-step FD (γ = {GW}) against prior samples seen")
    last = rows[-1]
    print(f"[scaling] {name}: step {last['step']} ({last['prior_samples']:,} prior samples): FD {last['fd']:.2f}")
    return payload
