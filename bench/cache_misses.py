"""Cache misses each dtr op adds to a TreeLSTM step, by cachegrind's simulated caches.

    python -m bench.cache_misses                        # writes bench/results/cache_misses.md
    python -m bench.cache_misses --baseline ../old-checkout   # also counts another build

Instruction counts (bench.instruction_count) miss most of what the C++ runtime
costs a model of many small ops: on the TreeLSTM, dtr added about 30% to eager's
instructions but about 90% to its time. This runs the bench's full-size TreeLSTM
(one torch thread, no limit) under valgrind's cachegrind with a 32 KiB L1
instruction cache, a 32 KiB L1 data cache and a 512 KiB last level (this
machine's per-core L2), once with 1 measured step and once with 3, after 2
warm-up steps, so that start-up cancels. Counts are per dtr op of a step (the
session's `stats.ops`): instructions, L1 instruction misses, last-level misses
of instructions, of data reads and of data writes; then the functions whose
last-level misses and L1 instruction misses grew most over eager's. Simulated
caches are not the machine's (no prefetcher, no L3), so these say where misses
come from and whether a change removes them, not what they cost.

Needs valgrind (apt install valgrind); a run takes about ten minutes per build.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench import checkouts, require_tools, write_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARM_UP = 2
EVENTS = ["Ir", "I1mr", "ILmr", "DLmr", "DLmw"]
LABELS = {"Ir": "instructions", "I1mr": "L1 instruction misses", "ILmr": "last-level instruction misses",
          "DLmr": "last-level data read misses", "DLmw": "last-level data write misses"}
CACHES = ["--I1=32768,8,64", "--D1=32768,8,64", "--LL=524288,8,64"]


def worker(mode: str, steps: int, tree: str) -> None:
    sys.path.insert(0, tree)  # the checkout being counted, which may lack this script
    import torch

    import dtr
    from bench import models

    if not os.path.abspath(dtr.__file__).startswith(os.path.abspath(tree) + os.sep):
        raise SystemExit(f"bench.cache_misses: imported dtr from {dtr.__file__}, not from {tree}")
    torch.set_num_threads(1)
    model, batch_fn = models.build("treelstm", "full")
    batch = batch_fn(1)
    ops = 0

    def step():
        nonlocal ops
        model.zero_grad(set_to_none=True)
        if mode == "eager":
            model(*batch).backward()
        else:
            with dtr.budget(None, runtime=mode) as s:
                model(*batch).backward()
            ops = s.stats.ops

    for _ in range(WARM_UP + steps):
        step()
    print(f"dtr ops per step: {ops}")


def _cachegrind(tree: str, mode: str, steps: int, out: str) -> tuple:
    env = dict(os.environ, PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=yes", *CACHES, f"--cachegrind-out-file={out}",
           sys.executable, os.path.abspath(__file__), "--worker", mode, str(steps), tree]
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    m = re.search(r"dtr ops per step: (\d+)", r.stdout)
    if r.returncode != 0 or m is None:
        raise SystemExit(f"bench.cache_misses: cachegrind failed for {mode} in {tree}:\n{r.stderr[-2000:]}")
    return int(m.group(1)), _per_function(out)


def _per_function(path: str) -> dict:
    text = subprocess.run(["cg_annotate", "--show=" + ",".join(EVENTS), "--threshold=0.01", "--auto=no",
                           path], capture_output=True, text=True, check=True).stdout
    return parse_costs(text)


def parse_costs(text: str) -> dict:
    """{function: [count per event in EVENTS]} from cg_annotate's listing, the program's totals under ""."""
    costs = collections.defaultdict(lambda: [0] * len(EVENTS))
    num = r"(?:([\d,]+) \(\s*[\d.]+%\)|\.)\s+"
    for line in text.splitlines():
        m = re.match(r"\s*" + num * len(EVENTS) + r"(.*)$", line)
        if not m:
            continue
        name = m.group(len(EVENTS) + 1)
        key = "" if "PROGRAM TOTALS" in name else re.sub(r"^[^:]*:", "", name, count=1)[:100]
        for i in range(len(EVENTS)):
            costs[key][i] += int(m.group(i + 1).replace(",", "")) if m.group(i + 1) else 0
    return costs


def count(tree: str, mode: str, tmp: str):
    """(dtr ops per step, {function: [per step count per event]})."""
    # The two runs side by side: each is one thread, and simulated counts do not
    # depend on the machine's load.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda n: _cachegrind(tree, mode, n, os.path.join(
            tmp, f"{abs(hash(tree))}.{mode}.{n}.out")), (1, 3)))
    (ops, first), (_, last) = runs
    per_step = {k: [(b - a) / 2 for a, b in zip(first.get(k, [0] * len(EVENTS)), v)]
                for k, v in last.items()}
    return ops, per_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="another checkout (with its extension built) to count the same way")
    p.add_argument("--top", type=int, default=8, help="functions listed per event")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cache_misses.md"))
    p.add_argument("--worker", nargs=3, metavar=("MODE", "STEPS", "TREE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return
    require_tools("bench.cache_misses", "valgrind", "cg_annotate")
    trees = checkouts(ROOT, args.baseline)
    lines = ["# Cache misses added per dtr op (cachegrind, TreeLSTM full, no limit)", "",
             f"Command: `python -m bench.cache_misses {' '.join(argv or sys.argv[1:])}`; simulated "
             "caches: L1 instruction and data 32 KiB, last level 512 KiB; 3 steps minus 1 step, "
             "per dtr op of a step.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        _, eager = count(ROOT, "eager", tmp)
        for label, tree in trees:
            ops, cpp = count(tree, "cpp", tmp)
            added = {k: [(c - e) / ops for c, e in zip(cpp.get(k, [0] * len(EVENTS)),
                                                        eager.get(k, [0] * len(EVENTS)))]
                     for k in set(cpp) | set(eager)}
            lines += [f"## {label}", "", f"{ops:,} dtr ops per step.", "",
                      "| per dtr op | eager | cpp | added |", "|---|---|---|---|"]
            for i, ev in enumerate(EVENTS):
                e, c = eager[""][i] / ops, cpp[""][i] / ops
                lines.append(f"| {LABELS[ev]} | {e:,.0f} | {c:,.0f} | {c - e:,.0f} |")
            for i, ev in enumerate(EVENTS[1:], start=1):
                grown = sorted(((v[i], k) for k, v in added.items() if k), reverse=True)[:args.top]
                lines += ["", f"Functions whose {LABELS[ev]} grew most over eager's, per dtr op:", "",
                          "| added | function |", "|---|---|"]
                lines += [f"| {v:,.1f} | `{k}` |" for v, k in grown]
            lines.append("")
            print(f"{label}: {ops} ops; added per op: " +
                  ", ".join(f"{ev} {(cpp[''][i] - eager[''][i]) / ops:,.0f}" for i, ev in enumerate(EVENTS)),
                  flush=True)
    write_report(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
