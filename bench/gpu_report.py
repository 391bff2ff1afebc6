"""Step 6 of bench/gpu_check: gather OUTDIR's artifacts into OUTDIR/report.json and OUTDIR/summary.md, print the
summary. Needs only the standard library, so it also runs on the machine the results come back to:

    python3 bench/gpu_report.py OUTDIR [--commit-results]

--commit-results also copies them to bench/results/<YYYY-MM-DD>-<gpu-slug>.json / .md (on the GPU machine the repo
is a throwaway copy, so there leave the flag off and copy from the returned OUTDIR instead, e.g. by running this
script with the flag on the returned OUTDIR). The summary compares with the newest earlier bench/results/*.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import xml.etree.ElementTree as ET

try:
    from .report import HOST_OVER_SPIN_NOTE, fmt_median, fmt_time  # imported as bench.gpu_report
    from .targets import judge
except ImportError:  # run as a script (python3 bench/gpu_report.py): bench/ is sys.path[0]
    from report import HOST_OVER_SPIN_NOTE, fmt_median, fmt_time
    from targets import judge

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")


def read_steps(out: str) -> list[dict]:
    steps = []
    path = os.path.join(out, "steps.tsv")
    if os.path.exists(path):
        for line in open(path):
            name, status, rc, secs, limit = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
            steps.append(
                {
                    "step": name,
                    "status": status,
                    "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                    "seconds": float(secs or 0),
                    "limit_s": int(limit) if limit.isdigit() else None,
                }
            )
    return steps


_OUTCOME = re.compile(r"(?:^|\s)(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s|$)")
_NODEID = re.compile(r"(tests/\S+?\.py::\S+)")


def read_test_log(out: str) -> dict | None:
    """Counts from the tests step's `pytest -v` log (logs/tests.log), for when junit.xml was never written (the step
    hit its time limit: pytest writes the XML only at the end). Both plain (`nodeid PASSED [ 1%]`) and xdist
    (`[gw0] [ 1%] PASSED nodeid`) lines are read; each test id counts once."""
    path = os.path.join(out, "logs", "tests.log")
    if not os.path.exists(path):
        return None
    seen: dict[str, str] = {}
    with open(path, errors="replace") as f:
        for line in f:
            m, n = _OUTCOME.search(line), _NODEID.search(line)
            if m and n:
                seen[n.group(1)] = m.group(1)
    if not seen:
        return None
    outcomes = list(seen.values())
    c = {"tests": len(seen), "failures": outcomes.count("FAILED"), "errors": outcomes.count("ERROR"),
         "skipped": outcomes.count("SKIPPED") + outcomes.count("XFAIL")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    c["failed_tests"] = [t for t, o in seen.items() if o in ("FAILED", "ERROR")][:20]
    c["source"] = "logs/tests.log (no junit.xml: the step did not finish; counts cover the tests that ran)"
    return c


def read_test_report(out: str) -> dict | None:
    """tests.jsonl: the line per test outcome that tests/conftest.py appends as the run goes (MIXPREC_TEST_REPORT):
    counts, each failure's reason (its first "E " line, or the report's last line: a crashed worker's), and the
    slowest tests, also for a run stopped at its time limit."""
    path = os.path.join(out, "tests.jsonl")
    if not os.path.exists(path):
        return None
    recs: dict[tuple[str, str], dict] = {}  # by (nodeid, phase): a teardown's error must not hide its call
    with open(path, errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            recs[(r["nodeid"], r["when"])] = r
    nodeids = {n for n, _ in recs}
    # as pytest counts: a call passed, failed or skipped; a setup or teardown failure an error besides (a crashed
    # xdist worker's report has another phase name: a failure)
    calls = [r for (n, w), r in recs.items() if w not in ("setup", "teardown")]
    c = {"tests": len(nodeids),
         "passed": sum(r["outcome"] == "passed" for r in calls),
         "failures": sum(r["outcome"] == "failed" for r in calls),
         "errors": sum(r["outcome"] == "failed" for (n, w), r in recs.items() if w in ("setup", "teardown")),
         "skipped": sum(r["outcome"] == "skipped" for r in recs.values())}
    reasons = {}
    for (nid, when), r in recs.items():
        if r["outcome"] == "failed":
            lines = [x for x in r.get("text", "").splitlines() if x.strip()]
            e = [x for x in lines if x.startswith("E ")]
            key = nid if when not in ("setup", "teardown") else f"{nid} [{when}]"
            reasons[key] = ((e[0] if e else lines[-1] if lines else "?")[:300]).strip()
    c["failed_tests"] = list(reasons)[:20]
    c["reasons"] = dict(list(reasons.items())[:40])
    c["slowest"] = [[r["nodeid"], r["seconds"]] for r in sorted(calls, key=lambda r: -r["seconds"])[:10]]
    # where the workers' time went, by test function (its parametrizations summed): [function, cases, seconds]
    by_fn: dict[str, list] = {}
    for r in calls:
        f = by_fn.setdefault(r["nodeid"].split("[")[0], [0, 0.0])
        f[0] += 1
        f[1] += r["seconds"]
    c["call_seconds"] = round(sum(r["seconds"] for r in calls), 1)
    c["by_function"] = [[k, n, round(sec, 1)] for k, (n, sec) in sorted(by_fn.items(), key=lambda kv: -kv[1][1])[:40]]
    c["source"] = "tests.jsonl (written as the tests ran)"
    return c


def read_junit(out: str) -> dict | None:
    path = os.path.join(out, "junit.xml")
    live = read_test_report(out)
    if not os.path.exists(path):
        return live or read_test_log(out)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable junit.xml: {e}"}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    c["failed_tests"] = [
        f"{tc.get('classname')}::{tc.get('name')}"
        for s in suites
        for tc in s.iter("testcase")
        if tc.find("failure") is not None or tc.find("error") is not None
    ][:20]
    if live:  # the reasons and durations only the live report has
        for k in ("reasons", "slowest", "call_seconds", "by_function"):
            c[k] = live[k]
    return c


def read_sanitizer(out: str) -> dict | None:
    """The sanitize step's log (memcheck: its errors and the subset's verdict), and the sanitize_more step's, whose
    "== tool NAME" sections (racecheck, initcheck) each give an error count (racecheck's from its RACECHECK SUMMARY
    line: it prints no ERROR SUMMARY), its warnings, or how the tool ended early."""
    path = os.path.join(out, "logs", "sanitize.log")
    if not os.path.exists(path):
        return None
    mem = open(path, errors="replace").read()
    m = re.findall(r"ERROR SUMMARY: (\d+) error", mem)
    others = {}
    more = os.path.join(out, "logs", "sanitize_more.log")
    text = open(more, errors="replace").read() if os.path.exists(more) else ""
    parts = re.split(r"^== tool (\w+)\n", text, flags=re.M)
    for tool, body in zip(parts[1::2], parts[2::2], strict=True):
        race = re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", body)
        n = re.findall(r"ERROR SUMMARY: (\d+) error", body)
        ended = re.search(rf"^== {tool} exit (\d+)", body, re.M)
        code = ended.group(1) if ended else None
        others[tool] = {
            "errors": int(race[-1][0]) if race else int(n[-1]) if n else None,
            "warnings": int(race[-1][1]) if race else None,
            "ended": None if code is None else "timed out" if code in ("124", "137") else f"exit {code}",
            "first_errors": re.findall(r"^========= (?:Error|Warning|Race|Uninitialized|Invalid).*$", body, re.M)[:5],
        }
    return {
        "errors": int(m[-1]) if m else None,
        "subset_ok": "sanitize_subset: OK" in mem,
        "mismatches": re.findall(r"^MISMATCH .*$", mem, re.M)[:20],
        "first_errors": re.findall(r"^========= (?:Invalid|Program hit|Error).*$", mem, re.M)[:10],
        "other_tools": others,
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def report_name(rep: dict) -> str:
    """<date>-<gpu>, or <date>-<HHMM>-<gpu> when bench/results already holds another run of that GPU that day."""
    name = f"{rep['date'][:10]}-{slug(rep['gpu'])}"
    try:
        other = json.load(open(os.path.join(RESULTS_DIR, name + ".json"))).get("date")
    except (OSError, ValueError):
        return name
    if other == rep["date"]:
        return name
    return f"{rep['date'][:10]}-{rep['date'][11:13]}{rep['date'][14:16]}-{slug(rep['gpu'])}"


def previous(exclude: str, gpu_slug: str, schema: int | None = None, before: str | None = None
             ) -> tuple[str | None, dict]:
    """The newest bench/results/*.json other than `exclude` from the same GPU whose bench rows were timed the same
    way (bench schema `schema`), and dated before `before` when given (a report made again later compares with the
    run before it, not with a later one): (its name, {(op, case, backend, numel): row}); (None, {}) when there is
    none (a CPU run is never compared with a GPU's figures, nor device-only timing with the first run's)."""
    docs = []
    for f in glob.glob(os.path.join(RESULTS_DIR, "*.json")):
        if f == exclude or not f.endswith(f"-{gpu_slug}.json"):
            continue
        try:
            doc = json.load(open(f))
        except (OSError, ValueError):
            continue
        date = str(doc.get("date") or "")
        if before is not None and date >= before:
            continue
        docs.append((date, f, doc))  # newest by the run's date (two runs can share a day)
    for _, f, doc in sorted(docs, key=lambda d: d[:2], reverse=True):
        bench = doc.get("bench") or doc
        if schema is not None and bench.get("schema") != schema:
            continue
        rows = bench.get("results") or []
        return os.path.basename(f), {(r["op"], r["case"], r["backend"], r["numel"]): r for r in rows}
    return None, {}


def targets(rows: list[dict], geomeans: list[dict] | None = None, partial: bool = False,
            device: str = "cuda", noisy: bool = False, schema: int | None = 2) -> list[dict]:
    """The issues' targets for `device`, judged on this run's rows (bench/targets.py). `partial`: the bench stopped
    before its end, so a group may lack cases it never reached: its geomean is shown but not judged (met: None);
    `noisy` (the machine was not steady) or `schema` < 2 (the first bench's timing rules): nothing is judged."""
    return judge(rows, geomeans, device, partial, noisy, schema)


def fmt(v, spec, suffix=""):
    return "-" if v is None else format(v, spec) + suffix


def read_train(out: str) -> dict | None:
    """examples/train_gpt.py's log.json (gpu_check's train step): per mode final loss, tokens/s, peak memory."""
    path = os.path.join(out, "train_gpt", "log.json")
    if not os.path.exists(path):
        return None
    try:
        log = json.load(open(path))
    except ValueError as e:
        return {"error": f"unreadable {path}: {e}"}
    modes = {m: {k: v.get(k) for k in ("final_val_loss", "tokens_per_s", "peak_memory_mb", "state_mb",
                                       "skipped_steps", "steps_run")} for m, v in log.get("modes", {}).items()}
    return {"config": log.get("config"), "modes": modes}


def train_md(t: dict | None) -> list[str]:
    """Lines for the end-to-end run: each mode vs torch AMP (mode 2), the issue's goal being mixprec_bf16 >= 1.1x
    torch AMP tokens/s at equal final loss."""
    if not t:
        return ["train_gpt: not run"]
    if "error" in t:
        return [f"train_gpt: {t['error']}"]
    c = t.get("config") or {}
    amp = t["modes"].get("amp_bf16") or {}
    L = ["", f"train_gpt ({c.get('layers')} layers, width {c.get('width')}, context {c.get('context')}, batch "
         f"{c.get('batch')}, {c.get('steps')} steps):", "",
         "| mode | val loss | tokens/s | vs amp_bf16 | peak MB | vs amp_bf16 |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for m, r in t["modes"].items():
        tps, mem = r.get("tokens_per_s"), r.get("peak_memory_mb")
        rt = tps / amp["tokens_per_s"] if tps and amp.get("tokens_per_s") else None
        rm = mem / amp["peak_memory_mb"] if mem and amp.get("peak_memory_mb") else None
        L.append(f"| {m} | {fmt(r.get('final_val_loss'), '.4f')} | {fmt(tps, '.0f')} | {fmt(rt, '.2f', 'x')} | "
                 f"{fmt(mem, '.0f')} | {fmt(rm, '.2f', 'x')} |")
    return L + [""]


def read_host_profile(out: str) -> list[dict] | None:
    """bench/host_profile.py's timings (gpu_check's hostprof step): [{case, impl, host_us, synced_us}]."""
    path = os.path.join(out, "hostprof", "host_profile.json")
    if not os.path.exists(path):
        return None
    try:
        doc = json.load(open(path))
    except ValueError:
        return None
    return [{k: c.get(k) for k in ("case", "impl", "host_us", "synced_us")} for c in doc.get("cases", [])]


def host_profile_md(rows: list[dict] | None) -> list[str]:
    if not rows:
        return []
    L = ["", "host time of small steps (hostprof/host_profile.md has the profiler tables):", "",
         "| case | impl | host us | synced us |", "| --- | --- | ---: | ---: |"]
    L += [f"| {r['case']} | {r['impl']} | {fmt(r['host_us'], '.1f')} | {fmt(r['synced_us'], '.1f')} |" for r in rows]
    return L + [""]


def summary_md(rep: dict, prev_name: str | None, prev_rows: dict) -> str:
    L = [
        f"# mixprec_ops GPU check: {rep['gpu']} ({rep['date']})",
        "",
        "| step | status | seconds |",
        "| --- | --- | ---: |",
    ]
    L += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} |" for s in rep["steps"]]
    t = rep.get("tests")
    L.append("")
    if t and "error" not in t:
        L.append(
            f"tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
            + (f"; failing: {', '.join(t['failed_tests'][:5])}" if t["failed_tests"] else "")
            + (f" [from {t['source']}]" if t.get("source") else "")
        )
        L += [f"- `{k}`: {v}" for k, v in t.get("reasons", {}).items()]
        if t.get("slowest"):
            L.append("slowest: " + ", ".join(f"{n.split('::')[-1]} {sec:.0f} s" for n, sec in t["slowest"][:5]))
        if t.get("by_function"):
            L.append(f"test time {t['call_seconds']:.0f} s (call phases, all workers); most by function: " + ", ".join(
                f"{f.split('::')[-1]} {sec:.0f} s ({n})" for f, n, sec in t["by_function"][:6]))
    else:
        L.append(f"tests: {t['error'] if t else 'no junit.xml'}")
    s = rep.get("sanitizer")
    L.append(
        "sanitizer (memcheck): "
        + (
            "not run"
            if not s
            else f"{s['errors'] if s['errors'] is not None else '?'} errors, subset results "
            f"{'match the reference' if s['subset_ok'] else 'NOT OK: ' + '; '.join(s['mismatches'][:3])}"
        )
    )
    for tool, o in ((s or {}).get("other_tools") or {}).items():
        L.append(f"sanitizer ({tool}): {o['errors'] if o['errors'] is not None else '?'} errors"
                 + (f", {o['warnings']} warnings" if o.get("warnings") else "")
                 + (f" ({o['ended']})" if o["ended"] else "")
                 + (f"; first: {o['first_errors'][0][:200]}" if o["first_errors"] else ""))
    L += train_md(rep.get("train_gpt"))
    L += host_profile_md(rep.get("host_profile"))
    b = rep.get("bench")
    if not b:
        L.append("bench: no results")
        return "\n".join(L) + "\n"
    c = b["ceilings"]
    L.append(
        f"ceilings: copy {c['copy_gbps']:.0f} GB/s (end of run {c.get('copy_gbps_end', 0):.0f}), torch bf16 "
        f"matmul {fmt(c.get('matmul_bf16_tflops'), '.0f')} TFLOP/s; bench took {b.get('cases_seconds')} s, "
        f"{b.get('failures')} correctness failures"
    )
    if b.get("op_seconds"):
        L.append("bench time per op: " + ", ".join(f"{op} {t:.0f} s" for op, t in b["op_seconds"].items()))
    for n in b.get("notes", []):
        L.append(f"note: {n}")
    for sk in b.get("skipped", []):
        L.append(f"skipped: {sk}")
    mem_rows = [r for r in b["results"] if not r.get("flops")]  # compute-bound rows: their own table below
    if mem_rows:
        L += [
            "",
            "median: device time (events, host queued ahead); host: time to queue one call; loop vs torch: a loop of "
            "calls, each costing the longer of the two.",
            "",
            "| op | case | backend | size | median | GB/s | %copy | vs torch | host | loop vs torch | check | prev GB/s"
            f"{' (' + prev_name + ')' if prev_name else ''} |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
    for r in mem_rows:
        p = prev_rows.get((r["op"], r["case"], r["backend"], r["numel"]))
        med = fmt_median(r)
        L.append(
            f"| {r['op']} | {r['case']} | {r['backend']} | {r['numel'] / 1e6:.3g}M | {med} | "
            f"{fmt(r.get('gbps'), '.0f')} | {fmt(r.get('pct_copy'), '.0f')} | {fmt(r.get('vs_torch'), '.2f', 'x')} | "
            f"{fmt_time(r.get('host_us'))} | {fmt(r.get('vs_torch_loop'), '.2f', 'x')} | "
            f"{r['check'][:30]} | {fmt((p or {}).get('gbps'), '.0f')} |"
        )
    L += flops_md(b["results"], c.get("matmul_bf16_tflops"), prev_name, prev_rows)
    if any(r.get("host_over_spin") for r in b["results"]):
        L += ["", HOST_OVER_SPIN_NOTE]
    untimed = [g for g in b.get("geomeans") or [] if g.get("backend") is None]
    if untimed:
        L.append("")
        L += [f"geomean {g['group']}: no kernel backend timed ({g['n_cases']} cases)" for g in untimed]
    if rep["targets"]:
        L += ["", "| target | value | met |", "| --- | ---: | --- |"]
        L += [f"| {x['what']} | {x['value']} | {'not judged' if x['met'] is None else 'yes' if x['met'] else 'NO'} |"
              for x in rep["targets"]]
    return "\n".join(L) + "\n"


def flops_md(rows: list[dict], peak: float | None, prev_name: str | None, prev_rows: dict) -> list[str]:
    """The compute-bound rows (matmul, Linear): TFLOP/s, % of torch's bf16 matmul rate measured in the same run,
    "vs torch", the first call's seconds (the correctness check: compilation + autotuning) and the Triton variant."""
    sel = [r for r in rows if r.get("flops")]
    if not sel:
        return []
    L = [
        "",
        f"Compute-bound cases: %peak is of torch's bf16 matmul rate in this run ({fmt(peak, '.0f')} TFLOP/s); "
        "1st call = the correctness check, including Triton compilation and autotuning.",
        "",
        "| op | case | backend | median | TFLOP/s | %peak | %copy | vs torch | host | loop vs torch | 1st call | check "
        f"| variant | prev TFLOP/s{' (' + prev_name + ')' if prev_name else ''} |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in sel:
        p = prev_rows.get((r["op"], r["case"], r["backend"], r["numel"]))
        med = fmt_median(r)
        L.append(
            f"| {r['op']} | {r['case']} | {r['backend']} | {med} | {fmt(r.get('tflops'), '.1f')} | "
            f"{fmt(r.get('pct_peak'), '.0f')} | {fmt(r.get('pct_copy'), '.0f')} | "
            f"{fmt(r.get('vs_torch'), '.2f', 'x')} | {fmt_time(r.get('host_us'))} | "
            f"{fmt(r.get('vs_torch_loop'), '.2f', 'x')} | {fmt(r.get('check_s'), '.1f', ' s')} | {r['check'][:30]} | "
            f"{(r.get('variant') or '')[:90]} | {fmt((p or {}).get('tflops'), '.1f')} |"
        )
    return L


def build(out: str) -> dict:
    bench = None
    # gpu_check's layout (OUTDIR/bench/results.json), or a `python -m bench --out DIR` directory itself
    bdir = os.path.join(out, "bench") if os.path.isdir(os.path.join(out, "bench")) else out
    bpath = os.path.join(bdir, "results.json")
    partial = os.path.join(bdir, "results.partial.json")  # left by a bench run stopped before its end
    if not os.path.exists(bpath) and os.path.exists(partial):
        bpath = partial
    if not os.path.exists(bpath):
        print(f"gpu_report: no bench results in {out} (looked for bench/results.json and results.json)")
    if os.path.exists(bpath):
        try:
            bench = json.load(open(bpath))
        except ValueError as e:
            print(f"gpu_report: unreadable {bpath}: {e}")
    if bench and bench.get("noisy"):
        bench["notes"] = ["machine NOT STEADY during the bench (its copy ceiling or thread wake-up latency moved): "
                          "'vs torch' ratios are inflated; rerun when idle"] + list(bench.get("notes", []))
    if bench and bench.get("partial"):
        bench["notes"] = [f"PARTIAL bench results: the run stopped before its end (time limit?); "
                          f"{len(bench.get('results', []))} rows of the cases that finished, %copy against the "
                          "start's copy ceiling"] + list(bench.get("notes", []))
    gpu = (bench or {}).get("machine", {}).get("gpu")
    if not gpu and os.path.exists(os.path.join(out, "gpu.txt")):
        gpu = open(os.path.join(out, "gpu.txt")).read().split(",")[0].strip() or None
    date = (bench or {}).get("date") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return {
        "schema": 1,
        "gpu": gpu or "unknown GPU",
        "date": date,
        "steps": read_steps(out),
        "tests": read_junit(out),
        "sanitizer": read_sanitizer(out),
        "bench": bench,
        "train_gpt": read_train(out),
        "host_profile": read_host_profile(out),
        # judged again from the rows (a results file of an older bench has no "targets"), for the run's device: a
        # CPU run against the CPU targets, never against an H200's
        "targets": targets(bench.get("results", []), bench.get("geomeans"), bool(bench.get("partial")),
                           bench.get("device") or "cuda", bool(bench.get("noisy")), bench.get("schema")) if bench
        else [],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", help="gpu_check's output directory, or a report .json (then: print its summary)")
    ap.add_argument("--commit-results", action="store_true")
    a = ap.parse_args(argv)
    if os.path.isfile(a.outdir):  # a filed report (bench/results/<date>-<gpu>.json): show it, write nothing
        if a.commit_results:
            ap.error("--commit-results files a gpu_check output directory, not a report .json")
        rep = json.load(open(a.outdir))
        prev_name, prev_rows = previous(os.path.abspath(a.outdir), slug(rep["gpu"]),
                                        (rep.get("bench") or {}).get("schema"), rep.get("date"))
        print(summary_md(rep, prev_name, prev_rows))
        return 0
    out = os.path.abspath(a.outdir)
    made = os.path.join(out, "report.json")
    if a.commit_results and os.path.exists(made):  # a returned OUTDIR (maybe read-only): file its report as is
        rep = json.load(open(made))
    else:
        rep = build(out)
    name = report_name(rep)
    dest = os.path.join(RESULTS_DIR, name + ".json")
    prev_name, prev_rows = previous(dest, slug(rep["gpu"]), (rep.get("bench") or {}).get("schema"), rep.get("date"))
    md = summary_md(rep, prev_name, prev_rows)
    if not (a.commit_results and os.path.exists(made)):
        try:
            with open(made, "w") as f:
                json.dump(rep, f, indent=1)
            with open(os.path.join(out, "summary.md"), "w") as f:
                f.write(md)
        except OSError as e:
            print(f"gpu_report: could not write into {out}: {e}")
    if a.commit_results:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(dest, "w") as f:
            json.dump(rep, f, indent=1)
        with open(os.path.join(RESULTS_DIR, name + ".md"), "w") as f:
            f.write(md)
        print(f"gpu_report: wrote bench/results/{name}.json and .md")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
