"""Eviction policies: scoring functions by name, the registry, and the Python pool.

The pool knows nothing about tensors. It holds one entry per *storage* (the
unit of eviction), identified by an integer id chosen by the caller, with its
bytes, compute cost, last access time, lock count, residency and its dataflow
neighbours. The runtime (``dtr.runtime``) and the simulator (``dtr.sim``) both
drive the same pool through this interface, so they cannot disagree about
which storage is evicted. ``dtr._C`` (when built) provides a pool with the
same interface; see ``make_pool``.

Scores follow ``docs/DTR.md``: the candidate with the *lowest* score is
evicted. Ties are broken by the smallest id, so that two implementations that
agree on the scores agree on the victim.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

from .errors import DTRError

__all__ = [
    "Entry",
    "PythonPool",
    "register",
    "get",
    "available",
    "make_pool",
    "SearchOptions",
    "DEFAULT_POLICY",
]

# Staleness of an entry touched at this very instant. It must be positive so
# that scores stay finite; any value far below one op's cost works.
_MIN_STALENESS = 1e-12


class Entry:
    """What the pool knows about one storage."""

    __slots__ = (
        "sid",
        "nbytes",
        "cost",
        "last_access",
        "locks",
        "resident",
        "evictable",
        "parents",
        "children",
        "uf_node",
        "next_use",
    )

    def __init__(self, sid: int, nbytes: int, cost: float, now: float, evictable: bool):
        self.sid = sid
        self.nbytes = nbytes
        self.cost = cost
        self.last_access = now
        self.locks = 0
        self.resident = True
        self.evictable = evictable
        self.parents: List[int] = []
        self.children: List[int] = []
        self.uf_node: Optional[_UFNode] = None
        # When it is next needed (the caller's clock; inf: never; NaN: unknown).
        # Only "lookahead" reads it; see Note [Lookahead].
        self.next_use = math.nan

    def staleness(self, now: float) -> float:
        return max(now - self.last_access, _MIN_STALENESS)

    def __repr__(self) -> str:
        return (
            f"Entry(sid={self.sid}, nbytes={self.nbytes}, cost={self.cost:.3g}, "
            f"resident={self.resident}, evictable={self.evictable}, locks={self.locks})"
        )


class _UFNode:
    """Union-find node for ``dtr_eq``: the root carries the class's summed cost."""

    __slots__ = ("parent", "cost")

    def __init__(self, cost: float):
        # A root has no parent (not itself: a self-reference is a cycle that
        # only the garbage collector could free).
        self.parent: Optional[_UFNode] = None
        self.cost = cost

    def find(self) -> "_UFNode":
        node = self
        while node.parent is not None:
            p = node.parent
            if p.parent is not None:
                node.parent = p.parent  # path halving
            node = p
        return node


def _union(a: _UFNode, b: _UFNode) -> _UFNode:
    ra, rb = a.find(), b.find()
    if ra is rb:
        return ra
    rb.parent = ra
    ra.cost += rb.cost
    return ra


# --------------------------------------------------------------------------
# Scores. Signature: score(entry, pool, now) -> float; lowest is evicted.
# --------------------------------------------------------------------------

ScoreFn = Callable[[Entry, "PythonPool", float], float]


def _evicted_neighbours(pool: "PythonPool", e: Entry) -> Iterable[Entry]:
    entries = pool.entries
    for sid in e.parents:
        n = entries.get(sid)
        if n is not None and not n.resident:
            yield n
    for sid in e.children:
        n = entries.get(sid)
        if n is not None and not n.resident:
            yield n


def evicted_neighbourhood_cost(pool: "PythonPool", e: Entry) -> float:
    """Summed cost of e*(t): the connected evicted storages adjacent to e."""
    seen = {e.sid}
    stack = list(_evicted_neighbours(pool, e))
    total = 0.0
    while stack:
        n = stack.pop()
        if n.sid in seen:
            continue
        seen.add(n.sid)
        total += n.cost
        stack.extend(m for m in _evicted_neighbours(pool, n) if m.sid not in seen)
    return total


def evicted_ancestor_cost(pool: "PythonPool", e: Entry) -> float:
    """Summed cost of the evicted ancestors that recomputing e would need."""
    entries = pool.entries
    seen = {e.sid}
    stack = list(e.parents)
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
        stack.extend(n.parents)
    return total


def equivalence_class_cost(pool: "PythonPool", e: Entry) -> float:
    """dtr_eq's approximation of the evicted neighbourhood's cost."""
    roots = []
    for n in _evicted_neighbours(pool, e):
        if n.uf_node is not None:
            r = n.uf_node.find()
            if not any(r is q for q in roots):
                roots.append(r)
    return sum(r.cost for r in roots)


def score_dtr_eq(e: Entry, pool: "PythonPool", now: float) -> float:
    return (e.cost + equivalence_class_cost(pool, e)) / (e.nbytes * e.staleness(now))


def score_dtr(e: Entry, pool: "PythonPool", now: float) -> float:
    return (e.cost + evicted_neighbourhood_cost(pool, e)) / (e.nbytes * e.staleness(now))


def score_dtr_local(e: Entry, pool: "PythonPool", now: float) -> float:
    return e.cost / (e.nbytes * e.staleness(now))


def score_msps(e: Entry, pool: "PythonPool", now: float) -> float:
    return (e.cost + evicted_ancestor_cost(pool, e)) / e.nbytes


def score_msps_sqrt(e: Entry, pool: "PythonPool", now: float) -> float:
    # Note [msps_sqrt]
    # (c0 + evicted ancestors' cost) / (m * sqrt(staleness)). h_DTR's full
    # staleness divisor evicts whatever was touched longest ago; in a backward
    # pass that is the encoder activations and skip-connection gradients a
    # U-Net needs next, and recomputes touch (freshen) what they rebuild, so
    # at tight budgets dtr_eq rebuilt long chains over and over (U-Net at 0.62
    # of eager's peak: 334 recomputations, 3.1x eager; msps_sqrt 81). msps (no
    # staleness) fixed that on the runtime but failed the paper's TreeLSTM
    # and unrolled GAN traces (>2x); the square root keeps some recency. On
    # the paper's traces (simulator, bench/results/sim/policies/) it matches
    # or beats dtr_eq in 49 of 56 cells (budgets 0.2-0.8), trails by at most
    # 0.03 in the other seven, and has no >2x cell where dtr_eq has four;
    # docs/performance.md has the runtime numbers.
    return (e.cost + evicted_ancestor_cost(pool, e)) / (e.nbytes * math.sqrt(e.staleness(now)))


def needed_next(pool: "PythonPool", e: Entry) -> float:
    """When e is needed next: its own next use, or sooner the next use of an
    evicted descendant (reached through evicted storages) whose recompute reads it."""
    nu = e.next_use
    entries = pool.entries
    seen = {e.sid}
    stack = list(e.children)
    while stack:
        sid = stack.pop()
        if sid in seen:
            continue
        seen.add(sid)
        n = entries.get(sid)
        if n is None or n.resident:
            continue
        if n.next_use < nu:  # an unknown (NaN) next use never wins
            nu = n.next_use
        stack.extend(n.children)
    return nu


# A storage touched within 1/4096 of the time until it is needed counts as
# needed that soon; see Note [Lookahead].
_LOOKAHEAD_RECENCY = 4096.0


def lookahead_distance(e: Entry, pool: "PythonPool", now: float) -> float:
    """Time until e is needed next when the caller knows its next use (on the
    plan's clock; at most 4096x its staleness), else its staleness."""
    if e.next_use != e.next_use:  # NaN: unknown
        return e.staleness(now)
    d = max(needed_next(pool, e) - pool.plan_clock, _MIN_STALENESS)
    return min(d, _LOOKAHEAD_RECENCY * e.staleness(now))


def score_lookahead(e: Entry, pool: "PythonPool", now: float) -> float:
    # Note [Lookahead]
    # Training repeats one step, so the previous step's access sequence tells
    # when each storage is needed next. The caller (dtr.sim's replay with a
    # plan; a runtime that recorded the last step) sets it with
    # pool.set_next_use(sid, when) on the plan's clock (the recorded step's
    # time at that use) and keeps pool.plan_clock at the recorded time of the
    # op the step is at. (A next use moved onto the caller's own clock when it
    # is set drifts: recomputation since then makes it look due too early, and
    # at tight budgets the drift protected the wrong storages.) The score
    # is msps_sqrt's with the time until the storage is needed next in place
    # of the staleness: a cost-aware Belady rule, (c0 + evicted ancestors'
    # cost) / (m * sqrt(time until needed)), evicting what is needed last per
    # byte of recompute; a storage never needed again (inf) scores 0. A storage
    # is needed at its own next use, or sooner when an evicted value computed
    # from it (through evicted storages) is used: with its own next use only,
    # parents of evicted values scored 0 and went first, and every recompute
    # then recomputed them too (Unrolled GAN at 0.4: 1.30 against 1.09). The
    # distance is capped at 4096x the staleness: a value a recompute has just
    # read (or rebuilt) keeps its far next use, and without the cap it was
    # evicted at once and rebuilt by the next recompute that needed it
    # (Unrolled GAN at 0.2: past 2x against msps_sqrt's 1.42; with the cap
    # 1.12). The factor was tuned on the paper's traces: the cap should only
    # catch values touched just now; smaller factors also protected values
    # merely touched recently, and cost more elsewhere (mean excess under
    # the paper's semantics: 8x 0.141, 16x 0.115, 128x 0.112, 1024x 0.108,
    # 4096x 0.1055, 65536x 0.1050, 2^20 0.106; docs/simulator.md). Where the next use
    # is unknown (NaN, the default, and what the caller sets once the step
    # diverges from the recorded one) the score is exactly msps_sqrt's, so a
    # pool with no plan behaves as msps_sqrt. The square root (rather than the
    # distance itself) was kept because it wins on the paper's traces
    # (docs/simulator.md, "Lookahead").
    return (e.cost + evicted_ancestor_cost(pool, e)) / (e.nbytes * math.sqrt(lookahead_distance(e, pool, now)))


def score_lru(e: Entry, pool: "PythonPool", now: float) -> float:
    return 1.0 / e.staleness(now)


def score_largest(e: Entry, pool: "PythonPool", now: float) -> float:
    return 1.0 / e.nbytes


def score_random(e: Entry, pool: "PythonPool", now: float) -> float:
    return pool.rng.random()


_REGISTRY: Dict[str, ScoreFn] = {}


def register(name: str, score: ScoreFn, *, replace: bool = False) -> None:
    """Add a policy: ``score(entry, pool, now) -> float``; the lowest is evicted."""
    if not callable(score):
        raise TypeError(f"dtr: policy {name!r} must be callable, got {type(score).__name__}")
    if name in _REGISTRY and not replace:
        raise DTRError(
            f"dtr: a policy named {name!r} is already registered ({_REGISTRY[name]!r}); "
            "pass replace=True to override it"
        )
    _REGISTRY[name] = score


# Note [Adaptive lookahead] in dtr/step_plan.py: scores as "lookahead"; what differs is
# whether a block is given the previous step's plan, which the runtimes decide per step.
ADAPTIVE = "adaptive"


def pool_policy(policy):
    """The policy a pool scores with: "adaptive" scores as "lookahead"."""
    return "lookahead" if isinstance(policy, str) and policy == ADAPTIVE else policy


def records_steps(policy) -> bool:
    """Whether a runtime with ``policy`` records its steps (Note [Where step plans live])."""
    return isinstance(policy, str) and policy in ("lookahead", ADAPTIVE)


def available() -> List[str]:
    return sorted([*_REGISTRY, ADAPTIVE])


def get(policy) -> ScoreFn:
    """Resolve a policy given by name or as a callable."""
    if callable(policy):
        return policy
    if isinstance(policy, str) and pool_policy(policy) in _REGISTRY:
        return _REGISTRY[pool_policy(policy)]
    raise ValueError(
        f"dtr: unknown eviction policy {policy!r}; valid names are {', '.join(available())}, "
        "or pass a callable score(entry, pool, now) -> float (lowest is evicted)"
    )


def name_of(policy) -> Optional[str]:
    """The registered name of a policy, or None for an unregistered callable."""
    if isinstance(policy, str):
        return policy
    for k, v in _REGISTRY.items():
        if v is policy:
            return k
    return None


for _name, _fn in [
    ("dtr_eq", score_dtr_eq),
    ("dtr", score_dtr),
    ("dtr_local", score_dtr_local),
    ("msps", score_msps),
    ("lru", score_lru),
    ("largest", score_largest),
    ("random", score_random),
    ("msps_sqrt", score_msps_sqrt),
    ("lookahead", score_lookahead),
]:
    register(_name, _fn)

# Note [The default policy]
# "adaptive" (Note [Adaptive lookahead] in dtr/step_plan.py) is the default: msps_sqrt's
# score (below), with the time until a value is needed next in place of its staleness
# in the steps where following the previous step's plan recomputed less than not
# following it. On a repeated step it can only match or beat msps_sqrt, which is what
# it runs where the plan does not pay:
#  * bench (bench/results/lookahead_adaptive.md, C++ runtime, recomputations per
#    step): GPT at 0.5 of eager's peak 253 against msps_sqrt's 338, ResNet 44
#    against 77, U-Net 68 against 100; on the ResNet at 0.43, where following the
#    plan recomputes 673, it keeps msps_sqrt's 101.
#  * the simulator (docs/simulator.md): the better of lookahead and msps_sqrt per
#    cell on the paper's traces, and within 1.053x of the MILP's optimum wherever
#    the MILP proves one (msps_sqrt and dtr_eq 1.41x on one graph).
#  * It records a step only where a plan can matter (Note [When adaptive records]),
#    so a block with no limit pays nothing for it.
# msps_sqrt was the default before it, and dtr_eq, the paper's h_DTR^eq, until
# issue 15; both stay available by name with the paper's other heuristics. Why
# msps_sqrt's score and not dtr_eq's (bench/results/thrash.md, docs/performance.md,
# 'Choosing the default policy'):
#  * dtr_eq thrashed on issue 15's GRU RNN, 88 recomputations per op at 0.5
#    of eager's peak (msps_sqrt: 0.54), and on bench's TreeLSTM at 0.9 (51
#    per op; msps_sqrt 1.4). The cause is its cost term. Its union-find
#    classes join evicted storages that touch, in either direction, and eager
#    eviction (Note [Eager eviction] in dtr/runtime.py) evicts every dead
#    intermediate of the step, so the step's evicted storages form one class:
#    every candidate next to it is charged the cost of everything evicted so
#    far (median 0.021 s per victim on the GRU, where the evicted ancestors its
#    own recompute needs cost 2e-5 s). With the same large cost added to every
#    score, the score is in effect 1 / (bytes * staleness): it evicted the
#    gradient accumulators, whose recompute needs every later step's backward.
#    "dtr" (the exact connected component) has the same flaw: 53 per op.
#  * msps_sqrt charges the evicted ancestors, which is what a recompute needs.
#    It thrashes too at the very edge (the GRU at 0.4 of eager's peak, the
#    TreeLSTM at 0.87), but where dtr_eq already thrashes (GRU at 0.5: 0.51
#    per op against 94; TreeLSTM at 0.9: 0.95 against 52).
#  * In the simulator, under the paper's semantics, on the paper's 8 traces, its
#    mean excess overhead is 0.169 against dtr_eq's 0.252 and the paper's 0.214
#    (docs/simulator.md); on bench's full run it was the faster of the two on
#    GPT at 0.5 (1.41x eager against 1.45x) and ResNet at checkpoint's peak.
# Where it still loses: the GRU at 0.4 of eager's peak and below, where the
# C++ runtime thrashed in two runs of three (costs are measured times, and at
# the edge of feasibility the outcome flips with them); dtr_eq reached a
# lower budget on GPT (0.45 of its peak against 0.48).
DEFAULT_POLICY = "adaptive"

# Note [Thrash guard]
# Near the edge of feasibility a policy can recompute the same values over
# and over, 100x slower than eager, where a somewhat larger budget would run
# at about 1.1x. Each pool (one per block) sums the cost of the storages it
# was given (add, add_cost: the block's own compute) and the cost of every
# rematerialization. Once the recomputed cost passes THRASH_GUARD_RATIO times
# the computed cost, or the rematerializations THRASH_GUARD_RATIO times the
# storages added, after at least THRASH_GUARD_MIN_REMATS
# rematerializations, the guard trips, once per pool
# (Stats.thrash_guard_trips), and the session warns when the block ends
# (dtr.ThrashWarning, with the remedy) instead of only being slow. A healthy
# tight run recomputes 0.2-0.6 of its own cost (bench's rows at 0.5 of
# eager's peak); 3 is well above that and well below thrashing (10-100x).
# The count is there because costs are kernel times, and recomputing a tiny op
# costs the runtime far more than its kernel: bench's TreeLSTM at 0.87 of its
# peak recomputed 18,638 values in a step for 0.050 s of kernel cost against
# 0.054 s computed (0.36 s of wall time), 45 per op in another run, and the
# cost ratio alone never tripped.
# Once tripped, the pool samples (Note [Sampling] in csrc/pool.cpp: isqrt(n)
# candidates) whenever it has more than THRASH_GUARD_SAMPLE_ABOVE. In a
# thrash the time goes to the search as much as to recomputing: every
# candidate's score walks a long evicted graph. Issue 15's GRU at 0.4 of
# eager's peak, msps_sqrt, C++ runtime, one step, in the runs that thrashed:
# 202k recomputations and 26.7 s of recomputation and search without the
# guard, 177k and 2.5 s with it; dtr_eq at 0.5: 1.9 s and 1.1 s. It does not
# get the step out of the thrash (the recomputations barely move). Switching
# policy instead was measured and not kept (dtr_eq at 0.5: 232k and 1.8 s
# without a switch, 60k and 3.7 s switching to msps, 141k and 12.6 s to
# msps_sqrt): every switch recomputed less and took longer (docs/performance.md,
# 'Thrashing').
THRASH_GUARD_RATIO = 3.0
THRASH_GUARD_MIN_REMATS = 64
THRASH_GUARD_SAMPLE_ABOVE = 64


# --------------------------------------------------------------------------
# The pool.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchOptions:
    """How the victim search looks at candidates.

    ``sample_above``: with more candidates than this, score only k = isqrt(n)
    of them instead of all (None: always scan all, the default). The sample
    is k uniform draws (with replacement) from the candidate array; if every
    sampled one is locked, all are scanned.
    ``min_evictable_fraction``: when sampling, skip sampled candidates smaller
    than this fraction of the mean candidate size (unless that skips all).
    ``seed``: seeds the pool's SplitMix64 generator (sampling and the
    ``random`` policy). The Python and the C++ pool sample identically, so
    with the same seed they make the same choices even when sampling.
    ``thrash_guard``: when recomputation runs away, sample from then on, count
    (Stats.thrash_guard_trips) and warn (dtr.ThrashWarning); see Note [Thrash
    guard]. On by default.
    """

    sample_above: Optional[int] = None
    min_evictable_fraction: float = 0.0
    seed: int = 0
    thrash_guard: bool = True

    def __post_init__(self):
        if self.sample_above is not None and (
                isinstance(self.sample_above, bool) or not isinstance(self.sample_above, int)
                or self.sample_above < 0):
            raise ValueError(f"dtr: SearchOptions.sample_above must be None or an int >= 0, "
                             f"got {self.sample_above!r}")
        if not self.min_evictable_fraction >= 0:
            raise ValueError(f"dtr: SearchOptions.min_evictable_fraction must be >= 0, "
                             f"got {self.min_evictable_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"dtr: SearchOptions.seed must be an int, got {self.seed!r}")
        if not isinstance(self.thrash_guard, bool):
            raise ValueError(f"dtr: SearchOptions.thrash_guard must be True or False, "
                             f"got {self.thrash_guard!r}")


_M64 = (1 << 64) - 1


class _SplitMix64:
    """SplitMix64: the generator of both pools (csrc/pool.h has the C++ twin)."""

    __slots__ = ("state",)

    def __init__(self, seed: int = 0):
        self.state = seed & _M64

    def next_u64(self) -> int:
        z = self.state = (self.state + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)

    def random(self) -> float:
        """Uniform in [0, 1), 53 random bits."""
        return (self.next_u64() >> 11) * (1.0 / 9007199254740992.0)


class PythonPool:
    """The reference pool. Every method is O(1) except ``choose_victim``.

    Candidates (resident, evictable, non-empty storages; locked ones are
    skipped at search time) live in an array with swap-with-last removal, in
    the same order as in the C++ pool, so that sampling and the ``random``
    policy pick the same storages in both (see csrc/pool.h).
    """

    def __init__(self, policy=None, search: SearchOptions = SearchOptions()):
        policy = pool_policy(DEFAULT_POLICY if policy is None else policy)
        self.score = get(policy)
        self.search = search
        # Note [Thrash guard]: costs of the storages added and rematerialized so far.
        self._computed_cost = 0.0
        self._recomputed_cost = 0.0
        self._adds = 0
        self._remats = 0
        self.thrash_guard_trips = 0
        self.rng = _SplitMix64(search.seed)
        self.entries: Dict[int, Entry] = {}
        self._cand: List[Entry] = []
        self._cand_pos: Dict[int, int] = {}
        self.candidate_bytes = 0
        # Where the step is on the plan's clock; see Note [Lookahead].
        self.plan_clock = 0.0

    @property
    def recomputed_cost(self) -> float:
        """Summed cost of the storages rematerialized so far (Note [Thrash guard])."""
        return self._recomputed_cost

    @property
    def candidates(self) -> Dict[int, Entry]:
        """Resident, evictable entries by id (a snapshot)."""
        return {e.sid: e for e in self._cand}

    def _get(self, sid: int, what: str) -> Entry:
        e = self.entries.get(sid)
        if e is None:
            raise DTRError(f"dtr: internal error: {what} of unknown storage id {sid} "
                           "(it was never added to the pool or was already removed)")
        return e

    # -- lifecycle -------------------------------------------------------
    def add(self, sid: int, nbytes: int, cost: float, now: float, evictable: bool,
            parents: Iterable[int] = ()) -> None:
        if sid in self.entries:
            raise DTRError(f"dtr: internal error: storage id {sid} added twice")
        if nbytes < 0:
            raise DTRError(f"dtr: storage {sid} added with negative size {nbytes}")
        e = Entry(sid, nbytes, cost, now, evictable)
        self._computed_cost += cost
        self._adds += 1
        entries = self.entries
        for p in parents:
            pe = entries.get(p)
            if pe is not None and p != sid and p not in e.parents:
                e.parents.append(p)
                pe.children.append(sid)
        entries[sid] = e
        if evictable and nbytes > 0:
            self._cand_pos[sid] = len(self._cand)
            self._cand.append(e)
            self.candidate_bytes += nbytes

    def remove(self, sid: int) -> None:
        """The storage is gone for good (no value, no recipe refers to it)."""
        e = self.entries.pop(sid, None)
        if e is None:
            return
        self._drop_candidate(e)
        if e.uf_node is not None:
            # It leaves its class, as a rematerialized member does.
            e.uf_node.find().cost -= e.cost
            e.uf_node = None
        entries = self.entries
        for p in e.parents:
            pe = entries.get(p)
            if pe is not None:
                pe.children.remove(sid)
        for c in e.children:
            ce = entries.get(c)
            if ce is not None:
                ce.parents.remove(sid)

    def _drop_candidate(self, e: Entry) -> None:
        pos = self._cand_pos.pop(e.sid, None)
        if pos is None:
            return
        cand = self._cand
        last = cand.pop()
        if last is not e:
            cand[pos] = last
            self._cand_pos[last.sid] = pos
        self.candidate_bytes -= e.nbytes

    def _maybe_candidate(self, e: Entry) -> None:
        if e.evictable and e.resident and e.nbytes > 0 and e.sid not in self._cand_pos:
            self._cand_pos[e.sid] = len(self._cand)
            self._cand.append(e)
            self.candidate_bytes += e.nbytes

    # -- per-op updates --------------------------------------------------
    def touch(self, sid: int, now: float) -> None:
        e = self.entries.get(sid)
        if e is not None:
            e.last_access = now

    def set_next_use(self, sid: int, when: float) -> None:
        """When the storage is next needed (NaN: unknown); see Note [Lookahead]."""
        self._get(sid, "set_next_use").next_use = when

    def next_use(self, sid: int) -> float:
        e = self.entries.get(sid)
        return e.next_use if e is not None else math.nan

    def add_cost(self, sid: int, cost: float) -> None:
        self._get(sid, "add_cost").cost += cost
        self._computed_cost += cost

    def lock(self, sid: int) -> None:
        e = self.entries.get(sid)
        if e is None:
            e = self._get(sid, "lock")
        e.locks += 1

    def unlock(self, sid: int) -> None:
        e = self.entries.get(sid)
        if e is None:
            e = self._get(sid, "unlock")
        if e.locks <= 0:
            raise DTRError(f"dtr: internal error: unlock of unlocked storage {sid}")
        e.locks -= 1

    def unlocked_candidates(self) -> List[int]:
        """Ids of every storage that could be evicted right now."""
        return [e.sid for e in self._cand if not e.locks]

    def locks(self, sid: int) -> int:
        e = self.entries.get(sid)
        return e.locks if e is not None else 0

    def cost(self, sid: int) -> float:
        e = self.entries.get(sid)
        return e.cost if e is not None else 0.0

    def last_access(self, sid: int) -> float:
        """When the storage was last touched (0.0 for an unknown id)."""
        e = self.entries.get(sid)
        return e.last_access if e is not None else 0.0

    def pin(self, sid: int) -> None:
        """Make a storage unevictable for the rest of its life."""
        e = self.entries.get(sid)
        if e is not None:
            e.evictable = False
            self._drop_candidate(e)

    def evicted(self, sid: int) -> None:
        e = self.entries.get(sid)
        if e is None or not e.resident:
            return
        e.resident = False
        self._drop_candidate(e)
        node = _UFNode(e.cost)
        for n in _evicted_neighbours(self, e):
            if n.uf_node is not None:
                node = _union(node, n.uf_node)
        e.uf_node = node if e.uf_node is None else _union(e.uf_node, node)

    def rematerialized(self, sid: int, now: float) -> None:
        e = self._get(sid, "rematerialized")
        if e.resident:
            return
        e.resident = True
        e.last_access = now
        if e.uf_node is not None:
            e.uf_node.find().cost -= e.cost
            e.uf_node = None
        self._maybe_candidate(e)
        # Note [Thrash guard]
        self._recomputed_cost += e.cost
        self._remats += 1
        if (not self.thrash_guard_trips and self.search.thrash_guard
                and self._remats >= THRASH_GUARD_MIN_REMATS
                and (self._recomputed_cost > THRASH_GUARD_RATIO * self._computed_cost
                     or self._remats > THRASH_GUARD_RATIO * self._adds)):
            self.thrash_guard_trips = 1
            s = self.search
            if s.sample_above is None or s.sample_above > THRASH_GUARD_SAMPLE_ABOVE:
                self.search = dataclasses.replace(s, sample_above=THRASH_GUARD_SAMPLE_ABOVE)

    # -- the search ------------------------------------------------------
    def choose_victim(self, now: float) -> Optional[int]:
        """The unlocked candidate with the lowest score (ties: smallest id)."""
        n = len(self._cand)
        if n == 0:
            return None
        # A snapshot: a storage may die (and leave the pool) while we score.
        full: List[Entry] = list(self._cand)
        pool_iter = full
        s = self.search
        if s.sample_above is not None and n > s.sample_above:
            # See Note [Sampling] in csrc/pool.cpp: the C++ pool does the same.
            rng = self.rng
            pool_iter = [full[rng.next_u64() % n] for _ in range(max(1, math.isqrt(n)))]
            if s.min_evictable_fraction > 0:
                floor = s.min_evictable_fraction * self.candidate_bytes / n
                big = [e for e in pool_iter if e.nbytes >= floor]
                pool_iter = big or pool_iter
        best = self._scan(pool_iter, now)
        if best is None and pool_iter is not full:
            # Every sampled candidate was locked: fall back to a full scan.
            best = self._scan(full, now)
        return None if best is None else best.sid

    def _scan(self, entries: Iterable[Entry], now: float) -> Optional[Entry]:
        score = self.score
        best: Optional[Entry] = None
        best_score = math.inf
        for e in entries:
            if e.locks:
                continue
            sc = score(e, self, now)
            if best is None or sc < best_score or (sc == best_score and e.sid < best.sid):
                best, best_score = e, sc
        return best

    # -- introspection ---------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    # The C++ pool has the same private helpers; the tests use them.
    def _candidates(self) -> List[int]:
        return [e.sid for e in self._cand]

    def _entry(self, sid: int) -> Optional[dict]:
        e = self.entries.get(sid)
        if e is None:
            return None
        return dict(sid=e.sid, nbytes=e.nbytes, cost=e.cost, last_access=e.last_access,
                    locks=e.locks, resident=e.resident, evictable=e.evictable,
                    parents=list(e.parents), children=list(e.children))

    def _class_cost(self, sid: int) -> Optional[float]:
        e = self.entries.get(sid)
        if e is None or e.uf_node is None:
            return None
        return e.uf_node.find().cost

    def _class_root(self, sid: int) -> Optional[int]:
        e = self.entries.get(sid)
        if e is None or e.uf_node is None:
            return None
        return id(e.uf_node.find())

    def _score(self, sid: int, now: float) -> Optional[float]:
        e = self.entries.get(sid)
        return None if e is None else self.score(e, self, now)

    def _check_invariants(self) -> None:
        cand = self._cand
        assert len(cand) == len(self._cand_pos)
        for i, e in enumerate(cand):
            assert self._cand_pos[e.sid] == i and self.entries[e.sid] is e
        assert self.candidate_bytes == sum(e.nbytes for e in cand)
        for sid, e in self.entries.items():
            assert (sid in self._cand_pos) == (e.resident and e.evictable and e.nbytes > 0)
            assert e.resident == (e.uf_node is None)
            assert e.locks >= 0
            for p in e.parents:
                assert self.entries[p].children.count(sid) == 1
            for c in e.children:
                assert self.entries[c].parents.count(sid) == 1


def make_pool(policy=None, search: SearchOptions = SearchOptions(), impl: str = "auto"):
    """A pool for ``policy`` (default: DEFAULT_POLICY): the C++ one when built and the
    policy is native."""
    policy = pool_policy(DEFAULT_POLICY if policy is None else policy)
    if impl not in ("auto", "python", "cpp"):
        raise ValueError(f"dtr: unknown pool implementation {impl!r}; use 'auto', 'python' or 'cpp'")
    if impl != "python":
        from . import _ext

        if _ext.available() and isinstance(policy, str) and policy in _ext.native_policies():
            return _ext.CppPool(policy, search)
        if impl == "cpp":
            raise DTRError(
                "dtr: the C++ pool was requested but dtr._C is not built or does not implement "
                f"policy {policy!r}; build it with `pip install --no-build-isolation -e .`"
            )
    return PythonPool(policy, search)
