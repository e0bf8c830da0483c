"""``record(path)``: write the op trace of a real (plain eager) run.

    import dtr
    with dtr.sim.record("step.jsonl"):
        loss = model(x).sum()
        loss.backward()

The trace has the format of the DTR prototype's logs
(``../shared/traces/dtr-prototype/README.md``), so ``python -m dtr.sim`` and
``dtr.sim.simulate`` replay it:

* a tensor first seen as an op input that was made outside the block
  (parameters, inputs, anything made before) becomes a CONSTANT with its
  storage's bytes;
* every op is a CALL with its measured time in nanoseconds
  (``time.perf_counter_ns`` around the kernel; on CUDA after a synchronize),
  each result with its storage's bytes and ALIAS ``k`` when it shares storage
  with tensor argument ``k`` (views), ``-1`` otherwise;
* an op that writes into its arguments (in-place and ``out=`` ops, from the
  schema's alias annotations, or a version counter bumped during the call) is
  a MUTATE naming the written arguments; if it also makes new outputs, a CALL
  with time 0 follows for them.
* every CALL and MUTATE also carries FLOPS (torch's formula for the op, 0
  where it has none), READ (bytes of its tensor arguments) and WRITE (bytes it
  wrote), for replays scored with estimated costs (dtr/cost.py); a view op
  reads and writes 0. (``native_batch_norm``'s running statistics
  are written without either sign at this dispatch level, so that write is
  not recorded; the statistics are constants anyway.)
* when a recorded tensor object dies (a weakref finalizer), its handle is
  RELEASEd, so the trace shows when autograd frees saved activations.

Implemented as its own ``TorchDispatchMode`` that only logs and never
changes what runs; it does not use the dtr runtime.
"""
from __future__ import annotations

import itertools
import time
import weakref
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..cost import op_flops, tensor_bytes
from .trace import Call, Constant, Mutate, Release, dumps_instr, Annotate

__all__ = ["record", "Recorder"]


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except Exception:  # e.g. tensors without storage
        return int(t.numel() * t.element_size())


def _storage_ptr(t: torch.Tensor) -> Optional[int]:
    try:
        p = t.untyped_storage().data_ptr()
    except Exception:
        return None
    return p or None


class Recorder(TorchDispatchMode):
    """The dispatch mode behind :func:`record`; ``instrs`` holds what it logged."""

    def __init__(self, sync_cuda: bool = True):
        super().__init__()
        self.instrs: List = [Annotate("START")]
        self._names: Dict[int, str] = {}  # id(tensor) -> handle name
        self._counter = itertools.count()
        self._open = True
        self._sync = sync_cuda
        me = weakref.ref(self)
        self._me = me

    # -- handles -----------------------------------------------------------
    def _fresh(self) -> str:
        return f"x{next(self._counter)}"

    def _track(self, t: torch.Tensor) -> str:
        name = self._fresh()
        key = id(t)
        self._names[key] = name
        me = self._me

        def died(key=key, name=name):
            rec = me()
            if rec is not None and rec._open and rec._names.get(key) == name:
                del rec._names[key]
                rec.instrs.append(Release(name))

        weakref.finalize(t, died)
        return name

    def _handle(self, t: torch.Tensor) -> str:
        name = self._names.get(id(t))
        if name is None:
            # Made outside the block (or before it): a constant.
            name = self._track(t)
            self.instrs.append(Constant(name, _storage_bytes(t)))
        return name

    # -- ops -----------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        names = [self._handle(t) for t in tensors]
        written = set()
        schema = getattr(func, "_schema", None)
        if schema is not None:
            for i, a in enumerate(schema.arguments):
                info = a.alias_info
                if info is None or not info.is_write:
                    continue
                v = args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name)
                if v is None and i < len(args):
                    v = args[i]
                for x in tree_flatten(v)[0]:
                    if isinstance(x, torch.Tensor):
                        written.add(id(x))
        # Writes the schema does not annotate, if they bump the version counter.
        versions = []
        for t in tensors:
            try:
                versions.append(t._version)
            except Exception:
                versions.append(None)
        cuda = self._sync and any(t.is_cuda for t in tensors)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        out = func(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter_ns() - t0
        for t, v in zip(tensors, versions):
            try:
                if v is not None and t._version != v:
                    written.add(id(t))
            except Exception:
                pass
        opname = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        # For cost estimates (dtr/cost.py): a view op reads and writes nothing.
        is_view = bool(getattr(func, "is_view", False))
        flops = op_flops(func, args, kwargs, out)
        read = 0 if is_view else tensor_bytes(tensors)
        if written:
            idx = tuple(k for k, t in enumerate(tensors) if id(t) in written)
            if idx:
                wbytes = tensor_bytes(t for t in tensors if id(t) in written)
                self.instrs.append(Mutate(opname, tuple(names), idx, float(dt), flops, read, wbytes))
                dt = 0  # any new outputs below are part of the same op
                flops = read = 0
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        in_ids = {id(t) for t in tensors}
        results, sizes, aliases, new = [], [], [], []
        ptrs = {}
        for k, t in enumerate(tensors):
            p = _storage_ptr(t)
            if p is not None:
                ptrs.setdefault(p, k)
        for o in outs:
            if id(o) in in_ids or id(o) in self._names:
                continue  # an argument returned as is (in-place / out=)
            k = ptrs.get(_storage_ptr(o), -1) if _storage_ptr(o) is not None else -1
            name = self._track(o)
            results.append(name)
            sizes.append(_storage_bytes(o))
            aliases.append(k)
            new.append(o)
        if results or not written:
            wbytes = tensor_bytes(o for o, a in zip(new, aliases) if a < 0)
            self.instrs.append(Call(opname, tuple(names), tuple(results), float(dt), tuple(sizes),
                                    tuple(aliases), flops, read, wbytes))
        return out

    def close(self) -> None:
        self._open = False

    def lines(self) -> List[str]:
        out: List[str] = []
        for ins in self.instrs:
            out.extend(dumps_instr(ins))
        return out


class record:
    """Context manager: log every op run inside it to ``path`` (JSON lines).

    Values still alive at the end are not released in the trace (they are the
    step's outputs, as in the prototype's logs). ``recorder`` gives the
    instructions after the block.
    """

    def __init__(self, path: Optional[str], sync_cuda: bool = True):
        self.path = path
        self.recorder = Recorder(sync_cuda=sync_cuda)

    def __enter__(self) -> "record":
        self.recorder.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.recorder.__exit__(*exc)
        self.recorder.close()
        if self.path is not None:
            with open(self.path, "w") as f:
                for line in self.recorder.lines():
                    f.write(line + "\n")

    @property
    def instrs(self):
        return self.recorder.instrs
