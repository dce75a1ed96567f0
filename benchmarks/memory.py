"""Device-independent memory measures for the benchmarks (CPU runs)."""
import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn, device="cpu") -> int:
    """Peak of the bytes allocated (minus freed) while ``fn`` runs: the CUDA allocator's statistics,
    or on CPU the profiler's allocation events summed in time order."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def saved_for_backward_bytes(fn) -> int:
    """Bytes of distinct storages that autograd saves for backward while ``fn`` builds its graph."""
    seen = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        except RuntimeError:  # functorch-wrapped tensors (inside torch.func.jvp) expose no storage
            seen[("wrapped", id(t))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
