"""Soak: hundreds of training steps at a tight budget leave nothing behind.

A runtime that leaks a cell, a recipe or a plain tensor per step passes every short
test and fails a real training run after hours. Here a small model with BatchNorm,
dropout and an in-place ReLU trains for 500 steps, each under a tight budget, and
after the first steps the device's tensor bytes and the runtime's live objects must
stay exactly where they were, while every step stays bit-identical to eager.
"""
import gc

import pytest
import torch

import dtr
from harness import live_bytes

pytestmark = pytest.mark.usefixtures("runtime")  # Note [One suite, two runtimes]

STEPS = 500
WARMUP = 5  # Adam's state and the size caches are made in the first steps


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(inplace=True),
        torch.nn.Dropout(0.25), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def _train(ctx_for_step, probe=None, steps=STEPS):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    losses = []
    torch.manual_seed(2)
    for step in range(steps):
        x = torch.randn(48, 32, generator=data)
        y = torch.randn(48, 1, generator=data)
        opt.zero_grad(set_to_none=True)
        with ctx_for_step():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            losses.append(loss.item())
        del loss
        opt.step()
        if probe is not None:
            probe(step)
    return model, opt, losses


def test_500_steps_at_a_tight_budget_leak_nothing_and_stay_exact(runtime):
    eager_model, eager_opt, eager_losses = _train(lambda: torch.enable_grad())

    # The room a step needs above what is in use as its block opens, from the first
    # steps of the same loop with no limit (Adam's state and measured scratch included).
    rooms = []

    def unlimited():
        s = dtr.budget(None)
        base = live_bytes()
        rooms.append(lambda: s.stats.peak_bytes - base)
        return s

    # Garbage that earlier tests left for the cycle collector counts in `base` and may
    # be freed inside a measured step, which would make the room look smaller than it is
    # (CI once measured a room that left 0.75 of it infeasible): collect it first, and
    # keep the collector out of the measured steps.
    gc.collect()
    gc.disable()
    try:
        _train(unlimited, steps=4)
    finally:
        gc.enable()
    # The last step's: on the first, the C++ runtime reserves estimated kernel scratch,
    # measured from then on (107 KB of room, then 91 KB).
    room = rooms[-1]()
    sessions = []  # the latest step's
    evictions = rematerializations = 0
    bytes_after, objects_after = {}, {}

    def ctx():
        # live_bytes(), not harness.budget_above: a gc.collect() per step would be most of
        # the test's time, and this loop makes no cyclic garbage.
        # 0.9 of the room: this model's gradients are a third of it and cannot be evicted,
        # and DTR's greedy choices stop fitting near 0.72 (Python) and 0.85 (C++) of it
        # (0.75 failed in the whole suite's order by 1.5 KiB); the margin keeps the test
        # about leaks, not about where the edge of feasibility lies.
        s = dtr.budget(live_bytes() + int(room * 0.9))
        sessions[:] = [s]
        return s

    def probe(step):
        nonlocal evictions, rematerializations
        evictions += sessions[0].stats.evictions
        rematerializations += sessions[0].stats.rematerializations
        sessions.clear()  # its runtime's records must be free to die
        if step >= WARMUP and (step % 50 == 0 or step == STEPS - 1):
            gc.collect()
            bytes_after[step] = live_bytes()
            objects_after[step] = dtr.testing.live_runtime_objects(runtime)

    model, opt, losses = _train(ctx, probe)

    assert losses == eager_losses
    for (ka, a), (kb, b) in zip(eager_model.state_dict().items(), model.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    for pa, pb in zip(eager_model.parameters(), model.parameters()):
        for k, v in eager_opt.state[pa].items():
            assert torch.equal(v, opt.state[pb][k]), k
    # The budget was tight enough to evict and recompute.
    assert evictions > 0 and rematerializations > 0, (evictions, rematerializations)
    first = min(bytes_after)
    assert all(b == bytes_after[first] for b in bytes_after.values()), bytes_after
    assert all(o == objects_after[first] for o in objects_after.values()), objects_after
