"""The largest batch that trains within a fixed memory (the DTR paper's Table 1).

For each model (bench/models.py, "full" size): the memory M is the measured peak of an
eager training step at the model's bench batch size (bytes resident at the step's start +
the torch profiler's peak above them, as bench.run measures). Then, for each method,

- eager,
- checkpoint per block (``torch.utils.checkpoint``, non-reentrant),
- torch.compile (aot_eager) with ``activation_memory_budget = 0.1``,
- dtr: a plain ``dtr.budget(M)``,

the largest batch whose training step fits in M: the measured peak of its profiled step
is at most M (and, for dtr, no BudgetExceededError). Batches are searched by doubling from
the bench batch and then bisecting, up to ``--max-factor`` times it; each probe runs
bench.run's step (one warm-up step, one profiled step, ``--steps`` timed steps) in a
forked child. Time per sample = the median process CPU time of the timed steps / batch.

    python bench/max_batch.py [--models gpt,resnet,unet] [--max-factor 4] [--steps 1]

Writes bench/results/max_batch.json and max_batch.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(HERE))
    __package__ = "bench"

import torch  # noqa: E402

from bench import models as M  # noqa: E402
from bench.run import Config, isolated, machine_info, run_config  # noqa: E402

METHODS = ["eager", "checkpoint per block", "compile amb=0.1", "dtr"]


def _probe(name: str, batch: int, method: str, memory: int, steps: int, size: str = "full") -> dict:
    """One step of ``method`` at ``batch`` (runs in a forked child)."""
    M.SIZES["max_batch"] = {name: dict(M.SIZES[size][name], batch=batch)}
    if method == "eager":
        cfg = Config("eager", method)
    elif method == "checkpoint per block":
        cfg = Config("ckpt", method, ckpt="block")
    elif method == "compile amb=0.1":
        import torch._functorch.config as fconfig

        fconfig.activation_memory_budget = 0.1
        cfg = Config("compile", method, amb=0.1, backend="aot_eager")
    else:
        cfg = Config("dtr", method, budget=memory)
    row = run_config(name, "max_batch", cfg, steps, None)
    row.pop("traceback", None)
    return row


def _fits(row: dict, memory: int) -> bool:
    return row["status"] == "ok" and row["measured_peak"] <= memory


def largest_batch(name: str, method: str, memory: int, base: int, max_factor: int, steps: int,
                  log, size: str = "full") -> dict:
    """Doubling, then bisection, between the largest batch that fit and the smallest that did not."""
    tried = {}

    def probe(b):
        t0 = time.perf_counter()
        r = isolated(_probe, name, b, method, memory, steps, size)
        tried[b] = r
        log(f"{name} {method} batch {b}: {r['status']}, peak "
            f"{r.get('measured_peak', 0) / 2**20:.1f} MiB of {memory / 2**20:.1f} "
            f"({time.perf_counter() - t0:.0f} s)")
        return _fits(r, memory)

    lo, hi = 0, None  # lo fits (0: none yet), hi does not
    b = base
    while b <= max_factor * base:
        if probe(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if lo == 0:
        b = base // 2
        while b >= 1 and not probe(b):
            hi, b = b, b // 2
        lo = max(b, 0)
    capped = hi is None  # every batch up to max_factor x the bench batch fit
    while hi is not None and lo and hi - lo > max(1, base // 4):
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    best = tried.get(lo)
    out = dict(model=name, method=method, memory=memory, base_batch=base, batch=lo,
               capped=capped, probes=sorted(tried))
    if best is not None and lo:
        out.update(measured_peak=best["measured_peak"], step_s=best["step_s"],
                   s_per_sample=best["step_s"] / lo, losses=best["losses"])
        for k in ("evictions", "rematerializations"):
            if k in best:
                out[k] = best[k]
    first_fail = tried.get(hi) if hi is not None else None
    if first_fail is not None:
        out["next_status"] = first_fail["status"]
        out["next_peak"] = first_fail.get("measured_peak")
    return out


def above_static(models, results: str, steps: int, size: str, out: str, log) -> None:
    """dtr at the smallest batch the search would try above every static tool's largest,
    against the best static tool at its largest, measured in this run (the issue's
    "a larger batch than every static tool at no more than 1.5x their time per sample":
    dtr's own largest batch is the edge of feasibility, its worst point)."""
    with open(results) as f:
        found = json.load(f)["rows"]
    md = [f"dtr just above the static tools' largest batch (`python bench/max_batch.py --above-static "
          f"--models {','.join(models)}`; largest batches from {os.path.basename(results)}; one "
          f"timed step each after the warm-up, process CPU time, 1 torch thread).", "",
          "| model | memory (MiB) | best static tool: largest batch | its time per sample | dtr's batch | "
          "dtr's measured peak (MiB) | dtr's time per sample (x the static tool's) | losses |",
          "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name in models:
        base = M.SIZES[size][name]["batch"]
        statics = [r for r in found if r["model"] == name and r["method"] not in ("eager", "dtr") and r["batch"]]
        best = max(statics, key=lambda r: (r["batch"], -r.get("s_per_sample", 0)))
        ref = isolated(_probe, name, base, "eager", 0, steps, size)
        memory = ref["measured_peak"]
        st = isolated(_probe, name, best["batch"], best["method"], memory, steps, size)
        batch = best["batch"] + max(1, base // 4)
        dt = isolated(_probe, name, batch, "dtr", memory, steps, size)
        log(f"{name}: {best['method']} at {best['batch']}: {st['status']}; dtr at {batch}: {dt['status']}")
        rows.append(dict(model=name, memory=memory, static=best["method"], static_batch=best["batch"],
                         static_row=st, dtr_batch=batch, dtr_row=dt))
        if not (_fits(st, memory) and _fits(dt, memory)):
            md.append(f"| {name} | {memory / 2**20:.1f} | {best['method']} {best['batch']} | {st['status'][:40]} "
                      f"| {batch} | | {dt['status'][:60]} | |")
            continue
        s_st, s_dt = st["step_s"] / best["batch"], dt["step_s"] / batch
        md.append(f"| {name} | {memory / 2**20:.1f} | {best['method']} {best['batch']} | {s_st * 1e3:.1f} ms | "
                  f"{batch} | {dt['measured_peak'] / 2**20:.1f} | {s_dt * 1e3:.1f} ms ({s_dt / s_st:.2f}) | "
                  f"{dt.get('rematerializations', 0):.0f} recomputations |")
    with open(os.path.splitext(out)[0] + "_above_static.json", "w") as f:
        json.dump(dict(rows=rows, machine=machine_info()), f, indent=2)
    with open(os.path.splitext(out)[0] + "_above_static.md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt,resnet,unet")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--max-factor", type=int, default=4)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", default="full", choices=sorted(M.SIZES), help="quick: a smoke test")
    p.add_argument("--out", default=os.path.join(HERE, "results", "max_batch.json"))
    p.add_argument("--above-static", action="store_true",
                   help="only dtr just above the static tools' largest batches found in --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    rows = []

    def log(msg):
        print(msg, flush=True)

    if args.above_static:
        above_static(args.models.split(","), args.out, args.steps, args.size, args.out, log)
        return 0

    for name in args.models.split(","):
        base = M.SIZES[args.size][name]["batch"]
        ref = isolated(_probe, name, base, "eager", 0, args.steps, args.size)
        if ref["status"] != "ok":
            log(f"{name}: eager at batch {base} failed: {ref['status']}")
            continue
        memory = ref["measured_peak"]
        log(f"{name}: memory = eager's measured peak at batch {base}: {memory / 2**20:.1f} MiB")
        for method in args.methods.split(","):
            rows.append(largest_batch(name, method, memory, base, args.max_factor, args.steps, log,
                                      args.size))
    md = [f"Largest batch within eager's measured peak at the bench batch (`python bench/max_batch.py "
          f"{' '.join(argv or sys.argv[1:])}`; {time.time() - t_start:.0f} s; "
          f"batch searched up to {args.max_factor}x the bench batch; time per sample is process "
          f"CPU time, 1 torch thread).", "",
          "| model | memory (MiB) | method | largest batch (x bench batch) | measured peak (MiB) | "
          "time per sample (x eager's) |", "|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        mine = [r for r in rows if r["model"] == name]
        eager = next((r for r in mine if r["method"] == "eager" and r.get("s_per_sample")), None)
        for r in mine:
            if not r["batch"]:
                md.append(f"| {name} | {r['memory'] / 2**20:.1f} | {r['method']} | none fits "
                          f"({r.get('next_status', '')[:60]}) | | |")
                continue
            rel = (f"{r['s_per_sample'] / eager['s_per_sample']:.2f}" if eager else "")
            cap = " (cap)" if r["capped"] else ""
            md.append(f"| {name} | {r['memory'] / 2**20:.1f} | {r['method']} | {r['batch']} "
                      f"({r['batch'] / r['base_batch']:.2f}x){cap} | {r['measured_peak'] / 2**20:.1f} | "
                      f"{r['s_per_sample'] * 1e3:.1f} ms ({rel}) |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(rows=rows, machine=machine_info(), argv=argv or sys.argv[1:]), f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
