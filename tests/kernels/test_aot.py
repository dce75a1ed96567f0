"""The compile report and gate (kernels.aot): launch recording, pruning, cuobjdump parsing, the clean-config rule,
and one real compile for sm_90."""
import os
import subprocess
import sys

import pytest
import torch

from freeflow.kernels import aot
from freeflow.kernels import flash_attention as fa
from freeflow.kernels._launch import smem_budget, smem_budget_override

SAMPLE = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _attn_fwd_kernel:
  REG:255 STACK:1936 SHARED:1024 LOCAL:8 CONSTANT[0]:736 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_res_usage():
    assert aot.parse_res_usage(SAMPLE) == dict(regs=255, spill=1944, static_smem=1024)
    clean = SAMPLE.replace("STACK:1936", "STACK:0").replace("LOCAL:8", "LOCAL:0")
    assert aot.parse_res_usage(clean)["spill"] == 0
    with pytest.raises(ValueError, match="no resource line"):
        aot.parse_res_usage("Resource usage:\n")


def test_clean_means_no_spill_and_fits_shared_memory():
    limit = aot.SMEM_LIMIT[80]
    assert aot.is_clean(dict(regs=200, spill=0, smem=limit), limit)
    assert not aot.is_clean(dict(regs=255, spill=8, smem=1024), limit)
    assert not aot.is_clean(dict(regs=128, spill=0, smem=limit + 1), limit)
    assert not aot.is_clean(dict(error="OutOfResources", seconds=1.0), limit)
    rows = [dict(clean=1, overflow_kept=0), dict(clean=0, overflow_kept=0), dict(clean=2, overflow_kept=1)]
    assert aot.failures(rows) == [rows[1]]
    assert aot.failures(rows, all_configs=True) == [rows[1], rows[2]]


def _meta(**flags):
    base = dict(HAS_TQ=False, HAS_TK=False, HAS_TV=False, UPCAST=False, HEAD_D=128, HEAD_D2=0, HEAD_DV=128,
                HEAD_DV2=0)
    return {**base, **flags}


def test_pruning_drops_configs_that_cannot_fit_and_never_empties():
    import triton
    flags = {"SPLIT_QK": False, "SPLIT_V": False}
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **flags}, num_warps=w, num_stages=s)
               for m, n, w, s in [(128, 128, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3), (32, 32, 8, 2)]]
    prune = fa._pruner(fa._fwd_footprint, "fwd")
    tangent = _meta(HAS_TQ=True, HAS_TK=True, HAS_TV=True)
    kept = prune(configs, tangent)
    assert kept == [configs[3]]  # 2 fp32 accumulators of 128×128 cannot live in 128 threads; 32×32 in 256 can
    primal = prune(configs, _meta())
    assert len(primal) > len(kept)  # the primal variant keeps more configs than the tangent one
    with smem_budget_override(1024):  # nothing fits 1 KB: the smallest-register config stays
        assert smem_budget() == 1024
        assert prune(configs, tangent) == [configs[3]]
    assert smem_budget() == (aot.SMEM_LIMIT[80] if not torch.cuda.is_available() else smem_budget())


def test_recorded_launches_are_what_dispatch_launches():
    launches = aot.attention_launches(torch.bfloat16, 72)
    names = [la.kernel for la in launches]
    assert names.count(fa._attn_fwd_kernel) == 1 + 7 * 2 and names.count(fa._attn_bwd_dq_kernel) == 1
    flags = [aot.flags_of(la) for la in launches if la.kernel is fa._attn_fwd_kernel]
    assert {(f["HAS_TQ"], f["HAS_TK"], f["HAS_TV"], f["STORE_O"]) for f in flags} == (
        {(False, False, False, True)} | {(a, b, c, s) for a in (0, 1) for b in (0, 1) for c in (0, 1)
                                         for s in (True, False) if a or b or c})
    # GPU settings: bf16 on the tensor cores; head dim 72 padded to 128, or as 64 + 16 where a config splits it
    assert all((f["HEAD_D"], f["HEAD_D2"], f["UPCAST"]) == (128, 16, False) for f in flags)
    # what compile_job compiles: the chunk widths the kernels' heuristics derive, as head_chunks splits 72
    la = next(la for la in launches if la.kernel is fa._attn_bwd_dkdv_kernel)
    for split_qk, split_v, want in ((True, False, (64, 16, 128, 0)), (False, True, (128, 0, 64, 16)),
                                    (False, False, (128, 0, 128, 0))):
        args = aot.with_heuristics(la.kernel, {**la.args, "SPLIT_QK": split_qk, "SPLIT_V": split_v})
        assert tuple(args[k] for k in ("BLOCK_D", "BLOCK_D2", "BLOCK_DV", "BLOCK_DV2")) == want
    # adaLN: modulate, gated residual and the seam with every tangent subset (2^3 + 2^3 + 2^5 forward launches),
    # each a distinct constexpr variant, and 4 backward launches
    adaln = aot.adaln_launches(torch.bfloat16, 1152)
    kernel_names = [aot.jit_function(la.kernel).__name__ for la in adaln]
    assert kernel_names == ["_adaln_fwd_kernel"] * (8 + 8 + 32) + ["_adaln_bwd_kernel"] * 4
    fwd = {tuple(sorted(k for k, v in aot.flags_of(la).items() if v is True)) for la in adaln[:48]}
    assert len(fwd) == 48
    assert len(aot.gelu_launches(torch.bfloat16, 4608)) == 10


def test_fp32_dot_precision_reaches_every_attention_kernel(monkeypatch):
    """GPU settings: fp32 attention launches take FREEFLOW_FP32_DOT (default three-pass TF32, upcast), bf16 runs
    natively on the tensor cores, a bad value names the variable, and the precision is part of the autotune key
    (a config tuned for one precision is not reused for another)."""
    def precisions():
        return {(aot.flags_of(la)["PRECISION"], aot.flags_of(la)["UPCAST"])
                for la in aot.attention_launches(torch.float32, 72) if "PRECISION" in aot.flags_of(la)}
    monkeypatch.delenv("FREEFLOW_FP32_DOT", raising=False)
    assert precisions() == {("tf32x3", True)}
    monkeypatch.setenv("FREEFLOW_FP32_DOT", "ieee")
    assert precisions() == {("ieee", True)}
    assert {aot.flags_of(la).get("UPCAST") for la in aot.attention_launches(torch.bfloat16, 72)} - {None} == {False}
    monkeypatch.setenv("FREEFLOW_FP32_DOT", "fp64")
    with pytest.raises(ValueError, match="FREEFLOW_FP32_DOT must be one of"):
        aot.attention_launches(torch.float32, 72)
    for kernel in (fa._attn_fwd_kernel, fa._attn_bwd_dkdv_kernel, fa._attn_bwd_dq_kernel):
        assert "PRECISION" in kernel.keys


def test_a_compile_that_aborts_its_process_is_reported_not_fatal():
    """Triton 3.9's LLVM aborts on one fp32 attention config (an SLPVectorizer assertion): the gate must record
    that config as an error and go on. ``os._exit`` stands in for the abort; a normal job still returns."""
    ctx = __import__("multiprocessing").get_context("spawn")
    crashed = aot.compile_isolated(134, ctx, fn=os._exit)
    assert crashed["error"].startswith("the compiler crashed") and not aot.is_clean(crashed, aot.SMEM_LIMIT[90])
    assert aot.compile_isolated(-3, ctx, fn=abs) == 3


def test_sweep_covers_every_kernel():
    labels = {aot.case_label(name, "", la).split()[0] for name, k in aot._kernels().items()
              for _, la in aot.sweep(full=False) if la.kernel is k}
    assert labels == set(aot._kernels())


@pytest.mark.slow
def test_gate_cli_compiles_for_sm90():
    """End to end in a fresh process (the interpreter off): one small kernel compiled for sm_90, resources read
    back from the cubin, exit status 0; an unknown arch is a usage error (2)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "freeflow.kernels.aot", "--arch", "90", "--jobs", "1",
           "--match", r"preprocess.*Dh=64", "--json", "-"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if "_attn_bwd_preprocess_kernel" in x)
    cells = line.split()
    assert "sm_90" in cells and "1/1/1" in cells, line
    assert "1 with a config that fits and spills nothing, 0 without" in out.stdout
    bad = subprocess.run(cmd[:3] + ["--arch", "75"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
