"""The budget: parsing, errors, the state-is-unchanged guarantee, nesting, exceptions, threads,
and peak memory measured independently with the torch profiler."""
import contextlib
import gc
import threading
import weakref

import pytest
import torch

import dtr
from dtr.measure import peak_memory
from harness import (assert_same, budget_above, headroom_peak, is_plain, live_bytes, step_room,
                     train)
import models

pytestmark = pytest.mark.usefixtures("runtime")  # Note [One suite, two runtimes]


@pytest.mark.parametrize("text,expected", [
    ("8GB", 8 * 10**9), ("800MB", 800 * 10**6), ("512MiB", 512 * 2**20),
    ("1.5GiB", int(1.5 * 2**30)), ("100 kb", 100_000), ("4096", 4096), ("64B", 64),
    (12345, 12345), (None, None),
])
def test_parse_budget_forms(text, expected):
    assert dtr.parse_budget(text) == expected


@pytest.mark.parametrize("text,fraction", [("auto", 1.0), (" AUTO ", 1.0), (0.8, 0.8), (1.0, 1.0),
                                           (1e-3, 1e-3)])
def test_parse_auto_and_fractions(text, fraction):
    assert dtr.parse_budget(text) == dtr.device_memory.AutoBudget(fraction)


@pytest.mark.parametrize("bad,err,match", [(0.0, ValueError, "positive"), (-0.5, ValueError, "positive"),
                                           (1.5, TypeError, r"fraction of .auto. .* in \(0, 1\]"),
                                           ("0.8", ValueError, "positive"),  # a string is bytes
                                           ("autox", ValueError, "cannot parse")])
def test_fraction_errors(bad, err, match):
    with pytest.raises(err, match=match):
        dtr.budget(bad)


@pytest.mark.parametrize("bad", ["", "lots", "8 parsecs", "GB", "1.2.3GB", "-5GB"])
def test_parse_budget_rejects_garbage(bad):
    with pytest.raises(ValueError, match="dtr: cannot parse budget"):
        dtr.budget(bad)


@pytest.mark.parametrize("bad", [0, -1, "0MB", "0.0000001B"])
def test_budget_must_be_positive(bad):
    with pytest.raises(ValueError, match="positive"):
        dtr.budget(bad)


@pytest.mark.parametrize("bad", [1.5e9, True, [1]])
def test_budget_type_errors(bad):
    with pytest.raises(TypeError, match="dtr: budget must be"):
        dtr.budget(bad)


def test_unknown_policy_lists_valid_names():
    with pytest.raises(ValueError, match="dtr_eq") as e:
        dtr.budget("1GB", policy="smartest")
    assert "smartest" in str(e.value) and "lru" in str(e.value)


def test_device_errors():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            dtr.budget("1GB", device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        dtr.budget("1GB", device="nonsense")
    with pytest.raises(ValueError, match="supported on 'cpu' and 'cuda'"):
        dtr.budget("1GB", device="meta")


def test_custom_policies_by_callable_and_registry():
    calls = []

    def biggest_first(entry, pool, now):
        calls.append(entry.sid)
        return -entry.nbytes

    dtr.policies.register("test_biggest_first", biggest_first)
    try:
        with pytest.raises(dtr.DTRError, match="already registered"):
            dtr.policies.register("test_biggest_first", biggest_first)
        assert "test_biggest_first" in dtr.policies.available()
        eager = train("mlp")
        room = 0.8 * _peak("mlp")
        run = train("mlp", lambda: dtr.budget(budget_above(room), policy="test_biggest_first"))
        assert_same(eager, run)
        assert calls
        run = train("mlp", lambda: dtr.budget(budget_above(room), policy=biggest_first))
        assert_same(eager, run)
    finally:
        dtr.policies._REGISTRY.pop("test_biggest_first", None)


def _peak(name):
    """The most an unlimited step used above what was in use as its block opened."""
    return step_room(train(name, lambda: dtr.budget(None)))


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.named_parameters()},
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()})


def test_infeasible_budget_raises_clearly_and_loses_nothing():
    model, data = models.make("cnn")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # One good step first, so that optimizer state exists.
    with dtr.budget(None):
        model(*data[0]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    params, state = _snapshot(model, opt)
    budget = budget_above(2048)  # 2 KiB above what is in use: below the first op's needs
    with pytest.raises(dtr.BudgetExceededError) as info:
        with dtr.budget(budget):
            loss = model(*data[1])
            loss.backward()
        opt.step()
    e = info.value
    msg = str(e)
    assert msg.startswith("dtr: budget of")
    assert "aten." in msg and e.op.startswith("aten.")
    assert e.needed_bytes > 0 and e.budget_bytes == budget
    assert e.smallest_feasible_bytes > e.budget_bytes
    assert str(e.smallest_feasible_bytes) in msg
    assert isinstance(e, dtr.DTRError) and isinstance(e, RuntimeError)
    del info, e
    # Nothing changed: parameters and optimizer state are as before.
    after_params, after_state = _snapshot(model, opt)
    for k in params:
        assert torch.equal(params[k], after_params[k]), k
    assert state.keys() == after_state.keys()
    for i in state:
        assert state[i].keys() == after_state[i].keys()
        for k in state[i]:
            assert torch.equal(state[i][k], after_state[i][k])
    # The same step retried with a larger budget gives what eager gives.
    ref_model, _ = models.make("cnn")
    ref_model.load_state_dict(model.state_dict())
    opt.zero_grad(set_to_none=True)
    with dtr.budget("64MiB"):
        loss = model(*data[1])
        loss.backward()
    ref_loss = ref_model(*data[1])
    ref_loss.backward()
    assert torch.equal(dtr.unwrap(loss), ref_loss.detach())
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_failed_block_leaks_nothing():
    model, data = models.make("mlp")

    def attempt():
        with pytest.raises(dtr.BudgetExceededError):
            with dtr.budget(budget_above(4096)) as s:
                model(*data[0]).backward()
        return weakref.ref(s.runtime)

    ref = attempt()
    model.zero_grad(set_to_none=True)
    gc.collect()
    assert ref() is None, "the session's runtime (and every value it held) should be freed"


def test_nested_blocks_tighten_then_restore():
    x = torch.randn(64, 64)
    big, small = budget_above(2**30), budget_above(2**20)
    with dtr.budget(big) as outer:
        with dtr.budget(small) as inner:
            assert inner is outer
            assert outer.runtime.limit == small
            y = x * 2
        assert outer.runtime.limit == big
        with dtr.budget(big + 2**30):
            assert outer.runtime.limit == big  # never looser than the outer block
        z = y + 1
    assert torch.equal(dtr.unwrap(z), x * 2 + 1)


def test_exception_inside_block_propagates_and_closes_it():
    x = torch.randn(4)
    with pytest.raises(KeyError, match="boom"):
        with dtr.budget(None):
            y = x * 2
            raise KeyError("boom")
    after = x * 3
    assert is_plain(after)  # the mode is gone
    assert torch.equal(dtr.unwrap(y + 0), x * 2)  # the escaped value still works
    with dtr.budget(None):  # and a new block opens normally
        w = x * 4
    assert torch.equal(dtr.unwrap(w), x * 4)


def test_sessions_on_several_threads():
    eager = {name: train(name) for name in ("mlp", "cnn")}
    results, errors = {}, []

    # Models are built here: the global RNG is shared by threads, and the
    # models have no random ops, so the threads do not draw from it.
    built = {name: models.make(name) for name in eager}

    def work(name, budget):
        try:
            results[name] = train(name, lambda: dtr.budget(budget), built=built[name])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # One budget bounds the whole process's memory, both threads' steps together: room
    # above what is in use when the threads start, for both models, their Adam states and
    # the steps' peaks.
    rooms = {name: headroom_peak(train(name, lambda: dtr.budget(None))) for name in eager}
    budget = budget_above(0.95 * sum(rooms.values()))
    budgets = {name: budget for name in eager}
    threads = [threading.Thread(target=work, args=(n, budgets[n])) for n in eager]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in eager:
        assert_same(eager[name], results[name])


def _measured_step(model, data, ctx, with_base=False):
    def step():
        with ctx() as s:
            loss = model(*data)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return s
    base = live_bytes()
    s, peak = peak_memory(step)
    return (s, peak, base) if with_base else (s, peak)


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "treelstm"])
def test_measured_peak_matches_eager_when_unlimited_and_holds_under_budget(name):
    model, data = models.make(name)
    _measured_step(model, data[0], contextlib.nullcontext)  # warm-up: lazy allocations
    _measured_step(model, data[0], lambda: dtr.budget(None))
    _, eager_peak = _measured_step(model, data[0], contextlib.nullcontext)
    s, dtr_peak, base = _measured_step(model, data[0], lambda: dtr.budget(None), with_base=True)
    assert abs(dtr_peak - eager_peak) <= 0.05 * eager_peak, (dtr_peak, eager_peak)
    above = s.stats.peak_bytes - base
    checked = 0
    for frac in (0.9, 0.8):
        budget = budget_above(above * frac)
        try:
            s2, peak, base = _measured_step(model, data[0], lambda: dtr.budget(budget), with_base=True)
        except dtr.BudgetExceededError:
            continue
        checked += 1
        assert s2.stats.peak_bytes <= budget
        if name == "lstm" and not dtr.device_memory.cpu_counter_installed():
            # Without the counting allocator oneDNN's LSTM scratch is not measured (Note
            # [The budget is the device's memory]): 1.18x the budget here. Documented limit.
            continue
        # What was in use at the start plus the profiler's peak above it: all of the
        # device's tensor memory, which the budget bounds (2% slack, as test_device_budget).
        assert base + peak <= budget * 1.02, (base, peak, budget)
    assert checked


@pytest.mark.skipif(not dtr.device_memory.cpu_counter_installed(),
                    reason="op scratch is measured by the counting CPU allocator (C++ extension)")
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "lstm", "treelstm"])
def test_budget_holds_for_the_allocator_with_measured_scratch(name):
    # The budget covers all tensor memory, so the allocator's peak (what was in use
    # at the start + the profiler's peak above it) must stay within it, op scratch
    # included (oneDNN's LSTM passed it by 26% when only convolution and BatchNorm
    # scratch was estimated). Unlimited steps first: scratch is measured the first
    # time an op runs on given shapes.
    model, data = models.make(name)
    _measured_step(model, data[0], lambda: dtr.budget(None))
    s, peak, base = _measured_step(model, data[0], lambda: dtr.budget(None), with_base=True)
    # Unlimited, dtr's peak is the allocator's (it reserves the measured scratch exactly).
    assert base + peak == s.stats.peak_bytes, (base, peak, s.stats.peak_bytes)
    assert any(v > 0 for v in dtr.scratch.measured())
    above = s.stats.peak_bytes - base
    checked = 0
    for frac in (0.95, 0.85, 0.75):
        budget = budget_above(above * frac)
        try:
            s2, peak, base = _measured_step(model, data[0], lambda: dtr.budget(budget), with_base=True)
        except dtr.BudgetExceededError:
            continue
        checked += 1
        assert base + peak <= budget, (frac, base, peak, budget)
    assert checked, "no budget below the unlimited peak was feasible"


@pytest.mark.skipif(not dtr.device_memory.cpu_counter_installed(),
                    reason="op scratch is measured by the counting CPU allocator (C++ extension)")
@pytest.mark.parametrize("name", ["transformer", "cnn", "lstm"])
def test_the_allocators_peak_is_within_dtrs_peak_under_random_eviction_orders(name):
    # Which values are evicted, and so which ops run at the peak and which are
    # recomputed, depends on the policy's choices; with measured costs those differ
    # from machine to machine. The random policy draws many orders here, and under
    # every one the allocator's peak must stay within the peak dtr reports (and so
    # within the budget). Before, an op met with inputs of a new layout reused the
    # scratch measured on another layout (Note [Strides in the size key]: a CI run's
    # transformer passed its budget by 628 bytes), and recomputes left their
    # reservation out of the reported peak.
    model, data = models.make(name)
    _measured_step(model, data[0], lambda: dtr.budget(None))
    s, _, base = _measured_step(model, data[0], lambda: dtr.budget(None), with_base=True)
    above = s.stats.peak_bytes - base
    checked = 0
    for seed in range(6):
        for frac in (0.95, 0.85, 0.75, 0.65):
            budget = budget_above(above * frac)
            try:
                s2, peak, base = _measured_step(model, data[0], lambda: dtr.budget(
                    budget, policy="random", search=dtr.SearchOptions(seed=seed)), with_base=True)
            except dtr.BudgetExceededError:
                continue
            checked += 1
            assert base + peak <= s2.stats.peak_bytes <= budget, (seed, frac, base, peak, budget)
    assert checked >= 6, checked


@pytest.mark.parametrize("grad", [True, False])
def test_room_is_made_for_a_factory(grad):
    # Note [Room for plain ops] / [Room for allocations outside ops]: a factory has no
    # dtr argument (in C++ it never reaches the fallback), yet what it allocates is
    # bounded by the budget like anything else: here `a` must be evicted to fit it.
    x = torch.randn(128, 128)  # 64 KiB

    def step():
        with dtr.budget(budget) as s:
            a = x[:64] * 2.0  # 32 KiB, evictable: autograd records, though nothing needs grad
            with torch.set_grad_enabled(grad):
                z = torch.zeros(128, 128)
        return s, a, z

    budget = budget_above(80 * 1024)  # room for the zeros (64 KiB) or `a`, not both
    base = live_bytes()
    (s, a, z), peak = peak_memory(step)
    assert not z.any()
    del z
    assert torch.equal(dtr.unwrap(a), x[:64] * 2.0)  # recomputed, after the block
    assert s.stats.evictions >= 1
    assert base + peak <= s.stats.peak_bytes <= budget, (base, peak, s.stats.peak_bytes, budget)
    budget = budget_above(48 * 1024)  # room for `a`, never for the zeros
    with pytest.raises(dtr.BudgetExceededError) as e:
        step()
    assert e.value.needed_bytes == 128 * 128 * 4  # the zeros', not `a`'s 32 KiB


def test_cuda_sizes_are_counted_as_the_caching_allocator_rounds_them():
    # max_memory_allocated counts 512-byte blocks: a 128-byte bias gradient takes 512.
    from dtr.runtime import allocated_bytes

    assert [allocated_bytes(n, "cuda") for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]
    assert [allocated_bytes(n, "cpu") for n in (0, 1, 513)] == [0, 1, 513]


def test_blocks_freeze_the_heap_and_give_it_back():
    # Note [Frozen heap]: frozen while any block is open, unfrozen after the last.
    import gc

    assert gc.get_freeze_count() == 0
    with dtr.budget(None):
        n = gc.get_freeze_count()
        assert n > 0
        # Nested: no second freeze. (A frozen object may be freed meanwhile, which lowers
        # the count by one: a second freeze would raise it.)
        with dtr.budget(None):
            assert 0 < gc.get_freeze_count() <= n
        assert 0 < gc.get_freeze_count() <= n
    assert gc.get_freeze_count() == 0
    # A program that froze objects itself keeps its freeze.
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        with dtr.budget(None):
            assert gc.get_freeze_count() == mine
        assert gc.get_freeze_count() == mine
    finally:
        gc.unfreeze()
    # Cyclic garbage made inside a block is still collected.
    ref = []
    with dtr.budget(None):
        class Node:
            pass
        a, b = Node(), Node()
        a.b, b.a = b, a
        ref.append(weakref.ref(a))
        del a, b
        gc.collect()
        assert ref[0]() is None


@pytest.mark.skipif(not dtr.device_memory.cpu_counter_installed(),
                    reason="the counting CPU allocator is in the C++ extension")
def test_allocation_meter_counts_always_and_windows_track_a_peak():
    # Note [Counting CPU allocator] and Note [Metering windows].
    C = dtr._ext._C
    assert C.meter_installed() and dtr.scratch.enable()
    before = C.meter_current()
    outside = torch.empty(1 << 16)
    assert C.meter_current() == before + (1 << 18)
    start = C.meter_begin()
    assert start == before + (1 << 18)
    tmp = torch.empty(1 << 12)
    del tmp
    inside = torch.empty(1 << 10)
    peak, kept = C.meter_end(start)
    assert (peak, kept) == (1 << 14, 4096)
    del inside, outside
    assert C.meter_current() == before
    with pytest.raises(RuntimeError, match="without an open window"):
        C.meter_end(-1)


def test_memory_timeline_follows_allocations_and_gives_the_peak():
    def f():
        a = torch.empty(1 << 18)           # 1 MiB
        b = torch.empty(1 << 19)           # 2 MiB: 3 MiB live
        del a                              # 2 MiB
        c = torch.empty(1 << 17)           # 0.5 MiB: 2.5 MiB
        return b, c

    _, series = dtr.measure.memory_timeline(f)
    assert series == [1 << 20, 3 << 20, 2 << 20, 5 << 19], series
    _, peak = peak_memory(f)
    assert peak == max(series) == 3 << 20
