"""The runtime: materialize inputs -> make room -> run -> record. The only place
where eviction policy meets tensors.

Each intercepted op goes through ``Runtime.dispatch``. See docs/design.md for
the objects; the notes below explain the less obvious decisions.
"""
from __future__ import annotations

import gc
import math
import sys
import threading
import weakref
from dataclasses import dataclass, field, asdict
from typing import Dict, List, Optional

import torch

from . import cost as _cost
from . import device_memory as _devmem
from . import rng as _rng
from .cost import estimate_op, perf_counter
from .policies import ADAPTIVE, DEFAULT_POLICY, records_steps
from .errors import BudgetExceededError, RecomputeError, StaleInputError, UnsupportedOpError
from . import hidden_writes as _hidden_writes
from . import metadata_ops as _metadata_ops
from . import scratch as _scratch
from . import step_plan as _step_plan
from .ops import arg_at, op_info
from .policies import SearchOptions, make_pool
from .records import (FIRST_CELL_PRUNE, Cell, PlainInput, Recipe, Slot, StorageRecord, fill_args,
                      flatten_args, slots_in)
from .tensor import DTRTensor

_MIN_RECURSION = 20000
aten = torch.ops.aten

# See Note [Tiny values].
MIN_EVICTABLE_BYTES = 32


# Output bytes per (op, input metadata, arguments): a property of the op, shared
# by every session so a size learnt once (see Runtime._output_bytes) stays learnt.
_SIZE_CACHE: Dict[tuple, Optional[int]] = {}
_SIZE_CACHE_MAX = 200_000
# Least observed cost per size key; see Note [Stable costs].
_COST_CACHE: Dict[tuple, float] = {}


@dataclass
class Stats:
    """Counters of one session; readable while it runs and after it ends."""

    budget_bytes: Optional[int] = None
    policy: str = DEFAULT_POLICY
    ops: int = 0
    evictions: int = 0
    eager_evictions: int = 0
    rematerializations: int = 0
    remat_seconds: float = 0.0
    search_seconds: float = 0.0
    op_seconds: float = 0.0
    # Bytes in use on the block's device as the runtime saw them at its ops (See
    # Note [The budget is the device's memory]), plus the room made for the op running.
    peak_bytes: int = 0
    tracked_bytes: int = 0
    unplanned_ops: int = 0
    # Ops that ran out of the allocator's memory and were retried after evicting;
    # see Note [Out of memory].
    oom_retries: int = 0
    # 1 once the pool's thrash guard tripped; see Note [Thrash guard] in
    # dtr/policies.py.
    thrash_guard_trips: int = 0
    # The pool's summed cost of what it rematerialized (its recipes' stable costs, not
    # wall time: Note [Adaptive lookahead] compares steps by it).
    recomputed_cost: float = 0.0
    # The lookahead policy (Note [Where step plans live] in dtr/step_plan.py): ops
    # of this block that followed the previous step's plan, and the op where the
    # step left it (-1: it did not, or there was no plan).
    plan_ops: int = 0
    plan_diverged_at: int = -1
    # op name -> [recomputations, seconds running that op (not its inputs' recomputes)]
    remat_by_op: Dict[str, List[float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit} ({n} bytes)"
    return f"{n} bytes"


def allocated_bytes(nbytes: int, device_type: str) -> int:
    """Bytes the device's allocator takes for a storage of ``nbytes``.

    CUDA's caching allocator hands out multiples of 512 bytes (and 512 for
    anything smaller); counting the requested size let small-tensor models
    pass the budget measured by max_memory_allocated by 2%.
    """
    if device_type == "cuda" and nbytes:
        return (nbytes + 511) & ~511
    return nbytes


def _storage_nbytes(t: torch.Tensor) -> int:
    return allocated_bytes(t.untyped_storage().nbytes(), t.device.type)


class Runtime:
    """One pool of evictable values under one memory limit."""

    def __init__(self, budget_bytes=None, policy=DEFAULT_POLICY,
                 search: SearchOptions = SearchOptions(), evict_all: bool = False,
                 pool_impl: str = "auto"):
        # ``budget_bytes``: bytes, None, or an AutoBudget resolved once the device is known.
        # One limit per open block, outermost first; ``limit`` is the tightest resolved one.
        self._limits: List = [budget_bytes]
        self.limit: Optional[int] = budget_bytes if isinstance(budget_bytes, int) else None
        self.policy = policy
        self.pool = make_pool(policy, search, pool_impl)
        _scratch.enable()
        self.stats = Stats(budget_bytes=self.limit,
                           policy=policy if isinstance(policy, str) else getattr(policy, "__name__", "custom"))
        # The block's device and the count of its allocator (None: the runtime's own
        # count, models_memory); see Note [The budget is the device's memory].
        self.device: Optional[torch.device] = None
        self._meter = None
        self.models_memory = True
        self.evict_all = evict_all
        self.lock = threading.RLock()
        self.clock = 0.0
        self._next_sid = 0
        self._records: Dict[int, weakref.ref] = {}
        self.pool_bytes = 0  # resident, non-escaped storages
        self.plain_bytes = 0  # plain tensors the step touched, while alive
        self._plain: Dict[tuple, tuple] = {}
        self._depth = 0
        self._closed_over = weakref.ref(self)
        # Storages recomputed for a recipe that no wrapper refers to; see
        # Note [Eager eviction].
        self._kept: List[weakref.ref] = []
        # Recipe inputs reading plain tensors; see Note [Writes into what recipes read].
        self.readers = _hidden_writes.PlainReaders()
        self.closed = False
        # Set while a lookahead block is open: Note [Where step plans live] in step_plan.py.
        self._step: Optional[_step_plan.StepRecorder] = None
        self._step_key = None  # (device,) while a lookahead or adaptive block is open

    # ------------------------------------------------------------------
    # Accounting
    # ------------------------------------------------------------------
    @property
    def tracked_bytes(self) -> int:
        return self.bytes_in_use()

    @property
    def thrash_guard_trips(self) -> int:
        return self.stats.thrash_guard_trips

    def bytes_in_use(self) -> int:
        """Tensor bytes in use on the block's device (See Note [The budget is the device's memory])."""
        m = self._meter
        if m is None:
            return self.pool_bytes + self.plain_bytes
        return m()

    # ------------------------------------------------------------------
    # The device and the limits of the open blocks
    # ------------------------------------------------------------------
    def bind_device(self, device) -> None:
        """Fix the device whose memory the budget bounds, resolve "auto" limits, check entry.

        Given to ``dtr.budget(device=...)``, or CPU when CUDA is not available, the device is
        bound when the block opens; otherwise by the first plain tensor an op reads.
        """
        dev = torch.device(device)
        if self.device is not None:
            return
        self.device = dev
        self._meter = _devmem.meter_for(dev)
        self.models_memory = self._meter is None
        if self.models_memory and dev.type == "cpu":
            # See Note [The budget is the device's memory]: the fallback counts what lives.
            for t in _devmem.live_cpu_tensors():
                self.count_plain(t)
        self._update_limit()
        self.stats.budget_bytes = self._limits[0]
        self.check_entry()

    def _resolve(self, spec) -> Optional[int]:
        if spec is None or isinstance(spec, int):
            return spec
        if self.device is None:
            return None
        return _devmem.auto_bytes(self.device, spec.fraction, in_use=self.bytes_in_use())

    def _update_limit(self) -> None:
        limit = None
        for i, spec in enumerate(self._limits):
            n = self._resolve(spec)
            if n is not None and self.device is not None:
                self._limits[i] = n  # "auto" is resolved once, when the block's device is known
            if n is not None:
                limit = n if limit is None else min(limit, n)
        self.limit = limit

    def push_limit(self, spec) -> Optional[int]:
        """A nested block opens: its limit tightens the runtime's until ``pop_limit``.
        Returns it in bytes (None for no limit, or "auto" while the device is unknown)."""
        self._limits.append(spec)
        self._update_limit()
        try:
            self.check_entry()
        except BaseException:
            self.pop_limit()
            raise
        got = self._limits[-1]
        return got if isinstance(got, int) else None

    def pop_limit(self) -> None:
        self._limits.pop()
        self._update_limit()

    def tightened(self, spec) -> Optional[int]:
        """The limit ``spec`` would give on top of the current one (for dtr.compile's graphs)."""
        n = self._resolve(spec)
        if n is None:
            return self.limit
        return n if self.limit is None else min(self.limit, n)

    def check_entry(self) -> None:
        """Note [Entry check]

        A block cannot start above its budget: memory in use that dtr cannot
        evict would make every op's check fail with a message about that op.
        Values of this session (a nested block) are evicted first; what is left
        above the budget raises here, naming both numbers, before any op ran.
        """
        limit = self.limit
        if limit is None or self.device is None:
            return
        with self.lock:
            used = self.bytes_in_use()
            while used > limit:
                sid = self.pool.choose_victim(self.clock)
                if sid is None:
                    break
                rec = self._records[sid]()
                if rec is None:  # pragma: no cover - records are removed when they die
                    self.pool.remove(sid)
                    continue
                self._evict(rec)
                used = self.bytes_in_use()
        if used > limit:
            raise entry_error(used, limit, self.device)

    def _note_peak(self, reserved: int = 0) -> None:
        """Record the peak; ``reserved``: room made for an op about to run (outputs, scratch)."""
        t = self.bytes_in_use()
        st = self.stats
        st.tracked_bytes = t
        t += reserved
        if t > st.peak_bytes:
            st.peak_bytes = t

    def _plain_input(self, t: torch.Tensor) -> PlainInput:
        # Note [Inference tensors as recipe inputs]
        # A recipe notices a write into a plain input by its version counter
        # (StaleInputError) or by the write's own dispatch (self.readers). An inference
        # tensor has no counter, and a write in inference mode is the user's: such an
        # input is copied when recorded (as it is, layout and all) and the recipe keeps
        # the copy, which nothing else can write, as a scratch input. Inputs made in
        # inference mode are rare where a block records (autograd cannot save them) and
        # usually small (wrapped numbers). csrc/runtime.cpp does the same.
        if t.is_inference():
            copy = _hidden_writes.exact_copy(t) if t.layout is torch.strided else t.clone()
            self.count_plain(copy)
            return PlainInput(copy, scratch=True)
        inp = PlainInput(t)
        self.readers.add(inp)
        return inp

    def count_plain(self, t: torch.Tensor) -> None:
        """Count a plain tensor's storage while it is alive (see PITFALLS 15), where the runtime
        keeps its own count of the device's memory (models_memory); binds the device."""
        if t.layout is not torch.strided:  # See Note [Sparse tensors]
            for part in _sparse_parts(t):
                self.count_plain(part)
            return
        if t._is_zerotensor():  # an efficient zero tensor holds no memory (its storage has no data)
            return
        if self.device is None:
            self.bind_device(t.device)
        if not self.models_memory:
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr == 0:
            return
        key = (ptr, t.device.type, t.device.index)
        if key in self._plain:
            return
        nb = allocated_bytes(st.nbytes(), t.device.type)
        me = self._closed_over

        def died(_ref, key=key, nb=nb):
            rt = me()
            if rt is not None:
                entry = rt._plain.get(key)
                if entry is not None and entry[0] is _ref:
                    del rt._plain[key]
                    rt.plain_bytes -= nb

        self._plain[key] = (weakref.ref(st, died), nb)
        # Not noted as a peak here: the tensor existed before the runtime saw
        # it, and room for it is made before the op that uses it runs.
        self.plain_bytes += nb

    def _new_storage(self, nbytes: int, cost: float, pinned: bool, parents) -> StorageRecord:
        sid = self._next_sid
        self._next_sid += 1
        rec = StorageRecord(self, sid, nbytes, pinned)
        self._records[sid] = weakref.ref(rec)
        # Note [Tiny values]
        # Evicting a scalar frees nothing worth having, and a scalar loss read
        # after optimizer.step() (loss.item()) could then not be recomputed from
        # the updated parameters. Under budget pressure such values stay;
        # evict_everything (a testing aid) still evicts them.
        evictable = not pinned and (nbytes >= MIN_EVICTABLE_BYTES or self.evict_all)
        self.pool.add(sid, nbytes, cost, self.clock, evictable, parents)
        if self._step is not None:
            self._step.storage_created(self.pool, sid)
        self.pool_bytes += nbytes
        return rec

    def _storage_died(self, rec: StorageRecord) -> None:
        with self.lock:
            self._records.pop(rec.sid, None)
            self.pool.remove(rec.sid)
            if rec.resident and not rec.escaped:
                self.pool_bytes -= rec.nbytes

    # ------------------------------------------------------------------
    # Wrappers (see tensor.py) report to their storage record
    # ------------------------------------------------------------------
    def attach(self, rec: StorageRecord, wrapper) -> None:
        rec.nwrappers += 1
        rec.wrappers.append(weakref.ref(wrapper))

    def detach_wrapper(self, rec: StorageRecord) -> None:
        """A wrapper of ``rec`` died or was rebound elsewhere."""
        with self.lock:
            rec.nwrappers -= 1
            if rec.nwrappers == 0:
                rec.wrappers.clear()
                self._maybe_banish(rec)

    def _maybe_banish(self, rec: StorageRecord) -> None:
        # Note [Eager eviction]
        # When the last wrapper of a storage dies, the value is only needed by
        # recipes: free its memory now and keep the recipes (the paper's eager
        # eviction). Values recomputed for a recipe have no wrapper either, but
        # they are not banished: they stay until memory pressure evicts them,
        # so that the next op needing them does not recompute them again. Once
        # the block has ended there is no more pressure to count on, so they
        # are banished when the block ends and after each later op.
        rec.banish_pending = False
        if rec.nwrappers == 0 and rec.resident and not rec.pinned:
            if self.pool.locks(rec.sid):
                rec.banish_pending = True
            else:
                self._evict(rec, counted=False)
                self.stats.eager_evictions += 1

    def has_live_values(self) -> bool:
        """Whether any value of this runtime is still referenced."""
        return any(ref() is not None for ref in self._records.values())

    def release_kept(self) -> None:
        """Banish the recomputed values that no wrapper refers to."""
        with self.lock:
            kept, self._kept = self._kept, []
            for ref in kept:
                rec = ref()
                if rec is not None and rec.nwrappers == 0:
                    self._maybe_banish(rec)

    def close(self) -> None:
        """The block ended: from now on, keep nothing no wrapper refers to."""
        self.end_step()
        self.closed = True
        self.release_kept()

    # ------------------------------------------------------------------
    # Steps of the lookahead policy (Note [Where step plans live] in step_plan.py)
    # ------------------------------------------------------------------
    def begin_step(self) -> None:
        """The block opened: with policy "lookahead" (or "adaptive", where a plan can
        matter), follow the plan this thread's last such block left for this device and
        record this step."""
        if not records_steps(self.policy):
            return
        with self.lock:
            self._step_key = (self.device,)
            if not _step_plan.records_block("python", self.device, self.policy, self._limits[0]):
                return  # Note [When adaptive records]
            plan = _step_plan.plan_for_block("python", self.device, self.policy == ADAPTIVE)
            self._step = _step_plan.StepRecorder(
                plan, self._next_sid, self.stats.op_seconds, self._records,
                self.pool.recomputed_cost + _step_plan.recompute_limit("python", self.device))
            self.stats.plan_ops, self.stats.plan_diverged_at = 0, -1
            self.pool.plan_clock = 0.0

    def end_step(self) -> None:
        """The block closed: its step becomes the plan of the next lookahead block."""
        with self.lock:
            step, self._step = self._step, None
            if self._step_key is None:
                return
            (key,), self._step_key = self._step_key, None
            if self.policy == ADAPTIVE and self._limits[0] is not None:
                _step_plan.report("python", key, None if step is None else self.stats.recomputed_cost,
                                  self.stats.evictions)
            if step is None:
                return
            self._note_step(step)
            live = [sid for sid, ref in self._records.items()
                    if (rec := ref()) is not None and rec.nwrappers > 0]
            _step_plan.keep("python", key, step.finish(live, self.stats.op_seconds))
            # After the block nothing follows a plan: the online score (msps_sqrt's).
            for sid in list(self._records):
                self.pool.set_next_use(sid, math.nan)

    def _note_step(self, step) -> None:
        self.stats.plan_ops = step.followed_ops()
        self.stats.plan_diverged_at = step.diverged_at

    def known_next_uses(self) -> int:
        """Storages whose next use the pool knows now (lookahead; for tests)."""
        with self.lock:
            return sum(1 for sid in self._records if not math.isnan(self.pool.next_use(sid)))

    # ------------------------------------------------------------------
    # Eviction and recomputation
    # ------------------------------------------------------------------
    def _evict(self, rec: StorageRecord, counted: bool = True) -> None:
        for ref in rec.cells:
            c = ref()
            if c is not None:
                c.value = None
        rec.cells.clear()
        rec.prune_cells_at = FIRST_CELL_PRUNE  # Note [Dead view cells]: from the start again
        rec.resident = False
        self.pool.evicted(rec.sid)
        self.pool_bytes -= rec.nbytes
        if counted:
            self.stats.evictions += 1

    def _set_value(self, cell: Cell, value: torch.Tensor) -> None:
        cell.value = value
        rec = cell.storage
        rec.add_cell(cell)
        if not rec.resident:
            rec.resident = True
            self.pool.rematerialized(rec.sid, self.clock)
            self.pool_bytes += rec.nbytes
            self._note_peak()

    def make_room(self, need: int, opname: str, working: int) -> None:
        """Evict until the device's bytes in use + ``need`` fit the limit, or raise.

        The device's count is read again after each eviction: a value still
        referenced elsewhere frees nothing, and then the next victim must.
        """
        limit = self.limit
        if limit is None:
            return
        used = self.bytes_in_use()
        if used + need <= limit:
            return
        t0 = perf_counter()
        records = self._records
        collected = False
        try:
            while used + need > limit:
                sid = self.pool.choose_victim(self.clock)
                if sid is None:
                    if need and not collected:
                        # Tensors kept alive only by reference cycles count until collected.
                        collected = True
                        gc.collect()
                        used = self.bytes_in_use()
                        continue
                    # Note [Over the budget without dtr]
                    # The device's memory can pass the budget through no op of dtr's: after
                    # the block (an optimizer step, other models) or an op whose output size
                    # could not be planned. An op that allocates nothing cannot make that
                    # worse, and after the block the budget is no promise any more: both
                    # run once everything evictable is evicted. Only an op of an open block
                    # that needs memory raises.
                    if need == 0 or self.closed:
                        return
                    self._raise_budget(need, opname, working, used)
                rec = records[sid]()
                if rec is None:  # pragma: no cover - records are removed when they die
                    self.pool.remove(sid)
                    continue
                self._evict(rec)
                used = self.bytes_in_use()
        finally:
            self.stats.search_seconds += perf_counter() - t0

    def _raise_budget(self, need: int, opname: str, working: int, used: int):
        smallest = used + need
        where = self.device.type if self.device is not None else "the device's"
        raise BudgetExceededError(
            f"dtr: budget of {_fmt(self.limit)} cannot be met at op {opname}: it needs "
            f"{_fmt(need)} for its outputs and scratch on top of {_fmt(used)} of {where} tensor "
            f"memory in use that dtr cannot evict: parameters, gradients, optimizer state, inputs "
            f"and every other live tensor of the device, and of dtr's own values "
            f"{_fmt(self.pool_bytes)} locked by this op or unrecomputable. "
            f"The op's own working set is {_fmt(working)}. The smallest budget that would have "
            f"worked here is at least {_fmt(smallest)}: retry the step with "
            f"dtr.budget({smallest}) or more.",
            op=opname, needed_bytes=need, pinned_bytes=used, budget_bytes=self.limit,
            smallest_feasible_bytes=smallest,
        )

    def _evict_after_oom(self, target: int) -> bool:
        """Evict victims holding at least ``target`` bytes; False when there was none to evict."""
        freed = 0
        records = self._records
        while freed < target:
            sid = self.pool.choose_victim(self.clock)
            if sid is None:
                break
            rec = records[sid]()
            if rec is None:  # pragma: no cover - records are removed when they die
                self.pool.remove(sid)
                continue
            freed += rec.nbytes
            self._evict(rec)
        return freed > 0

    def _retry_after_oom(self, exc: BaseException, opname: str, need: int, run, rng=None):
        """Note [Out of memory]

        The allocator can run out of memory below the budget ("auto" on CUDA
        keeps only a reserve for the caching allocator's fragmentation, and
        other processes share the device). The op has then changed nothing
        (an out-of-place op's outputs are not allocated; in-place ops are not
        retried): evict values holding at least what the op needs, doubling
        each round, and run it again, with its generator set back to the state
        it started from, until it runs or nothing is left to evict, which
        raises BudgetExceededError (MegEngine's threshold-free DTR).
        """
        target = max(need, 1)
        while True:
            if not self._evict_after_oom(target):
                used = self.bytes_in_use()
                raise BudgetExceededError(
                    f"dtr: the allocator ran out of memory at op {opname} with every value dtr "
                    f"could evict evicted ({_fmt(used)} of tensor memory in use, the op needs about "
                    f"{_fmt(need)}): {exc}. Give a smaller budget, a smaller batch, or free "
                    f"tensors before the block.",
                    op=opname, needed_bytes=need, pinned_bytes=used,
                    budget_bytes=self.limit if self.limit is not None else used,
                    smallest_feasible_bytes=used + need,
                ) from exc
            target *= 2
            self.stats.oom_retries += 1
            if rng is not None:
                _rng.reset(rng)
            try:
                return run()
            except torch.OutOfMemoryError as again:
                exc = again

    def _count_new_plain(self, out) -> None:
        """Count plain tensors an op made (optimizer state, factories) where the runtime keeps
        its own count (models_memory)."""
        for o in _flat_outputs(out):
            if isinstance(o, torch.Tensor) and type(o) is not DTRTensor:
                self.count_plain(o)

    def materialize(self, cell: Cell) -> torch.Tensor:
        v = cell.value
        if v is not None:
            return v
        self._depth += 1
        outermost = self._depth == 1
        t0 = perf_counter() if outermost else 0.0
        try:
            if self._depth > sys.getrecursionlimit() // 4:
                sys.setrecursionlimit(max(_MIN_RECURSION, 8 * self._depth))
            self._recompute(cell.recipe, cell)
        finally:
            self._depth -= 1
            if outermost:
                self.stats.remat_seconds += perf_counter() - t0
        if cell.value is None:  # pragma: no cover - guarded by _recompute
            raise RecomputeError(f"dtr: recomputing {cell.recipe} did not produce its value")
        return cell.value

    def _recompute(self, recipe: Recipe, want: Cell) -> None:
        if recipe is None:
            raise RecomputeError(
                "dtr: internal error: an unrecomputable value was evicted; please report this")
        pool = self.pool
        locked: List[StorageRecord] = []
        try:
            vals = []
            for inp in recipe.inputs:
                if type(inp) is Cell:
                    v = self.materialize(inp)
                    rec = inp.storage
                    pool.lock(rec.sid)
                    locked.append(rec)
                    vals.append(v)
                else:
                    vals.append(self._plain_value(inp, recipe))
            info = op_info(recipe.func)
            stolen = self._stealable_bases(recipe, locked) if recipe.mutation is not None else []
            need = recipe.out_bytes - sum(rec.nbytes for rec in stolen)
            need += _scratch.planned(info, recipe.size_key, need, vals)
            if recipe.rng is not None:  # replay saves the current RNG state meanwhile
                need += _rng.host_bytes(recipe.rng.device)
            if need:
                working = need + sum(rec.nbytes for rec in locked)
                self.make_room(need, f"{recipe.func} (recomputing an evicted value)", working)
                self._note_peak(need)  # the reservation is the peak, as for an op's first run
            for rec in stolen:  # Note [Stealing on recompute]: its memory moves to the new value
                self._evict(rec, counted=False)
            t0 = perf_counter()
            try:
                outs = self._run_recipe(recipe, vals)
            except torch.OutOfMemoryError as exc:
                if recipe.mutation is not None:
                    raise
                outs = self._retry_after_oom(exc, f"{recipe.func} (recomputing an evicted value)",
                                             need, lambda: self._run_recipe(recipe, vals))
            by_op = self.stats.remat_by_op.setdefault(info.name, [0, 0.0])
            by_op[0] += 1
            by_op[1] += perf_counter() - t0
            # A recompute is an access like any other: its inputs are fresh again
            # (else the values recomputes start from look stale and are evicted
            # first, and every later recompute starts further back), and the
            # clock advances by its cost.
            self.clock += recipe.cost
            if _cost.FIXED is not None:
                _cost.FIXED.recomputed += recipe.cost
                _cost.FIXED.recomputes += 1
            for rec in locked:
                pool.touch(rec.sid, self.clock)
            for ref, out in zip(recipe.outputs, outs):
                c = ref() if ref is not None else None
                if c is None or c.value is not None or out is None:
                    continue
                self._set_value(c, out)
                pool.touch(c.storage.sid, self.clock)
                if c.storage.nwrappers == 0:
                    self._kept.append(weakref.ref(c.storage))
            self.stats.rematerializations += 1
            self.stats.thrash_guard_trips = pool.thrash_guard_trips
            self.stats.recomputed_cost = pool.recomputed_cost
        finally:
            for rec in locked:
                pool.unlock(rec.sid)
                if rec.banish_pending:
                    self._maybe_banish(rec)

    def _stealable_bases(self, recipe: Recipe, locked: List[StorageRecord]) -> List[StorageRecord]:
        # Note [Stealing on recompute]
        # Recomputing an in-place op writes into its old base. Its first run
        # took that memory over (Note [In-place ops]); a recompute may do the
        # same when nothing else can see the old value: no wrapper (rebinding
        # moved them all to the new storage), not pinned, and locked only by
        # this recompute (an op in progress may be about to read it). The old
        # value is then evicted (its recipe still rebuilds it if needed) and
        # the recompute allocates nothing; _run_recipe_in_mode writes into a
        # base whose storage is no longer resident instead of a copy of it (it
        # was just materialized and locked, so only this eviction makes it so).
        # Copying it instead made a dropout mask (empty_like, bernoulli_, div_)
        # cost three times its memory to recompute, and that pressure evicted
        # values needed next.
        out = []
        for _, base_idx, _ in recipe.mutation:
            rec = recipe.inputs[base_idx].storage
            ours = sum(1 for r in locked if r is rec)
            if (not rec.pinned and rec.nwrappers == 0 and rec.resident
                    and self.pool.locks(rec.sid) == ours):
                out.append(rec)
        return out

    def _plain_value(self, inp: PlainInput, recipe: Recipe) -> torch.Tensor:
        t = inp.tensor
        if inp.scratch:
            return t.clone()
        if t._version != inp.version:
            raise StaleInputError(
                f"dtr: cannot recompute {recipe.func}: one of its inputs, a tensor made outside "
                f"the dtr block (shape {tuple(t.shape)}, {t.dtype}), was modified in place after "
                f"the value was computed (version {inp.version} -> {t._version}), so recomputing "
                "would give a different result. Read the values you need (loss.item(), ...) "
                "before changing its inputs in place (for example before optimizer.step()), or "
                "use a larger budget so the value is not evicted.")
        if t.numel() and t.layout is torch.strided and t.untyped_storage().nbytes() < _extent_bytes(t):
            # Note [Freed plain inputs]
            # Freeing a storage in place (untyped_storage().resize_(0)) moves no version
            # counter; FSDP2 frees its gathered parameters so when it reshards.
            raise UnsupportedOpError(
                f"dtr: cannot recompute {recipe.func}: one of its inputs, a tensor made outside "
                f"the dtr block (shape {tuple(t.shape)}, {t.dtype}), has had its memory freed "
                f"in place since the value was computed (its storage now holds "
                f"{t.untyped_storage().nbytes()} bytes). torch.distributed.fsdp.fully_shard "
                "(FSDP2) does this to gathered parameters when it reshards after forward or "
                "backward, and dtr cannot gather them again. Keep them gathered for the block "
                "with `with dtr.distributed.fsdp_keep_gathered(model):` (see "
                "docs/distributed.md), or use a budget large enough that nothing computed "
                "from them is evicted.")
        return t

    def _run_recipe(self, recipe: Recipe, vals: List) -> List[Optional[torch.Tensor]]:
        # Note [Recompute below autograd]
        # A recompute can start outside __torch_dispatch__ (dtr.unwrap, the
        # gradient hook). There autograd would record the recomputed op and
        # its grad_fn would keep the op's inputs alive after they are evicted:
        # memory the budget cannot see. Recomputes always run below autograd,
        # as the op first ran.
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return self._run_recipe_with_grad_mode(recipe, vals)

    def _run_recipe_with_grad_mode(self, recipe: Recipe, vals: List) -> List[Optional[torch.Tensor]]:
        prev = torch.is_grad_enabled()
        if prev != recipe.grad_enabled:
            torch._C._set_grad_enabled(recipe.grad_enabled)
            try:
                return self._run_recipe_in_mode(recipe, vals)
            finally:
                torch._C._set_grad_enabled(prev)
        return self._run_recipe_in_mode(recipe, vals)

    def _run_recipe_in_mode(self, recipe: Recipe, vals: List) -> List[Optional[torch.Tensor]]:
        mutation = recipe.mutation
        if mutation is not None:
            bases = []
            for slot, base_idx, chain in mutation:
                base = vals[base_idx]
                if recipe.inputs[base_idx].storage.resident:  # else taken over: Note [Stealing on recompute]
                    base = base.clone()
                vals[slot] = _replay_chain(chain, base)
                bases.append(base)
            args, kwargs = fill_args(recipe.targs, recipe.tkwargs, vals)
            with _rng.replay(recipe.rng):
                recipe.func(*args, **kwargs)
            return bases
        args, kwargs = fill_args(recipe.targs, recipe.tkwargs, vals)
        with _rng.replay(recipe.rng):
            out = recipe.func(*args, **kwargs)
        if recipe.is_view and recipe.out_index is not None:
            return [out[recipe.out_index]]
        return _flat_outputs(out)

    # ------------------------------------------------------------------
    # Escapes
    # ------------------------------------------------------------------
    def escape(self, cell: Cell) -> torch.Tensor:
        """Hand the value out as a plain tensor: its storage is never evicted again."""
        from torch.utils._python_dispatch import _disable_current_modes

        with self.lock, _disable_current_modes():
            v = self.materialize(cell)
            rec = cell.storage
            if not rec.escaped:
                if not rec.pinned:
                    rec.pinned = True
                    self.pool.pin(rec.sid)
                rec.escaped = True
                self.pool_bytes -= rec.nbytes
                self.count_plain(v)
            return v

    # ------------------------------------------------------------------
    # The per-op path
    # ------------------------------------------------------------------
    def dispatch(self, func, args, kwargs):
        """Run ``func`` under this runtime (see Note [What gets wrapped])."""
        info = op_info(func)
        if info.run_as is not None:
            func = info.run_as
            info = op_info(func)
        targs, tkwargs, tensors = flatten_args(args, kwargs or {})
        if self._step is not None:
            return self._dispatch_step(func, info, args, kwargs, targs, tkwargs, tensors)
        return self._route(func, info, args, kwargs, targs, tkwargs, tensors)

    def run_plain(self, func, args, kwargs):
        """Run an op with only plain arguments that stays plain (Note [What gets wrapped]).

        With a limit, room is made first for what it allocates, as for a dtr op (Note [Room
        for plain ops] in csrc/plain_ops.cpp): a backward formula's factory (max(dim)'s
        zeros) allocated outside the budget before.
        """
        if self.limit is None:
            return func(*args, **kwargs)
        info = op_info(func)
        if not info.returns_tensor or info.mutated or info.is_view or info.alias_ok:
            return func(*args, **kwargs)
        with self.lock:
            targs, tkwargs, vals = flatten_args(args, kwargs)
            need, size_key = self._output_bytes(func, info, targs, tkwargs, vals,
                                                [None] * len(vals), [])
            need = need or 0
            scratch = _scratch.planned(info, size_key, need, vals)
            if need + scratch:
                self.make_room(need + scratch, info.name, need + scratch)
                self._note_peak(need + scratch)
            device = _device_of(vals)
            if device is None and kwargs.get("device") is not None:
                device = torch.device(kwargs["device"])
            with _scratch.Window(size_key, device):
                out = func(*args, **kwargs)
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    self.count_plain(o)
            self._note_peak()
            return out

    def _dispatch_step(self, func, info, args, kwargs, targs, tkwargs, tensors):
        # Note [Recording steps for lookahead] in csrc/step_plan.h: op k, the storages it
        # reads (taken before it runs: an in-place op rebinds its wrappers).
        with self.lock:
            step = self._step
            k = step.begin_op(self.pool, info.name, len(tensors), self.stats.op_seconds)
            reads = [t._cell.storage.sid for t in tensors
                     if type(t) is DTRTensor and t._cell.storage.runtime is self]
            out = self._route(func, info, args, kwargs, targs, tkwargs, tensors)
            if self._step is step:
                step.end_op(self.pool, k, reads)
                self._note_step(step)
            return out

    def _route(self, func, info, args, kwargs, targs, tkwargs, tensors):
        if info.metadata_inplace:
            if not any(type(t) is DTRTensor for t in tensors):
                # Only plain tensors: nothing dtr tracks changes shape or storage (cuDNN's
                # LSTM does empty(0).set_(weight storage) on parameters). A plain tensor a
                # recipe reads has its version checked on replay (StaleInputError).
                return func(*args, **(kwargs or {}))
            return _metadata_ops.run(self, func, info, args, kwargs or {})
        with self.lock:
            return self._dispatch(func, info, targs, tkwargs, tensors)

    def _dispatch(self, func, info, targs, tkwargs, tensors):
        pool = self.pool
        stats = self.stats
        stats.ops += 1
        # 1. Inputs: cells of our wrappers, plain tensors otherwise.
        cells: List[Optional[Cell]] = []
        locked: List[StorageRecord] = []
        vals: List[torch.Tensor] = []
        working = 0
        try:
            for t in tensors:
                if type(t) is DTRTensor:
                    c = t._cell
                    if c.storage.runtime is not self:
                        # A tensor of another (finished or outer) session: use its value as a
                        # plain input.
                        v = c.storage.runtime.escape(c)
                        cells.append(None)
                        vals.append(v)
                        self.count_plain(v)
                        continue
                    v = self.materialize(c)
                    rec = c.storage
                    pool.lock(rec.sid)
                    locked.append(rec)
                    cells.append(c)
                    vals.append(v)
                    working += rec.nbytes
                else:
                    cells.append(None)
                    vals.append(t)
                    self.count_plain(t)
                    if t.requires_grad and t.is_leaf:
                        _hook_leaf(t)
            # 2. Make room for the outputs before running.
            mutated_slots = self._mutated_slots(info, targs, tkwargs)
            need, size_key = self._output_bytes(func, info, targs, tkwargs, vals, cells,
                                                mutated_slots)
            unplanned = need is None
            if unplanned:
                stats.unplanned_ops += 1
                need = 0
            working += need
            # See Note [Measured op scratch] in scratch.py.
            scratch = _scratch.planned(info, size_key, need, vals)
            if info.seeded:  # the RNG state its recipe keeps
                scratch += _rng.host_bytes(_device_of(vals))
            self.make_room(need + scratch, info.name, working + scratch)
            if scratch:
                self._note_peak(scratch + need)
            # 3. Writes into what recipes read: Note [Writes into what recipes read].
            hidden = _hidden_writes.hidden_write_slots(info, targs, tkwargs)
            stat_copies = []
            for s in (mutated_slots + hidden) if hidden else mutated_slots:
                if cells[s] is None:
                    self.readers.before_write(self, vals[s])
            for s in hidden:
                if cells[s] is not None:
                    vals[s] = vals[s].clone()
                    stat_copies.append((s, vals[s]))
            # 4. Run.
            if mutated_slots and any(cells[i] is not None for i in mutated_slots):
                return self._run_mutation(func, info, targs, tkwargs, vals, cells, tensors,
                                          mutated_slots, size_key)
            out = self._run_functional(func, info, targs, tkwargs, vals, cells, tensors,
                                       mutated_slots, size_key, need)
            for s, updated in stat_copies:
                self._dispatch(aten.copy_.default, op_info(aten.copy_.default),
                               [Slot(0), Slot(1)], {}, [tensors[s], updated])
            return out
        finally:
            for rec in locked:
                pool.unlock(rec.sid)
                if rec.banish_pending:
                    self._maybe_banish(rec)
            if self.closed and self._kept:
                self.release_kept()
            if self.evict_all:
                self.evict_everything()
            elif self.limit is not None and self.bytes_in_use() > self.limit:
                # Only an op whose output size could not be planned gets here.
                try:
                    self.make_room(0, info.name, 0)
                except BudgetExceededError:
                    pass

    @staticmethod
    def _mutated_slots(info, targs, tkwargs) -> List[int]:
        if not info.mutated:
            return []
        out: List[int] = []
        for pos, name in info.mutated:
            out.extend(slots_in(arg_at(targs, tkwargs, pos, name)))
        return out

    def _output_bytes(self, func, info, targs, tkwargs, vals, cells, mutated_slots):
        """(bytes of new storage the op will allocate, the key it is cached under).

        Planned before the op runs: from a cache keyed by the op and its inputs'
        metadata, filled by running the op on meta tensors and corrected by the
        sizes actually observed (some meta kernels differ, e.g. RNN workspaces).
        """
        if not info.returns_tensor and not mutated_slots:
            return 0, None
        if info.is_view or info.alias_ok:
            return 0, None
        key = _size_key(func, targs, tkwargs, vals)
        if mutated_slots:
            # In place: no new storage, except the copy taken of an unevictable target.
            # The key is for its scratch (div_ by a Python number wraps it in a tensor),
            # measured as a functional op's is (csrc/mutation.cpp's Note [Room for an
            # in-place op]).
            try:
                hash(key)
            except TypeError:  # unhashable argument
                key = None
            return sum(cells[i].storage.nbytes for i in mutated_slots
                       if cells[i] is not None and cells[i].storage.pinned), key
        cache = _SIZE_CACHE
        if len(cache) > _SIZE_CACHE_MAX:
            cache.clear()
            _COST_CACHE.clear()
            _scratch.MEASURED.clear()
        try:
            return cache[key], key
        except KeyError:
            pass
        except TypeError:  # unhashable argument
            return _meta_output_bytes(func, targs, tkwargs, vals), None
        nb = cache[key] = _meta_output_bytes(func, targs, tkwargs, vals)
        return nb, key

    def _run_live(self, func, info, targs, tkwargs, vals, size_key):
        """Run the op for the first time: capture RNG state, time it, advance the clock.

        Returns (output, captured RNG state or None, cost for the scores).
        """
        args, kwargs = fill_args(targs, tkwargs, vals)
        device = _device_of(vals)
        rng = None
        if info.seeded:
            rng = _rng.capture(kwargs.get("generator"), device)
            if _rng.host_bytes(device):
                self.count_plain(rng.state)
        with _scratch.Window(size_key, device) as window:
            t0 = perf_counter()
            try:
                out = func(*args, **kwargs)
            except torch.OutOfMemoryError as exc:
                window.cancel()
                if info.mutated:  # it may have written part of its output: See Note [Out of memory]
                    raise
                out = self._retry_after_oom(exc, info.name, _SIZE_CACHE.get(size_key) or 0,
                                            lambda: func(*args, **kwargs), rng)
            cost = perf_counter() - t0
        fixed = _cost.FIXED
        if fixed is not None:  # Note [Fixed op costs]: a test and bench hook
            cost = fixed.cost_of(func, args, kwargs, cost)
        # Also the clock of the step plans (Note [Where step plans live]).
        self.stats.op_seconds += cost
        if fixed is not None:
            pass  # the table's cost is the one scored and charged, as measured and kept
        elif device is not None and device.type == "cuda":
            # Note [Roofline cost] in dtr/cost.py: no sync to time the kernel.
            cost = estimate_op(func, args, kwargs, vals, out, info.is_view)
        elif size_key is not None:
            # Note [Stable costs]
            # One wall-clock sample is noisy (a busy machine doubles it), and
            # noisy costs make eviction choices differ from run to run. The
            # cost of an op on given shapes is taken as the least seen so far.
            seen = _COST_CACHE.get(size_key)
            if seen is not None and seen < cost:
                cost = seen
            else:
                _COST_CACHE[size_key] = cost
        self.clock += cost
        return out, rng, cost

    def _run_functional(self, func, info, targs, tkwargs, vals, cells, tensors, mutated_slots,
                        size_key, planned):
        out, rng, cost = self._run_live(func, info, targs, tkwargs, vals, size_key)
        now = self.clock
        for c in cells:
            if c is not None:
                self.pool.touch(c.storage.sid, now)

        if mutated_slots or not info.returns_tensor:
            # Writes into plain tensors only (running stats, accumulated gradients):
            # the outputs are those plain tensors.
            return out
        if not any(c is not None for c in cells) and not _wrap_plain_outputs(info):
            if self.models_memory:
                self._count_new_plain(out)
            return out

        # Outputs that are one of the (plain) inputs written in place are returned as is.
        outs = _flat_outputs(out)
        if not any(isinstance(o, torch.Tensor) for o in outs):
            return out
        inputs = []
        for i, (c, v) in enumerate(zip(cells, vals)):
            if c is not None:
                inputs.append(c)
            else:
                inputs.append(self._plain_input(tensors[i] if type(tensors[i]) is not DTRTensor else v))
        if info.running_stats is not None:
            (im, iv), itrain = info.running_stats
            training = True if itrain is None else bool(arg_at(targs, tkwargs, itrain, "training"))
            if training:
                for pos in (im, iv):
                    for s in slots_in(arg_at(targs, tkwargs, pos, "")):
                        inputs[s] = PlainInput(vals[s], scratch=True)
        # An output that shares storage with an input is a view of it.
        alias_of = _alias_map(info, outs, vals, cells)
        recipe = Recipe(func, targs, tkwargs, inputs, rng, cost)
        recipe.size_key = size_key
        parents = [c.storage.sid for c in cells if c is not None]
        results = []
        new_bytes = 0
        for k, o in enumerate(outs):
            if not isinstance(o, torch.Tensor):
                results.append(o)
                recipe.outputs.append(None)
                continue
            if o.layout is not torch.strided:  # See Note [Sparse tensors]
                self.count_plain(o)
                results.append(o)
                recipe.outputs.append(None)
                continue
            src = alias_of[k]
            if src is not None and (info.alias_ok or info.collective):
                # detach/alias: the same value, a new wrapper.
                results.append(DTRTensor._from_cell(cells[src], o))
                recipe.outputs.append(None)
                continue
            if src is not None:
                parent = cells[src]
                vrec = Recipe(func, targs, tkwargs, [parent] + [x for j, x in enumerate(inputs) if j != src],
                              None, cost, is_view=True,
                              out_index=k if len(outs) > 1 or isinstance(out, (list, tuple)) else None)
                # The view recipe reads its parent as input 0: remap the template.
                vrec.targs, vrec.tkwargs = _move_slot_first(targs, tkwargs, src)
                cell = Cell(o, vrec, 0, parent.storage)
                vrec.outputs.append(weakref.ref(cell))
                parent.storage.add_cell(cell)
                self.pool.add_cost(parent.storage.sid, cost)
                results.append(DTRTensor._from_cell(cell, o))
                recipe.outputs.append(None)
                continue
            nb = _storage_nbytes(o)
            new_bytes += nb
            if info.collective:  # See Note [Collectives] in ops.py
                rec = self._new_storage(nb, cost, True, parents)
                cell = Cell(o, None, k, rec)
            else:
                rec = self._new_storage(nb, cost, False, parents)
                cell = Cell(o, recipe, k, rec)
            rec.add_cell(cell)
            recipe.outputs.append(weakref.ref(cell))
            results.append(DTRTensor._from_cell(cell, o))
        recipe.out_bytes = new_bytes
        if size_key is not None and new_bytes != planned:
            _SIZE_CACHE[size_key] = new_bytes
        self._note_peak()
        if isinstance(out, (list, tuple)):
            return type(out)(results) if isinstance(out, tuple) else results
        return results[0]

    def _run_mutation(self, func, info, targs, tkwargs, vals, cells, tensors, mutated_slots,
                      size_key):
        # Note [In-place ops]
        # An in-place op on a dtr tensor runs for real on its value, as in eager.
        # The old storage then no longer holds the old value, so it is marked
        # evicted (its recipes can recompute the old value when someone needs
        # it) and the mutated value becomes a *new* storage whose recipe is
        # "clone the old base, replay the view chain, apply the op". Every live
        # wrapper of the old storage (the base and all its views, detached
        # aliases included) is rebound to the matching cell of the new one.
        # An unevictable target cannot lose its old value: it is copied first.
        pool = self.pool
        targets = []  # (slot, old cell, base cell, chain, stolen)
        seen = set()
        for s in mutated_slots:
            c = cells[s]
            if c is None:
                continue
            _metadata_ops.check_not_stale_view(tensors[s], info.name)
            if c.storage.sid in seen:
                raise UnsupportedOpError(
                    f"dtr: {info.name} writes to two views of the same storage at once; "
                    "dtr cannot preserve that aliasing. Run it outside the dtr block.")
            seen.add(c.storage.sid)
            chain = []
            base = c
            while True:
                p = base.view_parent()
                if p is None:
                    break
                chain.append(base.recipe)
                base = p
            chain.reverse()
            self.materialize(base)
            stolen = not c.storage.pinned
            if not stolen:
                copy = base.value.clone()
                vals[s] = _replay_chain(chain, copy)
                base_value = copy
            else:
                base_value = base.value
            targets.append((s, c, base, chain, stolen, base_value))
        out, rng, cost = self._run_live(func, info, targs, tkwargs, vals, size_key)

        # The recipe's inputs: every input as recorded, plus each target's old base.
        inputs = []
        for i, (c, v) in enumerate(zip(cells, vals)):
            inputs.append(self._plain_input(v) if c is None else c)
        mutation = []
        for s, c, base, chain, stolen, _ in targets:
            inputs.append(base)
            mutation.append((s, len(inputs) - 1, chain))
        recipe = Recipe(func, targs, tkwargs, inputs, rng, cost, mutation=mutation)
        recipe.size_key = size_key
        parents = [c.storage.sid for c in cells if c is not None]
        replaced = {}
        for s, c, base, chain, stolen, base_value in targets:
            old = c.storage
            nb = old.nbytes
            if stolen:
                # Transfer: the memory now belongs to the new storage.
                self._evict(old, counted=False)
            new = self._new_storage(nb, cost + pool.cost(old.sid), info.collective, parents)
            nbase = Cell(None, None if info.collective else recipe, len(recipe.outputs), new)
            recipe.outputs.append(weakref.ref(nbase))
            self._set_value_fresh(nbase, base_value)
            recipe.out_bytes += nb
            self._rebind(old, base, nbase, new)
            replaced[id(vals[s])] = tensors[s]
        self._note_peak()
        # Return what eager returns: the written arguments themselves.
        if isinstance(out, torch.Tensor):
            return replaced.get(id(out), out)
        if isinstance(out, (list, tuple)):
            return type(out)(replaced.get(id(o), o) if isinstance(o, torch.Tensor) else o
                             for o in out)
        return out

    def _set_value_fresh(self, cell: Cell, value: torch.Tensor) -> None:
        cell.value = value
        cell.storage.add_cell(cell)

    def _rebind(self, old: StorageRecord, old_base: Cell, new_base: Cell, new: StorageRecord) -> None:
        memo = {id(old_base): new_base}

        def translate(cell: Cell) -> Cell:
            got = memo.get(id(cell))
            if got is not None:
                return got
            parent = cell.view_parent()
            if parent is None:  # a cell of the old storage not derived from its base
                parent = old_base
            np_ = translate(parent)
            r = cell.recipe
            nr = Recipe(r.func, r.targs, r.tkwargs, [np_] + list(r.inputs[1:]), None, r.cost,
                        is_view=True, out_index=r.out_index)
            nc = Cell(None, nr, 0, new)
            nr.outputs.append(weakref.ref(nc))
            memo[id(cell)] = nc
            return nc

        for ref in list(old.wrappers):
            w = ref()
            if w is None or w._cell.storage is not old:
                continue
            nc = translate(w._cell)
            w._rebind(nc)

    # ------------------------------------------------------------------
    def evict_everything(self) -> None:
        """Evict every resident, unlocked, evictable storage (testing aid)."""
        for sid in self.pool.unlocked_candidates():
            ref = self._records.get(sid)
            rec = ref() if ref is not None else None
            if rec is not None and rec.resident:
                self._evict(rec)


def entry_error(used: int, limit: int, device: torch.device) -> BudgetExceededError:
    """The error of Note [Entry check] (both runtimes raise it)."""
    return BudgetExceededError(
        f"dtr: {_fmt(used)} of {device.type} tensor memory is already in use as the "
        f"dtr.budget block opens, above its budget of {_fmt(limit)}. The budget bounds all "
        f"tensor memory of the device: parameters, gradients, optimizer state, data made "
        f"before the block and every other live tensor, not only what the step computes. "
        f"Give a budget above {_fmt(used)} plus room for the step (or dtr.budget(\"auto\")), "
        f"or free tensors before the block.",
        op="<block entry>", needed_bytes=0, pinned_bytes=used, budget_bytes=limit,
        smallest_feasible_bytes=used,
    )


def _device_of(vals) -> Optional[torch.device]:
    for v in vals:
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def _extent_bytes(t: torch.Tensor) -> int:
    """Bytes of storage that ``t``'s elements reach (``t`` has at least one element)."""
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


# Note [Sparse tensors]
# A sparse (COO, CSR, ...) tensor has no single storage, and a wrapper subclass
# cannot take its layout. Sparse tensors are therefore plain, unevictable values
# under dtr: a sparse input is a plain input (its index and value tensors are
# counted as plain memory, and its version is checked on recompute), and a sparse
# output is returned as a plain tensor, counted the same way. Dense results
# computed from sparse inputs are evictable as usual.
def _sparse_parts(t: torch.Tensor) -> List[torch.Tensor]:
    layout = t.layout
    if layout is torch.sparse_coo:
        return [t._indices(), t._values()]
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return []


def _flat_outputs(out) -> List:
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]


def _wrap_plain_outputs(info) -> bool:
    # Note [What gets wrapped]
    # With only plain inputs, an op's outputs become evictable values when
    # autograd is recording (activations computed from parameters and inputs).
    # Under no_grad (optimizers) and for ops writing into plain tensors
    # (running stats, accumulated gradients) nothing is wrapped, so optimizer
    # state and parameters stay plain (PITFALLS 10).
    # Views of plain tensors stay plain: they hold no memory of their own.
    return torch.is_grad_enabled() and not info.is_view and not info.alias_ok


def _alias_map(info, outs, vals, cells) -> List[Optional[int]]:
    """For each output, the index of the dtr-tensor input it shares storage with."""
    res: List[Optional[int]] = [None] * len(outs)
    if not any(c is not None for c in cells):
        return res
    if info.is_view or info.alias_ok:
        # View ops alias their first tensor argument (self).
        if cells[0] is not None:
            return [0 if isinstance(o, torch.Tensor) else None for o in outs]
        return res
    ptrs = {}
    for i, (c, v) in enumerate(zip(cells, vals)):
        if c is not None and isinstance(v, torch.Tensor):
            p = _data_ptr(v)
            if p:
                ptrs.setdefault(p, i)
    for k, o in enumerate(outs):
        if isinstance(o, torch.Tensor):
            p = _data_ptr(o)
            if p and p in ptrs:
                res[k] = ptrs[p]
    return res


def _data_ptr(t: torch.Tensor) -> int:
    """The address of ``t``'s storage; 0 for tensors without one of their own (sparse, and
    efficient zero tensors, whose storage has no data and refuses data_ptr)."""
    if t.layout is not torch.strided or t._is_zerotensor():
        return 0
    return t.untyped_storage().data_ptr()


def _renumber(a, src: int):
    t = type(a)
    if t is Slot:
        i = a.i
        return Slot(0 if i == src else (i + 1 if i < src else i))
    if t is list or t is tuple:
        return t(_renumber(x, src) for x in a)
    return a


def _move_slot_first(targs, tkwargs, src):
    """Renumber template slots so that input ``src`` becomes input 0."""
    if src == 0:  # the usual case (a view of self): already so
        return targs, tkwargs
    return [_renumber(a, src) for a in targs], {k: _renumber(v, src) for k, v in tkwargs.items()}


def _replay_chain(chain, base: torch.Tensor) -> torch.Tensor:
    x = base
    for r in chain:
        vals = [x]
        for inp in r.inputs[1:]:
            vals.append(inp.value if type(inp) is Cell else inp.tensor)
        args, kwargs = fill_args(r.targs, r.tkwargs, vals)
        out = r.func(*args, **kwargs)
        x = out[r.out_index] if r.out_index is not None else out
    return x


def _size_key(func, targs, tkwargs, vals):
    # Note [Strides in the size key]
    # Strides are part of the key, as in the C++ runtime's argument hash: a
    # kernel copies a non-contiguous input to a contiguous one as scratch
    # (native_layer_norm_backward's dY.contiguous()), so one (op, shapes) can
    # need more scratch in one layout than in another. Keyed by shapes alone, a
    # transformer's two LayerNorms shared the scratch measured on the one whose
    # gradient is contiguous, and the other's backward passed the budget by the
    # copy (3 KiB) when it ran at the peak.
    parts = [func]
    for v in vals:
        if isinstance(v, torch.Tensor):
            strides = tuple(v.stride()) if v.layout is torch.strided else None
            parts.append((tuple(v.shape), strides, v.dtype, v.device.type))
        else:
            parts.append(None)
    for a in targs:
        parts.append(_hashable(a))
    for k, v in tkwargs.items():
        parts.append((k, _hashable(v)))
    return tuple(parts)


def _hashable(a):
    t = type(a)
    if t is Slot:
        return "T"
    if t is list or t is tuple:
        return tuple(_hashable(x) for x in a)
    if isinstance(a, torch.Generator):
        return "G"
    return a


def _meta_output_bytes(func, targs, tkwargs, vals) -> Optional[int]:
    """Output bytes from running the op on meta tensors; None when that fails."""
    device = _device_of(vals)
    device_type = device.type if device is not None else "cpu"
    try:
        metas = [
            torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
            if isinstance(v, torch.Tensor) else v
            for v in vals
        ]
        args, kwargs = fill_args(targs, tkwargs, metas)
        if "generator" in kwargs:
            kwargs["generator"] = None
        if "device" in kwargs:
            kwargs["device"] = "meta"
        out = func(*args, **kwargs)
    except Exception:
        return None
    total = 0
    for o in _flat_outputs(out):
        if isinstance(o, torch.Tensor):
            if o.layout is not torch.strided:
                return None
            total += allocated_bytes(o.untyped_storage().nbytes(), device_type)
    return total


def _hook_leaf(t: torch.Tensor) -> None:
    # Note [Plain gradients]
    # AccumulateGrad would store a dtr tensor as the .grad of a plain leaf; an
    # optimizer could then read a value recomputed after it changed the
    # parameters (PITFALLS 9). Once accumulated, the gradient is escaped:
    # materialized, pinned, and stored as a plain tensor.
    if getattr(t, "_dtr_grad_hook", False):
        return
    t._dtr_grad_hook = True
    t.register_post_accumulate_grad_hook(_make_grad_plain)


def _make_grad_plain(p: torch.Tensor) -> None:
    g = p.grad
    if type(g) is DTRTensor:
        p.grad = g._cell.storage.runtime.escape(g._cell)
