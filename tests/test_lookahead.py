"""The lookahead policy on the runtimes (issue 15): each lookahead block records its step
and the next one follows it (Note [Recording steps for lookahead] in csrc/step_plan.h,
Note [Where step plans live] in dtr/step_plan.py), on both runtimes."""
import dataclasses
import threading

import pytest
import torch
import torch.nn as nn

import dtr
from dtr import step_plan
from harness import assert_same, budget_above, live_bytes, step_room, train

pytestmark = [
    pytest.mark.usefixtures("runtime"),  # Note [One suite, two runtimes]
    # At half its room the RNN's first step (no plan yet: msps_sqrt's choices) recomputes
    # more than 3x its compute and warns, as it should; the tests compare the steps after.
    pytest.mark.filterwarnings("ignore::dtr.ThrashWarning"),
]

WIDTH, BATCH = 64, 32


class RNN(nn.Module):
    """A tanh RNN over as many steps as the data has; ``relu_at`` takes another branch
    at that step (a dynamic model whose steps differ)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(2 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, xs, relu_at=-1):
        h = xs.new_zeros(BATCH, WIDTH)
        for t in range(xs.shape[0]):
            z = self.cell(torch.cat([xs[t], h], 1))
            h = torch.relu(z) if t == relu_at else torch.tanh(z)
        return self.head(h).pow(2).mean()


def _rnn_steps(block, lengths, relu_at=None, probe=None):
    """Trains the RNN one step per length, each in its own block. Returns (losses, grads,
    params, sessions, probes): ``probe(session)`` is called after each forward, in the block."""
    torch.manual_seed(0)
    model = RNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, BATCH, WIDTH, generator=g) for n in lengths]
    relu_at = relu_at or [-1] * len(lengths)
    losses, grads, sessions, probes = [], [], [], []
    for xs, r in zip(data, relu_at):
        opt.zero_grad(set_to_none=True)
        with block() as s:
            loss = model(xs, r)
            if probe is not None:
                probes.append(probe(s))
            loss.backward()
            losses.append(dtr.unwrap(loss).detach().clone())
        sessions.append(s)
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    return losses, grads, params, sessions, probes


def _assert_same_rnn(a, b):
    assert len(a[0]) == len(b[0])
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert all(torch.equal(x, y) for ga, gb in zip(a[1], b[1]) for x, y in zip(ga, gb))
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


class _Eager:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _rnn_room(lengths):
    """The most any step's block used above what was in use as it opened."""
    bases = []

    def block():
        bases.append(live_bytes())
        return dtr.budget(None)

    sessions = _rnn_steps(block, lengths)[3]
    return max(s.stats.peak_bytes - b for s, b in zip(sessions, bases))


def _lookahead(room):
    return lambda: dtr.budget(budget_above(room), policy="lookahead")


def test_a_step_that_diverges_falls_back_and_is_recorded_anew():
    # Step 2 runs more RNN steps than step 1: it follows step 1's plan up to the op
    # where step 1 left the loop, then every next use is cleared (msps_sqrt's scores)
    # and it is recorded; step 3 repeats step 2 and follows it to the end.
    lengths = [6, 9, 9]
    eager = _rnn_steps(_Eager, lengths)
    room = _rnn_room(lengths)
    got = _rnn_steps(_lookahead(0.5 * room), lengths, probe=lambda s: s.runtime.known_next_uses())
    _assert_same_rnn(eager, got)
    st = [s.stats for s in got[3]]
    assert sum(x.rematerializations for x in st) > 0  # the budget is tight
    # Step 1: no plan.
    assert (st[0].plan_ops, st[0].plan_diverged_at, got[4][0]) == (0, -1, 0)
    # Step 2: followed step 1 until the 7th RNN step, then diverged; after the forward
    # (past the divergence) the pool knows no next use.
    assert 0 < st[1].plan_diverged_at < st[1].ops
    assert st[1].plan_ops == st[1].plan_diverged_at
    assert got[4][1] == 0
    # Step 3 follows step 2's recording to its end; mid-step the pool knows next uses.
    assert st[2].plan_diverged_at == -1
    assert st[2].plan_ops > st[1].plan_diverged_at
    assert got[4][2] > 0
    # After a block nothing follows a plan.
    assert all(s.runtime.known_next_uses() == 0 for s in got[3])


def test_a_step_that_takes_another_branch_diverges_at_that_op():
    lengths = [7, 7, 7]
    eager = _rnn_steps(_Eager, lengths, relu_at=[-1, 4, 4])
    room = _rnn_room(lengths)
    got = _rnn_steps(_lookahead(0.5 * room), lengths, relu_at=[-1, 4, 4])
    _assert_same_rnn(eager, got)
    st = [s.stats for s in got[3]]
    # Step 2's relu at RNN step 4 is the first op that differs from step 1's tanh.
    assert 0 < st[1].plan_diverged_at < st[1].ops
    same_prefix = st[1].plan_diverged_at
    assert st[2].plan_diverged_at == -1 and st[2].plan_ops > same_prefix
    # The plan is the op sequence, not the data: on the same branch it is followed.
    step_plan.forget()
    again = _rnn_steps(_lookahead(0.5 * room), [7, 7])
    assert [s.stats.plan_diverged_at for s in again[3]] == [-1, -1]


def test_a_followed_plan_recomputes_less_than_msps_sqrt():
    # The MLP chain's backward needs its activations in reverse order: with the plan
    # the pool knows which ones are needed last. Step 1 has no plan (msps_sqrt's
    # choices), so the comparison is on steps 2 and 3. Measured (both runtimes, four
    # runs each): msps_sqrt 215-228 recomputations per step, lookahead 178.
    full = train("mlp", lambda: dtr.budget(None))
    room = step_room(full)
    eager = train("mlp")
    base = train("mlp", lambda: dtr.budget(budget_above(0.6 * room), policy="msps_sqrt"))
    step_plan.forget()
    la = train("mlp", lambda: dtr.budget(budget_above(0.6 * room), policy="lookahead"))
    # As the blocks left them (comparing results runs an op or two on their tensors).
    la_st = [dataclasses.replace(s.stats) for s in la.sessions]
    base_st = [dataclasses.replace(s.stats) for s in base.sessions]
    assert_same(eager, la)
    assert_same(eager, base)
    # The budget makes msps_sqrt recompute, and steps 2+ followed their plans to the end.
    assert all(s.rematerializations > 0 for s in base_st)
    assert la_st[0].plan_ops == 0
    for s in la_st[1:]:
        assert s.plan_diverged_at == -1 and s.plan_ops == s.ops, s
    assert sum(s.rematerializations for s in la_st[1:]) < sum(s.rematerializations for s in base_st[1:])


def _smallest_feasible(name, peak, policy):
    lo, hi = 0, peak
    while hi - lo > max(peak // 30, 64):
        mid = (lo + hi) // 2
        try:
            step_plan.forget()
            train(name, lambda: dtr.budget(budget_above(mid), policy=policy))
            hi = mid
        except dtr.BudgetExceededError:
            lo = mid
    return hi


@pytest.mark.parametrize("name", ["mlp", "lstm", "treelstm"])
def test_multi_step_training_at_a_tight_budget_is_exact(name):
    # treelstm's trees differ in size each step (a step that diverges); mlp and lstm
    # repeat theirs. Two bisection steps above the smallest feasible room, as
    # test_models does.
    peak = step_room(train(name, lambda: dtr.budget(None)))
    room = _smallest_feasible(name, peak, "lookahead") + 2 * max(peak // 30, 64)
    step_plan.forget()
    run = train(name, lambda: dtr.budget(budget_above(room), policy="lookahead"))
    assert_same(train(name), run)
    assert sum(s.stats.rematerializations for s in run.sessions) > 0
    for s in run.sessions[1:]:
        assert s.stats.peak_bytes <= s.budget_bytes, (s.stats.peak_bytes, s.budget_bytes)
    st = [s.stats for s in run.sessions]
    assert st[0].plan_ops == 0
    if name == "treelstm":
        assert all(s.plan_diverged_at > 0 for s in st[1:])
    else:
        assert all(s.plan_diverged_at == -1 and s.plan_ops > 0 for s in st[1:])


def test_plans_are_per_thread_and_other_policies_leave_them():
    lengths = [5, 5]
    _rnn_steps(lambda: dtr.budget(None, policy="lookahead"), lengths[:1])
    kind = dtr.Session(None).runtime_kind
    plan = step_plan.plan_for(kind, "cpu")
    assert plan is not None and plan.num_ops > 0 and plan.num_storages > 0
    # A block with another policy neither follows nor replaces it.
    _rnn_steps(lambda: dtr.budget(None, policy="msps_sqrt"), lengths[:1])
    assert step_plan.plan_for(kind, "cpu") is plan
    # Another thread has no plan: its first lookahead block follows none.
    seen = []

    def other():
        seen.append(step_plan.plan_for(kind, "cpu"))
        with dtr.budget(None, policy="lookahead") as s:
            torch.ones(4, 8).mul(2).sum()
        seen.append(s.stats.plan_ops)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [None, 0]
    assert step_plan.plan_for(kind, "cpu") is plan
    # forget() drops this thread's plans: the next block has none to follow.
    step_plan.forget()
    assert step_plan.plan_for(kind, "cpu") is None
    got = _rnn_steps(lambda: dtr.budget(None, policy="lookahead"), lengths[:1])
    assert got[3][0].stats.plan_ops == 0


def test_a_block_that_raises_leaves_its_partial_step_as_the_plan():
    lengths = [6, 6, 6]
    eager = _rnn_steps(_Eager, lengths)
    room = _rnn_room(lengths)
    torch.manual_seed(0)
    model = RNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, BATCH, WIDTH, generator=g) for n in lengths]
    # A step that fails half way (the user's error): nothing changed, its ops so far are
    # the plan.
    short = data[0][:3]
    with pytest.raises(ZeroDivisionError):
        with dtr.budget(budget_above(0.5 * room), policy="lookahead") as s:
            model(short)
            1 / 0
    assert s.stats.plan_ops == 0
    partial = s.stats.ops
    # An infeasible budget: a dtr error, parameters untouched.
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(dtr.BudgetExceededError):
        with dtr.budget(budget_above(64), policy="lookahead"):
            model(data[0]).backward()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    # The steps that follow are exact; the first one follows the failed block's partial
    # recording (three RNN steps, then the head) until its fourth RNN step.
    step_plan.forget()
    with pytest.raises(ZeroDivisionError):
        with dtr.budget(budget_above(0.5 * room), policy="lookahead") as s:
            model(short)
            1 / 0
    losses, grads, sessions = [], [], []
    for xs in data:
        opt.zero_grad(set_to_none=True)
        with dtr.budget(budget_above(0.5 * room), policy="lookahead") as s:
            loss = model(xs)
            loss.backward()
            losses.append(dtr.unwrap(loss).detach().clone())
        sessions.append(s)
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    _assert_same_rnn(eager, (losses, grads, [p.detach().clone() for p in model.parameters()]))
    d = sessions[0].stats.plan_diverged_at
    assert 0 < d < partial and sessions[0].stats.plan_ops == d
    assert [s.stats.plan_diverged_at for s in sessions[1:]] == [-1, -1]


def test_nested_blocks_record_one_step():
    lengths = [4, 4]
    steps = []
    for xs_len in lengths:
        with dtr.budget(None, policy="lookahead") as outer:
            with dtr.budget(None, policy="lookahead") as inner:
                assert inner is outer
                torch.ones(8, 8).mul(2).tanh().sum()
            torch.ones(8, 8).add(1).sum()
        steps.append(outer.stats)
    assert steps[0].plan_ops == 0
    assert steps[1].plan_diverged_at == -1 and steps[1].plan_ops == steps[1].ops


# ----------------------------------------------------------------------------
# Note [Adaptive lookahead] in dtr/step_plan.py
# ----------------------------------------------------------------------------
def _choose(seconds_with, seconds_without, steps):
    """Drives the adaptive choice with fixed step costs; returns whether each step followed."""
    step_plan.forget()
    step_plan.keep("python", "cpu", object())  # a plan exists from here on
    followed = []
    for _ in range(steps):
        plan = step_plan.plan_for_block("python", "cpu", adaptive=True)
        followed.append(plan is not None)
        step_plan.report("python", "cpu", seconds_with if plan is not None else seconds_without, 1)
    step_plan.forget()
    return followed


def test_adaptive_keeps_following_a_plan_that_pays():
    followed = _choose(seconds_with=1.0, seconds_without=2.0, steps=40)
    assert followed[0]  # the first step with a plan tries it
    assert not followed[1]  # then measures the other choice
    # Then the plan, with a probe of the other choice after 16 steps, then 32 (it keeps
    # losing, so the interval doubles).
    assert [i for i, f in enumerate(followed) if not f] == [1, 17], followed


def test_adaptive_stops_following_a_plan_that_costs_more_and_probes_less_and_less():
    followed = _choose(seconds_with=5.0, seconds_without=1.0, steps=200)
    probes = [i for i, f in enumerate(followed) if f]
    assert probes[0] == 0  # tried once ...
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0], probes  # ... then ever more rarely
    assert len(probes) <= 6, probes


def test_adaptive_without_a_plan_runs_without_one():
    step_plan.forget()
    assert step_plan.plan_for_block("python", "cpu", adaptive=True) is None
    step_plan.report("python", "cpu", 1.0, 1)
    assert step_plan.following_plan("python", "cpu") is None  # nothing with a plan measured


def test_adaptive_training_is_exact_and_measures_both_choices():
    lengths = [6, 6, 6, 6, 6]
    eager = _rnn_steps(_Eager, lengths)
    room = _rnn_room(lengths)
    step_plan.forget()
    got = _rnn_steps(lambda: dtr.budget(budget_above(room // 2), policy="adaptive"), lengths)
    _assert_same_rnn(eager, got)
    st = [s.stats for s in got[3]]
    assert all(s.policy == "adaptive" for s in st)
    assert st[0].plan_ops == 0  # no plan yet
    assert st[1].plan_ops > 0  # the first plan is tried
    assert sum(s.rematerializations for s in st) > 0, "the budget must make it recompute"
    # What the choice compares: the pool's summed costs of what it recomputed.
    assert all((s.recomputed_cost > 0) == (s.rematerializations > 0) for s in st)
    kind = dtr.Session(None).runtime_kind
    assert step_plan.following_plan(kind, "cpu") in (True, False)  # both measured
    step_plan.forget()


def test_adaptive_records_a_step_only_where_a_plan_can_matter():
    # Note [When adaptive records]: not with no limit; not after a block that evicted
    # nothing; again after one that evicted, and the step after that follows a plan.
    lengths = [6] * 6
    eager = _rnn_steps(_Eager, lengths)
    room = _rnn_room(lengths)
    kind = dtr.Session(None).runtime_kind
    rooms = iter([None, None, 4 * room, 4 * room, room // 2, room // 2])
    plans = []

    def block():
        r = next(rooms)
        return dtr.budget(None if r is None else budget_above(r), policy="adaptive")

    def probe(session):
        plans.append(step_plan.plan_for(kind, "cpu"))

    step_plan.forget()
    got = _rnn_steps(block, lengths, probe=probe)
    after = step_plan.plan_for(kind, "cpu")
    step_plan.forget()
    _assert_same_rnn(eager, got)
    st = [s.stats for s in got[3]]
    # No limit: nothing recorded, nothing followed.
    assert plans[0] is None and plans[1] is None and plans[2] is None
    # The first limited block records (nothing known yet); it evicts nothing, so the
    # next one neither records nor follows, and leaves the plan as it was.
    assert st[2].evictions == 0 and st[3].evictions == 0
    assert plans[3] is not None and plans[4] is plans[3]
    assert all(s.plan_ops == 0 for s in st[:5])
    # The tight block after that quiet one does not record, but evicts ...
    assert st[4].evictions > 0 and plans[5] is plans[3]
    # ... so the next one records again and follows the plan it finds.
    assert st[5].plan_ops > 0 and after is not plans[3]


def test_adaptive_drops_a_plan_once_it_has_cost_more_than_not_following_one():
    # Note [A plan that loses is dropped]: the RNN repeats one step exactly, so a plan
    # is only left for cost. Make the step without a plan look free (cost 0): the
    # block following the plan must drop it at the first op after its first
    # recomputation, score as msps_sqrt from there, stay exact, and report a loss.
    lengths = [6, 6, 6]
    eager = _rnn_steps(_Eager, lengths)
    room = _rnn_room(lengths)
    kind = dtr.Session(None).runtime_kind
    step_plan.forget()
    calls = []

    def block():
        if len(calls) == 1:  # step 1 measured the choice without a plan: pretend it cost 0
            step_plan._choices()[(kind, "cpu")].cost[False] = 0.0
        calls.append(step_plan.following_plan(kind, "cpu"))
        return dtr.budget(budget_above(room // 2), policy="adaptive")

    got = _rnn_steps(block, lengths)
    _assert_same_rnn(eager, got)
    st = [s.stats for s in got[3]]
    assert st[0].plan_ops == 0 and st[1].rematerializations > 0
    # Step 2 followed the plan up to its first recomputation, then dropped it.
    assert 0 < st[1].plan_diverged_at < st[1].ops and st[1].plan_ops == st[1].plan_diverged_at
    assert calls[2] is False  # reported as lost: the next step runs without the plan
    assert st[2].plan_ops == 0
    step_plan.forget()


def test_a_plan_is_dropped_only_for_cost():
    # The same steps with the real costs.
    lengths = [6, 6]
    room = _rnn_room(lengths)
    step_plan.forget()
    got = _rnn_steps(lambda: dtr.budget(budget_above(room // 2), policy="adaptive"), lengths)
    st = [s.stats for s in got[3]]
    step_plan.forget()
    assert st[1].plan_ops > 0
    # A plan is only dropped after the step's recomputations passed the other choice's.
    dropped = st[1].plan_diverged_at >= 0
    assert not dropped or st[1].recomputed_cost > st[0].recomputed_cost, (st[0], st[1])


def test_lookahead_records_every_step_even_with_no_limit():
    kind = dtr.Session(None).runtime_kind
    step_plan.forget()
    _rnn_steps(lambda: dtr.budget(None, policy="lookahead"), [3])
    assert step_plan.plan_for(kind, "cpu") is not None
    step_plan.forget()


def test_adaptive_is_listed_and_validated():
    assert "adaptive" in dtr.policies.available()
    with pytest.raises(ValueError, match="unknown eviction policy"):
        dtr.budget(None, policy="adaptiv")
