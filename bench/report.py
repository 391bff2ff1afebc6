"""Output of a bench run: the table printed at the end, results.json, results.csv and two PNG plots."""

from __future__ import annotations

import csv
import json
import os

CSV_FIELDS = [
    "op",
    "case",
    "backend",
    "numel",
    "bytes",
    "tensor_bytes",
    "median_us",
    "p20_us",
    "p80_us",
    "reps",
    "sets",
    "gbps",
    "pct_copy",
    "vs_torch",
    "check",
    "desc",
]


def fmt_time(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} us"


def fmt_size(numel: int, nbytes: int) -> str:
    return f"{numel / 1e6:.3g}M el {nbytes / 1e6:.0f} MB"


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ["op", "case", "backend", "size", "median", "GB/s", "%copy", "vs torch", "check"]
    body = [
        [
            r["op"],
            r["case"],
            r["backend"],
            fmt_size(r["numel"], r["bytes"]),
            fmt_time(r["median_us"]),
            _f(r["gbps"], ".1f"),
            _f(r["pct_copy"], ".0f"),
            _f(r["vs_torch"], ".2f") + ("x" if r["vs_torch"] else ""),
            r["check"] if len(r["check"]) < 40 else r["check"][:37] + "...",
        ]
        for r in rows
    ]
    w = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    right = {4, 5, 6, 7}
    line = lambda cells: "  ".join(
        str(c).rjust(w[i]) if i in right else str(c).ljust(w[i]) for i, c in enumerate(cells)
    )
    return "\n".join([line(head), "  ".join("-" * x for x in w)] + [line(b) for b in body])


def write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)


def plots(out_dir: str, rows: list[dict], title: str) -> list[str]:
    """roofline.png: % of the measured copy bandwidth per case and backend; speedup.png: torch time / our time."""
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
        ("roofline.png", "pct_copy", 100.0, "% of measured copy bandwidth (bytes read + written)", False),
        ("speedup.png", "vs_torch", 1.0, "speedup vs torch baseline (torch time / our time)", True),
    ):
        bks = [b for b in backends if not (only_ours and b == "torch")]
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) * max(1, len(bks)) + 1.5))
        h = 0.8 / max(1, len(bks))
        for j, b in enumerate(bks):
            vals = []
            for lab in labels:
                r = next(
                    (r for r in rows if r["backend"] == b and f"{r['op']} {r['case']} {r['numel'] / 1e6:.3g}M" == lab),
                    None,
                )
                vals.append((r or {}).get(key) or 0.0)
            ax.barh([i + j * h for i in range(len(labels))], vals, height=h, label=b)
        ax.axvline(ref, color="k", lw=0.8, ls="--")
        top = max([r.get(key) or 0.0 for r in rows] + [ref])
        if key == "vs_torch" and top > 10:
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
