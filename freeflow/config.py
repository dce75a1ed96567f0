"""Training configuration: presets, command-line flags, validation (all before any work starts)."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import textwrap
from dataclasses import dataclass, fields

from .distill import DistillConfig
from .kernels._dispatch import check_backend


@dataclass
class TrainConfig:
    """Everything about a run except the distillation hyperparameters (``DistillConfig``)."""

    preset: str = "mnist"
    """Named starting point (see the list below); its values override these defaults."""
    teacher_ckpt: str = ""
    """Teacher checkpoint (official DiT/SiT/REPA layouts or ours). Empty: the preset's bundled teacher."""
    teacher_family: str = ""
    """Override the inferred checkpoint family ("sit", "repa", "freeflow", "internal")."""
    out: str = "runs/freeflow-mnist"
    """Run folder: config.json, metrics.jsonl, checkpoints/, samples/, student_ema.pt."""
    steps: int = 1200
    """Optimizer steps in total (a resumed run continues up to this count)."""
    batch_size: int = 64
    """Global batch (split across processes), divided pred_fraction / correction."""
    lr: float = 1e-4
    """AdamW learning rate of the student."""
    aux_lr: float = 1e-4
    """AdamW learning rate of the auxiliary network g_ψ."""
    lr_schedule: str = "constant"
    """Student learning rate over the run: "constant" or "cosine" (from --lr down to 0 at --steps; a function of
    the step and --steps, so a run resumed with a larger --steps follows the longer schedule from there)."""
    aux_updates: int = 1
    """Aux optimizer updates per student step: the first on the step's own correction rows, the others on fresh
    ones (the aux network tracks the moving student more closely)."""
    aux_warmup: int = 0
    """Aux-only updates before the student's first step (the correction then starts from a fitted g_ψ)."""
    beta1: float = 0.9
    """AdamW β1 (student and aux)."""
    beta2: float = 0.95
    """AdamW β2 (student and aux)."""
    weight_decay: float = 0.0
    """AdamW weight decay (student and aux)."""
    grad_clip: float = 1.0
    """Clip the student's global gradient norm (0 = off)."""
    ema_decay: float = 0.9999
    """Decay of the student's EMA (what student_ema.pt holds)."""
    student_extra_depth: int = 0
    """DiT blocks the student has beyond the teacher's depth, appended after them (adaLN-Zero, so the student
    still starts as the teacher's Euler step): capacity for the one-step map. 0: the teacher's architecture."""
    aux: str = "full"
    """Auxiliary network g_ψ: "full" copy of the teacher or "lora" adapters (memory)."""
    lora_rank: int = 32
    """Rank of the LoRA adapters when --aux lora."""
    seed: int = 0
    """Seed of the training stream (noises, classes, γ, δ) and of the grid."""
    precision: str = "auto"
    """Autocast of every network (student with its tangent, aux, teacher): "auto" (bf16 on CUDA, fp32 on CPU),
    "bf16" (also on CPU, through CPU autocast) or "fp32". Master weights, optimizer state, EMA and the loss
    reductions are fp32 in every mode."""
    tf32: bool = True
    """TF32 for fp32 matmuls and convolutions on CUDA (--no-tf32 turns both off)."""
    threads: int = 0
    """CPU threads per process (torch.set_num_threads). 0: all cores or 1, whichever a second of timing at start
    finds faster on the machine as it is (a resumed run keeps the count it recorded; torch's default where
    OMP_NUM_THREADS is set, as torchrun does)."""
    backend: str = "auto"
    """Kernels: "auto" (Triton on CUDA), "reference" or "triton"."""
    compile: bool = False
    """torch.compile the networks: the student's forward with its tangent and its plain forward, the aux network
    and the teacher (compiled on first use; the compile time is logged once)."""
    compile_mode: str = "default"
    """With --compile: "default", "reduce-overhead" (CUDA graphs), "max-autotune", or "aot_eager" (graphs captured
    and run without Inductor's code generation: checks that everything traces, quickly)."""
    log_every: int = 10
    """Steps between rows of metrics.jsonl (and TensorBoard / W&B)."""
    ckpt_every: int = 200
    """Steps between checkpoints (atomic; a killed run resumes from the newest good one)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in OUT/checkpoints."""
    sample_every: int = 200
    """Steps between teacher-vs-student grids in OUT/samples (written after the checkpoint)."""
    grid_size: int = 8
    """Samples per row in the teacher-vs-student grid."""
    teacher_steps: int = 32
    """Heun steps of the teacher in the sample grid and the evaluation."""
    eval_gw: float = 2.0
    """Guidance weight γ of the sample grid and the evaluation."""
    eval_samples: int = 2000
    """Samples per FD entry in the final evaluation (presets with a feature space: mnist)."""
    evaluate: bool = True
    """Run the final evaluation (mnist preset with its bundled teacher)."""
    resume: bool = True
    """Continue from the newest good checkpoint in --out when there is one."""
    smoke: bool = False
    """A few steps and a small evaluation: checks the whole pipeline in a minute (CI)."""
    vae: str = ""
    """Local diffusers AutoencoderKL folder: grids of latent models are decoded through it (else channel 0)."""
    wandb: str = ""
    """Weights & Biases project to log the metrics to (needs `pip install wandb`); empty: off."""

    def validate(self):
        _positive(self, "steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints", "sample_every",
                  "grid_size", "teacher_steps", "eval_samples", "lora_rank")
        _positive(self, "aux_updates")
        _nonnegative(self, "weight_decay", "grad_clip", "seed", "threads", "student_extra_depth", "aux_warmup")
        _choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        for name in ("lr", "aux_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)} must be > 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)!r}")
        _choice("preset", self.preset, tuple(PRESETS))
        _choice("aux", self.aux, ("full", "lora"))
        _choice("precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("compile_mode", self.compile_mode, COMPILE_MODES)
        check_backend(self.backend, "--backend")
        _choice("teacher_family", self.teacher_family, ("", "sit", "repa", "freeflow", "internal"))
        if PRESETS[self.preset].get("needs_teacher_ckpt") and not self.teacher_ckpt:
            raise ValueError(f"--preset {self.preset} needs --teacher-ckpt PATH (an official checkpoint file)")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "aot_eager")


def _flag(name):
    return name.replace("_", "-")


def _positive(cfg, *names):
    for n in names:
        if not getattr(cfg, n) >= 1:
            raise ValueError(f"--{_flag(n)} must be a positive integer, got {getattr(cfg, n)!r}")


def _nonnegative(cfg, *names):
    for n in names:
        if getattr(cfg, n) < 0:
            raise ValueError(f"--{_flag(n)} must be >= 0, got {getattr(cfg, n)!r}")


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"--{_flag(name)} must be one of {choices}, got {value!r}")


# Presets: overrides of TrainConfig / DistillConfig fields. ImageNet presets follow docs/design.md §3's
# defaults (AdamW 1e-4, β=(0.9, 0.95), EMA 0.9999); γ ranges cover the usual CFG scales.
_IMAGENET = dict(needs_teacher_ckpt=True, batch_size=256, steps=100_000, ema_decay=0.9999, gw_min=1.0,
                 gw_max=4.0, eval_gw=1.5, ckpt_every=5000, sample_every=5000, log_every=50,
                 teacher_steps=64)
PRESETS = {
    # The mnist preset's values were each measured on the demo: docs/experiments.md, "How the demo preset was tuned"
    # and "What the demo preset takes from this".
    "mnist": dict(out="runs/freeflow-mnist", steps=2000, batch_size=64, lr=3e-4, aux_lr=3e-4, threads=0,
                  ema_decay=0.995, gw_min=1.0, gw_max=2.0, eval_gw=1.25, eps=1e-2, delta_dist="logit_normal",
                  corr_guidance_interval=(0.0, 1.0), eval_samples=1500, ckpt_every=200, sample_every=200),
    # A preset named after a family reads its teacher in that family's convention (SiT's released files are plain
    # state dicts, which carry no sign of the family); --teacher-family still overrides it.
    "sit-b2-256": dict(_IMAGENET, out="runs/freeflow-sit-b2-256", teacher_family="sit"),
    "sit-xl2-256": dict(_IMAGENET, out="runs/freeflow-sit-xl2-256", aux="lora", teacher_family="sit"),
    "repa-xl2-256": dict(_IMAGENET, out="runs/freeflow-repa-xl2-256", aux="lora", teacher_family="repa"),
    "repa-xl2-512": dict(_IMAGENET, out="runs/freeflow-repa-xl2-512", aux="lora", batch_size=128,
                         teacher_family="repa"),
}
# Help for the DistillConfig fields whose docstring sits on their partner field (freeflow/distill/engine.py).
DISTILL_HELP = {
    "delta_logit_mean": 'Mean of logit(δ) when --delta-dist logit_normal.',
    "delta_logit_std": 'Std of logit(δ) when --delta-dist logit_normal.',
    "gw_max": "Upper end of the γ range (see --gw-min).",
    "r_logit_std": "Std of logit(r) of the correction (see --r-logit-mean).",
    "balance_eps": "ε in the denominator of the balance λ (see --alpha).",
}
PRESET_HELP = {
    "mnist": "the bundled CPU demo: its shipped long teacher, 2,000 steps, FD evaluation (minutes on 2 cores)",
    "sit-b2-256": "SiT-B/2 at 256 px (latent 32x32x4): needs --teacher-ckpt, full aux copy",
    "sit-xl2-256": "SiT-XL/2 at 256 px: needs --teacher-ckpt, LoRA aux",
    "repa-xl2-256": "REPA SiT-XL/2 at 256 px (the paper's 1.45 FID setting): needs --teacher-ckpt, LoRA aux",
    "repa-xl2-512": "REPA SiT-XL/2 at 512 px: needs --teacher-ckpt, LoRA aux, global batch 128",
}
SMOKE = dict(steps=6, batch_size=8, log_every=1, ckpt_every=3, sample_every=6, eval_samples=64, teacher_steps=8,
             grid_size=4)


def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under a field), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _shown(value):
    return "''" if value == "" else (" ".join(map(str, value)) if isinstance(value, tuple) else value)


def _help(doc, default, preset=None, value=None):
    """The field's docstring and the value that runs: the preset's where it sets the field, else the default."""
    if preset is None:
        runs = f"default: {_shown(default)}"
    else:
        runs = f"--preset {preset}: {_shown(value)}; default {_shown(default)}"
    return f"{doc + ' ' if doc else ''}({runs})".replace("%", "%%")


def _add_field(parser, f, default, doc="", preset=None):
    flag = "--" + _flag(f.name)
    sets = preset is not None and f.name in PRESETS[preset]
    help_text = _help(doc, default, preset, PRESETS[preset][f.name]) if sets else _help(doc, default)
    kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
    if isinstance(default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif isinstance(default, tuple):
        parser.add_argument(flag, nargs=len(default), type=type(default[0]), metavar=("LO", "HI"), **kw)
    else:
        parser.add_argument(flag, type=type(default), **kw)


def build_parser(preset: str = TrainConfig.preset) -> argparse.ArgumentParser:
    """The flags, each with its help and the value that will run under ``preset`` (``--help --preset NAME``)."""
    presets = "\n".join(f"  {name:<14} {PRESET_HELP.get(name, '')}" for name in PRESETS)
    p = argparse.ArgumentParser(
        prog="python -m freeflow.train",
        description="FreeFlow: data-free flow map distillation. With no arguments: the bundled MNIST demo "
                    "(distils the shipped teacher into a one-step student on CPU and reports FD).",
        epilog=f"presets (--preset NAME; the values shown above are --preset {preset}'s: `--help --preset NAME` "
               f"shows another's):\n{presets}\n\n"
               "Precedence: flags > --smoke > --config file > preset > defaults. "
               "A run writes OUT/config.json; `--config OUT/config.json` replays it.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                   help="replay a run's config.json ({'train': ..., 'distill': ...}); flags beside it override it")
    run = p.add_argument_group("run")
    docs = field_docs(TrainConfig)
    for f in fields(TrainConfig):
        _add_field(run, f, f.default, docs.get(f.name, ""), preset)
    dis = p.add_argument_group("distillation (freeflow.distill.DistillConfig; see docs/distill.md)")
    docs = {**DISTILL_HELP, **field_docs(DistillConfig)}
    for f in fields(DistillConfig):
        _add_field(dis, f, f.default, docs.get(f.name, ""), preset)
    return p


def _chosen_preset(argv) -> str:
    """``--preset`` as given (so that ``--help`` shows that preset's values); the default one otherwise."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=TrainConfig.preset)
    name = pre.parse_known_args(argv)[0].preset
    return name if name in PRESETS else TrainConfig.preset


def load_config_file(path: str) -> dict:
    """The ``train`` and ``distill`` values of a run's config.json, as one flat dict."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r} is not a file (expected a run's config.json)")
    try:
        with open(path) as f:
            record = json.load(f)
    except ValueError as e:
        raise ValueError(f"--config {path!r} is not valid JSON: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("train"), dict):
        raise ValueError(f"--config {path!r} must hold {{'train': {{...}}, 'distill': {{...}}}} "
                         "as written by python -m freeflow.train")
    values = {**record["train"], **record.get("distill", {})}
    known = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(DistillConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path!r} has unknown keys {unknown}")
    return values


def parse_args(argv=None) -> tuple[TrainConfig, DistillConfig]:
    """Flags > --smoke > --config file > preset > defaults. Unknown flags and invalid values raise before any work."""
    args = vars(build_parser(_chosen_preset(argv)).parse_args(argv))
    replay = load_config_file(args.pop("config")) if "config" in args else {}
    preset = args.get("preset", replay.get("preset", TrainConfig.preset))
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {tuple(PRESETS)}, got {preset!r}")
    merged = {k: v for k, v in PRESETS[preset].items() if k != "needs_teacher_ckpt"}
    merged.update(replay)  # a replayed config.json already holds its preset's and --smoke's values
    if args.get("smoke"):
        merged.update(SMOKE)
    merged.update(args)
    return split_config(merged)


def split_config(values: dict) -> tuple[TrainConfig, DistillConfig]:
    train_names = {f.name for f in fields(TrainConfig)}
    dist_names = {f.name for f in fields(DistillConfig)}
    unknown = set(values) - train_names - dist_names
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    tc = TrainConfig(**{k: v for k, v in values.items() if k in train_names})
    tc.validate()
    dc = DistillConfig(**{k: v for k, v in values.items() if k in dist_names})
    return tc, dc


def config_dict(tc: TrainConfig, dc: DistillConfig) -> dict:
    return json.loads(json.dumps({"train": dataclasses.asdict(tc), "distill": dataclasses.asdict(dc)}))
