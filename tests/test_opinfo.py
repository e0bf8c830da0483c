"""PyTorch's OpInfo database under dtr.testing.evict_everything, compared with eager (tests/opinfo_check.py).

CI runs a fixed stride over the database (every ``CI_STRIDE``-th entry, about 5% of it),
one test per entry. ``DTR_OPINFO_FULL=1`` also runs the whole database and writes its
pass rate and failure list to bench/results/opinfo.json (quoted in docs/conformance.md).
"""
import json
import os

import pytest
import torch

import opinfo_check as oc

CI_STRIDE = 20

# Entries whose dtr result differs from eager's in the last bits because PyTorch's own
# autograd formula takes another path when a tensor subclass or a dispatch mode is
# present (``areAnyTensorSubclassLike`` in FunctionsManual.cpp); see
# docs/conformance.md, "Subclass paths". A plain pass-through subclass gives the same
# difference; dtr's values are computed exactly as PyTorch computes them for subclasses.
SUBCLASS_PATH = {"masked_fill", "prod", "masked.prod"}

# Failures the sweep may show that are documented dtr limits (docs/conformance.md):
# tensor_split reads a tensor of indices' data in its C++ composite, before dispatch.
DOCUMENTED_FAILURES = {"tensor_split"}

_OPS = oc.selected_ops(CI_STRIDE)


@pytest.fixture
def one_thread():
    # The samples' kernels are tiny: with two OpenMP threads on a loaded 2-core machine each
    # call waits on the other thread (the sweep ran >10x faster with one). Eager and dtr
    # run with the same setting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("op", _OPS, ids=[oc.op_id(op) for op in _OPS])
def test_opinfo_entry(op, runtime, one_thread):
    # Both runtimes (Note [One suite, two runtimes] in conftest.py): DTR_RUNTIME picks the
    # one evict_everything uses; what the C++ runtime fails is in conftest's CPP_NOT_YET.
    results = oc.check_op(op)
    failures = [f"[{r.sample}] {r.kind}: {r.detail}" for r in results if r.status == "fail"]
    if runtime == "python" and oc.op_id(op) in SUBCLASS_PATH:
        assert failures and all("subclass path" in f for f in failures), failures
        pytest.xfail("autograd's subclass path: " + "; ".join(failures))
    assert not failures, failures


def test_subclass_path_is_pytorchs_not_dtrs():
    # The documented divergence reproduces with a pass-through dispatch mode and no dtr.
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randn(64, 64, requires_grad=True)
    mask = torch.rand(64, 64) > 0.5
    value = torch.tensor(1.5, requires_grad=True)
    g = torch.randn(64, 64)

    def grad_of_value():
        return torch.autograd.grad(x.masked_fill(mask, value), value, g)[0]

    eager = grad_of_value()
    with PassThrough():
        moded = grad_of_value()
    assert not torch.equal(eager, moded)  # the summation order differs
    assert torch.equal(eager, g.masked_select(mask).sum())
    assert torch.equal(moded, torch.where(mask, g, 0).sum())


@pytest.mark.skipif(not os.environ.get("DTR_OPINFO_FULL"), reason="the full sweep: DTR_OPINFO_FULL=1")
def test_opinfo_full_sweep(one_thread):
    summary = oc.sweep()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "bench", "results", "opinfo.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    # The gate (docs/conformance.md, "How the sweep counts"): a failure tagged as PyTorch's
    # subclass path (eager under a do-nothing dispatch mode gives dtr's bits) is reported
    # apart; every other check must pass at >= 99.9%, and what fails must be documented.
    left = [f for f in summary["failures"] if oc.SUBCLASS_PATH_TAG not in f]
    assert summary["pass_rate_outside_subclass_path"] >= 0.999, left
    assert all(f.split("[")[0] in DOCUMENTED_FAILURES for f in left), left
