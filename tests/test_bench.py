"""The benchmark's quick mode runs end to end and its losses agree with eager."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

sys.path.insert(0, ROOT)
from bench import run  # noqa: E402
from dtr.policies import DEFAULT_POLICY  # noqa: E402


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    p = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_outputs_exist(quick):
    for name in ("results.md", "results.json", "frontier_gpt.png", "timeline_gpt.png"):
        path = quick / name
        assert path.exists() and path.stat().st_size > 0, name
    md = (quick / "results.md").read_text()
    assert "torch " in md and "| eager |" in md and "Command:" in md


def test_every_configuration_ran_and_losses_agree(quick):
    data = json.loads((quick / "results.json").read_text())
    rows = data["rows"]["gpt"]
    by = {r["method"]: r for r in rows}
    for method in ("eager", "checkpoint per block", "checkpoint_sequential 2", "checkpoint_sequential 4",
                   "dtr no limit", f"dtr {DEFAULT_POLICY} @0.6", f"dtr {DEFAULT_POLICY} @0.5",
                   f"dtr {DEFAULT_POLICY} @0.4", "compile amb=0.5"):
        assert method in by, method
    for r in rows:
        if r["kind"] in ("eager", "ckpt", "dtr"):
            assert r["status"] == "ok", (r["method"], r["status"], r.get("traceback"))
            # dtr and torch.utils.checkpoint are exact on CPU: every step's loss bit-equal (the
            # warm-up step before them restored the initial parameters).
            assert r["loss_agree"] == "exact", (r["method"], r["losses"], by["eager"]["losses"])
            assert r["measured_peak"] > 0 and r["step_s"] > 0
            assert r["warmup_wall_s"] > 0
        if r["kind"] == "dtr":
            assert r["dtr_peak_bytes"] > 0  # dtr's own accounting, reported beside the measurement
            if r["budget_bytes"]:
                # The budget bounds all tensor memory: so does the independent measurement.
                assert r["measured_peak"] <= r["budget_bytes"] * (1 + run.SLACK), (r["method"], r["measured_peak"])
    # The compile row ran in its own process; its losses are compared (it may disagree: see
    # docs/performance.md, torch's activation_memory_budget recomputes dropout on CPU).
    assert by["compile amb=0.5"]["status"] == "ok", by["compile amb=0.5"]["status"]
    assert "loss_agree" in by["compile amb=0.5"]


def test_summary_lines(quick):
    md = (quick / "results.md").read_text()
    for line in (f"- gpt: dtr {DEFAULT_POLICY} at checkpoint-per-block's peak (", "x eager vs checkpoint ",
                 "- gpt: lowest measured peak at <= 1.5x eager step time: dtr ", " vs best static tool ",
                 f"- gpt: at 0.5 of eager's peak: dtr {DEFAULT_POLICY} @0.5: ",
                 "- gpt: at 0.5 of eager's peak: compile backend=dtr @0.5: ",
                 "bookkeeping overhead (no-limit step - eager step) / no-limit step = ", "M parameters"):
        assert line in md, line


def test_summarize_bookkeeping_and_missing_rows():
    def row(method, kind, step_s, peak_mib, **kw):
        return dict(method=method, kind=kind, step_s=step_s, measured_peak=peak_mib * run.MiB, status="ok", **kw)

    rows = [row("eager", "eager", 1.0, 100), row("dtr no limit", "dtr", 1.25, 101, ops=10),
            row("dtr dtr_eq @0.5", "dtr", 3.0, 50, budget_bytes=50 * run.MiB, remat_seconds=1.2,
                remat_by_op={"aten.bmm.default": [2, 0.3], "aten.addmm.default": [3, 0.9]})]
    lines = "\n".join(run.summarize("lstm", rows))
    assert "(no-limit step - eager step) / no-limit step = 20%" in lines
    assert "at 0.5 of eager's peak: dtr dtr_eq @0.5: 3.00x eager step time" in lines
    assert ("of its 2.000 s over eager, recomputation takes 1.200 s (most: addmm 0.900 s (3x), "
            "bmm 0.300 s (2x)); bookkeeping is about 0.250 s") in lines
    assert "at <= 1.5x eager step time: dtr 101.0 MiB (1.01x eager's peak, dtr no limit" in lines
    assert "vs best static tool none" in lines


def test_script_entry_point_help():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--help"],
                       cwd="/", env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--quick" in p.stdout


def test_smallest_row_retries_a_budget_that_fails_when_run_again(monkeypatch):
    calls = []

    def fake(name, size, cfg, steps, limit, timeline=False):
        calls.append(cfg.budget)
        status = "BudgetExceededError at the warm-up step" if cfg.budget < 1030 else "ok"
        return dict(method=cfg.label, budget_bytes=cfg.budget, status=status)

    monkeypatch.setattr(run, "run_isolated", fake)
    r = run.run_smallest("gpt", "quick", "dtr_eq", 1000, 2000, 1, 10.0, False)
    assert calls == [1000, 1020, 1040] and r["status"] == "ok" and r["budget_bytes"] == 1040
    assert "failed when run again (0.500, 0.510 of eager's peak)" in r["note"]
    calls.clear()
    r = run.run_smallest("gpt", "quick", "dtr_eq", 900, 2000, 1, 10.0, False)
    assert calls == [900, 918, 936] and r["status"].startswith("BudgetExceeded")


def test_dispatch_floor_writes_its_table(tmp_path):
    out = tmp_path / "floor.md"
    p = subprocess.run([sys.executable, "-m", "bench.dispatch_floor", "--size", "quick", "--models", "lstm",
                        "--reps", "1", "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    row = next(line for line in out.read_text().splitlines() if line.startswith("| lstm |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and cells[2].endswith("x)") and cells[3].endswith("x)")


def test_quick_runs_default_to_their_own_folder():
    # A quick run used to write over the committed full-run results and plots.
    full = run.default_out(False)
    assert os.path.samefile(full, os.path.join(ROOT, "bench", "results"))
    assert run.default_out(True) == os.path.join(full, "quick")
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/results/quick/results.md"], cwd=ROOT)
    assert ignored.returncode == 0


def test_instruction_count_worker_runs_the_chain():
    # The program bench.instruction_count runs under callgrind, on each runtime.
    for runtime in ("eager", "cpp", "python"):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "instruction_count.py"), "--worker",
                            runtime, "0", ROOT], cwd="/", env=_env(), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr


def test_instruction_count_reads_callgrind_annotate():
    from bench import instruction_count as ic

    text = """\
--------------------------------------------------------------------------------
Ir                   file:function
--------------------------------------------------------------------------------
10,000 (100.0%)  PROGRAM TOTALS
 1,200 (12.0%)  /work/csrc/runtime.cpp:dtr::Runtime::dispatch(int) [/work/dtr/_C.so]
   300 ( 3.0%)  /work/csrc/runtime.cpp:dtr::Runtime::dispatch(int)'2 [/work/dtr/_C.so]
    50 ( 0.5%)  ???:__tls_get_addr [/lib/ld.so]
"""
    costs = ic.parse_self_costs(text)
    assert costs == {"dtr::Runtime::dispatch(int)": 1500, "__tls_get_addr": 50}


def test_instruction_count_without_valgrind_says_what_to_install(monkeypatch):
    from bench import instruction_count as ic

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="needs valgrind"):
        ic.main(["--out", os.devnull])


def test_ab_overhead_compares_two_builds_round_by_round(tmp_path):
    # This checkout against itself: both rows, every round, and measured numbers in each.
    out = tmp_path / "ab.md"
    p = subprocess.run([sys.executable, "-m", "bench.ab_overhead", "--baseline", ROOT, "--rounds", "2",
                        "--reps", "1", "--steps", "1", "--out", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    summary = [line for line in text.splitlines() if line.startswith(("| this checkout", "| baseline"))]
    rounds = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(summary) == 2 and len(rounds) == 4
    for row in rounds:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[4]) > 0
        assert cells[5].endswith("x") and float(cells[5][:-1]) > 0


def test_ab_overhead_refuses_a_baseline_that_is_not_a_checkout(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.ab_overhead", "--baseline", str(tmp_path)], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no dtr package there" in p.stderr


def test_cache_misses_worker_runs_the_treelstm_and_reports_its_ops():
    # The program bench.cache_misses runs under cachegrind; it divides by the ops it prints.
    for runtime in ("eager", "cpp"):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cache_misses.py"), "--worker",
                            runtime, "0", ROOT], cwd="/", env=_env(), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        ops = int(p.stdout.split("dtr ops per step:")[1])
        assert (ops > 1000) == (runtime == "cpp"), p.stdout


def test_cache_misses_reads_cg_annotate():
    from bench import cache_misses as cm

    text = """\
--------------------------------------------------------------------------------
Ir                 I1mr              ILmr            DLmr             DLmw              file:function
--------------------------------------------------------------------------------
10,000 (100.0%)    900 (100.0%)      50 (100.0%)     70 (100.0%)      40 (100.0%)       PROGRAM TOTALS
 1,200 (12.0%)      80 ( 8.9%)        .               3 ( 4.3%)        .                /w/csrc/runtime.cpp:dtr::Runtime::dispatch(int)
   300 ( 3.0%)      10 ( 1.1%)        1 ( 2.0%)       .               36 (90.0%)        ???:add_kernel
"""
    costs = cm.parse_costs(text)
    assert costs[""] == [10000, 900, 50, 70, 40]
    assert costs["dtr::Runtime::dispatch(int)"] == [1200, 80, 0, 3, 0]
    assert costs["add_kernel"] == [300, 10, 1, 0, 36]


def test_cache_misses_without_valgrind_says_what_to_install(monkeypatch):
    from bench import cache_misses as cm

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="needs valgrind"):
        cm.main(["--out", os.devnull])


def test_step_profile_reads_perf_report():
    from bench import step_profile as sp

    text = """\
# Samples: 1K of event 'cpu-clock'
#
# Overhead       Samples  Shared Object        Symbol
# ........  ............  ...................  ......
#
    40.00%           400  libtorch_cpu.so      [.] mkl_blas_def_xsgemv
     2.00%            20  _C.cpython-311.so    [.] dtr::Runtime::dispatch(c10::OperatorHandle const&)
     1.00%            10  [kernel.kallsyms]    [k] clear_page_erms
"""
    samples = sp.parse_report(text, steps=10)
    assert samples == {("libtorch_cpu.so", "mkl_blas_def_xsgemv"): 40.0,
                       ("_C.cpython-311.so", "dtr::Runtime::dispatch(c10::OperatorHandle const&)"): 2.0,
                       ("[kernel.kallsyms]", "clear_page_erms"): 1.0}


def test_step_profile_without_perf_says_what_to_install(monkeypatch):
    from bench import step_profile as sp

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="needs perf on PATH"):
        sp.main(["--out", os.devnull])


def _perf_can_sample() -> bool:
    # perf on PATH, allowed to sample this user's processes, and new enough for the
    # --control fifo that bench.step_profile switches sampling on and off with.
    if shutil.which("perf") is None:
        return False
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ctl, ack = os.path.join(tmp, "ctl"), os.path.join(tmp, "ack")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        try:
            p = subprocess.run(["perf", "record", "-e", "cpu-clock", "-D", "-1", "--control",
                                f"fifo:{ctl},{ack}", "-o", os.path.join(tmp, "data"), "--", "true"],
                               capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return False
    return p.returncode == 0


@pytest.mark.skipif(not _perf_can_sample(), reason="needs perf allowed to sample its own processes")
def test_step_profile_samples_eager_and_dtr_steps(tmp_path):
    out = tmp_path / "profile.md"
    p = subprocess.run([sys.executable, "-m", "bench.step_profile", "--steps", "1", "--top", "5",
                        "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert row.count("ms (") == 2
    objects = [line for line in text.splitlines() if line.startswith("| _C.")]
    assert objects, text  # dtr's extension was sampled in the dtr steps
    eager, dtr_samples = (float(c) for c in objects[0].strip("|").split("|")[1:3])
    assert dtr_samples > eager
