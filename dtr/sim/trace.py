"""Parser for the DTR prototype's JSON-lines op traces.

One JSON object per line; ``INSTRUCTION`` names its kind (see
``../shared/traces/dtr-prototype/README.md``):

=========  =============================  =============================================
kind       fields                         meaning
=========  =============================  =============================================
ANNOTATE   ANNOTATION                     ``START``: the measured step begins here
CONSTANT   NAME (+ next line MEMORY)      a tensor made outside the runtime: pinned
MEMORY     NAME, MEMORY                   bytes of the value NAME refers to
COPY       DST, SRC                       a new handle DST to SRC's value
COPY_FROM  DST, SRC                       DST now refers to SRC's value
RELEASE    NAME                           the handle is dropped
CALL       NAME, ARGS, RESULT, TIME       an op; each result has a MEMORY + ALIAS line
ALIAS      NAME, ALIAS                    -1: new storage; k: a view of argument k
MUTATE     NAME, ARGS, MUTATE, TIME       in-place op writing the arguments at MUTATE
=========  =============================  =============================================

CALL and MUTATE may also carry ``FLOPS``, ``READ`` and ``WRITE`` (what
``dtr.sim.record`` writes: the op's FLOPs by torch's formula, the bytes of its
tensor arguments and the bytes it wrote; see dtr/cost.py), for replays that
score with estimated costs (``Simulator(score_cost=...)``), and ``SCRATCH``:

Note [Op scratch in traces]
``SCRATCH`` is the bytes the kernel allocated while it ran beyond the outputs
it returned (oneDNN convolution and RNN workspaces, reordered weights,
temporaries), measured by ``dtr.sim.record`` as the runtime measures it
(Note [Measured op scratch] in dtr/scratch.py). The replay makes room for the
outputs plus the scratch before the op and before every recompute of it, as
the runtime does. A record without it (the paper's traces) has 0: those
replay exactly as before.

``parse`` turns the lines into a list of :class:`Instr` records, folding each
CALL's MEMORY/ALIAS lines into the CALL (``sizes``, ``aliases``) and each
CONSTANT's MEMORY line into the CONSTANT (``size``). Everything before the
``START`` annotation is skipped (when there is one and ``start=True``).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

__all__ = [
    "Instr", "Constant", "Copy", "CopyFrom", "Release", "Call", "Mutate", "Annotate",
    "Trace", "TraceError", "parse", "parse_lines", "load", "dumps_instr",
]


class TraceError(ValueError):
    """A malformed trace; the message names the line."""


@dataclass(frozen=True)
class Constant:
    name: str
    size: int


@dataclass(frozen=True)
class Copy:
    dst: str
    src: str


@dataclass(frozen=True)
class CopyFrom:
    dst: str
    src: str


@dataclass(frozen=True)
class Release:
    name: str


@dataclass(frozen=True)
class Call:
    name: str
    args: Tuple[str, ...]
    results: Tuple[str, ...]
    time: float  # nanoseconds
    sizes: Tuple[int, ...]  # bytes per result (a view's size is its base's)
    aliases: Tuple[int, ...]  # -1: own storage; k: a view of args[k]
    # What dtr.sim.record adds for cost estimates (-1: not recorded): the op's
    # FLOPs by torch's formula, bytes of its tensor arguments, bytes it wrote.
    flops: int = -1
    read: int = -1
    write: int = -1
    # Bytes the kernel allocated while it ran beyond its outputs (Note [Op
    # scratch in traces]); 0 where not recorded (the paper's traces).
    scratch: int = 0


@dataclass(frozen=True)
class Mutate:
    name: str
    args: Tuple[str, ...]
    mutate: Tuple[int, ...]
    time: float
    flops: int = -1
    read: int = -1
    write: int = -1
    scratch: int = 0


@dataclass(frozen=True)
class Annotate:
    annotation: str


Instr = Union[Constant, Copy, CopyFrom, Release, Call, Mutate, Annotate]


@dataclass
class Trace:
    """A parsed trace: its instructions after START and where it came from."""

    instrs: List[Instr]
    name: str = "trace"
    path: Optional[str] = None
    # What replays computed from this trace (its baseline peak, its plan), kept on the
    # trace itself: a cache keyed by id(trace) handed a new trace the old one's
    # results once the old one died and its id was reused.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def op_time(self) -> float:
        """The trace's own op time (ns): every CALL and MUTATE once."""
        return sum(i.time for i in self.instrs if type(i) in (Call, Mutate))

    def counts(self) -> dict:
        out: dict = {}
        for i in self.instrs:
            k = type(i).__name__
            out[k] = out.get(k, 0) + 1
        return out


def _need(obj, key, lineno):
    try:
        return obj[key]
    except KeyError:
        raise TraceError(f"trace line {lineno}: {obj.get('INSTRUCTION')} without field {key!r}") from None


def _work(o) -> Tuple[int, int, int, int]:
    scratch = int(o.get("SCRATCH", 0))
    if scratch < 0:
        raise TraceError(f"{o.get('INSTRUCTION')} {o.get('NAME')}: negative SCRATCH {scratch}")
    return (int(o.get("FLOPS", -1)), int(o.get("READ", -1)), int(o.get("WRITE", -1)), scratch)


def _with_work(d: dict, ins) -> dict:
    if ins.flops >= 0 or ins.read >= 0 or ins.write >= 0:
        d.update(FLOPS=str(ins.flops), READ=str(ins.read), WRITE=str(ins.write))
    if ins.scratch:
        d["SCRATCH"] = str(ins.scratch)
    return d


def parse_lines(lines: Iterable[str], start: bool = True) -> List[Instr]:
    """Parse JSON lines into instructions (see the module docstring)."""
    objs = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"trace line {lineno}: not JSON ({e}): {line[:80]!r}") from None
        if not isinstance(obj, dict) or "INSTRUCTION" not in obj:
            raise TraceError(f"trace line {lineno}: no INSTRUCTION field: {line[:80]!r}")
        objs.append((lineno, obj))
    if start and any(o["INSTRUCTION"] == "ANNOTATE" and o.get("ANNOTATION") == "START" for _, o in objs):
        while objs:
            _, o = objs.pop(0)
            if o["INSTRUCTION"] == "ANNOTATE" and o.get("ANNOTATION") == "START":
                break
    out: List[Instr] = []
    i = 0
    n = len(objs)
    while i < n:
        lineno, o = objs[i]
        i += 1
        kind = o["INSTRUCTION"]
        if kind == "CONSTANT":
            name = _need(o, "NAME", lineno)
            if i >= n or objs[i][1]["INSTRUCTION"] != "MEMORY" or objs[i][1].get("NAME") != name:
                raise TraceError(f"trace line {lineno}: CONSTANT {name} is not followed by its MEMORY")
            size = int(objs[i][1]["MEMORY"])
            i += 1
            out.append(Constant(name, size))
        elif kind == "CALL":
            results = tuple(_need(o, "RESULT", lineno))
            sizes, aliases = [], []
            for r in results:
                if i >= n:
                    raise TraceError(f"trace line {lineno}: CALL result {r} lacks MEMORY/ALIAS lines")
                ln_m, m = objs[i]
                if m["INSTRUCTION"] != "MEMORY" or m.get("NAME") != r:
                    raise TraceError(f"trace line {ln_m}: expected MEMORY of {r}, got {m['INSTRUCTION']}")
                if i + 1 >= n:
                    raise TraceError(f"trace line {ln_m}: CALL result {r} lacks its ALIAS line")
                ln_a, a = objs[i + 1]
                if a["INSTRUCTION"] != "ALIAS" or a.get("NAME") != r:
                    raise TraceError(f"trace line {ln_a}: expected ALIAS of {r}, got {a['INSTRUCTION']}")
                i += 2
                sizes.append(int(m["MEMORY"]))
                aliases.append(int(a["ALIAS"]))
            args = tuple(_need(o, "ARGS", lineno))
            for k in aliases:
                if k >= len(args) or k < -1:
                    raise TraceError(f"trace line {lineno}: ALIAS {k} out of range for {len(args)} args")
            out.append(Call(_need(o, "NAME", lineno), args, results,
                            float(_need(o, "TIME", lineno)), tuple(sizes), tuple(aliases),
                            *_work(o)))
        elif kind == "MUTATE":
            args = tuple(_need(o, "ARGS", lineno))
            mut = tuple(int(k) for k in _need(o, "MUTATE", lineno))
            for k in mut:
                if not 0 <= k < len(args):
                    raise TraceError(f"trace line {lineno}: MUTATE index {k} out of range")
            out.append(Mutate(_need(o, "NAME", lineno), args, mut, float(_need(o, "TIME", lineno)),
                              *_work(o)))
        elif kind == "COPY":
            out.append(Copy(_need(o, "DST", lineno), _need(o, "SRC", lineno)))
        elif kind == "COPY_FROM":
            out.append(CopyFrom(_need(o, "DST", lineno), _need(o, "SRC", lineno)))
        elif kind == "RELEASE":
            out.append(Release(_need(o, "NAME", lineno)))
        elif kind == "ANNOTATE":
            out.append(Annotate(str(_need(o, "ANNOTATION", lineno))))
        elif kind in ("MEMORY", "ALIAS"):
            raise TraceError(f"trace line {lineno}: stray {kind} line (not after a CALL/CONSTANT)")
        else:
            raise TraceError(f"trace line {lineno}: unknown instruction {kind!r}")
    return out


def parse(text: str, start: bool = True, name: str = "trace") -> Trace:
    """Parse a trace given as a string."""
    return Trace(parse_lines(io.StringIO(text), start=start), name=name)


def load(path: str, start: bool = True) -> Trace:
    """Load a trace file."""
    with open(path) as f:
        instrs = parse_lines(f, start=start)
    return Trace(instrs, name=trace_name(path), path=path)


def trace_name(path: str) -> str:
    base = os.path.basename(path)
    for suf in (".log", ".jsonl", ".json"):
        if base.endswith(suf):
            base = base[: -len(suf)]
    return base.split("-")[0] if "-" in base and base.split("-")[0] else base


def dumps_instr(ins: Instr) -> List[str]:
    """The JSON lines of one instruction (inverse of ``parse_lines``)."""
    d = json.dumps
    if isinstance(ins, Constant):
        return [d({"INSTRUCTION": "CONSTANT", "NAME": ins.name}),
                d({"INSTRUCTION": "MEMORY", "NAME": ins.name, "MEMORY": str(ins.size)})]
    if isinstance(ins, Copy):
        return [d({"INSTRUCTION": "COPY", "DST": ins.dst, "SRC": ins.src})]
    if isinstance(ins, CopyFrom):
        return [d({"INSTRUCTION": "COPY_FROM", "DST": ins.dst, "SRC": ins.src})]
    if isinstance(ins, Release):
        return [d({"INSTRUCTION": "RELEASE", "NAME": ins.name})]
    if isinstance(ins, Annotate):
        return [d({"INSTRUCTION": "ANNOTATE", "ANNOTATION": ins.annotation})]
    if isinstance(ins, Call):
        lines = [d(_with_work({"INSTRUCTION": "CALL", "NAME": ins.name, "ARGS": list(ins.args),
                               "RESULT": list(ins.results), "TIME": str(int(ins.time))}, ins))]
        for r, s, a in zip(ins.results, ins.sizes, ins.aliases):
            lines.append(d({"INSTRUCTION": "MEMORY", "NAME": r, "MEMORY": str(s)}))
            lines.append(d({"INSTRUCTION": "ALIAS", "NAME": r, "ALIAS": str(a)}))
        return lines
    if isinstance(ins, Mutate):
        return [d(_with_work({"INSTRUCTION": "MUTATE", "NAME": ins.name, "ARGS": list(ins.args),
                              "MUTATE": list(ins.mutate), "TIME": str(int(ins.time))}, ins))]
    raise TypeError(f"not a trace instruction: {ins!r}")
