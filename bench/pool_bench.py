"""Bookkeeping and victim-search cost of the Python and the C++ pool.

    python bench/pool_bench.py            # writes bench/results/pool_bench.{md,json}
    python bench/pool_bench.py --quick    # fewer repetitions (a smoke test)

(a) Added time per op at an unlimited budget: a stream of 16x16 adds, eager vs
    ``dtr.budget(None, pool="python")`` vs ``pool="cpp"``, medians over batches.
(b) Victim choice with 10,000 candidates: time per ``choose_victim`` call, exact
    scan and sampling, both pools, every native policy.
(c) Step time (forward + backward) of the models in tests/models.py at an
    unlimited budget, dtr / eager, with each pool.
(d) The same under a budget (the smallest fraction of the unlimited peak that
    works), plus a deep MLP (300 layers) where the pool holds hundreds of
    candidates: step time and the time spent choosing victims
    (Stats.search_seconds), with each pool.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
warnings.filterwarnings("ignore", message="dtr: C\\+\\+ extension")

import dtr  # noqa: E402
from dtr import _ext  # noqa: E402
from dtr.policies import SearchOptions, make_pool  # noqa: E402

POLICIES = ["dtr_eq", "dtr", "dtr_local", "msps", "msps_sqrt", "lru", "largest", "random"]
SAMPLED = SearchOptions(sample_above=1024, min_evictable_fraction=0.01, seed=0)
# CPU time of this thread: the machine these numbers come from is shared with
# other jobs, and thread time is far less disturbed by them than wall time.
# torch runs on this thread too (set_num_threads(1) below).
perf = time.thread_time


# ---------------------------------------------------------------------------
# (a) per-op overhead
# ---------------------------------------------------------------------------

def _op_stream(ctx, batches: int, per_batch: int) -> float:
    """Median seconds per op of ``x = x + b`` on 16x16 tensors inside ``ctx``."""
    a = torch.randn(16, 16, requires_grad=False)
    b = torch.randn(16, 16)
    times = []
    with ctx() if ctx else _Null():
        x = a + b
        for _ in range(20):  # warm up (size caches, first-op paths)
            x = x + b
        for _ in range(batches):
            t0 = perf()
            for _ in range(per_batch):
                x = x + b
            times.append((perf() - t0) / per_batch)
        del x
    return statistics.median(times)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def bench_per_op(quick: bool) -> dict:
    batches, per_batch = (30, 50) if quick else (300, 100)
    configs = {"eager": None,
               "python": lambda: dtr.budget(None, pool="python")}
    if _ext.available():
        configs["cpp"] = lambda: dtr.budget(None, pool="cpp")
    res = {k: [] for k in configs}
    # Interleave the configurations so drifts in machine speed hit all alike.
    for _ in range(3 if quick else 7):
        for k, ctx in configs.items():
            res[k].append(_op_stream(ctx, batches // 3 if quick else batches // 7, per_batch))
    out = {k: statistics.median(v) for k, v in res.items()}
    low = {k: min(v) for k, v in res.items()}
    return {"seconds_per_op": out,
            "added_us": {k: (v - out["eager"]) * 1e6 for k, v in out.items() if k != "eager"},
            "lowest_seconds_per_op": low,
            "lowest_added_us": {k: (v - low["eager"]) * 1e6 for k, v in low.items() if k != "eager"}}


def bench_pool_calls(quick: bool) -> dict:
    """Cost of the individual pool calls the runtime makes per op (ns)."""
    import timeit

    n = 20000 if quick else 200000
    out = {}
    impls = ["python"] + (["cpp"] if _ext.available() else [])
    stmts = {
        "touch": "p.touch(5, 1.0)",
        "lock+unlock": "p.lock(5); p.unlock(5)",
        "locks": "p.locks(5)",
        "add+remove (2 parents)": "p.add(10**6, 8, 1.0, 1.0, True, [3, 4]); p.remove(10**6)",
        "evicted+rematerialized": "p.evicted(50); p.rematerialized(50, 2.0)",
    }
    for impl in impls:
        p = make_pool("dtr_eq", SearchOptions(), impl=impl)
        for i in range(100):
            p.add(i, 1024, 1.0, 0.0, True, [i - 1] if i else [])
        out[impl] = {k: min(timeit.repeat(s, globals={"p": p}, number=n, repeat=5,
                                          timer=time.thread_time)) / n * 1e9
                     for k, s in stmts.items()}
    return out


# ---------------------------------------------------------------------------
# (b) victim search with 10,000 candidates
# ---------------------------------------------------------------------------

def _build_pool(impl: str, policy: str, search: SearchOptions, n_cand: int, seed: int = 0):
    """A pool shaped like a network's: each storage reads 1-2 of the last 64, and
    about a fifth of all storages are evicted (so dtr_eq, dtr and msps have
    evicted neighbourhoods to look at)."""
    rng = random.Random(seed)
    p = make_pool(policy, search, impl=impl)
    now = 0.0
    sid = 0
    resident = 0
    while resident < n_cand:
        parents = [sid - rng.randint(1, 64) for _ in range(rng.randint(1, 2)) if sid > 0]
        nb = rng.choice([4096, 65536, 1 << 20, rng.randint(256, 1 << 22)])
        cost = rng.uniform(1e-6, 1e-3)
        now += cost
        p.add(sid, nb, cost, now, True, [q for q in parents if q >= 0])
        if rng.random() < 0.2:
            p.evicted(sid)
        else:
            resident += 1
        sid += 1
    return p, now


def _time_search(impl, policy, search, n_cand, calls) -> float:
    p, now = _build_pool(impl, policy, search, n_cand)
    times = []
    for i in range(calls):
        now += 1e-4
        t0 = perf()
        v = p.choose_victim(now)
        times.append(perf() - t0)
        # Keep the pool's size: evict the victim, bring it back as fresh.
        p.evicted(v)
        p.rematerialized(v, now)
    return statistics.median(times)


def bench_search(quick: bool, n_cand: int = 10000) -> dict:
    impls = ["python"] + (["cpp"] if _ext.available() else [])
    out = {}
    for impl in impls:
        for policy in POLICIES:
            for mode, search in (("exact", SearchOptions()), ("sampled", SAMPLED)):
                if impl == "python" and mode == "exact":
                    calls = 3 if quick else 10
                else:
                    calls = 50 if quick else 300
                # The lowest of three medians: the machine is shared (see ``perf``).
                out[f"{impl}/{policy}/{mode}"] = min(
                    _time_search(impl, policy, search, n_cand, calls) for _ in range(3))
    return out


# ---------------------------------------------------------------------------
# (c) model step time at an unlimited budget
# ---------------------------------------------------------------------------

def _step_time(name: str, ctx, reps: int) -> float:
    """Median step time of ``reps`` rounds over the model's inputs (each round the same)."""
    import models

    model, data = models.make(name, 0)
    times = []
    for r in range(reps + 1):
        for inp in data:
            t0 = perf()
            with (ctx() if ctx else _Null()):
                loss = model(*inp)
                loss.backward()
            for q in model.parameters():
                q.grad = None
            if r:  # the first round warms up
                times.append(perf() - t0)
            del loss
    return statistics.median(times)


def bench_models(quick: bool) -> dict:
    import models

    configs = {"eager": None, "python": lambda: dtr.budget(None, pool="python")}
    if _ext.available():
        configs["cpp"] = lambda: dtr.budget(None, pool="cpp")
    reps = 3 if quick else 15
    out = {}
    for name in models.MODELS:
        row = {}
        try:
            per = {k: [] for k in configs}
            for _ in range(5):
                for k, ctx in configs.items():
                    per[k].append(_step_time(name, ctx, reps))
            row = {k: statistics.median(v) for k, v in per.items()}
            row["min"] = {k: min(v) for k, v in per.items()}
            row["ratio_python"] = row["python"] / row["eager"]
            row["min_ratio_python"] = row["min"]["python"] / row["min"]["eager"]
            if "cpp" in row:
                row["ratio_cpp"] = row["cpp"] / row["eager"]
                row["min_ratio_cpp"] = row["min"]["cpp"] / row["min"]["eager"]
        except Exception as exc:  # noqa: BLE001 - report and skip the model
            row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        out[name] = row
    return out


# ---------------------------------------------------------------------------
# (d) under a budget
# ---------------------------------------------------------------------------
# Note: the budget runs use SearchOptions() (exact search), the default.

def _make(name):
    import models

    if name == "deep_mlp":
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        return models.MLP(d=64, depth=300), [(torch.randn(512, 64, generator=g),) for _ in range(3)]
    return models.make(name, 0)


def _budget_run(name, limit, pool, reps):
    model, data = _make(name)
    times, search, evictions, remats, peak = [], 0.0, 0, 0, 0
    for r in range(reps + 1):
        for inp in data:
            # Wall time here, as the runtime's Stats.search_seconds.
            t0 = time.perf_counter()
            with dtr.budget(limit, pool=pool) as s:
                loss = model(*inp)
                loss.backward()
            for q in model.parameters():
                q.grad = None
            del loss
            if r:
                times.append(time.perf_counter() - t0)
                st = s.stats
                search += st.search_seconds
                evictions += st.evictions
                remats += st.rematerializations
                peak = max(peak, st.peak_bytes)
    n = len(times)
    return {"step": sum(times) / n, "search_per_step": search / n,
            "evictions_per_step": evictions / n, "remats_per_step": remats / n, "peak": peak}


def _feasible_limit(name, peak):
    """The smallest of 0.5, 0.6, ... 0.9, 0.95 of the unlimited peak that one step fits in
    (parameters and gradients are plain memory that no budget can evict)."""
    for frac in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        model, data = _make(name)
        try:
            for inp in data:
                with dtr.budget(int(peak * frac)):
                    loss = model(*inp)
                    loss.backward()
                del loss
                for q in model.parameters():
                    q.grad = None
            return int(peak * frac)
        except dtr.BudgetExceededError:
            continue
    return None


def bench_budget(quick: bool) -> dict:
    import models

    pools = ["python"] + (["cpp"] if _ext.available() else [])
    reps = 2 if quick else 5
    out = {}
    for name in models.MODELS + ["deep_mlp"]:
        try:
            model, data = _make(name)
            with dtr.budget(None) as s:
                loss = model(*data[0])
                loss.backward()
            del loss
            peak = s.stats.peak_bytes
            limit = _feasible_limit(name, peak)
            if limit is None:
                out[name] = {"error": "no budget up to 0.95 of the unlimited peak worked"}
                continue
            row = {"limit": limit, "unlimited_peak": peak, "fraction": limit / peak}
            for pool in pools:
                row[pool] = _budget_run(name, limit, pool, reps)
        except Exception as exc:  # noqa: BLE001 - report and skip the model
            row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        out[name] = row
    return out


# ---------------------------------------------------------------------------

def _md(res: dict) -> str:
    L = []
    L.append("# Pool benchmark (bench/pool_bench.py)\n")
    L.append(f"Machine: {res['machine']}; torch {res['torch']}; Python {res['python']}.\n")
    for part, machine in res.get("refreshed", {}).items():
        L.append(f"Part `{part}` refreshed by a later `--only {part}` run ({machine}).\n")
    a = res["per_op"]
    L.append("## (a) Added time per op, unlimited budget (16x16 add, median)\n")
    L.append("Median of seven interleaved rounds, each the median over batches of 100 ops; in "
             "brackets the lowest round.\n")
    L.append("| run | us per op | added over eager (us) |")
    L.append("|---|---|---|")
    for k, v in a["seconds_per_op"].items():
        lo = a["lowest_seconds_per_op"][k]
        add = "" if k == "eager" else f"{a['added_us'][k]:.1f} ({a['lowest_added_us'][k]:.1f})"
        L.append(f"| {k} | {v * 1e6:.2f} ({lo * 1e6:.2f}) | {add} |")
    L.append("\nIndividual pool calls (ns per call, best of 5, thread time):\n")
    calls = res["pool_calls"]
    impls = list(calls)
    L.append("| call | " + " | ".join(impls) + " |")
    L.append("|---" * (len(impls) + 1) + "|")
    for k in calls[impls[0]]:
        L.append(f"| {k} | " + " | ".join(f"{calls[i][k]:.0f}" for i in impls) + " |")
    L.append("\n## (b) Victim choice with 10,000 candidates (us per call)\n")
    L.append("The lowest of three medians. The pool: each storage reads 1-2 of the 64 before it, "
             "a fifth of all storages evicted.\n")
    L.append(f"Sampling: {SAMPLED}.\n")
    s = res["search"]
    impls = sorted({k.split("/")[0] for k in s}, key=lambda x: x != "python")
    cols = [f"{i} {m}" for i in impls for m in ("exact", "sampled")]
    L.append("| policy | " + " | ".join(cols) + " |")
    L.append("|---" * (len(cols) + 1) + "|")
    for pol in POLICIES:
        vals = [s[f"{i}/{pol}/{m}"] * 1e6 for i in impls for m in ("exact", "sampled")]
        L.append(f"| {pol} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    L.append("\n## (c) Step time at an unlimited budget (forward + backward, ms, median)\n")
    L.append("Median of five interleaved rounds, each the median of its steps; in brackets the "
             "lowest round (less disturbed by other jobs on the machine).\n")
    L.append("| model | eager | dtr, python pool | dtr, cpp pool | ratio python | ratio cpp |")
    L.append("|---|---|---|---|---|---|")
    for name, row in res["models"].items():
        if "error" in row:
            L.append(f"| {name} | failed under dtr: {row['error']} | | | | |")
            continue
        mn = row["min"]
        nan = float("nan")
        L.append(f"| {name} | {row['eager'] * 1e3:.2f} ({mn['eager'] * 1e3:.2f}) | "
                 f"{row['python'] * 1e3:.2f} ({mn['python'] * 1e3:.2f}) | "
                 f"{row.get('cpp', nan) * 1e3:.2f} ({mn.get('cpp', nan) * 1e3:.2f}) | "
                 f"{row['ratio_python']:.1f} ({row['min_ratio_python']:.1f}) | "
                 f"{row.get('ratio_cpp', nan):.1f} ({row.get('min_ratio_cpp', nan):.1f}) |")
    L.append("\n## (d) Under a budget (per step, mean over all steps; wall time)\n")
    L.append("The budget is the smallest of 0.5, 0.6, ..., 0.9, 0.95 of the unlimited run's peak that "
             "the model fits in. Costs are measured times, so the two runs may evict differently. "
             "Exact search (the default SearchOptions).\n")
    L.append("| model | budget (of peak) | pool | step ms | choosing victims ms | evictions | "
             "rematerializations |")
    L.append("|---|---|---|---|---|---|---|")
    for name, row in res.get("budget", {}).items():
        if "error" in row:
            L.append(f"| {name} | failed under dtr: {row['error']} | | | | | |")
            continue
        for pool in ("python", "cpp"):
            if pool in row:
                r = row[pool]
                L.append(f"| {name} | {row['limit'] / 1024:.0f} KiB ({row['fraction']:.1f}) | {pool} | {r['step'] * 1e3:.2f} | "
                         f"{r['search_per_step'] * 1e3:.3f} | {r['evictions_per_step']:.0f} | "
                         f"{r['remats_per_step']:.0f} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    ap.add_argument("--only", choices=["per_op", "search", "models", "budget"], default=None,
                    help="run one part; with an earlier full run's JSON in --out, merge into it")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load = ", load average %.1f at start" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{load}",
           "torch": torch.__version__, "python": platform.python_version(),
           "cpp_built": _ext.available(), "quick": args.quick}
    if args.only in (None, "per_op"):
        res["per_op"] = bench_per_op(args.quick)
        res["pool_calls"] = bench_pool_calls(args.quick)
        print(json.dumps(res["per_op"], indent=1), json.dumps(res["pool_calls"], indent=1))
    if args.only in (None, "search"):
        res["search"] = bench_search(args.quick)
        print(json.dumps({k: v * 1e6 for k, v in res["search"].items()}, indent=1))
    if args.only in (None, "models"):
        res["models"] = bench_models(args.quick)
        print(json.dumps(res["models"], indent=1))
    if args.only in (None, "budget"):
        res["budget"] = bench_budget(args.quick)
        print(json.dumps(res["budget"], indent=1))
    path = os.path.join(args.out, "pool_bench.json")
    if args.only is not None and os.path.exists(path):
        # Refresh one part of an earlier full run and rewrite both files.
        with open(path) as f:
            old = json.load(f)
        old.setdefault("refreshed", {})[args.only] = res["machine"]
        for k, v in res.items():
            if k in ("per_op", "pool_calls", "search", "models", "budget"):
                old[k] = v
        res = old
    if args.only is None or "refreshed" in res:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "pool_bench.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(args.out, "pool_bench.md"), "w") as f:
            f.write(_md(res))
        print(_md(res))


if __name__ == "__main__":
    main()
