"""The wrapper tensor subclass: what user code holds in place of an evictable value.

A ``DTRTensor`` carries the metadata of its value (shape, strides, dtype,
device) and a reference to its ``Cell``; the data lives in the cell, which the
runtime may evict and recompute at any time. Autograd works on the wrappers.
"""
from __future__ import annotations

import copy

import torch
from torch.utils._mode_utils import no_dispatch

from . import _ext
from .errors import UnsupportedOpError
from .records import Cell

__all__ = ["DTRTensor", "unwrap", "is_dtr_tensor"]


class DTRTensor(torch.Tensor):
    # Torch functions go straight to dispatch, where the runtime sees aten ops.
    __torch_function__ = torch._C._disabled_torch_function_impl

    _cell: Cell

    @staticmethod
    def _from_cell(cell: Cell, value: torch.Tensor) -> "DTRTensor":
        r = torch.Tensor._make_wrapper_subclass(
            DTRTensor,
            value.size(),
            strides=value.stride(),
            storage_offset=value.storage_offset(),
            dtype=value.dtype,
            layout=value.layout,
            device=value.device,
            requires_grad=False,
        )
        r._cell = cell
        rec = cell.storage
        rec.runtime.attach(rec, r)
        return r

    def _rebind(self, cell: Cell) -> None:
        old = self._cell.storage
        self._cell = cell
        cell.storage.runtime.attach(cell.storage, self)
        old.runtime.detach_wrapper(old)

    def __del__(self):
        cell = self.__dict__.get("_cell")
        if cell is not None:
            rec = cell.storage
            rec.runtime.detach_wrapper(rec)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached when no dtr block is active on this thread (the tensor's own
        # session runs the op: the runtime outlives its block, PITFALLS 4), or
        # when the block's mode left the op to a foreign subclass.
        foreign = foreign_subclasses(types)
        if foreign:
            for t in foreign:
                out = t.__torch_dispatch__(func, types, args, kwargs)
                if out is not NotImplemented:
                    return out
            args, kwargs = _as_plain(func, foreign, args, kwargs or {})
        rt = _runtime_of(args, kwargs)
        return rt.dispatch(func, args, kwargs or {})

    # Note [Escapes]
    # Tensors that leave the block stay DTRTensors and keep working through
    # their session. Whatever must see real memory (numpy, tolist, data_ptr,
    # torch.save) gets the materialized value, whose storage is then pinned:
    # it is never evicted again, so a pointer or array handed out stays valid.
    def numpy(self, *, force: bool = False):
        return unwrap(self).numpy(force=force)

    def tolist(self):
        return unwrap(self).tolist()

    def data_ptr(self) -> int:
        return unwrap(self).data_ptr()

    def untyped_storage(self):
        return unwrap(self).untyped_storage()

    def __reduce_ex__(self, proto):
        # torch.save / pickle / deepcopy store a plain tensor.
        value = unwrap(self).detach()
        if self.requires_grad:
            value.requires_grad_(True)
        return value.__reduce_ex__(proto)

    def __deepcopy__(self, memo):
        value = unwrap(self).detach().clone()
        if self.requires_grad:
            value.requires_grad_(True)
        memo[id(self)] = value
        return value

    def __repr__(self, *, tensor_contents=None):
        return _repr(self, unwrap(self))

    # --- torch.compile support (dtr/compile.py) ---
    def __coerce_same_metadata_as_tangent__(self, expected_metadata, expected_type=None):
        # aot_autograd's backward expects plain tangents (compiled graphs never return
        # DTRTensors to user code); a gradient computed by eager code under dtr
        # reaches it as a DTRTensor and is handed over as its plain value.
        if expected_type is not None and expected_type is not torch.Tensor:
            return None
        return unwrap(self)


def _repr(t: torch.Tensor, value: torch.Tensor) -> str:
    if t.grad_fn is not None:
        grad = f", grad_fn=<{type(t.grad_fn).__name__}>"
    else:
        grad = ", requires_grad=True" if t.requires_grad else ""
    return f"DTRTensor({value!r}{grad})"


# The C++ runtime's tensors are torch.Tensors, so Note [Escapes] is done for
# them by replacing a few torch.Tensor methods (see Note [Escapes of C++
# wrappers] in csrc/escapes.h): for any other tensor they are torch's own. These
# are the escape functions the replacements call for a C++ wrapper (None: torch's
# method on the escaped value); they run with plain-only ops left plain.
def _cpp_repr(self, *, tensor_contents=None):
    return _repr(self, _ext._C.unwrap(self))


def _cpp_reduce_ex(self, proto):
    # torch.save / pickle / copy.copy store a plain tensor, with the wrapper's
    # requires_grad and Python attributes, as they would store a plain one.
    value = _ext._C.escape(self)
    value.__dict__.update(self.__dict__)
    return value.__reduce_ex__(proto)


def _cpp_deepcopy(self, memo):
    if not self.is_leaf:
        return TORCH_METHODS["__deepcopy__"](self, memo)  # raises torch's error for non-leaves
    if id(self) in memo:
        return memo[id(self)]
    value = _ext._C.escape(self)
    # torch's __deepcopy__ keys memo by id(value): keep value alive as long as memo
    # (what copy.deepcopy does for the objects it copies).
    memo.setdefault(id(memo), []).append(value)
    new = value.__deepcopy__(memo)  # copies the storage through memo, as for plain tensors
    if self.grad is not None:
        new.grad = self.grad.__deepcopy__(memo)
    new.__dict__ = copy.deepcopy(self.__dict__, memo)
    memo[id(self)] = new
    return new


_CPP_ESCAPES = {
    "tolist": None,
    "numpy": None,
    "data_ptr": None,
    "untyped_storage": None,
    "__dlpack__": None,
    "__repr__": _cpp_repr,
    "__reduce_ex__": _cpp_reduce_ex,
    "__deepcopy__": _cpp_deepcopy,
}


# torch's own methods, as they were before install_cpp_escapes (for the tests).
TORCH_METHODS = {name: getattr(torch.Tensor, name) for name in _CPP_ESCAPES}


def install_cpp_escapes() -> None:
    """Called when the first C++ runtime is made; idempotent."""
    _ext._C.install_escape_methods(torch.Tensor, _CPP_ESCAPES)


# Note [Foreign subclasses]
# A tensor subclass that defines its own __torch_dispatch__ (a wrapper such as
# torchao's, or one holding real data) gets the first say on an op it takes part
# in: the dtr mode returns NotImplemented for it, and DTRTensor asks it before
# running the op itself. A subclass that does not define __torch_dispatch__
# (nn.Parameter, lazy modules' UninitializedParameter) is a plain tensor to dtr.
# When every foreign subclass defers (returns NotImplemented), dtr runs the op
# with those arguments viewed as plain tensors, which works for subclasses that
# hold their data in their own storage; a wrapper with no storage of its own
# cannot be combined with dtr and gets an UnsupportedOpError naming it.
def _own_dispatch(t) -> bool:
    d = getattr(t, "__torch_dispatch__", None)
    return d is not None and getattr(d, "__func__", d) is not _TENSOR_DISPATCH


_TENSOR_DISPATCH = getattr(torch.Tensor.__torch_dispatch__, "__func__", torch.Tensor.__torch_dispatch__)


def foreign_subclasses(types):
    """The subclasses among ``types`` other than DTRTensor that define __torch_dispatch__."""
    out = None
    for t in types:
        if t is not DTRTensor and t is not torch.Tensor and _own_dispatch(t):
            if out is None:
                out = []
            out.append(t)
    return out


def _as_plain(func, foreign, args, kwargs):
    foreign = tuple(foreign)

    def conv(a):
        if isinstance(a, foreign):
            try:
                with no_dispatch():
                    p = a.as_subclass(torch.Tensor)
                    p.untyped_storage().data_ptr()
            except Exception:
                raise UnsupportedOpError(
                    f"dtr: {func} combines a dtr tensor with a {type(a).__module__}."
                    f"{type(a).__qualname__}, a tensor subclass with its own __torch_dispatch__ "
                    "that defers to dtr (returns NotImplemented) and holds no data of its own, so "
                    "neither can run the op. Convert it to a plain tensor before the dtr block, or "
                    "run this code outside the block.") from None
            return p
        if type(a) in (list, tuple):
            return type(a)(conv(x) for x in a)
        return a

    return [conv(a) for a in args], {k: conv(v) for k, v in kwargs.items()}


def _runtime_of(args, kwargs):
    for a in list(args) + list((kwargs or {}).values()):
        if type(a) is DTRTensor:
            return a._cell.storage.runtime
        if type(a) in (list, tuple):
            for x in a:
                if type(x) is DTRTensor:
                    return x._cell.storage.runtime
    raise RuntimeError("dtr: internal error: no dtr tensor among the arguments")


def is_dtr_tensor(t) -> bool:
    """Whether ``t`` is a tensor of either runtime (a wrapper whose value dtr may evict)."""
    if type(t) is DTRTensor:
        return True
    return isinstance(t, torch.Tensor) and _ext._C is not None and _ext._C.is_dtr(t)


def unwrap(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding ``t``'s value (``t`` itself when it is not a dtr tensor).

    The value is materialized and its storage pinned (never evicted again), so the
    returned tensor stays valid. It shares memory with ``t``.
    """
    if type(t) is not DTRTensor:
        if _ext._C is not None and isinstance(t, torch.Tensor):
            return _ext._C.unwrap(t)  # the C++ runtime's tensors; plain ones come back as they are
        return t
    cell = t._cell
    return cell.storage.runtime.escape(cell)
