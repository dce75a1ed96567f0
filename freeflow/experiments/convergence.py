"""Convergence: FD of the one-step student against training step, next to the teacher's 1/2/4/32-step FD.

The run is the ``mnist`` demo preset with the paper's correction guidance interval [0, 0.7] (``STUDY_BASE``;
the preset itself now uses [0, 1], see ``ablation``; batch 64, 1 thread) continued to ``--steps`` with a
checkpoint every ``--ckpt-every`` steps; every ``--every``-th checkpoint's EMA student is scored on the fixed inputs of
:class:`~freeflow.experiments.common.Scorer` (1,500 samples, γ = 2), the last one with precision, recall and
class coverage too. ``--no-train`` scores what a (still running or stopped) run has so far. Every run distils
``STUDY_SETUP`` (the first bundled teacher, γ ∈ [1.5, 2.5]) unless told otherwise. ``--preset`` uses the
preset's correction interval [0, 1] instead (runs/convergence-preset, results ``convergence-preset.json`` /
``.png``): does the better interval at 1,000 steps also give a lower plateau? ``--set KEY=VALUE`` changes one
training option on top (its own run folder and results, named after the change): the plateau probes. ``--set
teacher_ckpt=PATH`` distils another teacher (named by its file stem; with ``--set gw_min=1 --set gw_max=2`` and
the long teacher it is the demo preset as shipped); ``--gw`` scores student and teacher baselines at that
teacher's own best guidance scale (the first teacher's is 2).

At the last checkpoint it also scores the raw weights and uniform averages of the raw and EMA weights over
the last ``--windows`` steps: if averaging over a longer window beat the EMA, the curve would be limited by
optimiser noise (a longer EMA or a decayed learning rate would help); if not, by the objective or capacity.
"""
from __future__ import annotations

import argparse
import os

from ..demo import TEACHER_FILE
from .common import (
    STUDY_BASE,
    Scorer,
    averaged_student,
    checkpoint_steps,
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
    p.add_argument("--windows", default="1000,2000,4000",
                   help="comma-separated step windows for the weight-averaging check (default: 1000,2000,4000)")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="train (resume) before scoring (default: on)")
    p.add_argument("--preset", action=argparse.BooleanOptionalAction, default=False,
                   help="the mnist preset's correction guidance [0, 1] instead of STUDY_BASE's [0, 0.7]")
    p.add_argument("--gw", type=float, default=2.0,
                   help="guidance scale γ of every FD (student and teacher baselines; default: 2.0, the "
                        "study teacher's best; a --set teacher_ckpt may want another)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change one training option (a python -m freeflow.train flag without its dashes, e.g. "
                        "delta_one_prob=1 or corr_guidance_interval=0,1); repeatable; the run and its results "
                        "are named after the changes (runs/convergence[-preset]-KEY=VALUE)")


def parse_overrides(items: list[str]) -> dict:
    """``["a_b=1", "c=0,0.7"]`` → ``{"a_b": "1", "c": ("0", "0.7")}``: the values go to the CLI as typed."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"--set expects KEY=VALUE (e.g. delta_one_prob=1), got {item!r}")
        out[key.strip().replace("-", "_")] = tuple(value.split(",")) if "," in value else value
    return out


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def run_name(preset: bool, overrides: dict, gw: float = 2.0) -> str:
    """The run's (and its results') name: the changes in order, a path value by its file stem."""
    def show(v):
        if isinstance(v, tuple):
            return ",".join(v)
        return _stem(v) if os.sep in v else v
    changes = "".join(f"-{k}={show(v)}" for k, v in overrides.items())
    return ("convergence-preset" if preset else "convergence") + changes + (f"-gw={gw:g}" if gw != 2.0 else "")


def run(args) -> dict:
    overrides = parse_overrides(args.overrides)
    name = run_name(args.preset, overrides, args.gw)
    run_dir = os.path.join(args.runs, run_name(args.preset, overrides))  # γ of the scores: not of the run
    if args.train:
        train_run(run_dir, args.steps, args.ckpt_every, {**({} if args.preset else STUDY_BASE), **overrides})
    teacher_ckpt = overrides.get("teacher_ckpt", "")
    teacher, scorer = load_teacher(teacher_ckpt), Scorer(n=args.samples, gw=args.gw)
    cache = "teacher_fd.json" if not teacher_ckpt and args.gw == 2.0 else \
        f"teacher_fd-{_stem(teacher_ckpt or TEACHER_FILE)}-gw={args.gw:g}.json"
    baselines = teacher_baselines(scorer, teacher, os.path.join(args.out, cache), teacher_ckpt=teacher_ckpt)
    rows = score_checkpoints(scorer, teacher, run_dir, every=args.every)
    averaging = weight_averaging(scorer, teacher, run_dir, [int(w) for w in args.windows.split(",")],
                                 last=rows[-1]["step"])
    best = min(rows, key=lambda r: r["fd"])
    teacher32 = baselines["heun32"]["fd"]
    payload = {**environment(), "scorer": scorer.settings(), "run": run_dir, "steps_trained": rows[-1]["step"],
               "train_seconds": run_seconds(run_dir), "teacher": baselines, "curve": rows,
               "averaging": averaging,
               "best": {"step": best["step"], "fd": best["fd"]},
               "final_over_teacher32": rows[-1]["fd"] / teacher32, "best_over_teacher32": best["fd"] / teacher32}
    write_json(os.path.join(args.out, f"{name}.json"), payload)
    plot(os.path.join(args.out, f"{name}.png"),
         {"student, 1 step (EMA)": ([r["step"] for r in rows[1:]], [r["fd"] for r in rows[1:]])},
         hlines={f"teacher Heun {n} (NFE {2 * n - 1})": baselines[f"heun{n}"]["fd"] for n in (1, 2, 4, 32)},
         title=f"MNIST demo{' preset' if args.preset else ''}{' ' + ' '.join(args.overrides)}: one-step FD vs step "
               f"({scorer.n} samples, γ = {scorer.gw})")
    print(f"[{name}] step {rows[-1]['step']}: FD {rows[-1]['fd']:.2f} (best {best['fd']:.2f} at "
          f"{best['step']}); teacher Heun 32: {teacher32:.2f}")
    return payload


def weight_averaging(scorer, teacher, run_dir, windows, last: int | None = None) -> list[dict]:
    """FD at checkpoint ``last`` (default: the newest) of: its raw weights, its EMA, and uniform averages of
    the raw and of the EMA weights over the checkpoints of the ``w`` steps up to it, for each window ``w``
    that fits in the run. ``last`` pins the step when the run is still writing checkpoints."""
    ckpts = checkpoint_steps(run_dir)
    if last is not None:
        ckpts = {s: p for s, p in ckpts.items() if s <= last}
    if not ckpts:
        return []
    last = max(ckpts)
    rows = [{"weights": "raw", "window": 0, **scorer.score_student(averaged_student(teacher, [ckpts[last]]))},
            {"weights": "ema", "window": 0, **scorer.score_student(averaged_student(teacher, [ckpts[last]], "ema"))}]
    for w in sorted(windows):
        if w >= last:
            continue
        paths = [p for s, p in sorted(ckpts.items()) if s > last - w]
        for key, name in (("student", "raw average"), ("ema", "ema average")):
            rows.append({"weights": name, "window": w, "checkpoints": len(paths),
                         **scorer.score_student(averaged_student(teacher, paths, key))})
    for r in rows:
        print(f"[experiments] {run_dir} step {last}, {r['weights']} over {r['window']} steps: FD {r['fd']:.2f}",
              flush=True)
    return rows
