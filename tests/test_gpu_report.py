"""The one-call GPU report (benchmarks/gpu_report.sh) and its tuning stage (benchmarks/tune_configs.py), on the CPU.

What runs only on a GPU cannot be checked here; what can: ``tune_configs`` times one row per autotune config of each
attention kernel (counted against the Autotuner's own list, with configs added to it: the interpreter keeps only the
first) and one per launch-helper candidate of the adaLN / GELU kernels, each launched with its own setting; the
candidates around the GPU helpers' choices are sane; and the script's dry run goes through every stage, survives a
compiler crash in a precompile worker and writes summary.json, machine.json and report.md.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import freeflow.kernels.adaln as adaln
import freeflow.kernels.flash_attention as fa
import freeflow.kernels.gelu as gelu
from freeflow.kernels._dispatch import gpu_launch_settings
from freeflow.kernels._launch import elementwise_tiles, row_tiles

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = {"attn_fwd": "_attn_fwd_kernel", "attn_fwd_tangent": "_attn_fwd_kernel",
             "attn_bwd_dkdv": "_attn_bwd_dkdv_kernel", "attn_bwd_dq": "_attn_bwd_dq_kernel"}
DRY_RUN_CASES = ["attn_fwd", "attn_bwd_dkdv", "adaln_seam_bwd", "gelu_jvp"]  # gpu_report.sh --dry-run's
STAGES = ["machine", "install", "tune", "step_B2", "step_XL2", "selftest", "benchmarks", "report"]


@pytest.fixture(scope="module")
def tune():
    spec = importlib.util.spec_from_file_location("tune_configs", ROOT / "benchmarks" / "tune_configs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_one_timed_row_per_config(tune, monkeypatch):
    import triton

    for name in set(ATTENTION.values()):  # a second config, so that autotune has a choice to make
        kernel = getattr(fa, name)
        first = kernel.configs[0]
        extra = triton.Config({**first.kwargs, "BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2)
        monkeypatch.setattr(kernel, "configs", [*kernel.configs, extra])
    cases = [*ATTENTION, "adaln_seam_bwd", "gelu_jvp"]
    report = tune.run(["B/2"], ["fp32"], cases=cases, tiny=True, jobs=0, log=lambda *a: None)
    assert report["errors"] == [] and report["status"] == "done"
    rows = {r["case"]: r for r in report["cases"]}
    assert sorted(rows) == sorted(cases)
    for case, name in ATTENTION.items():
        row, kernel = rows[case], getattr(fa, name)
        assert row["mode"] == "autotune" and row["kernel"] == f"flash_attention.{name}"
        assert [c["name"] for c in row["configs"]] == [tune.config_name(c) for c in kernel.configs]
        assert all(c["status"] == "ok" and c["ms"] > 0 and isinstance(c["pruned"], bool) for c in row["configs"])
        assert "autotune_error" not in row and set(row["autotune_ms"]) <= {c["name"] for c in row["configs"]}
        assert sum(c["default"] for c in row["configs"]) == 1, "autotune's pick is one of the configs"
        assert row["reference"]["ms"] > 0 and all(c["speedup"] > 0 for c in row["configs"])
    sh = tune.shapes("B/2", tiny=True)
    expected = {
        "adaln_seam_bwd": tune.row_candidates(row_tiles(sh["hidden"], sh["S"]), sh["hidden"], sh["S"]),
        "gelu_jvp": tune.elementwise_candidates(elementwise_tiles(sh["N"] * sh["S"], sh["mlp"]), sh["N"] * sh["S"],
                                                sh["mlp"]),
    }
    for case, candidates in expected.items():
        row = rows[case]
        assert row["mode"] == "helper" and len(candidates) > 1
        assert [tuple(c["setting"]) for c in row["configs"]] == candidates
        assert row["configs"][0]["default"] and not any(c["default"] for c in row["configs"][1:])
        # "ok" includes the check that the kernel was launched with the candidate, not the wrapper's own setting
        assert all(c["status"] == "ok" and c["ms"] > 0 for c in row["configs"])
    md = tune.markdown(report)
    assert tune.DETAILS_MARK in md and md.count("\n| ") >= sum(len(r["configs"]) for r in rows.values())


def test_helpers_are_restored_and_configs_untouched(tune, device):
    """Nothing the tuning swaps (Autotuner configs, launch helpers, kernels' run) outlives it."""
    before = {n: list(getattr(fa, n).configs) for n in set(ATTENTION.values())}
    case = next(c for c in tune.build_cases("B/2", "fp32", device.type, tiny=True) if c.name == "gelu_bwd")
    plan = tune.plan_case(case)
    tune.launch_setting(case, plan, len(plan.settings) - 1, capture=True)
    fn, ctx = tune.setting_call(case, plan, 1)
    with ctx:
        fn()
    assert gelu.elementwise_tiles is elementwise_tiles and adaln.row_tiles is row_tiles
    assert all("run" not in vars(k) for k in tune._kernels())
    assert {n: list(getattr(fa, n).configs) for n in before} == before


def test_candidates_around_the_gpu_settings(tune):
    with gpu_launch_settings():
        for C, S in ((768, 256), (1152, 256)):
            default = row_tiles(C, S)
            cands = tune.row_candidates(default, C, S)
            assert cands[0] == default and len(set(cands)) == len(cands) and 5 <= len(cands) <= 20
            assert all(bc == default[1] and s * bc / (32 * w) <= 32 for s, bc, w in cands[1:])
        for M, C in ((32 * 256, 3072), (32 * 256, 4608)):
            default = elementwise_tiles(M, C)
            cands = tune.elementwise_candidates(default, M, C)
            assert cands[0] == default and len(set(cands)) == len(cands) and 5 <= len(cands) <= 20
            assert all(4 <= m * c / (32 * w) <= 32 for m, c, w in cands[1:])


@pytest.mark.slow
def test_dry_run_lists_every_stage(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, PYTHON=sys.executable, FREEFLOW_TUNE_ABORT_ON="gelu_jvp:1",
               GPU_REPORT_STEP_B2_S="0", GPU_REPORT_STEP_XL2_S="0")  # bench_step on a CPU: no time given, skipped
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_report.sh"), "--dry-run", "--tar",
                          str(tmp_path / "r.tgz"), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["name"] for s in summary["stages"]] == STAGES and summary["dry_run"] is True
    assert stages["install"]["status"] == "skipped"
    assert all(stages[s]["status"] in ("skipped", "missing") for s in ("step_B2", "step_XL2"))
    for name in ("machine", "tune", "benchmarks", "report"):
        assert stages[name]["status"] == "ok", (name, (out / "logs" / f"{name}.log").read_text()[-2000:])
        assert stages[name]["exit_code"] == 0 and stages[name]["wall_s"] >= 0 and stages[name]["timeout_s"] >= 5
        assert (out / stages[name]["log"]).exists()
    machine = json.loads((out / "machine.json").read_text())
    assert machine["torch"] == torch.__version__ and len(machine["tree_sha256"]) == 16
    if not torch.cuda.is_available():
        assert stages["selftest"]["status"] == "failed" and stages["selftest"]["exit_code"] == 2
        assert json.loads((out / "selftest.json").read_text())["status"] == "no_cuda"
    assert json.loads((out / "benchmarks.json").read_text())["benchmarks"]
    tune = json.loads((out / "tune.json").read_text())
    assert tune["status"] == "done" and tune["precompile"]["crashed"] == 1
    assert [r["case"] for r in tune["cases"]] == tune["settings"]["cases"] == DRY_RUN_CASES
    for row in tune["cases"]:
        for c in row["configs"]:
            crashed = row["case"] == "gelu_jvp" and c["index"] == 1
            assert c["status"] == ("error" if crashed else "ok"), (row["case"], c)
            assert not crashed or "worker exited" in c["error"]
        if os.environ.get("TRITON_INTERPRET") == "1" and row["case"] in ATTENTION:  # the script's run interprets
            assert row["n_configs"] == len(row["configs"]) == len(getattr(fa, ATTENTION[row["case"]]).configs)
    report = (out / "report.md").read_text()
    assert "## Stages" in report and all(f"| {s} |" in report for s in STAGES[:-1])  # all but its own
    assert (tmp_path / "r.tgz").stat().st_size > 0
