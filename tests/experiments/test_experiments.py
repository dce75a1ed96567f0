"""``python -m freeflow.experiments``: the scorer against facts about real digits, resumable runs, the CLI."""
import json
import os

import pytest
import torch

from freeflow.demo.data import load_digits
from freeflow.experiments import __main__ as cli
from freeflow.experiments.common import (
    Scorer,
    averaged_student,
    checkpoint_steps,
    load_teacher,
    run_seconds,
    score_checkpoints,
    student_at,
    train_run,
    write_json,
)
from freeflow.experiments.convergence import weight_averaging
from freeflow.experiments.mismatch import train_baseline


@pytest.fixture(scope="module")
def scorer():
    return Scorer(n=200, seed=3)


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits()
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:200]
    return images[idx], labels[idx]


@pytest.mark.slow
def test_scorer_ranks_real_digits_far_above_noise(scorer, digits):
    images, labels = digits
    real = scorer.score(images, labels)
    noise = scorer.score(torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1, labels)
    # The feature net's held-out accuracy is 98.2 % (assets log): its classifier must agree with the labels.
    assert real["label_accuracy"] > 0.95 and noise["label_accuracy"] < 0.3
    assert real["recall"] > 0.8 and real["precision"] > 0.8 and noise["precision"] < 0.05
    assert noise["fd"] > 10 * real["fd"]
    assert abs(sum(real["class_hist"]) - 1) < 1e-9 and real["class_entropy_bits"] > 3.2  # log2(10) = 3.32


def test_scorer_class_coverage_sees_a_collapsed_sampler(scorer, digits):
    images, labels = digits
    ones = images[labels == 1][:20].repeat(10, 1, 1, 1)
    out = scorer.score(ones)
    assert max(out["class_hist"]) > 0.9 and out["class_entropy_bits"] < 0.6
    assert out["label_accuracy"] < 0.2  # the fixed labels are balanced, the samples are all "1"


def test_scorer_inputs_are_fixed_and_balanced():
    a, b = Scorer(n=100, seed=5), Scorer(n=100, seed=5)
    assert torch.equal(a.z, b.z) and torch.bincount(a.y).tolist() == [10] * 10
    with pytest.raises(ValueError, match="Scorer.n"):
        Scorer(n=55)


@pytest.mark.slow
def test_train_run_keeps_every_checkpoint_and_does_not_retrain_a_finished_run(tmp_path, scorer):
    run = str(tmp_path / "run")
    train_run(run, steps=2, ckpt_every=1, overrides={"batch_size": 8, "log_every": 1, "backend": "reference"})
    ckpts = checkpoint_steps(run)
    assert sorted(ckpts) == [1, 2]
    stamp = os.path.getmtime(ckpts[2])
    train_run(run, steps=2, ckpt_every=1, overrides={"batch_size": 8, "log_every": 1, "backend": "reference"})
    assert os.path.getmtime(ckpts[2]) == stamp
    assert run_seconds(run) > 0
    with open(os.path.join(run, "config.json")) as f:
        resolved = json.load(f)
    # The study's teacher and γ range, not the demo preset's (which moved to the longer teacher since).
    assert os.path.basename(resolved["teacher_path"]) == "mnist_teacher.pt"
    assert (resolved["distill"]["gw_min"], resolved["distill"]["gw_max"]) == (1.5, 2.5)
    teacher = load_teacher()
    state = torch.load(ckpts[2], map_location="cpu", weights_only=True)
    student = student_at(teacher, ckpts[2])
    for k, v in student.state_dict().items():
        assert torch.equal(v, state["ema"][k]), k
    rows = score_checkpoints(scorer, teacher, run)
    assert [r["step"] for r in rows] == [0, 1, 2] and "recall" in rows[-1] and "recall" not in rows[1]
    assert all(r["fd"] > 0 for r in rows)

    # Weight averaging: the element-wise mean of the checkpoints' raw weights, against a hand-made mean.
    raw = [torch.load(ckpts[s], map_location="cpu", weights_only=True)["student"] for s in (1, 2)]
    mean = averaged_student(teacher, [ckpts[1], ckpts[2]]).state_dict()
    for k, v in mean.items():
        torch.testing.assert_close(v, (raw[0][k].double() + raw[1][k].double()).div(2).to(v.dtype)), k
    assert any(not torch.equal(raw[0][k], raw[1][k]) for k in raw[0])  # the two really differ
    with pytest.raises(ValueError, match="key"):
        averaged_student(teacher, [ckpts[1]], key="aux")
    # A 1-step window at step 2 holds one checkpoint, so its averages are the raw and the EMA weights;
    # a 2-step window would reach step 0, which has no checkpoint, and is left out.
    table = weight_averaging(scorer, teacher, run, [1, 2])
    assert [(r["weights"], r["window"]) for r in table] == [("raw", 0), ("ema", 0), ("raw average", 1),
                                                            ("ema average", 1)]
    assert table[2]["fd"] == pytest.approx(table[0]["fd"]) and table[3]["fd"] == pytest.approx(table[1]["fd"])
    assert table[0]["fd"] != pytest.approx(table[1]["fd"])
    pinned = weight_averaging(scorer, teacher, run, [], last=1)  # a run still writing checkpoints
    assert pinned[0]["fd"] == pytest.approx(scorer.score_student(averaged_student(teacher, [ckpts[1]]))["fd"])


@pytest.mark.slow
def test_data_based_baseline_resumes_to_the_same_student(tmp_path):
    teacher = load_teacher()
    images, labels = load_digits()
    images, labels = images[:256], labels[:256]
    straight = train_baseline(str(tmp_path / "a"), teacher, images, labels, 0.5, steps=2, ckpt_every=1)
    train_baseline(str(tmp_path / "b"), teacher, images, labels, 0.5, steps=1, ckpt_every=1)
    resumed = train_baseline(str(tmp_path / "b"), teacher, images, labels, 0.5, steps=2, ckpt_every=1)
    a = torch.load(checkpoint_steps(straight)[2], weights_only=True)
    b = torch.load(checkpoint_steps(resumed)[2], weights_only=True)
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    before = student_at(teacher, checkpoint_steps(straight)[1]).state_dict()
    assert any(not torch.equal(before[k], a["ema"][k]) for k in a["ema"])  # step 2 did change the student


def test_gmm_experiment_writes_results_that_start_at_one_euler_step(tmp_path):
    out = str(tmp_path)
    assert cli.main(["gmm", "--out", out, "--runs", out, "--steps", "30", "--eval-every", "10", "--seeds", "0",
                     "--variants", "both,prediction only,fixed lambda 0.1"]) == 0
    with open(os.path.join(out, "gmm.json")) as f:
        r = json.load(f)
    euler1 = r["teacher_euler"]["1"]
    for v in r["variants"].values():
        curve = v["runs"][0]["curve"]
        assert [s for s, _ in curve] == [0, 10, 20, 30]
        assert curve[0][1] == pytest.approx(euler1, rel=1e-6)  # zero-initialised student = 1 Euler step
    assert r["variants"]["both"]["final_mean"] < euler1
    assert r["teacher_euler"]["8"] < r["teacher_euler"]["2"] < euler1
    energy = r["teacher_euler_energy"]  # the distance between distributions also falls with Euler steps
    assert energy["8"] < energy["2"] < energy["1"]
    assert r["variants"]["fixed lambda 0.1"]["runs"][0]["lambda"] == pytest.approx(0.1)
    assert os.path.isfile(os.path.join(out, "gmm.png"))


def test_cli_lists_every_experiment_and_rejects_bad_input(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in cli.NAMES)
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2
    assert cli.main(["ablation", "--only", "9", "--out", str(tmp_path), "--runs", str(tmp_path)]) == 2
    assert "--only" in capsys.readouterr().err
    assert cli.main(["probes", "--only", "nope", "--out", str(tmp_path), "--runs", str(tmp_path)]) == 2
    assert "unknown probes ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # an experiment writes only where it is told
        cli.main(["gmm", "--steps", "1"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def _probe_record(out, name, seed, fds, last_coverage=None):
    """A probe run's JSON as ``probes`` writes it: ``fds`` maps scored steps to FD."""
    curve = [{"step": 0, "fd": 800.0}] + [{"step": step, "fd": fd} for step, fd in sorted(fds.items())]
    curve[-1].update(last_coverage or {"recall": 0.6, "precision": 0.85, "class_entropy_bits": 3.3})
    from freeflow.experiments.probes import _file

    write_json(os.path.join(out, "probes", f"{_file(name)}-seed{seed}.json"),
               {"probe": name, "seed": seed, "train_seconds": 100.0 * seed + 100.0, "teacher_heun32_fd": 9.2,
                "curve": curve})


def test_probe_summary_reports_seed_spreads_and_calls_a_difference_inside_them_no_difference(tmp_path):
    from freeflow.experiments.probes import summarise

    runs = {("base", 0): 20.0, ("base", 1): 22.0, ("near", 0): 20.5, ("near", 1): 21.7,
            ("better", 0): 15.0, ("better", 1): 16.0, ("worse", 0): 30.0, ("worse", 1): 31.0}
    for (name, seed), fd in runs.items():
        _probe_record(str(tmp_path), name, seed, {1000: fd + 1, 2000: fd})
    table = summarise(str(tmp_path))["probes"]
    last = table["base"]["curve"]["2000"]
    assert last["mean"] == 21.0 and (last["min"], last["max"]) == (20, 22)
    assert table["base"]["fd_at_1000"]["mean"] == 22.0
    assert table["near"]["verdict"].startswith("no difference")  # 0.1 apart; the base's seeds are 1 from its mean
    assert table["better"]["verdict"] == "better" and table["better"]["fd1000_minus_base"] == pytest.approx(-5.5)
    assert table["worse"]["verdict"] == "worse"
    assert os.path.isfile(tmp_path / "probes.json")


def test_probe_summary_aligns_runs_by_step_and_judges_at_1000_against_the_noise_near_the_base(tmp_path):
    """Runs of one probe may differ in length and in how often they were scored (a run continued to 10,000 steps
    and scored every 1,000 beside 1,000-step runs scored every 500): the curve is averaged per step, never per
    position. The noise comes from the multi-seed probes near the base, not from a collapsed one."""
    from freeflow.experiments import probes

    out = str(tmp_path)
    _probe_record(out, "base", 0, {500: 26.0, 1000: 19.0, 2000: 18.0})
    _probe_record(out, "base", 1, {500: 27.0, 1000: 19.4, 2000: 18.4})
    _probe_record(out, "long", 0, {1000: 17.0, 2000: 16.0, 3000: 15.0})
    _probe_record(out, "long", 1, {500: 29.0, 1000: 18.0})
    _probe_record(out, "noisy", 0, {500: 30.0, 1000: 22.0})  # half-range 1.0: the noise near the base
    _probe_record(out, "noisy", 1, {500: 31.0, 1000: 24.0})
    _probe_record(out, "collapsed", 0, {1000: 40.0}, {"recall": 0.2})  # half-range 5.0, outside 1.5x the base
    _probe_record(out, "collapsed", 1, {1000: 50.0}, {"recall": 0.3})
    _probe_record(out, "alpha-1/3", 0, {500: 25.0, 1000: 20.1})
    table = probes.summarise(out)
    assert table["seed_noise_at_1000"] == pytest.approx(1.0)
    rows = table["probes"]
    long = rows["long"]
    assert long["seeds"] == [0, 1]
    assert {step: (c["mean"], c["n"]) for step, c in long["curve"].items()} == {
        "500": (29.0, 1), "1000": (17.5, 2), "2000": (16.0, 1), "3000": (15.0, 1)}
    assert [(r["seed"], r["step"], r["fd"]) for r in long["last"]] == [(0, 3000, 15.0), (1, 1000, 18.0)]
    assert long["fd1000_minus_base"] == pytest.approx(17.5 - 19.2) and long["verdict"] == "better"
    assert rows["alpha-1/3"]["fd1000_minus_base"] == pytest.approx(0.9)  # not above the noise of 1.0
    assert rows["alpha-1/3"]["verdict"].startswith("no difference")
    assert rows["collapsed"]["threshold"] == pytest.approx(5.0)  # its own spread, and it is still worse
    assert rows["collapsed"]["verdict"] == "worse"
    assert [r["recall"] for r in rows["collapsed"]["last"]] == [0.2, 0.3]
    assert "verdict" not in rows["base"]
    with open(os.path.join(out, "probes.json")) as f:
        assert json.load(f)["probes"]["noisy"]["fd_at_1000"]["mean"] == pytest.approx(23.0)
    assert os.path.getsize(os.path.join(out, "probes.png")) > 0


@pytest.mark.slow
def test_convergence_preset_trains_the_shipped_preset_in_its_own_folder(tmp_path, monkeypatch):
    from freeflow.experiments import convergence
    passed = []

    def small_train_run(run_dir, steps, ckpt_every, overrides=None):  # the reference kernels, a small batch
        passed.append(overrides)
        return train_run(run_dir, steps, ckpt_every, {**overrides, "batch_size": 8, "backend": "reference"})

    monkeypatch.setattr(convergence, "train_run", small_train_run)
    out, runs = str(tmp_path / "out"), str(tmp_path / "runs")
    argv = ["convergence", "--preset", "--steps", "2", "--ckpt-every", "1", "--samples", "100", "--every", "1",
            "--windows", "1", "--out", out, "--runs", runs]
    assert cli.main(argv) == 0
    assert passed == [{}]  # no STUDY_BASE override
    assert sorted(os.listdir(runs)) == ["convergence-preset"]  # the STUDY_BASE run is left alone
    with open(os.path.join(runs, "convergence-preset", "config.json")) as f:
        assert json.load(f)["distill"]["corr_guidance_interval"] == [0.0, 1.0]  # the preset's, not STUDY_BASE's
    with open(os.path.join(out, "convergence-preset.json")) as f:
        result = json.load(f)
    assert [r["step"] for r in result["curve"]] == [0, 1, 2]
    assert os.path.isfile(os.path.join(out, "convergence-preset.png"))


@pytest.mark.slow
def test_convergence_set_changes_one_option_in_a_run_named_after_it(tmp_path, monkeypatch):
    from freeflow.experiments import convergence
    passed = []

    def small_train_run(run_dir, steps, ckpt_every, overrides=None):
        passed.append(dict(overrides))
        return train_run(run_dir, steps, ckpt_every, {**overrides, "batch_size": 8, "backend": "reference"})

    monkeypatch.setattr(convergence, "train_run", small_train_run)
    out, runs = str(tmp_path / "out"), str(tmp_path / "runs")
    argv = ["convergence", "--preset", "--set", "delta_one_prob=1", "--set", "pred-guidance-interval=0,0.5",
            "--set", "student_extra_depth=1",
            "--steps", "1", "--ckpt-every", "1", "--samples", "100", "--windows", "1", "--out", out, "--runs", runs]
    assert cli.main(argv) == 0
    assert passed == [{"delta_one_prob": "1", "pred_guidance_interval": ("0", "0.5"), "student_extra_depth": "1"}]
    name = "convergence-preset-delta_one_prob=1-pred_guidance_interval=0,0.5-student_extra_depth=1"
    assert os.listdir(runs) == [name]
    with open(os.path.join(runs, name, "config.json")) as f:
        config = json.load(f)
    distill = config["distill"]
    assert distill["delta_one_prob"] == 1.0 and distill["pred_guidance_interval"] == [0.0, 0.5]
    assert distill["corr_guidance_interval"] == [0.0, 1.0]  # the rest is the preset's
    # a deeper student than the teacher trains, and its checkpoints score (the scorer rebuilds its depth)
    assert config["train"]["student_extra_depth"] == 1
    ema = torch.load(checkpoint_steps(os.path.join(runs, name))[1], map_location="cpu", weights_only=True)["ema"]
    depth = load_teacher().config.depth
    assert f"net.blocks.{depth}.attn.qkv.weight" in ema and f"net.blocks.{depth + 1}.attn.qkv.weight" not in ema
    assert averaged_student(load_teacher(), [checkpoint_steps(os.path.join(runs, name))[1]]).net.config.depth \
        == depth + 1
    assert os.path.isfile(os.path.join(out, f"{name}.json"))
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        convergence.parse_overrides(["delta_one_prob"])


def test_convergence_of_another_teacher_scores_it_at_its_own_guidance(tmp_path, monkeypatch):
    """``--set teacher_ckpt=PATH --gw G``: the run is named after the file, and the baselines are that
    teacher's at γ = G, cached apart from the shipped teacher's."""
    from freeflow.experiments import convergence
    from freeflow.models import DiT, DiTConfig, save_checkpoint
    other = tmp_path / "teachers" / "other_teacher.pt"
    other.parent.mkdir()
    save_checkpoint(DiT(DiTConfig(input_size=28, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                                  num_classes=10, learn_sigma=False)), str(other))
    seen = {}

    class Stop(Exception):
        pass

    def baselines(scorer, teacher, cache, teacher_ckpt=""):
        seen.update(gw=scorer.gw, cache=os.path.basename(cache), teacher_ckpt=teacher_ckpt, depth=teacher.config.depth)
        raise Stop

    monkeypatch.setattr(convergence, "train_run", lambda *a, **k: None)
    monkeypatch.setattr(convergence, "teacher_baselines", baselines)
    with pytest.raises(Stop):
        cli.main(["convergence", "--preset", "--set", f"teacher_ckpt={other}", "--set", "gw_min=1", "--gw", "1.5",
                  "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")])
    assert seen == dict(gw=1.5, cache="teacher_fd-other_teacher-gw=1.5.json", teacher_ckpt=str(other), depth=1)
    assert convergence.run_name(True, convergence.parse_overrides([f"teacher_ckpt={other}", "lr=0.5"]), 1.5) == \
        "convergence-preset-teacher_ckpt=other_teacher-lr=0.5-gw=1.5"
    assert convergence.run_name(False, {}) == "convergence"


@pytest.mark.slow
def test_probes_train_each_probe_and_seed_in_its_own_run_and_score_it(tmp_path, monkeypatch):
    from freeflow.experiments import probes

    passed = []

    def small_train_run(run_dir, steps, ckpt_every, overrides=None):  # the reference kernels, a small batch
        passed.append((os.path.basename(run_dir), overrides))
        return train_run(run_dir, steps, ckpt_every, {**overrides, "batch_size": 8, "backend": "reference"})

    monkeypatch.setattr(probes, "train_run", small_train_run)
    out, runs = str(tmp_path / "out"), str(tmp_path / "runs")
    argv = ["probes", "--only", "base,balance-weighted", "--seeds", "3", "--steps", "2", "--ckpt-every", "1",
            "--score-every", "2", "--samples", "100", "--out", out, "--runs", runs]
    assert cli.main(argv) == 0
    assert [name for name, _ in passed] == ["base-seed3", "balance-weighted-seed3"]
    assert passed[1][1] == {**probes.BASE, "balance": "weighted", "seed": 3}
    with open(os.path.join(runs, "probes", "balance-weighted-seed3", "config.json")) as f:
        config = json.load(f)
    assert config["distill"]["balance"] == "weighted" and config["train"]["seed"] == 3
    # the δ law the probes ran with, not the preset's since (logit-normal): the committed results stay reproducible
    assert (config["distill"]["delta_dist"], config["distill"]["delta_one_prob"]) == ("uniform", 0.25)
    assert os.path.basename(config["teacher_path"]) == "mnist_teacher_long.pt"
    with open(os.path.join(out, "probes", "base-seed3.json")) as f:
        record = json.load(f)
    assert [r["step"] for r in record["curve"]] == [0, 2] and "recall" in record["curve"][-1]
    assert record["scorer"]["gw"] == 1.25
    with open(os.path.join(out, "probes.json")) as f:
        assert set(json.load(f)["probes"]) == {"base", "balance-weighted"}


@pytest.mark.slow
def test_scaling_trains_until_the_deadline_then_scores_against_prior_samples(tmp_path, monkeypatch):
    """The trainer runs as a child process and is stopped at the deadline; its checkpoints are scored and the
    curve is written against steps × batch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the child runs the reference kernels, as a CPU user's would
    out, runs = str(tmp_path / "out"), str(tmp_path / "runs")
    argv = ["scaling", "--batch-size", "8", "--minutes", "0.3", "--device", "cpu", "--ckpt-every", "2",
            "--every", "4", "--samples", "100", "--out", out, "--runs", runs]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "scaling-b8-cpu.json")) as f:
        result = json.load(f)
    assert result["training"]["stopped_at_deadline"] is True  # a million steps do not fit in 18 s
    steps = [r["step"] for r in result["curve"]]
    assert steps[0] == 0 and len(steps) >= 2 and steps == sorted(steps)
    assert all(r["prior_samples"] == 8 * r["step"] for r in result["curve"])
    assert "recall" in result["curve"][-1] and result["curve"][-1]["fd"] < result["curve"][0]["fd"]
    with open(os.path.join(runs, "scaling-b8-cpu", "config.json")) as f:
        assert json.load(f)["train"]["batch_size"] == 8
