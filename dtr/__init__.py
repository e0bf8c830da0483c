"""dtr: Dynamic Tensor Rematerialization for PyTorch.

    import dtr
    with dtr.budget("2GB") as session:
        loss = model(x).sum()
        loss.backward()
    print(session.stats)
"""
import torch  # noqa: F401  (before the C++ extension)

from . import _ext  # noqa: F401  (warns once when dtr._C is missing)
from . import device_memory
from . import measure, policies, scratch, step_plan, testing
from . import policies_extra  # noqa: F401  (registers dtr_regions, dtr_eq_sqrt)
from .errors import (BudgetExceededError, DTRError, RecomputeError, StaleInputError,
                     ThrashWarning, UnsupportedOpError)
from .policies import SearchOptions
from .runtime import Stats
from .session import Session, budget, parse_budget
from .tensor import DTRTensor, is_dtr_tensor, unwrap
from .compile import compile_backend
from .sim import record

# See Note [Counting CPU allocator]: every CPU tensor made from here on is counted (those
# alive already, found by the garbage collector's walk, until they die).
device_memory.install_cpu_counter()

__version__ = "0.1.0"

__all__ = [
    "budget",
    "Session",
    "Stats",
    "SearchOptions",
    "parse_budget",
    "unwrap",
    "is_dtr_tensor",
    "DTRTensor",
    "compile_backend",
    "record",
    "policies",
    "measure",
    "testing",
    "DTRError",
    "BudgetExceededError",
    "StaleInputError",
    "UnsupportedOpError",
    "RecomputeError",
    "ThrashWarning",
]
