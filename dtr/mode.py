"""The dispatch mode that routes every op run inside a dtr block to the runtime."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .tensor import DTRTensor, foreign_subclasses


def _has_dtr_or_tensor(args, kwargs):
    """(any DTRTensor among the arguments, any tensor among them)."""
    any_tensor = False
    for a in args:
        t = type(a)
        if t is DTRTensor:
            return True, True
        if t is list or t is tuple:
            for x in a:
                if type(x) is DTRTensor:
                    return True, True
                if isinstance(x, torch.Tensor):
                    any_tensor = True
        elif isinstance(a, torch.Tensor):
            any_tensor = True
    if kwargs:
        for a in kwargs.values():
            if type(a) is DTRTensor:
                return True, True
            if isinstance(a, torch.Tensor):
                any_tensor = True
    return False, any_tensor


class DTRMode(TorchDispatchMode):
    _is_dtr = True

    def __init__(self, runtime):
        super().__init__()
        self.runtime = runtime

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Lets torch.compile compile frames inside a dtr block; see
        # Note [Compiling inside a dtr block] in dtr/compile.py.
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if foreign_subclasses(types):  # See Note [Foreign subclasses] in tensor.py
            return NotImplemented
        has_dtr, has_tensor = _has_dtr_or_tensor(args, kwargs)
        if not has_dtr and (not has_tensor or not torch.is_grad_enabled()):
            # Factories, and plain-only ops under no_grad (optimizers, backward
            # formulas): see Note [What gets wrapped] in runtime.py.
            return self.runtime.run_plain(func, args, kwargs or {})
        return self.runtime.dispatch(func, args, kwargs or {})
