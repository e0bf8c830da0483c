"""Reproduce one benchmark cell: one dtr step of a bench model at a budget, measured.

    python -m bench.check_budget gpt 0.6            # fraction of eager's measured peak
    python -m bench.check_budget gpt 61200000       # bytes
    python -m bench.check_budget resnet none        # no limit

Prints eager's measured peak, the budget, the measured peak of the dtr step (resident
bytes at the step's start + the profiler's peak above it; after one warm-up step, with a
plain ``dtr.budget``, as in bench.run), dtr's own accounting
(stats.peak_bytes), the loss of both, and the full message of a BudgetExceededError.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch

import dtr
from bench import models as M
from bench.run import resident_base
from dtr.policies import DEFAULT_POLICY

MiB = 1 << 20


def one_step(name, size, budget, policy):
    """One measured step after an unmeasured warm-up step on the same batch, as bench.run does."""
    model, batch_fn = M.build(name, size)
    batch = batch_fn(1)
    base = resident_base(model, batch)

    def step():
        torch.manual_seed(1234)
        if budget == "eager":
            loss = model(*batch)
            loss.backward()
            return loss.item(), None
        with dtr.budget(budget, policy=policy) as s:
            loss = model(*batch)
            loss.backward()
            v = loss.item()
        return v, s.stats

    step()  # warm-up: the runtime measures each op's scratch on first sight
    model.zero_grad(set_to_none=True)  # before the measured window, as at a step's start
    (loss, stats), peak = dtr.measure.peak_memory(step)
    model.zero_grad(set_to_none=True)
    return base + peak, loss, stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=M.MODELS)
    p.add_argument("budget", help="fraction of eager's peak (<= 1), bytes, or 'none'")
    p.add_argument("--size", default="full", choices=sorted(M.SIZES))
    p.add_argument("--policy", default=DEFAULT_POLICY)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    eager_peak, eager_loss, _ = one_step(args.model, args.size, "eager", None)
    print(f"eager: measured peak {eager_peak / MiB:.2f} MiB, loss {eager_loss!r}")
    if args.budget.lower() == "none":
        budget = None
    else:
        x = float(args.budget)
        budget = int(x * eager_peak) if x <= 1 else int(x)
    try:
        peak, loss, st = one_step(args.model, args.size, budget, args.policy)
    except dtr.BudgetExceededError as e:
        print(f"dtr budget {budget}: BudgetExceededError: {e}")
        print(f"smallest_feasible_bytes = {e.smallest_feasible_bytes}")
        return 1
    bs = "none" if budget is None else f"{budget / MiB:.2f} MiB ({budget} bytes)"
    over = "" if budget is None else f" = {peak / budget:.3f}x the budget"
    print(f"dtr {args.policy}, budget {bs}: measured peak {peak / MiB:.2f} MiB{over}; "
          f"dtr accounting peak {st.peak_bytes / MiB:.2f} MiB; loss {loss!r} "
          f"({'bit-equal' if loss == eager_loss else 'DIFFERS'}); evictions {st.evictions}, "
          f"remats {st.rematerializations}, unplanned ops {st.unplanned_ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
