"""Helpers for checking code against eager PyTorch under recomputation."""
from __future__ import annotations

from .session import Session

__all__ = ["evict_everything"]


def evict_everything(policy="dtr_eq", *, runtime=None) -> Session:
    """Like ``dtr.budget`` with no limit, but evicts every evictable value after every op.

    Every value an op needs is then recomputed from its recipe, so running any
    code under it and comparing with eager checks recomputation at its harshest.
    """
    return Session(None, policy, runtime=runtime, _evict_all=True)
