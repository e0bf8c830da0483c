"""Trace recorder and simulator for DTR (issue 4).

* ``dtr.sim.trace``: parse the DTR prototype's JSON-lines op traces.
* ``dtr.sim.simulator``: replay a trace under a budget with any policy of
  ``dtr.policies`` (the same pool the runtime drives).
* ``dtr.sim.plan``: the previous step's accesses, for the ``lookahead`` policy.
* ``dtr.sim.record``: ``record(path)`` writes the trace of a real run.
* ``dtr.sim.costs``: estimated op costs to score with (roofline, bytes-only).
* ``dtr.sim.optimal``: optimal rematerialization baselines (Checkmate MILP,
  chain DP).
* ``python -m dtr.sim``: the sweep CLI (table, Markdown, plot, JSON).
"""
from .trace import Trace, TraceError, load, parse
from .plan import Plan
from .simulator import SimOptions, SimResult, Simulator, baseline_peak, make_plan, simulate
# Bind the context manager over the submodule of the same name (the submodule
# stays importable as ``dtr.sim.record`` via ``import dtr.sim.record``'s
# sys.modules entry; the package attribute is the class).
from .record import Recorder, record
from .costs import BytesCost, RooflineCost

__all__ = ["Trace", "TraceError", "load", "parse", "SimOptions", "SimResult", "Simulator",
           "baseline_peak", "simulate", "make_plan", "Plan", "record", "Recorder",
           "RooflineCost", "BytesCost"]
