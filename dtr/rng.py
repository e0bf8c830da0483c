"""Capture and replay of random-number state, so a recomputed random op draws the same numbers.

Note [RNG replay]
A seeded op (``torch.Tag.nondeterministic_seeded``: dropout's ``bernoulli_``,
``randn_like``, ...) is recorded with the state of the generator it will
draw from: the ``generator=`` argument when given, else the default generator
of its device (on CUDA that state holds the Philox seed and offset). A
recompute sets that state, runs the op, and puts the current state back, so
the global stream is left exactly where eager leaves it.
"""
from __future__ import annotations

from typing import Optional

import torch


class RNGState:
    __slots__ = ("generator", "device", "state")

    def __init__(self, generator: Optional[torch.Generator], device: torch.device, state):
        self.generator = generator
        self.device = device
        self.state = state


def _get(generator, device):
    if generator is not None:
        return generator.get_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set(generator, device, state):
    if generator is not None:
        generator.set_state(state)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


_CPU_STATE_BYTES = torch.get_rng_state().nbytes


def host_bytes(device: Optional[torch.device]) -> int:
    """Bytes a capture allocates in the memory a CPU budget counts.

    A CPU generator's state is a 5 KiB tensor; a recipe holds one per random op
    (a GPT's dropouts held 53 KiB the accounting missed). CUDA's Philox state is
    16 bytes of host memory, outside a CUDA budget.
    """
    return _CPU_STATE_BYTES if device is None or device.type == "cpu" else 0


def capture(generator: Optional[torch.Generator], device: torch.device) -> RNGState:
    return RNGState(generator, device, _get(generator, device))


def reset(rng: RNGState) -> None:
    """Set the generator back to the captured state (an op retried after running out of memory)."""
    _set(rng.generator, rng.device, rng.state)


class replay:
    """Context manager: run with the captured state, then restore the current one."""

    __slots__ = ("rng", "saved")

    def __init__(self, rng: Optional[RNGState]):
        self.rng = rng

    def __enter__(self):
        r = self.rng
        if r is not None:
            self.saved = _get(r.generator, r.device)
            _set(r.generator, r.device, r.state)

    def __exit__(self, *exc):
        r = self.rng
        if r is not None:
            _set(r.generator, r.device, self.saved)
        return False
