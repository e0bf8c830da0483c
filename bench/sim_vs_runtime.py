"""Does the simulator predict the runtime? Both fed the same op times (issue 15).

    python -m bench.sim_vs_runtime                      # quick sizes, 0.5-0.8, default policy
    python -m bench.sim_vs_runtime --size full --models resnet unet

For each model: one plain eager training step is recorded (``dtr.sim.record``,
with each op's scratch and its ``dtr.cost.op_key``). Each op's cost is the least
time recorded for its key (the runtime's Note [Stable costs]) and its scratch the
most (as dtr/scratch.py keeps it). Then, at each budget (a fraction of eager's
measured peak, in bytes, everything the allocator counts):

* the runtime: the Python runtime (``runtime="python"``) runs the same step under
  ``dtr.budget(B)`` with those costs (Note [Fixed op costs] in dtr/cost.py), after
  warm-up steps (three for policies that learn from earlier steps); its recompute
  time is the summed cost of the recipes it reran;
* the simulator: the trace, with the same per-op times and scratch, replayed under
  B less the bytes the allocator held at the step's start that the trace never
  sees as a CONSTANT (so both bound the same memory), with the runtime's semantics,
  gradients pinned when made (the runtime escapes them) and no rematerialization
  of outputs at the end (the runtime does none).

Writes bench/results/sim_vs_runtime.md and .json (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import replace
from typing import Dict, List

if __package__ in (None, ""):  # ``python bench/sim_vs_runtime.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch

import dtr
import dtr.sim as sim
import dtr.step_plan
from dtr import _ext
from dtr import device_memory as devmem
from dtr.cost import fixed_costs
from dtr.errors import BudgetExceededError
from dtr.policies import ADAPTIVE, DEFAULT_POLICY, records_steps
from dtr.sim.trace import Call, Constant, Mutate, Trace
from bench import models as M

MODELS = ["gpt", "resnet", "unet", "lstm"]
FRACTIONS = [0.5, 0.6, 0.7, 0.8]
SEED = 1234
TOLERANCE = 0.10


class Step:
    """One training step of ``model`` on ``batch`` (the model returns the loss),
    restartable from the same parameters and RNG state."""

    def __init__(self, model: torch.nn.Module, batch: tuple):
        self.model = model
        self.model.train()
        self.batch = batch
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.init = copy.deepcopy(self.model.state_dict())

    def restore(self) -> None:
        with torch.no_grad():
            self.model.load_state_dict(self.init)
        self.opt.zero_grad(set_to_none=True)
        torch.manual_seed(SEED)

    def body(self) -> float:
        loss = self.model(*self.batch)
        loss.backward()
        return loss.item()


def cost_tables(rec, instrs):
    """Per op key: least recorded time (ns), most recorded scratch (bytes)."""
    times: Dict[tuple, float] = {}
    scratch: Dict[tuple, int] = {}
    for i, key in rec.op_keys.items():
        ins = instrs[i]
        times[key] = min(times.get(key, ins.time), ins.time)
        scratch[key] = max(scratch.get(key, 0), ins.scratch)
    return times, scratch


def retimed(rec, instrs, times, scratch, name: str) -> Trace:
    out = list(instrs)
    for i, key in rec.op_keys.items():
        out[i] = replace(instrs[i], time=times[key], scratch=scratch[key])
    # Drop the leading START annotation the recorder writes (parse would skip it).
    return Trace(out[1:] if out and not isinstance(out[0], (Call, Mutate, Constant)) else out,
                 name=name)


def measure_model(name: str, size: str, fractions: List[float], policy: str) -> List[dict]:
    model, batch_fn = M.build(name, size)
    return compare(Step(model, batch_fn(1)), name, size, fractions, policy)


def compare(st: Step, name: str, size: str, fractions: List[float], policy: str,
            op_ns=None) -> List[dict]:
    """One row per budget fraction: the runtime's and the replay's recompute (module doc).
    ``op_ns``: each op's cost (ns) from its CALL/MUTATE record instead of the least
    recorded time of its key (a deterministic cost for tests)."""
    # Warm the kernels (and the allocator's caches) once in plain eager.
    st.restore()
    st.body()
    st.restore()
    # Eager's peak: what the allocator holds at the start + the step's peak above it.
    used0 = devmem.cpu_bytes_in_use()
    window = _ext._C.meter_begin()
    st.body()
    peak_above, _ = _ext._C.meter_end(window)
    eager_peak = used0 + peak_above
    st.restore()
    # The trace, with op keys and scratch.
    used0 = devmem.cpu_bytes_in_use()
    with sim.record(None, keep_keys=True) as r:
        st.body()
    rec = r.recorder
    grads = tuple(rec._names[id(p.grad)] for p in st.model.parameters()
                  if p.grad is not None and id(p.grad) in rec._names)
    st.restore()
    instrs = rec.instrs
    if op_ns is not None:
        instrs = [replace(i, time=float(op_ns(i))) if isinstance(i, (Call, Mutate)) else i
                  for i in instrs]
    times, scratch = cost_tables(rec, instrs)
    trace = retimed(rec, instrs, times, scratch, name)
    constants = sum(i.size for i in trace.instrs if isinstance(i, Constant))
    untracked = used0 - constants  # held at the start, never an input of the step
    options = sim.SimOptions(pin_outputs=False, overhead_limit=None, escaped=grads)
    no_scratch = Trace([replace(i, scratch=0) if isinstance(i, (Call, Mutate)) else i
                        for i in trace.instrs], name=name)
    base = sim.baseline_peak(trace, options)
    base_no_scratch = sim.baseline_peak(no_scratch, options)
    table_s = {k: v * 1e-9 for k, v in times.items()}
    warm = 3 if records_steps(policy) else 1
    rows = []
    for frac in fractions:
        budget = int(eager_peak * frac)
        row = dict(model=name, size=size, policy=policy, fraction=frac, budget_bytes=budget,
                   eager_peak=eager_peak, untracked_bytes=untracked, sim_budget_bytes=budget - untracked,
                   trace_op_s=trace.op_time * 1e-9, sim_baseline_peak=base + untracked,
                   sim_baseline_peak_no_scratch=base_no_scratch + untracked,
                   max_scratch=max(scratch.values(), default=0))
        # The runtime.
        t0 = time.perf_counter()
        try:
            with fixed_costs(table_s) as fc:
                # Each budget starts as training would: no plan, no adaptive history
                # (the plans and choices of this thread outlive blocks).
                dtr.step_plan.forget()
                for _ in range(warm + 1):
                    st.restore()
                    fc.reset_counts()
                    with dtr.budget(budget, policy=policy, runtime="python") as s:
                        st.body()
            stats = s.stats
            row.update(rt_status="ok", rt_recompute_s=fc.recomputed,
                       rt_recomputed_cost_s=stats.recomputed_cost, rt_recomputes=fc.recomputes,
                       rt_cost_misses=fc.misses, rt_cost_hits=fc.hits,
                       rt_remat_wall_s=stats.remat_seconds, rt_peak=stats.peak_bytes,
                       rt_evictions=stats.evictions,
                       rt_remat_by_op={k: v[0] for k, v in stats.remat_by_op.items()},
                       rt_plan_ops=stats.plan_ops)
        except BudgetExceededError as e:
            row.update(rt_status="infeasible", rt_error=str(e).split("\n")[0][:200])
        row["rt_wall_s"] = time.perf_counter() - t0
        st.restore()
        # The simulator, with and without scratch.
        for tag, tr in (("sim", trace), ("sim_no_scratch", no_scratch)):
            res = sim.simulate(tr, budget=budget - untracked, policy=policy, options=options)
            row.update({f"{tag}_status": res.status, f"{tag}_recompute_s": res.remat_time * 1e-9,
                        f"{tag}_recomputes": res.rematerializations, f"{tag}_peak": res.peak_bytes + untracked,
                        f"{tag}_evictions": res.evictions})
        if policy == ADAPTIVE:
            # Note [Adaptive lookahead]: the replay keeps the better of following the
            # plan and not; which the runtime settled on shows in its plan_ops.
            for tag, plan in (("sim_plan", True), ("sim_noplan", False)):
                res = sim.simulate(trace, budget=budget - untracked, policy="lookahead",
                                   options=options, plan=plan)
                row.update({f"{tag}_status": res.status, f"{tag}_recompute_s": res.remat_time * 1e-9,
                            f"{tag}_recomputed_cost_s": res.recomputed_cost * 1e-9})
        if row.get("rt_status") == "ok" and row["sim_status"] == "ok":
            rt, sm = row["rt_recompute_s"], row["sim_recompute_s"]
            row["ratio"] = (sm / rt) if rt > 0 else (1.0 if sm == 0 else float("inf"))
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("model", "fraction", "rt_status", "rt_recompute_s",
                                                  "rt_recomputes", "sim_recompute_s", "sim_recomputes",
                                                  "sim_no_scratch_recompute_s", "ratio", "rt_wall_s")}),
              flush=True)
    return rows


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def markdown(rows: List[dict], args) -> str:
    adaptive = args.policy == ADAPTIVE
    lines = [
        "# Simulator vs runtime, the same op times (issue 15)",
        "",
        f"`python -m bench.sim_vs_runtime --size {args.size}` ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}); policy `{args.policy}`; "
        "Python runtime; one run. Recompute time: the summed per-op costs (the least recorded "
        "time of the op on those shapes) of what was recomputed, in ms; `sim/rt` is the "
        "simulated over the runtime's. `no scratch`: the same replay with scratch 0 (the "
        "simulator before it modelled scratch)."
        + (" `adaptive`: the replay keeps the better of lookahead with the previous step's plan "
           "and without one; the runtime's ops on the plan show which it settled on (0: "
           "without)." if adaptive else ""),
        "",
        "| model | budget (x eager peak) | runtime recompute ms (count) | simulated ms (count) | "
        "sim/rt | no scratch ms (count) | runtime peak / budget | cost-table misses |"
        + (" runtime ops on the plan | replay with plan / without, ms |" if adaptive else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if adaptive else ""),
    ]
    for r in rows:
        if r.get("rt_status") != "ok":
            rt = r.get("rt_status", "?")
        else:
            rt = f"{_ms(r['rt_recompute_s'])} ({r['rt_recomputes']})"
        sm = (f"{_ms(r['sim_recompute_s'])} ({r['sim_recomputes']})" if r["sim_status"] == "ok"
              else r["sim_status"])
        ns = (f"{_ms(r['sim_no_scratch_recompute_s'])} ({r['sim_no_scratch_recomputes']})"
              if r["sim_no_scratch_status"] == "ok" else r["sim_no_scratch_status"])
        ratio = r.get("ratio")
        rs = "-" if ratio is None else f"{ratio:.3f}" + (" **" if abs(ratio - 1) > TOLERANCE else "")
        pk = f"{r['rt_peak'] / r['budget_bytes']:.3f}" if r.get("rt_peak") else "-"
        line = (f"| {r['model']} | {r['fraction']} | {rt} | {sm} | {rs} | {ns} | {pk} | "
                f"{r.get('rt_cost_misses', '-')} |")
        if adaptive:
            pl = [f"{_ms(r[k + '_recompute_s'])}" if r.get(k + "_status") == "ok" else r.get(k + "_status", "-")
                  for k in ("sim_plan", "sim_noplan")]
            line += f" {r.get('rt_plan_ops', '-')} | {pl[0]} / {pl[1]} |"
        lines.append(line)
    lines += ["", "`**`: off by more than 10%.", "", "Baselines (MiB): eager's measured peak; the "
              "replay's peak with nothing evicted, with and without scratch, plus the bytes held at "
              "the start that the trace never sees; the largest op scratch.", "",
              "| model | eager peak | replay peak | replay peak, no scratch | largest scratch |",
              "|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        mib = lambda b: f"{b / 2**20:.2f}"
        lines.append(f"| {r['model']} | {mib(r['eager_peak'])} | {mib(r['sim_baseline_peak'])} | "
                     f"{mib(r['sim_baseline_peak_no_scratch'])} | {mib(r['max_scratch'])} |")
    ok = [r for r in rows if r.get("ratio") is not None]
    within = [r for r in ok if abs(r["ratio"] - 1) <= TOLERANCE]
    lines += ["", f"{len(within)}/{len(rows)} cells within 10% ({len(ok)} where both ran)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--size", default="quick", choices=sorted(M.SIZES))
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--policy", default=DEFAULT_POLICY)
    ap.add_argument("--out", default=os.path.join("bench", "results", "sim_vs_runtime"))
    args = ap.parse_args(argv)
    if not (_ext.available() and devmem.cpu_counter_installed()):
        sys.exit("bench.sim_vs_runtime needs the C++ extension's counting CPU allocator")
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = []
    for name in args.models:
        rows.extend(measure_model(name, args.size, fractions, args.policy))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
