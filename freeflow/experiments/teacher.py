"""A teacher worth distilling: the demo teacher's architecture trained longer, and its FD table.

Trains with ``python -m freeflow.demo.assets --what teacher`` (same recipe as the shipped teacher, ``--steps``
instead of 3,600) into ``--runs/teacher``, then scores the shipped and the new teacher side by side on the
fixed inputs of :class:`~freeflow.experiments.common.Scorer`: a γ sweep (Heun 8 steps) and Heun 1/2/4/32
steps at the best γ, with precision, recall and class coverage. ``--install`` copies the new teacher into the
package assets as ``mnist_teacher_long.pt``.
"""
from __future__ import annotations

import json
import os
import shutil

from ..demo import ASSETS_DIR, FEATURE_NET_FILE, LOG_FILE, LONG_TEACHER_FILE, STATS_FILE, TEACHER_FILE
from .common import Scorer, environment, load_teacher, plot, write_json


def add_arguments(p):
    p.add_argument("--steps", type=int, default=14_400, help="teacher training steps (default: 14400, 4x the shipped)")
    p.add_argument("--samples", type=int, default=1500, help="samples per FD (default: 1500)")
    p.add_argument("--gammas", default="1.0,1.25,1.5,2.0,2.5,3.0", help="guidance scales of the sweep")
    p.add_argument("--install", action="store_true", help=f"copy the new teacher to the assets as {LONG_TEACHER_FILE}")


def _trained_steps(folder):
    path = os.path.join(folder, LOG_FILE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, TEACHER_FILE)):
        return 0
    with open(path) as f:
        return json.load(f).get("teacher", {}).get("steps", 0)


def _score(teacher, gammas, n, label):
    sweep = {str(g): Scorer(n=500, gw=g).score_teacher(teacher, 8, coverage=False)["fd"] for g in gammas}
    best = float(min(sweep, key=sweep.get))
    scorer = Scorer(n=n, gw=best)
    table = {f"heun{s}": scorer.score_teacher(teacher, s) for s in (1, 2, 4, 32)}
    print(f"[teacher] {label}: γ sweep {sweep}; Heun 1/2/4/32 at γ={best}: "
          + "/".join(f"{table[f'heun{s}']['fd']:.2f}" for s in (1, 2, 4, 32)))
    return {"gamma_sweep": sweep, "gamma": best, "table": table}


def run(args) -> dict:
    from ..demo import assets

    folder = os.path.join(args.runs, "teacher")
    if _trained_steps(folder) != args.steps:
        os.makedirs(folder, exist_ok=True)
        for name in (FEATURE_NET_FILE, STATS_FILE):  # the FD space stays the shipped one
            shutil.copy(ASSETS_DIR / name, os.path.join(folder, name))
        assets.main(["--what", "teacher", "--out", folder, "--steps", str(args.steps), "--threads", str(args.threads),
                     "--checkpoint-dir", os.path.join(folder, "checkpoints")])
    with open(os.path.join(folder, LOG_FILE)) as f:
        record = json.load(f)["teacher"]
    gammas = [float(g) for g in args.gammas.split(",")]
    shipped = _score(load_teacher(), gammas, args.samples, "shipped")
    new_path = os.path.join(folder, TEACHER_FILE)
    longer = _score(load_teacher(new_path), gammas, args.samples, f"{args.steps} steps")
    payload = {**environment(), "samples": args.samples, "shipped": shipped, "long": longer,
               "long_training": {k: record[k] for k in ("command", "steps", "seconds", "params", "final_loss",
                                                        "loss_curve")},
               "long_size_bytes": os.path.getsize(new_path)}
    write_json(os.path.join(args.out, "teacher.json"), payload)
    steps = [1, 2, 4, 32]

    def curve(r):
        return steps, [r["table"][f"heun{s}"]["fd"] for s in steps]
    plot(os.path.join(args.out, "teacher.png"),
         {f"shipped (3,600 steps, γ={shipped['gamma']})": curve(shipped),
          f"long ({args.steps:,} steps, γ={longer['gamma']})": curve(longer)},
         xlabel="Heun steps", xlog=True, title="Demo teacher: FD against sampling steps")
    if args.install:
        shutil.copy(new_path, ASSETS_DIR / LONG_TEACHER_FILE)
    return payload
