"""``python -m dtr.sim TRACE... --budgets 0.2,0.4 --policy dtr_eq,dtr --out DIR``

Replays each trace under each budget (a fraction of its baseline peak) with
each policy, prints the overhead table, and with ``--out`` writes
``table.md`` (plus the comparison with the paper for its traces) and
``overhead.png``; ``--json FILE`` writes one record per run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import List

from ..policies import SearchOptions, available

# Policies our own modules add to the registry.
from .. import policies_extra  # noqa: F401
from .report import excess_summary, overhead_table, paper_comparison, plot
from .simulator import SimOptions, simulate
from .trace import load

_TRACES = {}


def _semantics(name: str) -> SimOptions:
    if name == "runtime":
        return SimOptions()
    if name == "paper":
        return SimOptions.paper()
    if name == "eager":
        return SimOptions.eager()
    raise SystemExit(f"dtr.sim: unknown --semantics {name!r}; use 'runtime', 'eager' or 'paper'")


def _run(job):
    path, policy, ratio, semantics, sample_above = job
    warnings.filterwarnings("ignore")
    tr = _TRACES.get(path)
    if tr is None:
        tr = _TRACES[path] = load(path)
    search = SearchOptions() if sample_above is None else SearchOptions(sample_above=sample_above)
    r = simulate(tr, policy=policy, ratio=ratio, search=search, options=_semantics(semantics))
    d = r.as_dict()
    d["semantics"] = semantics
    d["path"] = path
    return d


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dtr.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", help="trace files (JSON lines)")
    ap.add_argument("--budgets", default="0.2,0.4,0.6,0.8",
                    help="budgets as fractions of each trace's baseline peak")
    ap.add_argument("--policy", default="dtr_eq,dtr,dtr_local,lru,largest",
                    help=f"comma-separated policies; registered: {', '.join(available())}")
    ap.add_argument("--semantics", default="paper", choices=["paper", "runtime", "eager"],
                    help="'paper': the DTR paper's simulator (for its table); "
                         "'runtime': what dtr/runtime.py does; 'eager': the runtime plus "
                         "eviction of recomputed unreferenced values right after use")
    ap.add_argument("--sample-above", type=int, default=None,
                    help="sample ~sqrt(n) candidates when more than this many (default: exact)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None, help="directory for table.md and overhead.png")
    ap.add_argument("--json", default=None, help="write one JSON record per run here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    budgets = [float(b) for b in args.budgets.split(",") if b]
    policies = [p for p in args.policy.split(",") if p]
    for p in policies:
        if p not in available():
            ap.error(f"unknown policy {p!r}; registered: {', '.join(available())}")
    for t in args.traces:
        if not os.path.exists(t):
            ap.error(f"no such trace: {t}")
    jobs = [(t, p, b, args.semantics, args.sample_above)
            for t in args.traces for p in policies for b in budgets]
    # Longest first (big traces, tight budgets) so the pool stays busy.
    order = sorted(range(len(jobs)), key=lambda i: (-os.path.getsize(jobs[i][0]), jobs[i][2]))
    t0 = time.time()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = None if (tqdm is None or args.no_progress) else tqdm(total=len(jobs), desc="dtr.sim",
                                                                unit="run")
    results = [None] * len(jobs)
    stream = None
    if args.json:
        d = os.path.dirname(args.json)
        if d:
            os.makedirs(d, exist_ok=True)
        stream = open(args.json, "w")  # one record per finished run, as they finish

    def done(i, r):
        results[i] = r
        if stream is not None:
            stream.write(json.dumps(r) + "\n")
            stream.flush()
        if bar:
            bar.update(1)

    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs) as pool:
            it = pool.imap_unordered(_run_indexed, [(i, jobs[i]) for i in order])
            for i, r in it:
                done(i, r)
    else:
        for i in order:
            done(i, _run(jobs[i]))
    if stream is not None:
        stream.close()
    if bar:
        bar.close()
    wall = time.time() - t0

    table = overhead_table(results, budgets)
    print(table)
    print(f"\n{len(jobs)} runs in {wall:.1f} s ({args.semantics} semantics, "
          f"{'exact search' if args.sample_above is None else f'sampling above {args.sample_above}'})")
    md = [f"# dtr.sim sweep\n", f"{len(jobs)} runs, {wall:.1f} s wall, semantics `{args.semantics}`, "
          f"{'exact search' if args.sample_above is None else f'sample_above={args.sample_above}'}.\n",
          "Compute overhead = (trace op time + recomputation) / trace op time; OOM: the budget "
          "cannot be met; >2x: stopped after passing twice the trace's op time.\n", table, ""]
    from .report import PAPER
    paper_budgets = {b for cells in PAPER.values() for b in cells}
    if any(r["trace"] in PAPER for r in results) and paper_budgets & set(budgets):
        for pol in policies:
            if pol in ("dtr", "dtr_regions"):
                md += [f"\n## {pol} vs the paper's table\n", paper_comparison(results, pol, budgets)]
        s = excess_summary(results, policies, budgets)
        md += ["\n## Best policy per cell vs the paper\n",
               f"- paper mean excess overhead (overhead-1; OOM and >2x count as 1.0): "
               f"{s['paper_mean_excess']:.4f}",
               f"- best-of-policies mean excess: {s['best_mean_excess']:.4f} "
               f"({100 * s['best_reduction']:.1f}% lower)",
               f"- best <= paper in every cell: {s['best_le_paper_everywhere']}"
               + ("" if s["best_le_paper_everywhere"] else f" (worse: {s['best_worse_cells']})"),
               "- mean excess per policy: " + ", ".join(
                   f"{p} {v:.4f}" for p, v in s["per_policy_mean_excess"].items())]
        print("\n".join(md[-4:]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        plot(results, os.path.join(args.out, "overhead.png"))
        print(f"wrote {os.path.join(args.out, 'table.md')} and {os.path.join(args.out, 'overhead.png')}")
    return 0


def _run_indexed(arg):
    i, job = arg
    return i, _run(job)


if __name__ == "__main__":
    sys.exit(main())
