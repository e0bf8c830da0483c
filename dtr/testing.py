"""Helpers for checking code against eager PyTorch under recomputation."""
from __future__ import annotations

import gc

from . import _ext
from .policies import DEFAULT_POLICY
from .records import Cell, Recipe, StorageRecord
from .session import Session

__all__ = ["evict_everything", "live_runtime_objects"]


def evict_everything(policy=DEFAULT_POLICY, *, runtime=None) -> Session:
    """Like ``dtr.budget`` with no limit, but evicts every evictable value after every op.

    Every value an op needs is then recomputed from its recipe, so running any
    code under it and comparing with eager checks recomputation at its harshest.
    """
    return Session(None, policy, runtime=runtime, _evict_all=True)


def live_runtime_objects(runtime: str) -> dict:
    """Cells, recipes and storage records alive now in every session of ``runtime``.

    For leak tests (tests/test_soak.py). The C++ runtime counts them as they are made
    and freed (Note [Live object counts] in csrc/live_count.h); the Python runtime's are
    found by walking the garbage collector's objects, after a collection.
    """
    if runtime == "cpp":
        return dict(_ext._C.live_objects())
    if runtime != "python":
        raise ValueError(f"dtr: runtime must be 'python' or 'cpp', got {runtime!r}")
    gc.collect()
    counts = {"cells": 0, "recipes": 0, "storages": 0}
    names = {Cell: "cells", Recipe: "recipes", StorageRecord: "storages"}
    for obj in gc.get_objects():
        name = names.get(type(obj))
        if name is not None:
            counts[name] += 1
    return counts
