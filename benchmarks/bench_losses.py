"""velocity_alignment_loss, forward + backward: the fused C++ op vs eager PyTorch, time and peak memory.

Three implementations of the same loss and gradient (docs/design.md §5), each run as ``loss.backward()``
from fresh leaves:

- ``extension``: ``freeflow.losses.velocity_alignment_loss`` on ``freeflow._C`` (one pass over
  A and B per sample that also writes the gradient; backward rescales it);
- ``eager``: the surrogate as one would write it in eager PyTorch,
  ``λ·mean_i sg(w_i)·‖F_i - sg(F_i - Δ_i)‖²/d`` (difference, square, means, weight, backward);
- ``fallback``: ``velocity_alignment_loss_reference``, the pure-PyTorch fallback of the extension.

Peak memory is what the step allocates on top of its inputs (the CPU profiler's allocation events,
summed in time order; the CUDA allocator's peak on GPU), the gradient of F included. Shapes are the
latents of ImageNet 256 and 512 (4×32×32 and 4×64×64); CUDA cases are added when a GPU is present::

    pytest benchmarks/bench_losses.py --benchmark-only -s
"""
import pytest
import torch
from memory import peak_bytes

from freeflow import _ext
from freeflow.losses import DEFAULT_EPS, velocity_alignment_loss, velocity_alignment_loss_reference

CASES = [(64, (4, 32, 32)), (256, (4, 64, 64))]
POWER, SCALE = 1.0, 1.0
RESULTS = {}


def eager(F, A, B, *, power=POWER, eps=DEFAULT_EPS, scale=SCALE):
    delta = (A - B).detach()
    w = (delta.pow(2).flatten(1).mean(1) + eps).pow(-power)
    per_sample = (F - (F - delta).detach()).pow(2).flatten(1).mean(1)
    return scale * (w * per_sample).mean()


IMPLS = {
    "extension": lambda F, A, B: velocity_alignment_loss(F, A, B, power=POWER, scale=SCALE),
    "eager": eager,
    "fallback": lambda F, A, B: velocity_alignment_loss_reference(F, A, B, power=POWER, scale=SCALE),
}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    if not RESULTS:
        return
    # Ratios use the minimum: on a shared 2-core machine the median mostly measures the neighbours.
    print(f"\nvelocity_alignment_loss fwd+bwd ({torch.get_num_threads()} CPU thread(s)): "
          "min / median time, peak memory; ratios = eager or fallback over extension (min time)")
    for (device, dtype, n, shape), by_impl in sorted(RESULTS.items(), key=str):
        if "extension" not in by_impl:
            continue
        ext_min, _, ext_mem = by_impl["extension"]
        row = [f"{device:>4} {dtype:>8} N={n:<3} d={'x'.join(map(str, shape)):<7}"]
        for name in IMPLS:
            if name in by_impl:
                t_min, t_med, mem = by_impl[name]
                cell = f"{name} {t_min * 1e3:.3f} / {t_med * 1e3:.3f} ms {mem / 2**20:.0f} MiB"
                if name != "extension":
                    cell += f" (x{t_min / ext_min:.1f} time, x{mem / max(ext_mem, 1):.2f} mem)"
                row.append(cell)
        print(" | ".join(row))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n,shape", CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_velocity_alignment_fwd_bwd(benchmark, impl, n, shape, dtype, device):
    if impl == "extension":
        assert _ext.load(), f"freeflow._C unavailable: {_ext.STATE.reason}"
        assert _ext.supports(torch.device(device)), f"freeflow._C has no {device} kernel"
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    F = torch.randn(n, *shape, generator=g).to(device, dt).requires_grad_()
    A = torch.randn(n, *shape, generator=g).to(device, dt)
    B = torch.randn(n, *shape, generator=g).to(device, dt)
    fn = IMPLS[impl]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        F.grad = None
        fn(F, A, B).backward()
        sync()

    step()
    expected = F.grad.double().clone()
    F.grad = None  # so that freeing the previous gradient does not offset the measured peak
    mem = peak_bytes(lambda: fn(F, A, B).backward(), device)
    benchmark.group = f"velocity_alignment {device} {dtype} N={n} d={'x'.join(map(str, shape))}"
    benchmark.extra_info.update(peak_mem_MiB=mem / 2**20, threads=torch.get_num_threads())
    benchmark(step)
    # every implementation computed the same gradient (the tests check it against the formula)
    torch.testing.assert_close(F.grad.double(), expected)
    stats = benchmark.stats.stats
    RESULTS.setdefault((device, dtype, n, shape), {})[impl] = (stats.min, stats.median, mem)
