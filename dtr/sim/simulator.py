"""Replay an op trace under a memory budget with any eviction policy.

The simulator drives the same pool as the runtime (``dtr.policies.make_pool``):
one pool entry per *storage* (views share their base's storage), parents =
the storages of the op's inputs, a logical clock that advances by each op's
recorded time, locks on an op's inputs while it (or a recomputation) runs, and
eviction *before* the op so that the live bytes plus the op's outputs fit.
Which storage is evicted is always the pool's ``choose_victim``.

Semantics (see docs/simulator.md for the reasoning):

* CONSTANT: a pinned storage (``evictable=False``), counted in memory.
* COPY / RELEASE / COPY_FROM: handles. A storage's external count is the
  number of live handles to any of its values (base or views). When it drops
  to zero the storage is evicted at once (eager eviction) but its recipe is
  kept, so that values depending on it can still be recomputed.
* CALL: ``ALIAS k`` outputs are views of argument k's storage (no bytes; the
  view op's time is added to the storage's cost, as the runtime does). A view
  is undefined after its storage is evicted and its view op is rerun when it
  is needed again.
* MUTATE (``mutation="runtime"``, the default): as the runtime's
  Note [In-place ops]: the written storage's old value is evicted (its memory
  now belongs to the new value) and a *new* storage computed by
  "clone the old one, apply the op" replaces it; every handle to the old
  storage or its views is rebound to the new one. A pinned (constant) target
  is written in place. Recomputing the new storage takes the old value's
  memory over when nothing else can read it, else allocates a copy (the
  runtime's Note [Stealing on recompute]); either way its bytes are counted. ``mutation="simrd"`` follows the paper's simulator:
  the op makes a new storage of the target's size, only the written handle
  moves to it, and the old value loses that handle.
* A ``Plan`` (dtr/sim/plan.py): the replay tells the pool when each storage
  it touches is needed next, for the ``lookahead`` policy, until the step
  diverges from the plan.
* ``pin_outputs``: at the end, every value that still has a handle is
  rematerialized (and counted), as the paper's simulator did.

Overhead = (trace op time + recomputation time) / trace op time.
"""
from __future__ import annotations

import gc
import math
import sys
import time as _time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Union

from ..policies import ADAPTIVE, DEFAULT_POLICY, SearchOptions, make_pool, name_of
from .plan import Plan
from .trace import Annotate, Call, Constant, Copy, CopyFrom, Mutate, Release, Trace, load

__all__ = ["SimOptions", "SimResult", "Simulator", "simulate", "baseline_peak", "make_plan",
           "OutOfBudget", "OverheadExceeded"]


# Ops whose result the runtime treats as the very value of its argument (OpInfo.alias_ok
# in dtr/ops.py): a new wrapper of the same cell, no view recipe. None of the paper's
# traces has them; recorded traces have many (autograd saves detached outputs).
_SAME_VALUE_OPS = frozenset(("detach", "alias"))


class OutOfBudget(Exception):
    """No evictable storage is left and the budget still cannot be met."""


class OverheadExceeded(Exception):
    """Recomputation passed the overhead limit."""


@dataclass(frozen=True)
class SimOptions:
    """How the replay treats the trace (defaults: the runtime's semantics).

    ``access``: ``"runtime"``: an op's inputs and outputs are touched at the
    clock after it runs and a recomputed storage counts as just accessed (what
    dtr/runtime.py does); ``"simrd"``: inputs are touched at the clock before
    the op and recomputation does not refresh a storage's last access (what
    the paper's simulator did).
    ``collect_dead``: remove a storage from the pool once no live value can
    ever need it (no handle, and no kept storage recomputes from it): the
    runtime's reference counting. False keeps every recipe forever (simrd).
    ``lock_defined_first``: lock an op's resident inputs before recomputing
    its evicted ones (simrd) instead of materializing and locking them in
    argument order (the runtime).
    ``evict_dead_inputs``: after an op (or recomputation) a storage without
    handles that was recomputed only to serve as its input is evicted at once;
    False (the runtime's Note [Eager eviction], and simrd) leaves it resident
    until memory pressure evicts it.
    ``overhead_limit``: stop (status ">2x") once total time passes this
    multiple of the trace's op time; None: never.
    """

    mutation: str = "runtime"
    access: str = "runtime"
    collect_dead: bool = True
    pin_outputs: bool = True
    lock_defined_first: bool = False
    evict_dead_inputs: bool = False
    # Handles whose values are pinned when the CALL making them runs: what the runtime
    # escapes (a leaf's accumulated gradient, Note [Plain gradients] in dtr/runtime.py),
    # which a recorded trace does not mark. bench/sim_vs_runtime.py names them.
    escaped: tuple = ()
    overhead_limit: Optional[float] = 2.0

    @staticmethod
    def eager() -> "SimOptions":
        """The runtime's semantics plus eager eviction of recomputed values that
        no handle refers to, right after the op that needed them (our
        proposed change; see docs/simulator.md)."""
        return SimOptions(evict_dead_inputs=True)

    @staticmethod
    def paper() -> "SimOptions":
        """The paper's simulator (simrd RuntimeV2EagerOptimized) as closely as we model it."""
        return SimOptions(mutation="simrd", access="simrd", collect_dead=False, pin_outputs=True,
                          lock_defined_first=True, evict_dead_inputs=False)


@dataclass
class SimResult:
    trace: str
    policy: str
    budget_ratio: Optional[float]
    budget_bytes: Optional[int]
    baseline_peak: int
    op_time: float
    total_time: float
    overhead: float
    feasible: bool
    status: str  # "ok", "oom", ">2x"
    peak_bytes: int
    evictions: int
    eager_evictions: int
    rematerializations: int
    remat_time: float
    ops: int
    wall_s: float = 0.0
    options: dict = field(default_factory=dict)
    # The pool's summed cost of the storages it rematerialized (the runtime's
    # Stats.recomputed_cost: a storage's cost includes its views' and, for an
    # in-place result, its old value's), on the scoring clock.
    recomputed_cost: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class _Storage:
    __slots__ = ("sid", "nbytes", "resident", "ext", "pinned", "root", "parents", "kept_children",
                 "alive", "views")

    def __init__(self, sid, nbytes, pinned, parents):
        self.sid = sid
        self.nbytes = nbytes
        self.resident = True
        self.ext = 0
        self.pinned = pinned
        self.root = None
        self.parents = parents
        self.kept_children = 0
        self.alive = True  # still in the pool
        self.views: List[_Value] = []  # views of it: undefined after it is evicted


class _Op:
    __slots__ = ("name", "cost", "score", "args", "outputs", "out_bytes", "bases", "scratch")

    def __init__(self, name, cost, args, score=None, scratch=0):
        self.name = name
        self.cost = cost  # what a recompute is charged: the recorded time
        self.score = cost if score is None else score  # what the pool and clock see
        self.args = args
        self.outputs: List[_Value] = []
        self.out_bytes = 0
        self.scratch = scratch  # Note [Op scratch in traces]: room made before every run
        # An in-place op under runtime semantics: the old storages it writes,
        # whose memory a recompute may take over (Note [Stealing on recompute]).
        self.bases: Optional[List[_Storage]] = None


class _Value:
    __slots__ = ("storage", "op", "is_view", "defined")

    def __init__(self, storage, op, is_view):
        self.storage = storage
        self.op = op
        self.is_view = is_view
        self.defined = True


class Simulator:
    """One replay of one trace under one budget and policy."""

    def __init__(self, budget: Optional[int], policy=DEFAULT_POLICY,
                 search: SearchOptions = SearchOptions(), options: SimOptions = SimOptions(),
                 op_time: Optional[float] = None, pool_impl: str = "auto",
                 plan: Optional[Plan] = None, record_plan: bool = False,
                 score_cost: Optional[Callable[[Union[Call, Mutate]], float]] = None):
        self.budget = budget
        # Note [Scoring with estimated costs]
        # The pool scores, and the logical clock advances, by score_cost(instr)
        # (ns) when given: what the runtime does on CUDA, where it estimates an
        # op's cost rather than timing it (dtr/cost.py). Recomputations are
        # still charged the recorded time, so a replay shows what the estimate's
        # choices cost in real time.
        self._score_fn = score_cost
        # The previous step's accesses (see dtr/sim/plan.py): followed while the
        # step matches it, or recorded into a new Plan.
        self.plan = plan
        self.recorded_plan = Plan() if record_plan else None
        self.diverged_at: Optional[int] = None
        self._op_index = 0
        self._plan_clock = 0.0
        self.policy = policy
        self.pool = make_pool(policy, search, pool_impl)
        self.opt = options
        self.clock = 0.0
        self.mem = 0
        self.peak = 0
        self.evictions = 0
        self.eager_evictions = 0
        self.remats = 0
        self.remat_time = 0.0
        self.ops = 0
        self.handles: Dict[str, _Value] = {}
        self.storages: Dict[int, _Storage] = {}
        self._next_sid = 0
        self._op_time = op_time
        self._remat_limit = (math.inf if options.overhead_limit is None or op_time is None
                             else (options.overhead_limit - 1.0) * op_time)
        self._simrd_access = options.access == "simrd"
        self._escaped = frozenset(options.escaped)
        if options.access not in ("runtime", "simrd"):
            raise ValueError(f"dtr.sim: unknown access mode {options.access!r}")
        if options.mutation not in ("runtime", "simrd"):
            raise ValueError(f"dtr.sim: unknown mutation mode {options.mutation!r}")

    def _score(self, ins) -> float:
        return ins.time if self._score_fn is None else self._score_fn(ins)

    # ------------------------------------------------------------------
    def _new_storage(self, nbytes, cost, pinned, parents: List[_Storage]) -> _Storage:
        sid = self._next_sid
        self._next_sid += 1
        s = _Storage(sid, nbytes, pinned, parents)
        self.storages[sid] = s
        self.pool.add(sid, nbytes, cost, self.clock, not pinned, [p.sid for p in parents])
        if self.opt.collect_dead:
            seen = set()
            for p in parents:
                if p.sid not in seen:
                    seen.add(p.sid)
                    p.kept_children += 1
        return s

    def _note_peak(self):
        if self.mem > self.peak:
            self.peak = self.mem

    def _evict(self, s: _Storage):
        s.resident = False
        for v in s.views:
            v.defined = False
        self.pool.evicted(s.sid)
        self.mem -= s.nbytes
        self.evictions += 1

    def make_room(self, need: int):
        budget = self.budget
        if budget is None or self.mem + need <= budget:
            return
        pool = self.pool
        storages = self.storages
        while self.mem + need > budget:
            sid = pool.choose_victim(self.clock)
            if sid is None:
                raise OutOfBudget(f"cannot fit {need} bytes on top of {self.mem} under {budget}")
            self._evict(storages[sid])

    def _make_room_to_run(self, need: int, scratch: int):
        """Room for an op's new bytes and its scratch (Note [Op scratch in traces]), as the
        runtime makes before every run and recompute; the scratch counts in the peak
        while the op runs and is freed after it."""
        self.make_room(need + scratch)
        if scratch and self.mem + need + scratch > self.peak:
            self.peak = self.mem + need + scratch

    def _release_storage(self, s: _Storage, n: int = 1):
        s.ext -= n
        if s.ext == 0:
            if s.resident and not s.pinned and not self.pool.locks(s.sid):
                self._evict(s)
                self.evictions -= 1
                self.eager_evictions += 1
            if self.opt.collect_dead:
                self._maybe_collect(s)

    def _maybe_collect(self, s: _Storage):
        stack = [s]
        while stack:
            s = stack.pop()
            if not s.alive or s.ext > 0 or s.kept_children > 0 or s.pinned:
                continue
            if s.resident:
                if self.pool.locks(s.sid):
                    continue
                self._evict(s)
                self.evictions -= 1
                self.eager_evictions += 1
            s.alive = False
            self.pool.remove(s.sid)
            del self.storages[s.sid]
            seen = set()
            for p in s.parents:
                if p.sid not in seen:
                    seen.add(p.sid)
                    p.kept_children -= 1
                    if p.kept_children == 0 and p.ext == 0:
                        stack.append(p)

    # ------------------------------------------------------------------
    def _is_defined(self, v: _Value) -> bool:
        s = v.storage
        if not s.resident:
            return False
        return True if not v.is_view else v.defined

    def _acquire(self, args) -> List[_Storage]:
        """Make args defined and lock their storages; returns the locked storages."""
        pool = self.pool
        locked = []
        if self.opt.lock_defined_first:
            # simrd: lock the defined inputs first, then rematerialize the others.
            for a in args:
                if self._is_defined(a):
                    pool.lock(a.storage.sid)
                    locked.append(a.storage)
            for a in args:
                if not self._is_defined(a):
                    if any(a.storage is s for s in locked):
                        # A view of a locked (resident) storage: only its view op reruns.
                        pass
                    self._materialize(a)
                    pool.lock(a.storage.sid)
                    locked.append(a.storage)
            return locked
        for a in args:
            if not self._is_defined(a):
                self._materialize(a)
            pool.lock(a.storage.sid)
            locked.append(a.storage)
        return locked

    def _run_op(self, op: _Op, remat: bool):
        """Make op's inputs resident (recursively), lock them, make room, run."""
        pool = self.pool
        locked = self._acquire(op.args)
        try:
            if self._simrd_access:
                for s in locked:
                    pool.touch(s.sid, self.clock)
            need = op.out_bytes
            stolen = self._stealable_bases(op, locked) if remat and op.bases else ()
            self._make_room_to_run(need - sum(b.nbytes for b in stolen), op.scratch)
            for b in stolen:
                # The recompute writes into the old value, as the runtime does.
                self._evict(b)
                self.evictions -= 1
            self.clock += op.score
            if remat:
                self.remat_time += op.cost
                self.remats += 1
            self.mem += need
            self._note_peak()
            now = self.clock
            for o in op.outputs:
                s = o.storage
                if o.is_view:
                    o.defined = True
                    continue
                if not s.alive:
                    self.mem -= s.nbytes  # a collected sibling: transient only
                    continue
                if s.resident:
                    if remat:
                        self.mem -= s.nbytes  # already there: the duplicate is dropped
                    continue
                # A recomputed output.
                old = pool.last_access(s.sid) if self._simrd_access else None
                s.resident = True
                pool.rematerialized(s.sid, now)
                if old is not None:
                    pool.touch(s.sid, old)
            if not self._simrd_access:
                for s in locked:
                    pool.touch(s.sid, now)
        finally:
            for s in locked:
                pool.unlock(s.sid)
            for s in locked:
                if (self.opt.evict_dead_inputs and s.ext == 0 and s.resident and not s.pinned
                        and not pool.locks(s.sid)):
                    # A dead input recomputed only for this op.
                    self._evict(s)
                    self.evictions -= 1
                    self.eager_evictions += 1
                    if self.opt.collect_dead:
                        self._maybe_collect(s)
        if remat and self.remat_time > self._remat_limit:
            raise OverheadExceeded()

    def _stealable_bases(self, op: _Op, locked: List[_Storage]) -> List[_Storage]:
        # See Note [Stealing on recompute] in dtr/runtime.py: recomputing an
        # in-place op under runtime semantics takes over the old value's memory
        # when nothing else can read it (no handle, not pinned, locked only by
        # this recompute); otherwise it writes into a copy, which needs the
        # bytes. Charging neither (the replay before this) undercounted memory.
        out = []
        for b in op.bases:
            if (b.resident and not b.pinned and b.ext == 0
                    and self.pool.locks(b.sid) == sum(1 for s in locked if s is b)
                    and not any(b is o for o in out)):
                out.append(b)
        return out

    def _materialize(self, v: _Value):
        op = v.op
        if op is None:
            raise RuntimeError("dtr.sim: internal error: a constant was evicted")
        # A view reruns its view op, after its base is made resident by the
        # recursive materialization of the op's inputs.
        self._run_op(op, remat=True)

    # ------------------------------------------------------------------
    def run_trace(self, trace: Union[Trace, Sequence]):
        # The replay allocates many small objects that live until it ends: the
        # cyclic GC would rescan them over and over (it took a third of the time).
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._run_trace(trace)
        finally:
            if enabled:
                gc.enable()

    def _run_trace(self, trace: Union[Trace, Sequence]):
        instrs = trace.instrs if isinstance(trace, Trace) else trace
        if sys.getrecursionlimit() < 200000:
            sys.setrecursionlimit(200000)
        handles = self.handles
        for ins in instrs:
            t = type(ins)
            if t is Release:
                v = handles.pop(ins.name, None)
                if v is not None:
                    self._release_storage(v.storage)
            elif t is Copy:
                v = handles[ins.src]
                if ins.dst in handles:
                    self._release_storage(handles[ins.dst].storage)
                handles[ins.dst] = v
                v.storage.ext += 1
            elif t is Call:
                self._call(ins)
            elif t is Constant:
                s = self._new_storage(ins.size, 0.0, True, [])
                v = _Value(s, None, False)
                s.root = v
                self.mem += ins.size
                self._note_peak()
                if ins.name in handles:
                    self._release_storage(handles[ins.name].storage)
                handles[ins.name] = v
                s.ext += 1
            elif t is CopyFrom:
                v = handles[ins.src]
                v.storage.ext += 1
                old = handles.get(ins.dst)
                handles[ins.dst] = v
                if old is not None:
                    self._release_storage(old.storage)
            elif t is Mutate:
                self._mutate(ins)
            elif t is Annotate:
                pass
            else:  # pragma: no cover
                raise TypeError(f"dtr.sim: unknown instruction {ins!r}")
        if self.recorded_plan is not None:
            # What is still referenced is needed at the end (as the runtime's plans).
            self.recorded_plan.log_end(self._plan_clock, [v.storage.sid for v in handles.values()])
        if self.opt.pin_outputs:
            for v in list(handles.values()):
                if not self._is_defined(v):
                    self._materialize(v)
                self.pool.pin(v.storage.sid)

    def _follow_plan(self, ins, args: List[_Value], outs: List[_Storage]) -> None:
        """After an op: record it, or tell the pool when what it touched is needed next."""
        key = (ins.name, len(ins.args))
        k = self._op_index
        self._op_index += 1
        start = self._plan_clock
        self._plan_clock += self._score(ins)
        if self.recorded_plan is not None:
            self.recorded_plan.log_op(key, start, [a.storage.sid for a in args])
        plan = self.plan
        if plan is None or self.diverged_at is not None:
            return
        pool = self.pool
        if not plan.matches(k, key):
            # The step left the recorded one: nothing known about the future.
            self.diverged_at = k
            for st in self.storages.values():
                if st.alive:
                    pool.set_next_use(st.sid, math.nan)
            return
        pool.plan_clock = self._plan_clock
        seen = set()
        for st in [a.storage for a in args] + outs:
            if st.sid in seen or not st.alive:
                continue
            seen.add(st.sid)
            pool.set_next_use(st.sid, plan.next_use_after(st.sid, k))

    def _call(self, ins: Call):
        handles = self.handles
        args = [handles[a] for a in ins.args]
        score = self._score(ins)
        op = _Op(ins.name, ins.time, args, score, ins.scratch)
        self.ops += 1
        parents = []
        for a in args:
            if a.storage not in parents:
                parents.append(a.storage)
        # Run first (inputs resident and locked, room made), then create outputs.
        out_bytes = 0
        for k, size in zip(ins.aliases, ins.sizes):
            if k < 0:
                out_bytes += size
        op.out_bytes = out_bytes
        pool = self.pool
        locked = self._acquire(args)
        try:
            if self._simrd_access:
                for s in locked:
                    pool.touch(s.sid, self.clock)
            self._make_room_to_run(out_bytes, op.scratch)
            self.clock += score
            now = self.clock
            self.mem += out_bytes
            self._note_peak()
            same_value = ins.name in _SAME_VALUE_OPS and self.opt.mutation != "simrd"
            for name, k, size in zip(ins.results, ins.aliases, ins.sizes):
                if k >= 0 and same_value:
                    # The runtime's alias_ok ops (detach, alias): a new handle to the
                    # same value; nothing to rerun when it is needed again, no cost.
                    v = args[k]
                    if name in handles:
                        self._release_storage(handles[name].storage)
                    handles[name] = v
                    v.storage.ext += 1
                    pool.touch(v.storage.sid, now)
                    continue
                if k >= 0:
                    base = args[k].storage
                    v = _Value(base, op, True)
                    base.views.append(v)
                    pool.add_cost(base.sid, score)
                else:
                    s = self._new_storage(size, score, False, parents)
                    v = _Value(s, op, False)
                    s.root = v
                op.outputs.append(v)
                if name in handles:
                    self._release_storage(handles[name].storage)
                handles[name] = v
                v.storage.ext += 1
                pool.touch(v.storage.sid, now)
                if name in self._escaped and not v.storage.pinned:
                    v.storage.pinned = True
                    pool.pin(v.storage.sid)
            if not self._simrd_access:
                for s in locked:
                    pool.touch(s.sid, now)
        finally:
            for s in locked:
                pool.unlock(s.sid)
        if self.plan is not None or self.recorded_plan is not None:
            self._follow_plan(ins, args, [o.storage for o in op.outputs])

    def _mutate(self, ins: Mutate):
        handles = self.handles
        args = [handles[a] for a in ins.args]
        self.ops += 1
        pool = self.pool
        parents = []
        for a in args:
            if a.storage not in parents:
                parents.append(a.storage)
        simrd = self.opt.mutation == "simrd"
        targets = []
        for m in ins.mutate:
            s = args[m].storage
            if s.pinned and not simrd:
                continue  # a constant written in place stays a constant
            if any(s is t for t in targets):
                continue
            targets.append(s)
        out_bytes = sum(s.nbytes for s in targets) if simrd else 0
        score = self._score(ins)
        op = _Op(ins.name, ins.time, args, score, ins.scratch)
        # A recompute allocates the written storages (less what it steals).
        op.out_bytes = sum(s.nbytes for s in targets)
        if not simrd:
            op.bases = targets
        locked = self._acquire(args)
        self._pending_release = []
        try:
            if self._simrd_access:
                for s in locked:
                    pool.touch(s.sid, self.clock)
            self._make_room_to_run(out_bytes, op.scratch)
            self.clock += score
            now = self.clock
            self.mem += out_bytes
            self._note_peak()
            for old in targets:
                cost = score if simrd else score + pool.cost(old.sid)
                new = self._new_storage(old.nbytes, cost, False, parents)
                nv = _Value(new, op, False)
                new.root = nv
                op.outputs.append(nv)
                pool.touch(new.sid, now)
                if not simrd:
                    # The memory moves to the new storage: the old value is gone.
                    self.mem += new.nbytes
                    pool.unlock(old.sid)
                    self._evict(old)
                    self.evictions -= 1
                    pool.lock(old.sid)
                self._rebind(ins, old, new, nv, simrd)
            if not self._simrd_access:
                for s in locked:
                    pool.touch(s.sid, now)
        finally:
            for s in locked:
                pool.unlock(s.sid)
            for s in locked:
                if s.ext == 0 and s.alive:
                    if (s.resident and not s.pinned and not pool.locks(s.sid)
                            and self.opt.evict_dead_inputs):
                        self._evict(s)
                        self.evictions -= 1
                        self.eager_evictions += 1
                    if self.opt.collect_dead:
                        self._maybe_collect(s)
        # simrd: the written handle left the old value (a RELEASE after the op).
        for s in self._pending_release:
            self._release_storage(s)
        if self.plan is not None or self.recorded_plan is not None:
            self._follow_plan(ins, args, [o.storage for o in op.outputs])
        self._note_peak()

    def _rebind(self, ins: Mutate, old: _Storage, new: _Storage, new_root: _Value, simrd: bool):
        handles = self.handles
        if simrd:
            # Only the written handles move; the old value loses them.
            for m in ins.mutate:
                name = ins.args[m]
                v = handles.get(name)
                if v is not None and v.storage is old:
                    handles[name] = new_root
                    new.ext += 1
                    self._pending_release.append(old)
            return
        memo = {id(old.root): new_root}

        def translate(v: _Value) -> _Value:
            got = memo.get(id(v))
            if got is not None:
                return got
            vop = v.op
            if not v.is_view or vop is None:
                memo[id(v)] = new_root
                return new_root
            # A view: rerun its view op on the translated parent.
            idx = next((i for i, a in enumerate(vop.args) if a.storage is old), None)
            nargs = list(vop.args)
            if idx is not None:
                nargs[idx] = translate(vop.args[idx])
            nop = _Op(vop.name, vop.cost, nargs, vop.score, vop.scratch)
            nv = _Value(new, nop, True)
            nv.defined = False
            new.views.append(nv)
            nop.outputs.append(nv)
            memo[id(v)] = nv
            return nv

        for name, v in list(handles.items()):
            if v.storage is old:
                handles[name] = translate(v)
                new.ext += 1
                old.ext -= 1

    # ------------------------------------------------------------------
    def result(self, trace_name: str, op_time: float, baseline: int, ratio, status: str,
               wall: float) -> SimResult:
        total = op_time + self.remat_time
        pol = name_of(self.policy) or getattr(self.policy, "__name__", "custom")
        return SimResult(
            trace=trace_name, policy=pol, budget_ratio=ratio, budget_bytes=self.budget,
            baseline_peak=baseline, op_time=op_time, total_time=total,
            overhead=total / op_time if op_time else 1.0, feasible=status == "ok", status=status,
            peak_bytes=self.peak, evictions=self.evictions, eager_evictions=self.eager_evictions,
            rematerializations=self.remats, remat_time=self.remat_time, ops=self.ops, wall_s=wall,
            options=asdict(self.opt), recomputed_cost=float(self.pool.recomputed_cost),
        )


def baseline_peak(trace: Trace, options: SimOptions = SimOptions()) -> int:
    """The peak of live bytes when nothing is ever evicted for memory."""
    key = ("baseline", len(trace.instrs), options.mutation, options.collect_dead)
    got = trace.cache.get(key)
    if got is None:
        sim = Simulator(None, "lru", options=options)
        sim.run_trace(trace)
        got = trace.cache[key] = sim.peak
    return got



def make_plan(trace: Trace, options: SimOptions = SimOptions(), score_cost=None) -> Plan:
    """The accesses of one replay of ``trace`` with no budget: the plan a step
    identical to this one would follow (on the clock of ``score_cost``)."""
    key = ("plan", len(trace.instrs), asdict(options).__repr__(), score_cost)
    got = trace.cache.get(key)
    if got is None:
        sim = Simulator(None, "lru", options=options, record_plan=True, score_cost=score_cost)
        sim.run_trace(trace)
        got = trace.cache[key] = sim.recorded_plan
    return got


def simulate(trace: Union[Trace, str], budget: Union[None, float, int] = None, policy=DEFAULT_POLICY,
             search: SearchOptions = SearchOptions(), options: SimOptions = SimOptions(),
             ratio: Optional[float] = None, pool_impl: str = "auto",
             plan: Union[None, bool, Plan] = None,
             score_cost: Optional[Callable[[Union[Call, Mutate]], float]] = None) -> SimResult:
    """Replay ``trace`` (a Trace or a path) under a budget.

    ``ratio``: budget as a fraction of the trace's baseline peak; or ``budget``
    in bytes (None: unlimited). ``pool_impl``: as ``dtr.policies.make_pool``
    ("auto": the C++ pool for the policies it implements; both pools make the
    same decisions, the C++ one 15-50x faster on these replays).
    ``plan``: the previous step's accesses for the ``lookahead`` policy (see
    dtr/sim/plan.py); None: for ``lookahead``, the trace's own (the previous
    step was the same), else none; False: none (lookahead is then msps_sqrt).
    ``score_cost``: the cost (ns) the pool scores an op with, from its CALL or
    MUTATE record; default its recorded time (Note [Scoring with estimated
    costs]; dtr.sim.costs has the roofline and bytes-only estimates).
    """
    if isinstance(trace, str):
        trace = load(trace)
    if policy == ADAPTIVE:
        return _simulate_adaptive(trace, budget, search, options, ratio, pool_impl, plan, score_cost)
    base = baseline_peak(trace, options)
    if ratio is not None:
        budget = int(base * ratio)
    op_time = trace.op_time
    if plan is None:
        plan = policy == "lookahead"
    if plan is True:
        plan = make_plan(trace, options, score_cost)
    sim = Simulator(budget, policy, search, options, op_time=op_time, pool_impl=pool_impl,
                    plan=plan or None, score_cost=score_cost)
    t0 = _time.perf_counter()
    status = "ok"
    try:
        sim.run_trace(trace)
    except OutOfBudget:
        status = "oom"
    except OverheadExceeded:
        status = ">2x"
    return sim.result(trace.name, op_time, base, ratio, status, _time.perf_counter() - t0)


def _simulate_adaptive(trace, budget, search, options, ratio, pool_impl, plan, score_cost) -> SimResult:
    # Note [Adaptive lookahead]: on a step that repeats, the runtime settles on following
    # the previous step's plan or not, whichever recomputed less (it probes the other
    # choice now and then, one step in 8 to 256). The replay is of that settled step: it
    # runs lookahead with the plan and without one (msps_sqrt's choices) and keeps the
    # one that recomputed less by the runtime's measure, the pool's recomputed cost
    # (ties: the plan, as the runtime); a run that fails (OOM, >2x) loses to one that
    # does not. (Before bench/sim_vs_runtime.py it kept the lesser remat_time, which
    # picked the other side on the U-Net at 0.7.)
    runs = [simulate(trace, budget, "lookahead", search, options, ratio, pool_impl,
                     True if plan is None else plan, score_cost),
            simulate(trace, budget, "lookahead", search, options, ratio, pool_impl, False,
                     score_cost)]
    best = min(runs, key=lambda r: (r.status != "ok", r.recomputed_cost))
    return replace(best, policy=ADAPTIVE, wall_s=sum(r.wall_s for r in runs))
