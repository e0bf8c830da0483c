"""The C++ runtime (``dtr._C.Runtime``) behind the interface ``Session`` uses.

The per-op path is all C++ (csrc/fallback.cpp, csrc/unboxed_kernels.cpp,
csrc/runtime.cpp, docs/design.md): no Python runs per op. This module only
opens and closes blocks, reads statistics and checks the options.
``dtr/runtime.py`` is the readable reference of the same design. Policies given
as Python callables (and names registered in Python) are called once per search
for a victim (dtr/python_policy.py); escapes of its tensors go through
dtr/tensor.py's install_cpp_escapes.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import _ext
from . import policies as _policies
from . import step_plan as _step_plan
from . import tensor as _tensor
from .python_policy import PolicyCall
from . import device_memory as _devmem
from .runtime import Stats, entry_error


def _check(pool: str) -> None:
    if not _ext.available():
        raise ValueError(
            "dtr: runtime='cpp' needs the C++ extension dtr._C, which is not built here; build "
            "it with `pip install --no-build-isolation -e .` or use runtime='python'")
    if pool not in ("auto", "cpp"):
        raise ValueError(
            f"dtr: runtime='cpp' (the default where dtr._C is built) always uses the C++ pool; "
            f"got pool={pool!r}. Pass runtime='python' as well to use that pool with the Python "
            f"runtime.")


class CppRuntime:
    """One C++ runtime: what ``Session.runtime`` is with ``runtime="cpp"``."""

    kind = "cpp"

    def __init__(self, spec, policy, search, evict_all: bool = False, pool_impl: str = "auto"):
        _check(pool_impl)
        _tensor.install_cpp_escapes()
        scored_as = _policies.pool_policy(policy)
        native = isinstance(scored_as, str) and scored_as in _ext.native_policies()
        # One limit per open block, outermost first, as dtr/runtime.py's Runtime keeps them;
        # "auto" and fractions are resolved when the device is bound.
        self._limits: List = [spec]
        self.device: Optional[torch.device] = None
        # A policy written in Python is called only when a victim is chosen.
        self._rt = _ext._C.Runtime(spec if isinstance(spec, int) else None,
                                   scored_as if native else PolicyCall(policy, search), search,
                                   evict_all)
        self.policy = policy
        self._token = None
        # The device key of the step being recorded (Note [Where step plans live]).
        self._step_key = None
        # Whether the runtime keeps its own count of the device's memory (no allocator's
        # count to check against), as dtr/runtime.py's models_memory.
        self.models_memory = True

    def bytes_in_use(self) -> int:
        """Tensor bytes in use on the block's device, as the budget counts them."""
        return self._rt.bytes_in_use()

    @property
    def plain_bytes(self) -> int:
        """Plain tensors the runtime counts itself (0 with an allocator's count)."""
        return self._rt.plain_bytes

    @property
    def limit(self) -> Optional[int]:
        return self._rt.limit

    @limit.setter
    def limit(self, value: Optional[int]) -> None:
        self._rt.limit = value

    def _resolve(self, spec) -> Optional[int]:
        if spec is None or isinstance(spec, int):
            return spec
        if self.device is None:
            raise ValueError(
                "dtr: runtime='cpp' resolves dtr.budget(\"auto\") and fractions when the block "
                "opens, but the device is not known then on a machine with CUDA; pass "
                "device='cuda' or device='cpu'")
        return _devmem.auto_bytes(self.device, spec.fraction,
                                  in_use=_devmem.bytes_in_use(self.device))

    def _update_limit(self) -> None:
        resolved = [self._resolve(spec) for spec in self._limits]
        self._limits = resolved
        ints = [n for n in resolved if n is not None]
        self._rt.limit = min(ints) if ints else None

    def bind_device(self, device) -> None:
        """The device whose budget this is; resolves "auto" and checks entry, as
        dtr/runtime.py's bind_device (See Note [The C++ runtime's count of the device])."""
        if self.device is not None:
            return
        self.device = torch.device(device)
        if self.device.type == "cpu" and _devmem.cpu_counter_installed():
            self._rt.use_cpu_meter(_devmem._BEFORE_INSTALL.bytes)
            self.models_memory = False
        elif self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            self._rt.use_device_allocator(str(self.device))  # torch.cuda.memory_allocated's count
            self.models_memory = False
        elif self.device.type == "cpu":
            # Its own count, as dtr/runtime.py's: what lives now, then what ops read and make.
            for t in _devmem.live_cpu_tensors():
                self._rt.count_plain(t)
        self._update_limit()
        self.check_entry()

    def check_entry(self) -> None:
        """Note [Entry check] in dtr/runtime.py."""
        limit = self.limit
        if limit is None or self.device is None:
            return
        used = self._rt.evict_to(limit)
        if used > limit:
            raise entry_error(used, limit, self.device)

    def push_limit(self, spec) -> Optional[int]:
        self._limits.append(spec)
        self._update_limit()
        try:
            self.check_entry()
        except BaseException:
            self.pop_limit()
            raise
        return self._limits[-1]

    def pop_limit(self) -> None:
        self._limits.pop()
        self._update_limit()

    def tightened(self, spec) -> Optional[int]:
        n = self._resolve(spec)
        if n is None:
            return self.limit
        return n if self.limit is None else min(self.limit, n)

    @property
    def evict_all(self) -> bool:
        return self._rt.evict_all

    @evict_all.setter
    def evict_all(self, value: bool) -> None:
        self._rt.evict_all = value

    @property
    def stats(self) -> Stats:
        first = self._limits[0]
        return Stats(budget_bytes=first if isinstance(first, int) else None,
                     policy=self.policy if isinstance(self.policy, str)
                     else getattr(self.policy, "__name__", "custom"),  # as dtr/runtime.py names it
                     **self._rt.stats())

    @property
    def thrash_guard_trips(self) -> int:
        return self._rt.thrash_guard_trips

    @property
    def closed(self) -> bool:
        return self._rt.closed

    def count_plain(self, t) -> None:
        self._rt.count_plain(t)

    def has_live_values(self) -> bool:
        return self._rt.has_live_values()

    def evict_everything(self) -> None:
        self._rt.evict_everything()

    def enter(self) -> None:
        """Opens the block on this thread (the C++ "mode": see Note [Capturing plain-only ops])."""
        if self.device is None and any(not (s is None or isinstance(s, int)) for s in self._limits):
            self._resolve(self._limits[0])  # raises: the device must be known
        if _policies.records_steps(self.policy):
            # Note [Where step plans live]: follow the previous step's plan (Note [Adaptive
            # lookahead]: when it pays), record this one (Note [When adaptive records]).
            recording = _step_plan.records_block(self.kind, self.device, self.policy, self._limits[0])
            self._step_key = (self.device, recording)
            if recording:
                plan = _step_plan.plan_for_block(self.kind, self.device, self.policy == _policies.ADAPTIVE)
                self._rt.begin_step(plan, _step_plan.recompute_limit(self.kind, self.device))
        try:
            self._token = _ext._C.enter_block(self._rt)
        except BaseException:
            self._end_step()
            raise

    def _end_step(self) -> None:
        if self._step_key is None:
            return
        (device, recorded), self._step_key = self._step_key, None
        if recorded:
            _step_plan.keep(self.kind, device, self._rt.end_step())
        if self.policy == _policies.ADAPTIVE and self._limits[0] is not None:
            stats = self.stats
            _step_plan.report(self.kind, device, stats.recomputed_cost if recorded else None,
                              stats.evictions)

    def exit(self) -> None:
        token, self._token = self._token, None
        _ext._C.exit_block(token)

    def close(self) -> None:
        try:
            self._end_step()
        finally:
            self._rt.close()

    def known_next_uses(self) -> int:
        """Storages whose next use the pool knows now (lookahead; for tests)."""
        return self._rt.known_next_uses()
