"""Where the time dtr adds to a TreeLSTM step goes, by perf's clock sampling.

    python -m bench.step_profile                         # writes bench/results/step_profile.md
    python -m bench.step_profile --baseline ../old-checkout --rounds 2

bench.instruction_count and bench.cache_misses count instructions and simulated
cache misses under valgrind; neither gives time, and on the TreeLSTM the C++
runtime's instructions run at about half eager's rate (memory stalls). This
samples time instead: ``perf record -e cpu-clock``, a software clock, so it works
on virtual machines without hardware counters. Each run is a fresh process with
the bench's full-size TreeLSTM (one torch thread, no limit); sampling is switched
on only around the measured steps (perf's ``--control`` fifo), so import, the
first block and warm-up do not count. The runs alternate within each round:
eager, this checkout's C++ runtime, and ``--baseline``'s when given.

The report gives each run's step time, samples per step by shared object and the
symbols whose samples per step grew most over eager's. A sample lands on the
instruction after a stall as often as on the stalled one, so read symbols, not
lines. Needs ``perf`` (linux-tools) allowed to sample its own processes
(kernel.perf_event_paranoid at most 2).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench import require_tools, write_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARM_UP = 3
_ROW = re.compile(r"^\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$")


def worker(mode: str, steps: int, tree: str, ctl: str, ack: str) -> None:
    sys.path.insert(0, tree)  # the checkout being profiled, which may lack this script
    import contextlib
    import time

    import torch

    import dtr
    from bench import models

    if not os.path.abspath(dtr.__file__).startswith(os.path.abspath(tree) + os.sep):
        raise SystemExit(f"bench.step_profile: imported dtr from {dtr.__file__}, not from {tree}")
    torch.set_num_threads(1)
    model, batch_fn = models.build("treelstm", "full")
    model.train()
    batch = batch_fn(1)

    def block():
        return dtr.budget(None, runtime="cpp") if mode == "cpp" else contextlib.nullcontext()

    def step():
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        with block():
            model(*batch).backward()

    def perf(command: str) -> None:
        with open(ctl, "w") as f:
            f.write(command + "\n")
        with open(ack) as f:
            f.read(5)

    for _ in range(WARM_UP):
        step()
    perf("enable")
    t0 = time.process_time()
    for _ in range(steps):
        step()
    seconds = (time.process_time() - t0) / steps
    perf("disable")
    print(json.dumps({"step_s": seconds}))


def profile(mode: str, tree: str, steps: int, freq: int) -> dict:
    """One perf run: step time, and samples per step by (object, symbol)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctl, ack, data = (os.path.join(tmp, n) for n in ("ctl", "ack", "perf.data"))
        os.mkfifo(ctl)
        os.mkfifo(ack)
        run = subprocess.run(
            ["perf", "record", "-e", "cpu-clock", "-F", str(freq), "-D", "-1",
             "--control", f"fifo:{ctl},{ack}", "-o", data, "--",
             sys.executable, "-m", "bench.step_profile", "--worker", mode, str(steps), tree, ctl, ack],
            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=tree))
        if run.returncode != 0:
            raise SystemExit(f"bench.step_profile: the {mode} run failed:\n{run.stderr[-3000:]}")
        step_s = json.loads(run.stdout.strip().splitlines()[-1])["step_s"]
        report = subprocess.run(["perf", "report", "-i", data, "--sort", "dso,sym", "--stdio", "-n",
                                 "--percent-limit", "0"], capture_output=True, text=True, check=True)
    return {"step_s": step_s, "samples": parse_report(report.stdout, steps)}


def parse_report(text: str, steps: int) -> collections.Counter:
    """Samples per step by (shared object, symbol), from ``perf report --sort dso,sym -n --stdio``."""
    samples = collections.Counter()
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            samples[(m.group(2), m.group(4))] += int(m.group(1)) / steps
    return samples


def _by_object(samples: collections.Counter) -> collections.Counter:
    out = collections.Counter()
    for (dso, _), n in samples.items():
        out[dso] += n
    return out


def _mean(runs: list) -> collections.Counter:
    total = collections.Counter()
    for r in runs:
        total.update(r["samples"])
    return collections.Counter({k: v / len(runs) for k, v in total.items()})


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        mode, steps, tree, ctl, ack = argv[1:6]
        worker(mode, int(steps), tree, ctl, ack)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="another checkout, with its extension built, profiled too")
    p.add_argument("--steps", type=int, default=30, help="measured steps per run")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--freq", type=int, default=4000, help="samples per second")
    p.add_argument("--top", type=int, default=25, help="symbols listed")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "step_profile.md"))
    args = p.parse_args(argv)
    require_tools("bench.step_profile", "perf", install="apt install linux-tools-generic")
    variants = [("eager", "eager", ROOT), ("this checkout", "cpp", ROOT)]
    if args.baseline:
        variants.append(("baseline", "cpp", os.path.abspath(args.baseline)))
    runs = {label: [] for label, _, _ in variants}
    for r in range(args.rounds):
        for label, mode, tree in variants:
            runs[label].append(profile(mode, tree, args.steps, args.freq))
            print(f"round {r + 1}: {label} {runs[label][-1]['step_s'] * 1e3:.1f} ms per step", flush=True)
    mean = {label: _mean(rs) for label, rs in runs.items()}
    labels = list(runs)
    per_s = args.freq
    lines = ["# Where dtr's added time goes in a TreeLSTM step (perf clock samples)", "",
             f"Command: `python -m bench.step_profile{' ' + ' '.join(argv) if argv else ''}`; "
             f"full-size TreeLSTM, one torch thread, no limit; {args.steps} measured steps per run after "
             f"{WARM_UP} warm-up steps, {args.rounds} round(s), {per_s} samples per second of CPU time "
             "(cpu-clock). Samples are per step, the mean over rounds.", "",
             "## Step time (process CPU time), each round", "",
             "| round | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for r in range(args.rounds):
        eager = runs["eager"][r]["step_s"]
        cells = [f"{runs[l][r]['step_s'] * 1e3:.1f} ms ({runs[l][r]['step_s'] / eager:.2f}x)" for l in labels]
        lines.append(f"| {r + 1} | " + " | ".join(cells) + " |")
    objects = {label: _by_object(m) for label, m in mean.items()}
    keys = sorted(set().union(*objects.values()), key=lambda k: -objects[labels[1]].get(k, 0))
    lines += ["", "## Samples per step by shared object", "",
              "| object | " + " | ".join(labels) + " | added by this checkout |", "|---|" + "---|" * (len(labels) + 1)]
    lines.append("| all | " + " | ".join(f"{sum(objects[l].values()):.1f}" for l in labels)
                 + f" | {sum(objects[labels[1]].values()) - sum(objects['eager'].values()):+.1f} |")
    for k in keys:
        if max(objects[l].get(k, 0) for l in labels) < 0.5:
            continue
        lines.append(f"| {k} | " + " | ".join(f"{objects[l].get(k, 0):.1f}" for l in labels)
                     + f" | {objects[labels[1]].get(k, 0) - objects['eager'].get(k, 0):+.1f} |")
    grown = sorted(set(mean[labels[1]]) | set(mean["eager"]),
                   key=lambda k: -(mean[labels[1]].get(k, 0) - mean["eager"].get(k, 0)))[:args.top]
    lines += ["", f"## The {args.top} symbols whose samples per step grew most over eager's", "",
              "| object | symbol | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for dso, sym in grown:
        lines.append(f"| {dso} | `{sym[:90]}` | "
                     + " | ".join(f"{mean[l].get((dso, sym), 0):.1f}" for l in labels) + " |")
    write_report(args.out, "\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
