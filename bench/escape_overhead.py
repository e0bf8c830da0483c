"""What the escape methods cost plain tensors (Note [Escapes of C++ wrappers] in csrc/escapes.h).

    python -m bench.escape_overhead            # writes bench/results/escape_overhead.md

The C++ runtime replaces a few torch.Tensor methods (tolist, numpy, data_ptr,
untyped_storage, __dlpack__, __repr__, __reduce_ex__, __deepcopy__) with descriptors
that test the dtr key and call torch's own method for any other tensor. This times
each on plain tensors with torch's methods and with the replacements, interleaved in
one process (one torch thread, best of ``--reps`` rounds of ``--number`` calls), and
the escapes of a C++ wrapper for reference. Only ratios of one run are quoted.
"""
from __future__ import annotations

import argparse
import copy
import os
import pickle
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch

import dtr
from bench import write_report
from dtr import tensor as T

SMALL = torch.randn(4)
SCALAR = torch.tensor(1.5)

CALLS = {
    "t.data_ptr()": lambda t: t.data_ptr(),
    "t.tolist()": lambda t: t.tolist(),
    "t.numpy()": lambda t: t.numpy(),
    "t.untyped_storage()": lambda t: t.untyped_storage(),
    "repr(t)": repr,
    "pickle.dumps(t)": pickle.dumps,
    "copy.deepcopy(t)": copy.deepcopy,
}


def _time(fn, t, number):
    start = time.perf_counter()
    for _ in range(number):
        fn(t)
    return (time.perf_counter() - start) / number


def _set(methods):
    for name, m in methods.items():
        setattr(torch.Tensor, name, m)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--number", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "escape_overhead.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with dtr.budget(None, runtime="cpp"):
        wrapped = torch.randn(4) * 2  # also installs the replacements
    replaced = {name: torch.Tensor.__dict__[name] for name in T.TORCH_METHODS}
    best = {}
    for _ in range(args.reps):
        for variant, methods in (("torch", T.TORCH_METHODS), ("dtr", replaced)):
            _set(methods)
            for call, fn in CALLS.items():
                for tname, t in (("4 floats", SMALL), ("0-dim", SCALAR)):
                    key = (call, tname, variant)
                    best[key] = min(best.get(key, float("inf")), _time(fn, t, args.number))
    _set(replaced)
    wrapper = {call: min(_time(fn, wrapped, args.number) for _ in range(3))
               for call, fn in CALLS.items()}
    lines = [
        "# What the escape methods cost plain tensors",
        "",
        f"Command: `python -m bench.escape_overhead --reps {args.reps} --number {args.number}`; "
        f"torch {torch.__version__}, one torch thread, best of {args.reps} interleaved rounds of "
        f"{args.number} calls.",
        "",
        "| call | tensor | torch's method, ns | dtr's replacement, ns | added, ns | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for call in CALLS:
        for tname in ("4 floats", "0-dim"):
            a, b = best[(call, tname, "torch")], best[(call, tname, "dtr")]
            lines.append(f"| `{call}` | {tname} | {a * 1e9:.0f} | {b * 1e9:.0f} | "
                         f"{(b - a) * 1e9:+.0f} | {b / a:.3f} |")
    lines += ["", "The same calls on a C++ wrapper of 4 floats (an escape: materialize, pin, "
              "then torch's method on the value):", "", "| call | ns |", "|---|---|"]
    lines += [f"| `{call}` | {v * 1e9:.0f} |" for call, v in wrapper.items()]
    text = "\n".join(lines) + "\n"
    write_report(args.out, text)


if __name__ == "__main__":
    main()
