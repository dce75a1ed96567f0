"""Teacher-data mismatch: data-based distillation on augmented digits against data-free distillation.

The data-based baseline is :class:`freeflow.distill.MeanFlowDistiller` (docs/distill.md, "Data-based
baseline"): the same student (the teacher's network with δ and γ embedders, initialised as the teacher), the
same optimiser, batch, EMA and number of steps as the ``mnist`` preset, but trained on states ``x_t`` built
by noising the 5,000 bundled digits after :func:`freeflow.demo.data.augment` at each ``--strengths`` value.
The data-free student is the study's base setting (``STUDY_BASE``: the convergence run's checkpoints, or its own
run), which never
reads data and so is the same at every strength. Also reported: the FD of the augmented digits themselves
(how far each strength moves the data from the teacher's distribution).
"""
from __future__ import annotations

import copy
import json
import os

import torch

from ..checkpointing import CheckpointDir
from ..config import PRESETS
from ..demo.data import augment, load_digits
from ..distill import MeanFlowConfig, MeanFlowDistiller
from ..ema import ema_update_
from ..models import FlowMapStudent
from .common import (
    STUDY_BASE,
    Scorer,
    convergence_run,
    environment,
    load_teacher,
    plot,
    score_checkpoints,
    train_run,
    write_json,
)

PRESET = PRESETS["mnist"]


def add_arguments(p):
    p.add_argument("--steps", type=int, default=1000, help="training steps per student (default: 1000)")
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between checkpoints (default: 250)")
    p.add_argument("--strengths", default="0,0.25,0.5,1", help="augmentation strengths in [0, 1]")
    p.add_argument("--samples", type=int, default=1500, help="samples per FD (default: 1500)")


def train_baseline(run_dir, teacher, images, labels, strength, steps, ckpt_every, seed=0):
    """The MeanFlow-form student on ``augment(digits, strength)``, with the preset's optimiser; resumable."""
    torch.manual_seed(seed)
    student = FlowMapStudent.from_teacher(teacher).train()
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=PRESET["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    config = MeanFlowConfig(gw_min=PRESET["gw_min"], gw_max=PRESET["gw_max"], eps=PRESET["eps"])
    distiller = MeanFlowDistiller(student, teacher, config, num_classes=teacher.config.num_classes)
    generator = torch.Generator().manual_seed(seed)
    ckpts = CheckpointDir(os.path.join(run_dir, "checkpoints"), keep=100_000)
    state, _ = ckpts.load_newest_good()
    step = 0
    if state is not None:
        student.load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        generator.set_state(state["generator"])
        step = state["step"]
    while step < steps:
        idx = torch.randint(0, len(images), (PRESET["batch_size"],), generator=generator)
        x = augment(images[idx], strength, generator)
        opt.zero_grad(set_to_none=True)
        out = distiller.losses(x, labels[idx], generator)
        out["student"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update_(ema, student, PRESET["ema_decay"])
        step += 1
        if step % ckpt_every == 0 or step == steps:
            ckpts.save(step, {"step": step, "student": student.state_dict(), "ema": ema.state_dict(),
                              "opt": opt.state_dict(), "generator": generator.get_state()})
            print(f"[mismatch] strength {strength}: step {step}, loss {out['pred_loss']:.4f}", flush=True)
    return run_dir


def run(args) -> dict:
    strengths = [float(s) for s in args.strengths.split(",")]
    for s in strengths:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"--strengths must be in [0, 1], got {s!r}")
    teacher, scorer = load_teacher(), Scorer(n=args.samples)
    images, labels = load_digits()
    free_dir = convergence_run(args.runs, args.steps) or \
        train_run(os.path.join(args.runs, "mismatch-free"), args.steps, args.ckpt_every, STUDY_BASE)
    path = os.path.join(args.out, "mismatch.json")
    done = {}
    if os.path.isfile(path):
        with open(path) as f:
            done = json.load(f).get("data_based", {})
    free = score_checkpoints(scorer, teacher, free_dir, max_step=args.steps)
    data_based, drift = {}, {}
    payload = {**environment(), "scorer": scorer.settings(), "steps": args.steps,
               "data_free": {"run": free_dir, "curve": free}, "data_based": data_based, "augmented_data": drift}
    real = torch.randperm(len(images), generator=torch.Generator().manual_seed(4))[: args.samples]  # sorted by label
    for s in strengths:
        drift[str(s)] = scorer.score(augment(images[real], s, torch.Generator().manual_seed(5)), labels[real])
        if str(s) in done and done[str(s)]["curve"][-1]["step"] >= args.steps:
            data_based[str(s)] = done[str(s)]
            continue
        run_dir = os.path.join(args.runs, f"mismatch-{s:g}")
        train_baseline(run_dir, teacher, images, labels, s, args.steps, args.ckpt_every)
        data_based[str(s)] = {"run": run_dir, "curve": score_checkpoints(scorer, teacher, run_dir)}
        write_json(path, payload)  # after each strength, so a killed call keeps the finished ones
    write_json(path, payload)
    xs = strengths
    plot(os.path.join(args.out, "mismatch.png"),
         {"data-based (MeanFlow form)": (xs, [data_based[str(s)]["curve"][-1]["fd"] for s in xs]),
          "data-free (FreeFlow)": (xs, [free[-1]["fd"]] * len(xs)),
          "augmented digits themselves": (xs, [drift[str(s)]["fd"] for s in xs])},
         xlabel="augmentation strength", logy=True,
         title=f"Teacher-data mismatch: one-step FD after {args.steps} steps ({scorer.n} samples)")
    return payload
