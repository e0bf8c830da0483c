"""Differential training harness: the same steps eagerly and under dtr, compared bit for bit."""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Callable, List

import torch

import dtr
import models


@dataclass
class Run:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    losses: List[torch.Tensor]
    grads: List[List[torch.Tensor]]
    sessions: list = field(default_factory=list)
    rng_after: torch.Tensor = None
    base: int = 0  # CPU tensor bytes in use before the model was built (see headroom_peak)
    step_bases: List[int] = field(default_factory=list)  # in use as each step's block opened


def is_plain(t) -> bool:
    """A plain tensor: neither runtime's wrapper (a C++ wrapper's Python type is torch.Tensor)."""
    return type(t) is torch.Tensor and not dtr.is_dtr_tensor(t)


def train(name: str, ctx: Callable[[], object] = contextlib.nullcontext, steps: int = 3,
          seed: int = 0, built=None) -> Run:
    """``built``: (model, data) made beforehand (threads must not share the global RNG)."""
    base = live_bytes()
    model, data = built if built is not None else models.make(name, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if built is None:
        torch.manual_seed(1234)
    run = Run(model, opt, [], [], base=base)
    for inp in data[:steps]:
        opt.zero_grad(set_to_none=True)
        run.step_bases.append(live_bytes())
        with ctx() as s:
            loss = model(*inp)
            loss.backward()
            run.losses.append(dtr.unwrap(loss).detach().clone())
        run.sessions.append(s)
        run.grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        opt.step()
    run.rng_after = torch.get_rng_state()
    return run


def assert_same(a: Run, b: Run) -> None:
    assert len(a.losses) == len(b.losses)
    for x, y in zip(a.losses, b.losses):
        assert torch.equal(x, y), (x, y)
    for ga, gb in zip(a.grads, b.grads):
        assert len(ga) == len(gb)
        for x, y in zip(ga, gb):
            assert is_plain(y), "gradients must be plain tensors"
            assert torch.equal(x, y)
    for (ka, x), (kb, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb
        assert torch.equal(x, y), ka
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        sa, sb = a.opt.state[pa], b.opt.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.rng_after, b.rng_after), "the global RNG stream moved differently"


def peak_tracked(run: Run) -> int:
    return max(s.stats.peak_bytes for s in run.sessions)


def gc_tensor_bytes() -> int:
    """Live CPU tensor bytes counted without dtr's counter (dtr.device_memory's gc walk)."""
    return dtr.device_memory.gc_cpu_tensor_bytes()


def live_bytes() -> int:
    """CPU tensor bytes in use now, as the budget counts them."""
    return dtr.device_memory.cpu_tensor_bytes()


def headroom_peak(run: Run) -> int:
    """The run's peak as dtr counted it, less what was in use before the run began."""
    return max(s.stats.peak_bytes for s in run.sessions) - run.base


def step_room(run: Run) -> int:
    """The most any step's block used above what was in use as it opened (its activations
    and temporaries): with ``lambda: dtr.budget(budget_above(f * room))`` each step gets
    that fraction of it above what is in use then."""
    return max(s.stats.peak_bytes - b for s, b in zip(run.sessions, run.step_bases))


def budget_above(extra: int) -> int:
    """A budget leaving ``extra`` bytes above what is in use now.

    Garbage of earlier tests is collected first: freed later, it would leave the block
    more room than ``extra`` (test_compile's budget error did not raise after other tests)."""
    gc.collect()
    return live_bytes() + max(int(extra), 1)
