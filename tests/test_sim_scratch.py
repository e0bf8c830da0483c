"""The simulator's op scratch (Note [Op scratch in traces]) and its comparison with the
runtime on the same op costs (Note [Fixed op costs] in dtr/cost.py)."""
import glob
import json
import os

import pytest
import torch

import dtr
import dtr.policies_extra  # noqa: F401  (dtr_regions)
from dtr import _ext
from dtr.sim import SimOptions, TraceError, baseline_peak, load, parse, simulate
from dtr.sim.trace import Call, Mutate, dumps_instr, parse_lines


def J(**kw):
    return json.dumps(kw)


def const(name, size):
    return [J(INSTRUCTION="CONSTANT", NAME=name), J(INSTRUCTION="MEMORY", NAME=name, MEMORY=str(size))]


def call(name, args, results, time, sizes, scratch=None):
    head = dict(INSTRUCTION="CALL", NAME=name, ARGS=args, RESULT=results, TIME=str(time))
    if scratch is not None:
        head["SCRATCH"] = str(scratch)
    out = [J(**head)]
    for r, s in zip(results, sizes):
        out += [J(INSTRUCTION="MEMORY", NAME=r, MEMORY=str(s)), J(INSTRUCTION="ALIAS", NAME=r, ALIAS="-1")]
    return out


def T(*chunks):
    lines = []
    for c in chunks:
        lines += c
    return parse("\n".join(lines) + "\n")


RUNTIME = SimOptions(overhead_limit=None)


def scratch_trace(scratch):
    # x -> a, b; d = h(b) needs `scratch` bytes while it runs; e = k(a) reads a again.
    return T(const("x", 100), call("f", ["x"], ["a"], 10, [100]), call("g", ["x"], ["b"], 20, [100]),
             call("h", ["b"], ["d"], 30, [100], scratch), call("k", ["a"], ["e"], 40, [10]))


def test_scratch_field_parses_and_round_trips():
    tr = scratch_trace(150)
    h = next(i for i in tr.instrs if isinstance(i, Call) and i.name == "h")
    assert h.scratch == 150
    assert all(i.scratch == 0 for i in tr.instrs if isinstance(i, Call) and i.name != "h")
    lines = [ln for i in tr.instrs for ln in dumps_instr(i)]
    assert parse_lines(lines, start=False) == tr.instrs
    # A record without scratch writes no SCRATCH field: old traces dump as they were.
    assert not any("SCRATCH" in ln for i in tr.instrs if i is not h for ln in dumps_instr(i))
    with pytest.raises(TraceError, match="negative SCRATCH"):
        parse("\n".join(call("h", [], ["d"], 1, [1], -5)))


def test_scratch_counts_in_the_baseline_peak():
    # Before h: x, a, b (300); while h runs: + d (100) + its scratch (150); e adds 10 after.
    assert baseline_peak(scratch_trace(0), RUNTIME) == 410
    assert baseline_peak(scratch_trace(150), RUNTIME) == 550


def test_scratch_makes_room_before_the_op():
    # At 450 bytes, h fits without its scratch; with it, a (not needed until k) is
    # evicted first and k recomputes it.
    plain = simulate(scratch_trace(0), budget=450, policy="lru", options=RUNTIME)
    assert plain.feasible and plain.evictions == 0 and plain.rematerializations == 0
    tight = simulate(scratch_trace(150), budget=450, policy="lru", options=RUNTIME)
    assert tight.feasible and tight.evictions >= 1
    assert tight.rematerializations == 1 and tight.remat_time == 10  # f reran for k
    assert tight.peak_bytes <= 450


def test_scratch_makes_room_before_a_recompute():
    # a = h(x) needs `s` bytes of scratch; m's room evicts a (lru); k2 recomputes a. With
    # its scratch the recompute does not fit beside big, which is evicted and then
    # recomputed for k3. Without scratch big stays.
    def tr(s):
        return T(const("x", 10), call("h", ["x"], ["a"], 50, [100], s),
                 call("g", ["x"], ["big"], 20, [100]), call("f", ["x"], ["m"], 5, [100]),
                 [J(INSTRUCTION="RELEASE", NAME="m")],
                 call("k2", ["a"], ["d"], 5, [10]), call("k3", ["big"], ["e"], 5, [10]))
    plain = simulate(tr(0), budget=300, policy="lru", options=RUNTIME)
    assert plain.feasible and plain.rematerializations == 1 and plain.remat_time == 50
    scratch = simulate(tr(150), budget=300, policy="lru", options=RUNTIME)
    assert scratch.feasible and scratch.rematerializations == 2 and scratch.remat_time == 70
    assert scratch.peak_bytes == 260  # x, a and its scratch while h first runs


PAPER_DIRS = [os.path.join(os.path.dirname(os.path.abspath(__file__)), *up, "shared", "traces", "dtr-prototype")
              for up in ((os.pardir, os.pardir), (os.pardir, os.pardir, os.pardir))]


def _paper_trace(prefix):
    for d in PAPER_DIRS:
        got = glob.glob(os.path.join(d, f"{prefix}-*.log"))
        if got:
            return got[0]
    pytest.skip("the paper's traces are not beside this checkout")


def test_paper_traces_replay_as_before():
    # The paper's traces carry no scratch; docs/simulator.md's reproduction table (measured
    # before scratch was modelled) still holds for them.
    path = _paper_trace("resnet32")
    tr = load(path)
    assert all(i.scratch == 0 for i in tr.instrs if isinstance(i, (Call, Mutate)))
    with open(path) as f:
        assert not any("SCRATCH" in ln for ln in f)
    paper = SimOptions.paper()
    for ratio, want in ((0.4, 1.14), (0.6, 1.07), (0.8, 1.02)):
        r = simulate(tr, ratio=ratio, policy="dtr_regions", options=paper)
        assert round(r.overhead, 2) == want, (ratio, r.overhead)


needs_meter = pytest.mark.skipif(
    not (_ext.available() and dtr.device_memory.cpu_counter_installed()),
    reason="needs the C++ extension's counting CPU allocator")


@needs_meter
def test_record_measures_convolution_scratch():
    x = torch.randn(8, 16, 32, 32)
    w = torch.randn(32, 16, 3, 3)
    with dtr.sim.record(None) as r:
        y = torch.nn.functional.conv2d(x, w, padding=1)
        z = y + 1
    conv = next(i for i in r.instrs if isinstance(i, Call) and i.name == "convolution")
    add = next(i for i in r.instrs if isinstance(i, Call) and i.name == "add")
    # oneDNN's convolution works in scratch buffers (docs/performance.md); an add next to none.
    assert conv.scratch >= y.numel() * y.element_size() // 4 and add.scratch < 1024
    del z


@needs_meter
def test_record_keeps_op_keys_matching_the_runtime_hook():
    from dtr.cost import fixed_costs, op_key

    x = torch.randn(4, 8)
    w = torch.randn(8, 8, requires_grad=True)
    with dtr.sim.record(None, keep_keys=True) as r:
        (x @ w).relu().sum().backward()
    keys = r.recorder.op_keys
    assert keys and all(isinstance(r.instrs[i], (Call, Mutate)) for i in keys)
    table = {k: 1e-3 for k in keys.values()}
    w.grad = None
    with fixed_costs(table) as fc:
        with dtr.budget(None, runtime="python"):
            (x @ w).relu().sum().backward()
    assert fc.hits > 0 and fc.misses == 0
    assert op_key(torch.ops.aten.mm.default, (x, x.t()), {}) != op_key(torch.ops.aten.mm.default, (x.t(), x), {})


@needs_meter
def test_runtime_and_replay_recompute_the_same_on_a_small_mlp():
    # bench/sim_vs_runtime.py's comparison with a deterministic cost per op (so neither
    # side's choices depend on timing): the Python runtime under fixed_costs and the
    # replay of the recorded step, the same budget bytes, recompute the same values at
    # the same total cost. (Below 0.8 this MLP is at the edge: at 0.6 it passes the thrash
    # guard's bound, whose sampling makes the two diverge, and at 0.7, after the rest of the
    # suite ran in the same process, the runtime could not meet the budget and the replay
    # thrashed; not asserted.)
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.sim_vs_runtime import Step, compare

    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(6))

        def forward(self, x, y):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return ((x - y) ** 2).mean()

    step = Step(MLP(), (torch.randn(512, 64), torch.randn(512, 64)))
    rows = compare(step, "mlp", "tiny", [0.8, 0.9], "msps_sqrt",
                   op_ns=lambda i: 1000 + (max(i.read, 0) + max(i.write, 0)) / 10)
    for r in rows:
        assert r["rt_status"] == "ok" and r["sim_status"] == "ok", r
        assert r["rt_cost_misses"] == 0
        assert r["rt_recomputes"] > 0
        assert r["sim_recomputes"] == r["rt_recomputes"], r
        assert r["sim_recompute_s"] == pytest.approx(r["rt_recompute_s"], rel=1e-9)
        # The replay's peak with nothing evicted is eager's measured peak.
        assert r["sim_baseline_peak"] == r["eager_peak"]
