"""The benchmark suite's matmul cases (bench/cases_matmul.py) and their reporting: the cases are registered with the
grid of issue 5, a CPU `python -m bench --quick --ops matmul` run works end to end, the cases' correctness checks
reject wrong results, and the geometric means against the targets are computed and reported as specified.
Speeds are never asserted."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import mixprec_ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.append(REPO)  # for the `bench` package; appended, so the installed mixprec_ops still wins

from bench import cases_matmul, gpu_report, report  # noqa: E402
from bench.registry import BASELINE, Ctx, Impl, discover  # noqa: E402
from mixprec_ops.ops.cast_and_scale import cast_and_scale_backward  # noqa: E402

GPU_CTX = Ctx(torch.device("cuda"), False, ("cuda", "triton"))  # building cases allocates nothing


def test_matmul_cases_registered_with_the_issue_grid():
    assert "matmul" in discover()
    mm, lin = cases_matmul.grid(GPU_CTX)
    kns = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
    expected = {(m, k, n) for m in (16, 128, 8192) for k, n in kns} | {(4096, 4096, 4096), (8192, 8192, 8192)}
    assert set(mm) == expected and len(mm) == len(set(mm)) == 19
    qmm, qlin = cases_matmul.grid(Ctx(torch.device("cuda"), True, ("cuda", "triton")))
    assert set(qmm) < set(mm) and set(qlin) <= set(lin) and {m for m, _, _ in qmm} == {16, 128, 4096, 8192}

    cases = discover()["matmul"](GPU_CTX)
    gemm = [c for c in cases if c.tags["family"] == "matmul"]
    linear = [c for c in cases if c.tags["family"] == "linear" and "(recompute pre)" not in c.name]
    recompute = [c for c in cases if "(recompute pre)" in c.name]
    wgrad = [c for c in cases if c.tags["family"] == "wgrad"]
    assert len(gemm) == 19 and len(linear) == 2 * len(lin) and len(recompute) == len(lin) == len(wgrad)
    assert all(c.tags["geomean"] is None and c.name.startswith("linear+bias+gelu fwd+bwd") for c in recompute)
    for c in cases:  # the baseline and every kernel backend of the device; the run drops those that cannot serve
        # (the wgrad cases time cuBLASLt twice: BGRADB's matmul_and_rowsum, and the GEMM with a separate sum)
        want = [BASELINE, "cuda", "cuda-gemm+sum"] if c in wgrad else [BASELINE, "cuda", "triton"]
        assert [i.backend for i in c.impls] == want, c.name
        assert c.op == "matmul" and c.reps and c.budget_s  # timing capped per case (GPU time budget)
    for c in wgrad:
        m, n, k = c.tags["m"], c.tags["n"], c.tags["k"]
        assert c.tags["geomean"] is None and c.flops == 2 * m * n * k and c.numel == n * k
    for c in gemm:
        m, n, k = c.tags["m"], c.tags["n"], c.tags["k"]
        assert c.flops == 2 * m * n * k and c.numel == m * n
        want = None if (m, k, n) == (4096, 4096, 4096) else "matmul M=8192" if m == 8192 else "matmul M<=128"
        assert c.tags["geomean"] == want and c.tags["target"] == cases_matmul.GEOMEANS.get(want)
    assert sum(c.tags["geomean"] == "matmul M=8192" for c in gemm) == 6
    assert sum(c.tags["geomean"] == "matmul M<=128" for c in gemm) == 12
    assert {c.name.split()[0] for c in linear} == {"linear+bias+gelu", "linear+bias+gelu_tanh"}
    for c in linear:
        assert c.flops == 6 * c.tags["m"] * c.tags["n"] * c.tags["k"] and c.tags["target"] == 1.1


def test_cpu_quick_matmul_run(tmp_path):
    """`python -m bench --quick --ops matmul --device cpu` from the repo root: torch-only sanity cases, checked,
    timed and reported; the geomeans say that no kernel backend was timed; exit status 0."""
    env = dict(os.environ, MIXPREC_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--ops", "matmul", "--device", "cpu",
                        "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.load(open(tmp_path / "results.json"))
    rows = doc["results"]
    assert rows and all(x["op"] == "matmul" and x["backend"] == BASELINE and x["check"] == "ok" for x in rows)
    assert all(x["tflops"] and x["tflops"] > 0 and x["median_us"] > 0 for x in rows)
    assert any(s.startswith("matmul cpu:") for s in doc["skipped"])
    gms = doc["geomeans"]
    assert {g["group"] for g in gms} == {"matmul M<=128", "linear+bias+gelu fwd+bwd"}
    assert all(g["backend"] is None and not g["met"] for g in gms)
    assert "no kernel backend timed on cpu" in r.stdout and "TFLOP/s" in r.stdout
    assert doc["targets"] == [] and "targets: none of the issues' targets applies" in r.stdout  # matmul: GPU only
    assert not os.path.exists(tmp_path / "cache")  # nothing autotuned, nothing cached


@pytest.mark.skipif(mixprec_ops.backends.unavailable_reason("matmul", "triton", torch.device("cpu")) is not None,
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1) to run the Triton matmul on CPU")
def test_matmul_case_checks_accept_ours_and_reject_wrong_results(monkeypatch):
    """The checks of the GEMM and Linear cases, run on CPU through the Triton interpreter (tiny shapes): torch and
    Triton pass; a result off by 1% in any one output (y, dx, dw or db) fails; a wrong shape fails."""
    monkeypatch.setattr(cases_matmul, "CPU_MM", (16, 32, 48))
    monkeypatch.setattr(cases_matmul, "CPU_LINEAR", (8, 32, 48))
    cases = cases_matmul.cases(Ctx(torch.device("cpu"), True, ("triton",)))
    assert len(cases) == 5 and sum("(recompute pre)" in c.name for c in cases) == 1
    for c in cases:
        if c.tags["family"] == "wgrad":  # cuBLASLt's question: torch alone here (its check against the fp32 truth)
            assert [i.backend for i in c.impls] == [BASELINE] and c.check(c.impls[0]) is None
            continue
        assert [i.backend for i in c.impls] == [BASELINE, "triton"]
        for impl in c.impls:
            assert c.check(impl) is None, (c.name, impl.backend)
        ours = c.impls[1].fn
        n_out = 1 if c.tags["family"] == "matmul" else 4
        for j in range(n_out):
            def wrong(d, j=j):
                out = ours(d)
                out = list(out) if isinstance(out, tuple) else [out]
                out[j] = out[j] * 1.01 + 0.01
                return tuple(out) if n_out > 1 else out[0]

            bad = c.check(Impl("triton", wrong))
            assert bad is not None and "max error" in bad, (c.name, j, bad)
        if n_out == 1:
            bad = c.check(Impl("triton", lambda d: ours(d)[:-1]))
            assert bad is not None and "expected" in bad


def _row(case, backend, vs, group, target, flops=1):
    return {"op": "matmul", "case": case, "backend": backend, "numel": 1, "vs_torch": vs, "geomean": group,
            "target": target, "flops": flops, "check": "ok", "median_us": 10.0, "tflops": 1.0, "pct_peak": 50.0,
            "pct_copy": 5.0, "check_s": 1.5, "variant": "tiled 128x128x64 w8 s3 (tuned)", "gbps": 1.0}


def test_geomeans_against_targets_and_gpu_report():
    rows = [_row("a", "torch", 1.0, "g1", 1.0), _row("a", "triton", 2.0, "g1", 1.0),
            _row("b", "torch", 1.0, "g1", 1.0), _row("b", "triton", 0.5, "g1", 1.0),
            _row("a", "cuda", 1.2, "g1", 1.0), _row("b", "cuda", None, "g1", 1.0),  # cuda failed a check in b
            _row("c", "triton", 0.8, "g2", 0.9), _row("d", "triton", 3.0, None, None)]
    gms = {(g["group"], g["backend"]): g for g in report.geomeans(rows)}
    assert set(gms) == {("g1", "triton"), ("g1", "cuda"), ("g2", "triton")}
    assert math.isclose(gms["g1", "triton"]["geomean"], 1.0) and gms["g1", "triton"]["met"]
    assert gms["g1", "cuda"]["n"] == 1 and gms["g1", "cuda"]["n_cases"] == 2 and not gms["g1", "cuda"]["met"]
    assert not gms["g2", "triton"]["met"] and math.isclose(gms["g2", "triton"]["geomean"], 0.8)
    lines = report.geomean_lines(report.geomeans(rows), "cuda")
    assert any("g1 cuda" in x and "only 1 of 2" in x for x in lines)
    assert any("g2 triton: 0.800x" in x and "NOT met" in x for x in lines)

    tg = gpu_report.targets([], report.geomeans(rows))
    assert {(t["what"].split(" ")[1], t["met"]) for t in tg} == {("g1", True), ("g1", False), ("g2", False)}
    rep = {"gpu": "X", "date": "2026-01-01", "steps": [], "tests": None, "sanitizer": None, "targets": tg,
           "bench": {"ceilings": {"copy_gbps": 1.0, "matmul_bf16_tflops": 800.0}, "results": rows,
                     "geomeans": report.geomeans(rows)}}
    md = gpu_report.summary_md(rep, None, {})
    assert "| matmul | a | triton | 10.0 us | 1.0 | 50 |" in md and "tiled 128x128x64 w8 s3 (tuned)" in md
    assert "| geomean g2 triton >= 0.90x torch | 0.800x | NO |" in md
    assert "| op | case | backend | size |" not in md  # no memory-bound rows: no GB/s table


def test_op_time_budget_skips_the_remaining_cases(tmp_path, monkeypatch):
    """An op whose cases have spent its time budget: the rest are not run, and the run lists them as skipped."""
    import time

    from bench import cli, registry
    from bench.registry import Case

    def slow_case(i):
        def check(impl):
            time.sleep(0.3)
            return None

        return Case("zz_slow", f"case {i}", 1000, 8000, lambda seed: None, [Impl(BASELINE, lambda d: None)], check)

    monkeypatch.setitem(registry._PROVIDERS, "zz_slow", lambda ctx: [slow_case(i) for i in range(4)])
    monkeypatch.setitem(registry.TIME_BUDGET_S, "zz_slow", 0.5)
    assert cli.main(["--quick", "--ops", "zz_slow", "--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.load(open(tmp_path / "results.json"))
    # 0.3 + 0.3 > 0.5: cases 2 and 3 skipped, listed as rows without a time (so target groups count them missing)
    assert [(r["case"], r["check"]) for r in doc["results"]] == [
        ("case 0", "ok"), ("case 1", "ok"), ("case 2", cli.SKIPPED_BUDGET), ("case 3", cli.SKIPPED_BUDGET)]
    assert doc["failures"] == 0 and all(r["median_us"] is None for r in doc["results"][2:])
    assert any(s.startswith("zz_slow: 2 case(s) not run") and "case 2, case 3" in s for s in doc["skipped"])
    assert doc["op_seconds"]["zz_slow"] >= 0.6


def test_gpu_report_reads_test_counts_from_the_log_when_junit_is_missing(tmp_path):
    """The tests step hit its time limit: no junit.xml, but the -v log names each outcome (plain and xdist lines)."""
    from bench import gpu_report

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "tests.log").write_text(
        "tests/test_a.py::test_x[cpu] PASSED                                  [  1%]\n"
        "[gw1] [  2%] FAILED tests/test_b.py::test_y[cuda-cuda] \n"
        "[gw0] [  3%] SKIPPED tests/test_b.py::test_z[cpu-triton] \n"
        "tests/test_c.py::test_w ERROR                                        [  4%]\n"
        "[gw1] [  5%] XFAIL tests/test_d.py::test_v \n"
        "tests/test_a.py::test_x[cpu] PASSED                                  [  1%]\n"  # a repeated line counts once
        "FAILED tests/test_b.py::test_y[cuda-cuda] - AssertionError: boom\n")  # the -rfE summary line
    t = gpu_report.read_junit(str(tmp_path))
    assert (t["tests"], t["passed"], t["failures"], t["errors"], t["skipped"]) == (5, 1, 1, 1, 2), t
    assert t["failed_tests"] == ["tests/test_b.py::test_y[cuda-cuda]", "tests/test_c.py::test_w"]
    assert "tests.log" in t["source"]
    assert gpu_report.read_junit(str(tmp_path / "nothing")) is None


def test_live_test_report_gives_reasons_and_durations(tmp_path, monkeypatch):
    """conftest's hook appends each outcome to MIXPREC_TEST_REPORT as it happens (not in an xdist worker, nor a passed
    setup); gpu_report reads it before the -v log: counts, each failure's first "E " line (or a crashed worker's last
    line), the slowest tests; a line cut by the kill is skipped."""
    import types

    import conftest

    path = tmp_path / "tests.jsonl"
    monkeypatch.setenv("MIXPREC_TEST_REPORT", str(path))

    def rep(nodeid, when, outcome, secs, text=""):
        return types.SimpleNamespace(nodeid=nodeid, when=when, outcome=outcome, duration=secs, longreprtext=text,
                                     passed=outcome == "passed", failed=outcome == "failed")

    conftest.pytest_runtest_logreport(rep("tests/t.py::a", "setup", "passed", 0.1))  # not written
    conftest.pytest_runtest_logreport(rep("tests/t.py::a", "call", "passed", 12.5))
    conftest.pytest_runtest_logreport(rep("tests/t.py::b[cuda]", "call", "failed", 0.5,
                                          "x = 1\nE   AssertionError: dx\nE   assert 2 == 1\n\ntests/t.py:9: Err"))
    conftest.pytest_runtest_logreport(rep("tests/t.py::b[cpu]", "call", "passed", 1.5))
    conftest.pytest_runtest_logreport(rep("tests/t.py::c", "setup", "skipped", 0.0))
    conftest.pytest_runtest_logreport(rep("tests/t.py::d", "setup", "failed", 0.2, "fixture 'gpu' not found"))
    conftest.pytest_runtest_logreport(rep("tests/t.py::a", "teardown", "failed", 0.1, "E   OSError: busy"))
    conftest.pytest_runtest_logreport(rep("tests/t.py::g", "???", "failed", 0.0, "worker 'gw1' crashed"))
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    conftest.pytest_runtest_logreport(rep("tests/t.py::e", "call", "passed", 1.0))  # a worker: the controller writes
    with open(path, "a") as f:
        f.write('{"nodeid": "tests/t.py::f", "wh')
    t = gpu_report.read_junit(str(tmp_path))
    # as pytest counts: a passed, with an error in its teardown besides; d's setup an error; g's crash a failure
    assert (t["tests"], t["passed"], t["failures"], t["errors"], t["skipped"]) == (6, 2, 2, 2, 1), t
    assert t["reasons"] == {"tests/t.py::b[cuda]": "E   AssertionError: dx",
                            "tests/t.py::d [setup]": "fixture 'gpu' not found",
                            "tests/t.py::a [teardown]": "E   OSError: busy",
                            "tests/t.py::g": "worker 'gw1' crashed"}
    assert t["slowest"][0] == ["tests/t.py::a", 12.5] and "tests.jsonl" in t["source"]
    # the time by test function, its parametrizations summed (b's two cases), calls only (not setup or teardown)
    assert t["by_function"] == [["tests/t.py::a", 1, 12.5], ["tests/t.py::b", 2, 2.0], ["tests/t.py::g", 1, 0.0]]
    assert t["call_seconds"] == 14.5
    md = gpu_report.summary_md({"gpu": "G", "date": "D", "steps": [], "tests": t}, None, {})
    assert "- `tests/t.py::b[cuda]`: E   AssertionError: dx" in md and "slowest: a 12 s" in md
    assert "test time 14 s (call phases, all workers); most by function: a 12 s (1), b 2 s (2), g 0 s (1)" in md, md


def test_gpu_report_reads_each_sanitizer_tool(tmp_path):
    """memcheck's log decides (errors, the subset's verdict); the sanitize_more step's "== tool" sections follow:
    racecheck's count from its RACECHECK SUMMARY line (it prints no ERROR SUMMARY), initcheck's from its ERROR
    SUMMARY, a tool stopped by its timeout said so; without the sanitize_more log, no other tools."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "sanitize.log").write_text("sanitize_subset: OK\n========= ERROR SUMMARY: 0 errors\n")
    s = gpu_report.read_sanitizer(str(tmp_path))
    assert s["errors"] == 0 and s["subset_ok"] and s["other_tools"] == {}
    (tmp_path / "logs" / "sanitize_more.log").write_text(
        "== tool racecheck\n========= COMPUTE-SANITIZER\n"
        "========= Error: Race reported between Write access at 0x10 in mixprec::cuda::k\n"
        "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\nsanitize_subset: OK\n"
        "== tool initcheck\n========= ERROR SUMMARY: 0 errors\n== initcheck exit 124\n")
    s = gpu_report.read_sanitizer(str(tmp_path))
    race, init = s["other_tools"]["racecheck"], s["other_tools"]["initcheck"]
    assert (race["errors"], race["warnings"], race["ended"]) == (1, 1, None)
    assert race["first_errors"][0].startswith("========= Error: Race reported")
    assert (init["errors"], init["ended"]) == (0, "timed out")
    md = gpu_report.summary_md({"gpu": "G", "date": "D", "steps": [], "tests": None, "sanitizer": s}, None, {})
    assert "sanitizer (racecheck): 1 errors, 1 warnings; first: ========= Error: Race" in md
    assert "sanitizer (initcheck): 0 errors (timed out)" in md


def test_a_run_stopped_midway_leaves_its_rows(tmp_path, monkeypatch):
    """bench/gpu_check stops the bench step at its time limit: the cases measured by then are in
    results.partial.json (rewritten after every case), which gpu_report uses, marked PARTIAL, when results.json is
    missing; a run that ends writes results.json and removes the partial file."""
    from bench import cli, registry
    from bench.registry import Case

    def case(i):
        if i == 2:  # the "time limit": the run dies in its third case
            def check(impl):
                raise KeyboardInterrupt
        else:
            def check(impl):
                return None
        return Case("zz_stop", f"case {i}", 1000, 8000, lambda seed: None, [Impl(BASELINE, lambda d: None)], check)

    monkeypatch.setitem(registry._PROVIDERS, "zz_stop", lambda ctx: [case(i) for i in range(4)])
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text('{"results": []}')  # an earlier run's, in a reused directory
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--quick", "--ops", "zz_stop", "--device", "cpu", "--out", str(out)])
    assert not (out / "results.json").exists()  # removed at the start: never shown as this run's
    part = json.load(open(out / cli.PARTIAL))
    assert part["partial"] and [r["case"] for r in part["results"]] == ["case 0", "case 1"]
    rep = gpu_report.build(str(tmp_path))
    assert [r["case"] for r in rep["bench"]["results"]] == ["case 0", "case 1"]
    assert rep["bench"]["notes"][0].startswith("PARTIAL") and rep["bench"]["failures"] == 0
    assert rep["bench"]["geomeans"] == [] and rep["bench"]["cases_seconds"] is not None
    assert "PARTIAL" in gpu_report.summary_md(rep, None, {})
    g = {"group": "matmul M=8192", "backend": "triton", "target": 1.0, "n": 1, "n_cases": 1, "geomean": 1.3,
         "met": True}
    assert gpu_report.targets([], [g])[0]["met"] and not gpu_report.targets([], [g], partial=True)[0]["met"]

    monkeypatch.setitem(registry._PROVIDERS, "zz_stop", lambda ctx: [case(i) for i in (0, 1)])
    assert cli.main(["--quick", "--ops", "zz_stop", "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "results.json").exists() and not (out / cli.PARTIAL).exists()


def test_gpu_timing_queues_a_spin_before_each_start_event(monkeypatch):
    """bench/timing.measure on a GPU (simulated: torch.cuda's Event, _sleep and synchronize replaced by fakes that
    log what is queued): every timed call is preceded by a spin kernel queued BEFORE its start event, so the events
    time the device and not the host's launch path, and every round starts on an idle device (the spins never pile
    up); the host's queueing time is reported as host_s."""
    from bench import timing

    log = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = len(log)
            log.append("event")

        def elapsed_time(self, other):
            return 2.0 if self.t is not None and other.t is not None else float("nan")  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(("sleep", cycles)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    calls = []
    fns = [lambda x: (calls.append(x), log.append("call")), lambda x: (calls.append(x), log.append("call"))]
    out = timing.measure(fns, [0, 1, 2], torch.device("cuda"), reps=4, warmup=2, min_reps=4, budget_s=10.0)
    assert [t.reps for t in out] == [4, 4] and all(t.median_s == 2e-3 and t.host_s is not None for t in out)
    # the timed part, then the final sync: per round a sync (an idle device), then (sleep, event, call, event) per fn
    body = log[-(4 * 9 + 1):]
    want = (["sync"] + ["sleep", "event", "call", "event"] * 2) * 4 + ["sync"]
    assert [x if isinstance(x, str) else x[0] for x in body] == want, body
    assert all(x[1] > 0 for x in body if not isinstance(x, str))
    assert calls[-8:] == [0, 1, 2, 0, 1, 2, 0, 1]  # inputs rotated call by call
    assert all(t.spin_s == 50e-6 for t in out)  # the floor: these calls queue in microseconds

    # a call whose host side takes 30 ms gets a spin of 2 x 30 ms capped at MAX_SPIN_S (50 ms; it was 10 ms, and the
    # H200's 12-24 ms optimizer steps left the device waiting inside their measurements); a host time beyond the
    # spin is marked on the row's median
    slow = [lambda x: time.sleep(0.03)]
    (t,) = timing.measure(slow, [0], torch.device("cuda"), reps=2, warmup=2, min_reps=2, budget_s=10.0)
    assert t.spin_s == timing.MAX_SPIN_S == 50e-3 and 0.03 <= t.host_s < t.spin_s
    assert report.fmt_median({"median_us": 2240.0, "host_over_spin": True}) == "2.24 ms*"
    assert report.fmt_median({"median_us": 5.0, "host_over_spin": False}) == "5.0 us"


def test_wrong_or_crashing_implementations_are_not_timed_and_do_not_stop_the_run(tmp_path, monkeypatch):
    """A failed check leaves its row without a time or a ratio (it used to be timed and shown with a speedup, and
    counted toward targets); an implementation that crashes while being timed loses its own time only (it erased
    every implementation's); a case whose inputs cannot be made leaves error rows and the run goes on."""
    from bench import cli, registry
    from bench.registry import Case

    def fast(d):
        return None

    def crash_when_timed(d):
        if d == "timed":
            raise RuntimeError("boom")

    def make(seed):
        return "timed"

    def bad_make(seed):
        raise MemoryError("no room")

    # (backend names starting with the baseline's: no op registry lookup for this made-up op)
    wrong, crash, good = (f"{BASELINE}-{n}" for n in ("wrong", "crash", "good"))
    impls = [Impl(BASELINE, fast), Impl(wrong, fast), Impl(crash, crash_when_timed), Impl(good, fast)]
    checks = {wrong: "value 3 differs", BASELINE: None, crash: None, good: None}
    cases = [Case("zz_fail", "case", 1000, 8000, make, impls, lambda impl: checks[impl.backend]),
             Case("zz_fail", "no inputs", 1000, 8000, bad_make, [Impl(BASELINE, fast)], lambda impl: None)]
    monkeypatch.setitem(registry._PROVIDERS, "zz_fail", lambda ctx: cases)
    assert cli.main(["--quick", "--ops", "zz_fail", "--device", "cpu", "--out", str(tmp_path)]) == 1  # failures
    rows = {(r["case"], r["backend"]): r for r in json.load(open(tmp_path / "results.json"))["results"]}
    assert rows[("case", wrong)]["median_us"] is None and rows[("case", wrong)]["vs_torch"] is None
    assert rows[("case", wrong)]["check"].startswith("FAIL")
    assert rows[("case", crash)]["median_us"] is None and "timing ERROR: RuntimeError: boom" in \
        rows[("case", crash)]["check"]
    assert rows[("case", good)]["median_us"] is not None and rows[("case", good)]["vs_torch"] is not None
    assert rows[("case", BASELINE)]["check"] == "ok" and rows[("case", BASELINE)]["median_us"] is not None
    assert rows[("no inputs", BASELINE)]["check"].startswith("ERROR: making the inputs: MemoryError")


def test_unchecked_baselines_say_so_and_are_timed(tmp_path, monkeypatch):
    """A baseline its case does not compare with the oracle (torch's own AdamW, the unscale_ stand-in) said "ok",
    so a baseline writing garbage looked checked (a user trial replaced torch's AdamW step with one writing NaN: all
    rows "ok"). It now says UNCHECKED, is still timed as the ratio's baseline, and is not a failure."""
    from bench import cli, registry
    from bench.registry import UNCHECKED, Case

    def fast(d):
        return None

    good = f"{BASELINE}-good"
    cases = [Case("zz_unchecked", "case", 1000, 8000, lambda seed: None, [Impl(BASELINE, fast), Impl(good, fast)],
                  lambda impl: UNCHECKED if impl.backend == BASELINE else None)]
    monkeypatch.setitem(registry._PROVIDERS, "zz_unchecked", lambda ctx: cases)
    assert cli.main(["--quick", "--ops", "zz_unchecked", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = {r["backend"]: r for r in json.load(open(tmp_path / "results.json"))["results"]}
    assert rows[BASELINE]["check"] == UNCHECKED and rows[BASELINE]["median_us"] is not None
    assert rows[good]["check"] == "ok" and rows[good]["vs_torch"] is not None
    # the real baselines that are not compared say so
    from bench import cases_adam

    check = cases_adam._check([64, 33], torch.device("cpu"))
    assert check(Impl(BASELINE, fast)) == UNCHECKED and check(Impl(BASELINE + "-foreach", fast)) == UNCHECKED


def test_small_sizes_read_and_the_csv_says_where_and_when(tmp_path):
    """Sizes of small cases read in elements and kB (adam_scalars printed "4e-05M el 0 MB"); the CSV carries the
    run's date, device and machine on every line (only the JSON had them)."""
    from bench import report

    assert report.fmt_size(40, 640) == "40 el 0.6 kB" and report.fmt_size(2_000_000, 56_000_000) == "2M el 56 MB"
    rows = [{"op": "x", "case": "c", "backend": "cpu", "numel": 40}]
    report.write_csv(str(tmp_path / "r.csv"), rows, {"date": "2026-11-29T00:00:00+00:00", "device": "cpu",
                                                      "machine": "m x2"})
    import csv

    (line,) = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert line["op"] == "x" and line["date"].startswith("2026-11-29") and line["machine"] == "m x2"


def test_gpu_report_compares_like_with_like(tmp_path, monkeypatch, capsys):
    """gpu_report compared a CPU run with the H200's figures (any file, when none matched the device) and the next
    H200 run with the first one's rows, timed otherwise (schema 1: host time included, unscale_ without writes).
    Now only the same GPU and bench schema are compared; a CPU run is not judged against the H200 targets; a bench
    --out directory is read as well as gpu_check's layout; a run that was not steady says so in the summary."""
    results = tmp_path / "results"
    results.mkdir()
    row = {"op": "unscale_", "case": "c", "backend": "cuda", "numel": 10, "gbps": 5.0, "check": "ok"}
    for name, schema in (("2026-11-28-nvidia-h200", 1), ("2026-11-29-other-gpu", 2)):
        json.dump({"gpu": "x", "bench": {"schema": schema, "results": [row]}}, open(results / f"{name}.json", "w"))
    monkeypatch.setattr(gpu_report, "RESULTS_DIR", str(results))
    assert gpu_report.previous("", "nvidia-h200", 2) == (None, {})
    assert gpu_report.previous("", "nvidia-h200", 1)[0] == "2026-11-28-nvidia-h200.json"
    assert gpu_report.previous("", "unknown-gpu", 2) == (None, {})
    out = tmp_path / "cpu_run"
    out.mkdir()
    cpu_row = {**row, "backend": "cpu", "vs_torch": 0.9995, "pct_copy": 50.0}
    json.dump({"schema": 2, "device": "cpu", "noisy": True, "results": [cpu_row], "notes": []},
              open(out / "results.json", "w"))
    rep = gpu_report.build(str(out))
    assert rep["bench"] is not None and rep["targets"] == []
    assert any("NOT STEADY" in n for n in rep["bench"]["notes"])
    assert gpu_report.targets([{**cpu_row, "backend": "cuda"}])[0]["value"] == "0.999x"  # not "1.00x" and missed
    g = {"group": "M=8192", "backend": "cuda", "target": 1.0, "n": 3, "n_cases": 3, "geomean": 0.9996, "met": False}
    assert gpu_report.targets([], [g])[0]["value"] == "0.999x"


def test_gpu_report_keeps_two_runs_of_one_day(tmp_path, monkeypatch):
    """A second run of the same GPU on the same day is filed as <date>-<HHMM>-<gpu> (the H200 runs of 2026-11-30
    00:37 and 18:03: the second overwrote the first), refiling the same run keeps its name, and the newest run to
    compare with is the newest by its date, not by file name ("2026-11-30-1803-..." sorts before "2026-11-30-n...")."""
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(gpu_report, "RESULTS_DIR", str(results))
    first = {"gpu": "NVIDIA H200", "date": "2026-11-30T00:37:38+00:00", "bench": {"schema": 2, "results": []}}
    second = {**first, "date": "2026-11-30T18:03:21+00:00"}
    assert gpu_report.report_name(first) == "2026-11-30-nvidia-h200"
    json.dump(first, open(results / "2026-11-30-nvidia-h200.json", "w"))
    assert gpu_report.report_name(first) == "2026-11-30-nvidia-h200"  # refiled: same name
    assert gpu_report.report_name(second) == "2026-11-30-1803-nvidia-h200"
    json.dump(second, open(results / "2026-11-30-1803-nvidia-h200.json", "w"))
    assert gpu_report.previous("", "nvidia-h200", 2)[0] == "2026-11-30-1803-nvidia-h200.json"
    assert gpu_report.previous(str(results / "2026-11-30-1803-nvidia-h200.json"), "nvidia-h200", 2)[0] == \
        "2026-11-30-nvidia-h200.json"
    # the first run's report made again: compared with nothing before it, not with the later run
    assert gpu_report.previous(str(results / "2026-11-30-nvidia-h200.json"), "nvidia-h200", 2, first["date"]) == \
        (None, {})
    assert gpu_report.previous("", "nvidia-h200", 2, second["date"])[0] == "2026-11-30-nvidia-h200.json"


def test_host_profile_attributes_a_steady_step(tmp_path):
    """bench.host_profile (a gpu_check step) times each implementation's small steps and says where the host time
    goes: our steps are the steady ones (the C++ bucket op in the profile, not a full planning each step), each
    case has both implementations, the tables land in the markdown, and gpu_report's summary lists the timings."""
    from bench import host_profile

    if mixprec_ops.backends.unavailable_reason("adam_step_", "cpu", torch.device("cpu")) is not None:
        pytest.skip("no C++ CPU backend")
    out = tmp_path / "hostprof"  # where gpu_check puts it, and gpu_report reads it
    assert host_profile.main(["--device", "cpu", "--out", str(out), "--steps", "5", "--scale", "0.001"]) == 0
    doc = json.load(open(out / "host_profile.json"))
    got = {(c["case"], c["impl"]) for c in doc["cases"]}
    assert got == {(case, impl) for case in host_profile.cases(0.001) for impl in ("ours-cpu", "torch-fused")}
    for c in doc["cases"]:
        assert c["host_us"] > 0 and c["synced_us"] > 0 and c["profile"] and c["python"]
        names = {r["name"] for r in c["profile"]}
        if c["impl"] == "ours-cpu":
            assert ("mixprec::adam_step_bucket_" if c["case"].startswith("AdamW") else "mixprec::unscale_") in names
    n = 2 * len(host_profile.cases(0.001))
    md = (out / "host_profile.md").read_text()
    assert md.count("| op or runtime call |") == n and md.count("| Python function |") == n
    rows = gpu_report.read_host_profile(str(tmp_path))
    assert len(rows) == n and sum(line.startswith(("| AdamW", "| unscale_")) for line in
                                  gpu_report.host_profile_md(rows)) == n


def test_every_input_set_is_warmed_before_timing():
    """What a first call per input set does (an optimizer creating its state) stays out of the timed calls: the
    warm-up reaches every set (it covered only the first `warmup` ones)."""
    from bench.timing import measure

    order = []
    inputs = list(range(7))
    measure([order.append], inputs, torch.device("cpu"), reps=5, warmup=2, min_reps=5, budget_s=10.0)
    assert set(order[:len(inputs)]) == set(inputs) and len(order) == len(inputs) + 5


def test_each_round_calls_the_implementations_in_its_own_order():
    """A call pays for what the call before it left (on a CPU, a cache of dirty lines to write back): in a fixed
    order each implementation would always follow the same one. Every round calls each fn once, the order differs
    between rounds, each fn follows each other one about as often, and the orders are the same every run."""
    from collections import Counter

    from bench import timing

    log = []
    fns = [lambda x, i=i: log.append(i) for i in range(3)]
    timing.measure(fns, [0], torch.device("cpu"), reps=60, warmup=1, min_reps=60, budget_s=100.0)
    timed = log[-180:]
    rounds = [timed[i:i + 3] for i in range(0, 180, 3)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds)
    assert len({tuple(r) for r in rounds}) == 6  # every permutation of three occurs
    follows = Counter(p for p in zip(timed, timed[1:], strict=False) if p[0] != p[1])
    assert len(follows) == 6 and min(follows.values()) >= 15, follows  # ~20-30 each; a fixed order: 3 pairs only
    assert [timing.call_order(r, 3) for r in range(60)] == rounds


def test_unscale_bench_times_the_writing_path():
    """The unscale_ timing sets alternate inv_scale 2.0 / 0.5 (every call writes; with 1.0 our kernels took their
    read-only path while torch's wrote, so the bandwidth counted writes that never happened), and the values come
    back exactly after an even number of calls; the check also covers inv_scale 1."""
    from bench import cases_unscale
    from bench.registry import Ctx

    ctx = Ctx(torch.device("cpu"), True, ["cpu"])
    case = cases_unscale.cases(ctx)[0]
    d = case.make(0)
    before = [t.clone() for t in d["ts"]]
    ours = next(i for i in case.impls if i.backend != BASELINE)
    seen = []
    real = cases_unscale.unscale_
    cases_unscale.unscale_ = lambda ts, inv, found, **k: (seen.append(float(inv)), real(ts, inv, found, **k))[1]
    try:
        for _ in range(4):
            ours.fn(d)
    finally:
        cases_unscale.unscale_ = real
    assert seen == [2.0, 0.5, 2.0, 0.5]
    assert all(torch.equal(a, b) for a, b in zip(d["ts"], before))


def test_adam_bench_backends_step_their_own_params():
    """Each of our backends steps its own copy of a set's params: sharing them, each optimizer saw the other's
    writes as writes from outside and resynced its masters every step (a cost only the C++ backends paid)."""
    from bench import cases_adam
    from bench.registry import Ctx

    ctx = Ctx(torch.device("cpu"), True, ["cpu"])
    case = cases_adam.cases(ctx)[0]
    d = case.make(0)
    fns = {"cpu": next(i.fn for i in case.impls if i.backend == "cpu"), "ref": cases_adam._ours("torch")}
    for _ in range(2):
        for fn in fns.values():
            fn(d)
    a, b = d["bf16"]["cpu"], d["bf16"]["torch"]
    assert all(x is not y for x, y in zip(a, b)) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert case.check(next(i for i in case.impls if i.backend == "cpu")) is None


def test_gpu_targets_count_untimed_rows_as_missed():
    """A cast or unscale_ row without a time (its check failed, it crashed) shows in the targets as not met,
    instead of disappearing from them."""
    from bench import gpu_report

    rows = [{"op": "unscale_", "case": "50 tensors f32", "backend": "cuda", "gbps": None, "vs_torch": None,
             "check": "FAIL: tensors[3] differs", "tensor_bytes": 1 << 30},
            {"op": "unscale_", "case": "50 tensors f32", "backend": "triton", "gbps": 3000.0, "vs_torch": 1.2,
             "pct_copy": 91.0, "check": "ok", "tensor_bytes": 1 << 30}]
    t = gpu_report.targets(rows)
    # each row under both unscale_ targets (>= 90% of copy at >= 256 MB, >= 1.0x torch)
    assert [("cuda" in x["what"], "no time" in x["value"], x["met"]) for x in t] == [
        (True, True, False), (False, False, True), (True, True, False), (False, False, True)]
    del rows[1]["pct_copy"]  # timed, but no copy ceiling to judge against: shown as not met, not as untimed
    assert [(x["value"], x["met"]) for x in gpu_report.targets(rows)][1] == ("-", False)


def test_gpu_report_prints_a_filed_report_and_runs_record_their_commit(capsys):
    """gpu_report.py takes a filed report .json too (it printed "no results" for one: it read only output
    directories), writing nothing; a bench run's versions name the git commit it ran."""
    from bench import machine

    path = os.path.join(gpu_report.RESULTS_DIR, "2026-11-28-nvidia-h200.json")
    before = {f: os.path.getmtime(os.path.join(gpu_report.RESULTS_DIR, f)) for f in os.listdir(gpu_report.RESULTS_DIR)}
    assert gpu_report.main([path]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "adam_step_" in out and "no results" not in out
    assert before == {f: os.path.getmtime(os.path.join(gpu_report.RESULTS_DIR, f))
                      for f in os.listdir(gpu_report.RESULTS_DIR)}
    git = machine.versions()["git"]
    assert git is None or len(git.split("+")[0]) == 12


def test_bit_mismatch_rules():
    """The bit-for-bit check of the bench's cases (adam, cast, unscale): one ulp anywhere, a NaN where a number is
    expected, a signed zero, a dtype or shape all fail it; equal bits and any NaN against any NaN pass."""
    from bench.registry import bit_mismatch

    x = torch.randn(1000).to(torch.bfloat16)
    assert bit_mismatch(x, x.clone()) is None
    y = x.clone()
    y.view(torch.int16)[517] += 1  # one ulp
    assert "1 of 1000 elements differ, first at 517" in bit_mismatch(y, x, "t")
    n = x.clone()
    n[3] = float("nan")
    assert "NaN positions" in bit_mismatch(n, x)
    nan_bits = torch.tensor([0x7FC0, -1], dtype=torch.int16).view(torch.bfloat16)  # two different NaN payloads
    assert bit_mismatch(nan_bits, nan_bits.flip(0)) is None
    assert bit_mismatch(torch.tensor([-0.0]), torch.tensor([0.0])) is not None
    assert "expected" in bit_mismatch(x.float(), x) and "expected" in bit_mismatch(x[:-1], x)


def test_adam_case_check_compares_every_state_tensor():
    """The AdamW cases' check (two steps of the timed implementation against the reference backend) fails an
    implementation that leaves one element of one moment one ulp off, although every param is right."""
    from bench import cases_adam

    ctx = Ctx(torch.device("cpu"), True, ("cpu",))
    case = min((c for c in cases_adam.cases(ctx)), key=lambda c: c.numel)
    ours = next(i for i in case.impls if i.backend == "cpu")
    assert case.check(ours) is None

    def wrong(d):
        ours.fn(d)
        v = d["opts"]["cpu"].state[d["bf16"]["cpu"][5]]["exp_avg_sq"]
        v[7] = torch.nextafter(v[7], torch.tensor(1.0))

    bad = case.check(Impl("cpu", wrong))
    assert bad is not None and "param 5 exp_avg_sq" in bad, bad


def test_adam_experiment_row_steps_with_the_old_tiles(monkeypatch):
    """The AdamW cases time the Triton kernel at its former tiles (CHUNK 65536, BLOCK 1024, 8 warps) beside the op's
    (one 1024-element block a program, 4 warps), as a row of its own with its own optimizer: bit-exact against the
    reference like the op's rows, launched with those tiles and only during its own steps (the module's tiles
    restored after, the op's rows untouched)."""
    why = mixprec_ops.backends.unavailable_reason("adam_step_", "triton", torch.device("cpu"))
    if why is not None:
        pytest.skip(f"the Triton AdamW kernel on CPU tensors: {why}")
    from mixprec_ops.triton_kernels import adam as ta

    from bench import cases_adam

    sizes = [70000, 5, 1030, 1]
    case = cases_adam._case(Ctx(torch.device("cpu"), True, ("triton",)), "small", sizes)
    impl = next(i for i in case.impls if i.backend == cases_adam.EXPERIMENT_TILES)
    seen = []
    real = ta._adam_kernel
    monkeypatch.setattr(ta, "_adam_kernel", type("K", (), {"__getitem__": lambda self, grid: lambda *a, **k: (
        seen.append((grid[0], k["CHUNK"], k["BLOCK"], k["num_warps"])), real[grid](*a, **k))[1]})())
    assert case.check(impl) is None
    assert seen and all(x[1:] == (65536, 1024, 8) for x in seen) and seen[0][0] == 2 + 1 + 1 + 1  # 65536s a program
    assert (ta.CHUNK, ta.BLOCK, ta.NUM_WARPS) == (1024, 1024, 4)
    seen.clear()
    op = next(i for i in case.impls if i.backend == "triton")
    assert case.check(op) is None and seen
    assert all(x[1:] == (1024, 1024, 4) for x in seen) and seen[0][0] == 69 + 1 + 2 + 1  # 1024s a program


def test_adam_scalars_cases_check_bits():
    """mixprec::adam_scalars' cases (the step scalars, one op against the ~13-op torch expression): ours passes its
    check; a result one ulp off in one scalar fails it."""
    from bench import cases_adam_scalars

    cases = cases_adam_scalars.cases(Ctx(torch.device("cpu"), True, ("cpu",)))
    assert [c.name for c in cases] == ["40 step counters", "2000 step counters", "2000 equal step counters"]
    for c in cases:
        ours = next(i for i in c.impls if i.backend == "cpu")
        assert c.check(ours) is None

        def wrong(d, fn=ours.fn):
            out = fn(d)
            out.view(torch.int32)[7, 1] += 1
            return out

        assert "scalars" in (c.check(Impl("cpu", wrong)) or "")


def test_cast_backward_cases_check_bits():
    """cast_and_scale's backward cases: ours passes its check; a gradient one ulp off in one element, or one whose
    saturated elements pass their gradient (the mask dropped), fails it. The check data holds saturating values."""
    from bench import cases_cast

    cases = [c for c in cases_cast.cases(Ctx(torch.device("cpu"), True, ("cpu",))) if c.name.startswith("backward")]
    assert {c.name for c in cases} == {name for name, *_ in cases_cast.BACKWARD_CONFIGS}
    for c in cases:
        ours = next(i for i in c.impls if i.backend == "cpu")
        assert c.check(ours) is None

        def one_ulp(d, fn=ours.fn):
            out = fn(d)
            out.view(torch.int16 if out.element_size() == 2 else torch.int32)[11] += 1
            return out

        def no_mask(d, fn=ours.fn):
            return cast_and_scale_backward(d["g"], d["x"], d["g"].dtype, d["scale"], saturate=False, backend="cpu")

        assert "grad_x" in (c.check(Impl("cpu", one_ulp)) or "")
        assert "grad_x" in (c.check(Impl("cpu", no_mask)) or "")


def test_cast_experiment_row_times_the_triton_kernel_at_8192(monkeypatch):
    """The bench times the Triton cast at 8192 elements a program beside the op (4096) for 2-byte sources and for
    casts with amax, as a row of its own that passes the same bit check and that no target judges; the GPU's extra
    case (f32 -> e4m3 without amax) is not run on a CPU."""
    pytest.importorskip("triton")
    from mixprec_ops.triton_kernels import cast_and_scale as tk

    from bench import cases_cast, targets

    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setattr(cases_cast, "sizes", lambda ctx: [20_000])
    cases = cases_cast.cases(Ctx(torch.device("cpu"), True, ("triton",)))
    rows = {(c.name, i.backend): (c, i) for c in cases for i in c.impls}
    assert {n for n, b in rows if b == cases_cast.EXPERIMENT_8K} == {"bf16->e4m3 +amax", "f32->e4m3 +amax"}
    assert "f32->e4m3" not in {n for n, _ in rows}
    blocks = []
    real = tk._cast_and_scale_kernel
    monkeypatch.setattr(tk, "_cast_and_scale_kernel", type("K", (), {
        "__getitem__": lambda self, grid: lambda *a, **k: (blocks.append(k["BLOCK"]), real[grid](*a, **k))[1]})())
    c, impl = rows[("bf16->e4m3 +amax", cases_cast.EXPERIMENT_8K)]
    assert c.check(impl) is None and blocks == [8192]
    c32, impl32 = rows[("f32->e4m3 +amax", cases_cast.EXPERIMENT_8K)]
    assert c32.check(impl32) is None and blocks == [8192, 8192]
    gpu_names = {c.name for c in cases_cast.cases(Ctx(torch.device("cuda"), True, ("cuda",)))}
    assert "f32->e4m3" in gpu_names and "f32->e4m3 +amax" in gpu_names
    assert c.check(Impl(impl.backend, lambda d: impl.fn({**d, "x": d["x"][:-1]}))) is not None  # a wrong one fails
    # the bench's filter of unavailable backends reads the label's backend ("triton"; the whole label raised)
    from bench import cli

    assert cli.backend_of(impl.backend) == "triton" and cli.backend_of("cuda-gemm+sum") == "cuda"
    skipped = []
    cli.drop_unavailable(cases, torch.device("cpu"), skipped)
    assert impl in c.impls and skipped == []
    cli.drop_unavailable(cases, torch.device("meta"), skipped)
    assert c.impls == [i for i in c.impls if i.backend == BASELINE] and f"cast_and_scale {impl.backend}: " in (
        "\n".join(skipped))
    row = {"op": "cast_and_scale", "case": c.name, "backend": impl.backend, "numel": 1, "bytes": 1, "gbps": 1.0,
           "pct_copy": 1.0, "vs_torch": 1.0, "tensor_bytes": 10**9, "check": "ok"}
    assert targets.judge([row], [], "cuda") == []
    assert targets.judge([{**row, "backend": "triton"}], [], "cuda") != []


def test_sanitize_subset_runs_on_the_cpu_kernels(tmp_path):
    """bench/sanitize_subset.py (the calls bench/gpu_check runs under compute-sanitizer) with --device cpu: the same
    calls through the C++ CPU kernels, every section compared with the reference. Keeps the script from going stale
    between GPU sessions (its first failure would otherwise show on the GPU machine)."""
    if mixprec_ops.backends.unavailable_reason("cast_and_scale", "cpu", torch.device("cpu")):
        pytest.skip("no C++ CPU kernels in this build")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-P", os.path.join(REPO, "bench", "sanitize_subset.py"), "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for section in ("cast_and_scale", "cast_and_scale_backward", "unscale_", "adam_step_"):
        assert f"sanitize_subset: {section}: ok" in proc.stdout, proc.stdout


def test_targets_are_judged_for_the_device_the_run_measured():
    """The issues give CPU targets too (cast_and_scale >= 5x eager, AdamW >= 1.5x torch fused + copy), and the GPU
    AdamW targets (>= 90% of the 28 B/param floor on cases >= 256 MB, >= 1.2x torch): no run judged any of them
    (the bench judged only the matmul geomeans, gpu_report only the H200's cast/unscale_ rows). Each ratio target
    shows the equal-bandwidth ratio beside it; a GPU ratio is the worse of device-time and loop ratios; baselines,
    other devices' rules and (on a GPU) small cases of a size-bound target are not judged."""
    from bench import targets

    def r(op, backend, vs, pct=50.0, nbytes=1000, base_bytes=None, tensor_bytes=10**9, loop=None, case="c"):
        return {"op": op, "case": case, "backend": backend, "numel": 4_000_000, "bytes": nbytes,
                "baseline_bytes": base_bytes, "tensor_bytes": tensor_bytes, "gbps": None if vs is None else 1.0,
                "vs_torch": vs, "vs_torch_loop": loop, "pct_copy": None if vs is None else pct, "check": "ok"}

    cpu_rows = [r("adam_step_", "torch", 1.0), r("adam_step_", "cpu", 1.36, nbytes=28, base_bytes=34),
                r("cast_and_scale", "cpu", 5.14, tensor_bytes=4_000_000), r("cast_and_scale", "cpu", None),
                {**r("cast_and_scale", "cpu", 9.0), "pass": "backward"}, r("unscale_", "cpu", 0.5)]
    got = [(x["what"].split(" ")[0], x["value"], x["met"], x["issue"]) for x in targets.judge(cpu_rows, [], "cpu")]
    assert got == [("cast_and_scale", "5.140x", True, 2), ("cast_and_scale", "no time (ok)", False, 2),
                   ("adam_step_", "1.360x (equal-bw 1.21x)", False, 3)]
    gpu_rows = [r("adam_step_", "cuda", 1.45, pct=92.0), r("adam_step_", "triton", 1.3, pct=85.0, loop=1.1),
                r("adam_step_", "cuda", 2.0, pct=10.0, tensor_bytes=28_000_000)]
    got = [(x["what"].split(" >= ")[1], x["value"], x["met"]) for x in targets.judge(gpu_rows, [], "cuda")]
    assert got == [("90% of copy", "92.0%", True), ("90% of copy", "85.0%", False),
                   ("1.2x torch", "1.450x", True), ("1.2x torch", "1.100x", False), ("1.2x torch", "2.000x", True)]
    assert targets.judge([r("unscale_", "cpu", 0.5)], [], "cpu") == []  # no CPU target for unscale_
    # a run on an unsteady machine (inflated ratios: torch's thread wake-ups suffer most), or timed by the first
    # bench's rules (schema 1: host time in device times, unscale_ on its read-only path), shows and judges nothing
    for kw, why in ((dict(noisy=True), "not steady"), (dict(schema=1), "schema 1")):
        shown = targets.judge(cpu_rows, [], "cpu", **kw)
        assert len(shown) == 3 and all(x["met"] is None and why in x["value"] for x in shown), shown
        assert "0 of 3 met, 3 not judged" in targets.lines(shown, "cpu")[0]
        assert targets.lines(shown, "cpu")[1].endswith("not judged")
    assert "1 of 3 met" in targets.lines(targets.judge(cpu_rows, [], "cpu"), "cpu")[0]
    # gpu_report judges a CPU run against the CPU targets (it judged none), an H200 run against the H200's
    assert gpu_report.targets(cpu_rows, [], device="cpu")[0]["met"]


class _Traffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes the aten ops run under it read and write: every tensor argument is read, every tensor argument the op
    mutates (its schema's `!`) and every fresh tensor it returns is written; copy_ and _foreach_copy_ overwrite
    their destination (written, not read); the fused Adam ops' grads are marked mutable for the in-place unscale a
    grad_scale asks for, and only read without one."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        overwrites = func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten._foreach_copy_)
        fused_adam = func.overloadpacket in (torch.ops.aten._fused_adam_, torch.ops.aten._fused_adamw_)

        def size(v):
            ts = v if isinstance(v, (list, tuple)) else [v]
            return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

        for i, arg in enumerate(func._schema.arguments):
            v = args[i] if i < len(args) else kwargs.get(arg.name)
            written = (arg.alias_info is not None and arg.alias_info.is_write
                       and not (fused_adam and arg.name == "grads" and kwargs.get("grad_scale") is None))
            self.bytes += size(v) * ((not (overwrites and i == 0)) + written)
        outs = out if isinstance(out, (list, tuple)) else [out]
        for ret, v in zip(func._schema.returns, outs, strict=False):
            if ret.alias_info is None:
                self.bytes += size(v)
        return out


def test_baseline_byte_counts_match_the_baselines_aten_traffic():
    """The equal-bandwidth ratios come from each case's count of its torch baseline's bytes. Counted here from the
    aten ops the baselines really run (a dispatch mode adding up reads and writes): the eager cast (abs, amax, the
    fp32 product, clamp, .to: 33, 25 and 22 B per element), torch's fused unscale (2x the grads, 3x with the norm)
    and the fused AdamW + copy (34 B per param), to the scalars' few bytes."""
    from bench import cases_adam, cases_cast, cases_unscale
    from bench.registry import Ctx

    ctx = Ctx(torch.device("cpu"), True, ("cpu",))
    checked = []
    for mod in (cases_cast, cases_unscale, cases_adam):
        for c in mod.cases(ctx):
            if not c.baseline_bytes or c.numel > 4_200_000:
                continue
            base = c.impls[0]
            assert base.backend == BASELINE
            d = c.make(0)
            base.fn(d)  # AdamW: the optimizer and its state are made by the first call
            with _Traffic() as t:
                base.fn(d)
            assert abs(t.bytes - c.baseline_bytes) <= 1e-3 * c.baseline_bytes + 4096, (c.op, c.name, t.bytes,
                                                                                        c.baseline_bytes)
            checked.append((c.op, c.name, t.bytes / c.numel))
    assert {op for op, _, _ in checked} == {"cast_and_scale", "unscale_", "adam_step_"} and len(checked) >= 9
    per_el = {name: round(b) for op, name, b in checked if op == "cast_and_scale"}
    assert per_el == {"f32->e4m3 +amax": 33, "bf16->e4m3 +amax": 25, "f32->bf16": 22}, per_el


def test_gradscaler_case_gives_each_implementation_its_own_scaler():
    """The bench hands one input set to every implementation of a case: the GradScaler case's implementations (our
    scaler with each backend, torch's) must each keep their own scaler in it, or one backend's row times another's
    (a review found the "triton" row timing the "cuda" scaler)."""
    from bench import cases_unscale
    from mixprec_ops.amp import GradScaler

    d = cases_unscale._scaler_make([5, 7], torch.device("cpu"), seed=1)
    d["device"] = torch.device("cpu")
    for fn in (cases_unscale._scaler_fn(GradScaler, backend="cpu"),
               cases_unscale._scaler_fn(GradScaler, backend="torch"),
               cases_unscale._scaler_fn(torch.amp.GradScaler)):  # (the baseline)
        fn(d)
    made = list(d["scalers"].values())
    assert len(made) == 3
    assert sorted(str(getattr(s, "_backend", "torch.amp")) for s, _ in made) == ["cpu", "torch", "torch.amp"]


def test_gpu_checks_test_selection_is_the_tests_a_cpu_machine_skips():
    """bench/gpu_check runs the tests with MIXPREC_TESTS_CUDA_ONLY=1 (tests/conftest.py): collected here (no GPU),
    that selection holds every test with a CUDA-device parameter, and those asking for a CUDA device by a skip mark
    whatever their id, and nothing else (not a test for machines without CUDA); the rest are deselected. Two test
    files stand in for the suite."""
    files = ["tests/test_grad_scaler.py", "tests/test_unscale.py"]

    def collect(only):
        env = {**os.environ, "MIXPREC_TESTS_CUDA_ONLY": "1" if only else "0"}
        out = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", *files],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300).stdout
        return {line for line in out.splitlines() if "::" in line}

    everything, gpu = collect(False), collect(True)
    assert gpu and gpu < everything
    by_mark = {"tests/test_grad_scaler.py::test_unscale_adds_no_host_sync[triton]"}
    assert {t for t in everything if "cuda" in t} | by_mark == gpu, sorted(gpu ^ ({t for t in everything
                                                                                  if "cuda" in t} | by_mark))
