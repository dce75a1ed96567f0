"""Probes: what holds the demo student above its teacher? Each probe is the ``mnist`` preset with one change.

The base is the preset as shipped (the long teacher, γ ∈ [1, 2], scored at γ = 1.25), trained for ``--steps``
(2,000) on one thread with a checkpoint every 250 steps, once per seed of ``--seeds``. Every checkpoint's EMA
student at multiples of 500 steps is scored on the fixed inputs of
:class:`~freeflow.experiments.common.Scorer` (1,500 samples; the last checkpoint also with precision, recall
and class entropy), so each probe gives a curve beside the base's.

A probe's runs write one JSON each (``OUT/probes/NAME-seedK.json``), so several processes can take different
probes at once (``--only``) without touching each other's results; ``--summary`` gathers them into
``OUT/probes.json`` and a table: per probe the mean and extremes over seeds, and the difference from the base
at 1,000 steps (the demo's budget, where every run is scored), which counts as "no difference" when it is not
larger than the seed noise (the largest half-range over seeds among the probes run on several seeds).
"""
from __future__ import annotations

import glob
import json
import os
import statistics

from ..demo import ASSETS_DIR, DEMO_TEACHER_FILE
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

# The preset as shipped, on one thread (two probes share the two cores).
BASE = {"teacher_ckpt": str(ASSETS_DIR / DEMO_TEACHER_FILE), "gw_min": 1.0, "gw_max": 2.0, "threads": 1}
GW = 1.25  # the long teacher's best guidance scale (docs/experiments.md)
PROBES = {
    "base": {},
    "prediction-only": {"pred_fraction": 1.0},
    # the aux network
    "aux-lr-x3": {"aux_lr": 9e-4},
    "aux-updates-2": {"aux_updates": 2},
    "aux-updates-4": {"aux_updates": 4},
    "pred-fraction-0.5": {"pred_fraction": 0.5},
    "aux-warmup-200": {"aux_warmup": 200},
    # λ
    "balance-weighted": {"balance": "weighted"},
    "alpha-1/3": {"alpha": 1 / 3},  # the concatenated-batch mean: the correction's share is n_corr / n_pred
    "alpha-2": {"alpha": 2.0},
    "balance-fixed": {"balance": "fixed", "alpha": 3.0},  # the base run's mean λ (2.97-3.50 over its 2,000 steps)
    # batch (equal steps; equal prior samples is the base at 4x the steps)
    "batch-256": {"batch_size": 256},
    # δ law
    "delta-one-0": {"delta_one_prob": 0.0},
    "delta-one-0.5": {"delta_one_prob": 0.5},
    "delta-logit-normal": {"delta_dist": "logit_normal", "delta_one_prob": 0.0},
    # γ range
    "gw-1-1.5": {"gw_max": 1.5},
    # schedule
    "lr-cosine": {"lr_schedule": "cosine"},
    # capacity
    "extra-depth-4": {"student_extra_depth": 4},
}


def add_arguments(p):
    p.add_argument("--only", default="", help=f"comma-separated probe names (default: all): {', '.join(PROBES)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (default: 0,1)")
    p.add_argument("--steps", type=int, default=2000, help="training steps per run (default: 2000)")
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between checkpoints (default: 250)")
    p.add_argument("--score-every", type=int, default=500, help="steps between scored checkpoints (default: 500)")
    p.add_argument("--samples", type=int, default=1500, help="samples per FD (default: 1500)")
    p.add_argument("--summary", action="store_true", help="only gather the finished runs into probes.json")


def _names(only: str) -> list[str]:
    names = [n.strip() for n in only.split(",") if n.strip()] if only else list(PROBES)
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise ValueError(f"--only names unknown probes {unknown}; known: {list(PROBES)}")
    return names


def _file(name: str) -> str:
    return name.replace("/", "_")


def run(args) -> dict:
    if args.summary:
        return summarise(args.out)
    if args.ckpt_every < 1 or args.score_every % args.ckpt_every:
        raise ValueError(f"--score-every ({args.score_every}) must be a multiple of --ckpt-every ({args.ckpt_every})")
    names, seeds = _names(args.only), [int(s) for s in args.seeds.split(",")]
    teacher, scorer = load_teacher(BASE["teacher_ckpt"]), Scorer(n=args.samples, gw=GW)
    cache = os.path.join(args.out, f"teacher_fd-mnist_teacher_long-gw={GW:g}.json")
    baselines = teacher_baselines(scorer, teacher, cache, teacher_ckpt=BASE["teacher_ckpt"])
    for name in names:
        for seed in seeds:
            run_dir = os.path.join(args.runs, "probes", f"{_file(name)}-seed{seed}")
            train_run(run_dir, args.steps, args.ckpt_every, {**BASE, **PROBES[name], "seed": seed})
            rows = score_checkpoints(scorer, teacher, run_dir, every=args.score_every // args.ckpt_every,
                                     max_step=args.steps)
            payload = {**environment(), "probe": name, "overrides": PROBES[name], "seed": seed, "run": run_dir,
                       "scorer": scorer.settings(), "train_seconds": run_seconds(run_dir),
                       "teacher_heun32_fd": baselines["heun32"]["fd"], "curve": rows}
            write_json(os.path.join(args.out, "probes", f"{_file(name)}-seed{seed}.json"), payload)
            print(f"[probes] {name} seed {seed}: FD {rows[-1]['fd']:.2f} at step {rows[-1]['step']} "
                  f"({payload['train_seconds']:.0f} s)", flush=True)
    return summarise(args.out)


def _spread(values):
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values),
            "std": statistics.stdev(values) if len(values) > 1 else float("nan")}


def summarise(out: str) -> dict:
    """``probes.json``: per probe, the final and 1,000-step FD, recall and class entropy over seeds, and the
    difference of the means from the base's ("no difference" where it is inside either side's spread)."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "probes", "*-seed*.json"))):
        with open(path) as f:
            record = json.load(f)
        runs.setdefault(record["probe"], []).append(record)
    table = {}
    for name, records in runs.items():
        last = [r["curve"][-1] for r in records]
        at_1000 = [row["fd"] for r in records for row in r["curve"] if row["step"] == 1000]
        table[name] = {"seeds": [r["seed"] for r in records], "steps": last[0]["step"],
                       "fd": _spread([row["fd"] for row in last]),
                       "fd_at_1000": _spread(at_1000) if at_1000 else None,
                       "recall": _spread([row["recall"] for row in last if "recall" in row] or [float("nan")]),
                       "precision": _spread([row["precision"] for row in last if "precision" in row] or [float("nan")]),
                       "class_entropy_bits": _spread([row["class_entropy_bits"] for row in last
                                                      if "class_entropy_bits" in row] or [float("nan")]),
                       "train_seconds": statistics.fmean(r["train_seconds"] for r in records),
                       "teacher_heun32_fd": records[0]["teacher_heun32_fd"]}
    # Compared at 1,000 steps (the demo's budget; every run is scored there). The noise is the largest half-range
    # over seeds among the probes run on several seeds: single-seed probes have no spread of their own.
    spreads = [(r["fd_at_1000"]["max"] - r["fd_at_1000"]["min"]) / 2 for r in table.values()
               if r["fd_at_1000"] and r["fd_at_1000"]["n"] > 1]
    noise = max(spreads, default=float("nan"))
    base = table.get("base")
    for name, row in table.items():
        if base is None or name == "base" or not row["fd_at_1000"] or not base["fd_at_1000"]:
            continue
        diff = row["fd_at_1000"]["mean"] - base["fd_at_1000"]["mean"]
        row["fd1000_minus_base"] = diff
        row["verdict"] = ("no difference (inside the seed spread)" if not abs(diff) > noise
                          else ("better" if diff < 0 else "worse"))
    payload = {**environment(), "seed_noise_at_1000": noise, "probes": table}
    write_json(os.path.join(out, "probes.json"), payload)
    curves = {}
    for name, records in runs.items():
        steps = [row["step"] for row in records[0]["curve"][1:]]
        curves[name] = (steps, [statistics.fmean(r["curve"][i + 1]["fd"] for r in records
                                                 if len(r["curve"]) > i + 1) for i in range(len(steps))])
    teacher = next(iter(table.values()))["teacher_heun32_fd"] if table else None
    plot(os.path.join(out, "probes.png"), curves, hlines={"teacher Heun 32": teacher} if teacher else None,
         title=f"MNIST probes: one-step FD (γ = {GW}), mean over seeds")
    for name, row in sorted(table.items(), key=lambda kv: (kv[1]["fd_at_1000"] or kv[1]["fd"])["mean"]):
        at = row["fd_at_1000"] or row["fd"]
        print(f"{name:<22} FD@1000 {at['mean']:6.2f} [{at['min']:.2f}, {at['max']:.2f}]  FD@{row['steps']} "
              f"{row['fd']['mean']:6.2f}  recall {row['recall']['mean']:.3f}  {row.get('verdict', '')}")
    return payload
