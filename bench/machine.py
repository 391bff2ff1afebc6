"""What we run on: the device, its last-level cache, software versions, and which mixprec_ops backend serves what."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import REPO_ROOT


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_llc_bytes() -> int:
    """Size of the largest CPU cache level reported by sysfs (32 MiB if unknown)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 * 2**20


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return int(getattr(p, "L2_cache_size", 0) or 50 * 2**20)
    return cpu_llc_bytes()


def load() -> float | None:
    """1-minute load average: other work on a 2-core machine skews CPU timings badly (OpenMP regions then wait for
    a descheduled thread, in scheduler-tick steps of ~4 ms), so every run records it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def parallel_latency_us() -> float:
    """Median time of a small op that torch runs on all its threads (x.add_(1) on 2^17 floats: ~10-30 us when the
    cores are free). Milliseconds mean that waking the worker threads waits for the scheduler (other load on the
    machine or its host): every multi-threaded region then costs that much, which punishes code with many regions
    (torch eager, per-tensor loops) far more than fused kernels, so speedups measured in that state are inflated."""
    import statistics
    import time

    x = torch.zeros(1 << 17)
    ts = []
    for _ in range(30):
        t = time.perf_counter()
        x.add_(1.0)
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts[5:]) * 1e6, 1)


def describe(device: torch.device) -> dict:
    m = {
        "device": device.type,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cache_bytes": cache_bytes(device),
        "loadavg_start": load(),
        "parallel_latency_us_start": parallel_latency_us(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update(
            gpu=p.name,
            compute_capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            sm_count=p.multi_processor_count,
        )
    return m


def versions() -> dict:
    import mixprec_ops

    try:
        import triton

        tv = triton.__version__
    except Exception as e:  # noqa: BLE001
        tv = f"unavailable ({type(e).__name__})"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": tv,
        "mixprec_ops": getattr(mixprec_ops, "__version__", "?"),
        "mixprec_ops_file": mixprec_ops.__file__,
        "mixprec_ops_installed": not os.path.realpath(mixprec_ops.__file__).startswith(
            REPO_ROOT + os.sep + "mixprec_ops"
        ),
        "git": _git_state(),
    }


def _git_state() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it; None outside a git checkout (the GPU
    machine gets a copy of the tree without .git)."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def backend_summary(report: dict, device: torch.device) -> list[str]:
    """One line per op: which backends serve it on `device`, and why the others don't."""
    lines = []
    for op, per_dev in report["ops"].items():
        d = per_dev.get(device.type)
        if not isinstance(d, dict):
            lines.append(f"    {op}: {d}")
            continue
        ok = [b for b in ("cuda", "triton", "cpu", "torch") if d.get(b) == "ok"]
        lines.append(f"    {op}: serves {', '.join(ok)}; auto -> {d.get('auto')}")
        for b in ("cuda", "triton", "cpu"):
            if d.get(b) != "ok":
                lines.append(f"        {b}: {d.get(b)}")
    return lines
