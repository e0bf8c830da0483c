"""Thrashing check (issue 15): recomputations per op and step time near the edge of feasibility.

    python -m bench.thrash                       # all three models, both runtimes, the default policy
    python -m bench.thrash --models gru --runtimes cpp
    python -m bench.thrash --runtimes cpp --policies msps_sqrt dtr_eq dtr_regions  # docs/performance.md

Models: issue 15's GRU-cell RNN (hidden 96, batch 16, up to 40 steps with a
data-dependent stop, loss summed over steps), and bench's LSTM and TreeLSTM
(bench/models.py, full size). Each runs eagerly once, then under dtr at
fractions of eager's measured peak on each runtime, every configuration in a
fresh forked process (bench/run.py's run_config: a warm-up step, a profiled
step, timed steps; CPU time, as bench.run), for each policy given. Per row:
recomputations per op (rematerializations / ops, median over the timed steps),
the most any one op name was recomputed, step time over eager's, thrash guard
trips, and whether every loss equals eager's bit for bit. Results go to
bench/results/thrash.md (and .json beside it).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

if __package__ in (None, ""):  # ``python bench/thrash.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtr.policies import DEFAULT_POLICY
from bench import models as M
from bench import run as R

HIDDEN, BATCH, MAX_STEPS, INPUT, CLASSES = 96, 16, 40, 32, 10


class GRURNN(nn.Module):
    """Issue 15's RNN as a new user writes it: a GRUCell loop, a data-dependent stop,
    the loss summed over the steps."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(INPUT, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)
        self.ckpt = None

    def forward(self, xs, ys):
        h = xs.new_zeros(BATCH, HIDDEN)
        loss = xs.new_zeros(())
        for t in range(xs.shape[0]):
            h = self.cell(xs[t], h)
            loss = loss + F.cross_entropy(self.head(h), ys[t])
            if t >= 8 and bool((xs[t, 0, 0] > 2.2).item()):  # the data says stop
                break
        return loss


def build_gru(seed: int = 0):
    torch.manual_seed(seed)
    m = GRURNN()

    def batch_fn(step):
        g = torch.Generator().manual_seed(1000 + step)
        return (torch.randn(MAX_STEPS, BATCH, INPUT, generator=g),
                torch.randint(0, CLASSES, (MAX_STEPS, BATCH), generator=g))
    return m, batch_fn


# Fractions of eager's measured peak tried per model, largest first; the last one
# that runs is the tightest feasible budget of this list.
FRACTIONS = {
    "gru": [0.8, 0.65, 0.5, 0.4, 0.35],
    "lstm": [0.5, 0.4, 0.35, 0.32],
    "treelstm": [1.0, 0.9, 0.87, 0.8],
}
TIMED_STEPS = {"gru": 2, "lstm": 1, "treelstm": 2}


def _row(name: str, cfg, runtime: str, steps: int, limit: float) -> dict:
    """One configuration in this (forked) process."""
    if runtime:
        os.environ["DTR_RUNTIME"] = runtime
    if name == "gru":
        orig = M.build
        M.build = lambda n, size="full", seed=0: build_gru(seed) if n == "gru" else orig(n, size, seed)
    return R.run_config(name, "full", cfg, steps, limit)


def measure(name: str, runtimes, limit: float, policies=(DEFAULT_POLICY,)) -> list:
    rows = []
    eager = R.isolated(_row, name, R.Config("eager", "eager"), "", TIMED_STEPS[name], None)
    eager["runtime"] = "-"
    rows.append(eager)
    peak = eager["measured_peak"]
    for runtime, policy in itertools.product(runtimes, policies):
        for f in FRACTIONS[name]:
            cfg = R.Config("dtr", f"dtr @{f}", budget=int(f * peak), policy=policy, fraction=f)
            t0 = time.time()
            try:
                r = R.isolated(_row, name, cfg, runtime, TIMED_STEPS[name], limit)
            except RuntimeError as e:
                r = dict(status=str(e).splitlines()[0][:200], losses=[])
            r.update(runtime=runtime, policy=policy, fraction=f, wall_total_s=time.time() - t0)
            rows.append(r)
            print(f"{name} {runtime} {policy} {f}: {r['status']} {summary(r, eager)}", flush=True)
            if r["status"] != "ok":
                break  # tighter budgets fail too (or take longer still)
    return rows


def summary(r: dict, eager: dict) -> str:
    if r.get("status") != "ok" or "ops" not in r:
        return ""
    per_op = r["rematerializations"] / max(1, r["ops"])
    worst = max((v[0] for v in r.get("remat_by_op", {}).values()), default=0)
    return (f"ops {r['ops']:.0f}, remats {r['rematerializations']:.0f} ({per_op:.2f}/op), "
            f"worst op {worst:.0f}, step {r['step_s'] / eager['step_s']:.2f}x eager")


def exact(r: dict, eager: dict) -> str:
    if not r.get("losses"):
        return "-"
    n = min(len(r["losses"]), len(eager["losses"]))
    return "exact" if r["losses"][:n] == eager["losses"][:n] else "DIFFERS"


def table(name: str, rows: list) -> list:
    eager = rows[0]
    out = [f"## {name}", "",
           f"eager: step {eager['step_s']:.3f} CPU s, measured peak {eager['measured_peak'] / R.MiB:.2f} MiB", "",
           "| runtime | policy | budget (x eager peak) | status | ops/step | recomputations/step | per op | "
           "most recomputed op (count) | step (x eager) | guard trips | losses |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        ok = r.get("status") == "ok" and "ops" in r
        worst = max(r.get("remat_by_op", {}).items(), key=lambda kv: kv[1][0], default=None)
        out.append("| " + " | ".join([
            r["runtime"], r.get("policy", "-"), f"{r['fraction']:.2f}", r["status"][:80],
            f"{r['ops']:.0f}" if ok else "-",
            f"{r['rematerializations']:.0f}" if ok else "-",
            f"{r['rematerializations'] / max(1, r['ops']):.2f}" if ok else "-",
            f"{worst[0]} ({worst[1][0]:.0f})" if ok and worst else "-",
            f"{r['step_s'] / eager['step_s']:.2f}x" if ok else "-",
            f"{r.get('thrash_guard_trips', 0):.0f}" if ok else "-",
            exact(r, eager)]) + " |")
    out.append("")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gru", "treelstm", "lstm"], choices=list(FRACTIONS))
    ap.add_argument("--runtimes", nargs="+", default=["cpp", "python"], choices=["cpp", "python"])
    ap.add_argument("--policies", nargs="+", default=[DEFAULT_POLICY],
                    help="eviction policies to run (dtr.policies.available())")
    ap.add_argument("--limit", type=float, default=60.0, help="CPU seconds per step before a row times out")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "thrash.md"))
    args = ap.parse_args(argv)
    lines = ["# Thrashing check (python -m bench.thrash)", "",
             f"{R.machine_info()}; policies {', '.join(args.policies)}; step limit {args.limit:.0f} CPU s; "
             "recomputations are the median over the timed steps.", ""]
    all_rows = {}
    for name in args.models:
        rows = measure(name, args.runtimes, args.limit, args.policies)
        all_rows[name] = rows
        lines += table(name, rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({k: [{kk: vv for kk, vv in r.items() if kk not in ("traceback", "timeline")} for r in v]
                   for k, v in all_rows.items()}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
