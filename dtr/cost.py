"""Compute cost of an op, used by the eviction scores.

On CPU the cost is the op's wall-clock time. On CUDA, timing an op needs a
device synchronisation, which would serialise the stream; instead the cost is
estimated from the bytes the op reads and writes at a nominal bandwidth
(MegEngine does the same), which needs no synchronisation.
"""
from __future__ import annotations

import time

perf_counter = time.perf_counter

# Nominal device bandwidth for the CUDA estimate (bytes per second). Only the
# ratios between costs matter to the scores, so its exact value does not.
_CUDA_BYTES_PER_SECOND = 1.0e12


def estimate_from_bytes(nbytes_touched: int) -> float:
    return nbytes_touched / _CUDA_BYTES_PER_SECOND + 1e-6
