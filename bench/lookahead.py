"""Lookahead on the C++ runtime (issue 15): ``lookahead`` and ``adaptive`` against ``msps_sqrt``, steps 2+.

    python -m bench.lookahead                    # the bench models and issue 15's GRU RNN
    python -m bench.lookahead --models gpt --fractions 0.5

Each lookahead block records its step and the next block follows it (Note
[Recording steps for lookahead] in csrc/step_plan.h). The machine this runs on
is shared and its timings swing by several times between runs, so the two
policies are measured in the same process, interleaved with eager: per model
and budget, one forked process runs each training step's forward and backward
three times, eagerly and under each policy (the order rotates; parameters,
optimizer and RNG state are the same for all three, and each policy's losses
must equal the eager run's bit for bit), then takes the optimizer step once.
A warm-up step (both policies, then the state restored, as bench.run's
warm-up) teaches the runtime its op sizes and costs and records the first plan,
so every measured step (batches 1..N) is a step 2+ whose lookahead block
follows the previous lookahead block's plan (a msps_sqrt block in between
neither reads nor replaces it). Reported per policy: medians over the measured
steps of recomputations, recompute seconds (wall) and step CPU time (one torch
thread; "x eager" against the eager runs of the same process), and the
recomputations summed over the steps. Budgets: fractions of
eager's measured peak (bench.run's eager row); "no limit" shows what recording
costs. The GRU RNN (bench.thrash's, issue 15's, with its data-dependent stop) is
the dynamic model: its steps diverge from their plans. Results go to
bench/results/lookahead.md (and .json).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # ``python bench/lookahead.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch

import dtr
from bench import models as M
from bench import run as R
from bench import thrash as T

# 0.5 of eager's peak, then a tighter budget that msps_sqrt fits (bench/results/results.md's
# smallest feasible budgets plus a margin; the GRU's from bench/results/thrash.md).
FRACTIONS = {
    "gpt": [None, 0.5, 0.48],
    "resnet": [None, 0.5, 0.43],
    "unet": [None, 0.5, 0.42],
    "lstm": [None, 0.5, 0.35],
    "gru": [None, 0.5, 0.4],
}
POLICIES = ["msps_sqrt", "lookahead", "adaptive"]  # adaptive: Note [Adaptive lookahead]


def _build(name):
    if name == "gru":
        return T.build_gru(0)
    return M.build(name, "full")


def _block_step(model, batch, budget, policy):
    """Forward and backward, in one block unless eager: (loss, stats or None, CPU seconds)."""
    c0 = time.process_time()
    with (contextlib.nullcontext() if policy == "eager" else dtr.budget(budget, policy=policy)) as s:
        loss = model(*batch)
        loss.backward()
        val = loss.item()
    del loss
    return val, (s.stats.as_dict() if s is not None else None), time.process_time() - c0


def compare(name: str, budget, steps: int) -> dict:
    """One model and budget, every policy interleaved (in a forked child)."""
    os.environ["DTR_RUNTIME"] = "cpp"
    torch.set_num_threads(1)
    model, batch_fn = _build(name)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # as bench.run's stepper
    runs = ["eager"] + POLICIES
    out = {p: dict(losses=[], stats=[], cpu=[]) for p in runs}
    try:
        init = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        for policy in POLICIES:  # warm-up: sizes and costs learnt; the first plan recorded
            opt.zero_grad(set_to_none=True)
            _block_step(model, batch_fn(0), budget, policy)
        with torch.no_grad():
            model.load_state_dict(init[0])
        opt.load_state_dict(init[1])
        torch.manual_seed(1234)  # bench.run's seed after its warm-up: the same dropout masks
        for i in range(steps):
            batch = batch_fn(1 + i)
            rng = torch.get_rng_state()
            order = runs[i % 3:] + runs[:i % 3]  # each run goes first, second and last in turn
            for policy in order:
                torch.set_rng_state(rng)
                opt.zero_grad(set_to_none=True)
                loss, st, cpu = _block_step(model, batch, budget, policy)
                out[policy]["losses"].append(loss)
                out[policy]["stats"].append(st)
                out[policy]["cpu"].append(cpu)
            opt.step()
        out["status"] = "ok"
    except dtr.BudgetExceededError as e:
        out["status"] = f"BudgetExceededError: {str(e)[:120]}"
    return out


def measure(name: str, fractions, steps: int) -> list:
    eager = R.isolated(T._row, name, R.Config("eager", "eager"), "", steps - 1, None)
    peak = eager["measured_peak"]
    rows = [dict(eager=eager)]
    for f in fractions:
        budget = None if f is None else int(f * peak)
        t0 = time.time()
        try:
            r = R.isolated(compare, name, budget, steps)
        except RuntimeError as e:
            r = dict(status=str(e).splitlines()[0][:200])
        r.update(fraction=f, budget=budget, wall_total_s=time.time() - t0)
        rows.append(r)
        print(f"{name} {f}: {r['status']}", *(line(r, p, eager) for p in POLICIES), sep="\n  ", flush=True)
    return rows


def _med(r, policy, key):
    return statistics.median(s[key] for s in r[policy]["stats"])


def line(r: dict, policy: str, eager: dict) -> str:
    if r.get("status") != "ok":
        return ""
    st = r[policy]["stats"]
    return (f"{policy}: remats {[s['rematerializations'] for s in st]}, remat s "
            f"{[round(s['remat_seconds'], 3) for s in st]}, cpu {[round(c, 2) for c in r[policy]['cpu']]}, "
            f"followed {[s['plan_ops'] for s in st]} of {[s['ops'] for s in st]}, "
            f"exact {exact(r, policy, eager)}")


def exact(r: dict, policy: str, eager: dict) -> str:
    ref = r["eager"]["losses"]
    got = r[policy]["losses"]
    n = min(len(ref), len(got))
    return "exact" if n and ref[:n] == got[:n] else ("DIFFERS" if n else "-")


def table(name: str, rows: list) -> list:
    eager = rows[0]["eager"]
    out = [f"## {name}", "",
           f"eager's measured peak (bench.run's eager row, in its own process, which sets the budgets): "
           f"{eager['measured_peak'] / R.MiB:.1f} MiB", "",
           "| budget (x eager peak) | policy | ops/step | recomputations/step | per op | "
           "recomputations, all steps | recompute s/step | step CPU s (x eager) | ops following the plan | losses |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        f = r["fraction"]
        budget = "no limit" if f is None else f"{f:.2f}"
        if r.get("status") != "ok":
            out.append(f"| {budget} | both | {r['status'][:100]} | | | | | | | |")
            continue
        eager_cpu = statistics.median(r["eager"]["cpu"])
        out.append(f"| {budget} | eager | | | | | | {eager_cpu:.3f} | - | - |")
        for p in POLICIES:
            st = r[p]["stats"]
            ops = _med(r, p, "ops")
            remats = _med(r, p, "rematerializations")
            out.append("| " + " | ".join([
                budget, p, f"{ops:.0f}", f"{remats:.0f}", f"{remats / max(1, ops):.3f}",
                f"{sum(s['rematerializations'] for s in st)}",
                f"{_med(r, p, 'remat_seconds'):.3f}",
                f"{statistics.median(r[p]['cpu']):.3f} ({statistics.median(r[p]['cpu']) / eager_cpu:.2f}x)",
                " ".join(str(s["plan_ops"]) if s["plan_diverged_at"] < 0 else f"{s['plan_ops']} (diverged)"
                         for s in st) if p in ("lookahead", "adaptive") else "-",
                exact(r, p, eager)]) + " |")
    out.append("")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(FRACTIONS), choices=list(FRACTIONS))
    ap.add_argument("--fractions", nargs="+", type=float, default=None,
                    help="budgets as fractions of eager's measured peak (default: per model)")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per model and budget (after a warm-up)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "lookahead.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as every measuring child does (the header reports it)
    t_start = time.time()
    lines = ["# Lookahead on the C++ runtime (python -m bench.lookahead)", "",
             f"{R.machine_info()}", "",
             f"{args.steps} measured steps per model and budget, each run under every policy in one "
             "process (see the module's docstring); medians over the steps unless said.", ""]
    all_rows = {}
    for name in args.models:
        rows = measure(name, args.fractions or FRACTIONS[name], args.steps)
        all_rows[name] = rows
        lines += table(name, rows)
    lines.append(f"Took {(time.time() - t_start) / 60:.1f} min.")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(all_rows, f, indent=1, default=str)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
