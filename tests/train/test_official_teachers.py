"""The README's ImageNet commands on teachers in the layouts the official repositories release.

`python -m freeflow.train --preset NAME --teacher-ckpt FILE` without --teacher-family: a preset named after a
family reads that family, REPA is recognised from its own keys, and two steps run. Small official-layout
checkpoints stand in for the released files (tests/official.py); the preset's other settings run as they are.
"""
import argparse
import json

import pytest
import torch
from official import official_state_dict

from freeflow.train import main

ARCH = dict(hidden=128, depth=2, heads=2, patch=2, in_ch=4, size=8, num_classes=10)


def _sit_plain(path):
    torch.save(official_state_dict(**ARCH, learn_sigma=True), path)


def _sit_training(path):
    args = argparse.Namespace(model="SiT-XL/2", path_type="Linear", prediction="velocity", image_size=64)
    sd = official_state_dict(**ARCH, learn_sigma=True)
    torch.save({"model": sd, "ema": sd, "opt": {"state": {}, "param_groups": []}, "args": args}, path)


def _repa_plain(path):
    torch.save(official_state_dict(**ARCH, learn_sigma=False, projector=True), path)


def _repa_legacy(path):
    sd = official_state_dict(**ARCH, learn_sigma=False)
    torch.save({k.replace("blocks.1.", "decoder_blocks.0."): v for k, v in sd.items()}, path)


@pytest.mark.parametrize("preset, write, family", [
    ("sit-xl2-256", _sit_plain, "sit"),             # SiT's released SiT-XL-2-256.pt: a plain state dict
    ("sit-b2-256", _sit_training, "sit"),           # a SiT training checkpoint {model, ema, opt, args}
    ("repa-xl2-256", _repa_plain, "repa"),          # REPA's released last.pt: plain, with projectors.*
    ("repa-xl2-512", _repa_legacy, "repa"),         # REPA's legacy encoder/decoder block names
])
def test_preset_trains_two_steps_on_an_official_layout(tmp_path, preset, write, family):
    ckpt = tmp_path / "teacher.pt"
    write(ckpt)
    out = tmp_path / "run"
    rc = main(["--preset", preset, "--teacher-ckpt", str(ckpt), "--out", str(out), "--steps", "2",
               "--batch-size", "8", "--teacher-steps", "2", "--grid-size", "2", "--backend", "reference",
               "--threads", "1"])
    assert rc == 0
    cfg = json.load(open(out / "config.json"))
    assert cfg["teacher_family"] == family
    assert cfg["train"]["preset"] == preset
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows][-1] == 2


def test_teacher_family_flag_still_overrides_the_preset(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    _repa_plain(ckpt)
    out = tmp_path / "run"
    rc = main(["--preset", "sit-xl2-256", "--teacher-ckpt", str(ckpt), "--teacher-family", "repa", "--out",
               str(out), "--steps", "1", "--batch-size", "8", "--teacher-steps", "2", "--grid-size", "2",
               "--backend", "reference", "--threads", "1"])
    assert rc == 0 and json.load(open(out / "config.json"))["teacher_family"] == "repa"
