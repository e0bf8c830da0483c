"""Overhead of torch.compile(backend="dtr") against the eager dtr runtime and against
torch.compile's own activation_memory_budget, on one model at two budgets.

    python bench/compile_bench.py                      # GPT (bench/models.py, "mid" size)
    python bench/compile_bench.py --size quick --steps 2 --out /tmp/cb.md

Writes bench/results/compile_bench.md. Configurations, each trained from the same
initial parameters on the same batches with the same dropout seed:

* eager: plain PyTorch, no budget (the reference for losses, time and memory);
* dtr eager: the eager dtr runtime, ``with dtr.budget(B)``;
* dtr compiled: ``torch.compile(model, backend="dtr")`` inside ``with dtr.budget(B)``;
* dtr eager / compiled on the Python pool: the same with ``pool="python"``;
* aot_eager + amb: ``torch.compile(model, backend="aot_eager")`` with
  ``torch._functorch.config.activation_memory_budget`` set to the same fraction.

B is a fraction of the peak the eager dtr runtime tracks with no limit. Time is
the median wall time of the timed steps (after a warm-up step that compiles);
"peak" is measured by the torch profiler's allocator events (dtr.measure), above
what was allocated when the step started.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

if __package__ in (None, ""):  # ``python bench/compile_bench.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import dtr
import dtr.compile as dcompile
from bench import models as M, write_report

MiB = 1 << 20

# A GPT between bench/models.py's "quick" and "full" sizes: big enough that an op
# costs more than the runtime's per-op bookkeeping, small enough for 2 CPU cores.
M.SIZES.setdefault("mid", dict(M.SIZES["quick"]))
M.SIZES["mid"] = dict(M.SIZES["mid"], gpt=dict(vocab=1024, seq=128, d=128, layers=4, heads=4, batch=4))


def _train(model, init, batch_fn, steps, run_step):
    """Warm-up step (compiles), then ``steps`` timed steps from the initial parameters."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with torch.no_grad():
        model.load_state_dict(init)
    torch.manual_seed(1234)
    run_step(model, opt, batch_fn(0))  # warm-up / compile
    with torch.no_grad():
        model.load_state_dict(init)
    torch.manual_seed(1234)
    losses, walls, cpus, stats = [], [], [], []
    peak = None
    for i in range(steps + 1):
        batch = batch_fn(1 + i)
        if i == 0:  # profiled step: the peak; not timed
            (loss, st), peak = dtr.measure.peak_memory(run_step, model, opt, batch)
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            loss, st = run_step(model, opt, batch)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        losses.append(loss)
        stats.append(st)
    return dict(losses=losses, wall=statistics.median(walls), cpu=statistics.median(cpus),
                peak=peak, stats=stats)


def _plain_step(fwd):
    def step(model, opt, batch):
        opt.zero_grad(set_to_none=True)
        loss = fwd(*batch)
        loss.backward()
        val = loss.detach().clone()
        opt.step()
        return val, None
    return step


def _dtr_step(fwd, budget, policy="dtr_eq", pool="auto"):
    def step(model, opt, batch):
        opt.zero_grad(set_to_none=True)
        with dtr.budget(budget, policy=policy, pool=pool) as s:
            loss = fwd(*batch)
            loss.backward()
            val = dtr.unwrap(loss).detach().clone()
        del loss
        opt.step()
        return val, s.stats
    return step


def _row(name, res, ref, base_wall):
    st = [s for s in res["stats"] if s is not None]
    remat = sum(s.rematerializations for s in st) / len(st) if st else 0
    remat_s = sum(s.remat_seconds for s in st) / len(st) if st else 0.0
    exact = all(torch.equal(a, b) for a, b in zip(res["losses"], ref["losses"]))
    return (f"| {name} | {res['cpu'] * 1e3:.0f} | {res['cpu'] / base_wall:.2f}x | {res['wall'] * 1e3:.0f} | "
            f"{res['peak'] / MiB:.2f} | {remat:.0f} | {remat_s * 1e3:.0f} | "
            f"{'yes' if exact else 'NO'} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt", choices=M.MODELS)
    ap.add_argument("--size", default="mid")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per configuration")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: CPU time is not inflated by spinning "
                         "threads on a shared machine)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "compile_bench.md"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="dtr: C\\+\\+ extension")
    torch.set_num_threads(args.threads)

    model, batch_fn = M.build(args.model, args.size)
    model.train()
    init = {k: v.clone() for k, v in model.state_dict().items()}

    ref = _train(model, init, batch_fn, args.steps, _plain_step(model))
    unl = _train(model, init, batch_fn, args.steps, _dtr_step(model, None))
    tracked_peak = max(s.peak_bytes for s in unl["stats"])

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=dcompile.dtr_backend)
    # aot_eager with no budget, for the cost of compilation itself.
    torch._dynamo.reset()
    aot = _train(model, init, batch_fn, args.steps, _plain_step(torch.compile(model, backend="aot_eager")))
    torch._dynamo.reset()
    c_unl = _train(model, init, batch_fn, args.steps, _dtr_step(compiled, None))

    lines = [
        f"# torch.compile(backend=\"dtr\"): overhead ({args.model}, size {args.size})",
        "",
        f"Model: {M.describe(args.model, args.size)}. torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, dtr C++ pool: "
        f"{'yes' if dtr._ext.available() else 'no'}. {args.steps} measured steps per row "
        "(medians; the peak comes from one more, profiled, step).",
        f"Budgets are fractions of the {tracked_peak / MiB:.2f} MiB the eager dtr runtime "
        "tracks with no limit. Generated by `python bench/compile_bench.py`.",
        "",
        "Columns: CPU time per step (process time, all threads: steadier than wall time on a "
        "shared machine); its ratio to plain eager; wall time per step; measured peak (MiB above the step's start); "
        "recomputations per step; seconds spent recomputing per step (ms); losses equal to "
        "plain eager bit for bit.",
        "",
        "| configuration | CPU ms/step | vs eager | wall ms/step | peak MiB | remat/step | remat ms/step | exact |",
        "|---|---|---|---|---|---|---|---|",
        _row("eager (no budget)", ref, ref, ref["cpu"]),
        _row("aot_eager (no budget)", aot, ref, ref["cpu"]),
        _row("dtr eager, no limit", unl, ref, ref["cpu"]),
        _row("dtr compiled, no limit", c_unl, ref, ref["cpu"]),
    ]
    for frac in args.fractions:
        budget = int(tracked_peak * frac)
        lines.append(f"| **budget {frac:.0%} = {budget / MiB:.2f} MiB** | | | | | | | |")
        for label, fwd, policy, pool in [
            ("dtr eager", model, "dtr_eq", "auto"),
            ("dtr compiled", compiled, "dtr_eq", "auto"),
            ("dtr eager, Python pool", model, "dtr_eq", "python"),
            ("dtr compiled, Python pool", compiled, "dtr_eq", "python"),
        ]:
            try:
                res = _train(model, init, batch_fn, args.steps, _dtr_step(fwd, budget, policy, pool))
                lines.append(_row(label, res, ref, ref["cpu"]))
            except dtr.BudgetExceededError as e:
                lines.append(f"| {label} | infeasible: {str(e)[:80]}... | | | | | | |")
            print(lines[-1], flush=True)
        old = torch._functorch.config.activation_memory_budget
        torch._functorch.config.activation_memory_budget = frac
        try:
            torch._dynamo.reset()
            amb = _train(model, init, batch_fn, args.steps,
                         _plain_step(torch.compile(model, backend="aot_eager")))
            lines.append(_row(f"aot_eager, activation_memory_budget={frac}", amb, ref, ref["cpu"]))
        finally:
            torch._functorch.config.activation_memory_budget = old
            torch._dynamo.reset()
        print(lines[-1], flush=True)
    lines.append("")
    text = "\n".join(lines)
    write_report(args.out, text)


if __name__ == "__main__":
    main()
