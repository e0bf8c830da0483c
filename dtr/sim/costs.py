"""Estimated op costs for replays that score without measured times.

``Simulator(score_cost=...)`` / ``simulate(..., score_cost=...)`` take a
function of a CALL or MUTATE record giving the cost (ns) the pool scores the
op with (Note [Scoring with estimated costs] in dtr/sim/simulator.py). These
compute it from the FLOPS / READ / WRITE fields ``dtr.sim.record`` writes:

* :class:`RooflineCost`: Note [Roofline cost] in dtr/cost.py, what the runtime
  uses on CUDA: max(FLOPs at the FLOP rate, bytes read + written at the
  bandwidth) + launch;
* :class:`BytesCost`: the estimate before it: bytes read at the bandwidth +
  launch, FLOPs ignored.

Both take a ``dtr.cost.Roofline`` (its default FLOP rate is used: a trace does
not record dtypes).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..cost import CUDA_NOMINAL, Roofline, roofline_seconds
from .trace import TraceError

__all__ = ["RooflineCost", "BytesCost"]


def _need_work(ins) -> None:
    if ins.flops < 0 or ins.read < 0 or ins.write < 0:
        raise TraceError(
            f"dtr.sim: op {ins.name} has no FLOPS/READ/WRITE fields; estimated costs need a "
            "trace recorded by dtr.sim.record")


@dataclass(frozen=True)
class RooflineCost:
    rates: Roofline = CUDA_NOMINAL

    def __call__(self, ins) -> float:
        _need_work(ins)
        return 1e9 * roofline_seconds(ins.flops, ins.read + ins.write, None, self.rates)


@dataclass(frozen=True)
class BytesCost:
    rates: Roofline = CUDA_NOMINAL

    def __call__(self, ins) -> float:
        _need_work(ins)
        return 1e9 * (ins.read / self.rates.bytes_per_s + self.rates.launch_s)
