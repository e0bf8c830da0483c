"""Instructions each runtime adds per op, counted by callgrind: a measure the machine's load does not move.

    python -m bench.instruction_count                  # writes bench/results/instruction_count.md
    python -m bench.instruction_count --baseline ../old-checkout   # also counts another build

The timing benchmarks (bench.runtime_overhead) move by 10-30% from run to run on
a shared machine, more than most single changes to the per-op path save. This
counts the instructions of the same chain of 16x16 adds (one input requiring
grad) under valgrind's callgrind: the whole program once with 1 chain and once
with 5, so that start-up (importing torch, the first op's meta run) cancels,
and the difference divided by the ops of 4 chains, with Python's cyclic
collector off. Counts are per op of the
chain, eager's and each runtime's, and the functions whose own instructions
grew most over eager's. Instructions are not time (a cache miss or a contended
lock costs far more than its count), so timings still come from runtime_overhead.

Needs valgrind (apt install valgrind); a run takes a few minutes per runtime.
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import re
import subprocess
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench import checkouts, require_tools, write_report  # noqa: E402

CHAIN = 3000
WARM_UP = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(mode: str, chains: int, tree: str) -> None:
    sys.path.insert(0, tree)  # the checkout being counted, which may lack this script
    import torch

    import dtr

    if not os.path.abspath(dtr.__file__).startswith(os.path.abspath(tree) + os.sep):
        raise SystemExit(f"bench.instruction_count: imported dtr from {dtr.__file__}, not from {tree}")

    torch.set_num_threads(1)
    a = torch.randn(16, 16, requires_grad=True)
    b = torch.randn(16, 16)

    def chain():
        y = a + b
        for _ in range(CHAIN):
            y = y + b
        return y

    def run():
        if mode == "eager":
            chain()
        else:
            with dtr.budget(None, runtime=mode):
                chain()

    # Python's collector runs at points that do not scale with the chains (its
    # full collections follow the heap's growth), which moved the counts per op
    # by up to 2,000 between otherwise identical runs.
    gc.disable()
    for _ in range(WARM_UP + chains):
        run()


def _callgrind(tree: str, mode: str, chains: int, out: str) -> int:
    # One thread everywhere: numpy's OpenBLAS threads spin in the background,
    # which callgrind counts (up to 800 instructions per op in one run).
    env = dict(os.environ, PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
           os.path.abspath(__file__), "--worker", mode, str(chains), tree]
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    m = re.search(r"Collected : (\d+)", r.stderr)
    if r.returncode != 0 or m is None:
        raise SystemExit(f"bench.instruction_count: callgrind failed for {mode} in {tree}:\n{r.stderr[-2000:]}")
    return int(m.group(1))


def _self_costs(path: str) -> collections.Counter:
    text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", path],
                          capture_output=True, text=True, check=True).stdout
    return parse_self_costs(text)


def parse_self_costs(text: str) -> collections.Counter:
    """Instructions per function from callgrind_annotate's listing (recursion levels merged)."""
    costs = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*)$", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        name = re.sub(r" \[[^\]]*\]$", "", m.group(2))
        name = re.sub(r"^.*?:(?=[A-Za-z_~])", "", name, count=1) if ":" in name else name
        costs[re.sub(r"'\d+$", "", name)[:110]] += int(m.group(1).replace(",", ""))
    return costs


def count(tree: str, mode: str, tmp: str):
    """(instructions per op, per-function self instructions per op)."""
    files = [os.path.join(tmp, f"{abs(hash(tree))}.{mode}.{n}.out") for n in (1, 5)]
    totals = [_callgrind(tree, mode, n, f) for n, f in zip((1, 5), files)]
    ops = 4 * (CHAIN + 1)
    first, last = (_self_costs(f) for f in files)
    per_fn = {k: (last[k] - first.get(k, 0)) / ops for k in last}
    return (totals[1] - totals[0]) / ops, per_fn


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtimes", nargs="+", default=["cpp"], choices=["cpp", "python"])
    p.add_argument("--baseline", help="another checkout (with its extension built) to count the same way")
    p.add_argument("--top", type=int, default=15, help="functions listed per runtime")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "instruction_count.md"))
    p.add_argument("--worker", nargs=3, metavar=("MODE", "CHAINS", "TREE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return
    require_tools("bench.instruction_count", "valgrind", "callgrind_annotate")
    trees = checkouts(ROOT, args.baseline)
    lines = ["# Instructions added per op (callgrind)", "",
             f"Command: `python -m bench.instruction_count {' '.join(argv or sys.argv[1:])}`; "
             f"a chain of {CHAIN:,} 16x16 adds, one input requiring grad; instructions of 5 chains "
             "minus 1 chain, per op.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for label, tree in trees:
            eager, eager_fn = count(tree, "eager", tmp)
            lines += [f"## {label}", "", f"eager: {eager:,.0f} instructions per op.", "",
                      "| runtime | instructions per op | added over eager |", "|---|---|---|"]
            detail = []
            for rt in args.runtimes:
                total, fn = count(tree, rt, tmp)
                lines.append(f"| {rt} | {total:,.0f} | {total - eager:,.0f} |")
                grown = sorted(((fn.get(k, 0) - eager_fn.get(k, 0), k) for k in set(fn) | set(eager_fn)),
                               reverse=True)[:args.top]
                detail += ["", f"Functions whose own instructions grew most over eager's ({rt}):", "",
                           "| added per op | function |", "|---|---|"]
                detail += [f"| {v:,.0f} | `{k}` |" for v, k in grown]
                print(f"{label}: {rt} {total:,.0f} per op, eager {eager:,.0f}", flush=True)
            lines += detail + [""]
    write_report(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
