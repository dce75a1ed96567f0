"""python -m freeflow.sample: student one-step, teacher ODE, handoff, npz format, torchrun sharding."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from freeflow.models import DiT, DiTConfig, FlowMapStudent, save_checkpoint
from freeflow.sample import main


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                    learn_sigma=False)
    teacher = DiT(cfg, family="internal", backend="reference")
    with torch.no_grad():
        for p in teacher.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    student = FlowMapStudent.from_teacher(teacher)
    with torch.no_grad():  # make δ and γ matter
        for p in student.net.dt_embedder.parameters():
            p.normal_(0, 0.1)
    d = tmp_path_factory.mktemp("ckpts")
    save_checkpoint(teacher, str(d / "teacher.pt"))
    save_checkpoint(student.net, str(d / "student.pt"))
    return teacher.eval(), student.eval(), d


def _draws(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3).numpy()


def _guided(teacher, x, t, y, gw):
    """u(x|∅) + γ(u(x|y) - u(x|∅)), written out."""
    cond = teacher(x, t, y)
    uncond = teacher(x, t, torch.full_like(y, 3))
    return uncond + gw * (cond - uncond)


def test_student_one_step_npz(ckpts, tmp_path):
    _, student, d = ckpts
    out = tmp_path / "s.npz"
    assert main(["--student", str(d / "student.pt"), "--num-samples", "10", "--batch-size", "4", "--gw", "2.0",
                 "--png", "", "--npz", str(out)]) == 0
    arr = np.load(out)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (10, 8, 8, 3)
    z, y = _draws(10)
    with torch.no_grad():
        want = z - student(z, torch.ones(10), y, torch.full((10,), 2.0))
    assert np.abs(arr.astype(int) - _uint8(want).astype(int)).max() <= 1  # rounding at .5 boundaries


def test_teacher_euler_and_handoff(ckpts, tmp_path):
    teacher, student, d = ckpts
    z, y = _draws(6)
    gw = 1.5
    with torch.no_grad():
        x = z.clone()  # two Euler steps of the guided field from t = 1 to 0
        for t0, t1 in ((1.0, 0.5), (0.5, 0.0)):
            x = x + (t1 - t0) * _guided(teacher, x, torch.full((6,), t0), y, gw)
        want_teacher = x
        x = z - 0.6 * student(z, torch.full((6,), 0.6), y, torch.full((6,), gw))  # jump to t = 0.4
        want_handoff = x + (0.0 - 0.4) * _guided(teacher, x, torch.full((6,), 0.4), y, gw)
    for mode, want, extra in (("teacher", want_teacher, []),
                              ("handoff", want_handoff, ["--student", str(d / "student.pt"), "--delta", "0.6"])):
        out = tmp_path / f"{mode}.npz"
        steps = "2" if mode == "teacher" else "1"
        assert main(["--mode", mode, "--teacher", str(d / "teacher.pt"), "--solver", "euler", "--steps", steps,
                     "--gw", str(gw), "--num-samples", "6", "--png", str(tmp_path / "g.png"),
                     "--npz", str(out), *extra]) == 0
        got = np.load(out)["arr_0"].astype(int)
        assert np.abs(got - _uint8(want).astype(int)).max() <= 1, mode
    assert (tmp_path / "g.png").exists()


def test_torchrun_two_processes_write_the_same_samples(ckpts, tmp_path):
    _, _, d = ckpts
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    args = ["--student", str(d / "student.pt"), "--num-samples", "7", "--batch-size", "2", "--png", ""]
    assert main([*args, "--npz", str(one)]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           "-m", "freeflow.sample", *args, "--npz", str(two)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(np.load(one)["arr_0"], np.load(two)["arr_0"])


def test_bad_arguments(capsys):
    assert main(["--mode", "student"]) == 2
    assert "--mode student needs --student" in capsys.readouterr().err
    assert main(["--mode", "teacher", "--teacher", "x.pt", "--guidance-interval", "0.5", "0.2"]) == 2
