"""The cost of dtr's counting CPU allocator on eager code (Note [Counting CPU allocator]).

Importing dtr installs a CPU allocator that counts live tensor bytes. This times
plain eager PyTorch (no dtr block) with it installed and without it
(DTR_CPU_COUNTER=0, dtr imported all the same), in fresh worker processes that
alternate, and reports the ratio of the medians:

- ``add 16x16``: ``a + b`` on 16x16 floats, one 1 KiB allocation and free per op,
  the worst case (the op does almost nothing else);
- ``MLP step``: forward, backward and Adam on a 4-layer MLP, batch 64;
- ``CNN step``: the same on a small convolutional network, batch 16 at 32x32.

    python bench/cpu_counter.py [--rounds 6] [--out bench/results/cpu_counter.json]

Writes the JSON and a Markdown table next to it (cpu_counter.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _worker() -> dict:
    import torch
    import torch.nn as nn

    import dtr

    torch.set_num_threads(1)
    out = {"counter": dtr.device_memory.cpu_counter_installed()}

    def best_of(fn, reps, inner):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
        return min(times)

    a, b = torch.randn(16, 16), torch.randn(16, 16)
    out["add 16x16"] = best_of(lambda: a + b, 7, 20000)

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.Adam(mlp.parameters())
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))

    def mlp_step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()

    out["MLP step"] = best_of(mlp_step, 7, 20)

    cnn = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    copt = torch.optim.Adam(cnn.parameters())
    xc, yc = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def cnn_step():
        copt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(cnn(xc), yc).backward()
        copt.step()

    out["CNN step"] = best_of(cnn_step, 5, 5)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_counter.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker()))
        return 0
    runs = {"on": [], "off": []}
    env_base = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for r in range(args.rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            env = dict(env_base, DTR_CPU_COUNTER="1" if mode == "on" else "0")
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"],
                                 capture_output=True, text=True, env=env, check=True, cwd=ROOT)
            got = json.loads(res.stdout.strip().splitlines()[-1])
            assert got.pop("counter") == (mode == "on"), f"worker {mode}: counter state wrong"
            runs[mode].append(got)
            print(mode, {k: f"{v * 1e6:.2f} us" for k, v in got.items()}, flush=True)
    rows = []
    for name in runs["on"][0]:
        on = statistics.median(x[name] for x in runs["on"])
        off = statistics.median(x[name] for x in runs["off"])
        rows.append(dict(workload=name, counter_on_s=on, counter_off_s=off, ratio=on / off))
    import torch

    result = dict(rounds=args.rounds, torch=torch.__version__, rows=rows,
                  note="median over rounds of each worker's best time; workers alternate; 1 thread")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    md = ["| workload | counter off | counter on | on / off |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['workload']} | {r['counter_off_s'] * 1e6:.2f} us | "
                  f"{r['counter_on_s'] * 1e6:.2f} us | {r['ratio']:.3f} |")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"Counting CPU allocator on eager code, {args.rounds} alternating rounds "
                f"(bench/cpu_counter.py, torch {torch.__version__}, 1 thread).\n\n" + "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
