"""The C++ runtime (runtime="cpp"): its own mechanisms, beyond the shared differential suite.

The shared tests (test_models.py and others marked with the ``runtime`` fixture) run on
both runtimes; these check what only the C++ path has: the wrapper TensorImpl, the TLS
capture of plain-only ops, the boxed fallback's direct registrations, the iterative
recompute, and its error paths.
"""
import contextlib
import copy
import ctypes
import gc
import io
import pickle
import threading
import warnings

import numpy as np
import pytest
import torch

import dtr
from dtr import _ext
from harness import budget_above, live_bytes, step_room, train
import test_pool

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the C++ extension is not built")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def test_outputs_are_wrappers_with_plain_metadata_and_plain_grads():
    m = _mlp()
    x = torch.randn(5, 8)
    with dtr.budget(None, runtime="cpp"):
        y = m(x)
        assert dtr.is_dtr_tensor(y) and type(y) is torch.Tensor
        assert y.device == x.device and y.dtype == x.dtype and y.shape == (5, 4)
        assert y.grad_fn is not None
        y.sum().backward()
    for p in m.parameters():
        assert p.grad is not None and not dtr.is_dtr_tensor(p.grad)


_LAYOUTS = {
    "contiguous": lambda x2, x4, x5: x2 * 1,
    "transposed view": lambda x2, x4, x5: (x2 * 1).t(),
    "strided view": lambda x2, x4, x5: (x2 * 1)[:, ::2],
    "offset view": lambda x2, x4, x5: (x2 * 1)[1:, 2:],
    "unsqueezed": lambda x2, x4, x5: (x2 * 1).unsqueeze(1),
    "expanded (overlapping)": lambda x2, x4, x5: (x2[0] * 1).expand(3, 5),
    "empty": lambda x2, x4, x5: (x2 * 1)[:0],
    "scalar": lambda x2, x4, x5: x2.sum(),
    "channels_last": lambda x2, x4, x5: (x4 * 1).contiguous(memory_format=torch.channels_last),
    "channels_last permuted": lambda x2, x4, x5: (x4 * 1).permute(0, 2, 3, 1),
    "channels_last_3d": lambda x2, x4, x5: (x5 * 1).contiguous(memory_format=torch.channels_last_3d),
    "5d sliced": lambda x2, x4, x5: (x5 * 1)[:, :, ::2],
    "size-1 channels": lambda x2, x4, x5: (x4[:, :1] * 1),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_wrappers_report_the_layout_flags_eager_tensors_do(layout):
    # Code above dtr (autograd, composite ops, suggest_memory_format) reads the wrapper's flags.
    torch.manual_seed(0)
    inputs = (torch.randn(4, 5, requires_grad=True), torch.randn(2, 3, 4, 5, requires_grad=True),
              torch.randn(2, 3, 4, 5, 2, requires_grad=True))
    make = _LAYOUTS[layout]
    eager = make(*inputs)
    with dtr.budget(None, runtime="cpp"):
        w = make(*inputs)
        assert dtr.is_dtr_tensor(w)
        assert w.shape == eager.shape and w.stride() == eager.stride()
        assert w.storage_offset() == eager.storage_offset()
        assert _ext._C._layout_flags(w) == _ext._C._layout_flags(eager)
        for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
            assert w.is_contiguous(memory_format=fmt) == eager.is_contiguous(memory_format=fmt)


def test_the_op_clock_measures_seconds():
    # Note [The op clock]: ticks of the time-stamp counter, converted with a measured rate,
    # agree with steady_clock over a sleep (both see the same wall time, whatever the load).
    # The clocks are read one after the other, so a thread descheduled between the two reads
    # (a loaded machine) skews one attempt: the best of five must agree within 2%.
    attempts = [_ext._C._op_clock_check(0.05) for _ in range(5)]
    assert all(steady >= 0.05 and op_clock >= 0 for _, op_clock, steady in attempts)
    assert min(abs(op_clock - steady) / steady for _, op_clock, steady in attempts) <= 0.02, attempts


def test_the_runtime_lock_lets_one_thread_in_at_a_time_and_its_holder_in_again():
    # Note [The runtime's lock]: four threads each take the lock 20,000 times, twice over
    # each time, and bump a plain counter under it (yielding now and then while holding it,
    # so that others find it held and wait): any update lost shows two holders at once.
    # Some try_locks must have been refused, or the waiting path was never taken.
    counter, refused = _ext._C._recursive_lock_check(4, 20_000)
    assert counter == 4 * 20_000
    assert refused > 0


def test_an_unboxed_kernel_run_that_runs_out_of_memory_is_retried_on_the_same_values():
    # Note [Unboxed kernel runs]: neg has an unboxed kernel, which runs the op through its typed
    # handle; after an out-of-memory error the runtime puts the values back on the stack and
    # runs it again. The CPU kernel is replaced, for this test only, by one that fails twice.
    calls = {"fail": 0, "runs": 0}

    def flaky_neg(x):
        calls["runs"] += 1
        if calls["fail"] > 0:
            calls["fail"] -= 1
            raise torch.OutOfMemoryError("out of memory (simulated by the test)")
        return torch.ops.aten.mul.Scalar(x, -1)

    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            lib.impl("neg", flaky_neg, "CPU")
        x = torch.randn(1 << 16)
        with dtr.budget(None, runtime="cpp") as s:
            ys = [x * float(i) for i in range(4)]
            calls["fail"] = 2
            z = torch.neg(ys[1])
            total = sum(ys) + z
        assert calls["runs"] == 3 and s.stats.oom_retries == 2 and s.stats.evictions >= 2
        assert torch.equal(dtr.unwrap(total), sum(x * float(i) for i in range(4)) + (x * 1.0) * -1)
    finally:
        lib._destroy()
    assert torch.equal(torch.neg(x), x * -1)


def test_plain_only_ops_under_no_grad_stay_plain():
    p = torch.randn(4, requires_grad=True)
    with dtr.budget(None, runtime="cpp"):
        with torch.no_grad():
            q = p * 2
        v = p[1:]
        r = p * 3
    assert not dtr.is_dtr_tensor(q)
    assert not dtr.is_dtr_tensor(v)  # a view of a plain tensor stays plain
    assert dtr.is_dtr_tensor(r)
    assert torch.equal(dtr.unwrap(r), (p * 3).detach())


def test_factories_are_not_wrapped():
    with dtr.budget(None, runtime="cpp"):
        z = torch.zeros(3)
        r = torch.randn(3)
    assert not dtr.is_dtr_tensor(z) and not dtr.is_dtr_tensor(r)


def test_deep_chain_recomputes_without_recursion():
    # Note [Iterative materialization]: 20,000 evicted values in a chain.
    x = torch.randn(8)
    with dtr.budget(None, runtime="cpp") as s:
        y = x + 0
        for _ in range(20_000):
            y = y * 1.0001
        s.runtime.evict_everything()
        got = dtr.unwrap(y)
    ref = x + 0
    for _ in range(20_000):
        ref = ref * 1.0001
    assert torch.equal(got, ref)
    assert s.stats.rematerializations >= 20_000


def test_views_share_storage_and_recompute_exactly():
    x = torch.randn(4, 6, requires_grad=True)
    ref = (x * 2)[1:].t().sum(0) * (x * 2)[0, 2]
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    with dtr.testing.evict_everything(runtime="cpp") as s:
        y = x * 2
        out = y[1:].t().sum(0) * y[0, 2]
        (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(dtr.unwrap(out), ref.detach())
    assert torch.equal(g, g_ref)
    assert s.stats.rematerializations > 0


def test_in_place_on_a_dtr_value_is_seen_by_every_alias_and_by_recipes_of_the_old_value():
    x = torch.randn(3, 4)
    with dtr.testing.evict_everything(runtime="cpp"):
        y = x * 2
        z = y + 1          # recorded from the old y
        v = y[0]
        d = y.detach()
        v.mul_(10)         # writes through a view into y's storage
        assert torch.equal(dtr.unwrap(y), torch.cat([(x * 2)[:1] * 10, (x * 2)[1:]]))
        assert torch.equal(dtr.unwrap(d), dtr.unwrap(y))
        assert torch.equal(dtr.unwrap(z), x * 2 + 1)  # recomputed from the old value


def test_random_ops_replay_and_leave_the_stream_where_eager_does():
    x = torch.randn(64)
    torch.manual_seed(3)
    ref = torch.nn.functional.dropout(x * 1, 0.5) + torch.rand_like(x)
    after_ref = torch.get_rng_state()
    torch.manual_seed(3)
    with dtr.testing.evict_everything(runtime="cpp") as s:
        out = torch.nn.functional.dropout(x * 1, 0.5) + torch.rand_like(x)
        got = dtr.unwrap(out)
    assert torch.equal(got, ref)
    assert torch.equal(torch.get_rng_state(), after_ref)
    assert s.stats.rematerializations > 0


def test_budget_exceeded_is_the_dtr_error_with_its_fields():
    x = torch.randn(256, 256)
    limit = budget_above(1000)
    with pytest.raises(dtr.BudgetExceededError) as info:
        with dtr.budget(limit, runtime="cpp"):
            x * 2
    e = info.value
    assert "dtr: budget of" in str(e) and "aten.mul.Tensor" in str(e) and e.budget_bytes == limit
    assert e.needed_bytes == 256 * 256 * 4 and e.smallest_feasible_bytes > limit


def test_memory_in_use_above_the_budget_raises_at_entry():
    x = torch.randn(256, 256)  # noqa: F841 - alive: counted against the budget
    with pytest.raises(dtr.BudgetExceededError, match="already in use as the dtr.budget block opens"):
        with dtr.budget(live_bytes() // 2, runtime="cpp"):
            pass


def test_untouched_tensors_count_against_the_budget():
    # Note [The C++ runtime's count of the device]: a 4 MiB tensor the block never reads
    # leaves only the rest of the budget to the step.
    big = torch.empty(1 << 20)  # noqa: F841
    x = torch.randn(256, 256, requires_grad=True)
    limit = budget_above(3 * x.numel() * 4)
    with dtr.budget(limit, runtime="cpp") as s:
        ys = [x]
        for _ in range(8):
            ys.append(ys[-1] * 1.5)  # all kept alive: only eviction makes room
        got = dtr.unwrap(ys[-1])
    ref = x
    for _ in range(8):
        ref = ref * 1.5
    assert torch.equal(got, ref.detach())
    assert s.stats.evictions > 0 and s.stats.peak_bytes <= limit


def test_stale_plain_input_raises_stale_input_error():
    w = torch.randn(4, requires_grad=True)
    with dtr.testing.evict_everything(runtime="cpp"):
        y = w * 2
        with torch.no_grad():
            w.add_(1)
        with pytest.raises(dtr.StaleInputError, match="modified in place"):
            dtr.unwrap(y)


def test_metadata_ops_that_cannot_be_views_are_refused_naming_the_op():
    # Note [In-place metadata ops in the C++ runtime]; the refusals shared with the Python
    # runtime are in test_conformance.py.
    x = torch.randn(3, 4)
    with dtr.budget(None, runtime="cpp"):
        a = x * 2
    with dtr.budget(None, runtime="cpp"):
        b = x * 3
        with pytest.raises(dtr.UnsupportedOpError, match=r"aten\.set_\.source_Tensor joins .* two different sessions"):
            b.set_(a)
        with pytest.raises(dtr.UnsupportedOpError, match=r"aten\.resize_\.default would grow .* 48 to 100 bytes"):
            b.resize_(5, 5)
        c = x * 4
        b.set_(c)
        assert torch.equal(dtr.unwrap(b), x * 4)
        b.set_(x * 3)
        assert b.shape == (3, 4) and torch.equal(dtr.unwrap(b), x * 3)
        b.unsqueeze_(0)
        assert b.shape == (1, 3, 4) and torch.equal(dtr.unwrap(b), (x * 3).unsqueeze(0))


def test_tensors_outlive_the_block():
    x = torch.randn(5, requires_grad=True)
    with dtr.testing.evict_everything(runtime="cpp"):
        loss = (x * 3).sum()
    loss.backward()  # after the block, through its runtime
    assert torch.equal(x.grad, torch.full((5,), 3.0))
    assert loss.item() == pytest.approx((x * 3).sum().item())


def test_threads_each_open_their_own_block():
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(32, 32, generator=g, requires_grad=True)
            ref = torch.autograd.grad((x.tanh() @ x).sum(), x)[0]
            with dtr.testing.evict_everything(runtime="cpp"):
                got = torch.autograd.grad((x.tanh() @ x).sum(), x)[0]
            assert torch.equal(got, ref)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_live_counts_follow_records_made_on_threads_that_have_ended():
    # Each thread counts the records it makes and frees in its own state, and an
    # ending thread hands its counts on (Note [The thread's state] in csrc/thread_state.h):
    # values made on threads that have ended and freed on this one bring the counts back.
    gc.collect()
    before = dtr.testing.live_runtime_objects("cpp")
    kept = []

    def work(seed):
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        with dtr.budget(None, runtime="cpp"):
            y = (x * 2).tanh()
            kept.append((y, y.sum()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    during = dtr.testing.live_runtime_objects("cpp")
    assert len(kept) == 3
    for name in ("cells", "recipes", "storages"):
        assert during[name] >= before[name] + 3 * 3, (name, before, during)
    kept.clear()
    gc.collect()
    assert dtr.testing.live_runtime_objects("cpp") == before


def test_the_key_is_released_after_the_block():
    with dtr.budget(None, runtime="cpp"):
        pass
    # A stray backend bit would send this to a backend that does not exist (CPP_DISPATCH pitfall 6).
    assert torch.equal(torch.ones(2).fill_(3), torch.full((2,), 3.0))


def test_unknown_runtime_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown runtime"):
        dtr.budget(None, runtime="rust")
    monkeypatch.setenv("DTR_RUNTIME", "java")
    with pytest.raises(ValueError, match="DTR_RUNTIME"):
        dtr.budget(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a device with no counting allocator")
def test_a_device_whose_allocator_keeps_no_count_is_refused_clearly():
    # On CUDA the C++ runtime checks the budget against the caching allocator's own count
    # (Note [The device's count in C++]); where the device has no such allocator (CUDA in
    # a CPU build of torch, meta) it must say so rather than check against nothing.
    rt = _ext._C.Runtime(None, "dtr_eq", None, False)
    for device in ("cuda:0", "meta:0"):
        with pytest.raises(dtr.DTRError, match="keeps no count of its bytes"):
            rt.use_device_allocator(device)


# --- Escapes: Note [Escapes of C++ wrappers] in csrc/escapes.h ---------------------------

def _storage_bytes(t):
    return bytes(t.untyped_storage())[t.storage_offset() * t.element_size():][:t.nbytes]


def _escape(kind, t):
    """What escape `kind` gives for t, as something comparable across runs."""
    if kind == "repr":
        return repr(t)
    if kind == "print":
        buf = io.StringIO()
        print(t, file=buf)
        return buf.getvalue()
    if kind == "tolist":
        return t.tolist()
    if kind == "numpy":
        return t.numpy().tobytes()
    if kind == "array":
        return np.asarray(t).tobytes()
    if kind == "data_ptr":
        # The address of the value's memory: read it back through a plain view of it.
        ptr = t.data_ptr()
        assert ptr == t.data_ptr() and ptr == dtr.unwrap(t).data_ptr()
        return bytes(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)),
                                           shape=(t.nbytes,)))
    if kind == "untyped_storage":
        return _storage_bytes(t)
    if kind == "dlpack":
        return torch.from_dlpack(t).numpy().tobytes()
    if kind == "torch.save":
        buf = io.BytesIO()
        torch.save(t, buf)
        buf.seek(0)
        loaded = torch.load(buf)
        assert not dtr.is_dtr_tensor(loaded)
        return loaded.numpy().tobytes()
    if kind == "pickle":
        loaded = pickle.loads(pickle.dumps(t))
        assert not dtr.is_dtr_tensor(loaded)
        return loaded.numpy().tobytes()
    if kind == "deepcopy":
        c = copy.deepcopy(t)
        assert not dtr.is_dtr_tensor(c) and c.data_ptr() != dtr.unwrap(t).data_ptr()
        return c.numpy().tobytes()
    if kind == "copy":
        c = copy.copy(t)
        assert not dtr.is_dtr_tensor(c)
        return c.numpy().tobytes()
    raise AssertionError(kind)


ESCAPES = ["repr", "print", "tolist", "numpy", "array", "data_ptr", "untyped_storage", "dlpack",
           "torch.save", "pickle", "deepcopy", "copy"]


def _expected(kind, ref):
    got = _escape(kind, ref)
    if kind == "repr":
        return f"DTRTensor({got})"
    if kind == "print":
        return f"DTRTensor({got.rstrip()})\n"
    return got


@pytest.mark.parametrize("kind", ESCAPES)
def test_escape_gives_eager_value_and_the_tensor_keeps_working(kind):
    x = torch.randn(4, 3)
    ref = torch.tanh(x)[:, 1:] * 3  # a view, so that offsets and strides matter
    with dtr.testing.evict_everything(runtime="cpp") as s:
        y = torch.tanh(x)[:, 1:] * 3  # evicted as soon as it is made
        assert _escape(kind, y) == _expected(kind, ref)
        z = y * 2 + 1  # the escaped tensor still works in later ops
        s.runtime.evict_everything()
        assert torch.equal(dtr.unwrap(z), ref * 2 + 1)
        assert _escape(kind, y) == _expected(kind, ref)
    # After the block: the same value, and ops on it still run through its session.
    assert _escape(kind, y) == _expected(kind, ref)
    s.runtime.evict_everything()
    assert torch.equal(dtr.unwrap(y.exp()), ref.exp())
    assert torch.equal(dtr.unwrap(y), ref)


@pytest.mark.parametrize("kind", ["repr", "tolist", "numpy", "data_ptr", "torch.save", "deepcopy"])
def test_escape_of_an_evicted_value_in_the_block_does_not_wrap_its_own_work(kind):
    # repr and deepcopy run torch ops on the escaped value: they must not become values of
    # the open block (no new records, plain results).
    x = torch.randn(6)
    with dtr.testing.evict_everything(runtime="cpp") as s:
        y = x.sin() * 2
        ops = s.stats.ops
        _escape(kind, y)
        assert s.stats.ops == ops


def test_escaped_values_are_pinned_and_stay_valid():
    x = torch.randn(64)
    with dtr.testing.evict_everything(runtime="cpp") as s:
        y = x * 2
        arr = y.numpy()  # shares the value's memory
        ptr = y.data_ptr()
        for _ in range(3):
            s.runtime.evict_everything()
            y = y + 0  # noqa: PLW2901 - more ops, more evictions
    assert torch.equal(torch.from_numpy(arr), x * 2)
    assert ptr == arr.ctypes.data


def test_escapes_keep_requires_grad_as_for_plain_tensors():
    w = torch.randn(3, requires_grad=True)
    with dtr.budget(None, runtime="cpp"):
        y = w * 2
        leaf = (w * 3).detach().requires_grad_()
    assert dtr.is_dtr_tensor(y) and dtr.is_dtr_tensor(leaf)
    with pytest.raises(RuntimeError, match="requires grad"):
        y.numpy()
    assert np.array_equal(y.numpy(force=True), (w * 2).detach().numpy())
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(y)
    c = copy.deepcopy(leaf)
    assert c.requires_grad and c.is_leaf and torch.equal(c, (w * 3).detach())
    buf = io.BytesIO()
    torch.save(y, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    assert loaded.requires_grad and torch.equal(loaded.detach(), (w * 2).detach())
    assert "grad_fn=<MulBackward0>" in repr(y) and "requires_grad=True" in repr(leaf)


def test_deepcopy_of_a_module_holding_wrappers_keeps_aliasing():
    x = torch.randn(4, 4)
    with dtr.budget(None, runtime="cpp"):
        y = x * 2
        v = y[1:]
    a, b = copy.deepcopy([y, v])
    assert not dtr.is_dtr_tensor(a) and torch.equal(a, x * 2) and torch.equal(b, (x * 2)[1:])
    a.add_(1)  # the copies share one storage, as deep copies of a plain tensor and its view do
    assert torch.equal(b, (x * 2)[1:] + 1)


def _plain_results(name, t):
    if name == "__repr__":
        return repr(t)
    if name == "__reduce_ex__":
        return pickle.dumps(t, protocol=2)
    if name == "__deepcopy__":
        c = copy.deepcopy(t)
        return (type(c), c.requires_grad, c.tolist())
    if name == "untyped_storage":
        s = t.untyped_storage()
        return (type(s), s.data_ptr(), s.nbytes())
    if name == "numpy":
        return t.detach().numpy().tobytes()
    if name == "__dlpack__":
        return torch.from_dlpack(t.detach()).tolist()
    return getattr(t, name)()


def test_plain_tensors_get_torchs_own_methods():
    with dtr.budget(None, runtime="cpp"):
        pass  # installs the escape methods
    from dtr.tensor import TORCH_METHODS

    assert dtr.tensor.TORCH_METHODS["tolist"] is torch._C.TensorBase.tolist
    p = torch.nn.Parameter(torch.randn(2, 3))
    cases = [torch.randn(3, 2), torch.arange(6).view(2, 3).t(), torch.randn(2, requires_grad=True), p,
             torch.tensor(1.5)]
    for t in cases:
        for name, original in TORCH_METHODS.items():
            assert type(torch.Tensor.__dict__[name]).__name__ == "method_descriptor"
            now = _plain_results(name, t)
            with _originals():
                before = _plain_results(name, t)
            assert now == before, (name, t)
    # Errors are torch's own too.
    with pytest.raises(RuntimeError, match="Can't call numpy\\(\\) on Tensor that requires grad"):
        torch.randn(2, requires_grad=True).numpy()
    with pytest.raises(TypeError):
        torch.randn(2).tolist(1)
    # A plain tensor printed inside a block, as before.
    with dtr.budget(None, runtime="cpp"):
        assert repr(torch.ones(2)) == "tensor([1., 1.])"


class _originals:
    """Puts torch's own methods back for the duration (the baseline of the test above)."""

    def __enter__(self):
        from dtr.tensor import TORCH_METHODS

        self.saved = {name: torch.Tensor.__dict__[name] for name in TORCH_METHODS}
        for name, original in TORCH_METHODS.items():
            setattr(torch.Tensor, name, original)

    def __exit__(self, *exc):
        for name, m in self.saved.items():
            setattr(torch.Tensor, name, m)


# --- Policies given as Python callables: Note [Policies written in Python] in csrc/pool.h ----

def _mlp_peak():
    return step_room(train("mlp", lambda: dtr.budget(None, runtime="cpp")))


def _chain(policy, room):
    """Loss and gradients of a chain of 128 KiB activations under a budget of ``room`` bytes
    above what is in use, and the session's (evictions, rematerializations). Its tensors are
    large against the few KiB the rest of the process allocates, so the decisions of two
    runs do not depend on that."""
    torch.manual_seed(0)
    ws = [torch.randn(128, 128, requires_grad=True) for _ in range(6)]
    x = torch.randn(256, 128)
    gc.collect()
    base = live_bytes()
    with dtr.budget(budget_above(room) if room else None, policy=policy, runtime="cpp") as s:
        h = x
        for w in ws:
            h = torch.tanh(h @ w)
        loss = h.pow(2).sum()
        loss.backward()
        loss = dtr.unwrap(loss).clone()
    return [loss] + [w.grad for w in ws], (s.stats.evictions, s.stats.rematerializations), \
        s.stats.peak_bytes - base


# (Not "random" with sampling: the C++ pool samples with its generator, the callable draws
# from the view's, while PythonPool draws both from one.)
@pytest.mark.parametrize("policy,sample", [(p, s) for p in test_pool.POLICIES for s in (None, 8)
                                           if not (p == "random" and s)])
def test_a_python_policy_on_the_cpp_pool_makes_the_python_pools_decisions(policy, sample):
    # The scores of dtr/policies.py given as callables: called by the C++ pool on its
    # snapshot (entries, neighbours, dtr_eq's classes, the plan clock) they choose what
    # PythonPool chooses with them, and what the native C++ policy chooses, on random
    # workloads (the runtime's costs are measured times, so only the pool is deterministic).
    score = dtr.policies.get(policy)

    def in_python(e, pool, now):
        return score(e, pool, now)

    search = dtr.SearchOptions(sample_above=sample, min_evictable_fraction=0.3 if sample else 0.0,
                               seed=1)
    from dtr.cpp_pool import CppPool

    pools = (dtr.policies.PythonPool(in_python, search), CppPool(in_python, search))
    expected, got = test_pool._random_workload(None, None, 1, pools=pools)
    assert sum(v is not None for v in got) > 50
    assert got == expected
    native, _ = test_pool._random_workload(policy, search, 1)
    assert got == native


@pytest.mark.parametrize("name", ["lru", "largest"])
def test_a_python_policy_runs_the_cpp_runtime_exactly(name):
    # On the runtime, decisions also depend on measured costs; these two policies read
    # none, so the native policy and the same score in Python evict alike.
    eager, _, peak = _chain("dtr_eq", None)
    room = 0.7 * peak
    score = dtr.policies.get(name)
    calls = []

    def in_python(e, pool, now):
        calls.append(e.sid)
        return score(e, pool, now)

    native, native_counts, _ = _chain(name, room)
    python, python_counts, _ = _chain(in_python, room)
    for a, b, c in zip(eager, native, python):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert native_counts == python_counts and python_counts[0] > 0
    assert len(calls) >= python_counts[0]


def test_a_python_policy_is_called_only_when_a_victim_is_chosen():
    calls = []

    def policy(e, pool, now):
        calls.append(now)
        return -e.nbytes

    x = torch.randn(16, 16)
    with dtr.budget(None, policy=policy, runtime="cpp") as s:
        for _ in range(50):
            x = torch.tanh(x) * 1.5
    assert s.stats.ops > 0 and calls == []  # no search, no call
    assert s.stats.policy == "policy"
    _, _, peak = _chain("dtr_eq", None)
    _, (evictions, _), _ = _chain(policy, 0.7 * peak)
    searches = len(set(calls))  # one call per search: every score of a search has its `now`
    assert 0 < searches <= evictions


class _PolicyFailed(Exception):
    pass


def test_an_exception_from_a_python_policy_surfaces_and_leaves_the_runtime_usable():
    failures = [1]

    def flaky(e, pool, now):
        if failures:
            failures.pop()
            raise _PolicyFailed("no idea")
        return e.cost / e.nbytes

    x = torch.randn(64, 64)
    refs = [x * i for i in range(5)]
    with dtr.budget(budget_above(5 * 64 * 64 * 4), policy=flaky, runtime="cpp") as s:
        ys = [x * i for i in range(4)]
        with pytest.raises(_PolicyFailed, match="no idea"):
            ys.append(x * 4)  # needs room: the search calls the policy, which raises
        # The runtime's lock was released and nothing was half done: another thread can run
        # ops on the same runtime, and the values are exact.
        out = []
        t = threading.Thread(target=lambda: out.append(torch.equal(ys[1] + ys[2], refs[1] + refs[2])))
        t.start()
        t.join(timeout=60)
        assert not t.is_alive() and out == [True]
        ys.append(x * 4)
    for y, ref in zip(ys, refs):
        assert torch.equal(y, ref)  # (unwrap would pin each: the budget still holds after the block)
    assert len(ys) == 5 and s.stats.evictions > 0


def test_an_exception_from_a_python_policy_in_backward_surfaces():
    in_backward = []

    def broken_in_backward(e, pool, now):
        if in_backward:
            raise _PolicyFailed("in backward")
        return e.cost / e.nbytes

    room = 0.6 * _mlp_peak()
    model, data = __import__("models").make("mlp", 0)
    with dtr.budget(budget_above(room), policy=broken_in_backward, runtime="cpp") as s:
        loss = model(*data[0])
        in_backward.append(True)
        with pytest.raises(_PolicyFailed, match="in backward"):
            loss.backward()  # the search runs inside autograd's engine
    assert s.stats.evictions > 0


def test_a_python_policy_returning_a_non_number_is_a_clear_dtr_error():
    x = torch.randn(64, 64)
    with dtr.budget(budget_above(3 * 64 * 64 * 4), policy=lambda e, pool, now: None,
                    runtime="cpp"):
        ys = [x * 1, x * 2]
        with pytest.raises(dtr.DTRError, match=r"eviction policy .*<lambda>.* returned None"):
            ys.append(x * 3)
            ys.append(x * 4)


def test_the_pool_a_python_policy_sees_is_valid_only_during_the_call():
    kept = []

    def keep(e, pool, now):
        kept.append((e, pool, dict(pool.entries), pool.candidates, pool.candidate_bytes))
        return e.last_access

    x = torch.randn(64, 64)
    with dtr.budget(budget_above(3 * 64 * 64 * 4), policy=keep, runtime="cpp"):
        ys = [x * i for i in range(6)]
    assert kept
    e, pool, entries, candidates, candidate_bytes = kept[0]
    assert isinstance(e, dtr.policies.Entry) and e.sid in entries and e.sid in candidates
    assert candidate_bytes >= e.nbytes > 0 and e.resident and e.locks == 0
    with pytest.raises(dtr.DTRError, match="only during the call"):
        pool.candidates
    with pytest.raises(dtr.DTRError, match="only during the call"):
        pool.entries[e.sid + 1]
    for i, y in enumerate(ys):
        assert torch.equal(y, x * i)


def test_python_policies_with_threads_do_not_deadlock():
    # Note [The GIL under the runtime's lock]: the search takes the GIL under the runtime's
    # lock while other threads run ops on the same runtime (their ops release the GIL).
    errors = []
    kept = {k: [] for k in range(4)}  # all alive at the end, so that the budget needs evictions
    x = torch.randn(32, 32)

    def policy(e, pool, now):
        return e.cost / e.nbytes

    with dtr.budget(budget_above(40 * 32 * 32 * 4), policy=policy, runtime="cpp") as s:
        base = [x * i for i in range(8)]

        def work(k):
            try:
                for j in range(30):
                    kept[k].append(torch.tanh(base[k] + j))
                    assert torch.equal(kept[k][-1], torch.tanh(x * k + j))
                for j, y in enumerate(kept[k]):
                    assert torch.equal(y, torch.tanh(x * k + j))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors
    assert s.stats.evictions > 0


def test_item_backward_and_step_after_the_block_match_eager():
    def step(ctx):
        torch.manual_seed(0)
        m = _mlp()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        x = torch.randn(16, 8)
        with ctx():
            loss = torch.nn.functional.dropout(m(x), 0.2).pow(2).mean()
        value, text = loss.item(), repr(loss.detach())
        loss.backward()
        opt.step()  # (reading loss now would raise StaleInputError: its inputs changed)
        return value, text, [p.detach().clone() for p in m.parameters()]

    v0, r0, p0 = step(contextlib.nullcontext)
    v1, r1, p1 = step(lambda: dtr.testing.evict_everything(runtime="cpp"))
    assert v0 == v1 and r1 == f"DTRTensor({r0})"
    for a, b in zip(p0, p1):
        assert torch.equal(a, b) and not dtr.is_dtr_tensor(b)


# Note [Measured op scratch] on the C++ runtime: room for a kernel's scratch and for
# a seeded op's RNG state is made before it runs, so the allocator's own peak (the
# profiler's, dtr.measure.peak_memory) stays within the budget, not only dtr's count.

needs_meter = pytest.mark.skipif(not dtr.device_memory.cpu_counter_installed(),
                                 reason="the budget counts CPU memory with the counting allocator")


def _allocator_peak_under(budget, fn):
    """(fn's result, the bytes in use at the start + the profiler's peak above them)."""
    from dtr.measure import peak_memory

    def run():
        with dtr.budget(budget, runtime="cpp") as s:
            out = fn()
        return s, out

    base = live_bytes()
    (s, out), peak = peak_memory(run)
    return s, out, base + peak


@needs_meter
def test_conv_scratch_is_measured_then_reserved_and_the_allocator_stays_within_budget():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 48, 48)

    def chain():
        y = x
        for _ in range(6):
            y = torch.tanh(conv(y))
        return dtr.unwrap(y.sum())

    with torch.no_grad():
        eager = x
        for _ in range(6):
            eager = torch.tanh(conv(eager))
        eager = eager.sum()
    _allocator_peak_under(None, chain)  # first sight: measured
    assert any(v > 0 for v in _ext._C.measured_op_scratch())
    s, out, peak = _allocator_peak_under(None, chain)
    # Unlimited, dtr's peak is the allocator's: it reserved the measured scratch exactly.
    assert s.stats.peak_bytes == peak, (s.stats.peak_bytes, peak)
    above = peak - live_bytes()
    checked = 0
    for frac in (0.8, 0.6, 0.45):
        budget = budget_above(above * frac)
        try:
            s, out, peak = _allocator_peak_under(budget, chain)
        except dtr.BudgetExceededError:
            continue
        checked += 1
        assert s.stats.evictions > 0
        assert torch.equal(out, eager)
        assert peak <= budget, (frac, peak, budget, peak - budget)
    assert checked


@needs_meter
def test_seeded_ops_reserve_and_count_their_rng_states():
    # A CPU generator's state is a 5 KiB tensor each bernoulli's recipe keeps: on
    # 1 KiB values the states are most of the memory, and a budget that made room
    # only for the outputs would be passed by each capture.
    state_bytes = torch.get_rng_state().nbytes
    x = torch.randn(256, requires_grad=True)

    def chain():
        y = x
        for _ in range(12):
            y = y + torch.bernoulli(torch.sigmoid(y))
        return dtr.unwrap(y.sum()).detach()

    torch.manual_seed(1)
    eager = x
    for _ in range(12):
        eager = eager + torch.bernoulli(torch.sigmoid(eager))
    eager = eager.sum().detach()
    torch.manual_seed(1)
    base = live_bytes()
    s, out, peak = _allocator_peak_under(None, chain)
    assert torch.equal(out, eager)
    assert s.stats.peak_bytes >= peak >= base + 12 * state_bytes  # the recipes hold the states
    budget = budget_above(12 * state_bytes + 4 * x.nbytes + state_bytes + 4096)
    torch.manual_seed(1)
    s, out, peak = _allocator_peak_under(budget, chain)
    assert torch.equal(out, eager)
    assert peak <= budget, (peak, budget, peak - budget)
    assert s.stats.evictions > 0


# Note [In-place ops in the C++ runtime]: a value written in place gets a recipe (old base ->
# view chain -> the op), so it is evicted and recomputed like any other value.

def test_values_written_in_place_are_evicted_and_recomputed_bit_exactly():
    x = torch.randn(4, 6)
    ey = x.relu()
    ez = ey + 1
    ey.mul_(2)
    ev = ey[0]
    ed = ey.detach()
    et = ey.t()
    ev.add_(1)
    with dtr.testing.evict_everything(runtime="cpp") as s:
        y = x.relu()
        z = y + 1           # read before the writes: recomputed from the old value
        y.mul_(2)
        v = y[0]
        d = y.detach()
        t = y.t()
        v.add_(1)           # through a view, after another write
        for got, want in [(y, ey), (v, ev), (d, ed), (t, et), (z, ez)]:
            assert torch.equal(dtr.unwrap(got), want)
            assert dtr.unwrap(got).stride() == want.stride()
    assert s.stats.remat_by_op["aten.mul_.Tensor"][0] >= 1
    assert s.stats.remat_by_op["aten.add_.Tensor"][0] >= 1


def test_dropout_masks_are_recomputed_exactly_with_their_random_numbers():
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(32, 32, requires_grad=True)

    def step():
        h = x @ w
        mask = torch.empty_like(h).bernoulli_(0.7).div_(0.7)  # dropout's mask, spelled out
        h = torch.nn.functional.relu(h * mask, inplace=True)
        return torch.nn.functional.dropout(h, 0.5, training=True).tanh().sum()

    torch.manual_seed(7)
    ref = step()
    g_ref = torch.autograd.grad(ref, (x, w))
    after_ref = torch.get_rng_state()
    torch.manual_seed(7)
    with dtr.testing.evict_everything(runtime="cpp") as s:
        out = step()
        g = torch.autograd.grad(out, (x, w))
        got = dtr.unwrap(out)
    assert torch.equal(got, ref.detach())
    assert all(torch.equal(a, b) for a, b in zip(g, g_ref))
    assert torch.equal(torch.get_rng_state(), after_ref)
    assert s.stats.remat_by_op["aten.bernoulli_.float"][0] >= 1


def test_out_arguments_get_recipes():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    with dtr.testing.evict_everything(runtime="cpp") as s:
        y = a * 1
        torch.mul(a, b, out=y)
        torch.add(y[0], b[1], out=y[1])
        got = dtr.unwrap(y)
    want = a * b
    want[1] = want[0] + b[1]
    assert torch.equal(got, want)
    assert s.stats.remat_by_op["aten.mul.out"][0] >= 1


def test_foreach_in_place_ops_write_every_list_element():
    xs = [torch.randn(8), torch.randn(3, 3)]
    ys = [torch.randn(8), torch.randn(3, 3)]
    with dtr.testing.evict_everything(runtime="cpp") as s:
        a = [x * 2 for x in xs]
        b = [y + 0 for y in ys]
        torch._foreach_add_(a, b, alpha=3)
        torch._foreach_mul_(a, 0.5)
        got = [dtr.unwrap(t) for t in a]
    for g, x, y in zip(got, xs, ys):
        assert torch.equal(g, torch.add(x * 2, y, alpha=3) * 0.5)
    assert s.stats.remat_by_op["aten._foreach_add_.List"][0] >= 1


def test_recomputing_a_chain_of_in_place_ops_holds_one_buffer():
    # Note [Stealing on recompute]: each write of the chain takes over its input's memory.
    x = torch.randn(256, 256)  # 256 KiB
    nbytes = x.numel() * x.element_size()
    want = x.clone()
    with dtr.testing.evict_everything(runtime="cpp") as s:
        y = x * 1
        for k in range(8):
            y.mul_(1.5).add_(k)
            want.mul_(1.5).add_(k)
        before = s.stats.remat_by_op["aten.add_.Tensor"][0]
        got, peak = dtr.measure.peak_memory(dtr.unwrap, y)
        recomputed = s.stats.remat_by_op["aten.add_.Tensor"][0] - before
    assert torch.equal(got, want)
    assert recomputed == 8
    assert peak <= nbytes + 4096, peak  # copying each old value would need 2x


def test_writes_into_an_escaped_value_stay_exact():
    x = torch.randn(6)
    with dtr.testing.evict_everything(runtime="cpp"):
        y = x * 2
        plain = dtr.unwrap(y)  # pinned from now on: no recipe can replace its value
        z = y + 1
        y.add_(1)
        assert torch.equal(dtr.unwrap(y), x * 2 + 1)
        assert torch.equal(dtr.unwrap(z), x * 2 + 1)
        assert torch.equal(plain, x * 2 + 1)  # as in eager: the escaped tensor is y's memory


# Note [Direct registrations] (csrc/direct_registrations.cpp): an op with a
# CompositeImplicitAutograd kernel and a kernel on every dense backend torch was built
# with takes the backend kernel under eager's Autograd<Backend>; on a wrapper it must
# too, not the decomposition (mish_backward's differs from the CPU kernel in the last
# bits), so the fallback is registered directly on the dtr key for it.

_has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
_DENSE_BACKENDS = ["CPU", "CUDA", "XPU", "MPS", "PrivateUse1"]


def _implicit_ops_with_backend_kernels():
    built = [b for b in _DENSE_BACKENDS if _has_kernel("aten::empty.memory_format", b)]
    return sorted(
        n for n in torch._C._dispatch_get_all_op_names()
        if _has_kernel(n, "CompositeImplicitAutograd")
        and all(_has_kernel(n, b) for b in built))


def test_ops_with_an_implicit_and_a_backend_kernel_get_the_dtr_key_directly():
    with dtr.budget(None, runtime="cpp"):
        pass  # opening a block registers the ops
    ops = _implicit_ops_with_backend_kernels()
    assert {"aten::mish_backward", "aten::silu_backward"} <= set(ops)
    assert [n for n in ops if not _has_kernel(n, "PrivateUse3")] == []


def _computed_kernel(table, key):
    """The kernel the dispatch table `table` holds for `key`, any backend fallback as one."""
    for line in table.splitlines():
        if line.startswith(key + ":"):
            where = line[len(key) + 1:].strip()
            return "backend fallback" if where.endswith("[backend fallback]") else where
    return None


def test_autograd_above_a_wrapper_takes_the_kernel_autograd_takes_above_a_plain_tensor():
    # Every op, not a sample: where the autograd keys of the dense backends torch was built
    # with agree, the dtr key's must agree with them (Autograd kernel, decomposition or
    # autograd fallback), so forward, backward and double backward are eager's.
    with dtr.budget(None, runtime="cpp"):
        pass  # opening a block registers the ops
    built = [b for b in _DENSE_BACKENDS if _has_kernel("aten::empty.memory_format", b)]
    differ = []
    for name in torch._C._dispatch_get_all_op_names():
        table = torch._C._dispatch_dump_table(name)
        eager = {_computed_kernel(table, "Autograd" + b) for b in built}
        ours = _computed_kernel(table, "AutogradPrivateUse3")
        if len(eager) == 1 and ours != next(iter(eager)) and name not in _INDEX_TENSOR_COMPOSITES:
            differ.append((name, ours, eager))
    assert differ == []
    # Those have their own kernel, which runs the same decomposition after escaping
    # their integer tensor arguments (tests/test_conformance.py checks them against eager).
    for name in _INDEX_TENSOR_COMPOSITES:
        table = torch._C._dispatch_dump_table(name)
        assert "index_tensor_composites.cpp" in _computed_kernel(table, "AutogradPrivateUse3"), name


# Note [Unboxed kernels] (csrc/unboxed_kernels.cpp): the commonest functional ops get an
# unboxed kernel on the dtr key, which must behave as the boxed fallback does.

_UNBOXED = ["aten::add.Tensor", "aten::mul.Tensor", "aten::mm", "aten::addmm", "aten::t",
            "aten::detach", "aten::view", "aten::expand", "aten::select.int",
            "aten::slice.Tensor", "aten::sum.dim_IntList", "aten::_softmax",
            "aten::_softmax_backward_data", "aten::tanh_backward", "aten::clone",
            "aten::cat", "aten::stack", "aten::split.Tensor", "aten::unbind.int"]
# In place, out=, metadata-changing, several results, optional-tensor lists: the boxed path.
_BOXED = ["aten::add_.Tensor", "aten::add.out", "aten::resize_", "aten::native_layer_norm",
          "aten::index.Tensor"]


def _dtr_kernel(name):
    for line in torch._C._dispatch_dump_table(name).splitlines():
        if line.startswith("PrivateUse3:"):
            return line
    return None


def test_the_commonest_functional_ops_get_unboxed_kernels_and_others_stay_boxed():
    with dtr.budget(None, runtime="cpp"):
        pass  # opening a block registers the ops
    assert [n for n in _UNBOXED if "dtr unboxed kernel" not in (_dtr_kernel(n) or "")] == []
    assert [n for n in _BOXED if "dtr unboxed kernel" in (_dtr_kernel(n) or "")] == []


def _unboxed_program(x, w, b):
    h = torch.addmm(b, x, w.t()).tanh()              # plain-only t() of a parameter
    h = h.view(-1).view(h.shape).expand(2, *h.shape)[1]
    h = (h * 3 + h.select(0, 1).unsqueeze(0)).clone()
    h = torch.softmax(h[:, 1:], dim=1)
    parts = [p * 2 for p in h.chunk(2, dim=1)] + list(h.unbind(1))  # list results
    h = torch.cat([torch.stack([h, h]).sum(0)] + parts[:2], dim=1)  # list arguments
    return h.sum(dim=0).sum() + parts[2].sum()


@pytest.mark.parametrize("call", ["unboxed", "boxed"])
def test_ops_through_unboxed_kernels_match_eager_after_evicting_everything(call):
    # "boxed": the same ops through torch.ops (the dispatcher boxes the arguments and
    # unboxes them again for the kernel), as a Python caller or a compiled graph calls them.
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    w = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, requires_grad=True)

    def program(x, w, b):
        if call == "unboxed":
            return _unboxed_program(x, w, b)
        aten = torch.ops.aten
        h = aten.tanh.default(aten.addmm.default(b, x, aten.t.default(w)))
        h = aten.mul.Tensor(aten.view.default(h, [-1]), 3)
        h = aten.cat.default([aten.stack.default([h, h]).view(-1)] + aten.split.Tensor(h, 4))
        return aten.sum.dim_IntList(aten.add.Tensor(h, aten.unbind.int(h.view(2, -1))[0].repeat(2), alpha=2), [0])

    expected = program(x, w, b)
    expected_grads = torch.autograd.grad(expected, [w, b])
    with dtr.testing.evict_everything(runtime="cpp"):
        out = program(x, w, b)
        grads = [dtr.unwrap(g) for g in torch.autograd.grad(out, [w, b])]
        out = dtr.unwrap(out)
    assert torch.equal(out, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))


def test_a_parameter_used_only_through_an_unboxed_view_gets_a_plain_grad():
    # Linear's weight reaches the runtime only as weight.t() (a plain-only view, called
    # below dtr by the unboxed kernel): Note [Plain gradients] still applies to it.
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    expected = torch.autograd.grad(lin(x).sum(), list(lin.parameters()))
    with dtr.budget(None, runtime="cpp"):
        lin(x).sum().backward()
    for p, e in zip(lin.parameters(), expected):
        assert not dtr.is_dtr_tensor(p.grad) and torch.equal(p.grad, e)


def test_a_budget_error_from_an_unboxed_kernel_is_a_dtr_error_naming_the_op():
    x = torch.randn(64, 64)
    with pytest.raises(dtr.BudgetExceededError) as info:
        with dtr.budget(budget_above(1024), runtime="cpp"):
            (x * 2).tanh()
    assert info.value.op == "aten.mul.Tensor" and info.value.needed_bytes >= x.nbytes
    # The runtime is left usable: the same program runs with room.
    with dtr.budget(None, runtime="cpp"):
        assert torch.equal(dtr.unwrap((x * 2).tanh()), (x * 2).tanh())


# Note [Composites that read index tensors] (csrc/index_tensor_composites.cpp).
_INDEX_TENSOR_COMPOSITES = {"aten::tensor_split.tensor_indices_or_sections", "aten::ctc_loss.Tensor"}


def _grads_or_error(fn, inputs, double):
    """fn's output and its gradients (and second gradients when `double`), or the error."""
    try:
        out = fn(*inputs)
        wrt = [t for t in inputs if t.requires_grad]
        # The first backward runs without grad mode: mish's and silu's derivatives
        # call mish_backward and silu_backward only then.
        result = [out, *torch.autograd.grad(out.sum(), wrt)]
        if double:
            grads = torch.autograd.grad(fn(*inputs).sum(), wrt, create_graph=True)
            result += [*grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), wrt)]
        return [dtr.unwrap(t).detach().clone() if dtr.is_dtr_tensor(t) else t.detach().clone()
                for t in result]
    except RuntimeError as e:
        return (type(e), str(e).split("\n")[0])


def _leaf(*shape):
    # Wide values: mish_backward's decomposition differs from the CPU kernel at many.
    return torch.empty(*shape, dtype=torch.float64).uniform_(-9, 9).requires_grad_()


# A sample of the ops above, through their public callers and called directly (these
# have no derivative of their own in eager: the error must be eager's too).
IMPLICIT_WITH_BACKEND_SAMPLES = {
    "mish": (torch.nn.functional.mish, lambda: [_leaf(7, 33)], True),
    "mish_float32": (torch.nn.functional.mish, lambda: [_leaf(7, 33).float()], True),
    "silu": (torch.nn.functional.silu, lambda: [_leaf(7, 33)], True),
    "mish_backward": (torch.ops.aten.mish_backward, lambda: [_leaf(5, 9), _leaf(5, 9)], False),
    "silu_backward": (torch.ops.aten.silu_backward, lambda: [_leaf(5, 9), _leaf(5, 9)], False),
    "native_channel_shuffle": (lambda x: torch.native_channel_shuffle(x, 2),
                               lambda: [_leaf(2, 6, 3, 3)], False),
}
# Ops registered only where this torch has a kernel for them on every dense backend (a
# CUDA build has no CUDA native_channel_shuffle): elsewhere the wrapper decomposes, so
# only the forward (a copy) is eager's; its backward works where eager's raises.
_REGISTERED_ONLY_WITH_EVERY_BACKEND = {"native_channel_shuffle": "aten::native_channel_shuffle"}


@pytest.mark.parametrize("evict", [False, True], ids=["unlimited", "evict_everything"])
@pytest.mark.parametrize("name", sorted(IMPLICIT_WITH_BACKEND_SAMPLES))
def test_ops_with_an_implicit_and_a_backend_kernel_match_eager_bit_for_bit(name, evict):
    fn, make_inputs, double = IMPLICIT_WITH_BACKEND_SAMPLES[name]
    torch.manual_seed(0)
    inputs = [t.detach().requires_grad_(t.requires_grad) for t in make_inputs()]
    expected = _grads_or_error(fn, inputs, double)
    ctx = (lambda: dtr.testing.evict_everything(runtime="cpp")) if evict else (
        lambda: dtr.budget(None, runtime="cpp"))
    with ctx():
        got = _grads_or_error(fn, inputs, double)
    op = _REGISTERED_ONLY_WITH_EVERY_BACKEND.get(name)
    if op is not None and op not in _implicit_ops_with_backend_kernels():
        with ctx():
            got = [dtr.unwrap(fn(*inputs)).detach()]
        expected = [fn(*inputs).detach()]
    if isinstance(expected, tuple):
        assert got == expected
    else:
        assert not isinstance(got, tuple), got
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_default_runtime_is_cpp_where_the_extension_is_built(monkeypatch):
    # Note [Two runtimes]: C++ by default, the Python reference where dtr._C is not built.
    monkeypatch.delenv("DTR_RUNTIME", raising=False)
    assert dtr.budget(None).runtime_kind == "cpp"
    monkeypatch.setenv("DTR_RUNTIME", "python")
    assert dtr.budget(None).runtime_kind == "python"
    monkeypatch.delenv("DTR_RUNTIME")
    monkeypatch.setattr(_ext, "available", lambda: False)
    assert dtr.budget(None).runtime_kind == "python"


def test_an_op_allocating_nothing_after_the_block_notes_no_peak():
    # Note [Peaks at ops that allocate nothing]: torch.equal on a loss after the block
    # (the differential harness does it) noted the whole process's memory, grown since,
    # as the session's peak, and counted equal as unplanned (it has no meta kernel).
    x = torch.randn(256)
    with dtr.budget(budget_above(64 * 1024), runtime="cpp") as s:
        loss = (x * 2).sum()
    grown = torch.empty(1 << 20)  # allocated after the block
    assert torch.equal(loss, loss)
    assert loss.item() == loss.item()
    assert s.stats.peak_bytes <= s.budget_bytes, (s.stats.peak_bytes, s.budget_bytes)
    assert s.stats.unplanned_ops == 0
    del grown


def test_a_seeded_in_place_op_makes_room_for_its_rng_state():
    # Note [Room for an in-place op]: bernoulli_ (dropout) keeps a 5 KiB RNG state in its
    # recipe; the C++ runtime made no room for it and passed a tight budget by it.
    x = torch.randn(2048)  # 8 KiB per value
    torch.manual_seed(0)
    eager = [x + 1]
    eager.append(eager[-1] + 1)
    eager.append(eager[-1] + 1)
    eager[-1].bernoulli_(0.5)
    torch.manual_seed(0)
    with dtr.budget(budget_above(3 * 8192 + 100), runtime="cpp") as s:
        ys = [x + 1]
        ys.append(ys[-1] + 1)
        ys.append(ys[-1] + 1)
        ys[-1].bernoulli_(0.5)
    peak, evictions = s.stats.peak_bytes, s.stats.evictions
    assert peak <= s.budget_bytes, (peak, s.budget_bytes)
    assert evictions > 0
    assert all(torch.equal(a, dtr.unwrap(b)) for a, b in zip(eager, ys))


def test_bookkeeping_memory_is_returned_once_its_objects_die():
    # Note [Bookkeeping memory]: the records live in slabs of their own; a block's
    # thousands of values map new slabs, and once they die every empty slab but one per
    # size class is released: kept mapped for reuse up to 64 slabs (Note [Kept empty
    # slabs]), unmapped beyond that.
    gc.collect()
    before = _ext._C.bookkeeping_slabs()
    x = torch.randn(4, requires_grad=True)
    with dtr.budget(None, runtime="cpp"):
        ys = [x]
        for _ in range(20000):
            ys.append(ys[-1] * 1.0)
        during = _ext._C.bookkeeping_slabs()
        total = ys[-1].sum()
    total.backward()
    assert torch.equal(x.grad, torch.ones(4))
    del ys, total
    gc.collect()
    after = _ext._C.bookkeeping_slabs()
    assert during > before + 10, (before, during)  # 20,000 recipes, cells, records, wrappers
    assert after <= before + 64, (before, during, after)  # at most one kept per size class
    assert _ext._C.bookkeeping_kept_slabs() <= 64


def test_step_recording_is_refused_where_it_does_not_apply():
    # Note [Recording steps for lookahead]: only a lookahead runtime records, one step
    # at a time; dtr/cpp_runtime.py calls these when a block opens and closes.
    from dtr.policies import SearchOptions

    rt = _ext._C.Runtime(None, "msps_sqrt", SearchOptions(), False)
    with pytest.raises(RuntimeError, match="only a runtime with policy=\"lookahead\" records steps"):
        rt.begin_step(None)
    assert rt.end_step() is None  # nothing was being recorded
    la = _ext._C.Runtime(None, "lookahead", SearchOptions(), False)
    la.begin_step(None)
    with pytest.raises(RuntimeError, match="already being recorded"):
        la.begin_step(None)
    plan = la.end_step()
    assert plan.num_ops == 0 and plan.num_storages == 0 and "0 ops" in repr(plan)
    assert la.end_step() is None


def test_a_native_policy_never_builds_the_pool_id_table():
    # Note [The id index is built when first asked]: the runtime reaches its pool entries
    # through its storage records; building the id table would cost every op a hash insert
    # and erase. A step that evicts and recomputes, in-place ops and an escape included,
    # must not build it, and the pool's invariants (checked after, which builds it) hold.
    torch.manual_seed(0)
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(32, 32)
    ref = None
    for runtime in ("eager", "cpp"):
        ctx = (dtr.budget(budget_above(10 * 32 * 32 * 4), runtime="cpp", policy="msps_sqrt")
               if runtime == "cpp" else contextlib.nullcontext())
        with ctx as s:
            y = x
            for _ in range(12):
                y = y @ w
                y.mul_(0.5)
                y = torch.tanh(y)
            loss = y.sum()
            loss.backward()
            value = loss.item()
            if runtime == "cpp":
                assert s.stats.evictions > 0 and s.stats.rematerializations > 0
                assert not s.runtime._rt._pool_indexed()
                s.runtime._rt._check_pool()
                assert s.runtime._rt._pool_indexed()
        grad, w.grad = w.grad.clone(), None
        if ref is None:
            ref = (value, grad)
    assert value == ref[0] and torch.equal(grad, ref[1])


def test_gradients_of_a_weight_used_many_times_add_up_in_place_as_in_eager():
    # Note [Gradients accumulate in place]: autograd's input buffer sums a weight's
    # gradients in place where only it can see the sum. A wrapper had no storage, so each
    # sum was a new tensor: the allocator's peak (the profiler's) was one gradient above
    # eager's. Now it is eager's, and outside a backward pass a wrapper still has none.
    from dtr.measure import peak_memory

    torch.manual_seed(0)
    w = torch.randn(256, 256, requires_grad=True)  # 256 KiB of gradient
    xs = [torch.randn(4, 256) for _ in range(8)]

    def step():
        (sum((torch.tanh(x * 1.0) @ w).sum() for x in xs)).backward()

    def in_block():
        with dtr.budget(None, runtime="cpp"):
            step()

    step()
    ref, w.grad = w.grad, None
    _, eager_peak = peak_memory(step)
    w.grad = None
    _, cpp_peak = peak_memory(in_block)
    assert torch.equal(w.grad, ref)
    gradient = w.numel() * w.element_size()
    assert cpp_peak < eager_peak + gradient // 4, (cpp_peak, eager_peak)
    with dtr.budget(None, runtime="cpp"):
        y = torch.tanh(xs[0] * 1.0)
        with torch.no_grad():
            assert not torch._C._has_storage(y)

