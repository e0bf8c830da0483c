"""CUDA check for the runtime: differential training and allocator-measured peaks on a GPU.

    python bench/gpu_check.py                 # one GPU, a few minutes; writes bench/results/gpu_check.md
    python bench/gpu_check.py --device cpu --size quick   # the same checks on CPU (profiler-measured), a dry run

Every part runs once per runtime (``--runtimes python,cpp``: the Python reference and the
C++ runtime, when dtr._C is built).

Part A trains the test models (tests/models.py) for three Adam steps eagerly and under
dtr: at an unlimited budget, under evict_everything, and at 0.8 of dtr's own unlimited
peak (just above the smallest
feasible budget when that is infeasible). Losses, parameters, buffers and Adam state are compared with torch.equal
(deterministic algorithms on; eager is also run twice, so nondeterminism of the device
shows up as its own column rather than as a dtr failure).

Part B runs the benchmark models (bench/models.py, "full" size) for three steps eagerly and
under dtr at 0.7 and 0.5 of eager's measured peak, with a plain ``dtr.budget`` (it bounds all the device's
tensor memory), and reports exactness, step time relative to eager and the
measured peak over the budget.

Part C times training steps of the benchmark models with no limit, under each runtime, as
a multiple of eager's step (median of ``--reps`` steps after a warm-up step, the device
synchronized around each): what the bookkeeping costs where the kernels are fast.

Measured peak of a step = bytes resident when it starts (parameters, buffers, inputs:
what the budget counts) + the allocator's peak above that during the step
(``torch.cuda.max_memory_allocated`` on CUDA, profiler allocation events on CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tests"))
sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402

import dtr  # noqa: E402
import models as test_models  # noqa: E402  (tests/models.py)
from bench import models as bench_models  # noqa: E402
from bench.run import resident_base  # noqa: E402

MiB = 1 << 20


def to_device(x, dev):
    return tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, x)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measured(fn, dev, resident):
    """(fn's result, resident + allocator peak above the start, seconds)."""
    sync(dev)
    t0 = time.perf_counter()
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn()
        sync(dev)
        above = torch.cuda.max_memory_allocated(dev) - base
    else:
        result, above = dtr.measure.peak_memory(fn)
    return result, resident + above, time.perf_counter() - t0


def train(model, batches, dev, session_fn, record_peaks=False):
    """Adam steps; returns (losses, peaks, seconds per step, sessions)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(1234)
    if dev.type == "cuda":
        torch.cuda.manual_seed(1234)
    losses, peaks, times, sessions = [], [], [], []
    for inp in batches:
        opt.zero_grad(set_to_none=True)
        resident = resident_base(model, inp)

        def step():
            with session_fn(model, inp) as s:
                loss = model(*inp)
                loss.backward()
                out = dtr.unwrap(loss).detach().clone()
            return out, s

        (loss, s), peak, secs = measured(step, dev, resident)
        losses.append(loss)
        peaks.append(peak)
        times.append(secs)
        sessions.append(s)
        opt.step()
    return losses, peaks, times, sessions, opt


def same_state(a, b):
    (ma, la, oa), (mb, lb, ob) = a, b
    ok = all(torch.equal(x, y) for x, y in zip(la, lb))
    ok &= all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    for p, q in zip(ma.parameters(), mb.parameters()):
        ok &= all(torch.equal(oa.state[p][k], ob.state[q][k]) for k in oa.state[p])
    return bool(ok)


def budget_session(budget, dev, runtime):
    """A session factory: a plain budget bounds all of the device's tensor memory."""
    return lambda m, inp: dtr.budget(budget, device=dev, runtime=runtime)


def eager_session(model, inp):
    return contextlib.nullcontext(None)


def run_variant(build, dev, session_fn):
    model, batches = build()
    model = model.to(dev)
    batches = [to_device(b, dev) for b in batches]
    losses, peaks, times, sessions, opt = train(model, batches, dev, session_fn)
    return (model, losses, opt), peaks, times, sessions


def part_a(dev, lines, runtimes):
    lines += ["## A. Test models (tests/models.py), 3 Adam steps", "",
              "| model | runtime | eager repeat exact | unlimited exact | evict_everything exact | budget (B) "
              "| tight exact | evictions / remats | measured peak / budget |",
              "|---|---|---|---|---|---|---|---|---|"]
    failures = 0
    for name, runtime in [(n, r) for n in test_models.MODELS for r in runtimes]:
        def build(name=name):
            return test_models.make(name)

        eager, _, _, _ = run_variant(build, dev, eager_session)
        eager2, _, _, _ = run_variant(build, dev, eager_session)
        unl, _, _, us = run_variant(build, dev, budget_session(None, dev, runtime))
        ev, _, _, _ = run_variant(build, dev, lambda m, inp: dtr.testing.evict_everything(runtime=runtime))
        budget = int(0.8 * max(s.stats.peak_bytes for s in us))
        try:
            try:
                tight, peaks, _, ts = run_variant(build, dev, budget_session(budget, dev, runtime))
            except dtr.BudgetExceededError as e:  # 0.8 is below the smallest: just above it then
                budget = max(int(e.smallest_feasible_bytes * 1.05), budget + 1)
                tight, peaks, _, ts = run_variant(build, dev, budget_session(budget, dev, runtime))
            t_ok = same_state(eager, tight)
            ev_remat = (f"{sum(s.stats.evictions for s in ts)} / "
                        f"{sum(s.stats.rematerializations for s in ts)}")
            ratio = max(peaks) / budget
            failures += ratio > 1.0
            ratio = f"{ratio:.3f}"
        except dtr.BudgetExceededError as e:
            t_ok, ev_remat, ratio = "infeasible", "-", f"({e.smallest_feasible_bytes} B needed)"
        rep = same_state(eager, eager2)
        u_ok, e_ok = same_state(eager, unl), same_state(eager, ev)
        failures += rep and ((not u_ok) + (not e_ok) + (t_ok is False))
        lines.append(f"| {name} | {runtime} | {rep} | {u_ok} | {e_ok} | {budget} | {t_ok} | {ev_remat} "
                     f"| {ratio} |")
        print(lines[-1], flush=True)
    return failures


def part_b(dev, lines, names, fractions, runtimes, size):
    lines += ["", f"## B. Benchmark models (bench/models.py, {size} size), 3 Adam steps, plain dtr.budget", "",
              "| model | runtime | eager peak (MiB) | budget | exact | time / eager (last step) "
              "| measured peak / budget, step 1 | later steps | evictions / remats |",
              "|---|---|---|---|---|---|---|---|---|"]
    failures = 0
    for name in names:
        def build(name=name):
            m, batch_fn = bench_models.build(name, size)
            return m, [batch_fn(i) for i in range(3)]

        eager, epeaks, etimes, _ = run_variant(build, dev, eager_session)
        eager_peak = max(epeaks)
        lines.append(f"| {name} | | {eager_peak / MiB:.1f} | eager | - | 1.00 | - | - | - |")
        print(lines[-1], flush=True)
        for frac, runtime in [(f, r) for f in fractions for r in runtimes]:
            budget = int(frac * eager_peak)
            try:
                res, peaks, times, ss = run_variant(
                    build, dev, budget_session(budget, dev, runtime))
            except dtr.BudgetExceededError as e:
                lines.append(f"| {name} | {runtime} | | {frac} | infeasible "
                             f"({e.smallest_feasible_bytes / MiB:.1f} MiB needed) | - | - | - | - |")
                print(lines[-1], flush=True)
                continue
            ok = same_state(eager, res)
            # Step 1 meets each (op, shapes) for the first time: its scratch is
            # estimated, not yet measured (Note [Measured op scratch]).
            first, later = peaks[0] / budget, max(peaks[1:]) / budget
            failures += (not ok) + (later > 1.0)
            lines.append(f"| {name} | {runtime} | | {frac} ({budget / MiB:.1f} MiB) | {ok} "
                         f"| {times[-1] / etimes[-1]:.2f} "
                         f"| {first:.3f} | {later:.3f} | {sum(s.stats.evictions for s in ss)} / "
                         f"{sum(s.stats.rematerializations for s in ss)} |")
            print(lines[-1], flush=True)
    return failures


def part_c(dev, lines, names, runtimes, size, reps):
    """Step time with no limit under each runtime, as a multiple of eager's."""
    lines += ["", f"## C. No limit: step time / eager (bench/models.py, {size} size, median of {reps} steps)", "",
              "| model | " + " | ".join(runtimes) + " |", "|---|" + "---|" * len(runtimes)]
    variants = {"eager": None, **{r: r for r in runtimes}}
    for name in names:
        model, batch_fn = bench_models.build(name, size)
        model = model.to(dev)
        batch = to_device(batch_fn(0), dev)
        times = {k: [] for k in variants}
        for rep in range(reps + 1):  # the first round warms caches up and is dropped
            for k, runtime in variants.items():
                model.zero_grad(set_to_none=True)
                ctx = contextlib.nullcontext() if runtime is None else dtr.budget(None, device=dev,
                                                                                    runtime=runtime)
                sync(dev)
                t0 = time.perf_counter()
                with ctx:
                    model(*batch).backward()
                sync(dev)
                if rep:
                    times[k].append(time.perf_counter() - t0)
        eager = statistics.median(times["eager"])
        lines.append(f"| {name} | " + " | ".join(f"{statistics.median(times[r]) / eager:.2f}x"
                                                   for r in runtimes) + " |")
        print(lines[-1], flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="gpt,resnet,unet,lstm", help="bench models for part B")
    p.add_argument("--fractions", default="0.7,0.5")
    p.add_argument("--runtimes", default=",".join(["python", "cpp"] if dtr._ext.available() else ["python"]),
                   help="dtr runtimes to check, comma-separated")
    p.add_argument("--size", default="full", help="bench model size for parts B and C (full, quick)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant in part C")
    p.add_argument("--parts", default="abc", help="which parts to run")
    p.add_argument("--out", default=os.path.join(_ROOT, "bench", "results", "gpu_check.md"))
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; run this on a machine with a GPU, or pass --device cpu")
            return 2
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    lines = [f"# gpu_check on {name}", "", f"torch {torch.__version__}, Python {platform.python_version()}; "
             f"command: `python bench/gpu_check.py {' '.join(argv or sys.argv[1:])}`", ""]
    runtimes = [r for r in args.runtimes.split(",") if r]
    names = [m for m in args.models.split(",") if m]
    failures = 0
    if "a" in args.parts:
        failures += part_a(dev, lines, runtimes)
    if "b" in args.parts:
        failures += part_b(dev, lines, names, [float(f) for f in args.fractions.split(",") if f], runtimes,
                           args.size)
    if "c" in args.parts:
        part_c(dev, lines, names + ["treelstm"], runtimes, args.size, args.reps)
    lines += ["", f"total {time.time() - t_start:.0f} s, failures: {failures}"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[-1])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
