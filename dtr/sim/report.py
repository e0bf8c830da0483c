"""Tables, comparisons with the DTR paper, and plots for simulator sweeps."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ["PAPER", "PAPER_NAMES", "fmt_cell", "overhead_table", "paper_comparison", "plot",
           "excess_summary"]

# The reference table of ../shared/traces/dtr-prototype/README.md: overhead at
# budgets 0.2/0.4/0.6/0.8 of the baseline peak; "oom" / ">2x" as written there.
PAPER: Dict[str, Dict[float, object]] = {
    "tv_densenet121": {0.2: 1.68, 0.4: 1.27, 0.6: 1.14, 0.8: 1.06},
    "inceptionv4": {0.2: ">2x", 0.4: 1.13, 0.6: 1.07, 0.8: 1.02},
    "resnet32": {0.2: 1.37, 0.4: 1.14, 0.6: 1.07, 0.8: 1.02},
    "transformer": {0.2: 1.35, 0.4: 1.08, 0.6: 1.04, 0.8: 1.02},
    "lstm": {0.2: 1.60, 0.4: 1.14, 0.6: 1.04, 0.8: 1.03},
    "treelstm": {0.2: 1.53, 0.4: 1.17, 0.6: 1.08, 0.8: 1.01},
    "unet": {0.2: "oom", 0.4: "oom", 0.6: 1.13, 0.8: 1.06},
    "unroll_gan": {0.2: ">2x", 0.4: 1.08, 0.6: 1.06, 0.8: 1.02},
}
PAPER_NAMES = {
    "tv_densenet121": "DenseNet-121", "inceptionv4": "InceptionV4", "resnet32": "ResNet-32",
    "transformer": "Transformer", "lstm": "LSTM", "treelstm": "TreeLSTM", "unet": "U-Net",
    "unroll_gan": "Unrolled GAN",
}


def fmt_cell(r) -> str:
    """One result (dict) as a table cell."""
    if r is None:
        return "-"
    if r["status"] == "oom":
        return "OOM"
    if r["status"] == ">2x":
        return ">2x"
    return f"{r['overhead']:.2f}"


def _fmt_paper(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return "OOM" if v == "oom" else v
    return f"{v:.2f}"


def _index(results: Iterable[dict]):
    idx = {}
    for r in results:
        idx[(r["trace"], r["policy"], r["budget_ratio"])] = r
    return idx


def overhead_table(results: Sequence[dict], budgets: Sequence[float]) -> str:
    """Markdown: one row per (trace, policy), one column per budget."""
    idx = _index(results)
    keys = list(OrderedDict.fromkeys((r["trace"], r["policy"]) for r in results))
    lines = ["| model | policy | " + " | ".join(f"{b:g}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for tr, pol in keys:
        cells = [fmt_cell(idx.get((tr, pol, b))) for b in budgets]
        lines.append(f"| {PAPER_NAMES.get(tr, tr)} | {pol} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell_value(r) -> Optional[float]:
    if r is None or r["status"] != "ok":
        return None
    return r["overhead"]


def paper_comparison(results: Sequence[dict], policy: str, budgets=(0.2, 0.4, 0.6, 0.8)) -> str:
    """Markdown: ours vs the paper per cell, with the difference."""
    idx = _index(results)
    lines = ["| model | " + " | ".join(f"{b:g} ours / paper (diff)" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for tr, ref in PAPER.items():
        cells = []
        for b in budgets:
            r = idx.get((tr, policy, b))
            p = ref.get(b)
            if r is None:
                cells.append(f"not run / {_fmt_paper(p)}")
                continue
            ours = fmt_cell(r)
            if isinstance(p, float) and r is not None and r["status"] == "ok":
                d = r["overhead"] - p
                mark = "" if abs(d) <= 0.03 else " **"
                cells.append(f"{ours} / {_fmt_paper(p)} ({d:+.3f}){mark}")
            else:
                agree = (isinstance(p, str) and r is not None
                         and ((p == "oom" and r["status"] == "oom")
                              or (p == ">2x" and r["status"] in (">2x",))))
                cells.append(f"{ours} / {_fmt_paper(p)}" + ("" if agree else " **"))
        lines.append(f"| {PAPER_NAMES[tr]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("`**`: differs by more than 0.03, or disagrees on OOM / >2x. "
                 "`not run`: no record for that cell in this sweep.")
    return "\n".join(lines)


def _excess(v) -> Optional[float]:
    """overhead - 1 of a cell; OOM and >2x count as 1.0 (the >2x cap)."""
    if v is None:
        return None
    if isinstance(v, str):
        return 1.0
    return v - 1.0


def excess_summary(results: Sequence[dict], policies: Sequence[str],
                   budgets=(0.2, 0.4, 0.6, 0.8)) -> dict:
    """Per policy and for the best policy per cell: mean excess overhead over the
    paper's cells, against the paper's mean (failures count as excess 1.0)."""
    idx = _index(results)
    out = {}
    paper_ex = []
    best_ex = []
    best_le = True
    worse_cells = []
    worse_rounded = []
    per_pol = {p: [] for p in policies}
    present = {r["trace"] for r in results}
    for tr, ref in PAPER.items():
        if tr not in present:
            continue
        for b in budgets:
            pv = ref.get(b)
            if pv is None:  # a budget the paper's table has no column for
                continue
            paper_ex.append(_excess(pv))
            vals = []
            for p in policies:
                r = idx.get((tr, p, b))
                v = None if r is None else (r["overhead"] if r["status"] == "ok" else r["status"])
                e = _excess(v) if r is not None else 1.0
                per_pol[p].append(e)
                vals.append(e)
            be = min(vals) if vals else 1.0
            best_ex.append(be)
            if be > _excess(pv) + 1e-9:
                best_le = False
                worse_cells.append((tr, b))
            # At the paper table's precision (two decimals).
            if round(be, 2) > round(_excess(pv), 2) + 1e-9:
                worse_rounded.append((tr, b))
    pm = sum(paper_ex) / len(paper_ex) if paper_ex else 0.0
    out["paper_mean_excess"] = pm
    out["best_mean_excess"] = sum(best_ex) / len(best_ex) if best_ex else 0.0
    out["best_reduction"] = 1 - out["best_mean_excess"] / pm if pm else 0.0
    out["best_le_paper_everywhere"] = best_le
    out["best_worse_cells"] = worse_cells
    out["best_le_paper_rounded"] = not worse_rounded
    out["best_worse_cells_rounded"] = worse_rounded
    out["per_policy_mean_excess"] = {p: sum(v) / len(v) if v else 0.0 for p, v in per_pol.items()}
    return out


def plot(results: Sequence[dict], path: str, paper: bool = True) -> None:
    """Budget vs overhead, one panel per trace, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(OrderedDict.fromkeys(r["trace"] for r in results))
    policies = list(OrderedDict.fromkeys(r["policy"] for r in results))
    n = len(traces)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for i, tr in enumerate(traces):
        ax = axes[i // cols][i % cols]
        for pol in policies:
            pts = sorted((r["budget_ratio"], r["overhead"]) for r in results
                         if r["trace"] == tr and r["policy"] == pol and r["status"] == "ok")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=pol)
        if paper and tr in PAPER:
            pts = [(b, v) for b, v in PAPER[tr].items() if isinstance(v, float)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "k*", ms=9, label="paper (h_DTR)")
        ax.set_title(PAPER_NAMES.get(tr, tr))
        ax.set_xlabel("budget / baseline peak")
        ax.set_ylabel("compute overhead")
        ax.set_ylim(0.98, 2.02)
        ax.grid(alpha=0.3)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
