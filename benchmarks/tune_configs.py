"""Time every launch setting of the attention, adaLN and bias-GELU kernels at the DiT-B/2 and DiT-XL/2 shapes.

    python benchmarks/tune_configs.py --json tune.json --markdown tune.md [--sizes B/2 XL/2] [--dtypes bf16 fp32]
    TRITON_INTERPRET=1 python benchmarks/tune_configs.py --tiny --json tune.json    # the same plumbing on a CPU

The data that chooses autotune configs and the dispatch rule (docs/performance.md). For each model size (N = 32
samples of S = 256 tokens; DiT-B/2: hidden 768, 12 heads of 64; DiT-XL/2: hidden 1152, 16 heads of 72) and dtype,
each *case* is one kernel launched by its op's launch wrapper:

- ``attn_fwd``: ``flash_attention.attention_forward(q, k, v)``, the primal forward (reference: SDPA forward);
- ``attn_fwd_tangent``: the same kernel with tangents q̇, k̇, v̇ (reference: the eager ``attention_jvp_reference``);
- ``attn_bwd_dkdv`` and ``attn_bwd_dq``: the two kernels of ``attention_backward`` (reference: SDPA's backward,
  which does the work of both);
- ``adaln_seam_jvp`` / ``adaln_seam_bwd``: ``adaln_forward`` of the gated residual + LayerNorm + modulate seam with
  every tangent, and ``adaln_backward`` with both outputs' gradients (reference: the eager references, backward
  by autograd);
- ``gelu_jvp`` / ``gelu_bwd``: ``bias_gelu_forward`` with a tangent and ``bias_gelu_backward`` (same references).

Settings come from the live objects, never from a list kept here. A kernel under ``@triton.autotune`` has each of
its ``configs`` launched alone (the Autotuner's list swapped for that one config around a replay of the launch the
wrapper made), flagged ``pruned`` when the Autotuner's own pruning drops it for this launch (timed all the same when
it compiles), and the config autotune picks is found by letting it tune once. A kernel without autotune takes its
tiles and warps from a launch helper of ``_launch`` (``row_tiles``, ``elementwise_tiles``); the helper is replaced
by each candidate setting in turn (``CANDIDATES``: tile sizes and warps around the helper's own choice, which is the
default) and the wrapper called as usual, so grids and reduction chunks follow. Per setting: the median GPU time
(``triton.testing.do_bench``), the compile error or out-of-resources message if any, and the reference's time over
it (> 1: the kernel is faster).

Compiling is most of the cost (≈ 400 settings, 1–10 s each), so first ``--jobs`` worker processes compile every
setting in parallel into Triton's cache (each launches it once), then this process times them one after another,
finding each compiled. A worker the compiler kills (an LLVM assertion aborts the process) costs only the setting it
was compiling, which is reported as a crash. ``--time-budget`` bounds the whole run: settings not reached are
reported as skipped. The JSON and markdown are rewritten after every case, so a run stopped early keeps its data.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere, installed or not

SIZES = {"B/2": (768, 12), "XL/2": (1152, 16)}   # hidden, heads: DiT-B/2 head dim 64, DiT-XL/2 head dim 72
TINY_SIZES = {"B/2": (64, 2), "XL/2": (144, 2)}  # --tiny: the interpreter's shapes, head dims 32 and 72
BATCH, TOKENS = 32, 256
TINY_BATCH, TINY_TOKENS = 2, 8
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DETAILS_MARK = "<!-- per-config tables -->"  # gpu_report.sh puts the markdown up to here into report.md


# ----------------------------------------------------------------------------------------------
# Cases: one kernel launched by its op's launch wrapper, and the eager/SDPA path it replaces
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    name: str
    what: str
    module: object           # the kernel's module (freeflow.kernels.adaln, ...)
    kernel: str              # the kernel's attribute name in it
    call: object             # () -> launches the kernel through its wrapper, with the wrapper's own settings
    reference_name: str
    reference: object        # () -> the callable to time against (built on first use: graphs, leaves)
    helpers: tuple = ()      # launch helpers the wrapper may take a kernel without autotune's settings from

    @property
    def kernel_name(self) -> str:
        return f"{self.module.__name__.rsplit('.', 1)[-1]}.{self.kernel}"


def shapes(size: str, tiny: bool) -> dict:
    hidden, heads = (TINY_SIZES if tiny else SIZES)[size]
    n, s = (TINY_BATCH, TINY_TOKENS) if tiny else (BATCH, TOKENS)
    return dict(N=n, S=s, hidden=hidden, heads=heads, head_dim=hidden // heads, mlp=4 * hidden)


def build_cases(size: str, dtype_name: str, device: str, tiny: bool) -> list[Case]:
    """The cases of one (size, dtype): inputs drawn once, shared by the cases."""
    import torch.nn.functional as F

    from freeflow.kernels import adaln, gelu
    from freeflow.kernels import flash_attention as fa

    sh = shapes(size, tiny)
    n, s, c, heads, d = sh["N"], sh["S"], sh["hidden"], sh["heads"], sh["head_dim"]
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    def leaves(*ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    def backward_of(forward, inputs, grads):
        """() -> the backward of ``forward(*inputs)`` alone (the graph is built once, outside the timing)."""
        def make():
            ins = leaves(*inputs)
            outs = forward(*ins)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            return lambda: torch.autograd.grad(outs, ins, grads, retain_graph=True)
        return make

    # attention: O and the log-sum-exp (log2 units) the backward reads, computed without any kernel of ours
    q, k, v, tq, tk, tv, do = (rnd(n, heads, s, d) for _ in range(7))
    scale = d ** -0.5
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    o = (torch.softmax(logits, -1) @ v.float()).to(dtype)
    lse = torch.logsumexp(logits, -1) * 1.4426950408889634
    del logits
    sdpa_bwd = backward_of(F.scaled_dot_product_attention, (q, k, v), (do,))
    # adaLN seam: x' = x + a·h, y = LN(x')·(1 + scale) + shift, with every tangent
    x, h, tx, th, gx, gy = (rnd(n, s, c) for _ in range(6))
    gate, shift, sc, tgate, tshift, tscale = (rnd(n, c, scale=0.5) for _ in range(6))
    x_new = (x.float() + gate.float()[:, None] * h.float()).to(dtype)
    mean = x_new.float().mean(-1)
    rstd = torch.rsqrt(x_new.float().var(-1, unbiased=False) + 1e-6)
    # bias + GELU on the MLP hidden
    hh, th2, dy = (rnd(n * s, sh["mlp"], scale=2.0) for _ in range(3))
    bias = rnd(sh["mlp"])
    return [
        Case("attn_fwd", "attention forward, no tangent", fa, "_attn_fwd_kernel",
             lambda: fa.attention_forward(q, k, v), "SDPA forward",
             lambda: lambda: F.scaled_dot_product_attention(q, k, v)),
        Case("attn_fwd_tangent", "attention forward with tangents q̇, k̇, v̇ (O and Ȯ)", fa, "_attn_fwd_kernel",
             lambda: fa.attention_forward(q, k, v, tq, tk, tv), "eager attention_jvp_reference",
             lambda: lambda: fa.attention_jvp_reference(q, k, v, tq, tk, tv)),
        Case("attn_bwd_dkdv", "attention backward, dK/dV kernel", fa, "_attn_bwd_dkdv_kernel",
             lambda: fa.attention_backward(do, q, k, v, o, lse, scale), "SDPA backward (dQ, dK, dV)", sdpa_bwd),
        Case("attn_bwd_dq", "attention backward, dQ kernel", fa, "_attn_bwd_dq_kernel",
             lambda: fa.attention_backward(do, q, k, v, o, lse, scale), "SDPA backward (dQ, dK, dV)", sdpa_bwd),
        Case("adaln_seam_jvp", "gated residual + LayerNorm + modulate, every tangent", adaln, "_adaln_fwd_kernel",
             lambda: adaln.adaln_forward(x, shift, sc, 1e-6, gate, h, tx, tgate, th, tshift, tscale),
             "eager gated_residual_modulate_jvp_reference",
             lambda: lambda: adaln.gated_residual_modulate_jvp_reference(x, gate, h, shift, sc, tx, tgate, th,
                                                                         tshift, tscale),
             helpers=("row_tiles",)),
        Case("adaln_seam_bwd", "seam backward from both outputs' gradients", adaln, "_adaln_bwd_kernel",
             lambda: adaln.adaln_backward(gy, gx, x_new, mean, rstd, sc, gate, h),
             "autograd through gated_residual_modulate_reference",
             backward_of(adaln.gated_residual_modulate_reference, (x, gate, h, shift, sc), (gx, gy)),
             helpers=("row_tiles",)),
        Case("gelu_jvp", "bias + GELU with tangent", gelu, "_bias_gelu_fwd_kernel",
             lambda: gelu.bias_gelu_forward(hh, bias, th2), "eager bias_gelu_jvp_reference",
             lambda: lambda: gelu.bias_gelu_jvp_reference(hh, bias, th2), helpers=("elementwise_tiles",)),
        Case("gelu_bwd", "bias + GELU backward (dh, dbias)", gelu, "_bias_gelu_bwd_kernel",
             lambda: gelu.bias_gelu_backward(dy, hh, bias), "autograd through bias_gelu_reference",
             backward_of(gelu.bias_gelu_reference, (hh, bias), (dy,)), helpers=("elementwise_tiles",)),
    ]


# ----------------------------------------------------------------------------------------------
# Candidate settings of the launch helpers (kernels without autotune)
# ----------------------------------------------------------------------------------------------


def row_candidates(default, C, S, *_, **__):
    """(BLOCK_S, BLOCK_C, num_warps) for kernels holding BLOCK_S whole rows of C: BLOCK_C is the padded row (it
    cannot change); 1–16 rows per program and 2–16 warps, keeping 4–32 fp32 values per thread and tensor."""
    from freeflow.kernels._launch import next_power_of_2
    block_c = default[1]
    out = [tuple(default)]
    for rows in (1, 2, 4, 8, 16):
        if rows > next_power_of_2(S) or rows * block_c > 16384:
            continue
        for warps in (2, 4, 8, 16):
            if 4 <= rows * block_c / (32 * warps) <= 32 and (rows, block_c, warps) not in out:
                out.append((rows, block_c, warps))
    return out


def elementwise_candidates(default, M, C, *_, **__):
    """(BLOCK_M, BLOCK_C, num_warps) for row-wise elementwise kernels over (M, C): the helper's BLOCK_C with tiles
    of 1K–8K values and 2–16 warps (4–32 values per thread), plus the default tile with BLOCK_C halved and doubled."""
    from freeflow.kernels._launch import next_power_of_2
    bm0, bc0, w0 = default
    out = [tuple(default)]

    def add(bm, bc, w):
        if 1 <= bm <= next_power_of_2(M) and 16 <= bc <= max(16, next_power_of_2(C)) and (bm, bc, w) not in out:
            out.append((bm, bc, w))

    for values in (1024, 2048, 4096, 8192):
        for warps in (2, 4, 8, 16):
            if 4 <= values / (32 * warps) <= 32 and values % bc0 == 0:
                add(values // bc0, bc0, warps)
    add(bm0 * 2, bc0 // 2, w0)
    add(max(1, bm0 // 2), bc0 * 2, w0)
    return out


# helper name → (the kernel launch arguments its tuple sets, candidate generator)
CANDIDATES = {
    "row_tiles": (("BLOCK_S", "BLOCK_C", "num_warps"), row_candidates),
    "elementwise_tiles": (("BLOCK_M", "BLOCK_C", "num_warps"), elementwise_candidates),
}


# ----------------------------------------------------------------------------------------------
# Launch plumbing: capturing a wrapper's launch, one config at a time, one helper setting at a time
# ----------------------------------------------------------------------------------------------


def _kernels() -> list:
    """Every Triton kernel of the attention, adaLN and GELU modules (as the compile report lists them)."""
    from freeflow.kernels.aot import _kernels as named_kernels
    return list(named_kernels().values())


@contextlib.contextmanager
def capturing(kernel, launch: bool):
    """Record the (args, kwargs) of every launch of ``kernel`` (an Autotuner or JITFunction) while the block runs;
    with ``launch=False`` it is not launched (nothing compiles). Other autotuned kernels the wrapper launches are
    skipped meanwhile: tuning them would compile and time all their configs."""
    launches = []
    others = [k for k in _kernels() if k is not kernel and hasattr(k, "configs")]

    def run(*args, **kwargs):
        launches.append((args, kwargs))
        if launch:
            return type(kernel).run(kernel, *args, **kwargs)

    kernel.run = run  # KernelInterface.__getitem__ calls self.run: the instance attribute wins
    for other in others:
        other.run = lambda *args, **kwargs: None
    try:
        yield launches
    finally:
        for k in (kernel, *others):
            vars(k).pop("run", None)


@contextlib.contextmanager
def patched(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield original
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def only_config(autotuner, config):
    """The Autotuner with ``config`` as its only config: its ``run`` then launches it without pruning or tuning."""
    configs = autotuner.configs
    autotuner.configs = [config]
    try:
        yield
    finally:
        autotuner.configs = configs


@contextlib.contextmanager
def cpu_benchmarker(autotuner):
    """Without a GPU (the interpreter) an Autotuner has no driver to time its configs with: give it wall-clock
    timing for the block, so that its choice can be made and read as on a GPU."""
    def bench(fn, quantiles=None, **_):
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return [ms] * len(quantiles) if quantiles else ms

    vars(autotuner)["do_bench"] = bench  # shadows the ``do_bench`` cached_property
    try:
        yield
    finally:
        vars(autotuner).pop("do_bench", None)


def helper_returning(module, helper: str, setting):
    return patched(module, helper, lambda *args, **kwargs: setting)


def config_name(config) -> str:
    """As the compile report names it (``64x16 w8s2 split qk``: BLOCK_M x BLOCK_N, warps, stages, split flags)."""
    from freeflow.kernels.aot import _config_name
    return _config_name((config.kwargs, config.num_warps, config.num_stages, True))


def setting_name(names, setting) -> str:
    return " ".join(f"{n[6:] if n.startswith('BLOCK_') else 'w'}{v}" for n, v in zip(names, setting))


def short_error(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1 and lines[-1] != text:
        text += " … " + lines[-1]
    return f"{type(e).__name__}: {text}"[:400]


@dataclasses.dataclass
class Plan:
    """The settings of one case: an Autotuner's configs, or a launch helper's candidates."""
    mode: str                          # "autotune" | "helper" | "fixed" (no helper found: the wrapper's own only)
    names: list
    settings: list
    default: int | None = None         # the helper's own choice (autotune's pick is found by tuning, when timing)
    pruned: list | None = None         # per config: dropped by the Autotuner's pruning for this launch
    launch: tuple | None = None        # the captured (args, kwargs) of an autotuned kernel
    helper: str | None = None
    note: str = ""


def plan_case(case: Case) -> Plan:
    """Read the settings from the live kernel, launching nothing of it (no compile). Kernels without autotune that
    the wrapper launches first still run (the backward's Δ preprocess), so a captured launch has real inputs."""
    kernel = getattr(case.module, case.kernel)
    if hasattr(kernel, "configs"):
        with capturing(kernel, launch=False) as launches:
            case.call()
        if not launches:
            raise RuntimeError(f"{case.kernel_name} was not launched by the wrapper")
        args, kwargs = launches[0]
        configs = list(kernel.configs)
        return Plan("autotune", [config_name(c) for c in configs], configs,
                    pruned=_pruned(kernel, configs, args, kwargs), launch=(args, kwargs))
    for helper in case.helpers:
        if helper in CANDIDATES and hasattr(case.module, helper):
            called = _helper_call(case, kernel, helper)
            if called is not None:
                default, args, kwargs = called
                names, generate = CANDIDATES[helper]
                settings = generate(default, *args, **kwargs)
                return Plan("helper", [setting_name(names, s) for s in settings], settings, default=0, helper=helper)
    return Plan("fixed", ["wrapper's own"], [None], default=0,
                note=f"no launch helper among {case.helpers} is used by the wrapper: its own setting only")


def _helper_call(case: Case, kernel, helper: str):
    """(the helper's own setting, its args, kwargs) as the wrapper calls it, or None when the wrapper does not."""
    calls = []
    original = getattr(case.module, helper)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    with patched(case.module, helper, spy), capturing(kernel, launch=False):
        case.call()
    if not calls:
        return None
    args, kwargs = calls[0]
    return tuple(original(*args, **kwargs)), args, kwargs


def _pruned(kernel, configs, args, kwargs):
    """Per config, whether the Autotuner's pruning (``early_config_prune``, a perf model's top-k) drops it for this
    launch; None when it cannot be asked."""
    try:
        kernel.nargs = dict(zip(kernel.arg_names, args))
        kept = kernel.prune_configs(kwargs)
    except Exception:
        return None
    finally:
        kernel.nargs = None
    return [not any(c is k for k in kept) for c in configs]


def setting_call(case: Case, plan: Plan, index: int):
    """(the zero-argument callable that launches setting ``index``, the context it must run in)."""
    kernel = getattr(case.module, case.kernel)
    if plan.mode == "autotune":
        args, kwargs = plan.launch
        return (lambda: type(kernel).run(kernel, *args, **kwargs)), only_config(kernel, plan.settings[index])
    if plan.mode == "helper":
        return case.call, helper_returning(case.module, plan.helper, plan.settings[index])
    return case.call, contextlib.nullcontext()


def launch_setting(case: Case, plan: Plan, index: int, capture: bool = False):
    """Launch setting ``index`` once; with ``capture``, return the launches of a kernel the wrapper launches (the
    replayed launch of an autotuned one is known already: None)."""
    fn, ctx = setting_call(case, plan, index)
    spy = capturing(getattr(case.module, case.kernel), launch=True)
    with ctx, (spy if capture and plan.mode != "autotune" else contextlib.nullcontext()) as launches:
        fn()
    return launches


def check_launched_with(plan: Plan, index: int, launches) -> str | None:
    """A helper setting the wrapper did not pass on to the kernel is an error, not a timing."""
    if plan.mode != "helper":
        return None
    if not launches:
        return "the kernel was not launched"
    names = CANDIDATES[plan.helper][0]
    got = {n: launches[0][1].get(n) for n in names}
    want = dict(zip(names, plan.settings[index]))
    return None if got == want else f"launched with {got}, not the candidate {want}: the wrapper ignores {plan.helper}"


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_timer(device: str, warmup: int, rep: int):
    """Median time in ms: ``triton.testing.do_bench`` on CUDA (events, L2 flushed between calls); on the CPU
    (the interpreter) the wall time of one call, the first having been made already — plumbing, not a figure."""
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def cpu(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return cpu


# ----------------------------------------------------------------------------------------------
# Precompiling in parallel workers
# ----------------------------------------------------------------------------------------------


def worker_main(jobs_path: str, out_path: str) -> int:
    """Launch each job's setting once (compiling it into Triton's cache); one JSON line before and after each."""
    with open(jobs_path) as f:
        spec = json.load(f)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    group, cases, plans = None, {}, {}
    with open(out_path, "a", buffering=1) as out:
        for job_id, size, dtype, case_name, index in spec["jobs"]:
            out.write(json.dumps({"id": job_id, "event": "start"}) + "\n")
            start, error = time.perf_counter(), None
            try:
                if group != (size, dtype):
                    group, cases, plans = (size, dtype), {}, {}
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    cases = {c.name: c for c in build_cases(size, dtype, device, spec["tiny"])}
                if os.environ.get("FREEFLOW_TUNE_ABORT_ON") == f"{case_name}:{index}":
                    os.abort()  # the tests' stand-in for an LLVM assertion taking the compiler's process down
                case = cases[case_name]
                if case_name not in plans:
                    plans[case_name] = plan_case(case)
                launch_setting(case, plans[case_name], index)
                synchronize()
            except Exception as e:
                error = short_error(e)
            out.write(json.dumps({"id": job_id, "event": "done", "error": error,
                                  "seconds": round(time.perf_counter() - start, 3)}) + "\n")
    return 0


def precompile(jobs: list, n_workers: int, deadline: float, tiny: bool, log=print) -> dict:
    """Run ``jobs`` ([(size, dtype, case, index)]) in ``n_workers`` processes until done or ``deadline``
    (time.monotonic). Returns {job: {"error", "seconds"} | {"crashed": text} | absent when not reached}."""
    if not jobs or n_workers <= 0:
        return {}
    tmp = tempfile.mkdtemp(prefix="freeflow-tune-")
    numbered = list(enumerate(jobs))
    shards = [numbered[w::n_workers] for w in range(n_workers)]
    results, procs, spawned = {}, [], 0

    def spawn(shard):
        nonlocal spawned
        spawned += 1
        base = os.path.join(tmp, f"w{spawned}")
        with open(base + ".jobs.json", "w") as f:
            json.dump({"tiny": tiny, "jobs": [[i, *job] for i, job in shard]}, f)
        logf = open(base + ".log", "w")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", base + ".jobs.json",
                                 "--worker-out", base + ".out"], stdout=logf, stderr=subprocess.STDOUT)
        procs.append(dict(proc=proc, shard=shard, base=base, log=logf))

    def read(p):
        started, done = [], {}
        with contextlib.suppress(FileNotFoundError), open(p["base"] + ".out") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    r = json.loads(line)
                    if r["event"] == "start":
                        started.append(r["id"])
                    else:
                        done[r["id"]] = {"error": r["error"], "seconds": r["seconds"]}
        return started, done

    for shard in shards:
        if shard:
            spawn(shard)
    while True:
        for p in procs:
            if p.get("handled") or p["proc"].poll() is None:
                continue
            p["handled"] = True
            p["log"].close()
            started, done = read(p)
            results.update({jobs[i]: r for i, r in done.items()})
            lost = [i for i in started if i not in done]
            if p["proc"].returncode != 0 and lost:  # the compiler took the process down with this job
                with open(p["base"] + ".log") as f:
                    tail = " | ".join(line.strip() for line in f.read().splitlines()[-3:] if line.strip())
                results[jobs[lost[0]]] = {"crashed": f"worker exited {p['proc'].returncode} compiling it: {tail}"[:400]}
                log(f"precompile: a worker died on {jobs[lost[0]]} (exit {p['proc'].returncode})")
                rest = [(i, job) for i, job in p["shard"] if i not in done and i != lost[0]]
                if rest and time.monotonic() < deadline and spawned < 4 * n_workers:
                    spawn(rest)
        live = [p for p in procs if not p.get("handled")]
        if not live:
            break
        if time.monotonic() > deadline:
            log(f"precompile: deadline reached, stopping {len(live)} worker(s)")
            for p in live:
                p["proc"].kill()
            for p in live:
                p["proc"].wait()
                p["log"].close()
                results.update({jobs[i]: r for i, r in read(p)[1].items()})
            break
        time.sleep(0.2)
    return results


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def tune_case(case: Case, plan: Plan, timer, deadline: float, compiled: dict, ref_cache: dict, group: tuple):
    """One case's row: the reference, autotune's pick, and every setting timed (or why not)."""
    kernel = getattr(case.module, case.kernel)
    row = dict(case=case.name, what=case.what, kernel=case.kernel_name, mode=plan.mode, helper=plan.helper,
               n_configs=len(plan.settings), note=plan.note, reference={"name": case.reference_name}, configs=[])
    if time.monotonic() > deadline:
        row["skipped"] = "time budget spent before this case"
        return row
    try:
        if case.reference_name not in ref_cache:
            reference = case.reference()
            reference()  # warm: the CPU timer does not, and a first call builds autograd's and cuBLAS's state
            synchronize()
            ref_cache[case.reference_name] = timer(reference)
        row["reference"]["ms"] = ref_cache[case.reference_name]
    except Exception as e:
        ref_cache[case.reference_name] = None
        row["reference"]["error"] = short_error(e)
    default = plan.default
    if plan.mode == "autotune":  # let autotune pick, as a run would (its compiles are cached by now)
        try:
            kernel.cache.clear()
            vars(kernel).pop("configs_timings", None)
            start = time.perf_counter()
            cpu = contextlib.nullcontext() if torch.cuda.is_available() else cpu_benchmarker(kernel)
            with cpu, capturing(kernel, launch=True):
                case.call()
            synchronize()
            row["autotune_s"] = round(time.perf_counter() - start, 3)
            best = getattr(kernel, "best_config", None)
            default = next((i for i, c in enumerate(plan.settings) if c is best or str(c) == str(best)), None)
            timings = getattr(kernel, "configs_timings", None) or {}
            row["autotune_ms"] = {config_name(c): (t[0] if isinstance(t, (list, tuple)) else t)
                                  for c, t in timings.items()}
        except Exception as e:
            row["autotune_error"] = short_error(e)
    ref_ms = row["reference"].get("ms")
    for i, name in enumerate(plan.names):
        entry = dict(index=i, name=name, default=i == default)
        setting = plan.settings[i]
        if plan.mode == "autotune":
            entry.update(kwargs=dict(setting.kwargs), num_warps=setting.num_warps, num_stages=setting.num_stages,
                         pruned=None if plan.pruned is None else plan.pruned[i])
        elif setting is not None:
            entry["setting"] = list(setting)
        pre = compiled.get((*group, case.name, i), {})
        entry["compile_s"] = pre.get("seconds")
        if "crashed" in pre:  # it would take this process down too; a worker's other errors are tried again here
            entry.update(status="error", error=pre["crashed"])
        elif time.monotonic() > deadline:
            entry["status"] = "skipped"
            entry["error"] = "time budget spent before this setting"
        else:
            try:
                start = time.perf_counter()
                launches = launch_setting(case, plan, i, capture=True)
                synchronize()
                entry["first_launch_s"] = round(time.perf_counter() - start, 3)
                wrong = check_launched_with(plan, i, launches)
                if wrong:
                    raise RuntimeError(wrong)
                fn, ctx = setting_call(case, plan, i)
                with ctx:
                    entry["ms"] = timer(fn)
                entry["status"] = "ok"
                if ref_ms:
                    entry["speedup"] = ref_ms / entry["ms"]
            except Exception as e:
                entry.update(status="error", error=short_error(e))
        row["configs"].append(entry)
    timed = [c for c in row["configs"] if c.get("ms") is not None]
    if timed:
        best = min(timed, key=lambda c: c["ms"])
        row.update(best=best["name"], best_ms=best["ms"])
    picked = next((c for c in row["configs"] if c["default"]), None)
    if picked:
        row.update(default=picked["name"], default_ms=picked.get("ms"))
    return row


def machine_info(device: str) -> dict:
    import triton
    info = dict(device=device, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
                fp32_dot=os.environ.get("FREEFLOW_FP32_DOT", "tf32x3 (default)"))
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(), sm_count=props.multi_processor_count,
                    capability=".".join(map(str, torch.cuda.get_device_capability())))
    return info


def run(sizes, dtypes, *, cases=None, tiny=False, jobs=0, time_budget=None, warmup=5, rep=25, json_path=None,
        md_path=None, log=print) -> dict:
    """Plan, precompile and time every setting of the cases (all, or those named in ``cases``) of each (size, dtype);
    returns the report (also written to ``json_path`` / ``md_path`` after every case)."""
    start = time.monotonic()
    deadline = start + time_budget if time_budget else math.inf
    device = "cuda" if torch.cuda.is_available() else "cpu"
    groups = [(size, dtype) for dtype in dtypes for size in sizes]  # bf16 first: what training runs
    report = dict(machine=machine_info(device), settings=dict(
        sizes=sizes, dtypes=dtypes, cases=cases, tiny=tiny, jobs=jobs, time_budget_s=time_budget, warmup_ms=warmup,
        rep_ms=rep, shapes={size: shapes(size, tiny) for size in sizes}), status="running", cases=[], errors=[])

    def save():
        _write(json_path, json.dumps(report, indent=1, default=str))
        _write(md_path, markdown(report))

    # 1. plan: every setting of every case, read from the live objects without compiling
    plans = {}
    for group in groups:
        try:
            built = build_cases(*group, device, tiny)
        except Exception as e:
            report["errors"].append(dict(group=list(group), error=short_error(e)))
            continue
        for case in built:
            if cases and case.name not in cases:
                continue
            try:
                plans[(*group, case.name)] = len(plan_case(case).settings)
            except Exception as e:
                report["errors"].append(dict(group=list(group), case=case.name, error=short_error(e)))
        del built
    all_jobs = [(*key, i) for key, n in plans.items() for i in range(n)]
    log(f"tune_configs: {len(plans)} cases, {len(all_jobs)} settings on {device}")
    # 2. compile them all in parallel; half the budget at most, the timing needs the rest
    t0 = time.monotonic()
    compile_deadline = start + time_budget / 2 if time_budget else math.inf
    compiled = precompile(all_jobs, jobs, compile_deadline, tiny, log)
    report["precompile"] = dict(workers=jobs, seconds=round(time.monotonic() - t0, 1), jobs=len(all_jobs),
                                done=len(compiled), errors=sum(bool(r.get("error")) for r in compiled.values()),
                                crashed=sum("crashed" in r for r in compiled.values()))
    log(f"tune_configs: precompiled {len(compiled)}/{len(all_jobs)} in {report['precompile']['seconds']} s")
    save()
    # 3. time them one after another
    timer = make_timer(device, warmup, rep)
    for group in groups:
        if not any(key[:2] == group for key in plans):
            continue
        try:
            built = build_cases(*group, device, tiny)
        except Exception as e:
            report["errors"].append(dict(group=list(group), error=short_error(e)))
            continue
        ref_cache = {}
        for case in built:
            if (*group, case.name) not in plans:
                continue
            t = time.monotonic()
            try:  # planned again on this process's inputs: the same settings in the same order
                row = tune_case(case, plan_case(case), timer, deadline - 2, compiled, ref_cache, group)
            except Exception as e:  # plumbing that broke: recorded, the next case still runs
                row = dict(case=case.name, kernel=case.kernel_name, error=short_error(e), configs=[])
            row.update(size=group[0], dtype=group[1], shape=shapes(group[0], tiny),
                       seconds=round(time.monotonic() - t, 2))
            report["cases"].append(row)
            log(f"  {group[0]} {group[1]} {case.name}: {sum(c.get('status') == 'ok' for c in row['configs'])}"
                f"/{len(row['configs'])} timed, best {row.get('best')} {row.get('best_ms')}")
            save()
        del built
        if device == "cuda":
            torch.cuda.empty_cache()
    report["status"] = "done"
    report["seconds"] = round(time.monotonic() - start, 1)
    save()
    return report


def _write(path, text):
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _ms(v):
    return "-" if v is None else f"{v:.4f}" if v < 0.1 else f"{v:.3f}"


def _x(a, b):
    return "-" if not a or not b else f"{a / b:.2f}×"


def markdown(report: dict) -> str:
    m, st = report["machine"], report["settings"]
    lines = ["## Launch settings timed one by one (`benchmarks/tune_configs.py`)", "",
             f"{m.get('gpu', m['device'])}, torch {m['torch']}, Triton {m['triton']}"
             f"{', interpreter (timings are not performance figures)' if m['interpret'] else ''}; fp32 dot "
             f"{m['fp32_dot']}; `do_bench` median, warm-up {st['warmup_ms']} ms, {st['rep_ms']} ms of repeats. "
             f"Speed-up = reference time / kernel time (> 1: the kernel is faster).", ""]
    pre = report.get("precompile")
    if pre:
        lines += [f"Precompiled {pre['done']}/{pre['jobs']} settings in {pre['seconds']} s with {pre['workers']} "
                  f"worker(s); {pre['errors']} failed to compile or launch, {pre['crashed']} crashed the compiler.", ""]
    for e in report["errors"]:
        lines.append(f"- error in {' '.join(e['group'])} {e.get('case', '')}: {e['error']}")
    head = ["size", "dtype", "case", "timed", "autotune pick / default", "ms", "best", "ms", "best gain",
            "reference", "ref ms", "speed-up (pick)", "speed-up (best)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["cases"]:
        ok = sum(c.get("status") == "ok" for c in r["configs"])
        ref = r.get("reference", {})
        lines.append("| " + " | ".join([
            r["size"], r["dtype"], r["case"], f"{ok}/{r.get('n_configs', len(r['configs']))}", r.get("default", "-"),
            _ms(r.get("default_ms")), r.get("best", "-"), _ms(r.get("best_ms")),
            _x(r.get("default_ms"), r.get("best_ms")), ref.get("name", "-"), _ms(ref.get("ms")),
            _x(ref.get("ms"), r.get("default_ms")), _x(ref.get("ms"), r.get("best_ms"))]) + " |")
    lines += ["", _attention_primal(report), "", DETAILS_MARK, ""]
    for r in report["cases"]:
        ref = r.get("reference", {})
        how = f"`{r['kernel']}`, {r.get('mode', '?')}" + (f" via `{r['helper']}`" if r.get("helper") else "")
        notes = [f"reference {ref.get('name')}: {_ms(ref.get('ms'))} ms", ref.get("error"), r.get("note"),
                 r.get("autotune_error") and f"autotune: {r['autotune_error']}", r.get("error"),
                 r.get("skipped") and f"skipped: {r['skipped']}"]
        lines += [f"### {r['size']} {r['dtype']} `{r['case']}`: {r.get('what', '')}", "",
                  "; ".join([how, *filter(None, notes)]), "",
                  "| setting | pruned | autotune pick / default | ms | speed-up | autotune's ms | note |",
                  "|---|---|---|---|---|---|---|"]
        tuned = r.get("autotune_ms", {})
        for c in r["configs"]:
            pruned = {None: "", True: "pruned", False: ""}[c.get("pruned")]
            lines.append(f"| {c['name']} | {pruned} | {'**yes**' if c['default'] else ''} | {_ms(c.get('ms'))} | "
                         f"{_x(ref.get('ms'), c.get('ms'))} | {_ms(tuned.get(c['name']))} | "
                         f"{(c.get('error') or '').replace('|', '/')[:160]} |")
        lines.append("")
    return "\n".join(lines)


def _attention_primal(report: dict) -> str:
    """Per (size, dtype): the Triton attention primal (best forward + best dK/dV + best dQ) against SDPA."""
    out = []
    rows = {(r["size"], r["dtype"], r["case"]): r for r in report["cases"]}
    for size, dtype in dict.fromkeys((r["size"], r["dtype"]) for r in report["cases"]):
        parts = [rows.get((size, dtype, c), {}) for c in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")]
        if all(p.get("best_ms") for p in parts):
            fwd, dkdv, dq = (p["best_ms"] for p in parts)
            sdpa_f, sdpa_b = parts[0]["reference"].get("ms"), parts[1]["reference"].get("ms")
            out.append(f"- {size} {dtype} attention primal, best configs: forward {_ms(fwd)} + dK/dV {_ms(dkdv)} + "
                       f"dQ {_ms(dq)} = {_ms(fwd + dkdv + dq)} ms (without the Δ preprocess) against SDPA "
                       f"{_ms(sdpa_f)} + {_ms(sdpa_b)} ms: {_x((sdpa_f or 0) + (sdpa_b or 0), fwd + dkdv + dq)}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--markdown", default=None, help="write the tables here")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                   help="only these cases (attn_fwd, attn_fwd_tangent, attn_bwd_dkdv, attn_bwd_dq, adaln_seam_jvp, "
                        "adaln_seam_bwd, gelu_jvp, gelu_bwd)")
    p.add_argument("--tiny", action="store_true", help="small shapes for the interpreter (TRITON_INTERPRET=1)")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel compile workers (default: CPU count - 1 on CUDA, 0 on the CPU)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop timing when this is spent (half of it at most goes to compiling)")
    p.add_argument("--warmup", type=int, default=5, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=25, help="do_bench repeats, ms")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.worker_out)
    jobs = args.jobs
    if jobs is None:
        jobs = max(1, min(15, (os.cpu_count() or 2) - 1)) if torch.cuda.is_available() else 0
    report = run(args.sizes, args.dtypes, cases=args.cases, tiny=args.tiny, jobs=jobs, time_budget=args.time_budget,
                 warmup=args.warmup, rep=args.rep, json_path=args.json, md_path=args.markdown)
    print(markdown(report).split(DETAILS_MARK)[0])
    bad = report["errors"] or [r for r in report["cases"] if r.get("error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
