"""dtr.sim.record: traces of real runs, and the simulator against the runtime."""
import pytest
import torch

import dtr
from dtr.sim import SimOptions, baseline_peak, load, simulate
from dtr.sim import record
from dtr.sim.trace import Call, Constant, Mutate, Release
from harness import live_bytes
from models import MLP

pytestmark = pytest.mark.usefixtures("runtime")  # Note [One suite, two runtimes]


def _record_step(path, model, x):
    with record(str(path)) as r:
        loss = model(x)
        loss.backward()
    return r, loss


def test_record_format(tmp_path):
    m = MLP(d=16, depth=3)
    x = torch.randn(8, 16)
    path = tmp_path / "mlp.jsonl"
    _record_step(path, m, x)
    tr = load(str(path))
    kinds = tr.counts()
    # Parameters and the input were made outside the block: constants.
    consts = [i for i in tr.instrs if isinstance(i, Constant)]
    assert len(consts) >= 1 + 2 * 4
    sizes = {c.size for c in consts}
    assert 16 * 16 * 4 in sizes and 8 * 16 * 4 in sizes
    calls = [i for i in tr.instrs if isinstance(i, Call)]
    assert len(calls) > 10 and all(c.time > 0 for c in calls)
    # Linear transposes its weight: a view (ALIAS of argument 0).
    assert any(a >= 0 for c in calls for a in c.aliases)
    # Autograd frees saved activations during backward: releases.
    assert kinds["Release"] > 0
    names = {r for c in calls for r in c.results} | {c.name for c in consts}
    assert all(i.name in names for i in tr.instrs if isinstance(i, Release))


def test_record_mutation_and_release(tmp_path):
    x = torch.randn(100)
    path = tmp_path / "m.jsonl"
    with record(str(path)):
        y = x * 2
        y.relu_()
        z = y.sum()
        del y
    tr = load(str(path))
    muts = [i for i in tr.instrs if isinstance(i, Mutate)]
    assert len(muts) == 1 and muts[0].mutate == (0,) and "relu" in muts[0].name
    mul = next(i for i in tr.instrs if isinstance(i, Call) and i.name == "mul")
    assert mul.sizes == (400,) and mul.aliases == (-1,)
    # y died inside the block: released; z is still alive: not released.
    rel = {i.name for i in tr.instrs if isinstance(i, Release)}
    assert mul.results[0] in rel
    s = next(i for i in tr.instrs if isinstance(i, Call) and i.name == "sum")
    assert s.results[0] not in rel
    assert float(z) == pytest.approx(float((x * 2).relu().sum()))


def test_simulator_agrees_with_runtime(tmp_path):
    """Record a training step on plain eager, simulate it, and run the same
    step under dtr.budget.

    What must agree (loosely): the simulator's baseline peak (constants +
    live values, nothing evicted) and the runtime's peak with an unlimited
    budget count the same things -- parameters and inputs (plain tensors /
    CONSTANTs), activations saved for backward, gradients -- so they are
    within a small factor of each other (the runtime also counts plain
    gradients accumulated into .grad and does not see autograd's internal
    buffers the same way, and the recorder sees every op's output, so they
    are not byte-identical). Feasibility: a budget the simulator finds
    feasible with margin is met by the runtime, and one below the bytes of
    the constants fails in both.
    """
    torch.manual_seed(0)
    m = MLP(d=32, depth=8)
    x = torch.randn(256, 32)  # activations dominate the parameters
    path = tmp_path / "mlp.jsonl"
    _record_step(path, m, x)
    tr = load(str(path))
    opts = SimOptions(overhead_limit=None)
    base = baseline_peak(tr, opts)
    const = sum(i.size for i in tr.instrs if isinstance(i, Constant))

    m.zero_grad(set_to_none=True)
    # The runtime's budget counts every tensor of the process; the trace, only the
    # step's constants (parameters, input) and values: the rest is subtracted and added.
    other = live_bytes() - const
    with dtr.budget(10 ** 12) as s:
        loss = m(x)
        loss.backward()
    rt_peak = s.stats.peak_bytes - other
    # (They were byte-identical when this test was written.)
    assert 0.9 * base <= rt_peak <= 1.1 * base, (base, rt_peak)

    # A feasible budget in the simulator, with margin, is met by the runtime.
    budget = int(0.6 * base)
    r = simulate(tr, budget=budget, policy="dtr_eq", options=opts)
    assert r.feasible and r.peak_bytes <= budget
    m.zero_grad(set_to_none=True)
    other = live_bytes() - const
    with dtr.budget(other + int(1.25 * budget)) as s2:
        loss2 = m(x)
        loss2.backward()
    assert s2.stats.peak_bytes <= other + int(1.25 * budget)
    assert loss2.detach().item() == pytest.approx(loss.detach().item())

    # Below the constants: infeasible in both.
    r = simulate(tr, budget=const // 2, policy="dtr_eq", options=opts)
    assert not r.feasible and r.status == "oom"
    m.zero_grad(set_to_none=True)
    with pytest.raises(dtr.BudgetExceededError):
        with dtr.budget(live_bytes() - const // 2):
            loss3 = m(x)
            loss3.backward()


def test_record_carries_flops_and_bytes(tmp_path):
    # Note [Roofline cost]: each CALL and MUTATE records torch's FLOP count and the
    # bytes it reads and writes, which survive a dump and reload.
    a, b = torch.randn(32, 64), torch.randn(64, 16)
    path = tmp_path / "mm.jsonl"
    with record(str(path)):
        c = a @ b
        d = c.t()
        c.add_(1.0)
    tr = load(str(path))
    ops = [i for i in tr.instrs if isinstance(i, (Call, Mutate))]
    mm = next(i for i in ops if i.name == "mm")
    assert (mm.flops, mm.read, mm.write) == (2 * 32 * 64 * 16, (32 * 64 + 64 * 16) * 4, 32 * 16 * 4)
    view = next(i for i in ops if i.name == "t")
    assert (view.flops, view.read, view.write) == (0, 0, 0)
    add = next(i for i in ops if isinstance(i, Mutate))
    assert add.flops == 0 and add.read == 32 * 16 * 4 and add.write == 32 * 16 * 4
    del d


def test_roofline_estimate():
    from dtr.cost import CUDA_NOMINAL, estimate_from_bytes, estimate_op

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    mm = estimate_op(torch.ops.aten.mm.default, (a, b), {}, [a, b], a @ b, False)
    add = estimate_op(torch.ops.aten.add.Tensor, (a, b), {}, [a, b], a + b, False)
    view = estimate_op(torch.ops.aten.t.default, (a,), {}, [a], a.t(), True)
    # The matmul is FLOP-bound: 2 * 512^3 FLOPs at the float32 rate; the add is
    # bound by its 3 MiB; the view by the launch alone.
    assert mm == pytest.approx(2 * 512 ** 3 / CUDA_NOMINAL.flop_rate(torch.float32) + CUDA_NOMINAL.launch_s)
    assert add == pytest.approx(3 * 512 * 512 * 4 / CUDA_NOMINAL.bytes_per_s + CUDA_NOMINAL.launch_s)
    assert view == CUDA_NOMINAL.launch_s
    assert mm > 2 * add
    # The bytes-only estimate priced them the same.
    assert estimate_from_bytes(2 * a.nbytes) == estimate_from_bytes(2 * a.nbytes)


def test_replay_scores_with_estimates_and_charges_measured_time(tmp_path):
    from dtr.sim import BytesCost, RooflineCost, TraceError
    from dtr.sim.trace import parse

    m = MLP(d=32, depth=4)
    x = torch.randn(512, 32)  # activations dominate the parameters
    path = tmp_path / "mlp.jsonl"
    _record_step(path, m, x)
    tr = load(str(path))
    seen = []

    def cost(ins):
        seen.append(ins)
        return 1.0

    free = SimOptions(overhead_limit=None)
    r = simulate(tr, ratio=0.8, policy="dtr_eq", score_cost=cost, options=free)
    assert r.feasible and len(seen) >= r.ops
    assert r.rematerializations > 0
    assert r.remat_time > r.rematerializations  # measured ns, not the score's 1.0
    for c in (RooflineCost(), BytesCost()):
        assert simulate(tr, ratio=0.8, policy="dtr_eq", score_cost=c, options=free).feasible
    # A trace without the fields cannot be scored by an estimate: a clear error.
    bare = parse('{"INSTRUCTION": "CALL", "NAME": "f", "ARGS": [], "RESULT": ["y"], "TIME": "5"}\n'
                 '{"INSTRUCTION": "MEMORY", "NAME": "y", "MEMORY": "8"}\n'
                 '{"INSTRUCTION": "ALIAS", "NAME": "y", "ALIAS": "-1"}\n')
    with pytest.raises(TraceError, match="FLOPS"):
        simulate(bare, budget=100, score_cost=RooflineCost())
