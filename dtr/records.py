"""Storage records, cells and recompute recipes.

See Note [Ownership] in docs/design.md. In short: strong references run from a
wrapper to its cell, from a cell to its storage record and its recipe, and from
a recipe to its *input* cells. Nothing points strongly from an input to the
values computed from it, so a value nobody can reach is collected by Python's
reference counting, and its storage record tells the runtime when that happens.
"""
from __future__ import annotations

import weakref
from typing import List, Optional

import torch

# Note [Dead view cells] (StorageRecord.add_cell): a storage's cell list is first pruned
# at this length, and again after an eviction empties it.
FIRST_CELL_PRUNE = 8


class Slot:
    """Placeholder for the i-th tensor input inside an argument template."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i

    def __repr__(self) -> str:
        return f"<in{self.i}>"


def _leaf(a, tensors: List[torch.Tensor]):
    # Not a closure: a recursive closure is a reference cycle that would keep
    # `tensors` (and the memory of every input) alive until the next GC pass.
    if isinstance(a, torch.Tensor):
        tensors.append(a)
        return Slot(len(tensors) - 1)
    t = type(a)
    if t is list or t is tuple:
        for x in a:
            tx = type(x)
            # Nested lists: c10d collectives take Tensor[][] (all_gather's outputs).
            if isinstance(x, torch.Tensor) or ((tx is list or tx is tuple) and _has_tensor(x)):
                return t(_leaf(y, tensors) for y in a)
    return a


def _has_tensor(a) -> bool:
    for x in a:
        if isinstance(x, torch.Tensor):
            return True
        tx = type(x)
        if (tx is list or tx is tuple) and _has_tensor(x):
            return True
    return False


def flatten_args(args, kwargs):
    """Split an aten call into a template (tensors replaced by Slots) and the tensors."""
    tensors: List[torch.Tensor] = []
    targs = [_leaf(a, tensors) for a in args]
    tkwargs = {k: _leaf(v, tensors) for k, v in kwargs.items()} if kwargs else {}
    return targs, tkwargs, tensors


def _fill_one(a, vals):
    t = type(a)
    if t is Slot:
        return vals[a.i]
    if t is list or t is tuple:
        if a and any(type(x) is Slot for x in a):
            return t(vals[x.i] if type(x) is Slot else x for x in a)
        if a and any(type(x) is list or type(x) is tuple for x in a):
            return t(_fill_one(x, vals) for x in a)
    return a


def fill_args(targs, tkwargs, vals):
    args = [_fill_one(a, vals) for a in targs]
    kwargs = {k: _fill_one(v, vals) for k, v in tkwargs.items()} if tkwargs else {}
    return args, kwargs


def slots_in(a) -> List[int]:
    """Indices of the tensor inputs that a template entry refers to."""
    if type(a) is Slot:
        return [a.i]
    if type(a) in (list, tuple):
        out: List[int] = []
        for x in a:
            out.extend(slots_in(x))
        return out
    return []


class PlainInput:
    """A tensor made outside the runtime, as a recipe input, with its version when recorded."""

    __slots__ = ("tensor", "version", "scratch", "__weakref__")

    def __init__(self, tensor: torch.Tensor, scratch: bool = False):
        self.tensor = tensor
        # A scratch input is only written by the op (BatchNorm's running stats in
        # training), or is the recipe's own copy of an inference tensor (Note
        # [Inference tensors as recipe inputs] in runtime.py): recompute passes a copy,
        # and no version is checked (an inference tensor has none).
        self.version = 0 if scratch else tensor._version
        self.scratch = scratch


class Recipe:
    """How to recompute the outputs of one op call.

    ``inputs`` holds Cells and PlainInputs (strongly: a recipe keeps its inputs'
    recipes alive, never their values). ``outputs`` holds weak references to
    the cells it fills. ``mutation`` (in-place ops) lists, per written
    argument, the input index of the old base cell and the chain of view
    recipes from that base to the written view: recompute clones the base and
    writes into the clone, never into the old value.
    """

    __slots__ = (
        "func",
        "targs",
        "tkwargs",
        "inputs",
        "rng",
        "cost",
        "outputs",
        "out_bytes",
        "is_view",
        "out_index",
        "mutation",
        "grad_enabled",
        "size_key",
        "__weakref__",
    )

    def __init__(self, func, targs, tkwargs, inputs, rng, cost: float, is_view: bool = False,
                 out_index: Optional[int] = None, mutation=None):
        # Some kernels behave differently with grad mode on (mkldnn_rnn_layer returns
        # its workspace only then): recompute under the mode the op first ran in.
        self.grad_enabled = torch.is_grad_enabled()
        self.func = func
        self.targs = targs
        self.tkwargs = tkwargs
        self.inputs = inputs
        self.rng = rng
        self.cost = cost
        self.outputs: List[Optional[weakref.ref]] = []
        self.out_bytes = 0
        self.is_view = is_view
        self.out_index = out_index
        self.mutation = mutation
        # The runtime's (op, input shapes and strides) key, under which its scratch is measured.
        self.size_key = None

    def __repr__(self) -> str:
        return f"Recipe({self.func}, {len(self.inputs)} inputs)"


class StorageRecord:
    """One unit of eviction: a storage and every cell (view) that lives in it."""

    __slots__ = (
        "sid",
        "nbytes",
        "runtime",
        "cells",
        "prune_cells_at",
        "resident",
        "pinned",
        "escaped",
        "nwrappers",
        "wrappers",
        "banish_pending",
        "__weakref__",
    )

    def __init__(self, runtime, sid: int, nbytes: int, pinned: bool):
        self.runtime = runtime
        self.sid = sid
        self.nbytes = nbytes
        self.cells: List[weakref.ref] = []  # cells currently holding a value; see add_cell
        self.prune_cells_at = FIRST_CELL_PRUNE
        self.resident = True
        self.pinned = pinned  # never evicted (no recipe, or escaped)
        self.escaped = False  # handed out as a plain tensor; counted as plain memory
        self.nwrappers = 0
        self.wrappers: List[weakref.ref] = []
        self.banish_pending = False  # its last wrapper died while it was locked

    def add_cell(self, cell) -> None:
        """A cell that now holds a value in this storage.

        Note [Dead view cells]
        Only eviction empties ``cells``. A view taken and dropped (``v = y[0]`` in a
        loop) leaves a dead weak reference, which stays allocated while it is listed;
        dead ones are dropped when the list reaches twice its length after the last
        pruning (at least 8): O(1) amortized. Eviction empties the list and starts the
        threshold from 8 again. csrc/records.cpp does the same."""
        cells = self.cells
        cells.append(weakref.ref(cell))
        if len(cells) >= self.prune_cells_at:
            cells[:] = [r for r in cells if r() is not None]
            self.prune_cells_at = max(FIRST_CELL_PRUNE, 2 * len(cells))

    def __del__(self):
        rt = self.runtime
        if rt is not None:
            rt._storage_died(self)

    def __repr__(self) -> str:
        return (f"StorageRecord(sid={self.sid}, nbytes={self.nbytes}, resident={self.resident}, "
                f"pinned={self.pinned}, wrappers={self.nwrappers})")


class Cell:
    """One tensor value: its concrete tensor when resident, and how to recompute it."""

    __slots__ = ("value", "recipe", "index", "storage", "__weakref__")

    def __init__(self, value: Optional[torch.Tensor], recipe: Optional[Recipe], index: int,
                 storage: StorageRecord):
        self.value = value
        self.recipe = recipe
        self.index = index
        self.storage = storage

    def view_parent(self) -> Optional["Cell"]:
        r = self.recipe
        if r is not None and r.is_view:
            p = r.inputs[0]
            if isinstance(p, Cell) and p.storage is self.storage:
                return p
        return None

    def __repr__(self) -> str:
        state = "resident" if self.value is not None else "evicted"
        return f"Cell({state}, {self.recipe!r}, sid={self.storage.sid})"

