"""The C++ runtime (``dtr._C.Runtime``) behind the interface ``Session`` uses.

The per-op path is all C++ (csrc/fallback.cpp, csrc/runtime.cpp): no Python
runs per op. This module only opens and closes blocks, reads statistics and
checks the options. ``dtr/runtime.py`` is the readable reference of the same
design. Not yet in the C++ runtime (it raises or behaves as documented in
docs/design.md): policies given as Python callables, mutation recipes
(a value written in place becomes unevictable), kernel scratch reservation.
"""
from __future__ import annotations

from typing import Optional

from . import _ext
from .runtime import Stats


def _check(policy, pool: str) -> None:
    if not _ext.available():
        raise ValueError(
            "dtr: runtime='cpp' needs the C++ extension dtr._C, which is not built here; build "
            "it with `pip install --no-build-isolation -e .` or use runtime='python'")
    native = _ext.native_policies()
    if not isinstance(policy, str) or policy not in native:
        raise ValueError(
            f"dtr: runtime='cpp' supports the native policies {sorted(native)}, got {policy!r}; "
            "use one of them or runtime='python' for policies written in Python")
    if pool not in ("auto", "cpp"):
        raise ValueError(f"dtr: runtime='cpp' always uses the C++ pool; got pool={pool!r}")


class CppRuntime:
    """One C++ runtime: what ``Session.runtime`` is with ``runtime="cpp"``."""

    kind = "cpp"

    def __init__(self, budget_bytes: Optional[int], policy, search, evict_all: bool = False,
                 pool_impl: str = "auto"):
        _check(policy, pool_impl)
        self._rt = _ext._C.Runtime(budget_bytes, policy, search, evict_all)
        self.policy = policy
        self._budget_bytes = budget_bytes
        self._token = None

    @property
    def limit(self) -> Optional[int]:
        return self._rt.limit

    @limit.setter
    def limit(self, value: Optional[int]) -> None:
        self._rt.limit = value

    @property
    def evict_all(self) -> bool:
        return self._rt.evict_all

    @evict_all.setter
    def evict_all(self, value: bool) -> None:
        self._rt.evict_all = value

    @property
    def stats(self) -> Stats:
        return Stats(budget_bytes=self._budget_bytes, policy=self.policy, **self._rt.stats())

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
        self._token = _ext._C.enter_block(self._rt)

    def exit(self) -> None:
        token, self._token = self._token, None
        _ext._C.exit_block(token)

    def close(self) -> None:
        self._rt.close()
