"""Extra eviction policies (registered into ``dtr.policies``' registry on import).

Every score here has the registry's signature ``score(entry, pool, now)`` and
uses only ``Entry`` fields and the pool's ``entries``, so both the runtime and
the simulator (``dtr.sim``) can use them. The lowest score is evicted.

* ``dtr_regions``: h_DTR as the paper's simulator (simrd's ``DTR`` heuristic)
  computed it: the evicted neighbourhood is the union of two *directed*
  regions, the evicted ancestors reachable through evicted storages and the
  evicted descendants reachable through evicted storages (each summed
  separately), instead of the connected evicted component of ``dtr``. The
  C++ pool implements it too (``make_pool`` then picks it), bit for bit.
* ``dtr_eq_sqrt``: dtr_eq with the square root of staleness,
  (c0 + eq-class cost) / (m * sqrt(s)): staleness matters less against cost
  and size. Not better on average, but best in some cells of the paper's
  table (Transformer at 0.6); see docs/simulator.md.
"""
from __future__ import annotations

import math

from .policies import Entry, available, register

__all__ = ["score_dtr_regions", "score_dtr_eq_sqrt", "evicted_region_cost"]


def evicted_region_cost(pool, e: Entry, forward: bool) -> float:
    """Summed cost of the evicted storages reachable from e through evicted ones,
    following children (forward) or parents (backward)."""
    entries = pool.entries
    seen = {e.sid}
    stack = list(e.children if forward else e.parents)
    total = 0.0
    while stack:
        sid = stack.pop()
        if sid in seen:
            continue
        seen.add(sid)
        n = entries.get(sid)
        if n is None or n.resident:
            continue
        total += n.cost
        stack.extend(n.children if forward else n.parents)
    return total


def score_dtr_regions(e: Entry, pool, now: float) -> float:
    c = e.cost + evicted_region_cost(pool, e, True) + evicted_region_cost(pool, e, False)
    return c / (e.nbytes * e.staleness(now))


def score_dtr_eq_sqrt(e: Entry, pool, now: float) -> float:
    from .policies import equivalence_class_cost

    return (e.cost + equivalence_class_cost(pool, e)) / (e.nbytes * math.sqrt(e.staleness(now)))


for _name, _fn in [("dtr_regions", score_dtr_regions), ("dtr_eq_sqrt", score_dtr_eq_sqrt)]:
    if _name not in available():
        register(_name, _fn)
