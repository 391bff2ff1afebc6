"""The machine's own ceilings, measured in the same run as the cases: large-tensor copy bandwidth (bytes read +
written) and, on a GPU, torch's bf16 matmul rate on random 8192^3 data."""

from __future__ import annotations

import torch

from .timing import measure


def copy_bandwidth(device: torch.device, quick: bool) -> dict:
    nbytes = (1 << 30) if device.type == "cuda" else (128 << 20 if quick else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    # In place (read + write of the same memory, as unscale_ does): a copy's destination lines are also read by CPUs
    # that write-allocate, so in-place ops can exceed "100% of copy" there. Informative only; %copy uses the copy.
    # Both are timed in one interleaved measurement (x * 1.0 leaves src unchanged).
    t, ti = measure(
        [lambda _: dst.copy_(src), lambda _: src.mul_(1.0)],
        [None],
        device,
        reps=30 if device.type == "cuda" else 10,
        warmup=2,
        min_reps=5,
        budget_s=1.0,
    )
    return {
        "copy_bytes": 2 * nbytes,
        "copy_gbps": 2 * nbytes / t.median_s / 1e9,
        "copy_timing": t.asdict(),
        "inplace_gbps": 2 * nbytes / ti.median_s / 1e9,
    }


def matmul_bf16(device: torch.device, n: int = 8192) -> dict:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    (t,) = measure([lambda _: torch.mm(a, b)], [None], device, reps=30, warmup=5, min_reps=10, budget_s=1.0)
    return {"matmul_n": n, "matmul_bf16_tflops": 2 * n**3 / t.median_s / 1e12, "matmul_timing": t.asdict()}


def measure_all(device: torch.device, quick: bool) -> dict:
    c = copy_bandwidth(device, quick)
    if device.type == "cuda":
        c.update(matmul_bf16(device))
        torch.cuda.empty_cache()
    return c
