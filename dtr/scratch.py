"""Op scratch: bytes a kernel allocates while it runs, beyond the outputs it returns.

Note [Measured op scratch]
The budget is checked against the allocator (PITFALLS 16), and kernels
allocate memory no tensor ever shows: oneDNN's RNN and convolution scratch,
reordered weights, softmax and matmul temporaries. Room must be made for it
before the op runs, or the allocator's peak passes the budget by it (an LSTM
did by 26%). On CPU, with the C++ extension built, the runtime wraps the CPU
allocator in a counting one (csrc/alloc_meter.cpp) and measures each op the
first time it runs on given input shapes: scratch = the peak allocated above
the op's start minus what is still allocated at its end. Later runs of that
(op, shapes) and every recompute of it reserve that much. Before the first
measurement, and on CUDA (whose allocator counts only process-wide peaks),
the analytic estimates of Note [Op workspace] in ops.py stand in. Set
DTR_MEASURE_SCRATCH=0 to leave the allocator alone.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from . import _ext
from .ops import OpInfo, workspace_bytes

__all__ = ["enable", "enabled", "planned", "begin", "record"]

# (op, input shapes, arguments) -> largest scratch bytes measured; shares its key
# (and its clearing) with the runtime's output-size cache.
MEASURED: Dict[tuple, int] = {}

_state = {"tried": False, "on": False}


def enable() -> bool:
    """Install the counting CPU allocator once per process; whether measurement is on."""
    if not _state["tried"]:
        _state["tried"] = True
        C = _ext._C
        if C is not None and os.environ.get("DTR_MEASURE_SCRATCH", "1") != "0":
            _state["on"] = bool(C.meter_install())
    return _state["on"]


def enabled() -> bool:
    return _state["on"]


def planned(info: OpInfo, size_key: Optional[tuple], out_bytes: int, vals) -> int:
    """Scratch to reserve before running the op: measured if known, else the estimate."""
    if size_key is not None:
        got = MEASURED.get(size_key)
        if got is not None:
            return got
    if info.workspace is not None:
        return workspace_bytes(info, out_bytes, vals)
    return 0


def should_measure(size_key: Optional[tuple], device) -> bool:
    return (_state["on"] and size_key is not None and size_key not in MEASURED
            and (device is None or device.type == "cpu"))


def begin() -> int:
    return _ext._C.meter_begin()


def record(size_key: tuple, start: int) -> int:
    """End the window opened by ``begin``; remember and return the op's scratch bytes."""
    peak_above, still_allocated = _ext._C.meter_end(start)
    scratch = max(peak_above - still_allocated, 0)
    MEASURED[size_key] = max(scratch, MEASURED.get(size_key, 0))
    return MEASURED[size_key]
