"""dtr inside ``torch.distributed``: one runtime per rank, under that rank's own budget.

Nothing here is needed for DDP: open ``dtr.budget`` on every rank around the
forward and backward pass, exactly as on one process (docs/distributed.md).

    model = DDP(model)
    with dtr.budget("6GB"):            # this rank's limit
        loss = loss_fn(model(x), y)
        loss.backward()                # DDP's reducer sees plain gradients
    optimizer.step()

What this module adds:

* ``budget``: ``dtr.budget`` on this rank's device (``cuda:<current device>``
  when the default process group runs on CUDA, else the CPU), so one launch
  script serves every rank.
* ``fsdp_keep_gathered``: the block under which FSDP2 (``fully_shard``)
  works with dtr. FSDP2 frees the parameters it gathered as soon as a module's
  forward (and backward) is done; dtr may need them again later to recompute
  an evicted activation, and it cannot replay the all-gather. Inside the
  block the gathered parameters stay allocated until the block ends (they
  count against the budget, as plain tensors), then they are resharded.
* ``all_stats``: every rank's ``Stats``, gathered on every rank.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import UnsupportedOpError
from .policies import DEFAULT_POLICY
from .runtime import Stats
from .session import Session, budget as _budget

__all__ = ["budget", "fsdp_keep_gathered", "all_stats", "rank_device"]


def rank_device(group=None) -> torch.device:
    """The device this rank computes on: the current CUDA device when the process
    group's backend is NCCL (or another CUDA backend), else the CPU."""
    if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend or "cuda" in backend:
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def budget(limit: Union[int, str, None], policy=DEFAULT_POLICY, *, group=None, **kwargs) -> Session:
    """``dtr.budget(limit, policy, device=<this rank's device>)``.

    Each rank runs its own runtime: ``limit`` is this rank's limit, not a total.
    Ranks evict and recompute independently; collectives are never replayed
    (see Note [Collectives] in dtr/ops.py), so ranks stay in step.
    """
    if "device" not in kwargs:
        kwargs["device"] = rank_device(group)
    return _budget(limit, policy, **kwargs)


def _fsdp_modules(module: nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError as exc:  # pragma: no cover - torch without FSDP2
        raise UnsupportedOpError(
            "dtr: fsdp_keep_gathered needs torch.distributed.fsdp.FSDPModule (FSDP2, "
            "torch >= 2.6); this torch has none") from exc
    mods = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not mods:
        raise UnsupportedOpError(
            f"dtr: fsdp_keep_gathered({type(module).__name__}) found no module wrapped by "
            "torch.distributed.fsdp.fully_shard inside it; pass the model you called "
            "fully_shard on")
    return mods


def _param_groups(state) -> list:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.7 keeps one group per state
        g = getattr(state, "_fsdp_param_group", None)
        groups = [g] if g is not None else []
    return list(groups)


@contextlib.contextmanager
def fsdp_keep_gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Keep FSDP2's gathered parameters allocated for the block; reshard at its end.

    Use it around the dtr block of an FSDP2 model, on every rank::

        with dtr.distributed.fsdp_keep_gathered(model), dtr.budget("2GB"):
            loss = model(x).sum()
            loss.backward()        # gradients are still reduce-scattered
        optimizer.step()

    Each module's parameters are all-gathered once, at its first forward in the
    block, and stay gathered through backward, so dtr can recompute any
    activation from them. At the end of the block every module is resharded and
    FSDP2's own reshard settings are restored. Without it, FSDP2 frees gathered
    parameters after each module's forward and backward, and recomputing an
    activation from them fails (dtr raises UnsupportedOpError when it notices).
    Read what you need from the block's results (``loss.item()``) inside it.
    """
    mods = _fsdp_modules(module)
    if mods[0] is module:
        # Let FSDP2 pick its root now, as the first forward would: lazy init changes the
        # root's reshard setting, which must not be undone by the restore below.
        state = module._get_fsdp_state()
        if getattr(state, "_is_root", False) is None and hasattr(state, "_lazy_init"):
            state._lazy_init()
    saved = []
    for m in mods:
        state = m._get_fsdp_state()
        groups = _param_groups(state)
        saved.append((m, state, getattr(state, "_auto_reshard_after_forward", None),
                      [(g, g.post_forward_mesh_info, g.reshard_after_backward) for g in groups]))
    try:
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
        yield module
    finally:
        for m in mods:
            m.reshard()
        for m, state, auto, groups in saved:
            if auto is not None:
                state._auto_reshard_after_forward = auto
            for g, post_forward_mesh_info, after_backward in groups:
                g.post_forward_mesh_info = post_forward_mesh_info
                g.reshard_after_backward = after_backward


def all_stats(session: Session, group=None) -> List[Stats]:
    """Every rank's statistics, in rank order, on every rank (a collective: call it on all)."""
    out: List[Optional[dict]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, session.stats.as_dict(), group=group)
    return [Stats(**d) for d in out]
