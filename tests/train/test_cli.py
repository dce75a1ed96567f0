"""The trainer's command line: --help, --config replay, grids that cannot be written, VAE-decoded grids."""
import json
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch
from checks import trained_like_
from PIL import Image

from freeflow.config import PRESETS, TrainConfig, build_parser, parse_args
from freeflow.distill import DistillConfig
from freeflow.models import DiT, DiTConfig, save_checkpoint
from freeflow.train import main, write_grid


def _help_text():
    return " ".join(build_parser().format_help().split())  # argparse wraps lines: compare word by word


def test_help_lists_every_flag_with_its_docstring_and_default():
    text = _help_text()
    # Each field's docstring, as written in the source, appears beside its flag (a few spot checks that
    # would fail if the docstrings were not parsed), and every flag shows its default.
    assert "Clip the student's global gradient norm (0 = off). (default: 1.0)" in text
    assert "k of the adaptive weight ``w = (‖Δ‖²/d + eps)^-k`` (paper ablation: k = 1 best). (default: 1.0)" in text
    assert "(--preset mnist: 0.0 1.0; default 0.0 0.7)" in text  # corr_guidance_interval: a tuple, set by the preset
    help_by_flag = {a.option_strings[0]: a.help for a in build_parser()._actions if a.option_strings}
    for f in [*fields(TrainConfig), *fields(DistillConfig)]:
        h = help_by_flag["--" + f.name.replace("_", "-")]
        assert "default" in h and len(h) > len("(default: )") + 12, (f.name, h)  # a sentence, not just the default
    for name in PRESETS:
        assert f"{name} " in text
    assert "--config PATH" in text


def test_help_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "freeflow.train", "--help"], capture_output=True, text=True,
                          timeout=120)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "repa-xl2-256" in out and "(--preset mnist: 0.0003; default 0.0001)" in out


def test_help_shows_the_values_of_the_chosen_preset():
    """What `--help` prints for a flag is what will run: the preset's value where it sets one, else the default."""
    help_by_flag = {a.option_strings[0]: a.help for a in build_parser("repa-xl2-256")._actions if a.option_strings}
    assert help_by_flag["--aux"].endswith("(--preset repa-xl2-256: lora; default full)")
    assert help_by_flag["--teacher-family"].endswith("(--preset repa-xl2-256: repa; default '')")
    assert help_by_flag["--steps"].endswith("(--preset repa-xl2-256: 100000; default 1200)")
    assert help_by_flag["--grad-clip"].endswith("(0 = off). (default: 1.0)")  # not set by the preset
    proc = subprocess.run([sys.executable, "-m", "freeflow.train", "--help", "--preset", "sit-b2-256"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "sit; default '')" in proc.stdout and "--preset sit-b2-256" in proc.stdout


def test_a_preset_field_from_the_flag_through_config_json_to_the_run(tmp_path):
    """--ema-decay (the mnist preset sets 0.995): the flag's 0.5 is recorded and is the decay the EMA took."""
    torch.manual_seed(0)
    teacher = DiT(DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                            num_classes=3, learn_sigma=False), family="internal")
    trained_like_(teacher)
    save_checkpoint(teacher, str(tmp_path / "t.pt"))
    out = tmp_path / "run"
    assert main(["--teacher-ckpt", str(tmp_path / "t.pt"), "--out", str(out), "--steps", "1", "--batch-size", "8",
                 "--ema-decay", "0.5", "--no-evaluate", "--teacher-steps", "2", "--grid-size", "2", "--backend",
                 "reference", "--threads", "1"]) == 0
    assert json.load(open(out / "config.json"))["train"]["ema_decay"] == 0.5
    state = torch.load(out / "checkpoints" / "step_0000001.pt", weights_only=False)
    key = "blocks.0.attn.qkv.weight"  # the student starts as the teacher there
    start, after = teacher.state_dict()[key], state["student"]["net." + key]
    assert not torch.equal(after, start)
    torch.testing.assert_close(state["ema"]["net." + key], 0.5 * start + 0.5 * after)


def _write_config(path, **train):
    tc, dc = parse_args(["--steps", "17", "--lr", "2e-4", "--gw-max", "2.25"])
    record = {"train": {**tc.__dict__, **train}, "distill": {**dc.__dict__}, "world_size": 1}
    path.write_text(json.dumps(record))
    return tc, dc


def test_config_replays_a_run_and_flags_override_it(tmp_path):
    cfg = tmp_path / "config.json"
    tc, dc = _write_config(cfg, batch_size=24, out="runs/x")
    got_t, got_d = parse_args(["--config", str(cfg)])
    assert got_t.steps == 17 and got_t.lr == 2e-4 and got_t.batch_size == 24 and got_t.out == "runs/x"
    assert got_d.gw_max == 2.25 and got_d.corr_guidance_interval == (0.0, 1.0)  # the mnist preset's
    got_t, got_d = parse_args(["--config", str(cfg), "--steps", "5", "--gw-max", "3.5"])
    assert got_t.steps == 5 and got_t.batch_size == 24 and got_d.gw_max == 3.5


@pytest.mark.parametrize("content, match", [
    (None, "is not a file"),
    ("{not json", "is not valid JSON"),
    ('{"distill": {}}', "must hold"),
    ('{"train": {"learning_rate": 1}}', "unknown keys"),
])
def test_bad_config_file_names_the_argument(tmp_path, content, match):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"--config .*{match}"):
        parse_args(["--config", str(path)])


@pytest.mark.slow
def test_a_grid_that_cannot_be_written_is_a_warning(tmp_path):
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                    learn_sigma=False)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(DiT(cfg, family="internal"), str(teacher))
    out = tmp_path / "run"
    out.mkdir()
    (out / "samples").write_text("a file where the grid folder should be")
    proc = subprocess.run([sys.executable, "-m", "freeflow.train", "--teacher-ckpt", str(teacher), "--out", str(out),
                           "--steps", "2", "--batch-size", "4", "--ckpt-every", "1", "--sample-every", "1",
                           "--no-evaluate", "--teacher-steps", "1", "--grid-size", "2", "--backend", "reference"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: sample grid at step 1 not written" in proc.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000001.pt", "step_0000002.pt"]
    assert (out / "student_ema.pt").exists()


class _FakeVAE:
    """decode(z).sample: a fixed linear map 4 latent channels → 3 image channels at 2× resolution."""

    def __init__(self):
        self.w = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, -1.0, 0]])

    def decode(self, z):
        img = torch.einsum("oc,nchw->nohw", self.w, z).repeat_interleave(2, -1).repeat_interleave(2, -2)
        return type("Out", (), {"sample": img})()


def test_latent_grid_is_decoded_through_the_vae(tmp_path):
    g = torch.Generator().manual_seed(0)
    teacher = torch.rand(2, 4, 4, 4, generator=g) * 0.1
    student = torch.rand(2, 4, 4, 4, generator=g) * 0.1
    write_grid(str(tmp_path / "g.png"), teacher, student, 2, _FakeVAE())
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2, 3)
    # first tile = teacher[0] decoded: channel 0 = z0/0.18215, channel 2 = -z2/0.18215, pixels doubled
    want = teacher[0] / 0.18215
    want = torch.stack([want[0], want[1], -want[2]]).repeat_interleave(2, -1).repeat_interleave(2, -2)
    want = ((want.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    np.testing.assert_allclose(grid[2:10, 2:10].astype(float), want, atol=1)
    write_grid(str(tmp_path / "h.png"), teacher, student, 2)  # no VAE: the first latent channel, grey
    plain = np.asarray(Image.open(tmp_path / "h.png"))
    assert (plain[2:6, 2:6, 0] == plain[2:6, 2:6, 2]).all()


_FAKE_WANDB = '''
import json, os
_path = os.environ["FAKE_WANDB_LOG"]


class _Run:
    def log(self, row, step=None):
        with open(_path, "a") as f:
            f.write(json.dumps({"step": step, **row}) + "\\n")

    def finish(self):
        with open(_path, "a") as f:
            f.write(json.dumps({"finished": True}) + "\\n")


def init(project=None, config=None, dir=None, name=None):
    with open(_path, "a") as f:
        f.write(json.dumps({"project": project, "config": config, "name": name}) + "\\n")
    return _Run()
'''


@pytest.mark.slow
def test_wandb_logs_the_config_and_every_metrics_row(tmp_path):
    """A stand-in ``wandb`` module on the path records the calls the trainer makes."""
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(_FAKE_WANDB)
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                    learn_sigma=False)
    save_checkpoint(DiT(cfg, family="internal"), str(tmp_path / "teacher.pt"))
    log = tmp_path / "wandb.jsonl"
    path = os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "freeflow.train", "--teacher-ckpt", str(tmp_path / "teacher.pt"),
                           "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--log-every", "1",
                           "--sample-every", "100", "--no-evaluate", "--backend", "reference", "--wandb", "proj"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0", "FAKE_WANDB_LOG": str(log),
                               "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0]["project"] == "proj" and calls[0]["config"]["train"]["steps"] == 2 and calls[0]["name"] == "run"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [c["step"] for c in calls[1:-1]] == [m["step"] for m in metrics] == [1, 2]
    assert calls[1]["pred_loss"] == metrics[0]["pred_loss"] and calls[-1] == {"finished": True}


def test_the_mnist_preset_distils_the_long_teacher_and_evaluates_inside_its_guidance_range():
    from freeflow.demo import ASSETS_DIR, LONG_TEACHER_FILE
    from freeflow.experiments.common import STUDY_TEACHER
    from freeflow.models import load_checkpoint
    from freeflow.train import load_teacher

    tc, dc = parse_args([])
    teacher = load_teacher(tc, torch.device("cpu"))
    want = load_checkpoint(str(ASSETS_DIR / LONG_TEACHER_FILE)).state_dict()
    first = load_checkpoint(str(STUDY_TEACHER)).state_dict()
    got = teacher.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(got[k], first[k]) for k in first)
    # The student only learns γ in [gw_min, gw_max]: the demo must not score it outside.
    assert dc.gw_min <= tc.eval_gw <= dc.gw_max


@pytest.mark.parametrize("one, many, want", [(0.02, 0.005, 4), (0.005, 0.02, 1), (0.02, 0.017, 1)],
                         ids=["cores-faster", "one-faster", "cores-inside-the-margin"])
def test_threads_0_keeps_what_a_timing_now_finds_faster(monkeypatch, one, many, want):
    """The rule times the workload on 1 thread and on all cores (real time, here a workload whose duration
    depends on the thread count it runs with) and keeps all cores only when they are clearly faster."""
    import time

    from freeflow import train

    monkeypatch.setattr(train, "_thread_workload",
                        lambda: lambda: time.sleep(one if torch.get_num_threads() == 1 else many))
    before = torch.get_num_threads()
    threads, seconds = train.probe_threads(4)
    assert threads == want and set(seconds) == {1, 4}
    assert seconds[1] == pytest.approx(one, abs=0.01) and seconds[4] == pytest.approx(many, abs=0.01)
    assert torch.get_num_threads() == before  # the probe leaves the count as it found it
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(train.os, "getloadavg", lambda: (3.5, 0.0, 0.0), raising=False)  # no longer read
    assert train.default_threads() == want


def test_threads_0_follows_omp_num_threads_and_a_resumed_run_keeps_its_recorded_count(monkeypatch, tmp_path):
    from freeflow import train

    monkeypatch.setattr(train, "probe_threads", lambda cores: pytest.fail("no timing expected"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun (and anyone else) decides: torch already follows it
    assert train.default_threads(str(tmp_path)) == torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS")
    (tmp_path / "config.json").write_text(json.dumps({"threads_used": 3}))
    assert train.default_threads(str(tmp_path)) == 3  # the same reduction order as before the kill
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert train.default_threads(None) == 1  # one core: nothing to time
