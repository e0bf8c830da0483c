"""The budget bounds all tensor memory of the device (Note [The budget is the device's memory]):
parameters, gradients, optimizer state, data made before the block and tensors never touched,
with no count=. The measured total (live tensor bytes at the step's start + the profiler's peak
above it) stays within 1.02x the budget, and every step is bit-identical to eager."""
import contextlib
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import dtr
from dtr.measure import peak_memory
from harness import gc_tensor_bytes, live_bytes

SLACK = 1.02
WIDTH, DEPTH, BATCH = 256, 6, 256
pytestmark = pytest.mark.usefixtures("runtime")  # Note [One suite, two runtimes]

needs_counter = pytest.mark.skipif(not dtr.device_memory.cpu_counter_installed(),
                                   reason="the counting CPU allocator is in the C++ extension")


class _MLP(nn.Module):
    def __init__(self, out=WIDTH):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))
        self.head = nn.Linear(WIDTH, out)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _make(out=WIDTH, steps=2):
    torch.manual_seed(0)
    model = _MLP(out)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, out, generator=g))
            for _ in range(steps)]
    return model, data


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _base():
    # Independent of dtr's counter where it can be: the storages the garbage collector
    # reaches; the counter sees C++-held tensors too, so the larger is what was in use.
    return max(gc_tensor_bytes(), live_bytes())


class _Loop:
    """One training loop: the same steps eagerly (ctx None) or under a budget."""

    def __init__(self, model, data, *, set_to_none=True, step_inside=False):
        self.model, self.data = model, data
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.set_to_none, self.step_inside = set_to_none, step_inside
        self.losses, self.grads, self.totals, self.sessions = [], [], [], []

    def step(self, i, ctx):
        x, y = self.data[i]
        model, opt = self.model, self.opt

        def run():
            opt.zero_grad(set_to_none=self.set_to_none)
            with ctx() as s:
                loss = _loss(model, x, y)
                loss.backward()
                if self.step_inside:
                    opt.step()
            if not self.step_inside:
                opt.step()
            return dtr.unwrap(loss).detach(), s

        base = _base()
        (loss, s), peak = peak_memory(run)
        self.losses.append(loss)
        self.grads.append([p.grad.clone() for p in model.parameters()])
        self.totals.append(base + peak)
        self.sessions.append(s)
        return base, peak


def _assert_same(a: _Loop, b: _Loop):
    assert len(a.losses) == len(b.losses)
    for x, y in zip(a.losses, b.losses):
        assert torch.equal(x, y)
    for ga, gb in zip(a.grads, b.grads):
        for x, y in zip(ga, gb):
            assert type(y) is torch.Tensor and torch.equal(x, y)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
        sa, sb = a.opt.state[p], b.opt.state[q]
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def _check(frac=0.6, out=WIDTH, keep=None, **loop_kw):
    """Eager loop, then the same loop under base + frac * eager's peak above its start."""
    model, data = _make(out)
    twin = copy.deepcopy(model)
    eager = _Loop(model, data, **loop_kw)
    dtr_loop = _Loop(twin, data, **loop_kw)
    # Step 0 in both, unlimited: lazy allocations, Adam's state, each op's scratch measured.
    eager.step(0, contextlib.nullcontext)
    dtr_loop.step(0, lambda: dtr.budget(None))
    evictions = 0
    for i in range(1, len(data)):
        _, above = eager.step(i, contextlib.nullcontext)
        budget = int(_base() + frac * above)
        dtr_loop.step(i, lambda: dtr.budget(budget))
        st = dtr_loop.sessions[-1].stats
        evictions += st.evictions
        assert dtr_loop.totals[-1] <= SLACK * budget, (i, dtr_loop.totals[-1], budget)
        assert st.peak_bytes <= budget, (st.peak_bytes, budget)
    _assert_same(eager, dtr_loop)
    assert evictions > 0, "the budget should have been tight enough to evict"
    return eager, dtr_loop


@needs_counter
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_loops_hold_the_budget(set_to_none):
    _check(set_to_none=set_to_none)


@needs_counter
@pytest.mark.parametrize("step_inside", [True, False])
def test_optimizer_step_inside_and_outside_the_block(step_inside):
    _check(step_inside=step_inside, set_to_none=False)


@needs_counter
def test_large_input_used_only_by_the_loss():
    # The target (BATCH x 8*WIDTH floats, 2 MiB) is read by the loss alone, after
    # the whole forward: counted from the start, not from that first use.
    _check(out=8 * WIDTH)


@needs_counter
def test_large_tensor_made_before_the_block_and_never_touched():
    untouched = torch.ones(4 << 20)  # 16 MiB alive through the loop, never read
    _check()
    assert untouched[0].item() == 1.0


@needs_counter
def test_nested_blocks_hold_both_budgets():
    model, data = _make()
    twin = copy.deepcopy(model)
    eager, dl = _Loop(model, data), _Loop(twin, data)
    eager.step(0, contextlib.nullcontext)
    dl.step(0, lambda: dtr.budget(None))
    _, above = eager.step(1, contextlib.nullcontext)
    outer = int(_base() + 0.9 * above)
    inner = int(_base() + 0.6 * above)

    @contextlib.contextmanager
    def nested():
        with dtr.budget(outer) as s:
            with dtr.budget(inner) as s2:
                assert s2 is s and s.runtime.limit == inner
                yield s
            assert s.runtime.limit == outer

    dl.step(1, nested)
    assert dl.totals[-1] <= SLACK * inner, (dl.totals[-1], inner)
    assert dl.sessions[-1].stats.evictions > 0
    _assert_same(eager, dl)


@needs_counter
def test_memory_in_use_above_the_budget_raises_at_entry():
    hog = torch.zeros(1 << 20)  # 4 MiB
    used = live_bytes()
    budget = used - (1 << 20)
    x = torch.randn(8)
    with pytest.raises(dtr.BudgetExceededError) as info:
        with dtr.budget(budget):
            raise AssertionError("the block must not open")
    e = info.value
    msg = str(e)
    assert msg.startswith("dtr: ") and "already in use" in msg
    assert str(budget) in msg and e.budget_bytes == budget
    assert e.pinned_bytes >= used - 4096 and str(e.pinned_bytes) in msg
    assert e.op == "<block entry>"
    # Nothing was left open: ops are plain again, and a budget above it works.
    assert type(x * 2) is torch.Tensor
    with dtr.budget(live_bytes() + (1 << 20)):
        y = x * 2
    assert torch.equal(dtr.unwrap(y), x * 2)
    del hog


@needs_counter
def test_nested_entry_error_restores_the_outer_limit():
    x = torch.randn(1 << 16)
    with dtr.budget(live_bytes() + (8 << 20)) as s:
        before = s.runtime.limit
        y = x * 2
        with pytest.raises(dtr.BudgetExceededError, match="already in use"):
            with dtr.budget(1024):
                pass
        assert s.runtime.limit == before
        z = y + 1
    assert torch.equal(dtr.unwrap(z), x * 2 + 1)


@needs_counter
def test_nested_entry_evicts_the_sessions_own_values_first():
    x = torch.randn(1 << 18)  # 1 MiB
    with dtr.budget(live_bytes() + (16 << 20)) as s:
        ys = [x * float(i) for i in range(4)]  # 4 MiB of evictable values
        # x, a partial sum, the next term and the result fit; one of the four values does not.
        with dtr.budget(live_bytes() - (1 << 20) + (64 << 10)):
            assert s.stats.evictions >= 1
            total = sum(ys)
    assert torch.equal(dtr.unwrap(total), sum(x * float(i) for i in range(4)))


def test_count_is_a_documented_no_op():
    model, data = _make(steps=1)
    with dtr.budget(None, count=[model, *data[0]]) as s:
        _loss(model, *data[0]).backward()
    assert s.runtime.plain_bytes == 0 or not dtr.device_memory.cpu_counter_installed()
    with pytest.raises(TypeError, match="count= takes modules and tensors"):
        dtr.budget(None, count=[3])


@needs_counter
def test_the_counter_sees_every_cpu_tensor():
    before = dtr.device_memory.cpu_bytes_in_use()
    a = torch.empty(1000, dtype=torch.uint8)
    assert dtr.device_memory.cpu_bytes_in_use() - before == 1000
    b = torch.randn(64, 64) @ torch.randn(64, 64)  # temporaries come and go
    assert dtr.device_memory.cpu_bytes_in_use() - before == 1000 + b.untyped_storage().nbytes()
    del a, b
    assert dtr.device_memory.cpu_bytes_in_use() == before
    # oneDNN's raw allocations (an LSTM's scratch) go through it and come back.
    lstm = nn.LSTM(32, 32)
    with torch.no_grad():
        lstm(torch.randn(4, 2, 32))
    del lstm
    assert dtr.device_memory.cpu_bytes_in_use() == before
    # The profiler still sees the requested sizes (dtr.measure depends on it).
    def alloc_and_free():
        a = torch.empty(1 << 10)
        del a

    _, series = dtr.measure.memory_timeline(alloc_and_free)
    assert series == [4096, 0]


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    here = os.path.dirname(os.path.abspath(__file__))
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=600)


def test_tensors_made_before_import_are_counted_and_the_fallback_holds():
    # Made before dtr is imported (so before the counting allocator): counted by the walk
    # of the garbage collector's objects at install. Without the counter (DTR_CPU_COUNTER=0,
    # as without the extension), the runtime's own count makes the same walk at block
    # entry and counts what plain ops make: untouched and pre-existing data still count.
    code = """
        import torch
        early = torch.zeros(1 << 20)  # 4 MiB before dtr
        import dtr
        from harness import gc_tensor_bytes
        x = torch.randn(64, 64)
        if dtr.device_memory.cpu_counter_installed():
            assert dtr.device_memory.cpu_bytes_in_use() >= early.nbytes + x.nbytes
        try:
            with dtr.budget(gc_tensor_bytes() - 4096):
                y = x * 2
        except dtr.BudgetExceededError as e:
            assert "already in use" in str(e), e
            print("entry error")
        with dtr.budget(gc_tensor_bytes() + 8 * x.nbytes) as s:
            ys = [x * float(i) for i in range(16)]
            total = sum(ys)
        assert torch.equal(dtr.unwrap(total), sum(x * float(i) for i in range(16)))
        assert s.stats.evictions > 0
        print("ok", dtr.device_memory.cpu_counter_installed(), s.runtime.models_memory)
    """
    for env, expect in (({}, "True False"), ({"DTR_CPU_COUNTER": "0"}, "False True")):
        if not env and not dtr.device_memory.cpu_counter_installed():
            continue
        r = _run_python(code, **env)
        assert r.returncode == 0, r.stderr
        assert "entry error" in r.stdout and f"ok {expect}" in r.stdout, r.stdout


# ---------------------------------------------------------------------------
# "auto" and fractions (Note [Auto budget]), and out-of-memory retries (Note [Out of memory])
# ---------------------------------------------------------------------------
def test_auto_on_cpu_is_memory_in_use_plus_what_the_machine_could_give(monkeypatch):
    from dtr import device_memory as dm

    monkeypatch.setattr(dm, "_cpu_available_bytes", lambda: 10 << 20)
    cpu = torch.device("cpu")
    used = live_bytes()
    got = dm.auto_bytes(cpu, 1.0, in_use=used)
    assert got == used + int(0.9 * (10 << 20))
    assert dm.auto_bytes(cpu, 0.5, in_use=used) == int(0.5 * got)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        dm.auto_bytes(cpu, 1.5)
    with dtr.budget("auto") as s:
        assert s.budget_bytes == s.runtime.limit == s.stats.budget_bytes
        assert abs(s.budget_bytes - got) <= (1 << 20)  # what is in use moved a little meanwhile


def test_cpu_available_bytes_reads_meminfo_and_the_cgroup():
    from dtr import device_memory as dm

    n = dm._cpu_available_bytes()
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0 < n <= avail + (256 << 20)  # memory moves between the two reads


@needs_counter
def test_a_fraction_of_auto_evicts_and_stays_exact(monkeypatch):
    from dtr import device_memory as dm

    model, data = _make(steps=2)
    twin = copy.deepcopy(model)
    # Gradients kept (set_to_none=False): what is in use now is what "auto" sees at entry.
    eager, dl = _Loop(model, data, set_to_none=False), _Loop(twin, data, set_to_none=False)
    eager.step(0, contextlib.nullcontext)
    dl.step(0, lambda: dtr.budget(None))
    _, above = eager.step(1, contextlib.nullcontext)
    # Pretend the machine has `above` bytes left: half of "auto" leaves less than the step's peak.
    monkeypatch.setattr(dm, "_cpu_available_bytes", lambda: int(above / 0.9))
    used = live_bytes()
    frac = (used + 0.6 * above) / (used + above)
    dl.step(1, lambda: dtr.budget(frac))
    s = dl.sessions[-1]
    assert s.stats.evictions > 0
    assert dl.totals[-1] <= SLACK * s.budget_bytes
    _assert_same(eager, dl)


_FLAKY = {"fail": 0}


@torch.library.custom_op("dtr_test::flaky_double", mutates_args=())
def _flaky_double(x: torch.Tensor) -> torch.Tensor:
    if _FLAKY["fail"] > 0:
        _FLAKY["fail"] -= 1
        raise torch.OutOfMemoryError("out of memory (simulated by the test)")
    return x * 2


@_flaky_double.register_fake
def _(x):
    return torch.empty_like(x)


def test_out_of_memory_evicts_and_retries_then_raises_clearly():
    x = torch.randn(1 << 16)
    with dtr.budget(None) as s:
        ys = [x * float(i) for i in range(4)]
        _FLAKY["fail"] = 2
        z = torch.ops.dtr_test.flaky_double(ys[1])
        total = sum(ys) + z
    assert s.stats.oom_retries == 2 and s.stats.evictions >= 3
    assert torch.equal(dtr.unwrap(total), sum(x * float(i) for i in range(4)) + x * 2)
    # With nothing left to evict the allocator's error becomes a BudgetExceededError.
    with dtr.budget(None) as s:
        _FLAKY["fail"] = 10**6
        try:
            with pytest.raises(dtr.BudgetExceededError, match="ran out of memory") as info:
                torch.ops.dtr_test.flaky_double(x)
        finally:
            _FLAKY["fail"] = 0
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert type(x * 2) is torch.Tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_budget_is_the_caching_allocators_count():
    dev = torch.device("cuda")
    x = torch.randn(1 << 20, device=dev)
    with dtr.budget(torch.cuda.memory_allocated(dev) + (64 << 20), device=dev) as s:
        assert s.runtime.bytes_in_use() == torch.cuda.memory_allocated(dev)
        ys = [x * float(i) for i in range(32)]  # 128 MiB: evictions needed
        total = sum(ys)
    assert s.stats.evictions > 0
    assert torch.equal(dtr.unwrap(total), sum(x * float(i) for i in range(32)))
    with dtr.budget("auto", device=dev) as s:
        free, cap = torch.cuda.mem_get_info(dev)
        assert s.budget_bytes <= torch.cuda.memory_reserved(dev) + free
    with pytest.raises(dtr.BudgetExceededError, match="already in use"):
        with dtr.budget(1024, device=dev):
            pass


def test_ops_after_the_block_run_when_memory_outside_dtr_passed_its_budget():
    # Note [Over the budget without dtr]: after the block the budget is no promise, and an op
    # that allocates nothing never raises.
    x = torch.randn(1 << 14)
    with dtr.budget(live_bytes() + (1 << 20)) as s:
        y = x * 2
        z = y + 1
    hog = torch.zeros(1 << 19)  # 2 MiB: now above the session's budget
    assert s.runtime.bytes_in_use() > s.runtime.limit or not dtr.device_memory.cpu_counter_installed()
    assert torch.equal(dtr.unwrap(z), x * 2 + 1)
    assert (z - 1).sum().item() == pytest.approx(y.sum().item())
    del hog
