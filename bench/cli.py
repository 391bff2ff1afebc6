"""`python -m bench`: detect the device, measure its ceilings, check then time every case, write the results."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import time

import torch

from . import REPO_ROOT, ceilings, machine, report, targets
from .registry import BASELINE, TIME_BUDGET_S, UNCHECKED, Ctx, discover
from .timing import measure, n_sets

SKIPPED_BUDGET = "not run: time budget"  # the check column of a case skipped by its op's TIME_BUDGET_S
PARTIAL = "results.partial.json"  # the rows so far, rewritten after every case; removed once results.json is written

KERNEL_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# (reps, warm-up, min reps, wall budget per timing in s, max input sets), per device and quick/full.
SETTINGS = {
    ("cpu", True): (40, 2, 5, 0.75, 16),
    ("cpu", False): (100, 2, 5, 2.0, 16),
    ("cuda", True): (50, 5, 10, 0.25, 64),
    ("cuda", False): (100, 5, 10, 0.5, 64),
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer sizes and reps (CPU: under 2 minutes)")
    p.add_argument("--ops", default="", help="ops or prefixes, comma-separated (default: all), e.g. cast,unscale")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the best available")
    p.add_argument("--out", default=None, help="output dir (default bench/out/<date>-<device>)")
    p.add_argument("--reps", type=_positive, default=None, help="max timed reps per measurement")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's own choice)")
    return p.parse_args(argv)


def _keep_freed_memory() -> str | None:
    """glibc returns large freed blocks to the kernel (mmap'd above a threshold, trimmed from the heap top), so an
    op that allocates its output or temporaries every call pays a page fault per 4 KiB touched: 11,686 faults and
    18 ms per call against 3.6 ms without, for torch's eager bf16 -> e4m3 cast of 4M elements (the baseline's ratios
    then follow the kernel's fault handling, not the op). Raise both thresholds to 1 GiB for this process, as a
    long-running training process's allocator reaches in steady state. Returns a note for the JSON, or None."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        return None
    return "glibc mmap and trim thresholds raised to 1 GiB (no page faults for per-call allocations)" if ok else None


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return n


def _progress(total):
    """A tqdm bar on stderr (redrawn at most every 10 s when stderr is a log file, not a terminal)."""
    tty = sys.stderr.isatty()
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, mininterval=0.5 if tty else 10)
    except ImportError:
        bar = None

    class Bar:
        def update(self):
            if bar is not None:
                bar.update()

        def note(self, s):
            if bar is not None:
                bar.set_postfix_str(s, refresh=tty)

        def close(self):
            if bar is not None:
                bar.close()

    return Bar()


def backend_of(label: str) -> str:
    """The backend a row's label runs on: "cuda-gemm+sum" is a variant of the cuda backend (cases_matmul's wgrad
    case), "triton:block8192" an experiment on the Triton kernel (cases_cast)."""
    return re.split(r"[-:]", label, maxsplit=1)[0]


def drop_unavailable(cases, device, skipped: list[str]) -> None:
    """Drop from each case the implementations whose backend cannot serve its op here, saying why (once per op and
    label, in `skipped` and on stdout)."""
    import mixprec_ops  # (imported late, as in main)

    for c in cases:
        keep = []
        for impl in c.impls:
            why = (None if impl.backend.startswith(BASELINE)
                   else mixprec_ops.backends.unavailable_reason(c.op, backend_of(impl.backend), device))
            if why is None:
                keep.append(impl)
            elif not any(s.startswith(f"{c.op} {impl.backend}:") for s in skipped):
                skipped.append(f"{c.op} {impl.backend}: {why}")
                print(f"  skipped: {skipped[-1]}")
        c.impls = keep


def main(argv=None) -> int:
    args = parse_args(argv)
    wanted = {o.strip().rstrip("_") for o in args.ops.split(",") if o.strip()}  # op names or their prefixes

    def picks(w: str, op: str) -> bool:
        return op.rstrip("_").startswith(w)

    providers = {op: f for op, f in discover().items() if not wanted or any(picks(w, op) for w in wanted)}
    unknown = {w for w in wanted if not any(picks(w, op) for op in discover())}
    if unknown:
        print(f"bench: unknown ops {sorted(unknown)}; known: {sorted(discover())}", file=sys.stderr)
        return 2
    dev_type = args.device or machine.best_device()
    if dev_type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if dev_type == "cuda" else torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_note = _keep_freed_memory() if dev_type == "cpu" else None
    import mixprec_ops

    now = dt.datetime.now(dt.timezone.utc)
    out = args.out or os.path.join(REPO_ROOT, "bench", "out", f"{now:%Y-%m-%d}-{dev_type}")
    try:  # an unusable --out fails here, before any case runs, not with a traceback after the first one
        os.makedirs(out, exist_ok=True)
        for stale in ("results.json", "results.csv", PARTIAL, *report.PLOTS):  # an earlier run's, in a reused
            if os.path.exists(os.path.join(out, stale)):                         # directory: never mixed
                os.remove(os.path.join(out, stale))
        probe = os.path.join(out, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        print(f"bench: cannot write results into --out {out!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    reps, warmup, min_reps, budget, max_sets = SETTINGS[(dev_type, args.quick)]
    reps = args.reps or reps
    mach, vers, bk = machine.describe(device), machine.versions(), mixprec_ops.backends.report()

    print(f"mixprec_ops bench  {now:%Y-%m-%d %H:%M} UTC  device={dev_type}{' (quick)' if args.quick else ''}")
    if dev_type == "cuda":
        print(
            f"  GPU: {mach['gpu']} (sm_{mach['compute_capability'].replace('.', '')}, {mach['sm_count']} SMs, "
            f"{mach['gpu_memory_gib']} GiB, L2 {mach['cache_bytes'] >> 20} MiB); host CPU {mach['cpu']}"
        )
    else:
        print(
            f"  CPU: {mach['cpu']}, {mach['cpu_cores']} cores, torch threads {mach['torch_threads']}, "
            f"last-level cache {mach['cache_bytes'] >> 20} MiB; load average {mach['loadavg_start']}; "
            f"parallel-region latency {mach['parallel_latency_us_start']} us; C++ kernels' vector code: "
            f"{bk.get('cpu_isa') or 'none (no extension)'}"
        )
        if mach["parallel_latency_us_start"] > 300:
            print(
                "  WARNING: waking torch's threads takes milliseconds (~20 us when idle): the machine is busy, timings "
                "of multi-threaded torch ops will be inflated (see the note at the end)"
            )
    print(f"  torch {vers['torch']} (CUDA {vers['torch_cuda']}), triton {vers['triton']}, python {vers['python']}")
    print(
        f"  mixprec_ops {vers['mixprec_ops']} (git {vers['git'] or 'unknown'}) from "
        f"{os.path.dirname(vers['mixprec_ops_file'])}; "
        f"extension {bk['extension']}; build {bk['build']}"
    )
    if not vers["mixprec_ops_installed"]:
        print("  WARNING: imported the SOURCE tree (no compiled kernels): run `make install` first")
    print(f"  backends on {dev_type}:")
    print("\n".join(machine.backend_summary(bk, device)))
    skipped = []
    if dev_type == "cpu":
        skipped.append("triton on CPU: only its interpreter runs there, whose timings are meaningless")
    print(
        f"  timing: median of <= {reps} reps after {warmup} warm-up calls "
        f"({'CUDA events' if dev_type == 'cuda' else 'time.perf_counter'}), every input set warmed; inputs rotated "
        f"over up to {max_sets} sets, aiming at 4x the {mach['cache_bytes'] >> 20} MiB cache"
    )
    if malloc_note:
        print(f"  allocator: {malloc_note}")
    for s in skipped:
        print(f"  skipped: {s}")

    ceil = ceilings.measure_all(device, args.quick)
    copy_gbps = ceil["copy_gbps"]
    print(
        f"ceilings: copy {copy_gbps:.1f} GB/s ({ceil['copy_bytes'] >> 20} MiB read + written per copy; in place "
        f"x.mul_(1.0) {ceil['inplace_gbps']:.1f} GB/s)"
        + (
            f"; torch bf16 matmul {ceil['matmul_n']}^3: {ceil['matmul_bf16_tflops']:.0f} TFLOP/s"
            if "matmul_bf16_tflops" in ceil
            else ""
        )
    )

    ctx = Ctx(device, args.quick, KERNEL_BACKENDS[dev_type])
    cases = [c for f in providers.values() for c in f(ctx)]
    drop_unavailable(cases, device, skipped)

    rows, notes = [], []

    def failed(r):
        return r["check"] not in ("ok", SKIPPED_BUDGET, UNCHECKED)

    def error_text(e, n=160):
        return f"{type(e).__name__}: {str(e).splitlines()[0][:n] if str(e) else ''}"

    def row(c, impl, check, t=None, base=None, **extra):
        """One results row: implementation impl of case c, timed t (None: not timed) against the baseline's base."""
        return {
            "op": c.op,
            "case": c.name,
            "backend": impl.backend,
            "numel": c.numel,
            "bytes": c.bytes,
            "tensor_bytes": c.tensor_bytes,
            "baseline_bytes": c.baseline_bytes or None,
            "median_us": t.median_s * 1e6 if t else None,
            "p20_us": t.p20_s * 1e6 if t else None,
            "p80_us": t.p80_s * 1e6 if t else None,
            "reps": t.reps if t else 0,
            "gbps": c.bytes / t.median_s / 1e9 if t else None,
            "pct_copy": None,
            "vs_torch": base.median_s / t.median_s if (t and base) else None,
            # GPU: the host's time to queue one call, and the ratio for a loop of calls, where each call costs the
            # longer of its device time and its host time
            "host_us": t.host_s * 1e6 if (t and t.host_s is not None) else None,
            "vs_torch_loop": (max(base.median_s, base.host_s) / max(t.median_s, t.host_s)
                              if (t and base and t.host_s is not None and base.host_s is not None) else None),
            # the host took longer to queue the call than the spin ahead of it lasted: the device waited, and the
            # median counts some host time (its loop ratio is right; its GB/s and device ratio understate it)
            "host_over_spin": bool(t and t.spin_s is not None and t.host_s is not None and t.host_s > t.spin_s),
            "check": check,
            "desc": impl.desc,
            "flops": c.flops,
            "tflops": c.flops / t.median_s / 1e12 if (t and c.flops) else None,
            "pct_peak": None,
            **extra,
            **c.tags,
        }

    def untimed(c, check):
        """Rows without a time for every implementation of case c (budget spent, inputs that failed)."""
        for impl in c.impls:
            rows.append(row(c, impl, check))
            bar.update()

    def with_shares(rs, copy):
        """rs with %copy (of `copy` GB/s) and %peak (of torch's bf16 matmul rate, measured at the start) filled in."""
        peak = ceil.get("matmul_bf16_tflops")
        for r in rs:
            r["pct_copy"] = 100 * r["gbps"] / copy if (r["gbps"] and copy) else None
            r["pct_peak"] = 100 * r["tflops"] / peak if (r["tflops"] and peak) else None
        return rs

    def document(rs, seconds, **extra):
        """What results.json holds for rows rs (results.partial.json: the same, with partial=True)."""
        # schema 2: device-only event timing and unscale_ timed with writes (2026-11-29); schema 1 rows (the first
        # H200 run) timed otherwise and are not compared with (bench/gpu_report.py)
        return {"schema": 2, "date": now.isoformat(timespec="seconds"), "device": dev_type, "quick": args.quick,
                "machine": mach, "versions": vers, "backends": bk, "ceilings": ceil, **extra, "skipped": skipped,
                "notes": notes, "cases_seconds": round(seconds, 1),
                "op_seconds": {op: round(t, 1) for op, t in op_seconds.items()},
                "failures": sum(map(failed, rs)), "geomeans": (gms := report.geomeans(rs)),
                "targets": targets.judge(rs, gms, dev_type, bool(extra.get("partial")), bool(extra.get("noisy"))),
                "results": rs}

    bar = _progress(sum(len(c.impls) for c in cases))
    t_start = time.perf_counter()
    op_seconds: dict[str, float] = {}  # wall time spent per op so far (for TIME_BUDGET_S)
    over_budget: dict[str, list[str]] = {}
    with torch.no_grad():
        for c in cases:
            limit = TIME_BUDGET_S.get(c.op)
            if limit is not None and op_seconds.get(c.op, 0.0) > limit:
                over_budget.setdefault(c.op, []).append(c.name)
                untimed(c, SKIPPED_BUDGET)  # rows without a time: a target group then counts the case as missing
                continue
            t_case = time.perf_counter()
            for n in c.notes:
                if n not in notes:
                    notes.append(n)
            k = n_sets(c.set_bytes or c.bytes, mach["cache_bytes"], max_sets)
            try:
                inputs = [c.make(seed) for seed in range(k)]
            except Exception as e:  # noqa: BLE001  (one case's inputs must not end the run)
                untimed(c, f"ERROR: making the inputs: {error_text(e)}")
                continue
            checks, timed, check_s = {}, [], {}
            for impl in c.impls:
                bar.note(f"{c.op} {c.name} {c.numel / 1e6:.3g}M check {impl.backend}")
                t_check = time.perf_counter()
                try:
                    bad = c.check(impl)
                    checks[impl.backend] = ("ok" if bad is None else UNCHECKED if bad == UNCHECKED
                                            else f"FAIL: {bad}")
                    if bad is None or bad == UNCHECKED:  # a wrong result is not timed: no speed, no ratio, no target
                        timed.append(impl)
                except Exception as e:  # noqa: BLE001  (a crashing backend must not hide the others)
                    checks[impl.backend] = f"ERROR: {error_text(e, 200)}"
                # The check is the first call of this shape: it includes any compilation and autotuning.
                check_s[impl.backend] = time.perf_counter() - t_check
            bar.note(f"{c.op} {c.name} {c.numel / 1e6:.3g}M timing")

            def time_these(impls, inputs):
                got = measure([i.fn for i in impls], inputs, device, reps=min(reps, c.reps or reps), warmup=warmup,
                              min_reps=min_reps, budget_s=min(budget, c.budget_s or budget))
                return {i.backend: t for i, t in zip(impls, got, strict=True)}

            try:
                ts = time_these(timed, inputs) if timed else {}
            except Exception as e:  # noqa: BLE001  (find which implementation failed; time the others)
                ts, ok = {}, []
                for i in timed:
                    try:
                        i.fn(inputs[0])
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        ok.append(i)
                    except Exception as e1:  # noqa: BLE001
                        checks[i.backend] += f"; timing ERROR: {error_text(e1)}"
                err = e
                if ok and len(ok) < len(timed):
                    try:
                        ts = time_these(ok, inputs)
                    except Exception as e2:  # noqa: BLE001
                        err = e2
                if not ts:  # the others could not be timed either (or failed only together): say why
                    for i in ok:
                        checks[i.backend] += f"; timing ERROR: {error_text(err)}"
            infos = {}
            for impl in timed:
                if impl.info is not None and impl.backend in ts:
                    try:
                        infos[impl.backend] = impl.info(inputs[0])
                    except Exception as e:  # noqa: BLE001  (a note must not cost the measurement)
                        infos[impl.backend] = f"info ERROR: {error_text(e, 120)}"
            base = ts.get(BASELINE)
            for impl in c.impls:
                rows.append(row(c, impl, checks[impl.backend], ts.get(impl.backend), base, sets=k,
                                check_s=round(check_s[impl.backend], 3), variant=infos.get(impl.backend, "")))
                bar.update()
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
            op_seconds[c.op] = op_seconds.get(c.op, 0.0) + time.perf_counter() - t_case
            # After every case: what is measured so far, so that a run stopped at a time limit (bench/gpu_check's
            # step) still leaves its rows. %copy against the start's ceiling; replaced by results.json at the end.
            report.write_json(os.path.join(out, PARTIAL), document(with_shares(rows, ceil["copy_gbps"]),
                                                                   time.perf_counter() - t_start, partial=True))
    bar.close()
    for op, names in over_budget.items():
        skipped.append(f"{op}: {len(names)} case(s) not run, the op's {TIME_BUDGET_S[op]:.0f} s time budget was "
                       f"spent ({op_seconds[op]:.0f} s): {', '.join(names)}")
        print(f"  skipped: {skipped[-1]}")
    elapsed = time.perf_counter() - t_start

    end = ceilings.copy_bandwidth(device, args.quick)
    ceil["copy_gbps_end"] = end["copy_gbps"]
    copy_gbps = max(copy_gbps, end["copy_gbps"])  # the denominator of %copy: the best the machine showed
    ceil["copy_gbps_best"] = copy_gbps
    peak = ceil.get("matmul_bf16_tflops")  # torch's own bf16 matmul rate, measured at the start (GPU only)
    failures = [r for r in rows if failed(r)]
    mach["loadavg_end"] = machine.load()
    mach["parallel_latency_us_end"] = machine.parallel_latency_us()
    lat = max(mach["parallel_latency_us_start"], mach["parallel_latency_us_end"])
    noisy = abs(ceil["copy_gbps"] - ceil["copy_gbps_end"]) > 0.2 * copy_gbps or (dev_type == "cpu" and lat > 300)
    settings = {"reps": reps, "warmup": warmup, "min_reps": min_reps, "budget_s": budget, "max_sets": max_sets,
                "allocator": malloc_note}
    doc = document(with_shares(rows, copy_gbps), elapsed, settings=settings, noisy=noisy)
    geomeans = doc["geomeans"]
    report.write_json(os.path.join(out, "results.json"), doc)
    if os.path.exists(os.path.join(out, PARTIAL)):
        os.remove(os.path.join(out, PARTIAL))
    name = mach.get("gpu") or f"{mach['cpu']} x{mach['cpu_cores']}"
    report.write_csv(os.path.join(out, "results.csv"), rows,
                     {"date": doc["date"], "device": dev_type, "machine": name, "torch": vers.get("torch"),
                      "git": vers.get("git"), "noisy": noisy})
    title = f"mixprec_ops {dev_type} {name} {now:%Y-%m-%d}; copy ceiling {copy_gbps:.0f} GB/s"
    if noisy:
        title += "\nmachine NOT STEADY during this run: ratios inflated"
    written = report.plots(out, rows, title)

    print()
    for n in notes:
        print(f"note: {n}")
    print(
        f"copy ceiling {ceil['copy_gbps']:.1f} GB/s at start, {ceil['copy_gbps_end']:.1f} at end: %copy is of the "
        f"best, {copy_gbps:.1f} GB/s; 'vs torch' = torch baseline time / this time (>1: faster than torch); "
        f"cases took {elapsed:.0f} s ({', '.join(f'{op} {t:.0f} s' for op, t in op_seconds.items())}); "
        f"load average {mach['loadavg_start']} -> {mach['loadavg_end']}"
    )
    if noisy:
        print(
            f"WARNING: this machine was not steady (copy ceiling {ceil['copy_gbps']:.1f} -> {ceil['copy_gbps_end']:.1f}"
            f" GB/s; a {torch.get_num_threads()}-thread torch region took {mach['parallel_latency_us_start']} -> "
            f"{mach['parallel_latency_us_end']} us, ~20 us when idle). Slow thread wake-ups punish torch eager and "
            "per-tensor loops far more than fused kernels: 'vs torch' is inflated. Rerun when idle, or with "
            "--threads 1 for a like-for-like single-thread comparison."
        )
    if any(not r.get("flops") for r in rows):
        print(report.table(rows))
    if any(r.get("flops") for r in rows):
        print(report.flops_table(rows, peak))
    if any(r.get("host_over_spin") for r in rows):
        print(report.HOST_OVER_SPIN_NOTE)
    for line in report.geomean_lines(geomeans, dev_type, noisy):
        print(line)
    for line in targets.lines(doc["targets"], dev_type):
        print(line)
    print(
        f"wrote {out}/results.json, results.csv"
        + "".join(f", {os.path.basename(p)}" if p.endswith(".png") else f" ({p})" for p in written)
    )
    if failures:
        print(f"{len(failures)} correctness check(s) FAILED:")
        for r in failures:
            print(f"  {r['op']} {r['case']} {r['backend']} {r['numel']}: {r['check']}")
        return 1
    return 0
