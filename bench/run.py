"""Benchmark dtr against what users would pick instead, measuring memory independently.

    python -m bench.run                 # full run: all models, into bench/results/
    python -m bench.run --quick         # one small model, three budgets (< 2 min), into bench/results/quick/
    python bench/run.py --models gpt lstm

See bench/README.md for what each column means.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

if __package__ in (None, ""):  # ``python bench/run.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch

import dtr
from dtr.policies import DEFAULT_POLICY
from bench import models as M

FRACTIONS = [0.8, 0.6, 0.5, 0.4, 0.3, 0.2]
# The full run's policies: the default first (its rows get the memory timeline),
# then the paper's h_DTR approximation and LRU as references.
POLICIES = list(dict.fromkeys([DEFAULT_POLICY, "msps_sqrt", "dtr_eq", "lru"]))
COMPILE_BUDGETS = [1.0, 0.5, 0.1]
SLACK = 0.05  # measured peak may exceed the budget by this much (op workspace)
MiB = 1 << 20


# ----------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------
def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in seen or key == 0:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def flat_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from flat_tensors(o)


def resident_base(model, batch) -> int:
    """What is in memory when a step starts: parameters, buffers, inputs (grads are None)."""
    return storage_bytes([*model.parameters(), *model.buffers(), *flat_tensors(batch)])


class StepTimeout(Exception):
    pass


class time_limit:
    """Raise StepTimeout after ``seconds`` of this process's CPU time (None: no limit).

    CPU time, not wall time: the machine is shared and wall time swings with other jobs.
    """

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds

    def _fire(self, signum, frame):
        raise StepTimeout(f"step took more than {self.seconds:.0f} CPU s")

    def __enter__(self):
        if self.seconds:
            self._old = signal.signal(signal.SIGVTALRM, self._fire)
            signal.setitimer(signal.ITIMER_VIRTUAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.seconds:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            signal.signal(signal.SIGVTALRM, self._old)
        return False


# ----------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------
class Config:
    """How one step runs: kind in eager / ckpt / dtr / compile."""

    def __init__(self, kind: str, label: str, *, ckpt=None, budget=None, policy=DEFAULT_POLICY,
                 fraction=None, amb=None, backend="aot_eager", runtime=None):
        self.kind, self.label, self.ckpt = kind, label, ckpt
        self.budget, self.policy, self.fraction = budget, policy, fraction
        self.amb, self.backend = amb, backend
        self.runtime = runtime  # dtr.budget's runtime= (None: the default, C++ when built)


def dtr_compile_backend():
    """``dtr.compile_backend`` if the runtime provides it (else None)."""
    cb = getattr(dtr, "compile_backend", None)
    if cb is None:
        try:
            import importlib

            cb = getattr(importlib.import_module("dtr.compile"), "compile_backend", None)
        except Exception:
            cb = None
    return cb


def uses_dtr(row_or_cfg) -> bool:
    """Whether a row (or Config) runs its steps under ``dtr.budget``."""
    get = row_or_cfg.get if isinstance(row_or_cfg, dict) else lambda k: getattr(row_or_cfg, k, None)
    return get("kind") == "dtr" or (get("kind") == "compile" and get("backend") == "dtr")


def make_stepper(model, cfg: Config):
    """(step, optimizer): ``step(batch) -> (loss float, dtr stats dict or None)`` runs one training step.

    Under dtr, a plain ``dtr.budget(budget)``: it bounds all tensor memory of the device
    (See Note [The budget is the device's memory] in dtr/device_memory.py), so the measured
    peak (what is resident at the step's start + the profiler's peak) is what it bounds.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.ckpt = cfg.ckpt
    if cfg.kind == "compile":
        # backend=dtr runs the graphs under the enclosing dtr.budget block's session.
        fwd = torch.compile(model, backend=dtr_compile_backend()() if cfg.backend == "dtr" else cfg.backend)
    elif cfg.kind in ("eager", "ckpt", "dtr"):
        fwd = model
    else:
        raise ValueError(cfg.kind)
    under_dtr = uses_dtr(cfg)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        block = (dtr.budget(cfg.budget, policy=cfg.policy, runtime=cfg.runtime)
                 if under_dtr else contextlib.nullcontext())
        with block as s:
            loss = fwd(*batch)
            loss.backward()
            val = loss.item()
        del loss
        opt.step()
        return val, s.stats.as_dict() if under_dtr else None
    return step, opt


def warm_up_steps(cfg) -> int:
    """Unprofiled steps before the measured ones: one, or three for a policy that learns
    from earlier steps ("lookahead", "adaptive": Note [Adaptive lookahead] measures the
    step with and without the previous step's plan first), so that every measured step
    is one of training's steady state."""
    return 3 if uses_dtr(cfg) and dtr.policies.records_steps(cfg.policy) else 1


def warm_up(model, step, opt, batch, steps: int = 1) -> float:
    """``steps`` unprofiled steps of ``batch``, each from the initial parameters, buffers
    and optimizer state, which are then put back.

    The step compiles under torch.compile, and teaches dtr's runtime what it learns
    about each (op, shapes) on first sight (output sizes, scratch bytes, costs): a step's first
    occurrence of an op can exceed the budget by that op's scratch, and users train many
    steps. Restoring the state keeps every measured loss comparable with eager's bit for bit.
    Gradients are left ``None``, as at the start of a first step. Returns the step's wall seconds.
    """
    init = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(steps):
        t0 = time.perf_counter()
        step(batch)
        wall = time.perf_counter() - t0
        with torch.no_grad():
            model.load_state_dict(init[0])
        opt.load_state_dict(init[1])
        opt.zero_grad(set_to_none=True)
    return wall


def run_config(name: str, size: str, cfg: Config, timed_steps: int, step_limit: Optional[float],
               timeline: bool = False) -> dict:
    """Warm-up step, one profiled step (peak), ``timed_steps`` timed steps. Never raises."""
    row: Dict[str, Any] = dict(model=name, method=cfg.label, kind=cfg.kind, policy=cfg.policy
                               if cfg.kind == "dtr" else None, runtime=cfg.runtime,
                               fraction=cfg.fraction,
                               budget_bytes=cfg.budget, amb=cfg.amb, status="ok", losses=[],
                               backend=cfg.backend if cfg.kind == "compile" else None)
    model, batch_fn = M.build(name, size)
    model.train()
    phase = "setup"
    try:
        step, opt = make_stepper(model, cfg)
        stats_list = []
        phase = "the warm-up step"
        with time_limit(step_limit * 2 * warm_up_steps(cfg) if step_limit else None):
            row["warmup_wall_s"] = warm_up(model, step, opt, batch_fn(0), warm_up_steps(cfg))
        torch.manual_seed(1234)  # the same dropout masks for every configuration
        # Profiled step: the measured peak (relative to the step's start) plus what was resident.
        phase = "the profiled step"
        batch = batch_fn(1)
        base = resident_base(model, batch)
        with time_limit(step_limit * 2 if step_limit else None):
            (loss, st), peak = dtr.measure.peak_memory(step, batch)
        row["losses"].append(loss)
        row["base_bytes"] = base
        row["peak_above_start"] = peak
        row["measured_peak"] = base + peak
        if st is not None:
            stats_list.append(st)
        walls, cpus = [], []
        for i in range(timed_steps):
            phase = f"timed step {i + 1}"
            batch = batch_fn(2 + i)
            t0, c0 = time.perf_counter(), time.process_time()
            with time_limit(step_limit):
                loss, st = step(batch)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            row["losses"].append(loss)
            if st is not None:
                stats_list.append(st)
        # The machine is shared: process CPU time (one torch thread by default) is the
        # primary step time; wall time is reported beside it.
        row["step_s"] = statistics.median(cpus)
        row["step_wall_s"] = statistics.median(walls)
        row["step_walls"] = walls
        if stats_list:
            timed = stats_list[1:] or stats_list
            row["dtr_peak_bytes"] = max(s["peak_bytes"] for s in stats_list)
            for k in ("evictions", "rematerializations", "remat_seconds", "search_seconds", "ops",
                      "op_seconds", "eager_evictions", "unplanned_ops", "thrash_guard_trips",
                      "plan_ops", "plan_diverged_at"):
                row[k] = statistics.median(s.get(k, 0) for s in timed)
            row["remat_by_op"] = timed[-1].get("remat_by_op", {})
        if timeline:
            phase = "the timeline step"
            batch = batch_fn(2 + timed_steps)
            opt.zero_grad(set_to_none=True)  # gradients None at its start, as base_bytes assumes
            (loss, _), series = dtr.measure.memory_timeline(step, batch)
            row["losses"].append(loss)
            row["timeline"] = [base + x for x in series]
    except dtr.BudgetExceededError as e:
        row["status"] = f"BudgetExceededError at {phase}"
        row["smallest_feasible_bytes"] = e.smallest_feasible_bytes
    except StepTimeout as e:
        row["status"] = f"timeout at {phase}: {e}"
    except Exception as e:  # record, never hide
        row["status"] = f"{type(e).__name__} at {phase}: {str(e).splitlines()[0][:200]}"
        row["traceback"] = traceback.format_exc()
    return row


def isolated(fn, *args, **kwargs):
    """Run ``fn`` in a forked child and return its JSON-able result.

    Every configuration starts from the same clean parent state: a step interrupted by
    a timeout (an exception raised at an arbitrary point inside the runtime) or a crash
    cannot leak into the next one. (We saw a later, unrelated eager step measure 11%
    less after an interrupted dtr step in the same process.)
    """
    if not hasattr(os, "fork"):
        return fn(*args, **kwargs)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            data = json.dumps({"ok": fn(*args, **kwargs)})
        except BaseException as e:  # pragma: no cover - reported to the parent
            data = json.dumps({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
            code = 1
        with os.fdopen(w, "w") as f:
            f.write(data)
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        raise RuntimeError(f"benchmark child process died ({'signal %s' % sig if sig else 'status %s' % status})")
    out = json.loads(data)
    if "error" in out:
        raise RuntimeError(out["error"] + "\n" + out["traceback"])
    return out["ok"]


def run_isolated(name, size, cfg, timed_steps, step_limit, timeline=False) -> dict:
    try:
        return isolated(run_config, name, size, cfg, timed_steps, step_limit, timeline)
    except RuntimeError as e:
        return dict(model=name, method=cfg.label, kind=cfg.kind, policy=cfg.policy if cfg.kind == "dtr" else None,
                    fraction=cfg.fraction, budget_bytes=cfg.budget, losses=[],
                    status=str(e).splitlines()[0][:200], traceback=str(e))


def run_smallest(name, size, policy, budget, eager_peak, steps, limit, timeline, retries=2) -> dict:
    """The row at the bisection's smallest budget; 2% more per retry if it fails there.

    Feasibility right at the edge differs between processes: costs are measured times,
    so the victims differ. A retried row says which budgets failed.
    """
    failed = []
    while True:
        r = run_isolated(name, size, Config("dtr", f"dtr {policy} smallest", budget=budget, policy=policy,
                                            fraction=round(budget / eager_peak, 3)), steps, limit,
                         timeline=timeline)
        if not r["status"].startswith("BudgetExceeded") or len(failed) == retries:
            break
        failed.append(f"{budget / eager_peak:.3f}")
        budget = int(budget * 1.02)
    if failed:
        r["note"] = (f"the bisection's smallest budget failed when run again ({', '.join(failed)} "
                     f"of eager's peak): raised by 2% per retry")
    return r


def feasible(name, size, budget, policy, limit) -> tuple:
    try:
        return tuple(isolated(_feasible, name, size, budget, policy, limit))
    except RuntimeError:
        return False, None


def _feasible(name, size, budget, policy, limit) -> tuple:
    """(ok, hint): do a fresh model's warm-up step and next step both run under ``budget``?

    The same two steps a row starts with (run_config), counting the same tensors.
    """
    model, batch_fn = M.build(name, size)
    cfg = Config("dtr", "probe", budget=int(budget), policy=policy)
    step, opt = make_stepper(model, cfg)
    try:
        with time_limit(limit * 2 * warm_up_steps(cfg)):
            warm_up(model, step, opt, batch_fn(0), warm_up_steps(cfg))
        torch.manual_seed(1234)
        with time_limit(limit):
            step(batch_fn(1))
        return True, None
    except dtr.BudgetExceededError as e:
        return False, e.smallest_feasible_bytes
    except StepTimeout:
        return False, None


def smallest_budget(name, size, policy, lo_fail: Optional[int], hi_ok: Optional[int], eager_peak: int,
                    limit: float, tries: int = 4) -> Optional[int]:
    """Bisect the smallest budget a row's first two steps run under, helped by smallest_feasible_bytes."""
    if hi_ok is None:
        hi_ok = eager_peak * 2
        ok, _ = feasible(name, size, hi_ok, policy, limit)
        if not ok:
            return None
    lo = lo_fail or 0
    if lo == 0:
        ok, hint = feasible(name, size, max(1, eager_peak // 100), policy, limit)
        if ok:
            return max(1, eager_peak // 100)
        lo = max(eager_peak // 100, hint or 0)
    for _ in range(tries):
        if hi_ok <= lo * 1.02:
            break
        mid = (lo + hi_ok) // 2
        ok, hint = feasible(name, size, mid, policy, limit)
        if ok:
            hi_ok = mid
        else:
            lo = max(mid, hint or 0)
            if lo >= hi_ok:
                lo = mid
    return hi_ok


# ----------------------------------------------------------------------------
# torch.compile in a fresh subprocess per setting
# ----------------------------------------------------------------------------
def compile_worker(args) -> None:
    import torch._functorch.config as fconfig
    import torch._dynamo.config as dconfig

    if args.cpu_limit:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (args.cpu_limit, args.cpu_limit + 5))
    if args.amb is not None:
        fconfig.activation_memory_budget = args.amb
    dconfig.allow_rnn = True  # otherwise nn.LSTM graph-breaks and runs eagerly
    budget = args.budget
    cfg = Config("compile", args.label, amb=args.amb, backend=args.backend, budget=budget)
    row = run_config(args.models[0], args.size, cfg, args.steps, None)
    print("@@ROW@@" + json.dumps(row))


def run_compile(name, size, label, amb, backend, steps, timeout, budget=None, cpu_limit=240) -> dict:
    cmd = [sys.executable, "-m", "bench.run", "--_compile-worker", "--models", name, "--size", size,
           "--steps", str(steps), "--label", label, "--backend", backend,
           "--threads", str(torch.get_num_threads()), "--cpu-limit", str(cpu_limit)]
    if amb is not None:
        cmd += ["--amb", str(amb)]
    if budget is not None:
        cmd += ["--budget", str(int(budget))]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return dict(model=name, method=label, kind="compile", amb=amb, status=f"timeout after {timeout} s",
                    losses=[])
    for line in p.stdout.splitlines():
        if line.startswith("@@ROW@@"):
            row = json.loads(line[7:])
            row["compile_wall_s"] = time.perf_counter() - t0
            return row
    if p.returncode in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU):
        return dict(model=name, method=label, kind="compile", amb=amb, losses=[],
                    status=f"gave up: compile + steps used more than {cpu_limit} CPU s")
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return dict(model=name, method=label, kind="compile", amb=amb, status="subprocess failed: " + " | ".join(tail)[:300],
                losses=[])


# ----------------------------------------------------------------------------
# Agreement, tables, plots
# ----------------------------------------------------------------------------
def agreement(row, ref: List[float]) -> str:
    losses = row.get("losses") or []
    if not losses:
        return "-"
    pairs = [(a, b) for a, b in zip(losses, ref) if a is not None and b is not None]
    if not pairs:
        return "-"
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in pairs]
    row["loss_max_rel_diff"] = max(diffs)
    if all(a == b for a, b in pairs):
        row["loss_agree"] = "exact"
    elif row["kind"] == "compile" and max(diffs) <= 1e-5:
        row["loss_agree"] = f"~{max(diffs):.0e}"
    elif row["kind"] == "ckpt" and max(diffs) <= 1e-5:
        row["loss_agree"] = f"~{max(diffs):.0e}"
    else:
        row["loss_agree"] = f"DIFF {max(diffs):.1e}"
    return row["loss_agree"]


def machine_info() -> str:
    import importlib

    lines = [f"- date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}; "
             f"torch threads {torch.get_num_threads()}",
             f"- python {platform.python_version()}, torch {torch.__version__}, dtr {dtr.__version__}"]
    try:
        importlib.import_module("dtr._C")
        lines.append("- dtr C++ core (dtr._C): present")
    except Exception:
        lines.append("- dtr C++ core (dtr._C): missing (pure-Python pool)")
    for mod in ("matplotlib", "tqdm"):
        try:
            lines.append(f"- {mod} {importlib.import_module(mod).__version__}")
        except Exception:
            pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        dirty = [d for d in ("dtr", "bench") if subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", d], capture_output=True, text=True,
            cwd=root).stdout.strip()]
        lines.append(f"- git HEAD {rev}" + (f" ({' and '.join(d + '/' for d in dirty)} "
                                            "had uncommitted edits)" if dirty else ""))
    except Exception:
        pass
    try:
        load = os.getloadavg()
        lines.append(f"- load average at start: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    except Exception:
        pass
    return "\n".join(lines)


def mib(x) -> str:
    return "-" if x is None else f"{x / MiB:.1f}"


def top_remats(r: dict, n: int = 3) -> str:
    by = sorted((r.get("remat_by_op") or {}).items(), key=lambda kv: -kv[1][1])[:n]
    return ", ".join(f"{k.replace('aten.', '').replace('.default', '')} {v[1]:.3f} s ({v[0]:.0f}x)"
                     for k, v in by) or "none"


def table(rows: List[dict], eager: dict) -> str:
    et = eager.get("step_s")
    ep = eager.get("measured_peak")
    head = ("| method | budget MiB (x eager peak) | measured peak MiB (x eager) | dtr accounting peak MiB | "
            "step cpu s (x eager) | wall s | evictions | remats | remat s | search s | losses | status |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    out = []
    for r in rows:
        b = r.get("budget_bytes")
        bud = "-" if not b else f"{mib(b)} ({b / ep:.2f})" if ep else mib(b)
        mp = r.get("measured_peak")
        mps = "-" if mp is None else f"{mib(mp)} ({mp / ep:.2f})" if ep else mib(mp)
        if b and mp and mp > b * (1 + SLACK):
            mps += " **over budget**"
        st = r.get("step_s")
        sts = "-" if st is None else f"{st:.3f} ({st / et:.2f}x)" if et else f"{st:.3f}"
        cpu = r.get("step_wall_s")

        def f(k, fmt="{:.0f}"):
            v = r.get(k)
            return "-" if v is None else fmt.format(v)

        out.append(f"| {r['method']} | {bud} | {mps} | {mib(r.get('dtr_peak_bytes'))} | {sts} | "
                   f"{'-' if cpu is None else f'{cpu:.3f}'} | {f('evictions')} | {f('rematerializations')} | "
                   f"{f('remat_seconds', '{:.3f}')} | {f('search_seconds', '{:.3f}')} | "
                   f"{r.get('loss_agree', '-')} | {r['status']}{' (' + r['note'] + ')' if r.get('note') else ''} |")
    return head + "\n".join(out) + "\n"


def plot_frontier(name, rows, eager, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    et, ep = eager["step_s"], eager["measured_peak"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([1.0], [1.0], marker="*", s=200, c="k", label="eager", zorder=5)
    colors = ["tab:blue", "tab:cyan", "tab:olive", "tab:orange", "tab:brown", "tab:pink"]
    policies = list(dict.fromkeys(r["policy"] for r in rows if r["kind"] == "dtr" and r.get("policy")))
    for pol, color in zip(policies, colors):
        pts = [(r["measured_peak"] / ep, r["step_s"] / et) for r in
               sorted(rows, key=lambda r: -(r.get("budget_bytes") or 0))
               if r["kind"] == "dtr" and r.get("policy") == pol and r["status"] == "ok"
               and r.get("budget_bytes") and "checkpoint's peak" not in r["method"]]
        if pts:
            ax.plot([p[1] for p in pts], [p[0] for p in pts], "o-", c=color, label=f"dtr ({pol})")
    markers = {"ckpt": ("s", "tab:green"), "compile": ("^", "tab:red"), "dtr": ("D", "tab:purple")}
    labelled = []  # (x, y) of the points labelled so far: nearby labels are stacked downwards
    for r in rows:
        special = r["kind"] == "dtr" and (not r.get("budget_bytes") or "checkpoint's peak" in r["method"])
        if r["kind"] in markers and r["status"] == "ok" and r.get("step_s") and (r["kind"] != "dtr" or special):
            m, c = markers[r["kind"]]
            x, y = r["step_s"] / et, r["measured_peak"] / ep
            ax.scatter([x], [y], marker=m, c=c, s=60)
            near = sum(1 for (u, v) in labelled if abs(u - x) < 0.25 * max(x, u) and abs(v - y) < 0.03)
            labelled.append((x, y))
            ax.annotate(r["method"].replace("checkpoint's peak", "ckpt peak"), (x, y), fontsize=7,
                        xytext=(4, 2 - 9 * near), textcoords="offset points")
    ax.scatter([], [], marker="s", c="tab:green", label="torch.utils.checkpoint")
    ax.scatter([], [], marker="^", c="tab:red", label="torch.compile")
    xs = [r["step_s"] / et for r in rows if r.get("step_s") and r["status"] == "ok"]
    if xs and max(xs) > 8:
        ax.set_xscale("log")
    ax.set_xlabel("step time / eager step time")
    ax.set_ylabel("measured peak / eager measured peak")
    ax.set_title(f"{name}: memory vs time (lower-left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(name, eager, drow, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r, lab, c in ((eager, "eager", "k"), (drow, f"dtr {drow['method']}", "tab:blue")):
        s = r.get("timeline")
        if s:
            ax.plot(range(len(s)), [v / MiB for v in s], c=c, lw=0.8, label=lab)
    if drow.get("budget_bytes"):
        ax.axhline(drow["budget_bytes"] / MiB, c="tab:red", ls="--", lw=1, label="budget")
    ax.set_xlabel("allocator event index within one training step (fwd + bwd + SGD step)")
    ax.set_ylabel("live bytes (MiB, incl. params/inputs)")
    ax.set_title(f"{name}: memory over one step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Per model
# ----------------------------------------------------------------------------
def bench_model(name, args, bar) -> List[dict]:
    size, steps = args.size, args.steps
    rows: List[dict] = []

    def add(row):
        rows.append(row)
        bar.update(1)
        bar.set_postfix_str(f"{name}: {row['method']} {row['status'][:30]}")
        return row

    eager = add(run_isolated(name, size, Config("eager", "eager"), steps, None, timeline=True))
    if eager["status"] != "ok":
        return rows
    ep, et = eager["measured_peak"], eager["step_s"]
    limit = max(10.0, 20 * et)
    ref = eager["losses"]

    statics = [Config("ckpt", "checkpoint per block", ckpt="block")]
    if M.SEQUENTIAL[name]:
        statics += [Config("ckpt", "checkpoint_sequential 2", ckpt="seq2"),
                    Config("ckpt", "checkpoint_sequential 4", ckpt="seq4")]
    ck_rows = [add(run_isolated(name, size, c, steps, limit)) for c in statics]

    add(run_isolated(name, size, Config("dtr", "dtr no limit", budget=None), steps, limit))

    for pol in args.policies:
        ok_min, fail_max = None, None
        for fr in args.fractions:
            b = int(ep * fr)
            if fail_max is not None:
                # A larger budget already failed (infeasible or too slow): lower ones would too.
                add(dict(model=name, method=f"dtr {pol} @{fr}", kind="dtr", policy=pol, fraction=fr,
                         budget_bytes=b, losses=[], status="skipped: a larger budget already failed"))
                continue
            r = add(run_isolated(name, size, Config("dtr", f"dtr {pol} @{fr}", budget=b, policy=pol,
                                                  fraction=fr), steps, limit,
                               timeline=(pol == args.policies[0] and fr == args.timeline_fraction)))
            if r["status"] == "ok":
                ok_min = b if ok_min is None else min(ok_min, b)
                if fr == 0.5 and pol == args.policies[0] and args.python_runtime:
                    # Issue 14: the C++ runtime at least as fast as the Python one here.
                    add(run_isolated(name, size, Config("dtr", f"dtr {pol} python runtime @{fr}", budget=b,
                                                        policy=pol, fraction=fr, runtime="python"),
                                     steps, limit))
            elif r["status"].startswith(("BudgetExceeded", "timeout")):
                fail_max = b if fail_max is None else max(fail_max, b)
        if args.smallest:
            sb = smallest_budget(name, size, pol, fail_max, ok_min, ep, limit)
            if sb is not None:
                # The memory timeline shows dtr at the smallest budget where 0.5 did not work.
                need_tl = pol == args.policies[0] and not any(r.get("timeline") for r in rows if r["kind"] == "dtr")
                add(run_smallest(name, size, pol, sb, ep, steps, limit, need_tl))
            else:
                add(dict(model=name, method=f"dtr {pol} smallest", kind="dtr", policy=pol,
                         status="no feasible budget found", losses=[]))
    # dtr at the peak per-block checkpoint reaches
    ck = next((r for r in ck_rows if r["method"] == "checkpoint per block" and r["status"] == "ok"), None)
    if ck is not None:
        for pol in (p for p in args.policies if p != "lru"):
            add(run_isolated(name, size, Config("dtr", f"dtr {pol} @checkpoint's peak", budget=ck["measured_peak"],
                                              policy=pol, fraction=round(ck["measured_peak"] / ep, 3)),
                             steps, limit))

    if not args.no_compile:
        if name == "treelstm":
            for amb in args.compile_budgets:
                add(dict(model=name, method=f"compile amb={amb}", kind="compile", amb=amb, losses=[],
                         status="skipped: the graph differs per input (a new tree each step), so Dynamo "
                                "recompiles every step and falls back to eager after its recompile limit"))
        else:
            for amb in args.compile_budgets:
                add(run_compile(name, size, f"compile amb={amb}", amb, "aot_eager", steps, args.compile_timeout,
                                cpu_limit=args.compile_cpu_limit))
        if dtr_compile_backend() is not None:
            r = run_compile(name, size, "compile backend=dtr @0.5", None, "dtr", steps, args.compile_timeout,
                            budget=int(0.5 * ep), cpu_limit=args.compile_cpu_limit)
            add(dict(r, fraction=0.5, backend="dtr", budget_bytes=int(0.5 * ep)))
        else:
            add(dict(model=name, method="compile backend=dtr", kind="compile", losses=[],
                     status="skipped: dtr.compile_backend does not exist"))
    for r in rows:
        agreement(r, ref)
    return rows


def summarize(name, rows) -> List[str]:
    """The target ratios for one model, as Markdown bullet lines."""
    by = {r["method"]: r for r in rows}
    eager = by.get("eager")
    if not eager or eager["status"] != "ok":
        return [f"- {name}: eager failed"]
    et, ep = eager["step_s"], eager["measured_peak"]
    out = []
    ok = [r for r in rows if r["status"] == "ok" and r.get("step_s")]

    def point(r):
        if r is None:
            return "none"
        return (f"{mib(r['measured_peak'])} MiB ({r['measured_peak'] / ep:.2f}x eager's peak, {r['method']}, "
                f"{r['step_s'] / et:.2f}x eager's time)")

    def lowest(rs):
        return min(rs, key=lambda r: r["measured_peak"], default=None)

    ck = by.get("checkpoint per block")
    for dk in (r for r in rows if r["method"].endswith("@checkpoint's peak")):
        if not (ck and ck["status"] == "ok"):
            break
        who = dk["method"].replace(" @checkpoint's peak", "")
        head = (f"- {name}: {who} at checkpoint-per-block's peak ({mib(ck['measured_peak'])} MiB, "
                f"{ck['measured_peak'] / ep:.2f}x eager's)")
        if dk["status"] == "ok":
            out.append(f"{head}: {dk['step_s'] / et:.2f}x eager vs checkpoint {ck['step_s'] / et:.2f}x eager "
                       f"(step {dk['step_s']:.3f} s vs {ck['step_s']:.3f} s; dtr/checkpoint = "
                       f"{dk['step_s'] / ck['step_s']:.2f}; dtr's measured peak {mib(dk['measured_peak'])} MiB)")
        else:
            out.append(f"{head}: {dk['status']}")
    fast = [r for r in ok if r["step_s"] <= 1.5 * et]
    statics = [r for r in ok if r["kind"] in ("ckpt", "compile") and not uses_dtr(r)]
    low_static = lowest(statics)
    line = (f"- {name}: lowest measured peak at <= 1.5x eager step time: dtr "
            f"{point(lowest(r for r in fast if uses_dtr(r)))} vs best static tool "
            f"{point(lowest(r for r in statics if r['step_s'] <= 1.5 * et))}")
    if low_static is not None and low_static["step_s"] > 1.5 * et:
        line += f" (lowest static peak at any step time: {point(low_static)})"
    out.append(line)
    nl = by.get("dtr no limit")
    book = nl["step_s"] - et if nl and nl["status"] == "ok" else None
    half = [r for r in rows if uses_dtr(r) and r["method"].endswith("@0.5")]
    for r in half:
        res = (f"{r['step_s'] / et:.2f}x eager step time, measured peak "
               f"{r['measured_peak'] / r['budget_bytes']:.3f}x budget" if r["status"] == "ok" else r["status"])
        if r["status"] == "ok" and r["kind"] == "dtr" and r.get("remat_seconds") is not None:
            res += (f"; of its {r['step_s'] - et:.3f} s over eager, recomputation takes "
                    f"{r['remat_seconds']:.3f} s (most: {top_remats(r)})")
            if book is not None:
                res += f"; bookkeeping is about {book:.3f} s (no-limit step - eager step)"
        out.append(f"- {name}: at 0.5 of eager's peak: {r['method']}: {res}")
    if not half:
        out.append(f"- {name}: at 0.5 of eager's peak: not run")
    for py in (r for r in half if r.get("runtime") == "python" and r["status"] == "ok"):
        cpp = by.get(py["method"].replace(" python runtime", ""))
        if cpp and cpp["status"] == "ok":
            out.append(f"- {name}: at 0.5, C++ runtime / Python runtime step time = "
                       f"{cpp['step_s'] / py['step_s']:.2f} (measured peaks {mib(cpp['measured_peak'])} / "
                       f"{mib(py['measured_peak'])} MiB)")
    over = [r["method"] for r in ok if r.get("budget_bytes") and uses_dtr(r)
            and r["measured_peak"] > r["budget_bytes"] * (1 + SLACK)]
    out.append(f"- {name}: dtr rows whose measured peak exceeds budget+{SLACK:.0%}: "
               + (", ".join(over) if over else "none"))
    if nl and nl["status"] == "ok":
        out.append(f"- {name}: dtr with no limit (bookkeeping only): {nl['step_s'] / et:.2f}x eager; "
                   f"bookkeeping overhead (no-limit step - eager step) / no-limit step = "
                   f"{max(0.0, 1 - et / nl['step_s']):.0%} ({nl.get('ops', 0):.0f} ops per step)")
    bad = [r["method"] for r in rows if str(r.get("loss_agree", "")).startswith("DIFF")]
    if bad:
        out.append(f"- {name}: losses DISAGREE with eager: {', '.join(bad)}")
    return out


def default_out(quick: bool) -> str:
    """bench/results/, or for a quick run bench/results/quick/ (git-ignored): a quick
    run must not overwrite the committed full-run results and plots."""
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    return os.path.join(results, "quick") if quick else results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small model, three budgets (< 2 min)")
    p.add_argument("--models", nargs="+", default=None, choices=M.MODELS)
    p.add_argument("--size", default=None, choices=sorted(M.SIZES))
    p.add_argument("--out", default=None,
                   help="results folder (default bench/results/, or bench/results/quick/ with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (median)")
    p.add_argument("--policies", nargs="+", default=None,
                   help="eviction policies to run (default: POLICIES; --quick: the default policy)")
    p.add_argument("--fractions", nargs="+", type=float, default=None,
                   help="budgets as fractions of eager's measured peak")
    p.add_argument("--no-smallest", dest="smallest", action="store_false", default=None,
                   help="skip the search for each policy's smallest feasible budget")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-python-runtime", dest="python_runtime", action="store_false",
                   help="skip the row of the first policy at 0.5 on the Python runtime")
    p.add_argument("--compile-timeout", type=int, default=1200, help="wall seconds per compile subprocess")
    p.add_argument("--compile-cpu-limit", type=int, default=240, help="CPU seconds per compile subprocess")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: CPU time is then robust to other jobs)")
    # internal: the compile worker
    p.add_argument("--_compile-worker", dest="compile_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="compile", help=argparse.SUPPRESS)
    p.add_argument("--amb", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="aot_eager", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu-limit", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_worker:
        args.size = args.size or "full"
        args.steps = args.steps or 3
        return compile_worker(args)

    from tqdm import tqdm

    if args.quick:
        args.models = args.models or ["gpt"]
        args.size = args.size or "quick"
        args.steps = args.steps or 2
        args.fractions = args.fractions or [0.6, 0.5, 0.4]
        args.policies = args.policies or [DEFAULT_POLICY]
        args.compile_budgets = [0.5]
        args.smallest = False if args.smallest is None else args.smallest
        args.timeline_fraction = 0.4
        args.python_runtime = False
    else:
        args.models = args.models or M.MODELS
        args.size = args.size or "full"
        args.steps = args.steps or 3
        args.fractions = args.fractions or FRACTIONS
        args.policies = args.policies or POLICIES
        args.compile_budgets = COMPILE_BUDGETS
        args.smallest = True if args.smallest is None else args.smallest
        args.timeline_fraction = 0.5
    out = args.out or default_out(args.quick)
    os.makedirs(out, exist_ok=True)

    per = 1 + 3 + 1 + len(args.policies) * (len(args.fractions) + int(args.smallest)) + 1 \
        + int(args.python_runtime) \
        + (0 if args.no_compile else len(args.compile_budgets) + 1)
    t_start = time.time()
    info = machine_info()
    all_rows: Dict[str, List[dict]] = {}
    with tqdm(total=per * len(args.models), desc="bench", unit="run") as bar:
        for name in args.models:
            rows = bench_model(name, args, bar)
            all_rows[name] = rows
            write_outputs(out, args, info, all_rows, argv, t_start)
    print(f"results in {out}")
    return all_rows


def write_outputs(out, args, info, all_rows, argv, t_start):
    cmd = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# dtr against the alternatives ({'quick' if args.quick else 'full'} run)", "",
          f"Command: `{cmd.strip()}` (took {(time.time() - t_start) / 60:.1f} min)", "", info, "",
          "Budgets are fractions of eager's measured peak. *Measured peak* = bytes resident when the step "
          "starts (parameters, buffers, inputs) + the peak the torch profiler's allocator events show "
          "above that during one full step (fwd + bwd + SGD step), via `dtr.measure.peak_memory`. "
          "*dtr accounting peak* is `session.stats.peak_bytes` (dtr's own count), shown beside it, "
          "never instead. Step time: median process CPU time of the timed steps, with one torch "
          "thread (the machine is shared with other jobs, which makes wall time noisy; median wall "
          "time is shown beside it). "
          "Losses: every step's loss compared with eager's (`exact` = bit-equal).", ""]
    summary = []
    for name, rows in all_rows.items():
        eager = next((r for r in rows if r["method"] == "eager"), {})
        md += [f"## {name}", "", f"Model: {M.describe(name, args.size)}; eager step "
               f"{eager.get('step_s', float('nan')):.3f} s, measured peak {mib(eager.get('measured_peak'))} MiB "
               f"(of which resident at start {mib(eager.get('base_bytes'))} MiB).", ""]
        if eager.get("status") == "ok":
            md.append(table(rows, eager))
            try:
                plot_frontier(name, rows, eager, os.path.join(out, f"frontier_{name}.png"))
                md.append(f"![frontier](frontier_{name}.png)\n")
                drow = next((r for r in rows if r.get("timeline") and r["kind"] == "dtr"), None)
                if drow is not None:
                    plot_timeline(name, eager, drow, os.path.join(out, f"timeline_{name}.png"))
                    md.append(f"![timeline](timeline_{name}.png)\n")
            except Exception as e:  # plots are secondary
                md.append(f"(plot failed: {e})\n")
        else:
            md.append(f"eager failed: {eager.get('status')}\n")
        fails = [r for r in rows if r.get("traceback")]
        for r in fails:
            md += [f"<details><summary>{r['method']}: {r['status'][:80]}</summary>", "", "```",
                   r["traceback"][-3000:], "```", "</details>", ""]
        summary += summarize(name, rows)
    md[8:8] = ["## Summary", ""] + summary + [""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md))
    slim = {k: [{kk: vv for kk, vv in r.items() if kk != "timeline"} for r in v] for k, v in all_rows.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(command=cmd, machine=info, rows=slim), f, indent=1)


if __name__ == "__main__":
    main()
