"""The exceptions ``dtr`` raises. Messages begin with ``dtr:`` and end with a remedy."""

__all__ = [
    "DTRError",
    "BudgetExceededError",
    "StaleInputError",
    "UnsupportedOpError",
    "RecomputeError",
    "ThrashWarning",
]


class DTRError(RuntimeError):
    """Base class of every error raised by dtr."""


class BudgetExceededError(DTRError):
    """The memory budget cannot be met: one op's working set or the pinned memory is too large."""

    def __init__(self, message: str, *, op: str, needed_bytes: int, pinned_bytes: int,
                 budget_bytes: int, smallest_feasible_bytes: int):
        super().__init__(message)
        self.op = op
        self.needed_bytes = needed_bytes
        self.pinned_bytes = pinned_bytes
        self.budget_bytes = budget_bytes
        self.smallest_feasible_bytes = smallest_feasible_bytes


class StaleInputError(DTRError):
    """A value cannot be recomputed because a tensor it was made from was changed in place since."""


class UnsupportedOpError(DTRError):
    """An operator whose semantics dtr cannot preserve was called on a dtr tensor."""


class ThrashWarning(UserWarning):
    """A block recomputed more than THRASH_GUARD_RATIO times its own compute
    (Note [Thrash guard] in dtr/policies.py): its budget is at the edge."""


class RecomputeError(DTRError):
    """Recomputing an evicted value failed or produced a value of a different shape."""
