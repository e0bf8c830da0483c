"""Peak memory measured independently of the runtime's own accounting.

On CPU: the torch profiler's allocator events (PITFALLS 16); peak RSS is
useless because glibc keeps freed memory. On CUDA: the caching allocator's
``max_memory_allocated``.
"""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import torch

__all__ = ["peak_memory", "memory_timeline"]


def _walk_allocations(nodes, out):
    from torch._C._profiler import _EventType

    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n.tag == _EventType.Allocation:
            f = n.extra_fields
            out.append((n.start_time_ns, f.alloc_size, str(f.device)))
        stack.extend(n.children)


def memory_timeline(fn: Callable[..., Any], *args, **kwargs) -> Tuple[Any, List[int]]:
    """Run ``fn(*args, **kwargs)`` on CPU under the torch profiler; return (its result, the
    bytes allocated above the start after each of the CPU allocator's events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn(*args, **kwargs)
    events = []
    _walk_allocations(prof.profiler.kineto_results.experimental_event_tree(), events)
    events.sort(key=lambda e: e[0])
    cur, series = 0, []
    for _, size, devname in events:
        if devname.startswith("cpu"):
            cur += size
            series.append(cur)
    return result, series


def peak_memory(fn: Callable[..., Any], *args, device="cpu", **kwargs) -> Tuple[Any, int]:
    """Run ``fn(*args, **kwargs)``; return (its result, peak bytes allocated above the start).

    Counts memory allocated while ``fn`` runs, relative to what was allocated
    before it started (so pre-existing parameters and inputs are not counted).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(dev)
        return result, torch.cuda.max_memory_allocated(dev) - base
    result, series = memory_timeline(fn, *args, **kwargs)
    return result, max([0, *series])
