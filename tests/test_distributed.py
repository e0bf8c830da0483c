"""dtr inside torch.distributed: DDP, FSDP2 and collectives on 2 CPU processes (gloo).

Each test spawns its own 2 ranks with torch.multiprocessing (a free TCP port);
the checks run inside the ranks, and a failed assertion on any rank fails the
test with that rank's traceback. See docs/distributed.md.
"""
import collections
import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import dtr
from harness import is_plain
import dtr.distributed
from harness import budget_above, live_bytes

pytestmark = [
    pytest.mark.usefixtures("runtime"),  # Note [One suite, two runtimes]
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is needed"),
]

WORLD = 2
_COLLECTIVE_NS = {"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"}
_NOT_COMMUNICATION = {"wait_tensor", "_wrap_tensor_autograd"}  # waits, wrappers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, port, fn, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, *args)
        dist.barrier()  # no rank tears down while the other still communicates
    finally:
        dist.destroy_process_group()
    # Passed. Leave without running static destructors: once in a loaded full-suite
    # run, a rank that had passed aborted at interpreter exit ("terminate called
    # without an active exception", a joinable std::thread inside torch.distributed
    # destroyed at exit), which mp.spawn reports as a failure of the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, *args):
    mp.spawn(_entry, args=(_free_port(), fn, args), nprocs=WORLD, join=True)


class CountCollectives(TorchDispatchMode):
    """Counts collectives really executed (meta-tensor calls and waits excluded).

    Entered *outside* the dtr block, it sits below dtr's mode: it sees every op
    the runtime runs, recomputations included.
    """

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in _COLLECTIVE_NS and func._opname not in _NOT_COMMUNICATION:
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            if not any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in flat):
                self.counts[func.name()] += 1
        return func(*args, **kwargs)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(6)],
                         nn.Linear(64, 4))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(512, 64, generator=g)


# ----------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------
def _ddp_train(rank, limit, steps=3):
    """3 SGD steps of a DDP model; limit False: no dtr. Returns params, stats, checks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _mlp()
    counter = CountCollectives()
    grad_types = []  # whether p.grad was plain when the reducer's hooks ran
    launched_before_last = []  # per step: all-reduces launched before the last grad was ready
    step_start = [0]
    # Post hooks of a grad accumulator run in registration order: registered
    # before DDP's, these see exactly what DDP's reducer sees.
    accs = []
    for p in model.parameters():
        acc = p.view_as(p).grad_fn.next_functions[0][0]

        def hook(grad_inputs, grad_outputs, p=p):
            grad_types.append(is_plain(p.grad))
            launched_before_last.append(counter.counts["c10d::allreduce_"] - step_start[0])

        acc.register_hook(hook)
        accs.append(acc)
    ddp = DDP(model, bucket_cap_mb=0.02)  # 20 KB buckets: several per step
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    sess = None
    per_step = []
    overlap = []
    for step in range(steps):
        x = _batch(rank, step)
        step_start[0] = counter.counts["c10d::allreduce_"]
        launched_before_last.clear()
        with counter:
            if limit is False:
                loss = ddp(x).square().mean()
                loss.backward()
            else:
                with dtr.distributed.budget(limit) as sess:
                    loss = ddp(x).square().mean()
                    loss.backward()
        per_step.append(counter.counts["c10d::allreduce_"] - step_start[0])
        overlap.append(launched_before_last[-1])
        for p in ddp.parameters():
            assert is_plain(p.grad), type(p.grad)
        opt.step()
        opt.zero_grad()
    params = [p.detach().clone() for p in ddp.parameters()]
    return params, sess, dict(counter.counts), grad_types, per_step, overlap


def _ddp_worker(rank):
    ref, _, ref_counts, _, ref_per_step, _ = _ddp_train(rank, False)
    base = live_bytes()  # budgets are room above what is in use: see harness.budget_above
    _, free, _, _, _, _ = _ddp_train(rank, None)
    limit = budget_above(0.7 * (free.stats.peak_bytes - base))
    got, sess, counts, grad_types, per_step, overlap = _ddp_train(rank, limit)

    # Bit-identical to DDP without dtr.
    for a, b in zip(ref, got):
        assert torch.equal(a, b), (rank, (a - b).abs().max())
    # Every rank evicted and recomputed under its budget, and stayed under it.
    # (Each rank's budget is its own: the bytes in use as its blocks open differ by rank.)
    stats = dtr.distributed.all_stats(sess)
    assert stats[rank].budget_bytes == limit
    for r, st in enumerate(stats):
        assert st.evictions > 0 and st.rematerializations > 0, (r, st)
        assert st.peak_bytes <= st.budget_bytes, (r, st.peak_bytes, st.budget_bytes)
    # The reducer's hooks saw plain gradients, never dtr tensors.
    assert grad_types and all(grad_types), grad_types
    # Bucketing and overlap: several all-reduces per step, the same as without dtr,
    # and, once DDP has rebuilt its buckets after the first step, some launched while
    # backward was still running.
    assert counts == ref_counts, (counts, ref_counts)
    assert per_step == ref_per_step and min(per_step[1:]) >= 2, (per_step, ref_per_step)
    assert all(n >= 1 for n in overlap[1:]), overlap


def test_ddp_bit_identical_under_tight_budget():
    _spawn(_ddp_worker)


def _ddp_variant_train(rank, limit, cfg, steps=3):
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = dict(cfg)
    bn = kw.pop("bn", False)
    accumulate = kw.pop("no_sync", False)
    torch.manual_seed(0)
    layers = []
    for _ in range(5):
        layers += [nn.Linear(64, 64)] + ([nn.BatchNorm1d(64)] if bn else []) + [nn.Tanh()]
    ddp = DDP(nn.Sequential(*layers, nn.Linear(64, 4)), bucket_cap_mb=0.02, **kw)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    sess = None
    for step in range(steps):
        micro = [_batch(rank, 10 * step + k)[:256] for k in range(2 if accumulate else 1)]
        for k, x in enumerate(micro):
            sync = ddp.no_sync() if accumulate and k == 0 else torch.enable_grad()
            with sync:
                if limit is False:
                    ddp(x).square().mean().backward()
                else:
                    with dtr.distributed.budget(limit) as sess:
                        ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [t.detach().clone() for t in list(ddp.parameters()) + list(ddp.buffers())], sess


def _ddp_variants_worker(rank):
    variants = {"gradient_as_bucket_view": dict(gradient_as_bucket_view=True),
                "static_graph": dict(static_graph=True),
                "find_unused_parameters": dict(find_unused_parameters=True),
                "batchnorm_buffers": dict(bn=True),
                "no_sync": dict(no_sync=True)}
    for name, cfg in variants.items():
        ref, _ = _ddp_variant_train(rank, False, cfg)
        base = live_bytes()
        _, free = _ddp_variant_train(rank, None, cfg)
        got, sess = _ddp_variant_train(rank, budget_above(0.85 * (free.stats.peak_bytes - base)), cfg)
        for a, b in zip(ref, got):
            assert torch.equal(a, b), (rank, name, (a - b).abs().max())
        assert sess.stats.rematerializations > 0, (rank, name, sess.stats)


def test_ddp_options_bit_identical_under_budget():
    # Bucket views as gradients, static graph, unused-parameter search, buffer
    # broadcast (BatchNorm), gradient accumulation with no_sync.
    _spawn(_ddp_variants_worker)


# ----------------------------------------------------------------------------
# Collectives issued inside the block, on dtr tensors
# ----------------------------------------------------------------------------
def _collective_cases():
    import torch.distributed._functional_collectives as funcol

    def all_reduce(x, w):
        y = (x @ w).tanh()
        dist.all_reduce(y)  # in place, on a dtr tensor
        return (y.sin() * 2).sum()

    def all_reduce_async(x, w):
        y = (x @ w).tanh()
        a = y * 3  # read before the in-place collective: its recipe needs y's old value
        dist.all_reduce(y, async_op=True).wait()
        return (y.sin() * a).sum()

    def broadcast(x, w):
        y = (x @ w).tanh()
        dist.broadcast(y, src=1)
        return y.sin().sum()

    def all_gather_into_tensor(x, w):
        y = (x @ w).tanh()
        out = torch.zeros_like(y).repeat(WORLD, 1)  # a dtr tensor written by the collective
        dist.all_gather_into_tensor(out, y.detach())
        return (out.sin()[:8] * y).sum()

    def all_gather_list(x, w):
        y = (x @ w).tanh()
        outs = [torch.zeros_like(y) for _ in range(WORLD)]
        dist.all_gather(outs, y.detach())
        return (outs[0].sin() * outs[1] * y).sum()

    def reduce_scatter_tensor(x, w):
        y = (x @ w).tanh()
        out = torch.zeros_like(y)[:4].clone()
        dist.reduce_scatter_tensor(out, y.detach())
        return out.sin().sum() + (y * y).sum()

    def functional_all_reduce(x, w):
        y = (x @ w).tanh()
        z = funcol.all_reduce(y, "sum", dist.group.WORLD)
        return (z.sin() * y).sum()

    def functional_all_gather(x, w):
        y = (x @ w).tanh()
        z = funcol.all_gather_tensor(y, 0, dist.group.WORLD)
        return (z.sin()[:8] * y).sum()

    def functional_reduce_scatter(x, w):
        y = (x @ w).tanh()
        z = funcol.reduce_scatter_tensor(y, "sum", 0, dist.group.WORLD)
        return z.sin().sum() + y.sum()

    def autograd_all_gather(x, w):
        y = (x @ w).tanh()
        return funcol.all_gather_tensor_autograd(y, 0, dist.group.WORLD).sin().sum()

    def nn_all_reduce(x, w):
        import torch.distributed.nn.functional as dnn

        y = (x @ w).tanh()
        return dnn.all_reduce(y).sin().sum()  # differentiable: backward all-reduces too

    return [all_reduce, all_reduce_async, nn_all_reduce, broadcast, all_gather_into_tensor, all_gather_list,
            reduce_scatter_tensor, functional_all_reduce, functional_all_gather,
            functional_reduce_scatter, autograd_all_gather]


def _collectives_worker(rank):
    failures = []
    for fn in _collective_cases():
        torch.manual_seed(0)
        w = torch.randn(16, 16, requires_grad=True)
        x = torch.randn(8, 16) + rank
        ref_counter = CountCollectives()
        with ref_counter:
            ref = fn(x, w)
            ref.backward()
        ref_grad, w.grad = w.grad, None
        counter = CountCollectives()
        try:
            # Evict every evictable value after every op: everything not pinned is recomputed.
            with counter, dtr.Session(None, _evict_all=True) as sess:
                out = fn(x, w)
                value = out.item()
                out.backward()
        except Exception as exc:  # report every case, not only the first
            failures.append(f"{fn.__name__}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        if value != ref.item() or not torch.equal(w.grad, ref_grad):
            failures.append(f"{fn.__name__}: value {value} vs {ref.item()}, grad differs by "
                            f"{(w.grad - ref_grad).abs().max().item()}")
        # Each collective ran exactly as often as without dtr: never replayed.
        if counter.counts != ref_counter.counts:
            failures.append(f"{fn.__name__}: collectives {dict(counter.counts)} vs "
                            f"{dict(ref_counter.counts)} without dtr")
        if sess.stats.rematerializations == 0:
            failures.append(f"{fn.__name__}: nothing was recomputed")
    assert not failures, f"rank {rank}:\n" + "\n".join(failures)


def test_collectives_run_once_and_values_exact():
    _spawn(_collectives_worker)


# ----------------------------------------------------------------------------
# FSDP2 (fully_shard)
# ----------------------------------------------------------------------------
def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for block in model[:6]:
        fully_shard(block)
    fully_shard(model)
    return model


def _fsdp_train(rank, limit, keep_gathered, steps=3):
    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    counter = CountCollectives()
    sess = None
    for step in range(steps):
        x = _batch(rank, step)
        with counter:
            if limit is False:
                loss = model(x).square().mean()
                loss.backward()
            elif keep_gathered:
                with dtr.distributed.fsdp_keep_gathered(model), \
                        dtr.distributed.budget(limit) as sess:
                    loss = model(x).square().mean()
                    loss.backward()
            else:
                with dtr.distributed.budget(limit) as sess:
                    loss = model(x).square().mean()
                    loss.backward()
        opt.step()
        opt.zero_grad()
    params = [p.full_tensor().detach().clone() for p in model.parameters()]
    return params, sess, dict(counter.counts), _reshard_flags(model)


def _reshard_flags(model):
    """Per FSDP parameter group: (reshards after forward, reshards after backward)."""
    from torch.distributed.fsdp import FSDPModule

    flags = []
    for m in model.modules():
        if isinstance(m, FSDPModule):
            for g in m._get_fsdp_state()._fsdp_param_groups:
                flags.append((g.post_forward_mesh_info is not None, g.reshard_after_backward))
    return flags


def _fsdp_worker(rank):
    ref, _, _, ref_flags = _fsdp_train(rank, False, False)
    base = live_bytes()
    _, free, free_counts, _ = _fsdp_train(rank, None, True)
    limit = budget_above(0.7 * (free.stats.peak_bytes - base))
    got, sess, counts, flags = _fsdp_train(rank, limit, True)
    for a, b in zip(ref, got):
        assert torch.equal(a, b), (rank, (a - b).abs().max())
    # FSDP2's own reshard settings are back after the blocks (the root keeps its
    # parameters after forward, the other modules reshard).
    assert flags == ref_flags, (flags, ref_flags)
    assert ref_flags[0] == (False, True) and ref_flags[1] == (True, True), ref_flags
    # (Each rank's budget is its own: the bytes in use as its blocks open differ by rank.)
    stats = dtr.distributed.all_stats(sess)
    assert stats[rank].budget_bytes == limit
    for r, st in enumerate(stats):
        assert st.evictions > 0 and st.rematerializations > 0, (r, st)
        assert st.peak_bytes <= st.budget_bytes, (r, st.peak_bytes, st.budget_bytes)
    # Gathered parameters are never re-gathered for a recomputation: the same
    # all-gathers and reduce-scatters as with no limit at all.
    assert counts == free_counts, (counts, free_counts)
    assert counts.get("c10d::_allgather_base_", 0) > 0, counts


def test_fsdp2_keep_gathered_bit_identical_under_tight_budget():
    _spawn(_fsdp_worker)


def _fsdp_resharded_worker(rank):
    model = _fsdp_model()
    # Every value is evicted after every op, so both ranks fail at the same op: the
    # first recomputation from a resharded module's parameters, in block 2's forward
    # (a rank that failed earlier would leave the other waiting in a collective).
    with pytest.raises(dtr.UnsupportedOpError, match="fsdp_keep_gathered"):
        with dtr.Session(None, _evict_all=True):
            model(_batch(rank, 0)).square().mean().backward()


def test_fsdp2_resharded_parameters_raise_a_clear_error():
    # FSDP2 frees gathered parameters after each module's forward and backward
    # (storage resized to 0 bytes, no version change); recomputing from them
    # must fail with a dtr error that names the remedy, not read freed memory.
    _spawn(_fsdp_resharded_worker)


def test_fsdp_keep_gathered_rejects_a_model_without_fully_shard():
    with pytest.raises(dtr.UnsupportedOpError, match="fully_shard"):
        with dtr.distributed.fsdp_keep_gathered(nn.Linear(2, 2)):
            pass


def test_rank_device_without_process_group_is_cpu():
    assert dtr.distributed.rank_device() == torch.device("cpu")
    with dtr.distributed.budget(budget_above(1 << 20)) as sess:
        pass
    assert sess.device == torch.device("cpu")
