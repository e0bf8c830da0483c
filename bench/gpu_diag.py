"""Where a CUDA step's allocator count and dtr's own count part (diagnostic).

    python bench/gpu_diag.py     # on a GPU; prints, per model and budget, the largest gap

After every op of one dtr step (after a warm-up step) it compares
torch.cuda.memory_allocated (what max_memory_allocated peaks) with dtr's count
(pool + counted plain tensors), and at the largest gap sums, over the
allocator's active blocks, block size minus requested size: the bytes the
caching allocator hands out beyond what was asked for.
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import dtr  # noqa: E402
from bench import models as bench_models  # noqa: E402
from bench.gpu_check import to_device  # noqa: E402
from bench.run import resident_base  # noqa: E402
from dtr import runtime as rt  # noqa: E402

MiB = 1 << 20


def block_slack():
    slack = requested = 0
    for seg in torch.cuda.memory_snapshot():
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                slack += b["size"] - b.get("requested_size", b["size"])
                requested += b.get("requested_size", b["size"])
    return slack, requested


def main():
    dev = torch.device("cuda")
    for name, frac in (("resnet", 0.7), ("gpt", 0.5)):
        model, batch_fn = bench_models.build(name, "full")
        model = model.to(dev)
        batches = [to_device(batch_fn(i), dev) for i in range(2)]
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = model(*batches[0]); loss.backward(); del loss
        model.zero_grad(set_to_none=True)
        eager_peak = torch.cuda.max_memory_allocated() - base + resident_base(model, batches[0])
        budget = int(frac * eager_peak)
        orig = rt.Runtime._dispatch
        worst = {"gap": -1 << 62}

        def patched(self, func, info, targs, tkwargs, tensors, _orig=orig):
            out = _orig(self, func, info, targs, tkwargs, tensors)
            actual = torch.cuda.memory_allocated() - base0 + resident
            gap = actual - self.tracked_bytes
            if gap > worst["gap"]:
                worst.update(gap=gap, op=str(func), tracked=self.tracked_bytes, actual=actual,
                             slack=block_slack())
            return out

        for i, b in enumerate(batches):
            resident = resident_base(model, b)
            torch.cuda.synchronize()
            base0 = torch.cuda.memory_allocated()
            if i == 1:
                rt.Runtime._dispatch = patched
            torch.cuda.reset_peak_memory_stats()
            with dtr.budget(budget, device=dev) as s:
                loss = model(*b)
                loss.backward()
                del loss
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base0 + resident
            rt.Runtime._dispatch = orig
            opt.step()
            model.zero_grad(set_to_none=True)
            print(f"{name} step {i}: budget {budget / MiB:.1f} MiB, measured peak / budget "
                  f"{peak / budget:.3f}, dtr peak / budget {s.stats.peak_bytes / budget:.3f}", flush=True)
        sl, req = worst["slack"]
        print(f"{name}: largest gap allocator - dtr {worst['gap'] / MiB:.2f} MiB after {worst['op']} "
              f"(allocator {worst['actual'] / MiB:.1f}, dtr {worst['tracked'] / MiB:.1f}); then active "
              f"blocks held {sl / MiB:.2f} MiB beyond the {req / MiB:.1f} MiB requested", flush=True)


if __name__ == "__main__":
    main()
