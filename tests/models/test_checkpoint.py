"""Official-layout checkpoints load strictly and match an independent functional DiT forward."""
import argparse
import functools

import pytest
import torch
from official import functional_block, functional_dit, functional_final_layer, official_state_dict

from freeflow.models import DiT, DiTConfig, save_checkpoint
from freeflow.models import load_checkpoint as _load_checkpoint

load_checkpoint = functools.partial(_load_checkpoint, backend="reference")

ARCH = dict(hidden=64, depth=2, heads=4, patch=2, in_ch=4, size=8, num_classes=10)


def _inputs(n=3, seed=0, in_ch=4, size=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, in_ch, size, size, generator=g), torch.rand(n, generator=g),
            torch.randint(0, 11, (n,), generator=g))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dit_plain_state_dict(tmp_path):
    sd = official_state_dict(**ARCH, learn_sigma=True)
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(sd, path)
    model = load_checkpoint(str(path))
    assert model.family == "dit" and model.config.learn_sigma and model.config.num_heads == 1
    x, _, y = _inputs()
    t = torch.tensor([0.0, 500.0, 999.0])  # DDPM steps
    with torch.no_grad():
        _close(model(x, t, y), functional_dit(sd, x, t, y, heads=1))  # all 2C channels, like DiT's forward


@pytest.mark.parametrize("qk_norm", [False, True])
def test_block_and_final_layer_forward_like_the_official_modules(tmp_path, qk_norm):
    """Official-style code calls ``model.blocks[i](x, c)`` and ``model.final_layer(x, c)`` directly."""
    sd = official_state_dict(**ARCH, learn_sigma=False, qk_norm=qk_norm, seed=5)
    path = tmp_path / "repa.pt"
    torch.save(sd, path)
    model = load_checkpoint(str(path), family="repa", num_heads=4)
    g = torch.Generator().manual_seed(6)
    h, c = torch.randn(3, 16, 64, generator=g), torch.randn(3, 64, generator=g)
    block = {k[len("blocks.1."):]: v for k, v in sd.items() if k.startswith("blocks.1.")}
    final = {k[len("final_layer."):]: v for k, v in sd.items() if k.startswith("final_layer.")}
    with torch.no_grad():
        _close(model.blocks[1](h, c), functional_block(block, h, c, heads=4, qk_norm=qk_norm))
        _close(model.final_layer(h, c), functional_final_layer(final, h, c))


def test_sit_training_checkpoint_prefers_ema(tmp_path):
    ema = official_state_dict(**ARCH, learn_sigma=True, seed=1)
    raw = official_state_dict(**ARCH, learn_sigma=True, seed=2)
    args = argparse.Namespace(model="SiT-S/2", path_type="Linear", prediction="velocity", image_size=64)
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args}, path)
    model = load_checkpoint(str(path), num_heads=4)
    assert model.family == "sit"
    x, t, y = _inputs()
    with torch.no_grad():  # SiT's forward drops the learned-sigma half
        _close(model(x, t, y), functional_dit(ema, x, t, y, heads=4, drop_sigma=True))


def test_repa_checkpoint_with_projectors_qk_norm_and_ddp_prefix(tmp_path, caplog):
    sd = official_state_dict(**ARCH, learn_sigma=False, qk_norm=True, projector=True, seed=3)
    path = tmp_path / "repa.pt"
    torch.save({"ema": {f"module.{k}": v for k, v in sd.items()}, "args": argparse.Namespace(enc_type="dinov2-vit-b")},
               path)
    model = load_checkpoint(str(path))
    assert model.family == "repa" and model.config.qk_norm and model.config.num_heads == 4
    assert any("projectors" in n for n in model.load_notes)
    x, t, y = _inputs()
    with torch.no_grad():  # REPA's forward returns (x, zs); we return x
        _close(model(x, t, y), functional_dit(sd, x, t, y, heads=4, qk_norm=True))


def test_repa_legacy_decoder_blocks_are_renamed(tmp_path):
    sd = official_state_dict(**ARCH, learn_sigma=False, seed=4)
    legacy = {k.replace("blocks.1.", "decoder_blocks.0."): v for k, v in sd.items()}
    path = tmp_path / "legacy.pt"
    torch.save(legacy, path)
    model = load_checkpoint(str(path), family="repa", num_heads=4)
    x, t, y = _inputs()
    with torch.no_grad():
        _close(model(x, t, y), functional_dit(sd, x, t, y, heads=4))


def test_freeflow_student_with_projs_names_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = official_state_dict(**ARCH, learn_sigma=True, extra_embedders=("dt_embedder", "gw_embedder"), seed=5)
    renamed = {k.replace("_embedder.mlp.", "_embedder.projs."): v for k, v in sd.items()}
    path = tmp_path / "freeflow.safetensors"
    save_file(renamed, str(path))
    model = load_checkpoint(str(path), num_heads=4)
    assert model.family == "freeflow" and model.config.take_dt and model.config.take_gw
    x, t, y = _inputs()
    dt, gw = torch.rand(3), 1 + torch.rand(3)
    with torch.no_grad():
        _close(model(x, torch.ones(3), y, dt, gw),
               functional_dit(sd, x, torch.ones(3), y, heads=4, dt=dt, gw=gw, drop_sigma=True))


def test_own_checkpoint_round_trip_non_square(tmp_path):
    cfg = DiTConfig(input_size=(8, 12), patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                    num_classes=4, learn_sigma=False, take_gw=True)
    model = DiT(cfg, family="sit", backend="reference")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path / "own.pt"
    save_checkpoint(model, str(path))
    loaded = load_checkpoint(str(path))
    assert loaded.family == "sit" and loaded.config == cfg
    x, t, y, gw = torch.randn(2, 3, 8, 12), torch.rand(2), torch.tensor([0, 4]), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y, gw=gw), model(x, t, y, gw=gw), rtol=0, atol=0)


def test_mismatches_name_the_keys(tmp_path):
    sd = official_state_dict(**ARCH, learn_sigma=False, seed=6)
    sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.proj.weight"] = torch.zeros(64, 63)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(str(path), family="sit", num_heads=4)
    msg = str(err.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "missing" in msg
    assert "blocks.0.attn.extra.weight" in msg and "unexpected" in msg
    assert "blocks.0.attn.proj.weight: (64, 63)" in msg


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_checkpoint(str(bad))
    with pytest.raises(ValueError, match="family must be one of"):
        load_checkpoint(str(bad), family="edm")


def test_non_square_checkpoint_needs_input_size(tmp_path):
    sd = official_state_dict(**ARCH, learn_sigma=False)
    sd["pos_embed"] = torch.zeros(1, 24, 64)
    path = tmp_path / "ns.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="pass input_size="):
        load_checkpoint(str(path), num_heads=4)


@pytest.mark.parametrize("layout", ["projectors", "legacy_decoder_blocks"])
def test_repa_plain_state_dict_is_recognised_before_its_keys_are_renamed(tmp_path, layout):
    """REPA's released SiT-XL/2 is a plain state dict (its generate.py loads it straight into the model): the
    projector heads, or the legacy decoder_blocks, are what say REPA, and loading drops / renames them."""
    sd = official_state_dict(**ARCH, learn_sigma=False, projector=layout == "projectors", seed=7)
    if layout == "legacy_decoder_blocks":
        sd = {k.replace("blocks.1.", "decoder_blocks.0."): v for k, v in sd.items()}
    path = tmp_path / "last.pt"
    torch.save(sd, path)
    assert load_checkpoint(str(path), num_heads=4).family == "repa"
