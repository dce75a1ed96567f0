"""Compile report and gate: every launch a FreeFlow step can make, compiled for sm_80 and sm_90 on any machine.

    python -m freeflow.kernels.aot                 # CI sweep: every kernel × flag combination once per arch
    python -m freeflow.kernels.aot --full          # + fp16/fp32, head dims 64/72/128, hidden 384–1152
    python -m freeflow.kernels.aot --all-configs   # every config (resource table), not only up to the first clean
    python -m freeflow.kernels.aot --json out.json --markdown

How. The launch wrappers of the ops (``attention_forward``, ``adaln_backward``, ...) are called on ``meta``
tensors with each kernel's ``run`` replaced by a recorder, so a *launch case* is exactly what dispatch
launches: the kernel, its constexpr flags, the dtype and the tile sizes the wrapper picks with the GPU
launch settings (the interpreter's are never used: ``TRITON_INTERPRET`` must be unset). Each case is
compiled with ``triton.compile`` for ``GPUTarget("cuda", cc, 32)`` with every autotune config that survives
the kernel's ``prune_configs_by`` (or the wrapper's ``num_warps`` for kernels without autotune), argument
specialisation as at launch (pointers 16-byte aligned, ints equal to 1 folded, multiples of 16 marked),
and the cubin's registers, spill bytes (``STACK`` + ``LOCAL`` from ``cuobjdump -res-usage``) and Triton's
shared memory are read back. A config is *clean* when it spills nothing and its shared memory fits the
chip (A100 163 KB, H100 227 KB per block).

Exit status: 0 when every launch case has a clean config on every arch (and, with ``--all-configs``, no
config that survives pruning overflows shared memory), 1 otherwise, 2 on a usage error. Nothing is cached:
each run compiles into a fresh Triton cache directory.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from ._dispatch import gpu_launch_settings

# Shared memory per block (opt-in maximum) in bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCH_NAME = {80: "sm_80 (A100)", 90: "sm_90 (H100)"}
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# DiT widths: (hidden, heads); head dim 128 for wide-head models.
HIDDEN = {"S": (384, 6), "B": (768, 12), "L": (1024, 16), "XL": (1152, 16)}
TOKENS = 256  # 256×256 images, latent 32×32, patch 2


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel object, its bound arguments and launch options."""
    kernel: object
    args: dict
    options: dict
    what: str = ""


# ----------------------------------------------------------------------------------------------
# Recording the launches of the op wrappers
# ----------------------------------------------------------------------------------------------


def _kernels():
    from . import adaln, flash_attention, gelu
    mods = (flash_attention, adaln, gelu)
    return {f"{m.__name__.rsplit('.', 1)[-1]}.{name}": getattr(m, name)
            for m in mods for name in dir(m) if name.endswith("_kernel") and hasattr(getattr(m, name), "run")}


_JIT: dict = {}


def jit_function(kernel):
    """The JITFunction under an Autotuner (or the kernel itself). Under ``TRITON_INTERPRET=1`` kernels are
    InterpretedFunctions: a JITFunction of the same Python function is built so that launches can still be
    recorded and typed (compiling needs the interpreter off: it patches ``triton.language``)."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        if type(kernel).__name__ == "InterpretedFunction":
            if id(kernel) not in _JIT:
                _JIT[id(kernel)] = JITFunction(kernel.fn)
            return _JIT[id(kernel)]
        kernel = kernel.fn
    return kernel


def with_heuristics(kernel, args: dict) -> dict:
    """``args`` (a launch's arguments and its config) plus the constexprs the kernel's ``@triton.heuristics``
    derive from them, as a launch computes them: compiling the JITFunction alone does not."""
    from triton.runtime.autotuner import Heuristics
    while hasattr(kernel, "fn"):
        if isinstance(kernel, Heuristics):
            for name, rule in kernel.values.items():  # in order: a rule sees the ones before it
                args = {**args, name: rule(args)}
        kernel = kernel.fn
    return args


@contextlib.contextmanager
def recording():
    """Replace every kernel's ``run`` by a recorder; yields the list the launches are appended to."""
    launches: list[Launch] = []
    kernels = _kernels()
    launch_options = ("num_warps", "num_stages", "num_ctas", "maxnreg")

    def recorder(kernel):
        names = jit_function(kernel).arg_names

        def run(*args, grid=None, warmup=False, **kwargs):
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k not in launch_options})
            launches.append(Launch(kernel, bound, {k: v for k, v in kwargs.items() if k in launch_options}))
        return run

    for k in kernels.values():
        k.run = recorder(k)
    try:
        with gpu_launch_settings():
            yield launches
    finally:
        for k in kernels.values():
            del k.run  # back to the class's run


def meta(*shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


def attention_launches(dtype, D, S=TOKENS, B=2, H=4, flag_sets="all"):
    """Launches of the attention ops: primal forward, each tangent subset (fused and ``jvp`` rule), backward."""
    from .flash_attention import attention_backward, attention_forward
    q, k, v = (meta(B, H, S, D, dtype=dtype) for _ in range(3))
    subsets = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1) if a or b or c]
    if flag_sets == "step":  # what a FreeFlow step launches: tangents on q, k and v together
        subsets = [(1, 1, 1)]
    with recording() as out:
        attention_forward(q, k, v)
        for sub in subsets:
            tq, tk, tv = (t if on else None for t, on in zip((q, k, v), sub))
            for store_o in (True, False):  # attention_jvp (O and Ȯ) / AttentionFunction.jvp (Ȯ only)
                attention_forward(q, k, v, tq, tk, tv, store_o=store_o)
        o, lse = meta(B, H, S, D, dtype=dtype), meta(B, H, S, dtype=torch.float32)
        attention_backward(o, q, k, v, o, lse, D ** -0.5)
    return out


def adaln_launches(dtype, C, S=TOKENS, N=2):
    """Launches of the adaLN family: modulate, gated residual and the seam, each with every tangent subset."""
    from .adaln import adaln_backward, adaln_forward
    x, h = meta(N, S, C, dtype=dtype), meta(N, S, C, dtype=dtype)
    c = meta(N, C, dtype=dtype)
    stats = meta(N, S, dtype=torch.float32)

    def subsets(n):
        return [tuple((i >> j) & 1 for j in range(n)) for i in range(2 ** n)]

    pick = lambda on, t: t if on else None  # noqa: E731
    with recording() as out:
        for tx, ts, tc in subsets(3):  # modulate
            adaln_forward(x, c, c, 1e-6, tx=pick(tx, x), tshift=pick(ts, c), tscale=pick(tc, c))
        for tx, tg, th in subsets(3):  # gated residual
            adaln_forward(x, None, None, 1e-6, c, h, pick(tx, x), pick(tg, c), pick(th, h), norm=False)
        for tx, tg, th, ts, tc in subsets(5):  # gated residual + LayerNorm + modulate
            adaln_forward(x, c, c, 1e-6, c, h, pick(tx, x), pick(tg, c), pick(th, h), pick(ts, c), pick(tc, c))
        adaln_backward(x, None, x, stats, stats, c)                          # modulate
        adaln_backward(None, x, None, stats, stats, c, c, h, norm=False)     # gated residual
        adaln_backward(x, x, x, stats, stats, c, c, h)                       # seam, both outputs used
        adaln_backward(x, None, x, stats, stats, c, c, h)                    # seam, only y used
    return out


def gelu_launches(dtype, C, M=2 * TOKENS):
    """Launches of bias-GELU: primal, fused JVP, ``jvp`` rule (tangent only), backward; with and without bias."""
    from .gelu import bias_gelu_backward, bias_gelu_forward
    h, b = meta(M, C, dtype=dtype), meta(C, dtype=dtype)
    with recording() as out:
        for bias in (b, None):
            bias_gelu_forward(h, bias)
            bias_gelu_forward(h, bias, h)
            bias_gelu_forward(h, bias, h, store_y=False)
            if bias is not None:
                bias_gelu_forward(h, bias, None, bias, store_y=False)
                bias_gelu_forward(h, bias, h, bias, store_y=False)
            bias_gelu_backward(h, h, bias)
    return out


def sweep(full: bool):
    """(label, launch) pairs. CI: every kernel × flag combination once (bf16, DiT-XL/2 widths) plus the
    launches of a DiT-B/2 step; full: fp16/bf16/fp32 × head dims 64/72/128 × hidden 384–1152."""
    cases = []
    dtypes = list(DTYPES) if full else [torch.bfloat16]
    for dtype in dtypes:
        for D in ((64, 72, 128) if full else (72,)):
            cases += [(f"Dh={D}", la) for la in attention_launches(dtype, D)]
        if not full:
            cases += [("Dh=64", la) for la in attention_launches(dtype, 64, flag_sets="step")]
        for name, (C, _) in HIDDEN.items():
            if not full and name != "XL":
                continue
            cases += [(f"C={C}", la) for la in adaln_launches(dtype, C)]
            cases += [(f"C={4 * C}", la) for la in gelu_launches(dtype, 4 * C)]
    return cases


# ----------------------------------------------------------------------------------------------
# Compiling one launch with one config
# ----------------------------------------------------------------------------------------------


def _type_of(v):
    """(signature type, constexpr value or None, divisible by 16) as Triton specialises the argument at launch."""
    if isinstance(v, torch.Tensor):
        return "*" + DTYPES.get(v.dtype, "fp32"), None, True
    if isinstance(v, bool):
        return "i1", None, False
    if isinstance(v, int):
        if v == 1:
            return "constexpr", 1, False
        return ("i32" if -2 ** 31 <= v < 2 ** 31 else "i64"), None, v % 16 == 0
    if isinstance(v, float):
        return "fp32", None, False
    raise TypeError(f"cannot type argument {v!r}")


def configs_of(launch: Launch, smem_limit: int):
    """[(config kwargs, num_warps, num_stages, kept)] for a launch: the autotune configs with the kernel's
    pruning applied for a chip with ``smem_limit`` bytes, or the wrapper's launch options."""
    from . import _launch
    kernel = launch.kernel
    if not hasattr(kernel, "configs"):
        return [({}, launch.options.get("num_warps", 4), launch.options.get("num_stages", 3), True)]
    prune = getattr(kernel, "early_config_prune", None)
    kept = kernel.configs
    if prune is not None:
        with _launch.smem_budget_override(smem_limit):
            kept = prune(kernel.configs, launch.args)
    return [(dict(c.kwargs), c.num_warps, c.num_stages, c in kept) for c in kernel.configs]


def flags_of(launch: Launch) -> dict:
    fn = jit_function(launch.kernel)
    return {n: launch.args[n] for p, n in zip(fn.params, fn.arg_names) if p.is_constexpr and n in launch.args}


def compile_job(job):
    """Worker: compile one (kernel, args, config, arch); returns resources and compile seconds."""
    kernel_name, args, config, num_warps, num_stages, cc = job
    import triton
    from triton.backends.compiler import GPUTarget
    kernel = _kernels()[kernel_name]
    fn = jit_function(kernel)
    args = with_heuristics(kernel, {**args, **config})
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, name) in enumerate(zip(fn.params, fn.arg_names)):
        v = args.get(name)
        if p.is_constexpr:
            signature[name], constexprs[name] = "constexpr", v
            continue
        if v is None:
            signature[name], constexprs[name] = "constexpr", None
            continue
        ty, const, div16 = _type_of(v)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = const
        elif div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    start = time.perf_counter()
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # an out-of-resources compile error counts as "does not fit"
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                    seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    usage = res_usage(compiled.asm["cubin"])
    return dict(usage, smem=int(compiled.metadata.shared), seconds=seconds)


def cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_res_usage(text: str) -> dict:
    """Registers, spill bytes (stack frame + local memory) and static shared memory of the first function
    in ``cuobjdump -res-usage`` output."""
    m = _RES.search(text)
    if m is None:
        raise ValueError(f"no resource line in cuobjdump output: {text[:300]!r}")
    reg, stack, shared, local = map(int, m.groups())
    return dict(regs=reg, spill=stack + local, static_smem=shared)


def res_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True)
    return parse_res_usage(out.stdout)


def compile_isolated(job, ctx, fn=None) -> dict:
    """``compile_job`` (or ``fn``) in a worker of its own: when the compiler aborts the process, the config is
    reported as an error (it would abort a training process at autotune time just the same) instead of ending
    the run."""
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as solo:
        try:
            return solo.submit(fn or compile_job, job).result()
        except cf.process.BrokenProcessPool:
            return dict(error="the compiler crashed (its process aborted)", seconds=0.0)


def is_clean(result: dict, smem_limit: int) -> bool:
    """A config is clean when it compiled, spills nothing and its shared memory fits the chip."""
    return "error" not in result and result["spill"] == 0 and result["smem"] <= smem_limit


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def case_label(kernel_name: str, label: str, launch: Launch) -> str:
    flags = flags_of(launch)
    on = [k for k, v in flags.items() if v is True and k not in ("UPCAST",)]
    off_tiles = {k.split("_", 1)[1]: v for k, v in flags.items() if k.startswith(("BLOCK_", "HEAD_"))}
    dtype = next((DTYPES[v.dtype] for v in launch.args.values() if isinstance(v, torch.Tensor)
                  and v.dtype != torch.float32), "fp32")
    # a head dim that may split reads D=128/64+16 (HEAD_D, HEAD_D2: one padded chunk, or two); else D=64
    tiles = ",".join(f"{k}={v}" + (f"/{v // 2}+{off_tiles[k + '2']}" if off_tiles.get(k + "2") else "")
                     for k, v in off_tiles.items() if not (k.endswith("2") and k[:-1] in off_tiles))
    return f"{kernel_name} {dtype} {label} [{'+'.join(on) or '-'}] {tiles}".rstrip()


def run(archs, full=False, all_configs=False, jobs=None, match=None):
    """Compile the sweep; returns the report rows (one per launch case and arch)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the report must see the GPU launch settings")
    names = {id(k): n for n, k in _kernels().items()}
    cases, seen = [], set()
    for label, launch in sweep(full):
        key = case_label(names[id(launch.kernel)], label, launch)
        if match and not re.search(match, key):
            continue
        if key not in seen:  # the same kernel with the same flags and tiles compiles to the same binary
            seen.add(key)
            cases.append((key, names[id(launch.kernel)], launch))
    jobs = jobs or os.cpu_count() or 1
    rows = []
    ctx = __import__("multiprocessing").get_context("spawn")
    pools = [cf.ProcessPoolExecutor(jobs, mp_context=ctx)]  # the last one is live; a crash replaces it
    try:
        pending = []
        for cc in archs:
            for key, kname, launch in cases:
                cfgs = configs_of(launch, SMEM_LIMIT[cc])
                kept = [c for c in cfgs if c[3]]
                to_compile = cfgs if all_configs else kept
                row = dict(case=key, kernel=kname, arch=cc, configs=len(cfgs), kept=len(kept), results=[])
                rows.append(row)
                pending.append((row, launch, to_compile, cc))
        # CI mode: compile the kept configs one after another until one is clean (at most jobs cases in flight).
        futures = {}

        def submit(row, launch, cfg, cc):
            job = (row["kernel"], launch.args, cfg[0], cfg[1], cfg[2], cc)
            futures[pools[-1].submit(compile_job, job)] = (row, launch, cfg, cc, job, len(pools))

        queues = {id(r): list(c) for r, _, c, _ in pending}
        for row, launch, _, cc in pending:
            batch = list(queues[id(row)]) if all_configs else queues[id(row)][:1]
            for cfg in batch:
                queues[id(row)].remove(cfg)
                submit(row, launch, cfg, cc)
        while futures:
            done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for f in done:
                row, launch, cfg, cc, job, generation = futures.pop(f)
                try:
                    result = f.result()
                except cf.process.BrokenProcessPool:
                    # A compile aborted its worker (an LLVM assertion does): every job the pool held fails with it,
                    # so each is redone alone to pin the crash on its config, and later jobs get a new pool.
                    if generation == len(pools):
                        pools.append(cf.ProcessPoolExecutor(jobs, mp_context=ctx))
                    result = compile_isolated(job, ctx)
                result = dict(result, config=_config_name(cfg), kept=cfg[3])
                row["results"].append(result)
                if not all_configs and not is_clean(result, SMEM_LIMIT[cc]) and queues[id(row)]:
                    submit(row, launch, queues[id(row)].pop(0), cc)
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)
    for row in rows:
        limit = SMEM_LIMIT[row["arch"]]
        kept = [r for r in row["results"] if r["kept"]]
        row["clean"] = sum(is_clean(r, limit) for r in kept)
        row["overflow_kept"] = sum("error" not in r and r["smem"] > limit for r in kept)
        row["compiled"] = len(row["results"])
        row["seconds"] = sum(r["seconds"] for r in row["results"])
        best = min(row["results"], key=lambda r: (not is_clean(r, limit), r.get("spill", 1 << 30),
                                                  r.get("regs", 999)), default=None)
        row["best"] = best
    return rows


def _config_name(cfg):
    kw, w, s, _ = cfg
    tiles = "x".join(str(v) for k, v in sorted(kw.items()) if k.startswith("BLOCK_"))
    split = "".join(f" split {k[6:].lower()}" for k in ("SPLIT_QK", "SPLIT_V") if kw.get(k))
    return f"{tiles + ' ' if tiles else ''}w{w}s{s}{split}"


def failures(rows, all_configs=False):
    bad = [r for r in rows if r["clean"] == 0]
    if all_configs:
        bad += [r for r in rows if r["overflow_kept"] and r not in bad]
    return bad


def format_table(rows, markdown=False):
    """One line per launch case and arch: clean/kept/all configs, best config's registers, spill, smem."""
    head = ["launch case", "arch", "clean/kept/all", "best config", "regs", "spill B", "smem KB", "compile s"]
    lines = []
    for r in rows:
        b = r["best"] or {}
        lines.append([r["case"], f"sm_{r['arch']}", f"{r['clean']}/{r['kept']}/{r['configs']}",
                      b.get("config", "-"), str(b.get("regs", "-")), str(b.get("spill", b.get("error", "-"))),
                      f"{b['smem'] / 1024:.1f}" if "smem" in b else "-", f"{r['seconds']:.1f}"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m freeflow.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    p.add_argument("--full", action="store_true", help="all dtypes, head dims 64/72/128, hidden 384-1152")
    p.add_argument("--all-configs", action="store_true", help="compile every config (resource table)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    p.add_argument("--json", default=None, help="write the rows (every compiled config) to this file ('-': none)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--match", default=None, help="only launch cases whose label matches this regular expression")
    args = p.parse_args(argv)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="freeflow-aot-")  # nothing cached between runs
    start = time.perf_counter()
    rows = run(args.arch, full=args.full, all_configs=args.all_configs, jobs=args.jobs, match=args.match)
    print(format_table(rows, markdown=args.markdown))
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items()} for r in rows], f, indent=1, default=str)
    bad = failures(rows, args.all_configs)
    compiles = sum(r["compiled"] for r in rows)
    print(f"\n{len(rows)} launch cases ({len({r['case'] for r in rows})} per arch × {len(args.arch)} archs), "
          f"{compiles} compiles in {time.perf_counter() - start:.0f} s wall; "
          f"{len(rows) - len(bad)} with a config that fits and spills nothing, {len(bad)} without.")
    for r in bad:
        why = "a kept config overflows shared memory" if r["clean"] else "no clean config"
        print(f"FAIL {r['case']} sm_{r['arch']}: {why}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
