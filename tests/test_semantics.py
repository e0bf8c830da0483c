"""Each corner case of PITFALLS.md, checked against eager under the harshest recomputation."""
import io

import pytest
import torch
import torch.nn.functional as F

import dtr
from harness import is_plain
from dtr.testing import evict_everything

pytestmark = pytest.mark.usefixtures("runtime")  # Note [One suite, two runtimes]


def test_mutation_through_a_view_changes_the_base():
    x = torch.randn(3, 4, requires_grad=True)

    def f():
        y = x * 2
        v = y[0]
        v.mul_(10)
        return (y * y).sum(), y

    ref, ref_y = f()
    with evict_everything():
        out, y = f()
        assert torch.equal(dtr.unwrap(y), ref_y.detach())
    assert torch.equal(dtr.unwrap(out), ref.detach())
    (g_ref,) = torch.autograd.grad(ref, x)
    (g,) = torch.autograd.grad(out, x)
    assert torch.equal(g, g_ref)


def test_recomputing_in_place_ops_reuses_the_old_buffer():
    # Note [Stealing on recompute]: rebuilding y = ((x * 2) + 1) * 3, written in place, holds
    # one buffer at a time, as its first run did, and a value read before the writes (z)
    # is still recomputed from the original, not from the buffer the writes took over.
    x = torch.randn(128, 256)  # 128 KiB
    nbytes = x.numel() * x.element_size()
    with evict_everything() as s:
        y = x * 2
        z = y * 1
        y.add_(1)
        y.mul_(3)
        v, peak = dtr.measure.peak_memory(dtr.unwrap, y)
        assert torch.equal(v, (x * 2 + 1) * 3)
        assert peak <= nbytes + 4096, peak  # copying the old value would need 2-3x
        assert torch.equal(dtr.unwrap(z), x * 2)
    assert s.stats.remat_by_op["aten.add_.Tensor"][0] >= 1
    assert s.stats.remat_by_op["aten.mul_.Tensor"][0] >= 1


def test_detached_alias_sees_in_place_change():
    x = torch.randn(5)
    with evict_everything():
        y = x + 1
        d = y.detach()
        t = y.t() if y.dim() > 1 else y[1:]
        y.add_(3)
        assert torch.equal(dtr.unwrap(d), x + 4)
        assert torch.equal(dtr.unwrap(t), (x + 4)[1:])


def test_in_place_relu_keeps_recompute_exact():
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)

    def f():
        h = x @ w
        h2 = F.relu(h * 1.5, inplace=True)
        return (h2 @ w).tanh().sum()

    ref = f()
    ref.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with evict_everything() as s:
        out = f()
        out.backward()
    assert torch.equal(dtr.unwrap(out), ref.detach())
    assert torch.equal(x.grad, gx) and torch.equal(w.grad, gw)
    assert s.stats.rematerializations > 0


def test_out_variant_into_dtr_and_plain_tensors():
    a, b = torch.randn(4), torch.randn(4)
    plain = torch.empty(4)
    with evict_everything():
        c = a * 1  # a dtr tensor (grad mode on, tensor input)
        torch.add(a, b, out=c)
        torch.mul(c, b, out=plain)
        assert torch.equal(dtr.unwrap(c), a + b)
    assert is_plain(plain)
    assert torch.equal(plain, (a + b) * b)


def test_foreach_in_place_on_dtr_tensors():
    xs = [torch.randn(3) for _ in range(3)]
    ys = [torch.randn(3) for _ in range(3)]
    with evict_everything():
        ws = [x * 1 for x in xs]
        torch._foreach_add_(ws, ys, alpha=2)
        torch._foreach_mul_(ws, 3.0)
        for w, x, y in zip(ws, xs, ys):
            assert torch.equal(dtr.unwrap(w), (x + 2 * y) * 3.0)


def test_in_place_ops_over_many_tensors_and_many_views_of_one():
    # Note [Maps of one op] (csrc/small_map.h): an in-place op's maps index themselves past 16
    # entries; here 40 written tensors, and 40 live views of one written storage to rebind.
    xs = [torch.randn(3) for _ in range(40)]
    ys = [torch.randn(3) for _ in range(40)]
    base = torch.randn(40, 3)
    with evict_everything():
        ws = [x * 1 for x in xs]
        torch._foreach_add_(ws, ys, alpha=2)
        b = base * 1
        rows = [b[i] for i in range(40)]
        b.mul_(3.0)
        rows[7].add_(1.0)
        got_ws = [dtr.unwrap(w) for w in ws]
        got_rows = [dtr.unwrap(r) for r in rows]
        got_b = dtr.unwrap(b)
    want_b = base * 3.0
    want_b[7] += 1.0
    assert torch.equal(got_b, want_b)
    for i, r in enumerate(got_rows):
        assert torch.equal(r, want_b[i])
    for w, x, y in zip(got_ws, xs, ys):
        assert torch.equal(w, x + 2 * y)


def test_batchnorm_running_stats_updated_once():
    torch.manual_seed(0)
    bn_ref = torch.nn.BatchNorm1d(6)
    bn = torch.nn.BatchNorm1d(6)
    bn.load_state_dict(bn_ref.state_dict())
    x = torch.randn(10, 6, requires_grad=True)
    ref = (bn_ref(x * 2) ** 2).sum()
    ref.backward()
    with evict_everything() as s:
        out = (bn(x * 2) ** 2).sum()
        out.backward()
    assert s.stats.rematerializations > 0
    assert torch.equal(dtr.unwrap(out), ref.detach())
    for k, v in bn_ref.state_dict().items():
        assert torch.equal(bn.state_dict()[k], v), k


def test_dropout_replays_and_leaves_rng_stream_like_eager():
    x = torch.randn(64, requires_grad=True)
    torch.manual_seed(5)
    ref = (F.dropout(x * 3, 0.5) * F.dropout(x, 0.3)).sum()
    ref.backward()
    g_ref = x.grad.clone()
    after_ref = torch.rand(3)
    x.grad = None
    torch.manual_seed(5)
    with evict_everything() as s:
        out = (F.dropout(x * 3, 0.5) * F.dropout(x, 0.3)).sum()
        out.backward()
    after = torch.rand(3)
    assert s.stats.rematerializations > 0
    assert torch.equal(dtr.unwrap(out), ref.detach())
    assert torch.equal(x.grad, g_ref)
    assert torch.equal(after, after_ref)


def test_explicit_generator_is_respected():
    x = torch.rand(32)
    g_ref = torch.Generator().manual_seed(7)
    ref = torch.bernoulli(x * 0.5, generator=g_ref)
    ref_next = torch.rand(2, generator=g_ref)
    global_before = torch.get_rng_state()
    g = torch.Generator().manual_seed(7)
    with evict_everything():
        y = torch.bernoulli(x * 0.5, generator=g) * 1.0
        assert torch.equal(dtr.unwrap(y), ref)
    assert torch.equal(torch.rand(2, generator=g), ref_next)
    assert torch.equal(torch.get_rng_state(), global_before)


def test_multi_output_op_with_none_outputs():
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    go = torch.randn(2, 4, 3, 3)
    ref = torch.ops.aten.convolution_backward(go, x, w, [4], [1, 1], [0, 0], [1, 1], False,
                                              [0, 0], 1, [False, True, True])
    with evict_everything():
        gx = go * 1
        out = torch.ops.aten.convolution_backward(gx, x, w, [4], [1, 1], [0, 0], [1, 1], False,
                                                  [0, 0], 1, [False, True, True])
        assert out[0] is None
        assert torch.equal(dtr.unwrap(out[1] + 0), ref[1])
        assert torch.equal(dtr.unwrap(out[2] * 1), ref[2])


def test_multi_output_views_split_and_max():
    x = torch.randn(6, 4)
    with evict_everything():
        y = x * 2
        a, b = y.split(3)
        vals, idx = y.max(dim=1)
        assert torch.equal(dtr.unwrap(a + b), (x * 2)[:3] + (x * 2)[3:])
        assert torch.equal(dtr.unwrap(vals), (x * 2).max(dim=1).values)
        assert torch.equal(dtr.unwrap(idx), (x * 2).max(dim=1).indices)


def test_non_tensor_results_pass_through():
    x = torch.randn(3, 3)
    with evict_everything():
        y = x * 2
        assert y.sum().item() == (x * 2).sum().item()
        assert torch.equal(y, x * 2) is True
        assert y.shape == (3, 3)
        assert y.tolist() == (x * 2).tolist()


def test_gradients_are_plain_and_concrete():
    m = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with evict_everything():
        m(x).pow(2).sum().backward()
        m(x).pow(2).sum().backward()  # accumulation into an existing plain .grad
    for p in m.parameters():
        assert is_plain(p.grad)
    ref = torch.nn.Linear(4, 3)
    ref.load_state_dict(m.state_dict())
    ref(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    for p, q in zip(m.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_stale_plain_input_raises_instead_of_recomputing_wrong():
    w = torch.randn(4, requires_grad=True)
    with evict_everything():
        y = w * 2  # evicted right away; its recipe reads w
        with torch.no_grad():
            w.add_(1.0)
        with pytest.raises(dtr.StaleInputError, match="modified in place"):
            y.sum()


def test_escapes_behave_like_plain_tensors(tmp_path):
    x = torch.randn(3, 2)
    with evict_everything():
        y = x * 3
        z = (y + 1).sum()
    ref_y = x * 3
    assert z.item() == (ref_y + 1).sum().item()
    assert (y.numpy() == ref_y.numpy()).all()
    assert y.tolist() == ref_y.tolist()
    path = tmp_path / "t.pt"
    torch.save(y, path)
    loaded = torch.load(path)
    assert is_plain(loaded) and torch.equal(loaded, ref_y)
    ptr = y.data_ptr()
    assert ptr != 0 and ptr == y.data_ptr()
    later = y * 2 + torch.ones(3, 2)
    assert torch.equal(dtr.unwrap(later), ref_y * 2 + 1)
    plain = dtr.unwrap(y)
    assert is_plain(plain) and torch.equal(plain, ref_y)
    assert dtr.unwrap(x) is x


def test_backward_and_item_after_the_block():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    with dtr.budget(None):
        loss = lin(x).tanh().sum()
    value = loss.item()
    loss.backward()
    ref = torch.nn.Linear(4, 4)
    ref.load_state_dict(lin.state_dict())
    ref_loss = ref(x).tanh().sum()
    ref_loss.backward()
    assert value == ref_loss.item()
    assert torch.equal(lin.weight.grad, ref.weight.grad)


def test_metadata_inplace_on_plain_tensors_runs_as_is():
    # cuDNN's LSTM probes its flat weight buffer with empty(0).set_(param storage):
    # only plain tensors take part, so dtr runs it unchanged instead of refusing it.
    w = torch.randn(6, requires_grad=True)
    with dtr.budget(None):
        buf = torch.empty(0).set_(w.untyped_storage())
        y = w * 2
    assert is_plain(buf) and buf.shape == (6,) and torch.equal(buf, w.detach())
    assert torch.equal(dtr.unwrap(y), w.detach() * 2)


def test_deepcopy_and_repr():
    import copy

    x = torch.randn(2)
    with dtr.budget(None):
        y = x + 1
    c = copy.deepcopy(y)
    assert is_plain(c) and torch.equal(c, x + 1)
    assert "DTRTensor" in repr(y)


def test_recompute_outside_dispatch_records_no_autograd_graph():
    # dtr.unwrap (and the gradient hook) recompute outside __torch_dispatch__;
    # a grad_fn there would keep evicted inputs alive behind the budget's back.
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(8, 8)
    with evict_everything():
        y = torch.tanh(x @ w)
        value = dtr.unwrap(y)
    assert value.grad_fn is None and not value.requires_grad
    assert torch.equal(value, torch.tanh(x @ w).detach())


def _versions_through_writes(x):
    # Every tensor's _version after each write, through the tensor, a view and a detached
    # alias. Autograd's saved-tensor checks compare these counters.
    y = x * 2
    v = y[0]
    d = y.detach()
    z = y + 1
    s = z.sigmoid()  # saves its output for backward
    seen = []

    def note():
        seen.append((y._version, v._version, d._version, z._version, s._version))

    note()
    v.mul_(3)
    note()
    y.add_(1)
    note()
    d.zero_()
    note()
    z.sub_(1)
    note()
    return seen, s


def test_version_counters_move_as_in_eager():
    # Note [Wrappers share their value's version counter] (csrc/wrapper.cpp): a wrapper's
    # counter starts at 0 and moves only with writes through it or its aliases, evicted
    # and recomputed or not.
    x = torch.randn(3, 4, requires_grad=True)
    ref, _ = _versions_through_writes(x)
    with evict_everything():
        seen, s = _versions_through_writes(x)
        s.sum().backward()  # s was never written: backward does not complain
    assert seen == ref


def test_a_write_into_a_saved_tensor_fails_backward_as_in_eager():
    x = torch.randn(3, 4, requires_grad=True)

    def write_after_save():
        y = (x * 2).sigmoid()
        y.add_(1)
        return y.sum()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        write_after_save().backward()
    with evict_everything():
        loss = write_after_save()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_outputs_made_in_inference_mode_are_inference_tensors_as_in_eager():
    x = torch.randn(3, 4, requires_grad=True)
    with torch.inference_mode():
        ref = x * 2
    with dtr.budget(None):
        y = x * 3
        with torch.inference_mode():
            z = y * 2
            assert z.is_inference() == ref.is_inference()
            assert torch.equal(dtr.unwrap(z), x.detach() * 6)
        w = y * 2
        assert not w.is_inference() and w._version == 0 and w.requires_grad
    with pytest.raises(RuntimeError, match="Inference tensors do not track version counter"):
        ref._version
    with pytest.raises(RuntimeError, match="Inference tensors do not track version counter"):
        z._version


def _cells_listed(t):
    # How many cells the storage of `t` lists (Note [Dead view cells]), in either runtime.
    from dtr import _ext
    if type(t) is torch.Tensor:  # a C++ wrapper: its runtime counts every cell block
        return _ext._C.live_objects()["cells"]
    return len(t._cell.storage.cells)


def _cells_left_by_dropped_views(y, n):
    # Takes and drops n views of `y`'s rows one by one; how many more cells its storage lists.
    before = _cells_listed(y)
    for i in range(n):
        v = y[i % y.shape[0]]
    del v
    return _cells_listed(y) - before


def test_views_taken_and_dropped_do_not_pile_up_in_their_storage():
    # Note [Dead view cells]: only eviction emptied a storage's cell list, so each view
    # taken and dropped in a loop stayed listed (in C++ with its cell's block) for the
    # rest of the block. The list is pruned as it grows.
    x = torch.randn(16, 16, requires_grad=True)
    with dtr.budget(None):
        y = x * 2
        first = y[0]
        assert _cells_left_by_dropped_views(y, 5000) < 64
        assert torch.equal(dtr.unwrap(first), (x * 2)[0].detach())
        assert torch.equal(dtr.unwrap(y[3]), (x * 2)[3].detach())


def test_dead_views_do_not_pile_up_after_their_storage_was_evicted():
    # Note [Dead view cells]: with many views alive, the list's next pruning is far
    # off (twice its length). Eviction empties the list; the threshold must start
    # again from its floor, or the views taken and dropped next pile up to it.
    x = torch.randn(16, 16, requires_grad=True)
    with dtr.budget(None) as session:
        y = x * 2
        live = [y[i % 16] for i in range(400)]
        session.runtime.evict_all = True  # the next op evicts every value, y among them
        live[0] + 1
        session.runtime.evict_all = False
        del live
        assert _cells_left_by_dropped_views(y, 300) < 64
        assert torch.equal(dtr.unwrap(y[5]), (x * 2)[5].detach())


@pytest.mark.parametrize("harsh", [False, True], ids=["no_limit", "evict_everything"])
def test_gradients_summed_over_many_uses_match_eager(harsh):
    # Note [Gradients accumulate in place]: autograd sums a tensor's gradients in its
    # input buffer, in place where nothing else can see the sum. Uses whose gradients
    # alias each other (x + x; unbind of one gradient into two uses; a view of a
    # gradient another use also gets) must still be summed out of place, as in eager.
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 32)
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(4, 32, requires_grad=True)

    def f():
        h = torch.tanh(x * 1.5)
        for _ in range(6):  # the Linear's weight and bias, and h, used again and again
            h = torch.tanh(lin(h)) + h
        s = torch.stack([h, h]).sum(0)  # one gradient unbound into two uses of h
        y = s + s  # the same gradient twice
        z = (y @ w) + (y @ w.t())  # w's gradients: one plain, one a view (t)
        return (z * z).sum() + y.sum()

    params = [x, w, lin.weight, lin.bias]
    ref = torch.autograd.grad(f(), params)
    with (evict_everything() if harsh else dtr.budget(None)):
        loss = f()
        got = torch.autograd.grad(loss, params)
    for g, r in zip(got, ref):
        assert is_plain(g) or dtr.is_dtr_tensor(g)
        assert torch.equal(dtr.unwrap(g), r)
    # .backward() into .grad, twice (the second adds into the first).
    for p in params:
        p.grad = None
    with (evict_everything() if harsh else dtr.budget(None)):
        f().backward()
        f().backward()
    for p, r in zip(params, ref):
        assert torch.equal(p.grad, r + r)
