"""CUDA check for the core runtime: differential training and measured peaks on a GPU.

    python bench/gpu_check.py            # under 5 minutes on one GPU; writes bench/results/gpu_check.md

Runs the test models (tests/models.py) eagerly and under dtr on CUDA: at an
unlimited budget, under evict_everything, and at a tight budget, comparing losses,
gradients, parameters and Adam state with torch.equal (deterministic algorithms on),
and checks the allocator's measured peak (torch.cuda.max_memory_allocated) against
the budget.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402

import dtr  # noqa: E402
import models  # noqa: E402


def train(name, ctx, device, steps=3):
    model, data = models.make(name)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1234)
    torch.cuda.manual_seed(1234)
    losses, sessions = [], []
    for inp in data[:steps]:
        inp = tuple(x.to(device) if isinstance(x, torch.Tensor) else _tree_to(x, device) for x in inp)
        opt.zero_grad(set_to_none=True)
        with ctx() as s:
            loss = model(*inp)
            loss.backward()
            losses.append(dtr.unwrap(loss).detach().clone())
        sessions.append(s)
        opt.step()
    return model, opt, losses, sessions


def _tree_to(x, device):
    return x  # TreeLSTM trees are Python structures


def same(a, b):
    ma, oa, la, _ = a
    mb, ob, lb, _ = b
    ok = all(torch.equal(x, y) for x, y in zip(la, lb))
    ok &= all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    for p, q in zip(ma.parameters(), mb.parameters()):
        ok &= all(torch.equal(oa.state[p][k], ob.state[q][k]) for k in oa.state[p])
    return bool(ok)


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run this on a machine with a GPU")
        return 2
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
    dev = torch.device("cuda")
    lines = [f"# gpu_check: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}", "",
             "| model | unlimited exact | evict_everything exact | budget | exact | remats | measured peak / budget |",
             "|---|---|---|---|---|---|---|"]
    failures = 0
    t_start = time.time()
    for name in models.MODELS:
        eager = train(name, contextlib.nullcontext, dev)
        unl = train(name, lambda: dtr.budget(None, device=dev), dev)
        ev = train(name, dtr.testing.evict_everything, dev)
        peak = max(s.stats.peak_bytes for s in unl[3])
        budget = int(0.8 * peak)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            tight = train(name, lambda: dtr.budget(budget, device=dev), dev)
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated(dev) - base
            t_ok = same(eager, tight)
            remats = sum(s.stats.rematerializations for s in tight[3])
            ratio = f"{measured / budget:.3f}"
        except dtr.BudgetExceededError as e:
            t_ok, remats, ratio = "infeasible", 0, f"({e.smallest_feasible_bytes} needed)"
        u_ok, e_ok = same(eager, unl), same(eager, ev)
        failures += (not u_ok) + (not e_ok) + (t_ok is False)
        lines.append(f"| {name} | {u_ok} | {e_ok} | {budget} | {t_ok} | {remats} | {ratio} |")
        print(lines[-1], flush=True)
    lines += ["", f"total {time.time() - t_start:.0f} s, failures: {failures}"]
    out = os.path.join(os.path.dirname(__file__), "results", "gpu_check.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
