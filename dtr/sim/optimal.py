"""Optimal rematerialization baselines for small graphs.

* :func:`solve_milp`: Checkmate's integer program (Jain et al., MLSys 2020)
  solved with ``scipy.optimize.milp`` (HiGHS): the minimum total compute of a
  schedule that computes every node of a DAG (first computations in
  topological order, one new node per stage) with live bytes never above a
  budget. Exact memory accounting: a value is freed right after its last use
  in a stage unless it is kept for the next stage.
* :func:`solve_bruteforce`: the same problem by shortest path over
  (resident set, progress) states, for graphs of a dozen nodes (a check on the
  MILP).
* :func:`revolve`: the classic optimal checkpointing of a chain (Griewank's
  binomial/Revolve recursion, nonuniform step costs allowed).
* :func:`graph_from_trace` / :func:`trace_from_graph`: convert between
  traces and :class:`Graph` so that the simulator's policies can be compared
  with the optimum on the same problem (:func:`compare`).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

from .trace import Call, Constant, Copy, CopyFrom, Mutate, Release, Trace

__all__ = ["Graph", "Solution", "solve_milp", "solve_bruteforce", "revolve", "chain_graph", "training_graph",
           "graph_from_trace", "trace_from_graph", "compare", "random_graph"]


@dataclass
class Graph:
    """A DAG in topological order: node i has cost, bytes, and deps (all < i).

    ``outputs``: nodes that must be resident at the end (kept once computed).
    ``const_bytes``: memory outside the graph (parameters, inputs), always live.
    """

    costs: List[float]
    sizes: List[int]
    deps: List[List[int]]
    outputs: List[int] = field(default_factory=list)
    const_bytes: int = 0
    names: List[str] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.costs)
        if not (len(self.sizes) == len(self.deps) == n):
            raise ValueError("dtr.sim.optimal: costs, sizes and deps must have one entry per node")
        for i, ds in enumerate(self.deps):
            for j in ds:
                if not 0 <= j < i:
                    raise ValueError(f"dtr.sim.optimal: node {i} depends on {j}: not topological")

    def __len__(self):
        return len(self.costs)

    @property
    def total_cost(self) -> float:
        return float(sum(self.costs))

    def users(self) -> List[List[int]]:
        us: List[List[int]] = [[] for _ in self.costs]
        for i, ds in enumerate(self.deps):
            for j in set(ds):
                us[j].append(i)
        return us

    def peak_no_remat(self) -> int:
        """Live bytes peak of computing each node once, freeing after the last use."""
        us = self.users()
        last = [max(u) if u else i for i, u in enumerate(us)]
        outs = set(self.outputs)
        live = 0
        peak = 0
        for k in range(len(self)):
            live += self.sizes[k]
            peak = max(peak, live)
            for i in set(self.deps[k]) | {k}:
                if last[i] == k and i not in outs:
                    live -= self.sizes[i]
        return peak + self.const_bytes


@dataclass
class Solution:
    feasible: bool
    cost: float  # total compute of the schedule (math.inf if infeasible)
    overhead: float  # cost / graph.total_cost
    status: str
    R: Optional[list] = None  # R[t][i]: node i computed in stage t


def solve_milp(g: Graph, budget: int, time_limit: float = 60.0) -> Solution:
    """Checkmate's MILP (exact memory model) under ``budget`` bytes in total."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    n = len(g)
    B = budget - g.const_bytes
    if n == 0:
        return Solution(True, 0.0, 1.0, "empty")
    if B < 0:
        return Solution(False, math.inf, math.inf, "infeasible")
    users = g.users()
    outs = set(g.outputs)
    m = [float(x) for x in g.sizes]
    # Variable layout: R[t,i], S[t,i] for i <= t (S[t,i] for i < t), FREE[t,i,k], U[t,k].
    idx: Dict[tuple, int] = {}

    def var(key):
        if key not in idx:
            idx[key] = len(idx)
        return idx[key]

    for t in range(n):
        for i in range(t + 1):
            var(("R", t, i))
        for i in range(t):
            var(("S", t, i))
    # FREE[t,i,k]: i freed right after computing k in stage t (k uses i, or k == i).
    free_keys = []
    for t in range(n):
        for k in range(t + 1):
            for i in sorted(set(g.deps[k]) | {k}):
                if i in outs:
                    continue
                free_keys.append((t, i, k))
                var(("F", t, i, k))
    for t in range(n):
        for k in range(t + 1):
            var(("U", t, k))
    nv = len(idx)
    rows: List[Tuple[Dict[int, float], float, float]] = []

    def add(coefs: Dict[int, float], lo: float, hi: float):
        rows.append((coefs, lo, hi))

    def S(t, i):
        # S[t,i] exists for i < t; S beyond the last stage: outputs only.
        return idx.get(("S", t, i))

    for t in range(n):
        add({idx[("R", t, t)]: 1.0}, 1, 1)  # stage t computes node t
        for i in range(t + 1):
            r = idx[("R", t, i)]
            for j in set(g.deps[i]):
                # R[t,i] <= R[t,j] + S[t,j]
                c = {r: 1.0, idx[("R", t, j)]: -1.0}
                s = S(t, j)
                if s is not None:
                    c[s] = -1.0
                add(c, -math.inf, 0)
        for i in range(t):
            # S[t,i] <= S[t-1,i] + R[t-1,i]
            c = {idx[("S", t, i)]: 1.0, idx[("R", t - 1, i)]: -1.0}
            s = S(t - 1, i)
            if s is not None:
                c[s] = -1.0
            add(c, -math.inf, 0)
            if i in outs:
                add({idx[("S", t, i)]: 1.0}, 1, 1)
    # FREE linearization: F = R[t,k] * (1 - S[t+1,i]) * prod_{j in users(i), k<j<=t} (1 - R[t,j])
    for (t, i, k) in free_keys:
        f = idx[("F", t, i, k)]
        terms = [(idx[("R", t, k)], False)]
        if t + 1 < n:
            terms.append((idx[("S", t + 1, i)], True))
        for j in users[i]:
            if k < j <= t:
                terms.append((idx[("R", t, j)], True))
        if i == k:
            pass
        # f <= each literal; f >= sum(literals) - (len-1)
        lower = {f: 1.0}
        const = 0.0
        for v, neg in terms:
            if neg:
                add({f: 1.0, v: 1.0}, -math.inf, 1)  # f <= 1 - v
                lower[v] = lower.get(v, 0.0) + 1.0
                const += 1.0
            else:
                add({f: 1.0, v: -1.0}, -math.inf, 0)  # f <= v
                lower[v] = lower.get(v, 0.0) - 1.0
        # f - sum(pos) + sum(neg) >= 1 - len(terms) + ... : f >= sum(pos) + sum(1-neg) - (L-1)
        add(lower, const - (len(terms) - 1), math.inf)
    # Memory: U[t,0] = sum_{i<t} m_i S[t,i] + m_0 R[t,0]; U[t,k] = U[t,k-1] - frees(k-1) + m_k R[t,k]
    for t in range(n):
        for k in range(t + 1):
            u = idx[("U", t, k)]
            c = {u: 1.0}
            if k == 0:
                for i in range(t):
                    c[idx[("S", t, i)]] = c.get(idx[("S", t, i)], 0.0) - m[i]
            else:
                c[idx[("U", t, k - 1)]] = -1.0
                for i in set(g.deps[k - 1]) | {k - 1}:
                    key = ("F", t, i, k - 1)
                    if key in idx:
                        c[idx[key]] = c.get(idx[key], 0.0) + m[i]
            c[idx[("R", t, k)]] = c.get(idx[("R", t, k)], 0.0) - m[k]
            add(c, 0, 0)
    A = lil_matrix((len(rows), nv))
    lo = np.empty(len(rows))
    hi = np.empty(len(rows))
    for r, (coefs, l, h) in enumerate(rows):
        for v, a in coefs.items():
            A[r, v] = a
        lo[r] = l
        hi[r] = h
    cost = np.zeros(nv)
    integrality = np.ones(nv)
    lb = np.zeros(nv)
    ub = np.ones(nv)
    for key, v in idx.items():
        if key[0] == "R":
            cost[v] = g.costs[key[2]]
        elif key[0] == "U":
            integrality[v] = 0
            ub[v] = B
    res = milp(cost, constraints=LinearConstraint(A.tocsr(), lo, hi), integrality=integrality,
               bounds=Bounds(lb, ub), options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        return Solution(False, math.inf, math.inf, "infeasible" if res.status == 2 else res.message)
    total = float(cost @ res.x)
    R = [[int(round(res.x[idx[("R", t, i)]])) for i in range(t + 1)] for t in range(n)]
    status = "optimal" if res.status == 0 else f"time limit (gap {getattr(res, 'mip_gap', '?')})"
    return Solution(True, total, total / g.total_cost if g.total_cost else 1.0, status, R)


def solve_bruteforce(g: Graph, budget: int, max_states: int = 2_000_000) -> Solution:
    """Exact optimum by Dijkstra over (resident set, next new node) states.

    Same problem as :func:`solve_milp`: first computations in topological
    order, live bytes (plus ``const_bytes``) never above ``budget`` while a
    node is computed (its inputs and output resident), outputs kept.
    """
    n = len(g)
    B = budget - g.const_bytes
    outs = 0
    for o in g.outputs:
        outs |= 1 << o
    deps = [0] * n
    for i, ds in enumerate(g.deps):
        for j in ds:
            deps[i] |= 1 << j
    size = g.sizes

    def mem(mask):
        s = 0
        i = 0
        while mask:
            if mask & 1:
                s += size[i]
            mask >>= 1
            i += 1
        return s

    start = (0, 0)
    dist = {start: 0.0}
    heap = [(0.0, 0, 0)]
    seen = 0
    while heap:
        d, res, p = heapq.heappop(heap)
        if dist.get((res, p), math.inf) < d:
            continue
        if p == n:
            return Solution(True, d, d / g.total_cost if g.total_cost else 1.0, "optimal")
        seen += 1
        if seen > max_states:
            raise RuntimeError("dtr.sim.optimal: brute force state limit reached")
        cur = mem(res)
        # Free any non-output resident node (free).
        r = res & ~outs
        while r:
            low = r & -r
            r ^= low
            st = (res & ~low, p)
            if d < dist.get(st, math.inf):
                dist[st] = d
                heapq.heappush(heap, (d, st[0], p))
        # Compute a node: the next new one (p) or any earlier one not resident.
        for i in range(p + 1):
            bit = 1 << i
            if res & bit or (deps[i] & res) != deps[i]:
                continue
            if cur + size[i] > B:
                continue
            nd = d + g.costs[i]
            st = (res | bit, p + 1 if i == p else p)
            if nd < dist.get(st, math.inf):
                dist[st] = nd
                heapq.heappush(heap, (nd, st[0], st[1]))
    return Solution(False, math.inf, math.inf, "infeasible")


def revolve(n: int, slots: int, costs: Optional[Sequence[float]] = None) -> float:
    """Total forward cost of reversing an n-step chain with ``slots`` checkpoints
    besides the input x_0 (Griewank's Revolve recursion, unit step costs by
    default, ``costs[i]`` for step i+1 otherwise).

    x_0 -> x_1 -> ... -> x_n; reversing step i needs x_{i-1}. The count
    includes the first sweep up to x_{n-1}, so with enough slots it is the
    cost of steps 1..n-1. On :func:`chain_graph` (one byte per state) this
    equals the optimum under a budget of ``slots + 2`` bytes (the slots, the
    state being advanced and the one being reversed) plus the cost of step n,
    for slots >= 1 (tests/test_sim.py checks it against the MILP).
    """
    c = [1.0] * n if costs is None else [float(x) for x in costs]
    pre = [0.0]
    for x in c:
        pre.append(pre[-1] + x)

    def fwd(a, b):  # cost of steps a+1..b (x_a -> x_b)
        return pre[b] - pre[a]

    @lru_cache(maxsize=None)
    def T(a, b, s):
        # Reverse steps a+1..b given x_a stored (and no other state of (a, b]).
        if b - a <= 1:
            return 0.0
        if s == 0:
            # Recompute from x_a each time: to reverse step j we need x_{j-1}.
            return sum(fwd(a, j - 1) for j in range(a + 2, b + 1))
        best = math.inf
        for k in range(a + 1, b):
            v = fwd(a, k) + T(k, b, s - 1) + T(a, k, s)
            if v < best:
                best = v
        return best

    return T(0, n, slots)


def chain_graph(n: int, costs: Optional[Sequence[float]] = None) -> Graph:
    """The Revolve chain as a Graph: forward nodes f_1..f_n (1 byte each; f_0
    is the input, a constant) and adjoint nodes g_n..g_1 (0 bytes, cost 0):
    g_i needs x_{i-1} and g_{i+1} (g_n needs x_{n-1} and x_n). g_1 is the output."""
    c = [1.0] * n if costs is None else list(costs)
    costs_: List[float] = []
    sizes: List[int] = []
    deps: List[List[int]] = []
    # f_i at index i-1 (i = 1..n)
    for i in range(1, n + 1):
        costs_.append(c[i - 1])
        sizes.append(1)
        deps.append([i - 2] if i >= 2 else [])
    f = lambda i: i - 1  # noqa: E731  (x_0 is a constant: no node)
    prev = None
    for i in range(n, 0, -1):
        d = []
        if i - 1 >= 1:
            d.append(f(i - 1))
        d.append(prev if prev is not None else f(n))
        costs_.append(0.0)
        sizes.append(0)
        deps.append(d)
        prev = len(costs_) - 1
    return Graph(costs_, sizes, deps, outputs=[prev])


def random_graph(n: int, seed: int = 0, max_deps: int = 2) -> Graph:
    """A random forward+backward-like DAG (for tests and comparisons)."""
    import random

    rng = random.Random(seed)
    costs, sizes, deps = [], [], []
    for i in range(n):
        k = 0 if i == 0 else rng.randint(1, min(max_deps, i))
        ds = sorted(set([i - 1] + rng.sample(range(i), k - 1))) if k else []
        deps.append(ds)
        costs.append(float(rng.randint(1, 10)))
        sizes.append(rng.randint(1, 8))
    return Graph(costs, sizes, deps, outputs=[n - 1])


# --------------------------------------------------------------------------
# Traces <-> graphs
# --------------------------------------------------------------------------

def graph_from_trace(trace: Trace) -> Graph:
    """The storage-level DAG of a trace (as simrd's Checkmate rewrite did):
    views are folded into their base (their op cost added to it), the outputs
    of a multi-output op become one node, constants leave the graph (their
    bytes go to ``const_bytes``), a MUTATE is a new node of its target's size
    computed from all its arguments. Values with handles at the end are
    outputs."""
    handles: Dict[str, int] = {}  # name -> node (or -1 - constant index)
    const_sizes: List[int] = []
    costs: List[float] = []
    sizes: List[int] = []
    deps: List[List[int]] = []
    names: List[str] = []
    ext: Dict[int, int] = {}

    def node_of(name):
        return handles[name]

    for ins in trace.instrs:
        t = type(ins)
        if t is Constant:
            const_sizes.append(ins.size)
            handles[ins.name] = -len(const_sizes)
        elif t is Copy:
            handles[ins.dst] = handles[ins.src]
            ext[handles[ins.src]] = ext.get(handles[ins.src], 0) + 1
        elif t is CopyFrom:
            old = handles.get(ins.dst)
            handles[ins.dst] = handles[ins.src]
            ext[handles[ins.src]] = ext.get(handles[ins.src], 0) + 1
            if old is not None:
                ext[old] -= 1
        elif t is Release:
            v = handles.pop(ins.name, None)
            if v is not None:
                ext[v] -= 1
        elif t in (Call, Mutate):
            args = [node_of(a) for a in ins.args]
            ds = sorted(set(a for a in args if a >= 0))
            if t is Call:
                own = sum(s for s, k in zip(ins.sizes, ins.aliases) if k < 0)
                if own > 0 or all(k < 0 for k in ins.aliases):
                    costs.append(ins.time)
                    sizes.append(own)
                    deps.append(ds)
                    names.append(ins.name)
                    nid = len(costs) - 1
                else:
                    nid = None
                for r, k in zip(ins.results, ins.aliases):
                    if k >= 0:
                        base = args[k]
                        if base >= 0 and nid is None:
                            costs[base] += ins.time
                        handles[r] = base
                    else:
                        handles[r] = nid
                    ext[handles[r]] = ext.get(handles[r], 0) + 1
            else:
                for mi in ins.mutate:
                    target = args[mi]
                    tsize = (const_sizes[-target - 1] if target < 0 else sizes[target])
                    costs.append(ins.time)
                    sizes.append(tsize if target >= 0 else 0)
                    deps.append(ds)
                    names.append(ins.name)
                    nid = len(costs) - 1
                    for name, v in list(handles.items()):
                        if v == target and target >= 0:
                            handles[name] = nid
                            ext[nid] = ext.get(nid, 0) + 1
                            ext[target] -= 1
    outputs = sorted(set(v for v in handles.values() if v is not None and v >= 0))
    return Graph(costs, sizes, deps, outputs=outputs, const_bytes=sum(const_sizes), names=names)


def trace_from_graph(g: Graph, const_bytes: Optional[int] = None) -> Trace:
    """A trace computing each node once in order, releasing each value after its
    last use (outputs are kept). ``const_bytes`` becomes one CONSTANT."""
    instrs = []
    cb = g.const_bytes if const_bytes is None else const_bytes
    if cb:
        instrs.append(Constant("c0", cb))
    users = g.users()
    last = [max(u) if u else i for i, u in enumerate(users)]
    outs = set(g.outputs)
    for k in range(len(g)):
        args = tuple(f"v{j}" for j in g.deps[k])
        instrs.append(Call(f"op{k}", args, (f"v{k}",), float(g.costs[k]), (int(g.sizes[k]),), (-1,)))
        for i in sorted(set(g.deps[k]) | {k}):
            if last[i] == k and i not in outs:
                instrs.append(Release(f"v{i}"))
    return Trace(instrs, name="graph")


def compare(g: Graph, ratios: Sequence[float], policies: Sequence[str] = ("dtr_eq",),
            time_limit: float = 60.0, options=None) -> List[dict]:
    """Policies (simulated) vs the MILP optimum at budgets = ratio x the graph's
    no-rematerialization peak. Rows: ratio, budget, optimal overhead, and each
    policy's overhead and its ratio to the optimum."""
    from .simulator import SimOptions, simulate

    tr = trace_from_graph(g)
    peak = g.peak_no_remat()
    opts = options if options is not None else SimOptions(overhead_limit=None)
    rows = []
    for r in ratios:
        budget = int(peak * r)
        sol = solve_milp(g, budget, time_limit=time_limit)
        row = {"ratio": r, "budget": budget, "optimal": sol.overhead, "optimal_status": sol.status}
        for p in policies:
            res = simulate(tr, budget=budget, policy=p, options=opts)
            ov = res.overhead if res.feasible else math.inf
            row[p] = ov
            row[p + "_vs_opt"] = ov / sol.overhead if sol.feasible and sol.overhead else math.nan
        rows.append(row)
    return rows


def training_graph(n: int, seed: int = 0, skip: float = 0.3) -> Graph:
    """A random forward/backward graph: forward f_1..f_n (f_i needs f_{i-1},
    sometimes f_{i-2}), a loss, and backward b_n..b_1 where b_i needs b_{i+1}
    (the loss for b_n) and f_i (and f_{i-1}). Costs 1..10, sizes 1..8; the
    backward ops cost about twice the forward ones."""
    import random

    rng = random.Random(seed)
    costs: List[float] = []
    sizes: List[int] = []
    deps: List[List[int]] = []
    for i in range(n):
        d = [i - 1] if i >= 1 else []
        if i >= 2 and rng.random() < skip:
            d.append(i - 2)
        deps.append(sorted(d))
        costs.append(float(rng.randint(1, 10)))
        sizes.append(rng.randint(1, 8))
    deps.append([n - 1])
    costs.append(1.0)
    sizes.append(1)
    prev = n
    for i in range(n - 1, -1, -1):
        d = [prev, i] + ([i - 1] if i >= 1 else [])
        deps.append(sorted(set(d)))
        costs.append(2.0 * costs[i])
        sizes.append(sizes[i])
        prev = len(costs) - 1
    return Graph(costs, sizes, deps, outputs=[prev])
