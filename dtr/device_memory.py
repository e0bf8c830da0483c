"""Tensor memory in use on a device, as its allocator counts it, and what "auto" means.

Note [The budget is the device's memory]
``dtr.budget(X)`` bounds all tensor memory of the block's device: parameters,
gradients, optimizer state, data made before the block, tensors the step never
touches. The runtime therefore checks ``bytes in use + what the op needs <= X``
against the allocator's own count, not against what it has seen:

- CUDA: ``torch.cuda.memory_allocated(device)``, the caching allocator's count,
  block rounding included.
- CPU: c10 keeps no such count, so importing dtr installs a counting CPU
  allocator (csrc/alloc_meter.cpp, Note [Counting CPU allocator]) and the
  count is its bytes in use, plus the tensors that were alive before it was
  installed (found once, at install, by walking the garbage collector's
  objects, and counted until their storage dies).
- CPU without that allocator (dtr._C not built, another CPU allocator already
  installed, or DTR_CPU_COUNTER=0): the runtime falls back on its own count
  (Runtime.models_memory). At the outermost block's entry it walks the
  garbage collector's objects for live CPU tensors and counts each storage
  until it dies; inside the block it counts every plain tensor an op reads or
  makes (optimizer state included) and its own values. What it cannot see:
  tensors reachable only from C++ (a graph saved from before the block) and
  kernels' scratch, so there the budget is kept as well as the runtime can
  see, not as the allocator counts.
"""
from __future__ import annotations

import gc
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional

import torch

from . import _ext
from .errors import DTRError

__all__ = ["AutoBudget", "install_cpu_counter", "cpu_counter_installed", "cpu_bytes_in_use",
           "bytes_in_use", "auto_bytes", "live_cpu_tensors", "gc_cpu_tensor_bytes", "cpu_tensor_bytes", "CUDA_RESERVE_FRACTION",
           "CPU_RESERVE_FRACTION"]

# See Note [Auto budget].
CUDA_RESERVE_FRACTION = 0.05
CPU_RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class AutoBudget:
    """``dtr.budget("auto")`` (fraction 1.0) or ``dtr.budget(0.8)``: a fraction of the auto budget."""

    fraction: float = 1.0


class _StorageSet:
    """Storages counted until they die: the bytes of tensors no allocator count covers."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: Dict[int, tuple] = {}
        self.bytes = 0

    def add(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, ...
            return
        ptr = st.data_ptr()
        if ptr == 0:
            return
        nb = st.nbytes()
        with self._lock:
            if ptr in self._entries:
                return

            def died(ref, ptr=ptr, nb=nb, me=weakref.ref(self)):
                s = me()
                if s is not None:
                    with s._lock:
                        e = s._entries.get(ptr)
                        if e is not None and e[0] is ref:
                            del s._entries[ptr]
                            s.bytes -= nb

            self._entries[ptr] = (weakref.ref(st, died), nb)
            self.bytes += nb


def live_cpu_tensors() -> Iterator[torch.Tensor]:
    """CPU tensors with real storage that the garbage collector reaches (dtr's wrappers,
    torch.compile's fake tensors and other storage-less subclasses excluded)."""
    from .tensor import DTRTensor

    tensor = torch.Tensor
    for obj in gc.get_objects():
        # type(), not isinstance: some lazy module attributes warn when asked their __class__.
        t = type(obj)
        if not (t is tensor or issubclass(t, tensor)) or t is DTRTensor:
            continue
        try:
            if obj.device.type != "cpu" or obj.is_meta or obj.untyped_storage().data_ptr() == 0:
                continue
        except Exception:  # noqa: BLE001 - fake, functional, sparse: no storage to count
            continue
        yield obj


_state = {"tried": False, "on": False}
_BEFORE_INSTALL = _StorageSet()


def install_cpu_counter() -> bool:
    """Install the counting CPU allocator once per process (at import of dtr); whether it is on."""
    if not _state["tried"]:
        _state["tried"] = True
        C = _ext._C
        if C is not None and os.environ.get("DTR_CPU_COUNTER", "1") != "0":
            _state["on"] = bool(C.meter_install())
            if _state["on"]:
                for t in live_cpu_tensors():
                    _BEFORE_INSTALL.add(t)
    return _state["on"]


def cpu_counter_installed() -> bool:
    return _state["on"]


def cpu_bytes_in_use() -> int:
    """Bytes of live CPU tensor storage (the counting allocator must be installed)."""
    return _ext._C.meter_current() + _BEFORE_INSTALL.bytes


def gc_cpu_tensor_bytes() -> int:
    """Bytes of the storages of the plain CPU tensors the garbage collector reaches (C++-only
    tensors are missed): a count independent of the counting allocator."""
    seen, total = set(), 0
    for t in live_cpu_tensors():
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        ptr = st.data_ptr()
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += st.nbytes()
    return total


def cpu_tensor_bytes() -> int:
    """CPU tensor bytes in use as a CPU budget counts them: the counting allocator's count, or
    without it the garbage collector's walk (See Note [The budget is the device's memory])."""
    return cpu_bytes_in_use() if _state["on"] else gc_cpu_tensor_bytes()


def meter_for(device: torch.device) -> Optional[Callable[[], int]]:
    """A function giving the bytes in use on ``device`` as its allocator counts them, or None
    where no such count exists (CPU without the counting allocator)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        dev = torch.device("cuda", idx)
        return lambda: torch.cuda.memory_allocated(dev)
    if device.type == "cpu" and _state["on"]:
        return cpu_bytes_in_use
    return None


def bytes_in_use(device) -> Optional[int]:
    m = meter_for(torch.device(device))
    return None if m is None else m()


def _cpu_available_bytes() -> int:
    """Memory the machine could still give this process: /proc/meminfo's MemAvailable, or the
    cgroup's limit less its usage when that is smaller."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            raise DTRError("dtr: cannot tell how much memory this machine has available "
                           "(no /proc/meminfo, no sysconf); give the budget in bytes, "
                           'for example dtr.budget("8GB")') from None
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
            if raw == "max":
                continue
            with open(usage_path) as f:
                usage = int(f.read().strip())
            avail = min(avail, max(int(raw) - usage, 0))
        except (OSError, ValueError):
            continue
    return avail


def auto_bytes(device: torch.device, fraction: float = 1.0, in_use: Optional[int] = None) -> int:
    """Note [Auto budget]

    ``dtr.budget("auto")`` is the tensor memory the block's device could hold
    when the budget is resolved (at block entry, or at the first op when the
    device is known only then), and ``dtr.budget(f)`` is ``f`` times that.

    - CUDA: what this process's caching allocator holds
      (``torch.cuda.memory_reserved``) plus the device's free memory
      (``torch.cuda.mem_get_info``), less a reserve of CUDA_RESERVE_FRACTION
      (5%) of the device's capacity for the caching allocator's fragmentation
      and rounding. When the allocator still runs out of memory the runtime
      evicts and retries the op (Note [Out of memory]).
    - CPU: the tensor bytes in use plus the memory the machine could still give
      (/proc/meminfo's MemAvailable, or the cgroup's limit less its usage when
      smaller), less CPU_RESERVE_FRACTION (10%) of the latter for the rest of
      the process (Python objects, memory the C allocator keeps).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"dtr: a budget fraction must be in (0, 1], got {fraction!r}")
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(idx)
        reserved = torch.cuda.memory_reserved(idx)
        full = reserved + free - int(CUDA_RESERVE_FRACTION * total)
    else:
        if in_use is None:
            in_use = bytes_in_use(device) or 0
        full = in_use + int((1 - CPU_RESERVE_FRACTION) * _cpu_available_bytes())
    return max(int(fraction * full), 1)
