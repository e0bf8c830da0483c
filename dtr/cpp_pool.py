"""The C++ eviction pool, ``dtr._C.CppPool``: PythonPool's interface and decisions, in C++.

``CppPool(policy, search)`` takes a policy *name* from ``dtr._C.native_policies()``
(or a policy written in Python, called once per search: Note [Policies written in
Python] in csrc/pool.h) and a ``dtr.SearchOptions``. Its public methods are exactly PythonPool's:
``add(sid, nbytes, cost, now, evictable, parents)``, ``remove(sid)``,
``touch(sid, now)``, ``add_cost(sid, c)``, ``cost(sid)``, ``last_access(sid)``, ``lock(sid)``,
``unlock(sid)``, ``locks(sid)``, ``pin(sid)``, ``evicted(sid)``,
``rematerialized(sid, now)``, ``choose_victim(now)``, ``unlocked_candidates()``,
``set_next_use(sid, when)``, ``next_use(sid)``, the ``plan_clock`` attribute
(the lookahead policy's inputs; Note [Lookahead] in dtr/policies.py) and ``len()``. With the same calls it evicts the same storages in the same
order as PythonPool (see Note [Same victims as the Python pool] in
csrc/pool.h). Caller errors (unknown storage id, unlocking an unlocked
storage) raise ``dtr.DTRError``.

The class is the C++ object itself, not a Python wrapper around it. Its
per-op methods are METH_FASTCALL descriptors (tens of nanoseconds a call from
the runtime); calls with keyword arguments go through pybind11 (see Note [Fast
calls] in csrc/bindings.cpp).
"""
import torch  # noqa: F401  (must be imported before the extension)

try:
    from ._C import CppPool, native_policies  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "dtr: the C++ pool needs the extension dtr._C, which is not built; build it with "
        "`pip install --no-build-isolation -e .` (or use make_pool(..., impl='python'))"
    ) from exc

__all__ = ["CppPool", "native_policies"]
