"""In-place metadata ops on dtr tensors: ``transpose_``, ``squeeze_``, ``as_strided_``, ``resize_``, ``set_``, ...

Note [In-place metadata ops]
An op tagged ``inplace_view`` (and ``resize_``, ``set_``) changes a tensor's shape,
strides, offset or storage without touching any data. In eager only that one tensor
object changes: its views and detached aliases keep their own metadata, and data
written through any of them stays visible to all, since the storage is the same.

Under dtr the op becomes a *view*: the wrapper is rebound to a new cell in the same
storage whose recipe is ``as_strided(parent, size, stride, offset)`` with the metadata
the op produced on the real value (run on an alias of it, so nothing else changes).
Recomputing that is exact for any such op, and being a view cell it is evicted,
recomputed and written through with its storage like every other view. The wrapper's
own metadata (what autograd and user code see) is updated by running the op on the
wrapper itself with dispatch off and the meta key on, as
``torch.utils._python_dispatch.return_and_correct_aliasing`` does.

``set_`` with a dtr tensor as source makes the target a view of the source's storage;
``resize_`` is supported while the new size fits in the storage it already has.
What cannot be expressed as a view is refused with an UnsupportedOpError saying what to
write instead: growing a storage (``resize_`` past it), ``set_`` to a raw storage or to
nothing, and pointing a dtr tensor at a plain tensor's storage.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch.utils._mode_utils import no_dispatch

from .errors import UnsupportedOpError
from .records import Cell, Recipe, Slot
from .tensor import DTRTensor

aten = torch.ops.aten

_RESIZES = {"resize_", "resize_as_", "_resize_output_"}


def _base_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _materialize_arg(rt, a):
    """The value of a dtr argument (for template / size arguments), else ``a``."""
    if type(a) is DTRTensor:
        c = a._cell
        return c.storage.runtime.materialize(c)
    return a


def _on_wrapper(func, args, kwargs) -> None:
    # See Note [In-place metadata ops]: change the wrapper's sizes/strides/offset only.
    with no_dispatch():
        include = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            func(*args, **kwargs)
        finally:
            torch._C._set_meta_in_tls_dispatch_include(include)


def _new_size(name, args, kwargs):
    if name == "resize_as_":
        return list(args[1].shape)
    return list(args[1])


def run(rt, func, info, args, kwargs):
    """Run an in-place metadata op that has a dtr tensor among its arguments."""
    name = _base_name(func)
    target = args[0]
    if type(target) is not DTRTensor:
        if name == "set_":
            raise UnsupportedOpError(
                f"dtr: {info.name} would make a plain tensor share the storage of a dtr tensor, "
                "whose memory dtr may free and recompute at any time. Write `x = source` (or "
                "`x = source.view(...)`) instead of `x.set_(source)`, or use dtr.unwrap(source).")
        # A plain target that only reads a dtr argument's metadata (resize_as_).
        vals = [_materialize_arg(rt, a) for a in args]
        return func(*vals, **kwargs)
    c = target._cell
    rt = c.storage.runtime
    with rt.lock:
        tv = rt.materialize(c)
        parent = c
        if name == "set_":
            src = args[1] if len(args) > 1 else None
            if type(src) is not DTRTensor:
                what = "nothing" if src is None else (
                    "a raw storage" if not isinstance(src, torch.Tensor) else "a plain tensor")
                raise UnsupportedOpError(
                    f"dtr: {info.name} points a dtr tensor at {what}; dtr can only follow a "
                    "storage it computed itself. Make a new tensor instead of re-pointing this "
                    "one (for example `x = torch.empty(0)` instead of `x.set_()`, or "
                    "`x = source.as_strided(size, stride, offset)`), or do it outside the dtr "
                    "block.")
            parent = src._cell
            if parent.storage.runtime is not rt:
                raise UnsupportedOpError(
                    f"dtr: {info.name} joins dtr tensors of two different sessions; run it in the "
                    "session that made both, or use dtr.unwrap on one of them.")
            pv = rt.materialize(parent)
            w = torch.empty(0, dtype=tv.dtype, device=tv.device)
            func(w, pv, *args[2:], **kwargs)
        else:
            if name in _RESIZES:
                size = _new_size(name, args, kwargs)
                need = (tv.storage_offset() + math.prod(size)) * tv.element_size()
                have = tv.untyped_storage().nbytes()
                if need > have:
                    raise UnsupportedOpError(
                        f"dtr: {info.name} would grow the storage of a dtr tensor from {have} to "
                        f"{need} bytes; dtr cannot follow a storage that changes size. Make a new "
                        "tensor instead (for example `x = x.new_empty(size)`: the elements resize_ "
                        "adds are uninitialized anyway, or `torch.cat` to append), or do it "
                        "outside the dtr block.")
            w = aten.alias.default(tv)
            vals = [w] + [_materialize_arg(rt, a) for a in args[1:]]
            func(*vals, **kwargs)
        try:
            _on_wrapper(func, args, kwargs)
        except RuntimeError as e:
            raise UnsupportedOpError(
                f"dtr: {info.name} on a dtr tensor reaches outside the memory this tensor was "
                f"made with ({e}); make a new tensor with the shape you need instead (for "
                "example with as_strided on its base), or do it outside the dtr block.") from None
        recipe = Recipe(aten.as_strided.default,
                        [Slot(0), list(w.size()), list(w.stride()), w.storage_offset()], {},
                        [parent], None, 0.0, is_view=True)
        cell = Cell(w, recipe, 0, parent.storage)
        recipe.outputs.append(weakref.ref(cell))
        parent.storage.add_cell(cell)
        _mark_stale_views(target)
        target._rebind(cell)
    return target


def _mark_stale_views(target) -> None:
    # Note [Views taken before a metadata change]
    # Autograd replays the views of a tensor subclass by their view function
    # (``y[1:]``), not by strides as for plain tensors. After ``y.transpose_()``
    # the replay of a view taken earlier selects other elements, so writing
    # into that view in place would give a wrong gradient (CopySlices). Such
    # views are marked; an in-place write into one while autograd records is
    # refused (see Runtime._run_mutation).
    if not target.requires_grad:
        return
    for ref in target._cell.storage.wrappers:
        w = ref()
        if w is not None and w is not target and w._is_view() and w._base is target:
            w._dtr_stale_view = True


def check_not_stale_view(t, opname: str) -> None:
    """Refuse an in-place write that autograd would differentiate wrongly; see Note [Views taken before a metadata change]."""
    if getattr(t, "_dtr_stale_view", False) and t.requires_grad and torch.is_grad_enabled():
        raise UnsupportedOpError(
            f"dtr: {opname} writes in place into a view taken before its base's shape was changed "
            "in place (transpose_, squeeze_, ...). Autograd replays views of dtr tensors by how "
            "they were taken rather than by their strides, so the gradient would be wrong. Take "
            "the view after the in-place shape change, or use the out-of-place form (for example "
            "`y = y.transpose(0, 1)` instead of `y.transpose_(0, 1)`).")
