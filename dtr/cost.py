"""Compute cost of an op, used by the eviction scores.

On CPU the cost is the op's wall-clock time. On CUDA, timing an op needs a
device synchronisation, which would serialise the stream; instead the cost is
estimated without one, by a roofline (Note [Roofline cost]).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

perf_counter = time.perf_counter

__all__ = ["Roofline", "CUDA_NOMINAL", "op_flops", "tensor_bytes", "roofline_seconds",
           "estimate_op", "estimate_from_bytes", "perf_counter", "op_key", "FixedCosts",
           "fixed_costs"]


# Note [Roofline cost]
# An op's time is about max(FLOPs / peak FLOP rate, bytes / peak bandwidth)
# plus a fixed launch cost: a matmul is bound by its FLOPs, an elementwise op
# or a copy by its bytes. The FLOPs come from torch's own per-op formulas
# (torch.utils.flop_counter.flop_registry: mm, addmm, bmm, baddbmm,
# convolution and its backward, the attention kernels); every other op counts
# 0 FLOPs and is bound by its bytes. The bytes are those the op reads (its
# tensor arguments) and writes (its outputs that are not views of an
# argument); a view op moves nothing and costs the launch alone. Only the
# ratios between costs matter to the scores, so the rates need only be right
# relative to each other; the estimate against measured times is checked by
# bench/roofline_check.py (docs/simulator.md, "Roofline costs"). The bytes-only
# estimate used before (bytes read at a nominal bandwidth) made a matmul cost
# as little as a copy of its inputs.

@dataclass(frozen=True)
class Roofline:
    """Nominal rates of a device: FLOP/s per dtype (``flops_per_s``, with
    ``default_flops_per_s`` for dtypes not listed), bytes/s of its memory, and
    the seconds every op costs at least (launch)."""

    bytes_per_s: float
    default_flops_per_s: float
    flops_per_s: tuple = ()  # ((dtype, FLOP/s), ...)
    launch_s: float = 0.0

    def flop_rate(self, dtype: Optional[torch.dtype]) -> float:
        for dt, rate in self.flops_per_s:
            if dt == dtype:
                return rate
        return self.default_flops_per_s


# The nominal peak of an NVIDIA H100 SXM (its data sheet, dense): 3.35 TB/s of
# HBM3; 67 TFLOP/s in float32 (CUDA cores: PyTorch does not use TF32 for
# matmuls by default), 67 in float64 (tensor cores), 989 in float16 and
# bfloat16 (tensor cores); 2 us per op, about a kernel launch.
CUDA_NOMINAL = Roofline(
    bytes_per_s=3.35e12,
    default_flops_per_s=67e12,
    flops_per_s=((torch.float32, 67e12), (torch.float64, 67e12),
                 (torch.float16, 989e12), (torch.bfloat16, 989e12)),
    launch_s=2e-6,
)


def op_flops(func, args, kwargs, out) -> int:
    """FLOPs of ``func(*args, **kwargs) -> out`` by torch's formula for it; 0 when
    torch has none (elementwise ops, copies, reductions) or it fails."""
    packet = getattr(func, "overloadpacket", func)
    from torch.utils.flop_counter import flop_registry
    formula = flop_registry.get(packet)
    if formula is None:
        return 0
    try:
        return int(formula(*args, **(kwargs or {}), out_val=out))
    except Exception:  # an argument form the formula does not know: bytes decide
        return 0


def tensor_bytes(tensors: Iterable) -> int:
    """Bytes of the elements the tensors view (not their whole storages)."""
    n = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    return n


def roofline_seconds(flops: float, nbytes: float, dtype: Optional[torch.dtype] = None,
                     rates: Roofline = CUDA_NOMINAL) -> float:
    """Note [Roofline cost]: max(FLOPs at the dtype's rate, bytes at the bandwidth) + launch."""
    return max(flops / rates.flop_rate(dtype), nbytes / rates.bytes_per_s) + rates.launch_s


def estimate_op(func, args, kwargs, inputs, out, is_view: bool,
                rates: Roofline = CUDA_NOMINAL) -> float:
    """Roofline seconds of one op run as ``out = func(*args, **kwargs)``;
    ``inputs``: its tensor arguments. A view op costs the launch alone."""
    if is_view:
        return rates.launch_s
    outs = out if isinstance(out, (tuple, list)) else (out,)
    in_ptrs = set()
    for t in inputs:
        if isinstance(t, torch.Tensor):
            in_ptrs.add(_ptr(t))
    written = [o for o in outs if isinstance(o, torch.Tensor) and _ptr(o) not in in_ptrs]
    nbytes = tensor_bytes(inputs) + tensor_bytes(written)
    dtype = next((t.dtype for t in inputs if isinstance(t, torch.Tensor)), None)
    return roofline_seconds(op_flops(func, args, kwargs, out), nbytes, dtype, rates)


def _ptr(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except Exception:
        return id(t)


# The estimate before the roofline (kept for comparison, bench/roofline_check.py):
# the bytes read at a nominal 1 TB/s, plus 1 us.
_CUDA_BYTES_PER_SECOND = 1.0e12


def estimate_from_bytes(nbytes_touched: int) -> float:
    return nbytes_touched / _CUDA_BYTES_PER_SECOND + 1e-6


def op_key(func, args, kwargs) -> tuple:
    """What an op's cost depends on: the op, its tensor arguments' shapes, strides and
    dtypes, and its other arguments. ``dtr.sim.record`` (``keep_keys``) and the Python
    runtime under ``fixed_costs`` compute it alike from the plain tensors an op runs on."""
    from torch.utils._pytree import tree_flatten

    parts = [str(func)]
    for a in tree_flatten((args, kwargs or {}))[0]:
        if isinstance(a, torch.Tensor):
            parts.append((tuple(a.shape), tuple(a.stride()) if a.layout is torch.strided else None,
                          a.dtype, a.device.type))
        elif isinstance(a, torch.Generator):
            parts.append("G")
        elif isinstance(a, (int, float, bool, str, type(None), torch.dtype, torch.device,
                            torch.layout, torch.memory_format)):
            parts.append(a)
        else:
            parts.append(repr(a))
    return tuple(parts)


# Note [Fixed op costs]
# A hook for checking the simulator against the runtime (bench/sim_vs_runtime.py):
# inside ``with fixed_costs(table):`` the Python runtime scores and charges each op
# with table[op_key(...)] (seconds) instead of its measured time (and its
# Stats.op_seconds, the clock its step plans are recorded and followed on, advances
# by them too: with measured times there, the lookahead's next-use distances were
# the machine's, not the table's), so that it and a
# replay of the recorded trace are fed the same op times; ops missing from the table
# keep their measured cost (counted in ``misses``). ``recomputed`` sums the costs of
# the recipes the runtime reran, in those times: what the replay's ``remat_time``
# is. Not used by anything else; the C++ runtime does not read it.
class FixedCosts:
    def __init__(self, table: dict):
        self.table = table
        self.hits = 0
        self.misses = 0
        self.recomputed = 0.0  # seconds
        self.recomputes = 0

    def cost_of(self, func, args, kwargs, measured: float) -> float:
        got = self.table.get(op_key(func, args, kwargs))
        if got is None:
            self.misses += 1
            return measured
        self.hits += 1
        return got

    def reset_counts(self) -> None:
        self.hits = self.misses = self.recomputes = 0
        self.recomputed = 0.0


FIXED: Optional[FixedCosts] = None


class fixed_costs:
    """``with fixed_costs(table) as fc:``: Note [Fixed op costs]."""

    def __init__(self, table: dict):
        self.costs = FixedCosts(table)

    def __enter__(self) -> FixedCosts:
        global FIXED
        if FIXED is not None:
            raise RuntimeError("dtr.cost.fixed_costs blocks do not nest")
        FIXED = self.costs
        return self.costs

    def __exit__(self, *exc) -> None:
        global FIXED
        FIXED = None
