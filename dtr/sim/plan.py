"""The previous step's access sequence, for the ``lookahead`` policy.

Training repeats one step. A :class:`Plan` is what a replay of one step saw:
the ops in order (name and argument count) and, for each storage (by creation
order, which does not depend on the budget), the ops that read it. A replay
given a plan tells the pool, after every op, when each storage it touched is
needed next (``pool.set_next_use``; see Note [Lookahead] in dtr/policies.py),
as long as the step follows the plan. At the first op that differs (another op,
or another number of arguments: the step diverged, as a dynamic model's does)
every next use becomes unknown and the policy falls back to its online score
for the rest of the step.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

__all__ = ["Plan"]


@dataclass
class Plan:
    """``ops[k]``: (name, number of args) of the k-th op; ``start[k]``: its start on
    the plan's clock (the trace's op times, no recomputation); ``uses[sid]``: the
    indices of the ops that read storage ``sid``, ascending (``len(ops)``: needed
    at the end, when the replay pins what is still referenced)."""

    ops: List[Tuple[str, int]] = field(default_factory=list)
    start: List[float] = field(default_factory=list)
    uses: Dict[int, List[int]] = field(default_factory=dict)
    end: float = 0.0

    def log_op(self, key: Tuple[str, int], clock: float, sids) -> None:
        k = len(self.ops)
        self.ops.append(key)
        self.start.append(clock)
        for sid in sids:
            lst = self.uses.setdefault(sid, [])
            if not lst or lst[-1] != k:
                lst.append(k)

    def log_end(self, clock: float, sids) -> None:
        self.end = clock
        k = len(self.ops)
        for sid in sids:
            lst = self.uses.setdefault(sid, [])
            if not lst or lst[-1] != k:
                lst.append(k)

    def matches(self, k: int, key: Tuple[str, int]) -> bool:
        return k < len(self.ops) and self.ops[k] == key

    def next_use_after(self, sid: int, k: int) -> float:
        """Plan-clock time of the first use of ``sid`` after op ``k`` (inf: none)."""
        lst = self.uses.get(sid)
        if not lst:
            return math.inf
        i = bisect.bisect_right(lst, k)
        if i == len(lst):
            return math.inf
        j = lst[i]
        return self.start[j] if j < len(self.start) else self.end
