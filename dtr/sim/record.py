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
* on CPU with the counting allocator (dtr/scratch.py), every CALL and MUTATE
  carries SCRATCH: the bytes the kernel allocated beyond its outputs, the
  peak above the op's start less what is still allocated at its end (Note
  [Op scratch in traces] in trace.py);
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

from .. import _ext
from .. import scratch as _scratch
from ..cost import op_flops, op_key, tensor_bytes
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

    def __init__(self, sync_cuda: bool = True, measure_scratch: bool = True,
                 keep_keys: bool = False):
        super().__init__()
        self.instrs: List = [Annotate("START")]
        # Index in instrs of a CALL/MUTATE -> dtr.cost.op_key of its op (keep_keys):
        # what ties a record to the runtime's per-(op, shapes) costs
        # (bench/sim_vs_runtime.py). A MUTATE's trailing CALL of time 0 has none.
        self.op_keys: Dict[int, tuple] = {}
        self._keep_keys = keep_keys
        self._measure_scratch = measure_scratch and _scratch.enable()
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
        on_cuda = any(t.is_cuda for t in tensors)
        cuda = self._sync and on_cuda
        # Note [Measured op scratch] in dtr/scratch.py, on CPU only.
        window = _ext._C.meter_begin() if self._measure_scratch and not on_cuda else -1
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        try:
            out = func(*args, **kwargs)
        except BaseException:
            if window >= 0:
                _ext._C.meter_end(window)
            raise
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter_ns() - t0
        scratch = 0
        if window >= 0:
            peak_above, still_allocated = _ext._C.meter_end(window)
            scratch = max(int(peak_above - still_allocated), 0)
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
        keyed = False
        if written:
            idx = tuple(k for k, t in enumerate(tensors) if id(t) in written)
            if idx:
                wbytes = tensor_bytes(t for t in tensors if id(t) in written)
                self._note_key(func, args, kwargs)
                self.instrs.append(Mutate(opname, tuple(names), idx, float(dt), flops, read, wbytes,
                                          scratch))
                dt = 0  # any new outputs below are part of the same op
                flops = read = scratch = 0
                keyed = True
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
            if not keyed:
                self._note_key(func, args, kwargs)
            self.instrs.append(Call(opname, tuple(names), tuple(results), float(dt), tuple(sizes),
                                    tuple(aliases), flops, read, wbytes, scratch))
        return out

    def _note_key(self, func, args, kwargs) -> None:
        if self._keep_keys:
            self.op_keys[len(self.instrs)] = op_key(func, args, kwargs)

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

    def __init__(self, path: Optional[str], sync_cuda: bool = True, measure_scratch: bool = True,
                 keep_keys: bool = False):
        self.path = path
        self.recorder = Recorder(sync_cuda=sync_cuda, measure_scratch=measure_scratch,
                                 keep_keys=keep_keys)

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
