"""dtr.sim: trace parser, simulator semantics, optimal baselines."""
import json
import math
import os

import pytest

import dtr.policies as P
import dtr.policies_extra  # noqa: F401  (dtr_regions)
from dtr.sim import SimOptions, TraceError, baseline_peak, parse, simulate
from dtr.sim.optimal import (Graph, chain_graph, compare, random_graph, revolve, solve_bruteforce,
                             solve_milp, trace_from_graph, graph_from_trace, training_graph)
from dtr.sim.trace import (Annotate, Call, Constant, Copy, CopyFrom, Mutate, Release, dumps_instr,
                           parse_lines)


def J(**kw):
    return json.dumps(kw)


def const(name, size):
    return [J(INSTRUCTION="CONSTANT", NAME=name), J(INSTRUCTION="MEMORY", NAME=name, MEMORY=str(size))]


def call(name, args, results, time, sizes, aliases=None):
    aliases = aliases or [-1] * len(results)
    out = [J(INSTRUCTION="CALL", NAME=name, ARGS=args, RESULT=results, TIME=str(time))]
    for r, s, a in zip(results, sizes, aliases):
        out += [J(INSTRUCTION="MEMORY", NAME=r, MEMORY=str(s)), J(INSTRUCTION="ALIAS", NAME=r, ALIAS=str(a))]
    return out


def rel(*names):
    return [J(INSTRUCTION="RELEASE", NAME=n) for n in names]


def T(*chunks, start=True):
    lines = [J(INSTRUCTION="ANNOTATE", ANNOTATION="START")] if start else []
    for c in chunks:
        lines += c
    return parse("\n".join(lines) + "\n")


RUNTIME = SimOptions(overhead_limit=None)
PAPER = SimOptions(**{**SimOptions.paper().__dict__, "overhead_limit": None})


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------

def test_parser_every_instruction_kind():
    lines = [J(INSTRUCTION="CONSTANT", NAME="w")]  # before START: skipped
    lines += [J(INSTRUCTION="MEMORY", NAME="w", MEMORY="4")]
    lines += [J(INSTRUCTION="ANNOTATE", ANNOTATION="START")]
    lines += const("p", 16)
    lines += [J(INSTRUCTION="COPY", DST="q", SRC="p")]
    lines += call("relu", ["q"], ["a"], 100, [16])
    lines += call("view", ["a"], ["v"], 5, [16], [0])
    lines += [J(INSTRUCTION="MUTATE", NAME="add_", ARGS=["a", "p"], MUTATE=[0], TIME="7")]
    lines += [J(INSTRUCTION="COPY_FROM", DST="q", SRC="a")]
    lines += [J(INSTRUCTION="ANNOTATE", ANNOTATION="BACKWARD")]
    lines += rel("v")
    instrs = parse_lines(lines)
    assert instrs == [
        Constant("p", 16), Copy("q", "p"),
        Call("relu", ("q",), ("a",), 100.0, (16,), (-1,)),
        Call("view", ("a",), ("v",), 5.0, (16,), (0,)),
        Mutate("add_", ("a", "p"), (0,), 7.0),
        CopyFrom("q", "a"), Annotate("BACKWARD"), Release("v"),
    ]
    # Round trip through the writer.
    again = parse_lines([l for i in instrs for l in dumps_instr(i)], start=False)
    assert again == instrs
    # Without START skipping, the constant before it is kept.
    assert parse_lines(lines, start=False)[0] == Constant("w", 4)


@pytest.mark.parametrize("lines,msg", [
    (["{not json"], "not JSON"),
    ([J(INSTRUCTION="FOO")], "unknown instruction"),
    ([J(INSTRUCTION="CONSTANT", NAME="a")], "not followed by its MEMORY"),
    ([J(INSTRUCTION="CALL", NAME="f", ARGS=[], RESULT=["r"], TIME="1")], "lacks"),
    ([J(INSTRUCTION="MEMORY", NAME="a", MEMORY="1")], "stray MEMORY"),
    (call("f", [], ["r"], 1, [4], [3]), "ALIAS 3 out of range"),
    ([J(INSTRUCTION="MUTATE", NAME="f_", ARGS=["a"], MUTATE=[2], TIME="1")], "out of range"),
])
def test_parser_errors(lines, msg):
    with pytest.raises(TraceError, match=msg):
        parse_lines(lines, start=False)


# --------------------------------------------------------------------------
# Simulator semantics
# --------------------------------------------------------------------------

def chain_trace(n=6, size=100, release=True):
    """x -> a1 -> ... -> an, each released after its consumer ran; an kept."""
    chunks = [const("x", 10)]
    prev = "x"
    for i in range(1, n + 1):
        chunks.append(call("f", [prev], [f"a{i}"], 10, [size]))
        if release and prev != "x":
            chunks.append(rel(prev))
        prev = f"a{i}"
    return T(*chunks)


def test_baseline_and_eager_eviction():
    tr = chain_trace()
    # Released values are freed at once: at most two live activations + the constant.
    assert baseline_peak(tr, RUNTIME) == 10 + 2 * 100
    r = simulate(tr, budget=None, options=RUNTIME)
    assert r.feasible and r.overhead == 1.0 and r.evictions == 0 and r.eager_evictions == 5
    # Without releases everything stays live.
    assert baseline_peak(chain_trace(release=False), RUNTIME) == 10 + 6 * 100


def test_recompute_through_dead_values():
    # x -> a -> b -> c; a, b released (eagerly evicted, recipes kept); then c is
    # evicted under pressure and recomputed at the end: needs a and b again.
    tr = T(const("x", 10), call("f", ["x"], ["a"], 10, [100]), call("g", ["a"], ["b"], 20, [100]),
           rel("a"), call("h", ["b"], ["c"], 30, [100]), rel("b"),
           call("k", ["x"], ["d"], 40, [100]), call("k", ["d"], ["e"], 40, [100]), rel("d", "e"))
    assert baseline_peak(tr, RUNTIME) == 310
    r = simulate(tr, budget=210, policy="lru", options=RUNTIME)
    assert r.feasible
    # c was evicted for e, then rematerialized at the end (f, g, h rerun).
    assert r.rematerializations == 3 and r.remat_time == 60
    assert r.overhead == pytest.approx((140 + 60) / 140)
    assert r.peak_bytes <= 210


def test_views_share_storage():
    tr = T(const("x", 8), call("f", ["x"], ["a"], 10, [100]),
           call("view", ["a"], ["v"], 1, [100], [0]), rel("a"),
           call("g", ["v"], ["b"], 10, [50]))
    # The view adds no bytes; releasing the base keeps the storage (the view holds it).
    assert baseline_peak(tr, RUNTIME) == 8 + 100 + 50
    r = simulate(tr, budget=None, options=RUNTIME)
    assert r.eager_evictions == 0
    # Both handles gone: the storage goes.
    tr2 = T(const("x", 8), call("f", ["x"], ["a"], 10, [100]),
            call("view", ["a"], ["v"], 1, [100], [0]), rel("a"), rel("v"),
            call("g", ["x"], ["b"], 10, [50]))
    assert baseline_peak(tr2, RUNTIME) == 108
    assert simulate(tr2, budget=None, options=RUNTIME).eager_evictions == 1


def test_view_of_evicted_storage_reruns_view_op():
    tr = T(const("x", 8), call("f", ["x"], ["a"], 10, [100]),
           call("view", ["a"], ["v"], 1, [100], [0]), rel("a"),
           call("g", ["x"], ["b"], 10, [100]), call("h", ["v"], ["c"], 10, [10]), rel("b", "c"))
    r = simulate(tr, budget=8 + 100 + 10 + 5, policy="lru", options=RUNTIME)
    assert r.feasible
    # v's storage was evicted for b; h needs v: rerun f, then the view op.
    assert r.rematerializations == 2 and r.remat_time == 11


def test_mutation_runtime_and_simrd():
    tr = T(const("x", 8), call("f", ["x"], ["a"], 10, [100]), [J(INSTRUCTION="COPY", DST="a2", SRC="a")],
           [J(INSTRUCTION="MUTATE", NAME="relu_", ARGS=["a"], MUTATE=[0], TIME="5")],
           call("g", ["a2"], ["b"], 10, [100]), rel("a", "a2"))
    # Runtime: the memory moves to the new value (no extra bytes) and every
    # handle (a and its copy a2) now refers to it.
    r = simulate(tr, budget=None, options=RUNTIME)
    assert r.peak_bytes == 8 + 100 + 100
    # simrd: the op makes a new storage; only the written handle moves, a2
    # keeps the old value alive.
    r2 = simulate(tr, budget=None, options=PAPER)
    assert r2.peak_bytes == 8 + 100 + 100 + 100
    # Mutating a constant writes it in place (runtime semantics).
    tr3 = T(const("p", 50), [J(INSTRUCTION="MUTATE", NAME="add_", ARGS=["p"], MUTATE=[0], TIME="5")],
            call("f", ["p"], ["a"], 10, [10]))
    r3 = simulate(tr3, budget=60, options=RUNTIME)
    assert r3.feasible and r3.peak_bytes == 60


def test_mutated_value_recomputes_from_old_value():
    tr = T(const("x", 8), call("f", ["x"], ["a"], 10, [100]),
           [J(INSTRUCTION="MUTATE", NAME="relu_", ARGS=["a"], MUTATE=[0], TIME="5")],
           call("g", ["x"], ["b"], 10, [100]), call("h", ["a"], ["c"], 10, [10]), rel("b", "c"))
    r = simulate(tr, budget=8 + 100 + 10 + 1, policy="lru", options=RUNTIME)
    assert r.feasible
    # a (mutated) was evicted for b: recompute f (old value) then relu_.
    assert r.remat_time == 15


def test_infeasible_budgets():
    tr = chain_trace()
    r = simulate(tr, budget=50, options=RUNTIME)  # below one activation
    assert not r.feasible and r.status == "oom"
    r = simulate(tr, ratio=0.2, options=RUNTIME)
    assert r.status == "oom"
    # A long chain whose live end must be recomputed from far back: >2x stops it.
    chunks = [const("x", 1)]
    prev = "x"
    for i in range(1, 30):
        chunks.append(call("f", [prev], [f"a{i}"], 10, [100]))
        prev = f"a{i}"
    tr = T(*chunks)  # nothing released: every a_i is an output
    r = simulate(tr, budget=1 + 300, options=SimOptions())
    assert r.status in ("oom", ">2x") and not r.feasible


def test_pool_drives_decisions():
    calls = []

    def score(e, pool, now):
        calls.append(e.sid)
        return -e.nbytes  # evict the largest

    tr = T(const("x", 8), call("f", ["x"], ["a"], 10, [100]), call("f", ["x"], ["b"], 10, [50]),
           call("f", ["x"], ["c"], 10, [100]), rel("a"))
    r = simulate(tr, budget=8 + 200, policy=score, options=RUNTIME)
    # The score saw the candidates and the largest (a, or c's peer) went.
    assert calls and r.feasible and r.evictions == 1 and r.rematerializations == 0


def train_trace(n=10, size=100):
    """Forward a1..an kept for the backward pass, which consumes them in reverse."""
    chunks = [const("x", 10)]
    prev = "x"
    for i in range(1, n + 1):
        chunks.append(call("f", [prev], [f"a{i}"], 10, [size]))
        prev = f"a{i}"
    chunks.append(call("loss", [prev], ["g"], 1, [size]))
    g = "g"
    for i in range(n, 0, -1):
        chunks.append(call("df", [g, f"a{i}"], [f"g{i}"], 20, [size]))
        chunks.append(rel(g, f"a{i}"))
        g = f"g{i}"
    return T(*chunks)


@pytest.mark.parametrize("policy", ["dtr_eq", "dtr", "dtr_local", "lru", "largest", "msps",
                                    "dtr_regions"])
def test_every_policy_runs(policy):
    tr = train_trace()
    for opts in (RUNTIME, PAPER):
        r = simulate(tr, ratio=0.5, policy=policy, options=opts)
        assert r.feasible and r.overhead > 1.0 and r.peak_bytes <= r.budget_bytes


# --------------------------------------------------------------------------
# Optimal baselines
# --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_milp_matches_bruteforce(seed):
    g = random_graph(8, seed=seed, max_deps=2)
    peak = g.peak_no_remat()
    for r in (0.6, 0.8, 1.0):
        b = int(peak * r)
        m, bf = solve_milp(g, b), solve_bruteforce(g, b)
        assert m.feasible == bf.feasible
        if bf.feasible:
            assert m.cost == pytest.approx(bf.cost)


def test_optimal_on_tiny_chain():
    for n in (4, 5, 6):
        g = chain_graph(n)
        for s in (1, 2, 3):
            m = solve_milp(g, s + 2)
            # Revolve counts the forward sweep to x_{n-1}; the graph adds step n.
            assert m.cost == pytest.approx(revolve(n, s) + 1), (n, s)
            assert solve_bruteforce(g, s + 2).cost == pytest.approx(m.cost)
    # With unlimited memory nothing is recomputed.
    assert revolve(6, 10) == 5
    assert revolve(6, 0) == 15  # sum of 1..5
    assert revolve(3, 1, costs=[1, 2, 4]) == 3


def test_dtr_eq_near_optimal_on_small_graphs():
    # Forward/backward graphs of 17 nodes that the MILP solves to optimality
    # in seconds; dtr_eq's overhead must be within 10% of the optimum's.
    checked = 0
    for seed in (1, 2):
        g = training_graph(8, seed=seed)
        for row in compare(g, [0.7, 0.8], policies=["dtr_eq"], time_limit=30):
            assert row["optimal_status"] == "optimal"
            assert math.isfinite(row["dtr_eq"])
            assert row["dtr_eq_vs_opt"] <= 1.10, row
            assert row["optimal"] <= row["dtr_eq"] + 1e-9
            checked += 1
    assert checked == 4


def test_graph_trace_round_trip():
    g = random_graph(10, seed=3)
    tr = trace_from_graph(g)
    g2 = graph_from_trace(tr)
    assert g2.costs == g.costs and g2.sizes == g.sizes and g2.deps == [sorted(set(d)) for d in g.deps]
    assert baseline_peak(tr, RUNTIME) == g.peak_no_remat()


def test_excess_summary_skips_budgets_the_paper_has_no_column_for():
    # --budgets 0.3,0.5 used to crash the CLI's summary (None + float).
    from dtr.sim.report import excess_summary

    rows = [{"trace": "resnet32", "policy": "dtr_eq", "budget_ratio": b, "overhead": 1.1, "status": "ok"}
            for b in (0.3, 0.4)]
    out = excess_summary(rows, ["dtr_eq"], [0.3, 0.4])
    assert out["paper_mean_excess"] == pytest.approx(0.14)
    assert out["best_mean_excess"] == pytest.approx(0.1)


# --------------------------------------------------------------------------
# Recomputing in-place ops (Note [Stealing on recompute] in dtr/runtime.py)
# --------------------------------------------------------------------------

# The paper's traces live beside the checkout (docs/simulator.md).
PAPER_TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "traces",
                            "dtr-prototype")


def mut(name, args, which, time):
    return [J(INSTRUCTION="MUTATE", NAME=name, ARGS=args, MUTATE=which, TIME=str(time))]


def _resident_bytes(sim):
    return sum(s.nbytes for s in sim.storages.values() if s.resident)


def _step_and_check(trace, sim):
    """Run the trace one instruction at a time; the replay's live-byte count must
    equal the bytes of the storages it holds resident after every instruction."""
    from dtr.sim.simulator import OutOfBudget, OverheadExceeded

    try:
        for i, ins in enumerate(trace.instrs):
            sim.run_trace([ins])
            assert sim.mem == _resident_bytes(sim), (i, ins)
    except (OutOfBudget, OverheadExceeded):
        assert sim.mem == _resident_bytes(sim)


def dropout_trace():
    """A dropout mask (empty_like, then bernoulli_ and div_ in place) evicted by
    "largest" for c and needed again while c is locked."""
    return T(const("x", 10), call("empty_like", ["x"], ["m"], 1, [100]),
             mut("bernoulli_", ["m"], [0], 2), mut("div_", ["m", "x"], [0], 3),
             call("f", ["x"], ["z"], 10, [50]),
             call("k", ["x"], ["c"], 10, [200]), rel("z"),
             call("g", ["c", "m"], ["d"], 10, [10]), rel("c", "d"))


def test_recomputed_inplace_op_takes_over_the_old_value():
    from dtr.sim.simulator import Simulator

    tr = dropout_trace()
    opts = SimOptions(overhead_limit=None, pin_outputs=False)
    sim = Simulator(359, "largest", options=opts)
    _step_and_check(tr, sim)
    # m's three ops rerun; each in-place one writes into the value it rebuilt,
    # so the recompute needs one mask's bytes (a copy would need two: with c
    # locked nothing else could go, and the budget would fail).
    assert sim.remats == 3 and sim.remat_time == 1 + 2 + 3
    assert sim.peak <= 359
    # Only the final mask is resident; the values it was computed from are not.
    m = sim.handles["m"].storage
    assert m.resident and [s.sid for s in sim.storages.values() if s.resident and not s.pinned] == [m.sid]
    r = simulate(tr, budget=359, policy="largest", options=RUNTIME)
    assert r.feasible and r.rematerializations == 3
    # Paper semantics (simrd: each in-place op allocates a new value) needs more.
    assert simulate(tr, budget=359, policy="largest", options=PAPER).status == "oom"


@pytest.mark.parametrize("semantics", ["runtime", "eager", "paper"])
@pytest.mark.parametrize("ratio", [0.4, 0.6])
def test_live_bytes_match_resident_storages_on_a_paper_trace(semantics, ratio):
    # U-Net: 37 in-place ops, some recomputed at these budgets. The replay used
    # to make a recomputed in-place result resident without counting its bytes.
    import glob

    from dtr.sim import load
    from dtr.sim.simulator import Simulator

    paths = glob.glob(f"{PAPER_TRACES}/unet-*.log")
    if not paths:
        pytest.skip("the paper's traces are not in ../shared/traces")
    tr = load(paths[0])
    base = {"runtime": SimOptions(), "eager": SimOptions.eager(), "paper": SimOptions.paper()}[semantics]
    opts = SimOptions(**{**base.__dict__, "pin_outputs": False})
    sim = Simulator(int(baseline_peak(tr, base) * ratio), "dtr_eq", options=opts, op_time=tr.op_time)
    _step_and_check(tr, sim)
    assert sim.remats > 0


# --------------------------------------------------------------------------
# The lookahead policy and its plan (dtr/sim/plan.py, Note [Lookahead])
# --------------------------------------------------------------------------

def _replay(trace, policy, budget, plan=None, opts=RUNTIME):
    """Replay; return the simulator and its victims as (op index, victim) pairs."""
    from dtr.sim.simulator import Simulator

    sim = Simulator(budget, policy, options=opts, op_time=trace.op_time, plan=plan)
    victims = []
    choose = sim.pool.choose_victim

    class Logged:
        def __getattr__(self, name):
            return getattr(pool, name)

        def __setattr__(self, name, value):
            setattr(pool, name, value)

        def choose_victim(self, now):
            v = choose(now)
            victims.append((sim._op_index, v))
            return v

    pool = sim.pool
    sim.pool = Logged()
    sim.run_trace(trace)
    return sim, victims


def _with_op_renamed(trace, k, new_name):
    """The trace with its k-th op (CALL or MUTATE) renamed."""
    from dtr.sim.trace import Trace

    instrs = list(trace.instrs)
    ops = [i for i, ins in enumerate(instrs) if isinstance(ins, (Call, Mutate))]
    old = instrs[ops[k]]
    instrs[ops[k]] = type(old)(**{**old.__dict__, "name": new_name})
    return Trace(instrs, name=trace.name)


def test_plan_records_each_storages_uses():
    from dtr.sim import make_plan

    tr = train_trace(n=3)
    plan = make_plan(tr, RUNTIME)
    assert [k for k, _ in plan.ops] == ["f", "f", "f", "loss", "df", "df", "df"]
    assert plan.start == [0, 10, 20, 30, 31, 51, 71] and plan.end == 91
    # Storage 1 (a1) is read by f (op 1) and by the last df (op 6); storage 0 (x) by op 0.
    assert plan.uses[1] == [1, 6] and plan.uses[0] == [0, 7]  # x is still referenced at the end
    assert plan.next_use_after(1, 1) == 71 and plan.next_use_after(1, 6) == math.inf
    # What is still referenced at the end is needed then (the replay pins it).
    assert plan.uses[7] == [7] and plan.next_use_after(7, 6) == 91  # g1, the last gradient


def test_lookahead_follows_the_plan_and_beats_staleness():
    # Backward order is the reverse of forward: staleness says "evict a1" (needed
    # last, right), but after the loss it says "evict what the backward pass just
    # touched". The next use tells exactly.
    tr = train_trace(n=10)
    budget = int(baseline_peak(tr, RUNTIME) * 0.5)
    la = simulate(tr, budget=budget, policy="lookahead", options=RUNTIME)
    ms = simulate(tr, budget=budget, policy="msps_sqrt", options=RUNTIME)
    assert la.feasible and ms.feasible
    assert la.remat_time < ms.remat_time
    # Without a plan lookahead is msps_sqrt, decision for decision.
    none = simulate(tr, budget=budget, policy="lookahead", options=RUNTIME, plan=False)
    assert (none.remat_time, none.evictions, none.peak_bytes) == (ms.remat_time, ms.evictions, ms.peak_bytes)
    # Python and C++ pools agree with a plan too.
    from dtr import _ext

    if _ext.available() and "lookahead" in _ext.native_policies():
        py = simulate(tr, budget=budget, policy="lookahead", options=RUNTIME, pool_impl="python")
        assert (py.remat_time, py.evictions) == (la.remat_time, la.evictions)


def test_adaptive_replays_the_better_of_following_the_plan_and_not():
    # Note [Adaptive lookahead]: on a repeated step the runtime settles on the choice
    # that recomputed less; the replay is that settled step.
    tr = train_trace(n=10)
    peak = baseline_peak(tr, RUNTIME)
    for ratio in (0.4, 0.5, 0.7):
        with_plan = simulate(tr, ratio=ratio, policy="lookahead", options=RUNTIME)
        without = simulate(tr, ratio=ratio, policy="lookahead", options=RUNTIME, plan=False)
        got = simulate(tr, ratio=ratio, policy="adaptive", options=RUNTIME)
        best = min((with_plan, without), key=lambda r: (r.status != "ok", r.remat_time))
        assert got.policy == "adaptive" and got.budget_bytes == int(peak * ratio)
        assert (got.status, got.remat_time, got.evictions) == (best.status, best.remat_time, best.evictions)
    assert P.DEFAULT_POLICY == "adaptive"
    assert simulate(tr, ratio=0.5, options=RUNTIME).policy == "adaptive"


def test_lookahead_falls_back_when_the_step_diverges():
    from dtr.sim import make_plan

    tr = train_trace(n=10)
    budget = int(baseline_peak(tr, RUNTIME) * 0.5)
    sim_own, v_own = _replay(tr, "lookahead", budget, make_plan(tr, RUNTIME))
    assert sim_own.diverged_at is None
    # The previous step ran op 13 (a backward op) differently: a dynamic model.
    prev = _with_op_renamed(tr, 13, "df_other")
    sim_div, v_div = _replay(tr, "lookahead", budget, make_plan(prev, RUNTIME))
    assert sim_div.diverged_at == 13
    # Up to there it decided as with its own plan ...
    before = [v for v in v_own if v[0] < 13]
    assert before and [v for v in v_div if v[0] < 13] == before
    # ... and from there on knows no next use, so it scores as msps_sqrt
    # (tests/test_pool.py: lookahead without next uses is msps_sqrt).
    assert any(v[0] >= 13 for v in v_div)
    assert all(math.isnan(sim_div.pool.next_use(st.sid)) for st in sim_div.storages.values())
    # A plan that diverges at the first op is msps_sqrt throughout.
    sim_0, v_0 = _replay(tr, "lookahead", budget, make_plan(_with_op_renamed(tr, 0, "g"), RUNTIME))
    sim_ms, v_ms = _replay(tr, "msps_sqrt", budget)
    assert sim_0.diverged_at == 0
    assert [v for _, v in v_0] == [v for _, v in v_ms] and sim_0.remat_time == sim_ms.remat_time
    # So is a previous step that was shorter, once the step runs past its end.
    short = type(tr)([i for i in tr.instrs][:len(tr.instrs) - 4], name="short")
    sim_s, _ = _replay(tr, "lookahead", budget, make_plan(short, RUNTIME))
    assert sim_s.diverged_at is not None


def test_lookahead_on_a_paper_trace():
    # U-Net under the paper's semantics at 0.4: the paper's h_DTR runs out of
    # memory; msps_sqrt needs 1.31x, lookahead with the step's own plan 1.15x.
    import glob

    from dtr.sim import load

    paths = glob.glob(f"{PAPER_TRACES}/unet-*.log")
    if not paths:
        pytest.skip("the paper's traces are not in ../shared/traces")
    tr = load(paths[0])
    la = simulate(tr, ratio=0.4, policy="lookahead", options=SimOptions.paper())
    ms = simulate(tr, ratio=0.4, policy="msps_sqrt", options=SimOptions.paper())
    assert la.feasible and ms.feasible and la.overhead < ms.overhead - 0.05


def test_lookahead_near_optimal_where_dtr_eq_is_not():
    # training_graph(8, seed=4) at 0.6 of its peak: the MILP's optimum 1.134,
    # dtr_eq 1.598 (1.41x), lookahead with the graph's own plan 1.159 (1.02x).
    g = training_graph(8, seed=4)
    (row,) = compare(g, [0.6], policies=["dtr_eq", "lookahead"], time_limit=30)
    assert row["optimal_status"] == "optimal"
    assert row["lookahead_vs_opt"] <= 1.10, row
    assert row["dtr_eq_vs_opt"] > 1.3, row
