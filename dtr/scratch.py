"""Op scratch: bytes a kernel allocates while it runs, beyond the outputs it returns.

Note [Measured op scratch]
The budget is checked against the allocator (PITFALLS 16), and kernels
allocate memory no tensor ever shows: oneDNN's RNN and convolution scratch,
reordered weights, softmax and matmul temporaries. Room must be made for it
before the op runs, or the allocator's peak passes the budget by it (an LSTM
did by 26%). On CPU, with the C++ extension built, the runtime measures each op
the first time it runs on given input shapes and strides (Note [Strides in
the size key] in runtime.py), with a window on the counting
CPU allocator installed at import (csrc/alloc_meter.cpp, Note [Metering
windows]): scratch = the peak allocated above the op's start minus what is
still allocated at its end. Later runs of that
(op, shapes) and every recompute of it reserve that much. On CUDA the
caching allocator keeps only a process-wide peak (resetting it would clobber
the user's max_memory_allocated), so the scratch is bounded instead by the
bytes the op allocated and freed again while it ran (cuDNN's workspaces: a
U-Net passed its budget 2x before this). Before an (op, shapes) is first
measured, the analytic estimates of Note [Op workspace] in ops.py stand in.
Set DTR_MEASURE_SCRATCH=0 to reserve only the estimates.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from . import _ext
from . import device_memory as _devmem
from .ops import OpInfo, workspace_bytes

__all__ = ["enable", "planned", "Window", "measured"]

# (op, input shapes and strides, arguments) -> largest scratch bytes measured; shares its key
# (and its clearing) with the runtime's output-size cache.
MEASURED: Dict[tuple, int] = {}

_state = {"tried": False, "on": False}


def enable() -> bool:
    """Whether CPU scratch is measured: the counting CPU allocator is installed (at import of
    dtr, See Note [Counting CPU allocator]) and DTR_MEASURE_SCRATCH is not 0."""
    if not _state["tried"]:
        _state["tried"] = True
        _state["on"] = (_devmem.install_cpu_counter()
                        and os.environ.get("DTR_MEASURE_SCRATCH", "1") != "0")
    return _state["on"]


def measured() -> list:
    """Scratch bytes measured so far by either runtime, one per (op, input metadata)."""
    out = list(MEASURED.values())
    if _ext.available():
        out.extend(_ext._C.measured_op_scratch())
    return out


def planned(info: OpInfo, size_key: Optional[tuple], out_bytes: int, vals) -> int:
    """Scratch to reserve before running the op: measured if known, else the estimate."""
    if size_key is not None:
        got = MEASURED.get(size_key)
        if got is not None:
            return got
    if info.workspace is not None:
        return workspace_bytes(info, out_bytes, vals)
    return 0


def _should_measure(size_key: Optional[tuple], device) -> bool:
    if size_key is None or size_key in MEASURED:
        return False
    if device is not None and device.type == "cuda":
        return True
    return _state["on"] and (device is None or device.type == "cpu")


def _begin(device):
    if device is not None and device.type == "cuda":
        st = torch.cuda.memory_stats(device)
        return st.get("allocated_bytes.all.freed", 0)
    return _ext._C.meter_begin()


def _cancel(device, start) -> None:
    """Close the window opened by ``_begin`` without recording (the op raised)."""
    if (device is None or device.type != "cuda") and start >= 0:
        _ext._C.meter_end(start)


def _record(size_key: tuple, device, start) -> int:
    """End the window opened by ``_begin``; remember and return the op's scratch bytes."""
    if device is not None and device.type == "cuda":
        scratch = torch.cuda.memory_stats(device).get("allocated_bytes.all.freed", 0) - start
    else:
        if start < 0:  # another thread was measuring: measure the next run instead
            return MEASURED.get(size_key, 0)
        peak_above, still_allocated = _ext._C.meter_end(start)
        scratch = peak_above - still_allocated
    scratch = max(scratch, 0)
    MEASURED[size_key] = max(scratch, MEASURED.get(size_key, 0))
    return MEASURED[size_key]


class Window:
    """A measuring window around one kernel call, as csrc/scratch.h's ScratchWindow.

    Open only for the first run of a (size key, device) that can be measured. Leaving it
    normally records the op's scratch; leaving it by an exception, or ``cancel()`` (an
    out-of-memory retry, whose window would hold the evictions), records nothing.
    """

    __slots__ = ("size_key", "device", "start")

    def __init__(self, size_key: Optional[tuple], device):
        self.size_key = size_key
        self.device = device
        self.start = _begin(device) if _should_measure(size_key, device) else None

    def cancel(self) -> None:
        if self.start is not None:
            _cancel(self.device, self.start)
            self.start = None

    def __enter__(self) -> "Window":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.start is not None:
            if exc_type is None:
                _record(self.size_key, self.device, self.start)
            else:
                _cancel(self.device, self.start)
            self.start = None
        return False
