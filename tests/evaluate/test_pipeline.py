"""docs/imagenet.md's sequence on the CPU: train → sample → evaluate, each under torchrun with 2 gloo processes.

A tiny latent-shaped teacher (4 channels, like SD-VAE latents) with random weights, no VAE (the sampler writes the
first three latent channels as images), and a random-weight Inception loaded from a file.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from freeflow.models import DiT, DiTConfig, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow  # three torchrun launches


def _torchrun(module, *args, port):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "-m", module, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, f"{module}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_train_sample_evaluate_with_two_processes(tmp_path, inception_weights):
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                    learn_sigma=True)  # SiT/REPA heads predict 2×4 channels; the adapter keeps the velocity half
    teacher = DiT(cfg, family="sit")
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(teacher, str(tmp_path / "teacher.pt"))
    run = tmp_path / "run"

    _torchrun("freeflow.train", "--teacher-ckpt", str(tmp_path / "teacher.pt"), "--out", str(run), "--steps", "2",
              "--batch-size", "8", "--ckpt-every", "2", "--sample-every", "2", "--grid-size", "2",
              "--teacher-steps", "1", "--no-evaluate", "--backend", "reference", port=29551)
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert (run / "samples" / "step_0000002.png").exists()
    student = load_checkpoint(str(run / "student_ema.pt"))
    assert student.config.in_channels == 4 and student.family == "sit"

    npz = tmp_path / "samples.npz"
    _torchrun("freeflow.sample", "--student", str(run / "student_ema.pt"), "--num-samples", "6", "--batch-size", "2",
              "--shard-size", "2", "--png", str(tmp_path / "grid.png"), "--nrow", "2", "--npz", str(npz), port=29552)
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (6,)
    assert images.std() > 0 and not os.path.exists(str(npz) + ".shards")

    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    proc = _torchrun("freeflow.evaluate", str(npz), "--ref", str(ref), "--inception-weights", inception_weights,
                     "--batch-size", "2", "--is-splits", "2", "--json", str(tmp_path / "eval.json"), port=29553)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_samples"] == 6 and result["num_reference"] == 5 and result["world_size"] == 2
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert 1.0 <= result["inception_score"] and 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    assert proc.stdout.strip().startswith("FID ")
