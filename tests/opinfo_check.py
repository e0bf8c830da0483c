"""PyTorch's OpInfo database run under ``dtr.testing.evict_everything`` and compared with eager.

One *check* is one sample of one OpInfo entry: its outputs and the gradients of its
inputs (for ops that support autograd), and separately, where the entry has one, its
in-place variant's result and the mutated input. Eager runs twice under the same seed;
a sample whose two eager runs differ is not reproducible and is excluded (listed).
Inside the dtr block every tensor argument is first cloned, so the op reads dtr
tensors (evicted after every op, recomputed from recipes) rather than plain inputs.

Used by tests/test_opinfo.py (a fixed stride over the ops in CI, the whole database
with DTR_OPINFO_FULL=1) and runnable directly:
``python tests/opinfo_check.py [--stride N] [--out FILE]``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.utils._python_dispatch
from torch.utils._pytree import tree_flatten, tree_map

if __name__ == "__main__":  # run as a script: the dtr of this checkout, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dtr  # noqa: E402

SEED = 1234


def op_db():
    from torch.testing._internal.common_methods_invocations import op_db as db
    return db


def op_id(op) -> str:
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


@dataclass
class Result:
    op: str
    sample: int
    kind: str  # "fn" (values and input gradients) or "inplace"
    status: str  # "pass", "fail", "excluded" (eager not reproducible), "skip" (eager raised)
    detail: str = ""


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        a, b = dtr.unwrap(a), dtr.unwrap(b)
        if a.layout != b.layout:
            return False
        if a.layout != torch.strided:
            a, b = a.to_dense(), b.to_dense()
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype == torch.complex32:  # no equal kernel on CPU
            a, b = a.to(torch.complex64), b.to(torch.complex64)
        if torch.equal(a, b):
            return True
        # NaN == NaN for this purpose; nothing else may differ.
        if a.is_floating_point() or a.is_complex():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b) or (a != a and b != b)
    except Exception:
        return False


def _clone_tree(tree):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def _leaves(sample) -> List[torch.Tensor]:
    flat, _ = tree_flatten((sample.input, sample.args, sample.kwargs))
    return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]


def _run_fn(fn, sample, grads: bool, leaves, grad_seed: int):
    """Outputs and input gradients of one call; every tensor argument cloned first."""
    torch.manual_seed(SEED)
    inp, args, kwargs = _clone_tree((sample.input, sample.args, sample.kwargs))
    out = fn(inp, *args, **kwargs)
    out = sample.output_process_fn_grad(out)
    gin = None
    if grads and leaves:
        flat, _ = tree_flatten(out)
        diff = [o for o in flat if isinstance(o, torch.Tensor) and o.requires_grad
                and (o.is_floating_point() or o.is_complex())]
        if diff:
            g = torch.Generator().manual_seed(grad_seed)
            gouts = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in diff]
            gin = torch.autograd.grad(diff, leaves, gouts, allow_unused=True)
    return out, gin


def _run_inplace(fn, sample):
    torch.manual_seed(SEED)
    inp, args, kwargs = _clone_tree((sample.input, sample.args, sample.kwargs))
    with torch.no_grad():
        out = fn(inp, *args, **kwargs)
    return out, inp


def _dtr_snapshot(x):
    """The values of a result, read while its session is alive (unwrapped, cloned)."""
    return tree_map(lambda t: dtr.unwrap(t).clone() if isinstance(t, torch.Tensor) else t, x)


def check_sample(op, i, sample, kind) -> Result:
    name = op_id(op)
    grads = kind == "fn" and op.supports_autograd
    leaves = _leaves(sample) if grads else []
    if kind == "fn":
        run = lambda: _run_fn(op.op, sample, grads, leaves, SEED + i)  # noqa: E731
    else:
        run = lambda: _run_inplace(op.inplace_variant, sample)  # noqa: E731
    try:
        first = run()
    except Exception as e:  # eager itself refuses the sample
        return Result(name, i, kind, "skip", f"eager: {type(e).__name__}")
    # The second eager run gets other memory (the first run's results and same-sized
    # junk stay alive), so an uninitialized result (empty, new_empty) shows as irreproducible.
    junk = [torch.rand(t.shape) for t in tree_flatten(first)[0]
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dtype.is_floating_point]
    try:
        second = run()
    except Exception as e:
        return Result(name, i, kind, "excluded", f"eager's second run raised {type(e).__name__}")
    try:
        reproducible = _same(first, second)
    except Exception as e:
        return Result(name, i, kind, "excluded", f"results cannot be compared: {type(e).__name__}")
    if not reproducible:
        return Result(name, i, kind, "excluded", "eager is not reproducible under the same seed")
    try:
        with dtr.testing.evict_everything():
            got = run()
            got = _dtr_snapshot(got)
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}" if tb else ""
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        return Result(name, i, kind, "fail", f"{type(e).__name__}{where}: {msg}")
    del junk
    if _same(first[0], got[0]) and _same(first[1], got[1]):
        return Result(name, i, kind, "pass")
    if _eager_varies(run, first):
        return Result(name, i, kind, "excluded", "eager is not reproducible in other memory")
    if not _same(first[0], got[0]):
        return Result(name, i, kind, "fail", "values differ from eager" + _subclass_path(run, got))
    return Result(name, i, kind, "fail",
                  ("input gradients differ from eager" if kind == "fn"
                   else "mutated input differs from eager") + _subclass_path(run, got))


def _eager_varies(run, first, tries: int = 6) -> bool:
    """Whether eager, run again with its buffers elsewhere, ever differs from its first run.

    Two eager runs can agree by chance where a kernel's result depends on where its buffers
    lie (LAPACK's gelsy in linalg.lstsq: its blocked QR takes other paths for other
    alignments), so a sample that differs under dtr gets more eager runs, each after
    allocations of another size, before it counts as a failure.
    """
    for k in range(tries):
        junk = [torch.empty(1 + 7 * k, dtype=torch.uint8) for _ in range(k + 1)]
        try:
            again = run()
        except Exception:
            return True
        if not _same(first, again):
            return True
        del junk
    return False


SUBCLASS_PATH_TAG = " (as eager under a pass-through dispatch mode: PyTorch's subclass path)"


class _PassThrough(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _subclass_path(run, got) -> str:
    """Whether eager under a do-nothing dispatch mode gives dtr's result: then PyTorch itself
    takes another path when a mode or subclass is present (see docs/conformance.md)."""
    try:
        with _PassThrough():
            moded = run()
        if _same(moded, got):
            return SUBCLASS_PATH_TAG
    except Exception:
        pass
    return ""


def check_op(op) -> List[Result]:
    results: List[Result] = []
    if torch.float32 not in op.supported_dtypes("cpu"):
        return results
    try:
        samples = list(op.sample_inputs("cpu", torch.float32, requires_grad=op.supports_autograd))
    except Exception as e:
        return [Result(op_id(op), -1, "fn", "skip", f"sample_inputs raised {type(e).__name__}")]
    for i, s in enumerate(samples):
        results.append(check_sample(op, i, s, "fn"))
    if op.inplace_variant is not None:
        # In-place variants: every sample, values and the mutated input (no gradients).
        try:
            plain = list(op.sample_inputs("cpu", torch.float32, requires_grad=False))
        except Exception:
            plain = []
        for j, s in enumerate(plain):
            results.append(check_sample(op, j, s, "inplace"))
    return results


def selected_ops(stride: int = 1, offset: int = 0, names=None):
    db = op_db()
    return [op for k, op in enumerate(db)
            if k % stride == offset and (names is None or op_id(op) in names)]


def summarize(results: List[Result], seconds: float, stride: int) -> dict:
    counted = [r for r in results if r.status in ("pass", "fail")]
    fails = [r for r in results if r.status == "fail"]
    subclass = [r for r in fails if SUBCLASS_PATH_TAG in r.detail]
    own = len(counted) - len(subclass)
    return {
        "torch": torch.__version__,
        "stride": stride,
        "ops": len({r.op for r in results}),
        "checks": len(counted),
        "passed": len(counted) - len(fails),
        "failed": len(fails),
        "pass_rate": (len(counted) - len(fails)) / len(counted) if counted else 1.0,
        # Failures where eager under a do-nothing dispatch mode gives dtr's bits exactly
        # (docs/conformance.md, "PyTorch's subclass path"), and the rate of the rest.
        "subclass_path": len(subclass),
        "pass_rate_outside_subclass_path": (own - (len(fails) - len(subclass))) / own if own else 1.0,
        "excluded": [f"{r.op}[{r.sample}] {r.kind}: {r.detail}" for r in results
                     if r.status == "excluded"],
        "eager_refused": sum(1 for r in results if r.status == "skip"),
        "seconds": round(seconds, 1),
        "failures": [f"{r.op}[{r.sample}] {r.kind}: {r.detail}" for r in fails],
    }


def sweep(stride: int = 1, offset: int = 0, progress=None, names=None) -> dict:
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    results: List[Result] = []
    for op in selected_ops(stride, offset, names):
        t1 = time.perf_counter()
        rs = check_op(op)
        results.extend(rs)
        if progress is not None:
            nf = sum(1 for r in rs if r.status == "fail")
            progress(f"{op_id(op)}: {len(rs)} checks, {nf} failed, {time.perf_counter() - t1:.1f}s")
    return summarize(results, time.perf_counter() - t0, stride)


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--ops", default=None, help="comma-separated OpInfo names (default: all)")
    a = p.parse_args(argv)
    names = set(a.ops.split(",")) if a.ops else None
    summary = sweep(a.stride, a.offset, None if a.quiet else (lambda m: print(m, flush=True)), names)
    text = json.dumps(summary, indent=1)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(f"{summary['passed']}/{summary['checks']} checks passed "
          f"({100 * summary['pass_rate']:.2f}%), {summary['failed']} failed, "
          f"{len(summary['excluded'])} excluded, {summary['seconds']}s")


if __name__ == "__main__":
    sys.exit(main())
