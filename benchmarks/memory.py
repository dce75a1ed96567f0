"""Device-independent memory measures for the benchmarks (CPU runs)."""
import torch


def peak_allocated_bytes(fn) -> int:
    """Peak of live CPU tensor memory while ``fn`` runs, from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.name == "[memory]"), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def saved_for_backward_bytes(fn) -> int:
    """Bytes of distinct storages that autograd saves for backward while ``fn`` builds its graph."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
