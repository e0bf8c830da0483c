"""`python -m dtr demo`: train a small model eagerly and under a budget, side by side."""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import dtr
from dtr.measure import peak_memory
from dtr.policies import DEFAULT_POLICY


class _Net(nn.Module):
    """A small residual CNN with BatchNorm, in-place ReLU and dropout."""

    def __init__(self, c=32, blocks=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                          nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
            for _ in range(blocks))
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(c, 10)

    def forward(self, x, y):
        h = self.stem(x)
        for b in self.blocks:
            h = F.relu(h + b(h))
        return F.cross_entropy(self.head(self.drop(h.mean(dim=(2, 3)))), y)


def _train(ctx_factory, steps, seed=0):
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(steps)]
    losses, times, peaks, stats, bases = [], [], [], [], []
    for x, y in data:
        def step():
            opt.zero_grad(set_to_none=True)
            with ctx_factory() as s:
                loss = model(x, y)
                loss.backward()
            opt.step()
            return loss, s
        # The budget bounds all CPU tensor memory: what is in use as the step starts
        # (parameters, Adam's state, the data) plus the profiler's peak above it.
        bases.append(dtr.device_memory.cpu_tensor_bytes())
        t0 = time.perf_counter()
        (loss, s), peak = peak_memory(step)
        times.append(time.perf_counter() - t0)
        peaks.append(bases[-1] + peak)
        losses.append(loss.item())
        stats.append(s.stats if s is not None else None)
    return losses, times, peaks, stats, bases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtr demo", description=__doc__)
    p.add_argument("--fraction", type=float, default=0.5,
                   help="room left for the step, as a fraction of eager's peak above the memory "
                        "in use at the step's start (default 0.5)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--policy", default=DEFAULT_POLICY)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    e_losses, e_times, e_peaks, _, e_bases = _train(contextlib.nullcontext, args.steps)
    eager_peak = max(e_peaks)
    # The budget bounds all CPU tensor memory (parameters, gradients, Adam's state, data):
    # the most in use at a step's start, plus a fraction of eager's peak above it.
    resident = max(e_bases)
    budget = resident + int(args.fraction * max(p - b for p, b in zip(e_peaks, e_bases)))
    d_losses, d_times, d_peaks, d_stats, _ = _train(
        lambda: dtr.budget(budget, policy=args.policy), args.steps)

    exact = e_losses == d_losses
    print(f"dtr demo: residual CNN, {args.steps} Adam steps, batch 16x3x32x32, policy {args.policy}")
    print(f"  budget: dtr.budget({budget}), {budget / 2**20:.2f} MiB: the {resident / 2**20:.2f} MiB "
          f"in use at a step's start + {args.fraction:.2f} x eager's peak above it")
    print(f"  {'':22s}{'eager':>12s}{'dtr':>12s}")
    print(f"  {'peak memory (MiB)':22s}{eager_peak / 2**20:12.2f}{max(d_peaks) / 2**20:12.2f}"
          f"   (all CPU tensor memory; dtr's is {max(d_peaks) / budget:.3f} x its budget)")
    e_t, d_t = statistics.median(e_times[1:] or e_times), statistics.median(d_times[1:] or d_times)
    print(f"  {'step time (s)':22s}{e_t:12.3f}{d_t:12.3f}   ({d_t / e_t:.2f}x)")
    ev = sum(s.evictions for s in d_stats)
    rm = sum(s.rematerializations for s in d_stats)
    print(f"  evictions {ev}, recomputations {rm}, "
          f"losses bit-identical to eager: {'yes' if exact else 'NO'}")
    return 0 if exact else 1
