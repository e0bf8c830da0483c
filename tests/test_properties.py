"""Hypothesis: random op programs under random budgets and eviction orders equal eager;
a stateful machine checks the runtime's invariants after every step."""
import gc
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, note, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import dtr
from dtr.policies import SearchOptions
from harness import budget_above, live_bytes


def _pool():
    # The Python runtime is checked on the Python pool; the C++ runtime has only its own.
    return "auto" if os.environ.get("DTR_RUNTIME") == "cpp" else "python"


N = 4


def _fresh(v):
    return v * 1.0


# Each op maps a list of (4, 4) values and two operand indices to a new (4, 4) value.
OPS = {
    "add": lambda vs, i, j: vs[i] + vs[j],
    "mul": lambda vs, i, j: vs[i] * vs[j],
    "matmul": lambda vs, i, j: vs[i] @ vs[j] / 4,
    "tanh": lambda vs, i, j: torch.tanh(vs[i]),
    "sigmoid": lambda vs, i, j: torch.sigmoid(vs[i]) - vs[j],
    "t": lambda vs, i, j: vs[i].t(),
    "view_chain": lambda vs, i, j: vs[i].reshape(2, 8).view(16).view(4, 4),
    "slice": lambda vs, i, j: vs[i][:, :].narrow(0, 0, N),
    "inplace_add": lambda vs, i, j: _fresh(vs[i]).add_(vs[j]),
    "inplace_view": lambda vs, i, j: _inplace_view(vs[i]),
    "relu_": lambda vs, i, j: (vs[i] + 0.1).relu_(),
    "dropout": lambda vs, i, j: F.dropout(vs[i], 0.5, training=True),
    "rand_like": lambda vs, i, j: vs[i] + torch.rand_like(vs[j]),
    "max_dim": lambda vs, i, j: _max_dim(vs[i]),
    "chunk_cat": lambda vs, i, j: torch.cat(list(reversed(vs[i].chunk(2, dim=0)))),
    "reduce": lambda vs, i, j: vs[i].sum(0, keepdim=True) * vs[j] + vs[j].mean(),
    "detach_mix": lambda vs, i, j: vs[i].detach() * vs[j],
}


def _inplace_view(v):
    y = _fresh(v)
    y[1].mul_(3.0)
    y[:, 2:].add_(1.0)
    return y


def _max_dim(v):
    values, idx = v.max(dim=1)
    return v + values.unsqueeze(1) + idx.unsqueeze(1).to(v.dtype)


programs = st.lists(
    st.tuples(st.sampled_from(sorted(OPS)), st.integers(0, 1000), st.integers(0, 1000)),
    min_size=1, max_size=14)


def run_program(program, ctx):
    torch.manual_seed(11)
    a = torch.linspace(-1, 1, N * N).reshape(N, N).requires_grad_(True)
    b = torch.cos(torch.arange(N * N, dtype=torch.float32)).reshape(N, N).requires_grad_(True)
    c = torch.sin(torch.arange(N * N, dtype=torch.float32)).reshape(N, N)
    with ctx() as s:
        vs = [a, b, c]
        for name, i, j in program:
            vs.append(OPS[name](vs, i % len(vs), j % len(vs)))
        loss = (a * b).sum() + sum((v * (k + 1)).sum() for k, v in enumerate(vs[3:]))
        loss.backward()
        outs = [dtr.unwrap(v) for v in vs[3:]]
    outs = [o.detach().clone() for o in outs]
    return dtr.unwrap(loss).detach(), outs, a.grad, b.grad, torch.get_rng_state(), s


def _same(ref, got):
    assert torch.equal(ref[0], got[0])
    assert len(ref[1]) == len(got[1])
    for x, y in zip(ref[1], got[1]):
        assert torch.equal(x, y)
    for x, y in zip(ref[2:5], got[2:5]):
        assert (x is None and y is None) or torch.equal(x, y)


class _Eager:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@given(programs)
def test_random_programs_under_evict_everything(program):
    note(program)
    ref = run_program(program, _Eager)
    got = run_program(program, dtr.testing.evict_everything)
    _same(ref, got)


_SCALAR_SCRATCH = 12


class _MeteredBlock:
    """A dtr block under a window on the counting CPU allocator: ``peak`` is the most CPU
    tensor memory in use while it was open, counted by the allocator, not by dtr."""

    def __init__(self, make):
        self.make = make
        self.peak = None

    def __enter__(self):
        self.meter = dtr.device_memory.cpu_counter_installed()
        if self.meter:
            self.base = dtr.device_memory.cpu_tensor_bytes()
            self.start = dtr._ext._C.meter_begin()
        self.block = self.make()
        try:
            self.session = self.block.__enter__()
        except BaseException:
            self._close()  # the block refused to open
            raise
        return self.session

    def __exit__(self, *exc):
        try:
            return self.block.__exit__(*exc)
        finally:
            self._close()

    def _close(self):
        if self.meter:
            above, _ = dtr._ext._C.meter_end(self.start)
            self.peak = self.base + above


@pytest.mark.usefixtures("runtime")  # Note [One suite, two runtimes]
@given(programs, st.floats(0.3, 1.0), st.integers(0, 2**16), st.sampled_from(["random", "dtr_eq", "lru"]))
# Found by this test: max(dim)'s backward allocated its zeros with no room made
# (Note [Room for plain ops]); the allocator passed the budget by 34 bytes.
@example(program=[("add", 0, 0), ("max_dim", 0, 0)], frac=0.875, seed=0, policy="random")
def test_random_programs_under_random_budgets_and_eviction_orders(program, frac, seed, policy):
    note(program)
    ref = run_program(program, _Eager)
    base = live_bytes()
    unlimited = run_program(program, lambda: dtr.budget(None))
    _same(ref, unlimited)
    # Room above what is in use: See Note [The budget is the device's memory].
    budget = budget_above((unlimited[5].stats.peak_bytes - base) * frac)
    for _ in range(4):
        try:
            block = _MeteredBlock(lambda: dtr.budget(
                budget, policy=policy, search=SearchOptions(seed=seed), pool=_pool()))
            got = run_program(program, lambda: block)
            break
        except dtr.BudgetExceededError as e:
            # Infeasible is a legitimate answer, but only below what is pinned or locked.
            # Retry above the bound it names (random ops pin 5 KiB RNG states each, so
            # small programs are often infeasible at the fraction drawn).
            assert e.smallest_feasible_bytes > budget
            budget = max(e.smallest_feasible_bytes, int(budget * 1.25))
    else:
        assume(False)
    _same(ref, got)
    assert got[5].stats.peak_bytes <= budget
    # The allocator's own peak is within the one dtr reports: every byte allocated had
    # room made for it (Note [Room for plain ops]: a backward's factory). Checked on a
    # second run: an (op, input metadata) first met in the first (a recompute's) had
    # its scratch only estimated there (Note [Measured op scratch]).
    del got  # what it returned holds memory the budget did not leave room for
    block = _MeteredBlock(lambda: dtr.budget(
        budget, policy=policy, search=SearchOptions(seed=seed), pool=_pool()))
    try:
        _same(ref, run_program(program, lambda: block))
        bound = block.session.stats.peak_bytes
        assert bound <= budget
    except dtr.BudgetExceededError:
        # What is in use moved by a few bytes: the budget holds up to the error, or the
        # block refused to open above it.
        bound = max(budget, block.base) if block.meter else budget
    # Within a few bytes: the Python runtime, meeting an (op, input metadata) for the first
    # time in this run (a recompute in an order the costs measured here made new), only
    # estimates its scratch, and a kernel's wrapped Python number (8 + 4 bytes) can pass
    # by that much, rarely (about 1 example in 800). Every tensor these programs make is
    # 16 bytes or more (the max's values; a (4, 4) gradient is 64).
    assert block.peak is None or block.peak <= bound + _SCALAR_SCRATCH, (block.peak, bound, budget)


class RuntimeMachine(RuleBasedStateMachine):
    """Ops, releases, forced evictions and budget changes against an eager oracle."""

    @initialize(limit=st.integers(2_000, 20_000))
    def open_session(self, limit):
        # Limits are room above what is in use: See Note [The budget is the device's memory].
        # The machine checks the Python runtime's own records and pool.
        self.base = live_bytes()
        self.session = dtr.budget(self.base + limit, pool="python", runtime="python")
        self.session.__enter__()
        self.rt = self.session.runtime
        self.pairs = []
        for k in range(2):
            base = torch.arange(16, dtype=torch.float32).reshape(4, 4) / (k + 3)
            self.pairs.append((base * 1.0, base * 1.0))

    def teardown(self):
        if getattr(self, "session", None) is not None:
            self.session.__exit__(None, None, None)

    def _apply(self, fn, i, j):
        xi, ei = self.pairs[i % len(self.pairs)]
        xj, ej = self.pairs[j % len(self.pairs)]
        try:
            x = fn(xi, xj)
        except dtr.BudgetExceededError:
            return
        with torch.no_grad():
            pass
        self.session.__exit__(None, None, None)
        try:
            e = fn(ei, ej)
        finally:
            self.session.__enter__()
        self.pairs.append((x, e))

    @rule(i=st.integers(0, 100), j=st.integers(0, 100),
          op=st.sampled_from(["add", "matmul", "tanh", "t", "inplace", "view_inplace", "split"]))
    def op(self, i, j, op):
        fns = {
            "add": lambda x, y: x + y,
            "matmul": lambda x, y: (x @ y) / 8,
            "tanh": lambda x, y: torch.tanh(x),
            "t": lambda x, y: x.t(),
            "inplace": lambda x, y: (x * 1).mul_(0.5).add_(y),
            "view_inplace": lambda x, y: _inplace_view(x),
            "split": lambda x, y: torch.cat(x.split(2)[::-1]),
        }
        self._apply(fns[op], i, j)

    @precondition(lambda self: len(self.pairs) > 2)
    @rule(k=st.integers(0, 100))
    def release(self, k):
        del self.pairs[k % len(self.pairs)]
        gc.collect()

    @rule()
    def evict_all(self):
        self.rt.evict_everything()

    @rule(limit=st.integers(1_000, 30_000))
    def change_budget(self, limit):
        self.rt.limit = self.base + limit

    @rule(k=st.integers(0, 100))
    def read(self, k):
        x, e = self.pairs[k % len(self.pairs)]
        try:
            got = x + 0
        except dtr.BudgetExceededError:
            return
        assert torch.equal(dtr.unwrap(got) if dtr.is_dtr_tensor(got) else got, e)

    @invariant()
    def accounting_matches_the_records(self):
        if not hasattr(self, "rt"):
            return
        live = 0
        for ref in list(self.rt._records.values()):
            rec = ref()
            if rec is not None and rec.resident and not rec.escaped:
                live += rec.nbytes
        assert live == self.rt.pool_bytes
        assert self.rt.pool_bytes >= 0 and self.rt.plain_bytes >= 0

    @invariant()
    def nothing_is_locked_between_ops(self):
        if not hasattr(self, "rt"):
            return
        assert all(self.rt.pool.locks(sid) == 0 for sid in list(self.rt._records))


TestRuntimeMachine = RuntimeMachine.TestCase
