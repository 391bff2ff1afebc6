"""Output of a bench run: the table printed at the end, results.json, results.csv and two PNG plots."""

from __future__ import annotations

import csv
import json
import math
import os

CSV_FIELDS = [
    "op",
    "case",
    "backend",
    "numel",
    "bytes",
    "tensor_bytes",
    "baseline_bytes",
    "median_us",
    "p20_us",
    "p80_us",
    "reps",
    "sets",
    "gbps",
    "pct_copy",
    "vs_torch",
    "host_us",
    "vs_torch_loop",
    "check",
    "desc",
    "check_s",
    "flops",
    "tflops",
    "pct_peak",
    "variant",
    "family",
    "m",
    "n",
    "k",
    "geomean",
]


def is_baseline(backend: str) -> bool:
    """A torch baseline row ("torch", "torch-foreach", ...), not one of our backends."""
    return backend == "torch" or backend.startswith("torch-")


def fmt_time(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} us"


def fmt_median(r: dict) -> str:
    """A row's median, marked "*" when the host took longer to queue the call than the spin ahead of it lasted (the
    device waited, so the median includes host time: bench/timing.py, MAX_SPIN_S)."""
    return fmt_time(r.get("median_us")) + ("*" if r.get("host_over_spin") else "")


HOST_OVER_SPIN_NOTE = ("* the host took longer to queue the call than the spin ahead of it: the device waited, and "
                       "the median includes host time (the loop ratio is right)")


def trunc3(v: float) -> float:
    """v truncated (toward -inf) to 3 decimals, for ratios judged against a target: a value under it never prints
    as reaching it (0.9995 as "1.000"); inf and NaN as they are."""
    return math.floor(v * 1000) / 1000 if math.isfinite(v) else v


def fmt_size(numel: int, nbytes: int) -> str:
    """"1M el 28 MB"; small cases in elements and kB ("40 el 0.6 kB", not "4e-05M el 0 MB")."""
    el = f"{numel / 1e6:.3g}M" if numel >= 100_000 else f"{numel:,}"
    size = f"{nbytes / 1e6:.0f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} kB"
    return f"{el} el {size}"


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    """The memory-bound rows (compute-bound rows, those with a flop count, go to flops_table)."""
    rows = [r for r in rows if not r.get("flops")]
    head = ["op", "case", "backend", "size", "median", "GB/s", "%copy", "vs torch", "check"]
    body = [
        [
            r["op"],
            r["case"],
            r["backend"],
            fmt_size(r["numel"], r["bytes"]),
            fmt_median(r),
            _f(r["gbps"], ".1f"),
            _f(r["pct_copy"], ".0f"),
            _ratio(r["vs_torch"]),
            r["check"] if len(r["check"]) < 40 else r["check"][:37] + "...",
        ]
        for r in rows
    ]
    return _grid(*_with_host(head, body, rows, 8, {4, 5, 6, 7}))


def _ratio(v) -> str:
    return _f(v, ".2f") + ("x" if v else "")


def _with_host(head, body, rows, at, right):
    """GPU rows: the host's time to queue a call and the ratio for a loop of calls (max of device and host time),
    inserted before column `at` (right-aligned columns `right` renumbered); nothing on CPU (host_us is None)."""
    if not any(r.get("host_us") is not None for r in rows):
        return head, body, right
    head = head[:at] + ["host", "loop vs torch"] + head[at:]
    body = [b[:at] + [fmt_time(r.get("host_us")), _ratio(r.get("vs_torch_loop"))] + b[at:]
            for b, r in zip(body, rows, strict=True)]
    return head, body, {i + 2 if i >= at else i for i in right} | {at, at + 1}


def _grid(head: list[str], body: list[list], right: set[int]) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(
        str(c).rjust(w[i]) if i in right else str(c).ljust(w[i]) for i, c in enumerate(cells)
    )
    return "\n".join([line(head), "  ".join("-" * x for x in w)] + [line(b) for b in body])


def flops_table(rows: list[dict], peak_tflops: float | None) -> str:
    """The compute-bound rows (those with a flop count): TFLOP/s, % of torch's measured bf16 matmul rate, the ratio
    vs torch, the first call's wall time (the correctness check: includes compilation and autotuning) and, for
    Triton, the kernel variant the autotuner picked."""
    sel = [r for r in rows if r.get("flops")]
    head = ["op", "case", "backend", "median", "TFLOP/s", "%peak", "%copy", "vs torch", "1st call", "check", "variant"]
    body = [
        [
            r["op"],
            r["case"],
            r["backend"],
            fmt_median(r),
            _f(r.get("tflops"), ".1f"),
            _f(r.get("pct_peak"), ".0f"),
            _f(r.get("pct_copy"), ".0f"),
            _ratio(r["vs_torch"]),
            _f(r.get("check_s"), ".1f") + " s",
            r["check"] if len(r["check"]) < 30 else r["check"][:27] + "...",
            r.get("variant") or "",
        ]
        for r in sel
    ]
    peak = f"{peak_tflops:.0f} TFLOP/s" if peak_tflops else "not measured on this device"
    return (
        f"compute-bound cases (%peak: of torch's bf16 matmul rate measured in this run, {peak}; %copy: the bytes "
        "floor, which bounds small-M GEMMs):\n" + _grid(*_with_host(head, body, sel, 8, {3, 4, 5, 6, 7, 8}))
    )


def geomeans(rows: list[dict]) -> list[dict]:
    """Geometric means of "vs torch" per (group, backend), for rows tagged with a `geomean` group and its `target`
    (set by the cases, e.g. "matmul M=8192" >= 1.0). A backend meets the target only if it has a ratio for every
    case of the group (a failed check or a crash leaves no ratio) and their geometric mean reaches the target."""
    groups: dict[str, dict] = {}
    for r in rows:
        g = r.get("geomean")
        if not g:
            continue
        d = groups.setdefault(g, {"target": r.get("target"), "cases": [], "ratios": {}})
        key = (r["case"], r["numel"])
        if key not in d["cases"]:
            d["cases"].append(key)
        if not is_baseline(r["backend"]):
            d["ratios"].setdefault(r["backend"], {})
            if r.get("vs_torch"):
                d["ratios"][r["backend"]][key] = r["vs_torch"]
    out = []
    for g, d in groups.items():
        for b, rs in d["ratios"].items():
            gm = math.exp(sum(math.log(v) for v in rs.values()) / len(rs)) if rs else None
            complete = len(rs) == len(d["cases"])
            out.append(
                {
                    "group": g,
                    "backend": b,
                    "target": d["target"],
                    "n": len(rs),
                    "n_cases": len(d["cases"]),
                    "geomean": gm,
                    "met": bool(complete and gm is not None and d["target"] is not None and gm >= d["target"]),
                }
            )
        if not d["ratios"]:
            out.append({"group": g, "backend": None, "target": d["target"], "n": 0, "n_cases": len(d["cases"]),
                        "geomean": None, "met": False})
    return out


def geomean_lines(gms: list[dict], device: str, noisy: bool = False) -> list[str]:
    """One line per geomean; on an unsteady machine (inflated ratios) none is judged, as in bench/targets.py."""
    lines = []
    for x in gms:
        tgt = f">= {x['target']:.2f}x" if x["target"] is not None else "no target"
        if x["backend"] is None:
            lines.append(f"geomean {x['group']}: no kernel backend timed on {device} ({x['n_cases']} cases; target "
                         f"{tgt})")
            continue
        # truncated to 3 decimals: a geomean under its target never reads as reaching it (0.996 as "1.00x")
        gm = "-" if x["geomean"] is None else f"{trunc3(x['geomean']):.3f}x"
        miss = "" if x["n"] == x["n_cases"] else f" (only {x['n']} of {x['n_cases']} cases have a ratio)"
        lines.append(f"geomean {x['group']} {x['backend']}: {gm} vs torch over {x['n']} cases, target {tgt}: "
                     f"{'not judged (machine not steady)' if noisy else 'met' if x['met'] else 'NOT met'}{miss}")
    return lines


def write_json(path: str, doc: dict) -> None:
    """Written to a temporary name and renamed: a reader (or a run killed mid-write) never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def write_csv(path: str, rows: list[dict], run: dict | None = None) -> None:
    """One line per row; `run` (date, device, machine...) is repeated in columns of its own on every line, so that
    a CSV copied away or concatenated with another run's still says where and when it was measured."""
    run = run or {}
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=[*CSV_FIELDS, *run], extrasaction="ignore")
        wr.writeheader()
        wr.writerows({**r, **run} for r in rows)


PLOTS = ("roofline.png", "speedup.png")


def _pct_ceiling(r: dict):
    """A row's share of its ceiling: torch's measured bf16 matmul rate for flop-counted (compute-bound) cases,
    which have none on a CPU, else the measured copy bandwidth."""
    return r.get("pct_peak") if r.get("flops") else r.get("pct_copy")


def plots(out_dir: str, rows: list[dict], title: str) -> list[str]:
    """roofline.png: % of the measured ceiling per case and backend (copy bandwidth; for matmul, torch's bf16
    matmul rate); speedup.png: torch time / our time (ours only: not torch's other baselines)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return [f"plots skipped: matplotlib unavailable ({e})"]
    labels = list(dict.fromkeys(f"{r['op']} {r['case']} {r['numel'] / 1e6:.3g}M" for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    written = []
    for fname, key, ref, xlabel, only_ours in (
        ("roofline.png", _pct_ceiling, 100.0, "% of the measured ceiling (copy bandwidth, bytes read + written; "
         "matmul: torch's bf16 rate)", False),
        ("speedup.png", lambda r: r.get("vs_torch"), 1.0, "speedup vs torch baseline (torch time / our time)", True),
    ):
        bks = [b for b in backends if not (only_ours and is_baseline(b))]
        if not bks:  # e.g. a CPU run of ops with no CPU kernel: torch rows only, no speedup to plot
            continue
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) * max(1, len(bks)) + 1.5))
        h = 0.8 / max(1, len(bks))
        for j, b in enumerate(bks):
            vals = []
            for lab in labels:
                r = next(
                    (r for r in rows if r["backend"] == b and f"{r['op']} {r['case']} {r['numel'] / 1e6:.3g}M" == lab),
                    None,
                )
                vals.append((key(r) if r else None) or 0.0)
            ax.barh([i + j * h for i in range(len(labels))], vals, height=h, label=b)
        ax.axvline(ref, color="k", lw=0.8, ls="--")
        top = max([key(r) or 0.0 for r in rows] + [ref])
        if fname == "speedup.png" and top > 10:
            ax.set_xscale("log")
        ax.set_yticks([i + 0.4 - h / 2 for i in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, fname)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
