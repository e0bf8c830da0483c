"""What the runtime needs to know about each aten operator, computed once per overload."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

aten = torch.ops.aten

# Note [Hidden running-stat updates]
# BatchNorm in training updates running_mean/running_var in place. Some
# overloads (native_batch_norm) do not even mark those arguments as written.
# A recompute must not update them again: it gets a scratch copy instead.
# Value: positions of (running_mean, running_var) and of the `training` flag
# (None when the overload always trains).
_RUNNING_STATS: Dict[object, Tuple[Tuple[int, int], Optional[int]]] = {}


def _register_running_stats():
    table = [
        ("native_batch_norm", "default", (3, 4), 5),
        ("_native_batch_norm_legit", "default", (3, 4), 5),
        ("_batch_norm_with_update", "default", (3, 4), None),
        ("cudnn_batch_norm", "default", (3, 4), 5),
        ("miopen_batch_norm", "default", (3, 4), 5),
        ("batch_norm_update_stats", "default", (1, 2), None),
    ]
    for name, overload, stats, training in table:
        packet = getattr(aten, name, None)
        op = getattr(packet, overload, None) if packet is not None else None
        if op is not None:
            _RUNNING_STATS[op] = (stats, training)


_register_running_stats()

# Ops that change a tensor's metadata or storage in place (beside those tagged
# inplace_view); see Note [In-place metadata ops] in metadata_ops.py.
_METADATA_INPLACE_NAMES = {"resize_", "resize_as_", "set_", "_resize_output_"}


# c10d's in-place collectives do not mark what they write in their schemas
# (``c10d::allreduce_(Tensor[] tensors, ...)``): the written argument, by name.
_C10D_WRITES = {
    "allreduce_": "tensors", "allreduce_coalesced_": "tensors", "broadcast_": "tensors",
    "reduce_": "tensors", "recv_": "tensors", "recv_any_source_": "tensors",
    "allgather_": "output_tensors", "allgather_coalesced_": "output_lists",
    "_allgather_base_": "output_tensor", "allgather_into_tensor_coalesced_": "outputs",
    "reduce_scatter_": "output_tensors", "_reduce_scatter_base_": "output_tensor",
    "reduce_scatter_tensor_coalesced_": "outputs", "gather_": "output_tensors",
    "scatter_": "output_tensors", "alltoall_": "output_tensors", "alltoall_base_": "output",
}

_COLLECTIVE_NAMESPACES = {"c10d", "_c10d_functional", "c10d_functional",
                          "_c10d_functional_autograd", "_dtensor"}


class OpInfo:
    __slots__ = (
        "name",
        "is_view",
        "mutated",
        "seeded",
        "returns_tensor",
        "running_stats",
        "metadata_inplace",
        "alias_ok",
        "collective",
        "workspace",
        "run_as",
    )

    def __init__(self, func):
        schema = func._schema
        self.name = str(func)
        self.is_view = bool(func.is_view)
        # (position, name) of every argument the schema marks as written.
        self.mutated: List[Tuple[int, str]] = [
            (i, a.name)
            for i, a in enumerate(schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        ]
        tags = func.tags
        self.seeded = torch.Tag.nondeterministic_seeded in tags
        self.returns_tensor = any(
            "Tensor" in str(r.type) for r in schema.returns
        )
        self.running_stats = _RUNNING_STATS.get(func)
        if self.running_stats is not None:
            # The running stats are handled as scratch inputs, not as mutations.
            stat_pos = set(self.running_stats[0])
            self.mutated = [m for m in self.mutated if m[0] not in stat_pos]
        self.metadata_inplace = (
            torch.Tag.inplace_view in tags
            or schema.name.split("::")[-1] in _METADATA_INPLACE_NAMES
        )
        # detach/alias: the output is the same value; it shares the input's cell.
        self.alias_ok = func in (aten.detach.default, aten.alias.default)
        # Note [Collectives]
        # Communication ops are never replayed: every rank would have to replay
        # them together. Their outputs are pinned (unevictable) values, and an
        # output that aliases an input is that same value.
        ns, _, base = schema.name.partition("::")
        self.collective = ns in _COLLECTIVE_NAMESPACES
        if ns == "c10d" and base in _C10D_WRITES:
            # In place: the written tensors become new pinned values (see _run_mutation);
            # the values they held before keep their recipes.
            self.mutated = [(i, a.name) for i, a in enumerate(schema.arguments)
                            if a.name == _C10D_WRITES[base]]
        # Functional collectives hand their result to ``_wrap_tensor_autograd``, whose
        # kernel returns an AsyncCollectiveTensor (waited on at first use). A dtr tensor
        # cannot hold one: wait at once instead; the result is the same value.
        self.run_as = None
        if schema.name == "_c10d_functional::_wrap_tensor_autograd":
            self.run_as = torch.ops._c10d_functional.wait_tensor.default
        # Note [Op workspace]
        # Some kernels allocate scratch memory the runtime never sees as a
        # tensor. Measured on torch 2.13 CPU (oneDNN): a convolution's forward
        # scratch peaks at about its output's bytes, its backward at twice the
        # incoming gradient's, BatchNorm's backward at one input's worth. Room
        # is made for it before the op runs (see ``workspace_bytes``), so the
        # budget holds for the allocator too, not only for tracked tensors.
        # oneDNN also reorders the weights and keeps a fixed scratch of a few
        # tens of KiB, which dominates for small convolutions.
        base = schema.name.split("::")[-1]
        if base == "convolution_backward":
            # ((tensor input index, or -1 for the outputs), factor) terms + constant
            self.workspace = (((0, 2.0), (2, 2.0)), 32 << 10)
        elif "convolution" in base:
            self.workspace = (((-1, 1.0), (1, 2.0)), 32 << 10)
        elif "batch_norm_backward" in base:
            self.workspace = (((1, 1.0),), 0)
        else:
            self.workspace = None


_CACHE: Dict[object, OpInfo] = {}


def op_info(func) -> OpInfo:
    info = _CACHE.get(func)
    if info is None:
        info = _CACHE[func] = OpInfo(func)
    return info


def workspace_bytes(info: OpInfo, out_bytes: int, vals) -> int:
    """Scratch bytes to reserve for an op with these input values; see Note [Op workspace]."""
    terms, constant = info.workspace
    tensors = [v for v in vals if isinstance(v, torch.Tensor)]
    total = float(constant)
    for which, factor in terms:
        if which < 0:
            total += factor * out_bytes
        elif which < len(tensors):
            total += factor * tensors[which].nbytes
    return int(total)


def arg_at(args, kwargs, pos: int, name: str):
    if pos < len(args):
        return args[pos]
    return kwargs.get(name) if kwargs else None
