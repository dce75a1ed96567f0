"""``python -m freeflow.export --format official``: a student trained here → the official FreeFlow layout.

The reference is tests/official.py: the official key set and shapes, and the official network and one-step
rule written with functional ops on the exported state dict (no freeflow.models code). Students are built from
small teachers in the SiT and REPA release layouts, saved as ``python -m freeflow.train`` saves them.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from official import functional_freeflow, official_freeflow_state_dict, official_one_step, official_state_dict

from freeflow.checkpointing import CheckpointDir
from freeflow.conventions import flow_map
from freeflow.export import main as export
from freeflow.models import FlowMapStudent, load_checkpoint, save_checkpoint

ARCH = dict(hidden=64, depth=2, heads=4, patch=2, in_ch=4, size=8, num_classes=10)
# Released teacher layouts: SiT-XL/2 has the learned-sigma head, REPA's SiT has q/k norms and none.
FAMILIES = {"sit": dict(learn_sigma=True, qk_norm=False), "repa": dict(learn_sigma=False, qk_norm=True)}


def _student(tmp_path, family, seed=0):
    """A student of a teacher in ``family``'s release layout, every weight moved off its initialisation (the
    dt/gw embedders' zeroed last Linear included), so that δ, γ and time each change the output."""
    teacher_file = tmp_path / f"{family}-teacher-{seed}.pt"
    torch.save(official_state_dict(**ARCH, **FAMILIES[family], seed=seed), teacher_file)
    teacher = load_checkpoint(str(teacher_file), family=family, backend="reference", num_heads=ARCH["heads"])
    student = FlowMapStudent.from_teacher(teacher)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    assert student.net.dt_embedder.mlp[2].weight.abs().min() > 0
    return student.eval()


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, ARCH["in_ch"], ARCH["size"], ARCH["size"], generator=g)
    y = torch.randint(0, ARCH["num_classes"] + 1, (n,), generator=g)  # the null class included
    return z, y, 1 + 3 * torch.rand(n, generator=g), torch.rand(n, generator=g)


def _export(src, out, *extra):
    rc = export([str(src), "--format", "official", "-o", str(out), *extra])
    assert rc == 0
    return torch.load(out, map_location="cpu", weights_only=True)


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise_time", [None, 0, 1])
@pytest.mark.parametrize("family", ["sit", "repa"])
def test_exported_student_is_the_official_network_and_samples_like_ours(tmp_path, family, noise_time):
    """None: the default, the family's own convention (SiT: noise at t = 0, REPA: at t = 1), weights unchanged."""
    student = _student(tmp_path, family)
    src = tmp_path / "student_ema.pt"
    save_checkpoint(student.net, str(src))  # what train writes at the end of a run
    flag = () if noise_time is None else ("--noise-time", str(noise_time))
    sd = _export(src, tmp_path / "official.pt", *flag)
    if noise_time is None:
        noise_time = 0 if family == "sit" else 1
        ours = student.net.state_dict()
        for k, v in sd.items():  # only renamed keys and, for C-output students, a zero sigma half
            if k.replace(".projs.", ".mlp.") in ours and ours[k.replace(".projs.", ".mlp.")].shape == v.shape:
                assert torch.equal(v, ours[k.replace(".projs.", ".mlp.")]), k

    qk_norm = FAMILIES[family]["qk_norm"]
    assert _shapes(sd) == _shapes(official_freeflow_state_dict(**ARCH, learn_sigma=True, qk_norm=qk_norm))

    z, y, gw, delta = _inputs()
    heads = dict(heads=ARCH["heads"], qk_norm=qk_norm)
    with torch.no_grad():
        _close(official_one_step(sd, z, y, gw, noise_time=noise_time, **heads), student.sample(z, y, gw))
        # a partial jump δ < 1 from the noise end: the dt embedder and the step size agree too
        _close(official_one_step(sd, z, y, gw, noise_time=noise_time, dt=delta, **heads),
               flow_map(z, delta, student(z, delta, y, gw)))
        # away from the noise end as well: the official time s is our internal time 1 - s (noise at 0) or s,
        # and the official F points from noise to data in the first case
        s = torch.rand(3, generator=torch.Generator().manual_seed(2))
        ours = student(z, delta, y, gw, t=1 - s if noise_time == 0 else s)
        official = functional_freeflow(sd, z, s, y, delta, gw, **heads)[:, :ARCH["in_ch"]]
        _close(official, -ours if noise_time == 0 else ours)
        if noise_time == 1:  # this toolkit's loader reads FreeFlow files in the t = 1 convention
            back = FlowMapStudent(load_checkpoint(str(tmp_path / "official.pt"), backend="reference",
                                                  num_heads=ARCH["heads"]))
            _close(back.sample(z, y, gw), student.sample(z, y, gw))


def test_learn_sigma_off_writes_c_output_channels(tmp_path):
    student = _student(tmp_path, "sit", seed=3)
    src = tmp_path / "student_ema.pt"
    save_checkpoint(student.net, str(src))
    sd = _export(src, tmp_path / "official.pt", "--learn-sigma", "off")
    assert _shapes(sd) == _shapes(official_freeflow_state_dict(**ARCH, learn_sigma=False))
    z, y, gw, _ = _inputs(seed=4)
    with torch.no_grad():
        _close(official_one_step(sd, z, y, gw, heads=ARCH["heads"]), student.sample(z, y, gw))


def test_training_checkpoint_ema_or_student_with_the_family_of_its_run(tmp_path, capsys):
    ema, raw = _student(tmp_path, "repa", seed=5), _student(tmp_path, "repa", seed=6)
    run = tmp_path / "run"
    CheckpointDir(str(run / "checkpoints"), keep=2).save(40, {
        "step": 40, "student": raw.state_dict(), "ema": ema.state_dict(), "config": {"train": {"teacher_family": ""}}})
    ckpt = run / "checkpoints" / "step_0000040.pt"

    # the flag was empty (family inferred from the teacher): without config.json the family is unknown
    assert export([str(ckpt), "--format", "official", "-o", str(tmp_path / "x.pt")]) == 2
    assert "pass --family" in capsys.readouterr().err

    (run / "config.json").write_text(json.dumps({"teacher_family": "repa", "teacher_config": {"input_size": 8}}))
    z, y, gw, _ = _inputs(seed=7)
    heads = dict(heads=ARCH["heads"], qk_norm=True)
    with torch.no_grad():
        for which, model in (("ema", ema), ("student", raw)):
            sd = _export(ckpt, tmp_path / f"{which}.pt", "--which", which)
            _close(official_one_step(sd, z, y, gw, noise_time=1, **heads), model.sample(z, y, gw))  # REPA's
        assert "from a repa student" in capsys.readouterr().out
        # a wrong family is a different convention (SiT's, noise at t = 0): the samples no longer agree
        sd = _export(ckpt, tmp_path / "wrong.pt", "--family", "sit")
        assert not torch.allclose(official_one_step(sd, z, y, gw, noise_time=0, **heads), ema.sample(z, y, gw),
                                  atol=1e-3)


def test_python_m_freeflow_export(tmp_path):
    student = _student(tmp_path, "sit", seed=8)
    src = tmp_path / "student_ema.pt"
    save_checkpoint(student.net, str(src))
    out = tmp_path / "nested" / "official.pt"
    proc = subprocess.run([sys.executable, "-m", "freeflow.export", str(src), "--format", "official", "-o", str(out)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "DiT(patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4" in proc.stdout
    sd = torch.load(out, map_location="cpu", weights_only=True)
    z, y, gw, _ = _inputs(seed=9)
    with torch.no_grad():
        _close(official_one_step(sd, z, y, gw, heads=ARCH["heads"]), student.sample(z, y, gw))


def test_errors_name_the_problem(tmp_path, capsys):
    teacher = tmp_path / "SiT-XL-2-256.pt"
    torch.save(official_state_dict(**ARCH), teacher)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    official = tmp_path / "freeflow-official.pt"
    torch.save(official_freeflow_state_dict(**ARCH), official)
    student = tmp_path / "student_ema.pt"
    save_checkpoint(_student(tmp_path, "sit", seed=10).net, str(student))

    cases = [
        ([str(teacher), "--format", "official", "--family", "sit"], "is not a FreeFlow student"),
        ([str(garbage), "--format", "official"], "could not read checkpoint"),
        ([str(tmp_path / "missing.pt"), "--format", "official"], "does not exist"),
        ([str(official), "--format", "official", "--family", "repa"], "already in the official FreeFlow layout"),
        ([str(student), "--format", "diffusers"], "unknown --format 'diffusers'; supported: official"),
    ]
    for argv, message in cases:
        assert export([*argv, "-o", str(tmp_path / "out.pt")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
