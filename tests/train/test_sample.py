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
    """Row i: a CPU generator seeded with SeedSequence([seed, i]) (63 bits), randn(1, 1, 8, 8) then randint(3)."""
    zs, ys = [], []
    for i in range(n):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]) >> 1)
        zs.append(torch.randn(1, 1, 8, 8, generator=g))
        ys.append(torch.randint(0, 3, (1,), generator=g))
    return torch.cat(zs), torch.cat(ys)


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
    arr, labels = np.load(out)["arr_0"], np.load(out)["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (10, 8, 8, 3)
    z, y = _draws(10)
    np.testing.assert_array_equal(labels, y.numpy())
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


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_samples(ckpts, tmp_path):
    _, _, d = ckpts
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    args = ["--student", str(d / "student.pt"), "--num-samples", "7", "--batch-size", "2", "--png", ""]
    assert main([*args, "--npz", str(one), "--shard-size", "7"]) == 0
    args += ["--shard-size", "2"]  # 4 shards over 2 ranks; the shard size changes no sample
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           "-m", "freeflow.sample", *args, "--npz", str(two)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(np.load(one)["arr_0"], np.load(two)["arr_0"])


def test_bad_arguments(capsys):
    assert main(["--mode", "student"]) == 2
    assert "--mode student needs --student" in capsys.readouterr().err
    assert main(["--mode", "teacher", "--teacher", "x.pt", "--guidance-interval", "0.5", "0.2"]) == 2


def test_interrupted_run_resumes_and_skips_written_shards(ckpts, tmp_path, monkeypatch):
    _, _, d = ckpts
    ref, out = tmp_path / "ref.npz", tmp_path / "out.npz"
    args = ["--student", str(d / "student.pt"), "--num-samples", "9", "--batch-size", "3", "--shard-size", "3",
            "--png", ""]
    assert main([*args, "--npz", str(ref)]) == 0
    import freeflow.sample as sample_mod

    calls = []
    real = sample_mod.write_shard

    def dying_write(path, images, labels):  # the run is killed while it writes its second shard
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, images, labels)

    monkeypatch.setattr(sample_mod, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--npz", str(out)])
    assert sorted(os.listdir(str(out) + ".shards")) == ["settings.json", "shard_000000.npz"]
    assert not out.exists()
    calls.clear()
    monkeypatch.setattr(sample_mod, "write_shard", lambda *a: (calls.append(a[0]), real(*a)))
    assert main([*args, "--npz", str(out)]) == 0
    assert [os.path.basename(c) for c in calls] == ["shard_000001.npz", "shard_000002.npz"]  # shard 0 skipped
    for key in ("arr_0", "arr_1"):
        np.testing.assert_array_equal(np.load(out)[key], np.load(ref)[key])
    assert not os.path.exists(str(out) + ".shards")


def test_resume_refuses_shards_of_other_settings(ckpts, tmp_path, capsys):
    _, _, d = ckpts
    out = tmp_path / "o.npz"
    os.makedirs(str(out) + ".shards")
    with open(str(out) + ".shards/settings.json", "w") as f:
        f.write('{"gw": 9.0}')
    assert main(["--student", str(d / "student.pt"), "--num-samples", "2", "--png", "", "--npz", str(out)]) == 2
    assert "written with other settings" in capsys.readouterr().err


_PEAK = """
import resource, sys
from freeflow.sample import main
rc = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_num_samples(tmp_path):
    """3×64×64 samples: the old all-gather of float32 images held 48 KB per sample, and as much again for the noise:
    ~90 MB more at N = 1,024 than at N = 64. The sharded writer holds one shard whatever N."""
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=64, patch_size=16, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                    learn_sigma=False)
    net = FlowMapStudent.from_teacher(DiT(cfg, family="internal", backend="reference")).net
    save_checkpoint(net, str(tmp_path / "s.pt"))
    peaks = {}
    for n in (64, 1024):
        proc = subprocess.run([sys.executable, "-c", _PEAK, "--student", str(tmp_path / "s.pt"), "--num-samples",
                               str(n), "--batch-size", "64", "--shard-size", "64", "--png", "",
                               "--npz", str(tmp_path / f"{n}.npz")], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[n] = int(proc.stdout.split("PEAK_KB")[1].split()[0]) / 1024
        assert np.load(tmp_path / f"{n}.npz")["arr_0"].shape == (n, 64, 64, 3)
    print(f"peak RSS: N=64 {peaks[64]:.1f} MB, N=1024 {peaks[1024]:.1f} MB")
    # A fixed mmap threshold keeps glibc from moving freed shard-sized blocks into a heap that only grows
    # (with its default dynamic threshold the peak drifted by ~12 MB over 16 shards, allocator noise, not data).
    assert peaks[1024] - peaks[64] < 10, peaks  # O(N) would add ~90 MB
