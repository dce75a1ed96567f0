"""The whole FreeFlow training step, side by side: this toolkit against plain PyTorch.

One step is exactly what ``python -m freeflow.train`` runs (``freeflow.train.build_parts`` /
``train_step``, no copy): the prediction rows with ∂F/∂δ, the correction rows through the aux network,
one teacher forward for both, the aux flow-matching loss, both backwards, clipping, both AdamW steps and
the EMA. Variants, all from the same teacher, seed and batch, so their first-step losses agree:

    toolkit     FlowMapStudent.forward_jvp on freeflow.kernels (Triton on CUDA; on a CPU the dispatch
                picks the reference ops unless TRITON_INTERPRET=1)
    toolkit_compiled  ``toolkit`` with ``--compile`` (``freeflow.train.compile_networks``: Inductor's default mode)
    reference   the same as ``toolkit``, every op forced to the pure-PyTorch reference (--backend reference)
    plain       what a user writes without the toolkit: official-layout modules (benchmarks/plain_dit.py),
                the student's tangent by torch.func.jvp through SDPA's math backend, teacher and aux on
                SDPA's default backends, eager ops
    compiled    ``plain`` with its three networks under torch.compile (skipped with the reason if it fails)

Sizes: ``tiny`` (a small DiT on 16×16×4, the CPU default), ``B/2`` and ``XL/2`` (SiT-B/2, SiT-XL/2 at
256 px: latents 32×32×4, 1,000 classes; a CUDA machine). Reported per variant: ms per step (median),
images per second, peak memory of a step, the first step's losses and, with ``--largest-batch`` on CUDA,
the largest batch that fits (doubling until out of memory, then bisection to a multiple of 8).

    pytest benchmarks/bench_step.py --benchmark-only                      # tiny, CPU, all four variants
    python benchmarks/bench_step.py --size XL/2 --largest-batch --json step.json --markdown step.md
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import peak_bytes  # noqa: E402
from plain_dit import PlainDiT  # noqa: E402

from freeflow.config import TrainConfig  # noqa: E402
from freeflow.distill import DistillConfig  # noqa: E402
from freeflow.models import DiT, config_from_name  # noqa: E402
from freeflow.train import build_parts, compile_networks, train_step  # noqa: E402

VARIANTS = ("toolkit", "plain", "toolkit_compiled", "reference", "compiled")  # by importance: a budget cuts the last
SIZES = {  # name: (model config name, latent size, channels, classes, default batch, aux)
    "tiny": ("DiT-T/2", 16, 4, 10, 8, "full"),
    "B/2": ("SiT-B/2", 32, 4, 1000, 32, "full"),
    "XL/2": ("SiT-XL/2", 32, 4, 1000, 32, "lora"),
}
LOSS_KEYS = ("pred_loss", "corr_loss", "aux_loss")


def make_teacher(size: str, device) -> DiT:
    """A SiT-layout teacher with trained-like random weights (adaLN-Zero's zeros would skip no work, but keep
    the losses meaningful), built directly on ``device``."""
    name, latent, channels, classes, _, _ = SIZES[size]
    torch.manual_seed(0)
    with torch.device(device):
        teacher = DiT(config_from_name(name, input_size=latent, in_channels=channels, num_classes=classes,
                                       learn_sigma=True), family="sit")
        with torch.no_grad():
            for p in teacher.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
    return teacher.eval().requires_grad_(False)


def train_config(size: str, variant: str, device, batch: int, precision: str) -> tuple[TrainConfig, DistillConfig]:
    aux = SIZES[size][5]
    backend = "reference" if variant == "reference" else "auto"
    tc = TrainConfig(batch_size=batch, aux=aux, lora_rank=32, precision=precision, backend=backend,
                     threads=max(torch.get_num_threads(), 1))
    tc.validate()
    dc = DistillConfig(gw_min=1.0, gw_max=4.0, tangent="func_jvp" if variant in ("plain", "compiled") else "jvp")
    return tc, dc


COMPILED_NOTE = ("torch.compile of the three networks; the student's torch.func.jvp runs them eagerly: dynamo does not "
                 "trace torch.func.jvp of a compiled function (pytorch#128711), and compiling the whole jvp call "
                 "fails in its backward on torch 2.13 ('ZeroTensors are immutable')")


def _plain_networks(compiled: bool):
    """The ``networks`` hook of build_parts: the same weights in official-style modules (see COMPILED_NOTE)."""
    def swap(student, aux, teacher):
        student.net = PlainDiT.like(student.net, math_attention=True)
        aux.net = PlainDiT.like(aux.net)
        teacher = PlainDiT.like(teacher).eval()
        if compiled:
            student.net, aux.net, teacher = (torch.compile(m) for m in (student.net, aux.net, teacher))
        return student, aux, teacher
    return swap


def build(size: str, variant: str, device, batch: int, precision: str):
    teacher = make_teacher(size, device)
    tc, dc = train_config(size, variant, device, batch, precision)
    if variant == "reference":
        teacher.backend = "reference"  # the student and aux are cloned from the teacher with its backend
    networks = _plain_networks(variant == "compiled") if variant in ("plain", "compiled") else None
    with torch.device(device):  # networks are made where they run (an XL/2 built on the CPU takes minutes)
        parts = build_parts(tc, dc, teacher, device, networks=networks)
    if variant == "toolkit_compiled":
        compile_networks(parts, "default")
    return parts, tc


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(parts, tc, device, steps: int, first: int = 1) -> list[float]:
    times = []
    for i in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        train_step(parts, tc, first + i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def fits(parts, tc, device, batch: int) -> bool:
    """One step at ``batch`` runs without running out of memory (CUDA)."""
    trial = dataclasses.replace(tc, batch_size=batch)
    try:
        train_step(parts, trial, 1)
        _sync(device)
        return True
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        return False
    finally:
        parts.opt.zero_grad(set_to_none=True)
        parts.aux_opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(parts, tc, device, start: int, deadline: float) -> dict:
    """Doubling from ``start`` until a step runs out of memory, then bisection (multiples of 8) until the
    deadline; ``exact`` says whether the search finished."""
    ok, bad = 0, None
    batch = start
    while time.time() < deadline and bad is None:
        if fits(parts, tc, device, batch):
            ok, batch = batch, batch * 2
        else:
            bad = batch
    while bad is not None and bad - ok > 8 and time.time() < deadline:
        mid = (ok + bad) // 16 * 8
        if fits(parts, tc, device, mid):
            ok = mid
        else:
            bad = mid
    return {"largest_batch": ok, "first_oom": bad, "exact": bad is not None and bad - ok <= 8}


def run_variant(size, variant, device, batch, precision, steps, warmup, search=False, deadline=math.inf,
                end=math.inf) -> dict:
    """One variant's row; the timed steps shrink (to 1) when ``end`` comes near."""
    row = {"variant": variant, "size": size, "batch": batch, "precision": precision, "device": str(device)}
    if variant == "compiled":
        row["note"] = COMPILED_NOTE
    t0 = time.time()
    try:
        parts, tc = build(size, variant, device, batch, precision)
        row["build_s"] = round(time.time() - t0, 2)
        first = train_step(parts, tc, 1)[0]
        row["first_step_losses"] = {k: first[k] for k in LOSS_KEYS}
        row["warmup_s"] = round(time.time() - t0 - row["build_s"], 2)  # compile / autotune happen here
        time_steps(parts, tc, device, max(warmup - 1, 0), first=2)
        one = time_steps(parts, tc, device, 1, first=1 + warmup)[0]
        if end - time.time() < 3 * steps * one:
            steps = max(1, int((end - time.time()) / (3 * one)))
        times = [one] + time_steps(parts, tc, device, steps - 1, first=2 + warmup)
        ms = sorted(t * 1e3 for t in times)
        row["ms_per_step"] = ms[len(ms) // 2]
        row["ms_min"] = ms[0]
        row["images_per_s"] = batch / (row["ms_per_step"] / 1e3)
        row["peak_bytes"] = peak_bytes(lambda: train_step(parts, tc, 1 + warmup + steps), device.type)
        if search and device.type == "cuda":
            row.update(largest_batch(parts, tc, device, batch, deadline))
    except Exception as e:  # one variant failing (torch.compile, out of memory) must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        parts = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict]) -> str:
    base = {r["variant"]: r for r in rows if "ms_per_step" in r}.get("plain")
    lines = ["| variant | batch | ms / step | images / s | peak memory | largest batch | vs plain (time, memory) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | failed: {r['error']} | | | | |")
            continue
        ratio = ""
        if base is not None:
            ratio = f"{base['ms_per_step'] / r['ms_per_step']:.2f}× faster, {r['peak_bytes'] / base['peak_bytes']:.2f}×"
        lb = r.get("largest_batch", "")
        if lb != "" and not r.get("exact", True):
            lb = f"≥ {lb}"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['peak_bytes'] / 2**20:.1f} MiB | {lb} | {ratio} |")
    return "\n".join(lines)


def write(args, title, rows):
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"### {title}\n\n{markdown(rows)}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="default: XL/2 on CUDA, tiny on CPU")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=None, help="global batch (default per size)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--largest-batch", action="store_true", help="CUDA: search the largest batch that fits")
    p.add_argument("--time-budget", type=float, default=math.inf,
                   help="seconds for the whole run; the largest-batch searches share what is left")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--markdown", default=None, help="write the table here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or ("XL/2" if device.type == "cuda" else "tiny")
    batch = args.batch or SIZES[size][4]
    end = time.time() + args.time_budget
    title = (f"Whole FreeFlow step, {size}, batch {batch}, precision {args.precision}, {device.type}"
             f" ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'})")
    rows = []
    for i, variant in enumerate(args.variants):
        left = end - time.time()
        # torch.compile of an XL/2 network alone takes about a minute: not started without one to spare
        need = max(0.25 * args.time_budget / len(args.variants), 60.0 if "compiled" in variant else 0.0)
        if rows and left < need:
            rows.append({"variant": variant, "size": size, "batch": batch, "precision": args.precision,
                         "device": str(device), "error": f"skipped: {left:.0f} s of the time budget left"})
        else:
            deadline = time.time() + left / (len(args.variants) - i) * 0.5  # half of a fair share for the search
            rows.append(run_variant(size, variant, device, batch, args.precision, args.steps, args.warmup,
                                    search=args.largest_batch, deadline=deadline, end=end))
        print(json.dumps(rows[-1]), flush=True)
        write(args, title, rows)  # after every variant: a run stopped from outside keeps what it measured
    print(f"\n{title}\n\n{markdown(rows)}")
    return 0 if all("error" not in r for r in rows if r["variant"] != "compiled") else 1


# ------------------------------------------------------------------------------------- pytest-benchmark

def _pytest_variants():
    import pytest
    return pytest.mark.parametrize("variant", VARIANTS)


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@_pytest_variants()
def test_training_step(benchmark, variant):
    """The tiny size on this machine (CUDA when there is one): one row per variant in the benchmark table."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = "tiny" if device.type == "cpu" else "B/2"
    with _threads(1) if device.type == "cpu" else contextlib.nullcontext():
        parts, tc = build(size, variant, device, SIZES[size][4], "auto")
        try:
            first = train_step(parts, tc, 1)[0]  # compiles / autotunes outside the timing
        except Exception as e:
            if variant == "compiled":
                import pytest
                pytest.skip(f"torch.compile of the plain step failed here: {type(e).__name__}: {e}")
            raise
        step = iter(range(2, 10**6))
        benchmark.group = f"whole FreeFlow step, {size}, batch {tc.batch_size}, {device.type}"
        benchmark.extra_info.update({k: first[k] for k in LOSS_KEYS})
        benchmark.extra_info["peak_bytes"] = peak_bytes(lambda: train_step(parts, tc, next(step)), device.type)
        benchmark.pedantic(lambda: train_step(parts, tc, next(step)), rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
