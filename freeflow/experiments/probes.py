"""Probes: what holds the demo student above its teacher? Each probe is the ``mnist`` preset with one change.

The base is the preset as it was shipped while the probes ran (the long teacher, γ ∈ [1, 2], δ uniform with a
0.25 point mass at δ = 1, scored at γ = 1.25; the δ law comes from ``STUDY_SETUP``, since the probes moved the
preset itself to ``delta-logit-normal``), trained for ``--steps``
(2,000) on one thread with a checkpoint every 250 steps, once per seed of ``--seeds``. Every checkpoint's EMA
student at multiples of 500 steps is scored on the fixed inputs of
:class:`~freeflow.experiments.common.Scorer` (1,500 samples; the last checkpoint also with precision, recall
and class entropy), so each probe gives a curve beside the base's.

A probe's runs write one JSON each (``OUT/probes/NAME-seedK.json``), so several processes can take different
probes at once (``--only``) without touching each other's results; ``--summary`` gathers them into
``OUT/probes.json`` and a table: per probe the mean and extremes over seeds, and the difference from the base
at 1,000 steps (the demo's budget, where every run is scored), which counts as "no difference" when it is not
larger than the seed noise (the largest half-range over seeds among the probes run on several seeds near the
base; :func:`summarise`).
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

# The preset as the probes found it, on one thread (two probes share the two cores); train_run adds STUDY_SETUP's
# δ law (uniform, 0.25 at δ = 1) under these overrides.
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
    # which part of the logit-normal's shape matters: its centre, its width, the δ = 1 mass on top
    "delta-ln-m-0.5": {"delta_dist": "logit_normal", "delta_one_prob": 0.0, "delta_logit_mean": -0.5},
    "delta-ln-m0.5": {"delta_dist": "logit_normal", "delta_one_prob": 0.0, "delta_logit_mean": 0.5},
    "delta-ln-s0.5": {"delta_dist": "logit_normal", "delta_one_prob": 0.0, "delta_logit_std": 0.5},
    "delta-ln-one-0.25": {"delta_dist": "logit_normal", "delta_one_prob": 0.25},
    # with the logit-normal law the curve flattens after ~2,500 steps: does a decaying rate help over 2,000?
    "delta-ln-cosine": {"delta_dist": "logit_normal", "delta_one_prob": 0.0, "lr_schedule": "cosine"},
    # the correction's noise level r = sigmoid(m + s·ε): the paper finds the high-noise end decisive
    "r-mean-0": {"r_logit_mean": 0.0},
    "r-mean-1.6": {"r_logit_mean": 1.6},
    # γ range
    "gw-1-1.5": {"gw_max": 1.5},
    # schedule
    "lr-cosine": {"lr_schedule": "cosine"},
    "lr-x2": {"lr": 6e-4, "aux_lr": 6e-4},  # lr was tuned on the first teacher (3e-4 against 2e-4)
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


def _half_range(spread) -> float:
    return (spread["max"] - spread["min"]) / 2


COVERAGE = ("recall", "precision", "class_entropy_bits")
REGIME = 1.5  # probes whose FD at 1,000 steps is within this factor of the base's train as the base does


def summarise(out: str) -> dict:
    """``probes.json`` from every ``OUT/probes/*-seed*.json``: per probe its FD curve over seeds (mean and extremes
    at each scored step; runs may differ in length and in how often they were scored), each run's last
    checkpoint with its coverage (precision, recall, class entropy), and the difference of the FD means at
    1,000 steps from the base's.

    A difference counts only when it is larger than the seed noise: the largest half-range over seeds among
    the probes run on several seeds that train in the base's regime (FD at 1,000 steps within ``REGIME``× the
    base's; a collapsed run's spread says nothing about the noise near the base), or the probe's own
    half-range if that is larger."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "probes", "*-seed*.json"))):
        with open(path) as f:
            record = json.load(f)
        runs.setdefault(record["probe"], []).append(record)
    table = {}
    for name, records in runs.items():
        by_step = {}
        for record in records:
            for row in record["curve"][1:]:
                by_step.setdefault(row["step"], []).append(row["fd"])
        curve = {step: _spread(fds) for step, fds in sorted(by_step.items())}
        last = [{"seed": r["seed"], **{k: r["curve"][-1][k] for k in ("step", "fd", *COVERAGE)
                                       if k in r["curve"][-1]}} for r in records]
        table[name] = {"seeds": sorted(r["seed"] for r in records), "fd_at_1000": curve.get(1000),
                       "curve": {str(step): row for step, row in curve.items()}, "last": last,
                       "train_seconds": statistics.fmean(r["train_seconds"] for r in records),
                       "teacher_heun32_fd": records[0]["teacher_heun32_fd"]}
    base = (table.get("base") or {}).get("fd_at_1000")
    spreads = [_half_range(row["fd_at_1000"]) for row in table.values()
               if row["fd_at_1000"] and row["fd_at_1000"]["n"] > 1
               and (base is None or row["fd_at_1000"]["mean"] <= REGIME * base["mean"])]
    noise = max(spreads, default=float("nan"))
    for name, row in table.items():
        if base is None or name == "base" or not row["fd_at_1000"]:
            continue
        diff = row["fd_at_1000"]["mean"] - base["mean"]
        row["fd1000_minus_base"] = diff
        row["threshold"] = max(noise, _half_range(row["fd_at_1000"]), _half_range(base))
        row["verdict"] = ("no difference (inside the seed spread)" if not abs(diff) > row["threshold"]
                          else ("better" if diff < 0 else "worse"))
    payload = {**environment(), "seed_noise_at_1000": noise, "regime": REGIME, "probes": table}
    write_json(os.path.join(out, "probes.json"), payload)
    # The plot keeps the curves that say more than the table: probes on several seeds or past 1,000 steps.
    curves = {name: ([int(step) for step in row["curve"]], [c["mean"] for c in row["curve"].values()])
              for name, row in table.items() if len(row["seeds"]) > 1 or max(map(int, row["curve"])) > 1000}
    teacher = next(iter(table.values()))["teacher_heun32_fd"] if table else None
    plot(os.path.join(out, "probes.png"), curves, hlines={"teacher Heun 32": teacher} if teacher else None,
         title=f"MNIST probes: one-step FD (γ = {GW}), mean over seeds")
    for name, row in sorted(table.items(), key=lambda kv: (kv[1]["fd_at_1000"] or {"mean": float("inf")})["mean"]):
        at = row["fd_at_1000"]
        head = f"FD@1000 {at['mean']:6.2f} [{at['min']:.2f}, {at['max']:.2f}] n={at['n']}" if at else "FD@1000 -"
        ends = ", ".join(f"s{r['seed']}@{r['step']}: {r['fd']:.2f}/{r.get('recall', float('nan')):.3f}"
                         for r in row["last"])
        print(f"{name:<20} {head}  last FD/recall {ends}  {row.get('verdict', '')}")
    return payload
