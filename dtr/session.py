"""``dtr.budget``: parse the limit, open a session, push the mode.

Note [Sessions]
A Session owns one Runtime. The runtime outlives the ``with`` block: tensors
that leave it keep their session, and ops on them (``loss.backward()`` after
the block, ``loss.item()``) still run under its budget. The session is freed
when the last of its tensors is.

Nesting: a ``dtr.budget`` opened while another is active on the same thread
joins the outer session (the tensors are shared) and tightens its limit to
the smaller of the two until the inner block ends; ``as`` gives the outer
session. Threads: the dispatch mode is per thread, so each thread opens its
own session; a session's runtime is guarded by a lock, so tensors may be used
from several threads. Exceptions: an op that raises leaves the runtime
consistent (locks released, nothing recorded); the block is closed normally
and the exception propagates unchanged.
"""
from __future__ import annotations

import gc
import os
import re
import threading
import warnings
from typing import Optional, Union

import torch

from . import policies as _policies
from .device_memory import AutoBudget
from .mode import DTRMode
from .errors import ThrashWarning
from .policies import SearchOptions
from .runtime import Runtime, Stats

__all__ = ["budget", "Session", "parse_budget", "RUNTIMES"]

# Note [Two runtimes]
# "python" is dtr/runtime.py under a TorchDispatchMode: the readable reference.
# "cpp" is the same design in csrc/, with no Python per op (dtr/cpp_runtime.py);
# it passes the same test suite (tests/conftest.py's `runtime` fixture runs every
# runtime test on both). The default is "cpp" where the extension is built and
# "python" where it is not; DTR_RUNTIME sets it for a process.
RUNTIMES = ("python", "cpp")


def _runtime_kind(runtime: Optional[str]) -> str:
    kind = runtime if runtime is not None else os.environ.get("DTR_RUNTIME") or _default_runtime()
    if kind not in RUNTIMES:
        source = "runtime=" if runtime is not None else "the environment variable DTR_RUNTIME="
        raise ValueError(f"dtr: unknown runtime {source}{kind!r}; expected one of {list(RUNTIMES)}")
    return kind


def _default_runtime() -> str:
    from . import _ext

    return "cpp" if _ext.available() else "python"


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_FORMS = ('an int of bytes, a string such as "8GB", "800MB", "512MiB", "1.5GiB" '
          "(units B, KB, MB, GB, TB in powers of 1000; KiB, MiB, GiB, TiB in powers of 1024), "
          '"auto", or a float in (0, 1] for that fraction of "auto"')


class _FrozenHeap:
    """Note [Frozen heap]

    A dtr block allocates about ten garbage-collected objects per op (wrappers,
    cells, recipes, records), so Python's cyclic collector runs often, and each
    full collection scans every object in the process (torch alone brings
    ~280,000): a fifth of a TreeLSTM step went to it. While any block is open,
    the objects that existed before the first block opened are frozen
    (gc.freeze), so collections scan only what was made since; the last block
    to close unfreezes them. Skipped when the program froze objects itself
    (unfreezing would undo its freeze), when gc is disabled, or with
    DTR_GC_FREEZE=0.
    """

    _lock = threading.Lock()
    _open = 0
    _frozen = False

    @classmethod
    def enter(cls) -> None:
        with cls._lock:
            cls._open += 1
            if (cls._open == 1 and gc.isenabled() and gc.get_freeze_count() == 0
                    and os.environ.get("DTR_GC_FREEZE", "1") != "0"):
                gc.freeze()
                cls._frozen = True

    @classmethod
    def exit(cls) -> None:
        with cls._lock:
            cls._open -= 1
            if cls._open == 0 and cls._frozen:
                cls._frozen = False
                gc.unfreeze()


def parse_budget(limit: Union[int, str, float, None]) -> Union[int, AutoBudget, None]:
    """Bytes from an int or a string like "512MiB"; None means no limit; "auto" and a float
    fraction give an AutoBudget, resolved on the block's device (See Note [Auto budget])."""
    if limit is None or isinstance(limit, AutoBudget):
        return limit
    if isinstance(limit, float):
        if not 0 < limit <= 1:
            raise (ValueError if limit <= 0 else TypeError)(
                f"dtr: budget must be {_FORMS}; got the float {limit!r}: a float is a fraction of "
                f'"auto" and must be in (0, 1] (for bytes pass an int: {int(limit)})'
                if limit > 1 else
                f"dtr: budget must be positive, got {limit!r}; expected {_FORMS}")
        return AutoBudget(limit)
    if isinstance(limit, bool) or not isinstance(limit, (int, str)):
        raise TypeError(f"dtr: budget must be {_FORMS}; got {limit!r} of type {type(limit).__name__}")
    if isinstance(limit, int):
        n = limit
    elif limit.strip().lower() == "auto":
        return AutoBudget(1.0)
    else:
        m = _BUDGET_RE.match(limit)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"dtr: cannot parse budget {limit!r}: expected {_FORMS}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"dtr: budget must be positive, got {limit!r} ({n} bytes); expected {_FORMS}")
    return n


def _check_device(device) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"dtr: unknown device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"dtr: budget on device {device!r}, but CUDA is not available here; "
                             "use device='cpu' or run on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"dtr: budget on device {device!r}, but only "
                             f"{torch.cuda.device_count()} CUDA devices exist")
    elif dev.type != "cpu":
        raise ValueError(f"dtr: budgets are supported on 'cpu' and 'cuda' devices, got {device!r}")
    return dev


_active = threading.local()


def _stack():
    s = getattr(_active, "stack", None)
    if s is None:
        s = _active.stack = []
    return s


class Session:
    """One dtr runtime and its statistics. Returned by ``dtr.budget``."""

    def __init__(self, limit, policy=_policies.DEFAULT_POLICY, *, device=None, search: Optional[SearchOptions] = None,
                 pool: str = "auto", count=(), runtime: Optional[str] = None,
                 _evict_all: bool = False):
        self._spec = parse_budget(limit)
        _policies.get(policy)  # validates the name
        self.device = _check_device(device)
        self.runtime_kind = _runtime_kind(runtime)
        if self.runtime_kind == "cpp":
            from .cpp_runtime import CppRuntime

            self.runtime = CppRuntime(self._spec, policy, search or SearchOptions(),
                                      evict_all=_evict_all, pool_impl=pool)
        else:
            self.runtime = Runtime(self._spec, policy, search or SearchOptions(),
                                   evict_all=_evict_all, pool_impl=pool)
        _tensors_to_count(count)  # checked, then unused: See Note [count= is a no-op]
        self._resolved: Optional[int] = None
        self._mode: Optional[DTRMode] = None
        self._outer: Optional["Session"] = None
        self._saved = None

    @property
    def budget_bytes(self) -> Optional[int]:
        """This block's limit in bytes; for "auto" and fractions, once resolved on the device."""
        if not isinstance(self._spec, AutoBudget):
            return self._spec
        if self._outer is None and self._resolved is None:
            return self.runtime.stats.budget_bytes
        return self._resolved

    @property
    def stats(self) -> Stats:
        return self.runtime.stats

    @property
    def policy(self):
        return self.runtime.policy

    def __enter__(self) -> "Session":
        stack = _stack()
        if stack:
            # Nested: join the outer session with the tighter limit (checked at entry,
            # See Note [Entry check]).
            outer = stack[-1]
            rt = outer.runtime
            self._resolved = rt.push_limit(self._spec)
            self._outer = outer
            self._saved = rt.evict_all
            rt.evict_all = rt.evict_all or self.runtime.evict_all
            stack.append(outer)
            return outer
        # The device whose memory the budget bounds: known now when given or when CUDA is
        # absent, else the device of the first plain tensor an op reads.
        dev = self.device
        if dev is None and not torch.cuda.is_available():
            dev = torch.device("cpu")
        if dev is not None:
            self.runtime.bind_device(dev)  # resolves "auto"; raises above the budget
        if self.runtime_kind == "cpp":
            self.runtime.enter()
        else:
            self.runtime.begin_step()  # lookahead only: Note [Where step plans live]
            self._mode = DTRMode(self.runtime)
            self._mode.__enter__()
        _FrozenHeap.enter()
        stack.append(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        stack = _stack()
        stack.pop()
        if self._outer is not None:
            rt = self._outer.runtime
            rt.pop_limit()
            rt.evict_all = self._saved
            self._outer = None
            return False
        mode, self._mode = self._mode, None
        try:
            if mode is not None:
                mode.__exit__(exc_type, exc, tb)
            else:
                self.runtime.exit()
            self.runtime.close()
        finally:
            _FrozenHeap.exit()
        if exc_type is None:
            _warn_if_thrashed(self)
        return False

    def __repr__(self) -> str:
        return f"Session(budget_bytes={self.budget_bytes}, policy={self.runtime.stats.policy!r})"


def _warn_if_thrashed(session: "Session") -> None:
    # Note [Thrash guard] in dtr/policies.py: a block that recomputed far more
    # than it computed says so, with the remedy, instead of only being slow.
    # dtr.testing.evict_everything recomputes everything on purpose.
    if session.runtime.evict_all or not session.runtime.thrash_guard_trips:
        return
    st = session.runtime.stats
    warnings.warn(ThrashWarning(
        f"dtr: this block recomputed more than {_policies.THRASH_GUARD_RATIO:g}x its own compute "
        f"({st.rematerializations} recomputations for {st.ops} ops, policy {st.policy}): the "
        f"budget ({st.budget_bytes} bytes) is at the edge of what this policy fits. A somewhat "
        "larger budget usually runs many times faster; so may another policy "
        "(dtr.budget(..., policy=...)). See docs/performance.md, 'Thrashing'."), stacklevel=3)


def _tensors_to_count(count):
    """Note [count= is a no-op]

    ``count=`` once named the modules and tensors to count against the budget
    from the block's start; the budget now counts all tensor memory of the
    device (Note [The budget is the device's memory]), so the keyword is
    accepted, its contents checked as before, and nothing else done with it.
    """
    if isinstance(count, (torch.Tensor, torch.nn.Module)):
        count = [count]
    out = []
    for item in count:
        if isinstance(item, torch.nn.Module):
            for p in item.parameters():
                out.append(p)
                if p.grad is not None:
                    out.append(p.grad)
            out.extend(item.buffers())
        elif isinstance(item, torch.Tensor):
            out.append(item)
        else:
            raise TypeError(f"dtr: count= takes modules and tensors, got {type(item).__name__}")
    return out


def budget(limit: Union[int, str, float, None], policy=_policies.DEFAULT_POLICY, *, device=None,
           search: Optional[SearchOptions] = None, pool: str = "auto", count=(),
           runtime: Optional[str] = None) -> Session:
    """Run the block under a memory limit, evicting and recomputing values as needed.

    ``limit`` bounds all tensor memory of the block's device as its allocator counts
    it (parameters, gradients, optimizer state, data made before the block, tensors
    the step never touches): bytes as an int, a string such as "8GB" or "512MiB",
    "auto" (what the device could hold, See Note [Auto budget]), a float in (0, 1]
    for that fraction of "auto", or None to track without a limit. Memory in use
    above the limit when the block opens raises BudgetExceededError there.
    ``policy``: a registered name (see ``dtr.policies.available()``) or a callable
    ``score(entry, pool, now)``. ``device``: the device whose memory is bounded
    (default: CPU without CUDA, else the device of the first tensor an op reads).
    ``count``: accepted for old code and ignored (See Note [count= is a no-op]).
    ``runtime``: "python" or "cpp" (see Note [Two runtimes]); default: $DTR_RUNTIME,
    else "cpp" where the extension dtr._C is built and "python" where it is not.
    """
    return Session(limit, policy, device=device, search=search, pool=pool, count=count,
                   runtime=runtime)
