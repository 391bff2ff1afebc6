"""The issues' speed targets, judged on a bench run's rows for the device the run measured.

CPU (issues 2 and 3): cast_and_scale >= 5x torch's eager sequence; the AdamW step >= 1.5x torch's fused AdamW on
fp32 params + the copy into the bf16 model params.
GPU (issues 2-4, an H200's): cast_and_scale and unscale_ >= 90% of the copy bandwidth for tensors >= 256 MB;
unscale_ >= 1.0x torch; the AdamW step >= 90% of its 28 B/param floor and >= 1.2x torch fused + copy; the matmul
groups' geometric means (computed by bench/report.py from the groups in bench/cases_matmul.py, copied here).
Issue 3 sets no size for AdamW's 90%; it is judged here, as issue 2's, on cases of >= 256 MB (1e8 and 1e9 params),
where a launch's fixed cost no longer decides: our reading of the issue, said here and in bench/NOTES.md.
The targets are the forward ops': cast_and_scale's backward cases (tagged "pass": "backward") have none.

A ratio target also shows the ratio the two sides would have at equal bandwidth ("equal-bw"): the torch baseline's
bytes over ours, when the case counts them (Case.baseline_bytes). A target above it needs torch to run further from
its bandwidth floor than we run from ours: on a machine where torch streams near the copy rate, no kernel can
reach it. A row without a time (its check failed, it crashed, its op's time budget ran out) counts as not met.
"met" is None (not judged) for every target of a run on an unsteady machine (inflated ratios), of a bench schema
before 2 (the first H200 run: host time inside the device times, unscale_ timed on its read-only path), and for a
matmul group of a partial run.
"""

from __future__ import annotations

try:
    from .report import is_baseline, trunc3  # imported as bench.targets
except ImportError:  # bench/gpu_report.py run as a script: bench/ is sys.path[0]
    from report import is_baseline, trunc3

MIN_BYTES = 256e6  # "tensors >= 256 MB": below it a GPU launch's fixed cost keeps any kernel from the copy rate
# (device, op, metric, threshold, only cases of at least MIN_BYTES, issue)
RULES = [
    ("cpu", "cast_and_scale", "vs_torch", 5.0, False, 2),
    ("cpu", "adam_step_", "vs_torch", 1.5, False, 3),
    ("cuda", "cast_and_scale", "pct_copy", 90.0, True, 2),
    ("cuda", "unscale_", "pct_copy", 90.0, True, 2),
    ("cuda", "unscale_", "vs_torch", 1.0, False, 2),
    ("cuda", "adam_step_", "pct_copy", 90.0, True, 3),
    ("cuda", "adam_step_", "vs_torch", 1.2, False, 3),
]


def _value(r: dict, metric: str) -> float | None:
    if metric == "pct_copy":
        return r.get("pct_copy")
    v = r.get("vs_torch")
    # on a GPU, the ratio for a loop of calls (host time counted) must hold too: the worse of the two
    return None if v is None else min(v, r.get("vs_torch_loop") or v)


def judge(rows: list[dict], geomeans: list[dict] | None, device: str, partial: bool = False, noisy: bool = False,
          schema: int | None = 2) -> list[dict]:
    """One entry per (target, row): what, value (text), met (True, False, or None: not judged), issue. `partial`: the
    bench stopped before its end, so a matmul group may lack cases it never reached: its geomean is shown, not
    judged. `noisy`: the machine was not steady, which inflates the ratios (torch's many thread wake-ups and
    launches suffer more than one fused kernel); `schema` < 2: timed by the first bench's rules. Then every target
    is shown and none judged."""
    out = _judge(rows, geomeans, device, partial)
    why = ("machine not steady" if noisy else
           "bench schema 1: timed otherwise" if schema is not None and schema < 2 else None)
    if why:
        for x in out:
            x["value"] += f" ({why}: not judged)"
            x["met"] = None
    return out


def _judge(rows: list[dict], geomeans: list[dict] | None, device: str, partial: bool) -> list[dict]:
    out = []
    if device == "cuda":
        for g in geomeans or []:
            if g.get("backend") is None or g.get("target") is None:
                continue
            miss = "" if g["n"] == g["n_cases"] else f" ({g['n']} of {g['n_cases']} cases)"
            gm = "-" if g.get("geomean") is None else f"{trunc3(g['geomean']):.3f}x"
            out.append({"what": f"geomean {g['group']} {g['backend']} >= {g['target']:.2f}x torch",
                        "value": gm + miss + (" (partial run: not judged)" if partial else ""),
                        "met": None if partial else bool(g.get("met")), "issue": 4})
    for dev, op, metric, thr, big_only, issue in RULES:
        if dev != device:
            continue
        for r in rows:
            if (r["op"] != op or is_baseline(r["backend"]) or ":" in r["backend"] or r.get("pass") == "backward"
                    or (big_only and (r.get("tensor_bytes") or 0) < MIN_BYTES)):
                continue
            unit = "% of copy" if metric == "pct_copy" else "x torch"
            size = f"{r['numel'] / 1e6:.4g}M" if r.get("numel") else ""
            size = "" if size in r["case"].split() else " " + size  # said once, where the case name lacks it
            what = f"{op} {r['case']}{size} {r['backend']} >= {thr:g}{unit}"
            if r.get("gbps") is None:  # failed its check, crashed, or never ran: the target is not met
                out.append({"what": what, "value": f"no time ({str(r.get('check'))[:60]})", "met": False,
                            "issue": issue})
                continue
            v = _value(r, metric)
            if v is None:  # timed, but the run has no copy ceiling or no baseline time to compare with
                out.append({"what": what, "value": "-", "met": False, "issue": issue})
                continue
            # truncated to 3 decimals: a ratio under the target never reads as reaching it (0.9995 as "1.000x")
            text = f"{v:.1f}%" if metric == "pct_copy" else f"{trunc3(v):.3f}x"
            eq = r.get("baseline_bytes") and r.get("bytes") and r["baseline_bytes"] / r["bytes"]
            if metric == "vs_torch" and eq:
                text += f" (equal-bw {eq:.2f}x)"
            out.append({"what": what, "value": text, "met": v >= thr, "issue": issue})
    return out


def lines(judged: list[dict], device: str) -> list[str]:
    """The targets as printed at the end of a bench run."""
    if not judged:
        return [f"targets: none of the issues' targets applies to the cases run on {device}"]
    met = sum(x["met"] is True for x in judged)
    unjudged = sum(x["met"] is None for x in judged)
    w, wv = max(len(x["what"]) for x in judged), max(len(x["value"]) for x in judged)
    out = [f"targets on {device} (issues 2-4; equal-bw: the ratio if both sides ran at the same bandwidth): "
           f"{met} of {len(judged)} met" + (f", {unjudged} not judged" if unjudged else "")]
    out += [f"  {x['what']:<{w}}  {x['value']:<{wv}}  {verdict(x['met'])}" for x in judged]
    return out


def verdict(met: bool | None) -> str:
    return "not judged" if met is None else "met" if met else "NOT met"
