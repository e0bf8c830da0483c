"""The C++ runtime (runtime="cpp"): its own mechanisms, beyond the shared differential suite.

The shared tests (test_models.py and others marked with the ``runtime`` fixture) run on
both runtimes; these check what only the C++ path has: the wrapper TensorImpl, the TLS
capture of plain-only ops, the boxed fallback's direct registrations, the iterative
recompute, and its error paths.
"""
import threading

import pytest
import torch

import dtr
from dtr import _ext
from harness import budget_above, live_bytes

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


def test_unsupported_metadata_op_is_refused_clearly():
    x = torch.randn(3, 4)
    with dtr.budget(None, runtime="cpp"):
        y = x * 2
        with pytest.raises(dtr.UnsupportedOpError, match="unsqueeze_"):
            y.unsqueeze_(0)


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


def test_the_key_is_released_after_the_block():
    with dtr.budget(None, runtime="cpp"):
        pass
    # A stray backend bit would send this to a backend that does not exist (CPP_DISPATCH pitfall 6).
    assert torch.equal(torch.ones(2).fill_(3), torch.full((2,), 3.0))


def test_unknown_runtime_and_python_policy_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown runtime"):
        dtr.budget(None, runtime="rust")
    monkeypatch.setenv("DTR_RUNTIME", "java")
    with pytest.raises(ValueError, match="DTR_RUNTIME"):
        dtr.budget(None)
    with pytest.raises(ValueError, match="native policies"):
        dtr.budget(None, policy=lambda e, p, now: 0.0, runtime="cpp")


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
