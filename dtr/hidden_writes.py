"""Writes into tensors that recipes read: plain tensors written inside the block, and
running statistics a kernel updates without saying so.

Note [Writes into what recipes read]
A recipe reads a plain tensor (a parameter, a buffer) as it was when the op first
ran; the version it recorded lets a recompute notice a later in-place change and
refuse (StaleInputError). Inside a dtr block such a change can be part of the very
step that needs the recompute: instance norm reads ``running_mean`` (``repeat``) and
writes it (``copy_``) in the same module call, and its backward then needs the
``repeat`` again. So before an op the runtime intercepts writes into a plain tensor,
every live recipe input reading that tensor's storage is given a copy of the values it
saw (counted as plain memory while a recipe holds it); the write then goes ahead
on the real tensor. This is found by what ops do (the schema's write annotations,
kwargs included), not by module name. Writes the runtime never sees (an optimizer's
``step()`` under ``no_grad`` touches only plain tensors and is not intercepted) still
raise StaleInputError on a later recompute.

Some kernels write without a write annotation and without moving the version
counter: BatchNorm's running statistics in training (Note [Hidden running-stat
updates] in ops.py). Such an argument is handled like an annotated write. When it is
a dtr tensor (instance norm passes ``running_mean.repeat(b)``), the kernel gets a
scratch copy and the updated copy is then written into the dtr tensor with
``copy_`` through the runtime, so the dtr tensor's recipe records the update and a
recompute of it sees the statistics the kernel produced.
"""
from __future__ import annotations

import weakref
from typing import Dict, List

import torch

from .ops import arg_at
from .records import PlainInput, slots_in


def exact_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the same sizes, strides and storage offset (kernels may choose
    their path by layout, so a copy read by a recompute must have the layout of the original)."""
    t = t.detach()
    st = t.untyped_storage()
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    out.set_(st.clone(), t.storage_offset(), t.size(), t.stride())
    return out


def _key(t: torch.Tensor):
    # An efficient zero tensor (autograd's gradient where a formula knows it is zero, e.g.
    # sgn's of a real input) has a storage without data and cannot be written: no key.
    if t.layout != torch.strided or t._is_zerotensor():
        return None
    p = t.untyped_storage().data_ptr()
    return (p, t.device.type, t.device.index) if p else None


class PlainReaders:
    """Recipe inputs that read plain tensors, by storage: what to copy before a write."""

    __slots__ = ("_by_storage",)

    def __init__(self):
        self._by_storage: Dict[tuple, List[weakref.ref]] = {}

    def add(self, inp: PlainInput) -> None:
        if inp.scratch:
            return
        key = _key(inp.tensor)
        if key is None:
            return
        refs = self._by_storage.get(key)
        if refs is None:
            self._by_storage[key] = [weakref.ref(inp)]
            return
        refs.append(weakref.ref(inp))
        if len(refs) >= 64 and (len(refs) & (len(refs) - 1)) == 0:  # prune at powers of two
            refs[:] = [r for r in refs if r() is not None]

    def before_write(self, rt, t: torch.Tensor) -> None:
        """``t`` is about to be written in place: recipes reading its storage keep what they saw."""
        key = _key(t)
        if key is None:
            return
        refs = self._by_storage.pop(key, None)
        if not refs:
            return
        copies = {}
        for ref in refs:
            inp = ref()
            if inp is None or inp.tensor._version != inp.version:
                continue  # dead, or already stale (its recompute raises StaleInputError)
            src = inp.tensor
            snap = copies.get(id(src))
            if snap is None:
                snap = copies[id(src)] = exact_copy(src)
                rt.count_plain(snap)
            inp.tensor = snap
            inp.version = snap._version


def hidden_write_slots(info, targs, tkwargs) -> List[int]:
    """Slots of arguments the op writes without a write annotation (running stats in training)."""
    if info.running_stats is None:
        return []
    (im, iv), itrain = info.running_stats
    if itrain is not None and not bool(arg_at(targs, tkwargs, itrain, "training")):
        return []
    out: List[int] = []
    for pos in (im, iv):
        out.extend(slots_in(arg_at(targs, tkwargs, pos, "")))
    return out
