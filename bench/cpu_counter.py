"""The cost of dtr's counting CPU allocator on eager code (Note [Counting CPU allocator]).

Importing dtr installs a CPU allocator that counts live tensor bytes. This times
plain eager PyTorch (no dtr block) with it and with c10's default allocator, in
one process, switching between the two (``dtr._C._meter_set_counting``) every
few milliseconds, so that the load of a shared machine falls on both alike:

- ``add 16x16``: ``a + b`` on 16x16 floats, one 1 KiB allocation and free per op
  and almost nothing else: the worst case;
- ``empty 256``: ``torch.empty(256)``, an allocation and a free and nothing else;
- ``MLP step``: forward, backward and Adam on a 4-layer MLP, batch 64;
- ``CNN step``: the same on a small convolutional network, batch 16 at 32x32.

For each workload, each round times a slice with the counter and a slice
without (in alternating order); the reported ratio is the median over rounds of
(time with / time without), with the 10th-90th percentile range of that ratio.

    python bench/cpu_counter.py [--rounds 200] [--out bench/results/cpu_counter.json]

Writes the JSON and a Markdown table next to it (cpu_counter.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import dtr  # noqa: E402


def _workloads():
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.Adam(mlp.parameters())
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))

    def mlp_step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()

    cnn = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    copt = torch.optim.Adam(cnn.parameters())
    xc, yc = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def cnn_step():
        copt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(cnn(xc), yc).backward()
        copt.step()

    # (name, function, calls per timed slice)
    return [("add 16x16", lambda: a + b, 2000), ("empty 256", lambda: torch.empty(256), 2000),
            ("MLP step", mlp_step, 3), ("CNN step", cnn_step, 1)]


def _slice(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_counter.json"))
    args = p.parse_args(argv)
    C = dtr._ext._C
    if C is None or not dtr.device_memory.cpu_counter_installed():
        print("the counting CPU allocator is not installed (dtr._C missing or DTR_CPU_COUNTER=0)")
        return 1
    torch.set_num_threads(1)
    rows = []
    try:
        for name, fn, n in _workloads():
            for on in (True, False):  # warm both paths
                C._meter_set_counting(on)
                _slice(fn, n)
            ratios, ons, offs = [], [], []
            for r in range(args.rounds):
                t = {}
                for on in ((True, False) if r % 2 == 0 else (False, True)):
                    C._meter_set_counting(on)
                    t[on] = _slice(fn, n)
                ons.append(t[True])
                offs.append(t[False])
                ratios.append(t[True] / t[False])
            qs = statistics.quantiles(ratios, n=10)
            rows.append(dict(workload=name, calls_per_slice=n, counter_on_s=statistics.median(ons),
                             counter_off_s=statistics.median(offs), ratio=statistics.median(ratios),
                             ratio_p10=qs[0], ratio_p90=qs[-1]))
            print(rows[-1], flush=True)
    finally:
        C._meter_set_counting(True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    result = dict(rounds=args.rounds, torch=torch.__version__, load_at_end=load, rows=rows,
                  note="one process, counter switched on and off between slices, 1 thread; "
                       "ratio = median over rounds of (with / without)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    md = ["| workload | without the counter | with it | with / without (median) | 10th-90th percentile |",
          "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['workload']} | {r['counter_off_s'] * 1e6:.2f} us | {r['counter_on_s'] * 1e6:.2f} us | "
                  f"{r['ratio']:.3f} | {r['ratio_p10']:.3f}-{r['ratio_p90']:.3f} |")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"Counting CPU allocator on eager code: `python bench/cpu_counter.py`, {args.rounds} "
                f"rounds, torch {torch.__version__}, 1 thread, load average {load} at the end "
                "(shared 2-core machine).\n\n" + "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
