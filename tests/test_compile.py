"""torch.compile(model, backend="dtr"): compiled training equals eager bit for bit, at any budget.

The compiled path runs aot_autograd's forward and backward graphs node by node
under the runtime (see Note [Compiled graphs under the runtime] in dtr/compile.py).
Every comparison is against plain eager PyTorch, with tests/harness.py's checks:
losses, gradients, parameters, buffers (BatchNorm's running stats), Adam's state
and the global RNG stream afterwards.
"""
import contextlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import dtr
import models
from dtr.compile import DTRBackend, compile_backend
from harness import Run, assert_same, budget_above, is_plain, live_bytes, train

pytestmark = pytest.mark.usefixtures("runtime")  # Note [One suite, two runtimes]

COMPILED = ["mlp", "cnn", "transformer"]


def compiled_train(name: str, backend, ctx=contextlib.nullcontext, steps: int = 3,
                   model_data=None, **compile_kw) -> Run:
    """harness.train, with the model compiled. Each step runs inside ``ctx()``."""
    torch._dynamo.reset()
    base = live_bytes()
    if model_data is not None:  # made before the call: count it in the run, not in the base
        base -= _storage_bytes([*model_data[0].parameters(), *model_data[0].buffers(),
                                *(t for inp in model_data[1] for t in inp)])
    model, data = model_data if model_data is not None else models.make(name, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fwd = torch.compile(model, backend=backend, **compile_kw)
    torch.manual_seed(1234)
    run = Run(model, opt, [], [], base=base)
    for inp in data[:steps]:
        opt.zero_grad(set_to_none=True)
        with ctx() as s:
            loss = fwd(*inp)
            loss.backward()
            run.losses.append(dtr.unwrap(loss).detach().clone())
        run.sessions.append(s)
        run.grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        opt.step()
    run.rng_after = torch.get_rng_state()
    return run


def _storage_bytes(tensors):
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


_EAGER = {}


def eager(name: str, steps: int = 3) -> Run:
    key = (name, steps)
    if key not in _EAGER:
        _EAGER[key] = train(name, steps=steps)
    return _EAGER[key]


@pytest.fixture(scope="module")
def eager_runs():
    return {name: eager(name) for name in COMPILED}


def _peak_unlimited(name):
    """(the run, its peak above what was in use before it): budgets are that much above
    what is in use (See Note [The budget is the device's memory])."""
    be = compile_backend(None)
    run = compiled_train(name, be, lambda: dtr.budget(None))
    return run, max(s.stats.peak_bytes for s in run.sessions) - run.base


def _own(be):
    """(highest tracked peak, total recomputations) over the backend's own sessions."""
    ss = be.sessions
    assert ss, "the backend never ran in its own session"
    return max(x.stats.peak_bytes for x in ss), sum(x.stats.rematerializations for x in ss)


def _tight_runs(peak, run_at, fracs=(0.95, 0.9, 0.8, 0.7, 0.6)):
    """[(budget, run, backend)] for decreasing budgets until one is below the model's floor."""
    out = []
    for frac in fracs:
        budget = budget_above(peak * frac)
        be = compile_backend(budget)
        try:
            run = run_at(be)
        except dtr.BudgetExceededError:
            break  # below the floor of this model (PITFALLS 14)
        out.append((budget, run, be))
    assert out, f"no budget below the unlimited peak ({peak} bytes) was feasible"
    return out


@pytest.mark.parametrize("name", COMPILED)
def test_unlimited_budget_is_exact(name, eager_runs):
    run, _ = _peak_unlimited(name)
    assert_same(eager_runs[name], run)
    assert all(s.stats.evictions == 0 and s.stats.rematerializations == 0 for s in run.sessions)
    # The graphs really ran under the runtime.
    assert all(s.stats.ops > 0 for s in run.sessions)


@pytest.mark.parametrize("name", COMPILED)
def test_evict_everything_is_exact(name):
    # Saved activations cross from the forward to the backward as evictable
    # DTRTensors: evicting everything after every op forces their recomputation.
    steps = 1  # recomputing everything after every op is slow
    run = compiled_train(name, compile_backend(), dtr.testing.evict_everything, steps=steps)
    assert_same(eager(name, steps), run)
    assert all(s.stats.rematerializations > 0 for s in run.sessions)


@pytest.mark.parametrize("name", COMPILED)
def test_tight_budgets_are_exact_and_hold(name, eager_runs):
    _, peak = _peak_unlimited(name)
    tried = _tight_runs(peak, lambda be: compiled_train(name, be))
    for budget, run, be in tried:
        assert_same(eager_runs[name], run)
        assert len(be.sessions) == len(run.losses)  # one session per step
        assert _own(be)[0] <= budget, (_own(be), budget)
    remats = [_own(be)[1] for _, _, be in tried]
    assert remats[-1] > 0, f"no recomputation at the tightest feasible budget: {remats}"


def test_backend_budget_is_used_and_enclosing_block_tightens_it(eager_runs):
    _, peak = _peak_unlimited("mlp")
    loose, tight = budget_above(peak * 2), budget_above(peak * 0.85)
    be = compile_backend(loose)
    run = compiled_train("mlp", be, lambda: dtr.budget(tight))
    assert_same(eager_runs["mlp"], run)
    # The enclosing block's session was used, under the tighter of the two limits.
    assert be.session is None
    assert all(s.stats.peak_bytes <= tight for s in run.sessions)
    assert sum(s.stats.rematerializations for s in run.sessions) > 0
    assert all(s.runtime.limit == tight for s in run.sessions)  # restored after each call


def test_unbudgeted_backend_warns_once():
    m, data = models.make("mlp")
    be = DTRBackend()
    c = torch.compile(m, backend=be)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for inp in data[:2]:
            c(*inp).backward()
    msgs = [str(x.message) for x in w if "dtr: torch.compile" in str(x.message)]
    assert len(msgs) == 1, msgs
    assert be.session is not None and be.session.budget_bytes is None


def test_fullgraph_compiles_to_one_frame():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    be = compile_backend(None)
    m, data = models.make("mlp")
    c = torch.compile(m, backend=be, fullgraph=True)
    with dtr.budget(None):
        for inp in data:
            c(*inp).backward()
    assert be.frames == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


class _Broken(nn.Module):
    """An MLP with a forced graph break in the middle: two compiled frames."""

    def __init__(self, d=32):
        super().__init__()
        self.a = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(d, d), nn.Tanh())])
        self.b = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(d, d), nn.Tanh())],
                               nn.Linear(d, 1))

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(h).pow(2).mean()


def _broken_model_data(sizes=(128, 128, 128)):
    torch.manual_seed(0)
    m = _Broken()
    g = torch.Generator().manual_seed(1)
    return m, [(torch.randn(n, 32, generator=g),) for n in sizes]


def test_graph_break_trains_correctly():
    eager = compiled_train("broken", "eager", model_data=_broken_model_data())
    be = compile_backend(None)
    run = compiled_train("broken", be, lambda: dtr.budget(None), model_data=_broken_model_data())
    assert be.frames == 2
    assert_same(eager, run)
    peak = max(s.stats.peak_bytes for s in run.sessions) - run.base
    # At tight budgets the two frames share one session and one limit.
    tried = _tight_runs(peak, lambda be: compiled_train("broken", be, model_data=_broken_model_data()),
                        fracs=(0.9, 0.75, 0.6))
    for budget, run, be in tried:
        assert_same(eager, run)
        assert _own(be)[0] <= budget
        assert be.frames == 2
    assert _own(tried[-1][2])[1] > 0


def test_new_shapes_recompile_and_dynamic_shapes_work():
    sizes = (16, 24, 40, 8)
    eager = compiled_train("broken", "eager", steps=4, model_data=_broken_model_data(sizes))
    # Automatic dynamic shapes: a recompile on the second size, then one graph for all.
    be = compile_backend(None)
    run = compiled_train("broken", be, lambda: dtr.budget(None), steps=4,
                         model_data=_broken_model_data(sizes))
    assert_same(eager, run)
    assert be.frames == 4  # two frames, compiled static then dynamic
    # dynamic=True from the start: one compilation per frame, and symbolic sizes
    # in the graphs (sym_size nodes are answered from the wrapper, never recomputed).
    eager = compiled_train("broken", "eager", steps=2, model_data=_broken_model_data(sizes[:2]))
    be = compile_backend(None)
    run = compiled_train("broken", be, dtr.testing.evict_everything, steps=2,
                         model_data=_broken_model_data(sizes[:2]), dynamic=True)
    assert_same(eager, run)
    assert be.frames == 2
    assert all(s.stats.rematerializations > 0 for s in run.sessions)


def test_budget_error_names_the_op():
    m, data = models.make("mlp")
    c = torch.compile(m, backend=compile_backend(budget_above(4096)))
    torch._dynamo.reset()
    with pytest.raises(dtr.BudgetExceededError) as ei:
        c(*data[0]).backward()
    assert ei.value.op.startswith("aten."), ei.value.op
    assert ei.value.op in str(ei.value)
    assert str(ei.value).startswith("dtr: budget of")


def test_inference_under_no_grad_is_exact():
    m, data = models.make("mlp")
    with torch.no_grad():
        ref = m(*data[0])
    be = compile_backend(None)
    c = torch.compile(m, backend=be)
    torch._dynamo.reset()
    with torch.no_grad(), dtr.testing.evict_everything() as s:
        out = c(*data[0])
    assert is_plain(out)
    assert torch.equal(out, ref)
    assert s.stats.ops > 0


class _Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))

    def forward(self, x):
        return self.net(x)


def test_eager_loss_on_compiled_outputs_gives_dtr_tangents():
    # The loss is computed by eager code under dtr, so the gradient reaching the
    # compiled backward is a DTRTensor: DTRTensor.__coerce_same_metadata_as_tangent__.
    torch.manual_seed(0)
    m = _Features()
    x = torch.randn(8, 16)
    (m(x).tanh().pow(2).mean()).backward()
    ref = [p.grad.clone() for p in m.parameters()]
    for p in m.parameters():
        p.grad = None
    c = torch.compile(m, backend=compile_backend(None))
    torch._dynamo.reset()
    with dtr.testing.evict_everything() as s:
        loss = c(x).tanh().pow(2).mean()
        assert dtr.is_dtr_tensor(loss)
        loss.backward()
    for p, g in zip(m.parameters(), ref):
        assert is_plain(p.grad)
        assert torch.equal(p.grad, g)


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "dtr" for ep in entry_points(group="torch_dynamo_backends"))


@pytest.mark.skipif(not _entry_point_installed(),
                    reason="the torch_dynamo_backends entry point 'dtr' is not installed: run "
                           "`pip install --no-build-isolation -e .` first")
def test_backend_name_resolves_without_importing_dtr():
    code = textwrap.dedent("""
        import sys, warnings
        import torch
        assert "dtr" not in sys.modules
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        x = torch.randn(4, 8)
        ref = m(x).pow(2).mean()
        ref.backward()
        g = [p.grad.clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = torch.compile(m, backend="dtr")(x).pow(2).mean()
            loss.backward()
        assert torch.equal(loss, ref)
        assert all(torch.equal(p.grad, q) for p, q in zip(m.parameters(), g))
        import dtr.compile
        assert dtr.compile.dtr_backend.frames == 1
        print("ok")
    """)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
