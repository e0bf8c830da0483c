"""The Dynamo backend: ``torch.compile(model, backend="dtr")``.

    model = torch.compile(model, backend="dtr")              # budget of the enclosing dtr.budget
    model = torch.compile(model, backend=dtr.compile_backend("2GB"))

Note [Compiled graphs under the runtime]
Dynamo captures the model's frames; aot_autograd turns each into a forward and
a backward graph of aten ops (no recomputation of its own: the default
partitioner saves what the backward needs). Both graphs are run here node by
node, and every aten node goes straight to ``Runtime.dispatch``, exactly as
the dispatch mode sends eager ops there (on the C++ runtime: to its fallback,
see Note [Compiled graphs on the C++ runtime]). So:

* the activations the forward saves for the backward are DTRTensors: autograd
  keeps them (``ctx.save_for_backward``) while the runtime may evict and
  recompute them, as in eager;
* what leaves a graph for user code (the forward's outputs, updated buffers,
  the backward's gradients) is escaped (``dtr.unwrap``: materialized, plain,
  pinned). Dynamo never sees a DTRTensor as an input, so a graph break or a
  second compiled model never causes a guard failure or a subclass trace;
* aot_autograd runs the forward under ``no_grad`` (inside its
  ``autograd.Function``). The runtime wraps outputs of plain-input ops only
  when grad mode is on (Note [What gets wrapped] in runtime.py), so the graph
  runs with grad mode on and its inputs detached: nothing records autograd
  history, and activations computed from parameters become evictable.

Note [Which session]
Inside a ``dtr.budget`` block the graphs run in that block's session; a
backend made with a budget only tightens its limit for the call, as a nested
``dtr.budget`` does. Outside any block, a backend made with a budget runs in a
session of its own (per thread), and a backend without one tracks without a
limit (``dtr.budget(None)``) and warns once. An own session is kept while any
of its values is alive (saved activations must outlive the forward call, and
every compiled frame of a step must share one budget) and replaced by a new
one when none is, i.e. once per step: a session kept forever would go on
counting plain tensors of earlier steps that are still alive. The backward
always runs in the session of the activations it was given.

Note [Lookahead, measured and dropped]
A graph knows when each value is next read. A variant of this runner published
that distance for every storage and scored candidates with dtr_eq's score
divided by it (Belady-like: keep what is read soon). On the bench GPT it did
not lower recomputation against plain dtr_eq on the same (Python) pool: the
same or more recomputations and more time recomputing (docs/compile.md), so
it was removed; dtr_eq's staleness already ranks the forward's activations,
which wait for the backward, as the first to go.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import _ext
from . import policies as _policies
from .session import Session, _stack
from .tensor import DTRTensor, is_dtr_tensor, unwrap

__all__ = ["compile_backend", "dtr_backend", "DTRBackend"]

# Note [Compiling inside a dtr block]
# Dynamo refuses to compile a frame while a user dispatch mode is on the stack
# ("non-infra torch dispatch mode present") and silently runs it eagerly. A mode
# whose ignore_compile_internals() is True is switched off while Dynamo and
# aot_autograd trace and stays on while the compiled code runs, which is what a
# dtr block needs: the "dtr" backend runs its graphs under the block's session
# (Note [Which session]). The price: inside a dtr block, frames compiled by another
# backend run their own kernels (inductor's fused code never reaches the mode),
# see docs/compile.md. This belongs in dtr/mode.py
# (DTRMode.ignore_compile_internals); until it is there, it is set here.
from .mode import DTRMode as _DTRMode  # noqa: E402

if "ignore_compile_internals" not in _DTRMode.__dict__:
    _DTRMode.ignore_compile_internals = classmethod(lambda cls: True)

aten = torch.ops.aten

def _warn_unbudgeted() -> None:
    warnings.warn(
        "dtr: torch.compile(backend='dtr') ran with no budget: no dtr.budget block is active "
        "and the backend was made without one, so values are tracked but never evicted. "
        "Run the step inside `with dtr.budget(\"2GB\"):` or use "
        "torch.compile(model, backend=dtr.compile_backend(budget=\"2GB\")).",
        stacklevel=2,
    )


# ----------------------------------------------------------------------------
# Graph programs
# ----------------------------------------------------------------------------

class _Ref:
    """Placeholder for the value of the i-th node inside an argument template."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


def _template(a, index):
    if isinstance(a, torch.fx.Node):
        return _Ref(index[a])
    # fx stores lists as immutable_list (a list subclass) and dicts as immutable_dict.
    if isinstance(a, list):
        return [_template(x, index) for x in a]
    if isinstance(a, tuple):
        return tuple(_template(x, index) for x in a)
    if isinstance(a, dict):
        return {k: _template(v, index) for k, v in a.items()}
    return a


def _has_ref(a) -> bool:
    t = type(a)
    if t is _Ref:
        return True
    if t is list or t is tuple:
        return any(_has_ref(x) for x in a)
    if t is dict:
        return any(_has_ref(x) for x in a.values())
    return False


def _fill(a, env):
    t = type(a)
    if t is _Ref:
        return env[a.i]
    if t is list or t is tuple:
        return t(_fill(x, env) for x in a)
    if t is dict:
        return {k: _fill(v, env) for k, v in a.items()}
    return a


def _refs(a, out: List[int]) -> List[int]:
    t = type(a)
    if t is _Ref:
        out.append(a.i)
    elif t is list or t is tuple:
        for x in a:
            _refs(x, out)
    elif t is dict:
        for x in a.values():
            _refs(x, out)
    return out


# Metadata queries answered from the wrapper, never by materializing the value.
_META_OPS = {
    aten.sym_size.int: lambda t, d: t.size(d),
    aten.sym_stride.int: lambda t, d: t.stride(d),
    aten.sym_numel.default: lambda t: t.numel(),
    aten.sym_storage_offset.default: lambda t: t.storage_offset(),
    aten.size.int: lambda t, d: t.size(d),
    aten.stride.int: lambda t, d: t.stride(d),
    aten.numel.default: lambda t: t.numel(),
}

# Note [Functional BatchNorm]
# aot_autograd's graphs use _native_batch_norm_legit_functional, which returns
# the new running statistics instead of writing them; aot's epilogue then
# copies them into the module's buffers (a version bump). A recompute of an
# evicted BatchNorm output would read the buffers again and fail the
# runtime's stale-input check, though in training the outputs do not depend on
# them. The graph passes a private copy of the running statistics instead, so
# recomputing never sees the later update (the copies are per channel: small).
_BN_FUNCTIONAL = getattr(getattr(aten, "_native_batch_norm_legit_functional", None), "default", None)

_KIND_DTR, _KIND_META, _KIND_CALL, _KIND_BN = 0, 1, 2, 3


class _Program:
    """A GraphModule flattened into steps over a list environment."""

    def __init__(self, gm: torch.fx.GraphModule, escape_outputs: Optional[int], escape_all: bool):
        nodes = list(gm.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        self.n = len(nodes)
        self.placeholders: List[int] = []
        self.consts: List[tuple] = []
        steps = []
        out_tmpl = None
        for i, n in enumerate(nodes):
            if n.op == "placeholder":
                self.placeholders.append(i)
            elif n.op == "get_attr":
                obj = gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                self.consts.append((i, obj))
            elif n.op == "call_function":
                target = n.target
                args = _template(tuple(n.args), index)
                kwargs = _template(dict(n.kwargs), index)
                if target in _META_OPS:
                    kind, fn = _KIND_META, _META_OPS[target]
                elif target is _BN_FUNCTIONAL:
                    kind, fn = _KIND_BN, target
                elif isinstance(target, torch._ops.OpOverload):
                    kind, fn = _KIND_DTR, target
                else:
                    kind, fn = _KIND_CALL, target
                steps.append([i, kind, fn, args, kwargs, None])
            elif n.op == "output":
                out_tmpl = _template(n.args[0], index)
            else:
                raise NotImplementedError(
                    f"dtr: compiled graphs with {n.op!r} nodes are not supported (node {n.name}); "
                    "please report this with the model")
        # Free every value after its last read (fx.Interpreter does the same): the
        # environment must not keep wrappers alive longer than eager code would.
        last_use: Dict[int, int] = {}
        for k, st in enumerate(steps):
            for r in _refs(st[3], []) + _refs(st[4], []):
                last_use[r] = k
        out_refs = set(_refs(out_tmpl, []))
        frees: List[List[int]] = [[] for _ in steps]
        for r, k in last_use.items():
            if r not in out_refs:
                frees[k].append(r)
        for k, st in enumerate(steps):
            st[5] = frees[k]
        # Values defined but never read (unused outputs of multi-output ops).
        for k, st in enumerate(steps):
            i = st[0]
            if i not in last_use and i not in out_refs:
                st[5] = st[5] + [i]
        self.steps = steps
        self.out_tmpl = out_tmpl
        outs = out_tmpl if isinstance(out_tmpl, (list, tuple)) else [out_tmpl]
        self.n_out = len(outs)
        self.escape_n = self.n_out if escape_all or escape_outputs is None else escape_outputs
        # Values that leave the graph for user code are escaped as soon as they are
        # made, as eager makes a gradient plain when it is accumulated: evicting one
        # before the graph ends would only mean recomputing it at the end.
        leaving = {r for r in _refs(out_tmpl, [])[:self.escape_n]}
        for st in steps:
            st.append(st[0] in leaving)


def _run(program: _Program, args: List, dispatch) -> List:
    """Runs the program; ``dispatch(op, args, kwargs)`` runs an aten node under the runtime."""
    env: List[Any] = [None] * program.n
    for j, i in enumerate(program.placeholders):
        a = args[j]
        # Parameters are torch.nn.Parameter, not torch.Tensor: test with isinstance.
        # Under enable_grad an undetached input would make every op record
        # autograd history, whose saved tensors keep freed values alive.
        if isinstance(a, torch.Tensor) and a.requires_grad and not is_dtr_tensor(a):
            a = a.detach()
        env[i] = a
    args.clear()  # boxed call: let aot_autograd's references to the inputs go
    for i, c in program.consts:
        env[i] = c
    try:
        for i, kind_, fn, targs, tkwargs, frees, leaves in program.steps:
            args_ = _fill(targs, env) if targs else ()
            kwargs_ = _fill(tkwargs, env) if tkwargs else {}
            if kind_ == _KIND_DTR:
                if _any_tensor(args_, kwargs_):
                    out = dispatch(fn, args_, kwargs_)
                else:
                    out = fn(*args_, **kwargs_)  # factories stay plain, as in eager
            elif kind_ == _KIND_META:
                out = fn(*args_, **kwargs_)
            elif kind_ == _KIND_BN:
                args_ = list(args_)
                for p in (3, 4):
                    if p < len(args_) and isinstance(args_[p], torch.Tensor):
                        with torch.no_grad():  # a plain copy: no runtime wraps it
                            args_[p] = unwrap(args_[p]).clone()
                out = dispatch(fn, tuple(args_), kwargs_)
            else:
                out = fn(*args_, **kwargs_)
            if leaves and is_dtr_tensor(out):
                out = _escape(out)
            env[i] = out
            for r in frees:
                env[r] = None
        result = _fill(program.out_tmpl, env)
    finally:
        env = None
    outs = list(result) if isinstance(result, (list, tuple)) else [result]
    for j in range(program.escape_n):
        o = outs[j]
        if is_dtr_tensor(o):
            outs[j] = _escape(o)
    return outs


def _escape(t: DTRTensor) -> torch.Tensor:
    # A new tensor object over the escaped value: aot_autograd's autograd.Function
    # sets grad_fn on the tensors it returns, and the runtime's own value (which
    # recipes may read when recomputing) must stay free of autograd history.
    return unwrap(t).detach()


def _any_tensor(args, kwargs) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            return True
        if type(a) in (list, tuple):
            for x in a:
                if isinstance(x, torch.Tensor):
                    return True
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, torch.Tensor):
                return True
    return False


def _runtime_of_inputs(args) -> Optional[Any]:
    """The Python runtime or the C++ runtime (a ``dtr._C.Runtime``) of the first dtr input."""
    C = _ext._C
    for a in args:
        if type(a) is DTRTensor:
            return a._cell.storage.runtime
        if C is not None and isinstance(a, torch.Tensor) and C.is_dtr(a):
            return C.runtime_of(a)
    return None


# Note [Compiled graphs on the C++ runtime]
# The C++ runtime has no Python dispatch: an aten node reaches it by being
# called, with the runtime's block open on this thread (its TLS include sends
# ops on plain tensors to the C++ fallback too, Note [Capturing plain-only ops]
# in csrc/capture.h). So the runner calls each node directly inside the block,
# entering it for the call when the graph runs outside one (the backend's own
# session; a backward run after its block closed).
def _call_node(op, args, kwargs):
    return op(*args, **kwargs)


@contextlib.contextmanager
def _outside_cpp_block():
    """Note [Tracing outside the block]
    aot_autograd traces under FakeTensorMode and clones the RNG state while it
    compiles; with a C++ block open on the thread those ops would be captured,
    and their results wrapped (Dynamo then fails on a wrapper: "Cannot access
    data pointer"). Compiling happens with the thread taken out of its block,
    as the Python runtime's dispatch mode is switched off for it."""
    C = _ext._C
    if C is None:
        yield
        return
    token = C.suspend_block()
    try:
        yield
    finally:
        C.exit_block(token)


class _RawCppRuntime:
    """A ``dtr._C.Runtime`` found through a tensor, when no open session holds it."""

    kind = "cpp"

    def __init__(self, rt):
        self._rt = rt

    @property
    def limit(self):
        return self._rt.limit

    @limit.setter
    def limit(self, value):
        self._rt.limit = value

    def tightened(self, spec):
        # Only bytes: "auto" and fractions need the session's device (CppRuntime).
        if not isinstance(spec, int):
            return self.limit
        return spec if self.limit is None else min(self.limit, spec)


# ----------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------

class DTRBackend:
    """A Dynamo backend running aot_autograd's graphs under a dtr budget.

    Made by ``compile_backend``; ``dtr_backend`` is the one registered as "dtr".
    ``session`` is this thread's own session (None until a compiled step ran
    outside any ``dtr.budget`` block); its ``stats`` accumulate over steps.
    """

    def __init__(self, budget=None, policy=_policies.DEFAULT_POLICY, *, pool: str = "auto", search=None):
        from .session import parse_budget

        self.budget_bytes = parse_budget(budget)
        _policies.get(policy)  # validates the name
        self.policy = policy
        self.pool = pool
        self.search = search
        self._local = threading.local()
        self._warned = False
        self.frames = 0  # graphs compiled (Dynamo frames reaching the backend)

    # -- sessions ----------------------------------------------------------
    @property
    def session(self) -> Optional[Session]:
        """This thread's current own session (None before the first step outside a block)."""
        sessions = getattr(self._local, "sessions", None)
        return sessions[-1] if sessions else None

    @property
    def sessions(self) -> List[Session]:
        """This thread's own sessions, oldest first (the last 100): one per step, see below."""
        return list(getattr(self._local, "sessions", ()))

    def _own_session(self) -> Session:
        # A new session whenever the current one holds no live value: a step's
        # activations are all gone between steps, so each step gets its own
        # session, as with `with dtr.budget(...)` around the step. A session kept
        # across steps would keep counting plain tensors of earlier steps that
        # are still alive (a preloaded dataset's batches) against the budget.
        sessions = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = []
        if sessions and sessions[-1].runtime.has_live_values():
            return sessions[-1]
        s = Session(self.budget_bytes, self.policy, pool=self.pool, search=self.search)
        sessions.append(s)
        del sessions[:-100]
        return s

    def _runtime_for_forward(self):
        """(runtime, limit to restore or a sentinel). See Note [Which session]."""
        stack = _stack()
        if stack:
            rt = stack[-1].runtime
            saved = rt.limit
            rt.limit = rt.tightened(self.budget_bytes)
            return rt, saved
        if self.budget_bytes is None and not self._warned:
            self._warned = True  # once per backend (the registered "dtr": once per process)
            _warn_unbudgeted()
        return self._own_session().runtime, _KEEP

    def _cpp_session_runtime(self, c_rt):
        """The CppRuntime of a session (open, or this backend's own) wrapping ``c_rt``."""
        for s in [*_stack(), *reversed(self.sessions)]:
            if getattr(s.runtime, "_rt", None) is c_rt:
                return s.runtime
        return _RawCppRuntime(c_rt)

    def _call(self, program, args, *, backward: bool):
        if backward:
            rt = _runtime_of_inputs(args)
            restore = _KEEP
            if rt is None:
                rt, restore = self._runtime_for_forward()
            else:
                if _ext._C is not None and isinstance(rt, _ext._C.Runtime):
                    rt = self._cpp_session_runtime(rt)
                if self.budget_bytes is not None:
                    restore = rt.limit
                    rt.limit = rt.tightened(self.budget_bytes)
        else:
            rt, restore = self._runtime_for_forward()
        try:
            if getattr(rt, "kind", None) == "cpp":  # Note [Compiled graphs on the C++ runtime]
                if getattr(rt, "device", True) is None:
                    # A backend's own session, never entered as a block: its budget is
                    # the device's memory, known from the first tensor (the Python
                    # runtime binds it at its first plain tensor the same way).
                    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
                    if dev is not None:
                        rt.bind_device(dev)
                token = _ext._C.enter_block(rt._rt)
                try:
                    with _disable_current_modes(), torch.enable_grad():
                        return _run(program, args, _call_node)
                finally:
                    _ext._C.exit_block(token)
            with _disable_current_modes(), torch.enable_grad():
                return _run(program, args, rt.dispatch)
        finally:
            if restore is not _KEEP:
                rt.limit = restore

    # -- compilers -----------------------------------------------------------
    def _fw_compiler(self, gm: torch.fx.GraphModule, example_inputs):
        n_ret = None
        ctx = torch._guards.TracingContext.try_get()
        meta = getattr(ctx, "fw_metadata", None) if ctx is not None else None
        if meta is not None:
            n_ret = meta.num_forward_returns
        program = _Program(gm, n_ret, escape_all=n_ret is None)
        backend = self

        def forward(args):
            return backend._call(program, args, backward=False)

        forward._boxed_call = True
        return forward

    def _bw_compiler(self, gm: torch.fx.GraphModule, example_inputs):
        program = _Program(gm, None, escape_all=True)
        backend = self
        def backward(args):
            return backend._call(program, args, backward=True)

        backward._boxed_call = True
        return backward

    def _inference_compiler(self, gm: torch.fx.GraphModule, example_inputs):
        program = _Program(gm, None, escape_all=True)
        backend = self

        def forward(args):
            return backend._call(program, args, backward=False)

        forward._boxed_call = True
        return forward

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        from functorch.compile import default_partition
        from torch._functorch.aot_autograd import aot_module_simplified

        self.frames += 1
        with _disable_current_modes(), _outside_cpp_block():
            return aot_module_simplified(
                gm, example_inputs,
                fw_compiler=self._fw_compiler,
                bw_compiler=self._bw_compiler,
                inference_compiler=self._inference_compiler,
                partition_fn=default_partition,
                keep_inference_input_mutations=True,
            )

    def __repr__(self) -> str:
        return f"DTRBackend(budget_bytes={self.budget_bytes}, policy={self.policy!r})"


_KEEP = object()


def compile_backend(budget=None, policy=_policies.DEFAULT_POLICY, *, pool: str = "auto",
                    search=None) -> DTRBackend:
    """A Dynamo backend for ``torch.compile(model, backend=...)`` running under dtr.

    ``budget``: as for ``dtr.budget`` (bytes or a string such as "2GB"); None uses the
    enclosing ``dtr.budget`` block's (see Note [Which session]). ``policy``, ``pool``,
    ``search``: as for ``dtr.budget``, used when the backend owns its session.
    """
    return DTRBackend(budget, policy, pool=pool, search=search)


dtr_backend = compile_backend()
"""The backend registered as ``torch.compile(..., backend="dtr")`` (setup.py entry point)."""
