"""Differential tests: training under dtr equals eager bit for bit, at any feasible budget."""
import pytest

import dtr
from harness import assert_same, budget_above, step_room, train
from models import MODELS

pytestmark = pytest.mark.usefixtures("runtime")  # Note [One suite, two runtimes]


@pytest.fixture(scope="module")
def eager_runs():
    return {name: train(name) for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_unlimited_budget_is_exact(name, eager_runs):
    run = train(name, lambda: dtr.budget(None))
    assert_same(eager_runs[name], run)
    assert all(s.stats.evictions == 0 and s.stats.rematerializations == 0 for s in run.sessions)


@pytest.mark.parametrize("name", MODELS)
def test_evict_everything_is_exact(name, eager_runs):
    run = train(name, dtr.testing.evict_everything)
    assert_same(eager_runs[name], run)
    assert all(s.stats.rematerializations > 0 for s in run.sessions)


def _room(room):
    """Each step's block gets ``room`` bytes above what is in use as it opens (the budget
    bounds all tensor memory: See Note [The budget is the device's memory])."""
    return lambda: dtr.budget(budget_above(room))


def _smallest_feasible(name, peak):
    """The smallest room (bisected) the run fits in, and the run that fitted there."""
    lo, hi, fitted = 0, peak, None
    while hi - lo > max(peak // 30, 64):
        mid = (lo + hi) // 2
        try:
            fitted, hi = train(name, _room(mid)), mid
        except dtr.BudgetExceededError:
            lo = mid
    return hi, fitted


@pytest.mark.parametrize("name", MODELS)
def test_tight_budgets_are_exact_and_hold(name, eager_runs):
    peak = step_room(train(name, lambda: dtr.budget(None)))
    # Op costs are measured times, so eviction choices right at the edge of
    # feasibility differ between runs, and a second run a little above the smallest
    # room that fitted once can fail (it did on loaded machines, by up to two
    # bisection steps). So the tight run checked is the bisection's own run at the
    # smallest room, and a run at 0.9 of the peak, far from the edge, is made anew.
    smallest, tight = _smallest_feasible(name, peak)
    assert tight is not None and smallest < peak
    runs = [tight]
    if int(peak * 0.9) > smallest:
        runs.append(train(name, _room(int(peak * 0.9))))
    for run in runs:
        assert_same(eager_runs[name], run)
        # The first call of an op whose meta kernel under-reports its output
        # (mkldnn's RNN workspace) can overshoot once; later steps hold exactly.
        for s in run.sessions[1:]:
            assert s.stats.peak_bytes <= s.budget_bytes, (s.stats.peak_bytes, s.budget_bytes)
    assert sum(s.stats.evictions for s in tight.sessions) > 0
    assert sum(s.stats.rematerializations for s in tight.sessions) > 0


@pytest.mark.parametrize("policy", ["dtr_eq", "dtr", "dtr_local", "lru", "largest", "msps", "random"])
def test_every_policy_is_exact(policy, eager_runs):
    peak = step_room(train("cnn", lambda: dtr.budget(None)))
    # 0.9: lru cannot meet 0.85 once the convolutions' scratch is measured (smaller
    # than the old estimate, so the unlimited peak that the budget scales is lower).
    run = train("cnn", lambda: dtr.budget(budget_above(peak * 0.9), policy=policy))
    assert_same(eager_runs["cnn"], run)
    assert sum(s.stats.rematerializations for s in run.sessions) > 0
