"""The trainer: exact resume, SIGKILL during checkpointing, NaN stop, 2-process DDP, config errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from checks import trained_like_

from freeflow.config import parse_args
from freeflow.models import DiT, DiTConfig, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                    learn_sigma=False)
    model = DiT(cfg, family="internal")
    trained_like_(model)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(model, str(path))
    return str(path)


def _args(teacher, out, steps, **extra):
    # --threads 1: two fresh runs compare bit for bit only at equal thread counts, and --threads 0 times the machine
    # at start, which a busy test machine can tip either way (a resumed run keeps its recorded count: test_cli.py)
    args = ["--threads", "1", "--teacher-ckpt", teacher, "--out", str(out), "--steps", str(steps), "--batch-size", "8",
            "--ckpt-every", "3", "--sample-every", "1000", "--log-every", "1", "--no-evaluate", "--teacher-steps", "2",
            "--grid-size", "2", "--backend", "reference", "--lr", "1e-3", "--aux-lr", "1e-3", "--ema-decay", "0.9"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _train(*args, check=True, env=None, launcher=(sys.executable, "-m", "freeflow.train")):
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _metrics(out):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}


def _losses(rows, steps):
    return [(rows[s]["pred_loss"], rows[s]["corr_loss"], rows[s]["aux_loss"]) for s in steps]


def _student(out):
    return load_checkpoint(os.path.join(out, "student_ema.pt"), backend="reference").state_dict()


# --compile with aot_eager: the graphs are captured and run as traced, without Inductor's minute of code generation
COMPILED_LORA = ["--compile", "--compile-mode", "aot_eager", "--aux", "lora", "--lora-rank", "4"]
AUX_SCHEDULE = ["--aux-updates", "2", "--aux-warmup", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("precision, flags", [("fp32", []), ("bf16", []), ("fp32", COMPILED_LORA),
                                             ("fp32", AUX_SCHEDULE)],
                         ids=["fp32", "bf16", "compiled-lora", "aux-updates-warmup"])
def test_resume_replays_the_uninterrupted_run(teacher_path, tmp_path, precision, flags):
    """Also under bf16 autocast (CPU autocast here: the checkpoint holds fp32 master state), with compiled
    networks and a LoRA aux (the checkpoint holds only the adapters and their optimizer), and with extra aux
    updates and an aux warm-up (done once, before step 1: the resumed half must not redo it)."""
    full, split = tmp_path / "full", tmp_path / "split"
    first = _train(*_args(teacher_path, full, 6, precision=precision), *flags)
    assert ("first step with torch.compile (aot_eager)" in first.stderr) == ("--compile" in flags)
    _train(*_args(teacher_path, split, 3, precision=precision), *flags)
    _train(*_args(teacher_path, split, 6, precision=precision), *flags)
    a, b = _metrics(full), _metrics(split)
    assert sorted(b) == list(range(1, 7))
    assert _losses(a, range(1, 7)) == _losses(b, range(1, 7))  # bit-exact on the CPU
    sa, sb = _student(full), _student(split)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    cfg = json.load(open(full / "config.json"))
    assert cfg["train"]["steps"] == 6 and cfg["distill"]["pred_fraction"] == 0.75
    assert cfg["train"]["precision"] == precision
    assert cfg["environment"]["TRITON_INTERPRET"] == "0"  # settings that pick kernels are part of the record
    assert cfg["teacher_path"] == str(teacher_path)  # what freeflow.search reads to pair student and teacher


@pytest.mark.slow
def test_a_deeper_student_resumes_and_is_saved_with_its_depth(teacher_path, tmp_path):
    out = tmp_path / "deeper"
    _train(*_args(teacher_path, out, 3, student_extra_depth=2))
    wrong = _train(*_args(teacher_path, out, 5), check=False)  # the flag forgotten on resume: a clear error
    assert wrong.returncode != 0 and "resume with --student-extra-depth 2" in wrong.stderr
    _train(*_args(teacher_path, out, 5, student_extra_depth=2))
    assert sorted(_metrics(out)) == list(range(1, 6))
    student = load_checkpoint(os.path.join(out, "student_ema.pt"), backend="reference")
    assert student.config.depth == load_checkpoint(teacher_path).config.depth + 2
    assert student.blocks[-1].adaLN_modulation[-1].weight.abs().sum() > 0  # the new blocks trained


@pytest.mark.slow
def test_resume_with_another_aux_fails_by_name(teacher_path, tmp_path):
    out = tmp_path / "lora"
    _train(*_args(teacher_path, out, 3), "--aux", "lora", "--lora-rank", "4")
    wrong = _train(*_args(teacher_path, out, 5), check=False)  # --aux lora forgotten: the adapters do not fit
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    assert "does not fit this run's trainable tensors" in wrong.stderr and "lora_A" in wrong.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], COMPILED_LORA], ids=["eager-full", "compiled-lora"])
def test_sigkill_during_checkpointing_resumes_from_last_good(teacher_path, tmp_path, flags):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _train(*_args(teacher_path, ref, 30, ckpt_every=1), *flags)
    proc = subprocess.Popen([sys.executable, "-m", "freeflow.train", *_args(teacher_path, killed, 30, ckpt_every=1),
                             *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    ckpts = killed / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len([p for p in os.listdir(ckpts)] if ckpts.exists() else []) < 2:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # with a checkpoint every step, most kills land inside a save
    proc.wait()
    # what a kill inside torch.save leaves, plus a truncated checkpoint file (e.g. a full disk):
    (ckpts / "step_0000099.pt.tmp.123").write_bytes(b"partial")
    (ckpts / "step_9999999.pt").write_bytes(b"\x80\x02truncated")
    _train(*_args(teacher_path, killed, 30, ckpt_every=1), *flags)
    assert _losses(_metrics(ref), range(1, 31)) == _losses(_metrics(killed), range(1, 31))
    assert (ckpts / "step_9999999.pt.corrupt").exists()
    assert not [p for p in os.listdir(ckpts) if ".tmp." in p]


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(teacher_path, tmp_path):
    out = tmp_path / "nan"
    _train(*_args(teacher_path, out, 3))
    bad = tmp_path / "bad_teacher.pt"
    model = load_checkpoint(teacher_path)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(float("nan"))
    save_checkpoint(model, str(bad))
    proc = _train(*_args(str(bad), out, 6), check=False)
    assert proc.returncode == 3
    assert "non-finite" in proc.stderr and "at step 4" in proc.stderr and "step_0000003.pt" in proc.stderr
    good = torch.load(out / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert good["step"] == 3
    assert not (out / "checkpoints" / "step_0000006.pt").exists()


def _assert_equal_up_to_adam_round_off(got, want, name):
    """Two ranks sum the gradient in another order than one process, so it differs in round-off. Adam's update
    ``lr·m/(√v + ε)`` passes that on unchanged except where a gradient is within a few ε (1e-8) of zero: there a
    round-off change of the gradient moves the update by a visible part of lr. Measured over 3 steps at lr 1e-3:
    most elements are bit-identical, and at most 5 of 4,096 in a tensor differ by more than 1e-6 (the largest by
    4.5e-6). A run on half the batch (what a rank stepping alone would do) matches in 2-13 % of the elements."""
    close = torch.isclose(got, want, rtol=1e-5, atol=1e-6)
    assert close.float().mean() >= 0.995, (name, int((~close).sum()), close.numel())
    assert (got - want).abs().max() <= 2e-5, (name, float((got - want).abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], COMPILED_LORA], ids=["eager-full", "compiled-lora"])
def test_two_process_ddp_equals_one_process(teacher_path, tmp_path, flags):
    one, two = tmp_path / "one", tmp_path / "two"
    _train(*_args(teacher_path, one, 3), *flags)
    _train(*_args(teacher_path, two, 3), *flags,
           launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                     "-m", "freeflow.train"), env={"OMP_NUM_THREADS": "1"})
    sa, sb = _student(one), _student(two)
    for k in sa:
        _assert_equal_up_to_adam_round_off(sb[k], sa[k], k)
    a, b = _metrics(one), _metrics(two)
    for s in range(1, 4):
        for key in ("pred_loss", "corr_loss", "aux_loss", "lambda"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-5), (s, key)


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--preset", "imagenet"], "--preset must be one of"),
    (["--preset", "repa-xl2-256"], "needs --teacher-ckpt"),
    (["--aux", "half"], "--aux must be one of"),
    (["--pred-fraction", "1.5"], "pred_fraction"),
    (["--ema-decay", "1.0"], "--ema-decay must be in"),
    (["--student-extra-depth", "-1"], "--student-extra-depth must be >= 0"),
])
def test_invalid_values_fail_before_any_work(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_unknown_flag_fails():
    with pytest.raises(SystemExit):
        parse_args(["--learning-rate", "1"])
