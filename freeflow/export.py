"""``python -m freeflow.export``: a student trained here, written in the official FreeFlow checkpoint layout.

    python -m freeflow.export runs/repa-xl2-256/student_ema.pt --format official -o freeflow-student.pt

The output is a plain state dict that the official FreeFlow ``models.py`` (public repo ShangyuanTong/FreeFlow,
``DiT_XL_2(input_size=32, take_dt=True, take_gw=True)`` for the paper's setting) loads with ``strict=True``,
and whose one-step sample in the official convention equals ``python -m freeflow.sample --mode student`` on the
same noise, class and guidance weight. What changes on the way:

* keys: the three timestep embedders' MLPs are named ``projs`` there (``t_embedder.mlp.*`` →
  ``t_embedder.projs.*``, likewise ``dt_embedder`` / ``gw_embedder``); every other key is the same.
* output shape: the official constructor builds ``learn_sigma=True`` (2C output channels) unless told otherwise;
  a student with C outputs (a REPA teacher's) gets a zero sigma half, which the samplers never read
  (``--learn-sigma off`` writes C outputs for a model built with ``learn_sigma=False``).
* convention: by default the teacher family's own, which is what the official code runs for that teacher: a SiT
  student feeds ``t = 0`` at the noise end and steps ``x = z + dt·F`` (SiT's time and sign), a REPA student
  ``t = 1`` and ``x = z - dt·F`` (REPA's, the one ``load_checkpoint`` reads FreeFlow files in). A student keeps its
  family's convention in its weights (``freeflow.conventions``), so by default they pass unchanged.
  ``--noise-time 0|1`` asks for the other one: the network is rewritten to compute its native function at time
  ``1 - t`` with the opposite sign (:func:`flip_time_and_sign`). Time, δ and γ enter raw (no ×1000) in both codes.

Inputs: ``student_ema.pt`` (``freeflow.models.save_checkpoint``: it records the family), or a training checkpoint
``checkpoints/step_*.pt`` (``--which ema|student``; the family comes from ``--family``, the run's ``config.json``
or the checkpoint's config).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

from .checkpointing import save_atomic
from .conventions import FLIPPED_FAMILIES, VELOCITY_FAMILIES
from .models.checkpoint import FORMAT, _read, _strip_prefixes

FORMATS = ("official",)
_REQUIRED = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight", "pos_embed")
# The official DiT_* constructors: (hidden, depth, heads), as facebookresearch/DiT names them.
_OFFICIAL_NAMES = {(1152, 28, 16): "XL", (1024, 24, 16): "L", (768, 12, 12): "B", (384, 12, 6): "S"}


# -- reading a student ---------------------------------------------------------------------------

def _run_config(path: str) -> dict:
    """The ``config.json`` of the run a training checkpoint (``RUN/checkpoints/step_*.pt``) belongs to, or {}."""
    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.json")
    if not os.path.isfile(run_config):
        return {}
    with open(run_config) as f:
        return json.load(f)


def read_student(path: str, family: str | None = None, which: str = "ema") -> tuple[dict, str, dict | None]:
    """``(state dict with our key names, family, architecture dict or None)`` of a student file; the architecture
    is the saved DiTConfig, or the teacher config in a training checkpoint's run folder."""
    obj = _read(path, weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    config, source = None, "--family"
    if obj.get("format") == FORMAT:
        sd, config = obj["state_dict"], obj.get("config")
        if not family:
            family, source = obj.get("family"), "the file"
    elif isinstance(obj.get("ema"), dict) and isinstance(obj.get("student"), dict):
        if which not in ("ema", "student"):
            raise ValueError(f"--which must be 'ema' or 'student', got {which!r}")
        sd = obj[which]
        if not sd or not all(k.startswith("net.") for k in sd):
            raise ValueError(f"{path}[{which!r}] is not a FlowMapStudent state dict (keys 'net.…')")
        sd = {k[len("net."):]: v for k, v in sd.items()}
        run = _run_config(path)
        config = run.get("teacher_config")  # input size and heads; the depth is read from the weights
        if not family:
            # config.json has the family the run resolved; the checkpoint's config only the flag as given
            # (empty when the family was inferred from the teacher file)
            family, source = run.get("teacher_family", ""), "the run's config.json"
            if not family:
                family = ((obj.get("config") or {}).get("train") or {}).get("teacher_family", "")
                source = "the run's config.json or the checkpoint's config"
    else:
        sd = next((obj[k] for k in ("ema", "model", "state_dict") if isinstance(obj.get(k), dict)), obj)
    sd = _strip_prefixes(sd)
    if any(re.match(r"^(t|dt|gw)_embedder\.projs\.", k) for k in sd):
        raise ValueError(f"{path} is already in the official FreeFlow layout (*_embedder.projs.*): nothing to export")
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ValueError(f"{path} is not a DiT/SiT student: no {', '.join(missing)}")
    if "dt_embedder.mlp.0.weight" not in sd or "gw_embedder.mlp.0.weight" not in sd:
        raise ValueError(f"{path} is not a FreeFlow student: it has no dt_embedder/gw_embedder (a teacher "
                         "checkpoint?). Export the student_ema.pt that python -m freeflow.train writes, or a "
                         "checkpoints/step_*.pt of the run")
    if not family:
        raise ValueError(f"cannot tell the teacher family of {path} (not recorded in {source}): pass --family sit "
                         "or --family repa")
    if family not in VELOCITY_FAMILIES:
        raise ValueError(f"family {family!r} (from {source}) is not a flow-student family; expected one of "
                         f"{VELOCITY_FAMILIES}")
    return dict(sd), family, config


# -- the conversion -------------------------------------------------------------------------------

def _out_rows(sd: dict) -> tuple[int, int]:
    """``(patch², output channels)`` of the final Linear, whose rows are ordered (p, q, channel)."""
    patch = sd["x_embedder.proj.weight"].shape[-1]
    return patch * patch, sd["final_layer.linear.weight"].shape[0] // (patch * patch)


def flip_time_and_sign(sd: dict) -> dict:
    """Rewrite a student so that ``F'(x, s) = -F(x, 1 - s)``: its native function at the mirrored time, negated.

    The time features ``[cos ωs, sin ωs]`` at ``1 - s`` are a fixed linear map (a reflection) of those at ``s``:
    ``cos ω(1-s) = cos ω·cos ωs + sin ω·sin ωs`` and ``sin ω(1-s) = sin ω·cos ωs - cos ω·sin ωs``, so the
    first time Linear absorbs it exactly (``W' = W·R``) and the map holds at every time, not only at the noise
    end. The sign folds into the final Linear's velocity rows; the learned-sigma half is never sampled from.
    """
    out = dict(sd)
    w = sd["t_embedder.mlp.0.weight"]
    dim = w.shape[1]
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    c, s = torch.diag(torch.cos(freqs)), torch.diag(torch.sin(freqs))
    reflect = torch.eye(dim, dtype=torch.float64)  # an odd dim's zero pad feature stays where it is
    reflect[:half, :half], reflect[:half, half:2 * half] = c, s
    reflect[half:2 * half, :half], reflect[half:2 * half, half:2 * half] = s, -c
    out["t_embedder.mlp.0.weight"] = (w.double() @ reflect).to(w.dtype)

    pp, oc = _out_rows(sd)
    ch = sd["x_embedder.proj.weight"].shape[1]
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        v = sd[key].clone()
        rows = v.view(pp, oc, *v.shape[1:])
        rows[:, :ch] = -rows[:, :ch]
        out[key] = v
    return out


def set_learn_sigma(sd: dict, learn_sigma: bool) -> dict:
    """Final Linear with 2C (zero sigma half added if absent) or C (sigma half dropped) output channels."""
    pp, oc = _out_rows(sd)
    ch = sd["x_embedder.proj.weight"].shape[1]
    want = 2 * ch if learn_sigma else ch
    if oc == want:
        return sd
    out = dict(sd)
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        v = sd[key]
        rows = v.reshape(pp, oc, *v.shape[1:])
        if want > oc:
            rows = torch.cat([rows, torch.zeros_like(rows)], dim=1)
        else:
            rows = rows[:, :want]
        out[key] = rows.reshape(pp * want, *v.shape[1:]).contiguous()
    return out


def native_noise_time(family: str) -> int:
    """The time a family's network is fed at the noise end: 0 for SiT (flipped), 1 for REPA and ours."""
    return 0 if family in FLIPPED_FAMILIES else 1


def to_official(sd: dict, family: str, *, learn_sigma: bool = True, noise_time: int | None = None) -> dict:
    """Our student state dict (keys as ``freeflow.models.DiT``) → the official FreeFlow state dict; ``noise_time``
    None keeps the family's own convention."""
    if noise_time is None:
        noise_time = native_noise_time(family)
    if noise_time not in (0, 1):
        raise ValueError(f"noise_time must be 0 or 1, got {noise_time!r}")
    if native_noise_time(family) != noise_time:
        sd = flip_time_and_sign(sd)
    sd = set_learn_sigma(sd, learn_sigma)
    return {re.sub(r"^(t|dt|gw)_embedder\.mlp\.", r"\1_embedder.projs.", k): v.detach().clone().contiguous()
            for k, v in sd.items()}


def official_constructor(sd: dict, config: dict | None, learn_sigma: bool) -> str:
    """The official constructor call that builds a model this state dict fits."""
    patch = sd["x_embedder.proj.weight"].shape[-1]
    hidden = sd["x_embedder.proj.weight"].shape[0]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    side = math.isqrt(sd["pos_embed"].shape[1])
    size = (config or {}).get("input_size", side * patch)
    heads = (config or {}).get("num_heads")
    if heads is None and "blocks.0.attn.q_norm.weight" in sd:
        heads = hidden // sd["blocks.0.attn.q_norm.weight"].shape[0]
    classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    args = f"input_size={size}, num_classes={classes}, learn_sigma={learn_sigma}, take_dt=True, take_gw=True"
    name = _OFFICIAL_NAMES.get((hidden, depth, heads))
    if name is not None:
        return f"DiT_{name}_{patch}({args})"
    head_arg = f"num_heads={heads}" if heads is not None else "num_heads=<the teacher's>"
    in_ch = sd["x_embedder.proj.weight"].shape[1]
    return f"DiT(patch_size={patch}, in_channels={in_ch}, hidden_size={hidden}, depth={depth}, {head_arg}, {args})"


# -- command line -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m freeflow.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("student", help="student_ema.pt of a run, or a training checkpoint checkpoints/step_*.pt")
    p.add_argument("--format", required=True, help=f"output layout, one of {', '.join(FORMATS)}")
    p.add_argument("-o", "--out", required=True, help="output file (a plain state dict)")
    p.add_argument("--family", default="", choices=("",) + VELOCITY_FAMILIES, metavar="FAMILY",
                   help=f"the teacher family ({', '.join(VELOCITY_FAMILIES)}), when the file does not record it")
    p.add_argument("--which", choices=("ema", "student"), default="ema",
                   help="a training checkpoint's EMA or raw student weights")
    p.add_argument("--learn-sigma", choices=("on", "off"), default="on",
                   help="2C output channels as the official constructors build by default (on), or C (off)")
    p.add_argument("--noise-time", type=int, choices=(0, 1), default=None,
                   help="the time the sampler feeds at the noise end: 0 (x = z + dt·F) or 1 (x = z - dt·F); "
                        "default: the teacher family's own (SiT 0, REPA 1)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    prog = "python -m freeflow.export"
    if a.format not in FORMATS:
        print(f"{prog}: error: unknown --format {a.format!r}; supported: {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    try:
        sd, family, config = read_student(a.student, a.family or None, a.which)
        learn_sigma = a.learn_sigma == "on"
        if a.noise_time is None:
            a.noise_time = native_noise_time(family)
        official = to_official(sd, family, learn_sigma=learn_sigma, noise_time=a.noise_time)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if os.path.dirname(a.out):
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
    save_atomic(official, a.out)
    sign = "+" if a.noise_time == 0 else "-"
    print(f"[freeflow] wrote {a.out}: {len(official)} tensors in the official FreeFlow layout, from a {family} "
          f"student; build it with {official_constructor(sd, config, learn_sigma)}, "
          f"load_state_dict(strict=True); one step: x = z {sign} F(z, t={a.noise_time}, y, dt=1, gw)")
    if "blocks.0.attn.q_norm.weight" in sd:
        print("[freeflow] note: the student has q/k LayerNorms (attn.q_norm/k_norm, REPA's --qk-norm): the "
              "official model must be built with them for a strict load", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
