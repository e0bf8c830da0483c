"""Policies given as Python callables, on the C++ runtime (the Python half).

A policy is ``score(entry, pool, now) -> float`` (dtr/policies.py), written for
``PythonPool``. The C++ pool calls ``PolicyCall`` once per search with the ids
of the candidates to score (see Note [Policies written in Python] in
csrc/pool.h); it scores each with the callable and returns the scores. What the
callable receives is what it would read on ``PythonPool``: ``entry`` is a
``dtr.policies.Entry``, and ``pool`` a ``PoolView`` with ``entries`` (every
storage, by id; ``uf_node`` carries dtr_eq's class cost, so the scores of
dtr/policies.py work unchanged), ``candidates``, ``candidate_bytes``,
``plan_clock``, ``search`` and ``rng``. Both are snapshots of the pool during
the call; the pool can be read only then.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional

from . import policies as _policies
from .policies import Entry, SearchOptions, _SplitMix64, _UFNode


def policy_name(policy) -> str:
    """How messages and ``Stats.policy`` name a policy: its registered name, else the callable's."""
    name = _policies.name_of(policy)
    if name is not None:
        return name
    return getattr(policy, "__qualname__", None) or getattr(policy, "__name__", None) or repr(policy)


class _Entries(Mapping):
    """Every storage in the pool by id, as ``dtr.policies.Entry`` snapshots (one per call)."""

    def __init__(self, view: "PoolView"):
        self._view = view
        self._memo: Dict[int, Entry] = {}
        self._roots: Dict[int, _UFNode] = {}

    def _reset(self) -> None:
        self._memo.clear()
        self._roots.clear()

    def __getitem__(self, sid: int) -> Entry:
        e = self._memo.get(sid)
        if e is not None:
            return e
        row = self._view._pool().entry(sid)
        if row is None:
            raise KeyError(sid)
        (sid, nbytes, cost, last_access, locks, resident, evictable, parents, children, next_use,
         root, class_cost) = row
        e = Entry(sid, nbytes, cost, last_access, evictable)
        e.locks = locks
        e.resident = resident
        e.parents = parents
        e.children = children
        e.next_use = next_use
        if root is not None:
            # One node per class, so that equivalence_class_cost counts each class once.
            node = self._roots.get(root)
            if node is None:
                node = self._roots[root] = _UFNode(class_cost)
            e.uf_node = node
        self._memo[sid] = e
        return e

    def __iter__(self) -> Iterator[int]:
        return iter(self._view._pool().ids())

    def __len__(self) -> int:
        return self._view._pool().size()


class PoolView:
    """What a Python policy receives as ``pool`` on the C++ runtime (PythonPool's read side)."""

    def __init__(self, search: SearchOptions):
        self.search = search
        self.rng = _SplitMix64(search.seed)  # the "random" score's generator, as on PythonPool
        self.entries = _Entries(self)
        self._handle = None

    def _pool(self):
        if self._handle is None:
            from .errors import DTRError

            raise DTRError("dtr: the pool passed to an eviction policy can be read only during the "
                           "call that received it")
        return self._handle

    @property
    def candidates(self) -> Dict[int, Entry]:
        """Resident, evictable entries by id."""
        return {sid: self.entries[sid] for sid in self._pool().candidates()}

    @property
    def candidate_bytes(self) -> int:
        return self._pool().candidate_bytes()

    @property
    def plan_clock(self) -> float:
        return self._pool().plan_clock()

    def __len__(self) -> int:
        return self._pool().size()


class PolicyCall:
    """Called by the C++ pool once per search: the scores of the storages ``sids``."""

    def __init__(self, policy, search: Optional[SearchOptions]):
        self.score = _policies.get(policy)
        self.name = repr(policy_name(policy))
        self.view = PoolView(search or SearchOptions())

    def __call__(self, handle, sids: List[int], now: float) -> list:
        view = self.view
        view._handle = handle
        view.entries._reset()
        try:
            entries, score = view.entries, self.score
            return [score(entries[sid], view, now) for sid in sids]
        finally:
            view._handle = None
            view.entries._reset()
