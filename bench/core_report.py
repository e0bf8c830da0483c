"""Core-runtime report: for each test model, eager's measured peak against dtr's at the
smallest feasible budget, the step-time ratio there, and the per-op overhead.

    python -m bench.core_report            # writes bench/results/core_report.md
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402

import dtr  # noqa: E402
import models  # noqa: E402
from dtr.measure import peak_memory  # noqa: E402


def _step(model, inp, ctx):
    def run():
        with ctx() as s:
            loss = model(*inp)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return s
    t0 = time.process_time()
    s, peak = peak_memory(run)
    return s, peak, time.process_time() - t0


def _cpu_time(model, inp, ctx, reps=3):
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        with ctx():
            model(*inp).backward()
        model.zero_grad(set_to_none=True)
        ts.append(time.process_time() - t0)
    return statistics.median(ts)


def smallest_feasible(model, inp, hi):
    lo = 0
    while hi - lo > max(hi // 40, 64):
        mid = (lo + hi) // 2
        try:
            for _ in range(2):  # feasible on two consecutive steps
                with dtr.budget(mid):
                    model(*inp).backward()
                model.zero_grad(set_to_none=True)
            hi = mid
        except dtr.BudgetExceededError:
            model.zero_grad(set_to_none=True)
            lo = mid
    return hi


def per_op_overhead(n=3000):
    a, b = torch.randn(16, 16, requires_grad=True), torch.randn(16, 16)

    def run(ctx):
        ts = []
        with ctx:
            x = a + b
            for _ in range(n):
                t0 = time.perf_counter()
                x + b
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6
    return run(contextlib.nullcontext()), run(dtr.budget(None))


def main() -> int:
    torch.set_num_threads(1)
    rows = ["| model | eager peak (B) | smallest budget (B) | dtr peak there (B) | dtr/eager peak | "
            "step time dtr/eager | recomputations |", "|---|---|---|---|---|---|---|"]
    for name in models.MODELS:
        model, data = models.make(name)
        inp = data[0]
        _step(model, inp, contextlib.nullcontext)
        _, eager_peak, _ = _step(model, inp, contextlib.nullcontext)
        s, _, _ = _step(model, inp, lambda: dtr.budget(None))
        budget = smallest_feasible(model, inp, s.stats.peak_bytes)
        s2, dtr_peak, _ = _step(model, inp, lambda: dtr.budget(budget))
        t_e = _cpu_time(model, inp, contextlib.nullcontext)
        t_d = _cpu_time(model, inp, lambda: dtr.budget(budget))
        rows.append(f"| {name} | {eager_peak} | {budget} | {dtr_peak} | {dtr_peak / eager_peak:.2f} | "
                    f"{t_d / t_e:.2f} | {s2.stats.rematerializations} |")
        print(rows[-1], flush=True)
    eager_us, dtr_us = per_op_overhead()
    text = "\n".join([
        "# Core runtime report", "",
        f"torch {torch.__version__}, one thread, CPU time; peaks measured by the profiler above "
        "the step's start (parameters excluded); budgets include parameters and gradients.", "",
        *rows, "",
        f"Per op (16x16 add, unlimited budget): eager {eager_us:.2f} us, dtr {dtr_us:.2f} us, "
        f"added {dtr_us - eager_us:.2f} us.", ""])
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "core_report.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
