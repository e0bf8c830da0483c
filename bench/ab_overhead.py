"""This checkout's C++ runtime against another build's, at an unlimited budget.

    python -m bench.ab_overhead --baseline ../old-checkout     # writes bench/results/ab_overhead.md
    python -m bench.ab_overhead --baseline ../old --rounds 5 --out /tmp/ab.md
    python -m bench.ab_overhead --baseline ../old --size full --steps 15 --out /tmp/ab_full.md

A shared machine's speed drifts by tens of percent within minutes: more than a
change of a few percent, so two runs of bench.runtime_overhead made one after the
other do not compare. Here each round runs each build in a fresh process, the
builds alternating, and each process times eager and the C++ runtime interleaved:
- the microseconds the C++ runtime adds per op to a chain of 3,000 16x16 adds (one
  input requiring grad), the median of --reps chains each;
- one TreeLSTM training step (bench.models' --size, quick by default; this
  checkout's model code for both builds), as a multiple of eager's, the median of
  --steps steps each.
The report gives every round, and per build the best and the median over rounds.
The other checkout needs its extension built (``python setup.py build_ext --inplace``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process: dtr from `tree`, the model from this checkout's bench/models.py.
_WORKER = r"""
import contextlib, importlib.util, json, statistics, sys, time
tree, models_path, reps, steps, size = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                        sys.argv[5])
sys.path.insert(0, tree)
import torch
import dtr
assert dtr.__file__.startswith(tree), (dtr.__file__, tree)
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("ab_models", models_path)
models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(models)
cpp = lambda: dtr.budget(None, runtime="cpp")
eager = contextlib.nullcontext


def interleaved(fn, n):
    for ctx in (eager, cpp):
        fn(ctx)
    t = {eager: [], cpp: []}
    for _ in range(n):
        for ctx in (eager, cpp):
            t0 = time.process_time()
            fn(ctx)
            t[ctx].append(time.process_time() - t0)
    return statistics.median(t[eager]), statistics.median(t[cpp])


a = torch.randn(16, 16, requires_grad=True)
b = torch.randn(16, 16)


def chain(ctx, n=3000):
    with ctx():
        y = a + b
        for _ in range(n - 1):
            y = y + b
    return y


e, c = interleaved(chain, reps)
model, batch_fn = models.build("treelstm", size)
model.train()
batch = batch_fn(1)


def step(ctx):
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    with ctx():
        loss = model(*batch)
        loss.backward()


te, tc = interleaved(step, steps)
print(json.dumps({"added_us": (c - e) / 3000 * 1e6, "eager_us": e / 3000 * 1e6,
                  "treelstm_x": tc / te}))
"""


def _measure(tree: str, reps: int, steps: int, size: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, tree, os.path.join(HERE, "bench", "models.py"), str(reps),
         str(steps), size],
        check=True, capture_output=True, text=True, cwd=tree,
        env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="another checkout, with its extension built")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=15, help="chains per process")
    p.add_argument("--steps", type=int, default=30, help="TreeLSTM steps per process")
    p.add_argument("--size", choices=["quick", "full"], default="quick", help="the TreeLSTM's size")
    p.add_argument("--out", default=os.path.join(HERE, "bench", "results", "ab_overhead.md"))
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    trees = {"this checkout": HERE, "baseline": os.path.abspath(args.baseline)}
    if not os.path.isdir(os.path.join(trees["baseline"], "dtr")):
        p.error(f"--baseline {args.baseline}: no dtr package there; give a checkout of this repository")
    results = {k: [] for k in trees}
    rows = []
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(list(trees)))
        for name in order:
            m = _measure(trees[name], args.reps, args.steps, args.size)
            results[name].append(m)
            m["added_share"] = m["added_us"] / m["eager_us"]
            rows.append(f"| {r + 1} | {name} | {m['eager_us']:.2f} | {m['added_us']:.2f} | "
                        f"{m['added_share']:.2f} | {m['treelstm_x']:.2f}x |")
            print(rows[-1], flush=True)

    def summary(name: str, key: str, fmt: str) -> str:
        vals = [m[key] for m in results[name]]
        return f"{fmt.format(min(vals))} / {fmt.format(statistics.median(vals))}"

    lines = ["# The C++ runtime, this checkout against another build", "",
             f"Command: `python -m bench.ab_overhead {' '.join(argv)}`; baseline "
             f"`{trees['baseline']}`. Each round runs each build in a fresh process (the builds "
             "alternating), which times eager and the C++ runtime interleaved at an unlimited "
             f"budget: a chain of 3,000 16x16 adds (median of {args.reps} chains) and a TreeLSTM "
             f"step, {args.size} size (median of {args.steps} steps). One torch thread.", "",
             "The added time is also given as a multiple of eager's add in the same process, which "
             "follows the machine's speed between rounds less than the time itself.", "",
             "| build | us added per op, best / median of rounds | the same / eager's add | "
             "TreeLSTM x eager, best / median |",
             "|---|---|---|---|"]
    for name in trees:
        lines.append(f"| {name} | {summary(name, 'added_us', '{:.2f}')} | "
                     f"{summary(name, 'added_share', '{:.2f}')} | "
                     f"{summary(name, 'treelstm_x', '{:.2f}x')} |")
    lines += ["", "Every round:", "",
              "| round | build | eager us per add | us added per op | added / eager's add | TreeLSTM x eager |",
              "|---|---|---|---|---|---|"] + rows
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:10]))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
