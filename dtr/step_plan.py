"""The lookahead policy's memory of the previous step, on the runtimes.

Note [Where step plans live]
Training repeats one step, and each step is usually its own ``with
dtr.budget(..., policy="lookahead"):`` block, with its own session and runtime.
So the plan a block records outlives its runtime here, in this module: one
plan per thread and runtime kind ("python", "cpp") and per the block's
device (its ``device=``, or the device bound when the block opened; None on a
machine with CUDA until the first op binds one). When a lookahead block opens
it takes the plan its thread left for that key, follows it while the step
matches, and when it closes leaves the step it recorded for the next block
(Note [Recording steps for lookahead] in csrc/step_plan.h says what a plan
holds and how it is followed; ``StepRecorder`` below does the same for the
Python runtime). Blocks with another policy neither read nor change the plans.
Per thread, because the dispatch mode (and so what a block sees) is per
thread. ``forget()`` drops this thread's plans (the next lookahead block then
runs as msps_sqrt, recording anew).

A plan only steers which values are evicted, never what a recompute computes,
so a stale or wrong plan costs time, not exactness.
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Dict, List, Optional, Tuple

__all__ = ["forget", "plan_for", "plan_for_block", "recompute_limit", "records_block", "report",
           "following_plan",
           "StepRecorder", "PyStepPlan"]

_local = threading.local()


def _plans() -> Dict[tuple, object]:
    d = getattr(_local, "plans", None)
    if d is None:
        d = _local.plans = {}
    return d


def _key(kind: str, device) -> tuple:
    return (kind, None if device is None else str(device))


def take(kind: str, device) -> Optional[object]:
    """The plan this thread's last lookahead block of this kind left for ``device``."""
    return _plans().get(_key(kind, device))


def keep(kind: str, device, plan) -> None:
    if plan is not None:
        _plans()[_key(kind, device)] = plan


def plan_for(kind: str = "cpp", device="cpu") -> Optional[object]:
    """The plan the next lookahead block of this thread would follow (None: none yet)."""
    return take(kind, device)


def forget() -> None:
    """Drop this thread's recorded plans (and the adaptive policy's measurements)."""
    _plans().clear()
    _choices().clear()


# Note [Adaptive lookahead]
# A plan is a guess that the next step repeats the last one, and following it can
# cost more than it saves: bench's ResNet at 0.42-0.45 of eager's peak recomputed
# 6.7x more values with its plan than without (bench/results/lookahead_resnet_edge.md),
# while GPT, U-Net and the RNNs recompute less with it. Which one wins is a property
# of the model and the budget, and training measures both: policy "adaptive" runs
# lookahead's score, gives a block the plan or not (not: the score is msps_sqrt's),
# and per thread, runtime kind and device keeps the last step's recomputed cost under
# each choice (Stats.recomputed_cost: the pool's summed costs of what it
# rematerialized, which are the ops' least measured times, Note [Stable costs]; the
# wall time of the recomputes swings too much between steps on a shared machine: on
# GPT at 0.5 a step with the plan measured 0.221 s against 0.198 s without it, while
# recomputing 256 values against 330). A block follows the choice that cost less last time; every
# `interval` steps it tries the other once (a probe), so that a change (a new phase
# of training, a measurement that was noise) is seen. A probe that loses doubles the
# interval (up to _PROBE_MAX), one that wins resets it: at a budget where the plan
# loses, one step in 256 pays for asking again. The first block has no plan; the
# second follows one, so both are measured from the third step on.
#
# Note [When adaptive records]
# Recording a step costs about a microsecond per op, which is most of what the C++
# runtime adds on models of tiny ops, and a plan only steers evictions. So, being the
# default policy, "adaptive" records a step only when a plan can matter: never in a
# block with no limit, and not in a block whose previous adaptive block (same thread,
# runtime kind and device) evicted nothing for memory. Such a block runs as msps_sqrt
# (lookahead's score with no plan is exactly msps_sqrt's), and if it does evict, the
# next block records again and the one after it follows a plan: a budget that starts
# to bind costs one step without a plan. (A block with no limit says nothing about
# whether a limited one would evict, so it leaves that as it was.) Policy
# "lookahead" always records.
_PROBE_FIRST = 8
_PROBE_MAX = 256


class _Choice:
    __slots__ = ("cost", "steps", "interval", "next_probe", "pending", "evicted")

    def __init__(self):
        self.cost = {True: None, False: None}  # recomputed cost of the last step with / without a plan
        self.steps = 0
        self.interval = _PROBE_FIRST
        self.next_probe = _PROBE_FIRST
        self.pending = None  # (followed, probe) of the block running now
        self.evicted = True  # whether the last block evicted for memory (Note [When adaptive records])


def _choices() -> Dict[tuple, _Choice]:
    d = getattr(_local, "choices", None)
    if d is None:
        d = _local.choices = {}
    return d


def plan_for_block(kind: str, device, adaptive: bool = False) -> Optional[object]:
    """The plan a lookahead block opening now follows (None: none, score as msps_sqrt)."""
    plan = take(kind, device)
    if not adaptive:
        return plan
    c = _choices().setdefault(_key(kind, device), _Choice())
    c.steps += 1
    if plan is None:
        follow, probe = False, False
    elif c.cost[True] is None or c.cost[False] is None:
        follow, probe = c.cost[True] is None, True  # measure the choice not measured yet
    else:
        best = c.cost[True] <= c.cost[False]
        probe = c.steps >= c.next_probe
        follow = (not best) if probe else best
    c.pending = (follow, probe)
    return plan if follow else None


# Note [A plan that loses is dropped]
# Once a step has measured both choices, the recomputed cost of the last step without
# a plan is what following one has to beat. A block that follows a plan stops
# following it (every next use cleared, as when the step diverges: msps_sqrt's scores
# from there) at the first op after its own recomputations pass that cost: by then
# it has lost, and each further op steered by the plan can only lose more. So a probe
# of a plan that thrashes (bench's ResNet at 0.43 of eager's peak: 673 recomputations
# per step with the plan against 101 without) costs about one step's recomputation
# more than not probing, not several times the step, and it is then reported as lost.
def recompute_limit(kind: str, device) -> float:
    """The recomputed cost at which an adaptive block opening now drops its plan
    (+inf: never; Note [A plan that loses is dropped]). Call after plan_for_block."""
    c = _choices().get(_key(kind, device))
    if c is None or c.pending is None or not c.pending[0] or c.cost[False] is None:
        return math.inf
    return c.cost[False]


def records_block(kind: str, device, policy, limit) -> bool:
    """Whether a block opening now with ``policy`` and outer limit ``limit`` (bytes, an
    auto budget, or None: none) records its step (Note [When adaptive records])."""
    from .policies import ADAPTIVE, records_steps

    if not records_steps(policy):
        return False
    if policy != ADAPTIVE:
        return True
    if limit is None:
        return False
    c = _choices().get(_key(kind, device))
    return c is None or c.evicted


def report(kind: str, device, seconds: Optional[float], evictions: int) -> None:
    """An adaptive block closes: its recomputed cost (Stats.recomputed_cost; None when it
    did not record its step) and how many values it evicted for memory."""
    c = _choices().setdefault(_key(kind, device), _Choice())
    c.evicted = evictions > 0
    if seconds is None or c.pending is None:
        return
    (follow, probe), c.pending = c.pending, None
    other = c.cost[not follow]
    c.cost[follow] = seconds
    if probe:
        won = other is None or seconds < other
        c.interval = _PROBE_FIRST if won else min(2 * c.interval, _PROBE_MAX)
        c.next_probe = c.steps + c.interval


def following_plan(kind: str = "cpp", device="cpu") -> Optional[bool]:
    """Whether the adaptive policy's next block would follow its plan (None: no record yet)."""
    c = _choices().get(_key(kind, device))
    if c is None or c.cost[True] is None:
        return None
    return c.cost[False] is None or c.cost[True] <= c.cost[False]


class PyStepPlan:
    """One recorded step of the Python runtime (as csrc/step_plan.h's StepPlan):
    ``ops[k]``: (op name, tensors read); ``start[k]``: op k's start on the plan's
    clock (the summed run time of the ops before it); ``uses[id]``: the ops that
    read storage ``id``, ascending (``len(ops)``: referenced at the end). Ids: 2n
    for the n-th storage the step created, 2n + 1 for the n-th storage from
    before the step that it read."""

    __slots__ = ("ops", "start", "end", "uses")

    def __init__(self):
        self.ops: List[Tuple[str, int]] = []
        self.start: List[float] = []
        self.end = 0.0
        self.uses: Dict[int, List[int]] = {}

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    @property
    def num_storages(self) -> int:
        return len(self.uses)

    def start_of(self, k: int) -> float:
        return self.start[k] if k < len(self.start) else self.end

    def next_use_after(self, pid: int, k: int) -> float:
        lst = self.uses.get(pid)
        if not lst:
            return math.inf
        i = bisect.bisect_right(lst, k)
        return self.start_of(lst[i]) if i < len(lst) else math.inf

    def __repr__(self) -> str:
        return f"dtr.step_plan.PyStepPlan({len(self.ops)} ops, {len(self.uses)} storages)"


class StepRecorder:
    """Records one step of the Python runtime while following the previous one;
    the same steps as csrc/step_plan.cpp's StepRecorder."""

    def __init__(self, plan: Optional[PyStepPlan], first_sid: int, op_clock: float, live,
                 recompute_until: float = math.inf):
        # ``live``: the runtime's storages by id (those in its pool), read, never changed.
        # ``recompute_until``: the pool's recomputed cost at which the plan is dropped
        # (Note [A plan that loses is dropped]).
        self.live = live
        self.recompute_until = recompute_until
        self.plan = plan
        self.rec = PyStepPlan()
        self.first_sid = first_sid
        self.clock0 = op_clock
        self.next_op = 0
        self.diverged_at = -1
        self._prior: Dict[int, int] = {}

    @property
    def following(self) -> bool:
        return self.plan is not None and self.diverged_at < 0

    def followed_ops(self) -> int:
        if self.diverged_at >= 0:
            return self.diverged_at
        return self.next_op if self.plan is not None else 0

    def _id(self, sid: int) -> int:
        if sid >= self.first_sid:
            return 2 * (sid - self.first_sid)
        n = self._prior.setdefault(sid, len(self._prior))
        return 2 * n + 1

    def begin_op(self, pool, name: str, tensors: int, op_clock: float) -> int:
        k = self.next_op
        self.next_op += 1
        key = (name, tensors)
        self.rec.ops.append(key)
        self.rec.start.append(op_clock - self.clock0)
        plan = self.plan
        if self.following and (k >= len(plan.ops) or plan.ops[k] != key
                               or pool.recomputed_cost > self.recompute_until):
            # The step left the recorded one, or following it already cost more than not
            # (Note [A plan that loses is dropped]): score without it from here.
            self.diverged_at = k
            for sid in list(self.live):
                pool.set_next_use(sid, math.nan)
        return k

    def storage_created(self, pool, sid: int) -> None:
        if self.following:
            self._set_next_use(pool, sid, self.next_op - 1)

    def end_op(self, pool, k: int, read_sids) -> None:
        uses = self.rec.uses
        for sid in read_sids:
            lst = uses.setdefault(self._id(sid), [])
            if not lst or lst[-1] != k:
                lst.append(k)
        if not self.following:
            return
        pool.plan_clock = self.plan.start_of(k + 1)
        for sid in read_sids:
            self._set_next_use(pool, sid, k)

    def _set_next_use(self, pool, sid: int, k: int) -> None:
        if sid in self.live:
            pool.set_next_use(sid, self.plan.next_use_after(self._id(sid), k))

    def finish(self, live_sids, op_clock: float) -> PyStepPlan:
        rec = self.rec
        rec.end = op_clock - self.clock0
        end = len(rec.ops)
        for sid in live_sids:
            lst = rec.uses.setdefault(self._id(sid), [])
            if not lst or lst[-1] != end:
                lst.append(end)
        self.rec = PyStepPlan()
        return rec
