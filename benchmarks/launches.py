"""Device-independent launch counting for the benchmarks.

``count_launches(fn)`` runs ``fn`` once and counts
- Triton kernel launches, by wrapping ``JITFunction.run`` (GPU) and ``InterpretedFunction.run``
  (``TRITON_INTERPRET=1``) — one call is one grid launch whatever the device;
- ATen ops that launch a kernel, by a ``TorchDispatchMode``: every op except views/aliases and bare
  allocations (``empty*``), which run no kernel. Ops issued by the Triton interpreter itself (its
  host↔"device" copies) are not counted.

``stubbed_launches()`` replaces every Triton launch by a counter, so what an op call still costs is its host
(Python) time: dispatch, checks, autograd plumbing, launch wrappers and the ATen ops around the kernels.
"""
from __future__ import annotations

import collections
import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def _launches_kernel(func) -> bool:
    if func.__name__.split(".")[0] in _ALLOCATIONS:
        return False
    returns = func._schema.returns
    # A view/alias returns an alias that is not written; in-place ops alias *and* write (they launch).
    return not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and _launches_kernel(func):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _triton_counter(aten: _AtenCounter):
    import triton.runtime.jit as jit

    classes = [jit.JITFunction]
    try:
        import triton.runtime.interpreter as interp

        classes.append(interp.InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    kernels = collections.Counter()
    originals = {cls: cls.run for cls in classes}

    def wrap(orig):
        def run(self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                kernels[getattr(self, "__name__", None) or self.fn.__name__] += 1
            aten.paused += 1
            try:
                return orig(self, *args, **kwargs)
            finally:
                aten.paused -= 1

        return run

    for cls, orig in originals.items():
        cls.run = wrap(orig)
    try:
        yield kernels
    finally:
        for cls, orig in originals.items():
            cls.run = orig


def saved_activation_bytes(fn, exclude=()) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn`` builds its graph, not
    counting the storages of ``exclude`` (the weights, which are resident anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def count_launches(fn) -> dict:
    """{'triton': Counter(kernel → launches), 'aten': Counter(op → calls)} for one call of ``fn``."""
    aten = _AtenCounter()
    with _triton_counter(aten) as kernels, aten:
        fn()
    return {"triton": kernels, "aten": aten.ops}


@contextlib.contextmanager
def stubbed_launches():
    """Within the block no Triton kernel of ``freeflow.kernels`` runs: each kernel's ``run`` (what
    ``kernel[grid](...)`` and an autotuner call) is replaced by a counter, as ``freeflow.kernels.aot`` records
    launches, and the wrappers pick the GPU launch settings. Yields a Counter (kernel → launches).

    On a machine without CUDA, dispatch is told the interpreter is on (``TRITON_INTERPRET=1`` for the block),
    so CPU tensors take the Triton path as CUDA tensors would; nothing is interpreted, nothing launches."""
    from freeflow.kernels import _dispatch, aot

    kernels = aot._kernels()
    counts = collections.Counter()

    def counter(name):
        def run(*args, warmup=False, **kwargs):
            counts[name] += 1
        return run

    fake_interpreter = not torch.cuda.is_available()
    saved_env = os.environ.get("TRITON_INTERPRET")
    if fake_interpreter:
        os.environ["TRITON_INTERPRET"] = "1"
        _dispatch.refresh_settings()
    for name, kernel in kernels.items():
        kernel.run = counter(name)
    try:
        with _dispatch.gpu_launch_settings():
            yield counts
    finally:
        for kernel in kernels.values():
            del kernel.run  # back to the class's run
        if fake_interpreter:
            if saved_env is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved_env
            _dispatch.refresh_settings()


def device_and_backends():
    """(device, runnable backends): Triton runs on CUDA, or on CPU under TRITON_INTERPRET=1."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_ok = device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return device, ["reference"] + (["triton"] if triton_ok else [])


def gpu_ms(fn, warmup=25, rep=100) -> float:
    """Median GPU execution time of ``fn`` in ms: ``triton.testing.do_bench`` (CUDA events around many
    calls after a synchronize, L2 flushed between them), not the time to enqueue the launches."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def time_run(benchmark, run, label, rounds=5):
    """Time ``run``: on CUDA the GPU execution time by ``gpu_ms`` (recorded in ``extra_info['gpu_ms']``)
    and pytest-benchmark rounds that each end in a synchronize; on CPU plain wall time."""
    if torch.cuda.is_available():
        ms = gpu_ms(run)
        benchmark.extra_info["gpu_ms"] = ms
        print(f"[{label}] GPU time {ms:.3f} ms (do_bench median)")

        def synced():
            run()
            torch.cuda.synchronize()
        torch.cuda.synchronize()
        return benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=1)
    return benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)


def measure(benchmark, label, forward, run, exclude=()):
    """Warm up, record launches and saved activation bytes in ``extra_info``, print them, time ``run``.

    ``forward`` builds the graph (returns outputs), ``run`` is forward + backward.
    """
    run()  # compile / autotune first: the counts are for one steady-state call
    counts = count_launches(run)
    saved = saved_activation_bytes(forward, exclude)
    info = {"triton_launches": sum(counts["triton"].values()), "aten_launches": sum(counts["aten"].values()),
            "saved_activation_bytes": saved, "triton_kernels": dict(counts["triton"]),
            "aten_ops": dict(counts["aten"])}
    benchmark.extra_info.update(info)
    print(f"\n[{label}] launches {info['triton_launches']} Triton + {info['aten_launches']} ATen; "
          f"activations saved for backward {saved / 2**20:.2f} MiB")
    slow = not torch.cuda.is_available() and "triton" in label  # the interpreter: one round is plenty
    time_run(benchmark, run, label, rounds=1 if slow else 5)
    return info
