"""What intercepting every op in Python costs before dtr does anything.

    python -m bench.dispatch_floor              # writes bench/results/dispatch_floor.md
    python -m bench.dispatch_floor --size quick --models gpt --out /tmp/floor.md

For each benchmark model, one training step (forward and backward, no optimizer)
three ways, in one process, interleaved, median process CPU time of ``--reps``
rounds with one torch thread:

- eager;
- a *do-nothing* wrapper: a ``TorchDispatchMode`` whose outputs are
  ``_make_wrapper_subclass`` tensors holding the real ones, unwrapped before each
  op (what any ``__torch_dispatch__`` wrapper subclass pays: the Python call per
  op, the wrapper objects, autograd over them);
- dtr with no limit on the Python runtime (``dtr.budget(None, runtime="python")``):
  that plus dtr's bookkeeping;
- dtr with no limit on the C++ runtime (``runtime="cpp"``, when ``dtr._C`` is built):
  a C++ wrapper ``TensorImpl`` and a boxed fallback, no Python per op.

The gap between the do-nothing wrapper and the Python runtime is what dtr's own per-op
work costs in Python; the do-nothing wrapper's own gap is the floor of doing anything
in Python at the dispatch level, which the C++ runtime does not pay (see
docs/performance.md).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import dtr
from bench import models as M


class _Wrapped(torch.Tensor):
    """A wrapper subclass that only carries the real tensor."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, value: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls, value.size(), strides=value.stride(), storage_offset=value.storage_offset(),
            dtype=value.dtype, layout=value.layout, device=value.device, requires_grad=False)
        r.value = value
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs)


def _unwrap(x):
    return x.value if type(x) is _Wrapped else x


def _wrap(x):
    return _Wrapped(x) if isinstance(x, torch.Tensor) else x


def _run(func, args, kwargs):
    args, kwargs = tree_map(_unwrap, (args, kwargs or {}))
    out = func(*args, **kwargs)
    if func._schema.is_mutable or not torch.is_grad_enabled():
        return out  # in place (written into the real tensors) or no autograd: as is
    return tree_map(_wrap, out)


class DoNothingMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs)


def measure(name: str, size: str, reps: int) -> dict:
    model, batch_fn = M.build(name, size)
    model.train()
    batch = batch_fn(1)
    ctxs = {
        "eager": contextlib.nullcontext,
        "do-nothing wrapper": DoNothingMode,
        "dtr no limit": lambda: dtr.budget(None, runtime="python"),
    }
    if dtr._ext.available():
        ctxs["dtr C++ no limit"] = lambda: dtr.budget(None, runtime="cpp")

    def step(ctx):
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        with ctx():
            loss = model(*batch)
            loss.backward()

    times = {k: [] for k in ctxs}
    for k, c in ctxs.items():  # warm-up: caches, dtr's per-(op, shapes) learning
        step(c)
    for _ in range(reps):
        for k, c in ctxs.items():
            t0 = time.process_time()
            step(c)
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=M.MODELS, choices=M.MODELS)
    p.add_argument("--size", default="full", choices=["full", "quick"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "dispatch_floor.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cpp = dtr._ext.available()
    lines = ["# The cost of intercepting every op in Python, and on the C++ runtime", "",
             f"Command: `python -m bench.dispatch_floor{' ' + ' '.join(argv) if argv else ''}`; "
             f"torch {torch.__version__}, one torch thread, median process CPU time of {args.reps} "
             "interleaved rounds of one forward + backward step.", "",
             "| model | eager s | do-nothing Python wrapper (x eager) | dtr Python runtime (x eager) | "
             "dtr's own share of its Python step |" + (" dtr C++ runtime (x eager) |" if cpp else ""),
             "|---|---|---|---|---|" + ("---|" if cpp else "")]
    for name in args.models:
        t = measure(name, args.size, args.reps)
        e, w, d = t["eager"], t["do-nothing wrapper"], t["dtr no limit"]
        lines.append(f"| {name} | {e:.3f} | {w:.3f} ({w / e:.2f}x) | {d:.3f} ({d / e:.2f}x) | "
                     f"{max(0.0, (d - w) / d):.0%} |" +
                     (f" {t['dtr C++ no limit']:.3f} ({t['dtr C++ no limit'] / e:.2f}x) |" if cpp else ""))
        print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
