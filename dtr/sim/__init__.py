"""Trace recorder and simulator for DTR (issue 4).

* ``dtr.sim.trace``: parse the DTR prototype's JSON-lines op traces.
* ``dtr.sim.simulator``: replay a trace under a budget with any policy of
  ``dtr.policies`` (the same pool the runtime drives).
* ``dtr.sim.record``: ``record(path)`` writes the trace of a real run.
* ``dtr.sim.optimal``: optimal rematerialization baselines (Checkmate MILP,
  chain DP).
* ``python -m dtr.sim``: the sweep CLI (table, Markdown, plot, JSON).
"""
from .trace import Trace, TraceError, load, parse
from .simulator import SimOptions, SimResult, Simulator, baseline_peak, simulate

__all__ = ["Trace", "TraceError", "load", "parse", "SimOptions", "SimResult", "Simulator",
           "baseline_peak", "simulate", "record"]


def record(path, **kwargs):
    """Record the ops run inside the block as a trace file (see dtr.sim.record)."""
    from .record import record as _record

    return _record(path, **kwargs)
