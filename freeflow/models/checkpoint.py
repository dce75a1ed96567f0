"""Load official DiT / SiT / REPA-SiT / FreeFlow checkpoints (their own key names) and our own.

Accepted containers: a plain state dict (``DiT-XL-2-256x256.pt``, FreeFlow students), a training
checkpoint ``{"model", "ema", "opt", "args"}`` (DiT, SiT, REPA; ``ema`` preferred), ``.safetensors``
files, and ``freeflow.models.save_checkpoint`` files (which also store the config and family).
Renamed on load: ``module.``/``_orig_mod.`` prefixes (DDP, torch.compile), FreeFlow's
``*_embedder.projs.*`` (→ ``mlp``), REPA's legacy ``decoder_blocks.N`` (→ ``blocks.(encoder depth + N)``);
dropped with a note: REPA's ``projectors.*`` (the alignment heads, unused at sampling).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re

import torch

from ..conventions import FAMILIES
from .dit import DiT, DiTConfig

log = logging.getLogger(__name__)
FORMAT = "freeflow-model"
# hidden size → heads of the published configs (head dim 64 for S/B/L, 72 for XL).
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}


def save_checkpoint(model: DiT, path: str) -> None:
    """Write ``model`` with its config and family (atomically: temp file + rename)."""
    payload = {"format": FORMAT, "family": model.family, "config": model.config.to_dict(),
               "state_dict": model.state_dict()}
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _read(path: str, weights_only: bool):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist or is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # truncated file, not a torch file, or pickled objects outside the allow-list
        raise ValueError(f"could not read checkpoint {path!r}: {type(e).__name__}: {e}. If the file is "
                         "trusted and pickles custom objects, pass weights_only=False") from e


def _unwrap(obj) -> tuple[dict, object, dict | None]:
    """→ (state_dict, args or None, our saved metadata or None)."""
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint must hold a dict, got {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        return obj["state_dict"], None, obj
    for key in ("ema", "model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            return obj[key], obj.get("args"), None
    return obj, None, None


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _rename_official(sd: dict, notes: list[str]) -> dict:
    out = {}
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    dropped = 0
    for k, v in sd.items():
        if k.startswith("projectors."):
            dropped += 1
            continue
        k = re.sub(r"^(t|dt|gw)_embedder\.projs\.", r"\1_embedder.mlp.", k)
        m = re.match(r"^decoder_blocks\.(\d+)\.(.*)$", k)
        if m:
            k = f"blocks.{n_blocks + int(m.group(1))}.{m.group(2)}"
        out[k] = v
    if dropped:
        notes.append(f"dropped {dropped} REPA projector tensors (projectors.*): alignment heads, unused for sampling")
    return out


def infer_family(sd: dict, args) -> str:
    """The checkpoint family from the keys as the file holds them (before ``_rename_official`` drops REPA's
    projectors or renames its legacy decoder blocks) and the training args."""
    keys = sd.keys()
    if (any(k.startswith(("projectors.", "decoder_blocks.")) for k in keys)
            or (args is not None and hasattr(args, "enc_type"))):
        return "repa"
    if any(".projs." in k or k.startswith(("dt_embedder.", "gw_embedder.")) for k in keys):
        return "freeflow"
    if args is not None:
        name = str(getattr(args, "model", ""))
        if name.startswith("SiT") or hasattr(args, "path_type"):
            return "sit"
    return "dit"


def infer_config(sd: dict, **overrides) -> DiTConfig:
    """Architecture from tensor shapes (``overrides`` win; needed for non-square inputs or odd head counts)."""
    def need(key):
        if key not in sd:
            raise ValueError(f"cannot infer the model config: checkpoint has no {key!r}")
        return sd[key]

    proj = need("x_embedder.proj.weight")
    hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_ch = need("final_layer.linear.weight").shape[0] // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"final_layer.linear.weight has {out_ch} output channels per pixel; expected "
                         f"{in_ch} or {2 * in_ch} (learn_sigma) for in_channels={in_ch}")
    tokens = need("pos_embed").shape[1]
    side = math.isqrt(tokens)
    cfg = dict(
        patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        input_size=side * patch if side * side == tokens else None,
        mlp_ratio=need("blocks.0.mlp.fc1.weight").shape[0] / hidden,
        num_classes=need("y_embedder.embedding_table.weight").shape[0] - 1,
        learn_sigma=out_ch == 2 * in_ch,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        take_dt="dt_embedder.mlp.0.weight" in sd, take_gw="gw_embedder.mlp.0.weight" in sd,
        frequency_embedding_size=need("t_embedder.mlp.0.weight").shape[1],
    )
    if cfg["qk_norm"]:
        cfg["num_heads"] = hidden // sd["blocks.0.attn.q_norm.weight"].shape[0]
    else:
        cfg["num_heads"] = _HEADS_BY_WIDTH.get(hidden, hidden // 64 if hidden % 64 == 0 else None)
    cfg.update(overrides)
    for name in ("input_size", "num_heads"):
        if cfg[name] is None:
            raise ValueError(f"cannot infer {name} from the checkpoint's shapes ({tokens} tokens, hidden {hidden}); "
                             f"pass {name}=... to load_checkpoint")
    return DiTConfig(**cfg)


def check_state_dict(model: torch.nn.Module, sd: dict, source: str = "checkpoint") -> None:
    """Strict key and shape check with every problem named (load_state_dict stops at the first kind)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: {tuple(sd[k].shape)} in {source}, {tuple(own[k].shape)} in model"
                    for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model:"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape conflicts", shapes)):
            if items:
                lines.append(f"  {label} ({len(items)}): " + ", ".join(items))
        raise ValueError("\n".join(lines))


def load_checkpoint(path: str, family: str | None = None, *, backend: str | None = None,
                    weights_only: bool = True, **config_overrides) -> DiT:
    """Load an official or own checkpoint into a ``DiT`` that carries its ``family``.

    ``family`` in {"dit", "sit", "repa", "freeflow"} (None: inferred — projector keys → REPA, ``projs``/
    dt/gw embedders → FreeFlow, SiT training args → SiT, otherwise DiT; plain SiT state dicts need
    ``family="sit"``). The config is read from our own files or inferred from tensor shapes;
    ``config_overrides`` (DiTConfig fields) take precedence.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    sd, args, meta = _unwrap(_read(path, weights_only))
    notes: list[str] = []
    sd = _strip_prefixes(sd)
    family = family or (meta["family"] if meta is not None else infer_family(sd, args))
    sd = _rename_official(sd, notes)
    if meta is not None:
        config = DiTConfig(**{**meta["config"], **config_overrides})
    else:
        config = infer_config(sd, **config_overrides)
    model = DiT(config, family=family, backend=backend)
    check_state_dict(model, sd, source=f"checkpoint {path!r}")
    model.load_state_dict(sd, strict=True)
    for note in notes:
        log.warning("load_checkpoint(%s): %s", os.path.basename(path), note)
    model.load_notes = notes
    return model.eval()
