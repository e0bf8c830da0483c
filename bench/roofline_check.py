"""Do estimated op costs choose as well as measured ones? (issue 15, Note [Roofline cost])

    python -m bench.roofline_check                 # writes bench/results/roofline_check.{md,json}
    python -m bench.roofline_check --size quick --models gpt --out /tmp/r

For each benchmark model: one warm-up step, then one training step (forward and
backward) recorded on CPU with ``dtr.sim.record`` (one torch thread), which
logs each op's measured time and its FLOPs (torch's formula) and bytes. Each
trace is replayed under budgets of its baseline peak (runtime semantics, no 2x
cap) three times, the pool scoring with:

- ``measured``: the recorded times (what the runtime does on CPU);
- ``roofline``: dtr.cost's roofline, max(FLOPs / F, bytes read+written / B) + L;
- ``bytes``: the estimate the runtime used on CUDA before, bytes read / B + L;

and every replay charges recomputations their *measured* time. The gap of an
estimate is its overhead over the measured-cost overhead, minus 1. The rates
F (float32 matmul FLOP/s), B (bytes read + written per second by a multiply
into a fresh tensor) and L (a 1-element add) are this machine's, measured first: the check is
whether the estimate's *form* ranks ops as their times do, and on CUDA the
same form runs with the H100's nominal rates (dtr.cost.CUDA_NOMINAL).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch

import dtr.sim as sim
from bench import models as M
from dtr.cost import Roofline

COSTS = ("measured", "roofline", "bytes")


def _best(fn, reps=20) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def host_rates() -> Roofline:
    """This CPU's rates: float32 matmul FLOP/s, copy bytes/s, and one tiny op's seconds."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    flops = 2 * 512 ** 3 / _best(lambda: torch.mm(a, b), 10)
    # Bandwidth of an op writing a fresh output, as the ops of a step do: on a
    # CPU, first touches of new pages cost far more than the copy into memory
    # already mapped (on this machine ~2.7 GB/s against ~34 GB/s for copy_).
    x, y = torch.randn(1 << 23), torch.randn(1 << 23)
    bw = 3 * x.numel() * 4 / _best(lambda: torch.mul(x, y), 10)
    s, t = torch.ones(1), torch.ones(1)
    launch = _best(lambda: torch.add(s, t), 200)
    return Roofline(bytes_per_s=bw, default_flops_per_s=flops, launch_s=launch)


def record_step(name: str, size: str, path: str) -> None:
    model, batch_fn = M.build(name, size)
    model.train()
    for step in range(2):  # the first is a warm-up (allocator, kernels' first runs)
        for p in model.parameters():
            p.grad = None
        batch = batch_fn(0)
        torch.manual_seed(0)
        if step == 0:
            model(*batch).backward()
        else:
            with sim.record(path):
                model(*batch).backward()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=M.MODELS)
    ap.add_argument("--size", default="full")
    ap.add_argument("--budgets", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--policies", default="dtr_eq,msps_sqrt")
    ap.add_argument("--out", default="bench/results/roofline_check")
    ap.add_argument("--traces", default=None, help="folder for the recorded traces (default: a temporary folder)")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json")
    args = ap.parse_args(argv)
    if args.report_only:
        with open(args.out + ".json") as f:
            d = json.load(f)
        r = d["rates"]
        rates = Roofline(bytes_per_s=r["bytes_per_s"], default_flops_per_s=r["flops_per_s"],
                         launch_s=r["launch_s"])
        with open(args.out + ".md", "w") as f:
            f.write(report(d["rows"], rates))
        return 0
    torch.set_num_threads(1)
    rates = host_rates()
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = args.policies.split(",")
    tdir = args.traces or tempfile.mkdtemp(prefix="dtr_roofline_")
    os.makedirs(tdir, exist_ok=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    scorers = {"measured": None, "roofline": sim.RooflineCost(rates), "bytes": sim.BytesCost(rates)}
    rows = []
    for name in args.models:
        path = os.path.join(tdir, f"{name}-{args.size}.jsonl")
        record_step(name, args.size, path)
        tr = sim.load(path)
        calls = [i for i in tr.instrs if isinstance(i, (sim.trace.Call, sim.trace.Mutate))]
        flop_share = sum(i.time for i in calls if i.flops > 0) / max(1.0, tr.op_time)
        for pol in policies:
            for r in budgets:
                row = {"model": name, "size": args.size, "policy": pol, "budget_ratio": r,
                       "ops": len(calls), "flop_op_time_share": flop_share}
                for cname, fn in scorers.items():
                    res = sim.simulate(tr, ratio=r, policy=pol, score_cost=fn,
                                       options=sim.SimOptions(overhead_limit=None))
                    row[cname] = res.overhead if res.status == "ok" else None
                    row[cname + "_status"] = res.status
                    row[cname + "_remats"] = res.rematerializations
                for cname in ("roofline", "bytes"):
                    m, e = row["measured"], row[cname]
                    row[cname + "_gap"] = None if m is None or e is None else e / m - 1.0
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"rates": {"bytes_per_s": rates.bytes_per_s,
                             "flops_per_s": rates.default_flops_per_s,
                             "launch_s": rates.launch_s}, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(report(rows, rates))
    print(report(rows, rates))
    return 0


def _fmt(x, pct=False):
    if x is None:
        return "fail"
    return f"{100 * x:+.1f}%" if pct else f"{x:.3f}"


def report(rows, rates: Roofline) -> str:
    out = [f"Rates measured on this CPU (one thread): matmul {rates.default_flops_per_s / 1e9:.1f} "
           f"GFLOP/s, elementwise {rates.bytes_per_s / 1e9:.2f} GB/s, launch {rates.launch_s * 1e6:.2f} us.",
           "",
           "| model | policy | budget | measured | roofline | bytes-only | roofline gap | bytes-only gap |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['policy']} | {r['budget_ratio']} | {_fmt(r['measured'])} | "
                   f"{_fmt(r['roofline'])} | {_fmt(r['bytes'])} | {_fmt(r['roofline_gap'], True)} | "
                   f"{_fmt(r['bytes_gap'], True)} |")
    out.append("")
    for c in ("roofline", "bytes"):
        gaps = [r[c + "_gap"] for r in rows if r[c + "_gap"] is not None]
        sane = [r[c + "_gap"] for r in rows if r[c + "_gap"] is not None and r["measured"] <= 2.0]
        fails = sum(1 for r in rows if r[c] is None and r["measured"] is not None)
        if gaps:
            out.append(f"- {c}: mean gap {100 * statistics.mean(gaps):+.1f}%, max "
                       f"{100 * max(gaps):+.1f}%, cells within 5%: "
                       f"{sum(1 for g in gaps if g <= 0.05)}/{len(gaps)}, failing where measured "
                       f"costs did not: {fails}; over the {len(sane)} cells where measured costs "
                       f"stay under 2x: mean {100 * statistics.mean(sane):+.1f}%, max "
                       f"{100 * max(sane):+.1f}%")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
