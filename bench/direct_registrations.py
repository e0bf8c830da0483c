"""How many ops the fallback is registered on directly, and what that scan costs.

    python -m bench.direct_registrations     # writes bench/results/direct_registrations.md
    python -m bench.direct_registrations --compare /work/main --out /tmp/reg.md

Note [Direct registrations] (csrc/direct_registrations.cpp) registers the boxed
fallback on the dtr key for every op with a CompositeExplicitAutograd kernel and
every op with a CompositeImplicitAutograd kernel and a kernel on each dense backend
torch was built with; ops of the commonest signatures get an unboxed kernel instead
(Note [Unboxed kernels] in csrc/unboxed_kernels.cpp), also on ops that would reach
the fallback anyway. The scan runs once per process, when the first block opens.
This counts the ops by reason and times that first scan (dtr._C.register_new_ops())
in ``--reps`` fresh processes, interleaved with another checkout's when
``--compare`` names one (its dtr/_C built there). Only ratios of one run are quoted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench import write_report

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, time, torch, dtr, dtr._C
t = time.perf_counter(); dtr._C.register_new_ops(); ms = (time.perf_counter() - t) * 1e3
has = torch._C._dispatch_has_kernel_for_dispatch_key
names = torch._C._dispatch_get_all_op_names()
built = [b for b in ("CPU", "CUDA", "XPU", "MPS", "PrivateUse1")
         if has("aten::empty.memory_format", b)]
explicit = {n for n in names if has(n, "CompositeExplicitAutograd")
            or has(n, "CompositeExplicitAutogradNonFunctional")}
implicit = {n for n in names if has(n, "CompositeImplicitAutograd")} - explicit
with_all = sorted(n for n in implicit if all(has(n, b) for b in built))
with_some = sorted(n for n in implicit if n not in with_all and any(has(n, b) for b in built))
print(json.dumps(dict(ms=ms, ops=len(names), built=built, explicit=len(explicit),
                      implicit=len(implicit), implicit_with_all=with_all,
                      implicit_with_some=with_some,
                      registered=sum(has(n, "PrivateUse3") for n in names),
                      unboxed=sum("dtr unboxed kernel" in torch._C._dispatch_dump_table(n)
                                  for n in names if has(n, "PrivateUse3")))))
"""


def probe(root):
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd="/", check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--compare", help="another checkout with dtr/_C built (e.g. main)")
    ap.add_argument("--out", default=os.path.join(HERE, "bench", "results",
                                                  "direct_registrations.md"))
    args = ap.parse_args()
    roots = {"this tree": HERE}
    if args.compare:
        roots["--compare"] = os.path.abspath(args.compare)
    runs = {k: [] for k in roots}
    for _ in range(args.reps):
        for k, root in roots.items():
            runs[k].append(probe(root))
    import torch
    lines = ["# Direct registrations of the fallback: how many ops, what the scan costs", "",
             f"Command: `python -m bench.direct_registrations --reps {args.reps}"
             + (" --compare ..." if args.compare else "") + f"`; torch {torch.__version__}, "
             f"{args.reps} fresh processes each, interleaved.", ""]
    first = runs["this tree"][0]
    lines += [f"- ops in the dispatcher: {first['ops']}; dense backends built: "
              f"{', '.join(first['built'])}",
              f"- with a CompositeExplicitAutograd(NonFunctional) kernel: {first['explicit']}",
              f"- with a CompositeImplicitAutograd kernel and no explicit one: {first['implicit']}",
              f"  - and a kernel on every dense backend built (registered): "
              f"{len(first['implicit_with_all'])}: {', '.join(first['implicit_with_all'])}",
              f"  - and a kernel on some of them only (left decomposing): "
              f"{len(first['implicit_with_some'])}: {', '.join(first['implicit_with_some'])}",
              "", "| checkout | ops with a kernel on PrivateUse3 | of which unboxed | first scan, min ms "
              "| median ms |",
              "|---|---|---|---|---|"]
    for k, rs in runs.items():
        ms = [r["ms"] for r in rs]
        lines.append(f"| {k} | {rs[0]['registered']} | {rs[0].get('unboxed', 0)} | {min(ms):.2f} | "
                     f"{statistics.median(ms):.2f} |")
    if args.compare:
        a = statistics.median(r["ms"] for r in runs["this tree"])
        b = statistics.median(r["ms"] for r in runs["--compare"])
        lines += ["", f"Median first scan, this tree / --compare: {a / b:.2f}."]
    text = "\n".join(lines) + "\n"
    write_report(args.out, text)


if __name__ == "__main__":
    main()
