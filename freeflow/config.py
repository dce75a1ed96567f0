"""Training configuration: presets, command-line flags, validation (all before any work starts)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, fields

from .distill import DistillConfig
from .kernels import check_backend


@dataclass
class TrainConfig:
    """Everything about a run except the distillation hyperparameters (``DistillConfig``)."""

    preset: str = "mnist"
    teacher_ckpt: str = ""
    """Teacher checkpoint (official DiT/SiT/REPA layouts or ours). Empty: the preset's bundled teacher."""
    teacher_family: str = ""
    """Override the inferred checkpoint family ("sit", "repa", "freeflow", "internal")."""
    out: str = "runs/freeflow-mnist"
    steps: int = 1200
    batch_size: int = 64
    """Global batch (split across processes), divided pred_fraction / correction."""
    lr: float = 1e-4
    aux_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Clip the student's global gradient norm (0 = off)."""
    ema_decay: float = 0.9999
    aux: str = "full"
    """Auxiliary network g_ψ: "full" copy of the teacher or "lora" adapters (memory)."""
    lora_rank: int = 32
    seed: int = 0
    precision: str = "auto"
    """"auto" (bf16 autocast for the teacher on CUDA, fp32 on CPU), "fp32" or "bf16"."""
    tf32: bool = True
    threads: int = 0
    """CPU threads per process (torch.set_num_threads); 0 keeps torch's default."""
    backend: str = "auto"
    """Kernels: "auto" (Triton on CUDA), "reference" or "triton"."""
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    sample_every: int = 200
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

    def validate(self):
        _positive(self, "steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints", "sample_every",
                  "grid_size", "teacher_steps", "eval_samples", "lora_rank")
        _nonnegative(self, "weight_decay", "grad_clip", "seed", "threads")
        for name in ("lr", "aux_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)} must be > 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)!r}")
        _choice("preset", self.preset, tuple(PRESETS))
        _choice("aux", self.aux, ("full", "lora"))
        _choice("precision", self.precision, ("auto", "fp32", "bf16"))
        check_backend(self.backend, "--backend")
        _choice("teacher_family", self.teacher_family, ("", "sit", "repa", "freeflow", "internal"))
        if PRESETS[self.preset].get("needs_teacher_ckpt") and not self.teacher_ckpt:
            raise ValueError(f"--preset {self.preset} needs --teacher-ckpt PATH (an official checkpoint file)")


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
    # threads=1: on this small model intra-op threads gain little, and on a loaded 2-core machine
    # OpenMP's spinning workers made a step 10-50x slower (0.33 s with 1 thread vs 4-16 s with 2).
    # Tuned on 1,000-step runs (student 1-step FD at γ=2, 2,000 samples): δ=1 mixture 0.25 and lr 3e-4
    # (57.7 vs 58.9 for lr 2e-4 / 1,200 steps / no mixture), γ ∈ [1.5, 2.5] (56.5), ε = 1e-2 (56.6);
    # worse: k = 0.5 (84.9), α = 2 (184.5), α = 0.5 (60.4), no correction (60.4), lr 5e-4 + mixture 0.5 (124.1).
    "mnist": dict(out="runs/freeflow-mnist", steps=1000, batch_size=64, lr=3e-4, aux_lr=3e-4, threads=1,
                  ema_decay=0.995, gw_min=1.5, gw_max=2.5, eval_gw=2.0, eps=1e-2, delta_one_prob=0.25,
                  eval_samples=1500, ckpt_every=200, sample_every=200),
    "sit-b2-256": dict(_IMAGENET, out="runs/freeflow-sit-b2-256"),
    "sit-xl2-256": dict(_IMAGENET, out="runs/freeflow-sit-xl2-256", aux="lora"),
    "repa-xl2-256": dict(_IMAGENET, out="runs/freeflow-repa-xl2-256", aux="lora"),
    "repa-xl2-512": dict(_IMAGENET, out="runs/freeflow-repa-xl2-512", aux="lora", batch_size=128),
}
SMOKE = dict(steps=6, batch_size=8, log_every=1, ckpt_every=3, sample_every=6, eval_samples=64, teacher_steps=8,
             grid_size=4)


def _add_field(parser, f, default):
    flag = "--" + _flag(f.name)
    kw = dict(dest=f.name, default=argparse.SUPPRESS, help=(f.metadata.get("help") or None))
    if isinstance(default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif isinstance(default, tuple):
        parser.add_argument(flag, nargs=len(default), type=type(default[0]), metavar=("LO", "HI"), **kw)
    else:
        parser.add_argument(flag, type=type(default), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m freeflow.train",
        description="FreeFlow: data-free flow map distillation. With no arguments: the bundled MNIST demo "
                    "(distils the shipped teacher into a one-step student on CPU and reports FD).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run = p.add_argument_group("run")
    for f in fields(TrainConfig):
        _add_field(run, f, f.default)
    dis = p.add_argument_group("distillation (freeflow.distill.DistillConfig; see docs/distill.md)")
    for f in fields(DistillConfig):
        _add_field(dis, f, f.default)
    return p


def parse_args(argv=None) -> tuple[TrainConfig, DistillConfig]:
    """Flags > preset > defaults. Unknown flags and invalid values raise before any work."""
    args = vars(build_parser().parse_args(argv))
    preset = args.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {tuple(PRESETS)}, got {preset!r}")
    merged = {k: v for k, v in PRESETS[preset].items() if k != "needs_teacher_ckpt"}
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
