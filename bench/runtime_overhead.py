"""What each runtime adds to eager PyTorch at an unlimited budget, measured in one run.

    python -m bench.runtime_overhead                  # writes bench/results/runtime_overhead.md
    python -m bench.runtime_overhead --size quick --models treelstm --out /tmp/o.md

Two measurements, one torch thread, every variant interleaved in one process, the
median process CPU time of ``--reps`` rounds:

- microseconds added per op: a chain of 3,000 adds of 16x16 tensors (one of them
  requiring grad, so every add is recorded), over eager;
- one training step (forward and backward) of each benchmark model, as a multiple
  of eager's.

Variants: eager; ``dtr.budget(None, runtime="python")``; ``dtr.budget(None,
runtime="cpp")``. Only ratios of one run are quoted (the machine is shared).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch

import dtr
from bench import models as M

VARIANTS = {
    "eager": contextlib.nullcontext,
    "python": lambda: dtr.budget(None, runtime="python"),
    "cpp": lambda: dtr.budget(None, runtime="cpp"),
}


def _interleaved(fn, reps: int) -> dict:
    for ctx in VARIANTS.values():  # warm-up: caches, per-(op, shapes) learning
        fn(ctx)
    times = {k: [] for k in VARIANTS}
    for _ in range(reps):
        for k, ctx in VARIANTS.items():
            t0 = time.process_time()
            fn(ctx)
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def per_op(reps: int, n: int = 3000) -> dict:
    a = torch.randn(16, 16, requires_grad=True)
    b = torch.randn(16, 16)

    def chain(ctx):
        with ctx():
            y = a + b
            for _ in range(n - 1):
                y = y + b
        return y

    t = _interleaved(chain, reps)
    return {k: (v - t["eager"]) / n * 1e6 for k, v in t.items()} | {"eager_us": t["eager"] / n * 1e6}


def step_ratio(name: str, size: str, reps: int) -> dict:
    model, batch_fn = M.build(name, size)
    model.train()
    batch = batch_fn(1)

    def step(ctx):
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        with ctx():
            loss = model(*batch)
            loss.backward()

    return _interleaved(step, reps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=M.MODELS, choices=M.MODELS)
    p.add_argument("--size", default="quick", choices=["full", "quick"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "runtime_overhead.md"))
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["# What each runtime adds at an unlimited budget", "",
             f"Command: `python -m bench.runtime_overhead{' ' + ' '.join(argv) if argv else ''}`; "
             f"torch {torch.__version__}, one torch thread, median process CPU time of "
             f"{args.reps} interleaved rounds.", ""]
    op = per_op(args.reps)
    lines += ["## Added time per op (chain of 3,000 16x16 adds)", "",
              f"eager: {op['eager_us']:.2f} us per add.", "",
              "| runtime | us added per op |", "|---|---|",
              f"| python | {op['python']:.2f} |", f"| cpp | {op['cpp']:.2f} |", ""]
    print("\n".join(lines[-6:]), flush=True)
    lines += [f"## One training step, as a multiple of eager ({args.size} sizes)", "",
              "| model | eager s | python (x eager) | cpp (x eager) |", "|---|---|---|---|"]
    for name in args.models:
        t = step_ratio(name, args.size, args.reps)
        e = t["eager"]
        lines.append(f"| {name} | {e:.4f} | {t['python'] / e:.2f}x | {t['cpp'] / e:.2f}x |")
        print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
