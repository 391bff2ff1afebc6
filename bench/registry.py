"""The case registry. Each op has one module bench/cases_<op>.py whose provider function, decorated with
@register("<op>"), returns that op's cases for a context (device, quick, which kernel backends to time). Modules
named cases_*.py are discovered automatically: adding an op (adam, matmul, ...) is adding one module.

A Case is one workload (op, configuration, size) with the honest byte count of one call, a factory of input sets,
the implementations to time (our kernel backends and the torch baseline, all on the same inputs), and a check that
runs an implementation on fresh data and compares with the mixprec_ops reference.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

BASELINE = "torch"  # the backend label of baseline rows
# What a check returns for a baseline it does not compare with the oracle (torch's own optimizer, a stand-in that
# rounds otherwise): the row says so instead of "ok", and it is timed as a baseline, not counted as a failure.
UNCHECKED = "unchecked (torch baseline)"


@dataclass
class Ctx:
    device: torch.device
    quick: bool
    backends: tuple[str, ...]  # kernel backends to time on this device


@dataclass
class Impl:
    backend: str  # "cpu", "cuda", "triton", or BASELINE
    fn: Callable[[Any], Any]  # runs one call on one input set, returns the op's output
    desc: str = ""  # what the baseline does (shown in notes)
    # Optional: called once after timing with one input set; returns a short note for the row (e.g. which Triton
    # kernel variant the autotuner picked for this shape). Its errors are caught and shown, never fatal.
    info: Callable[[Any], str] | None = None


@dataclass
class Case:
    op: str
    name: str
    numel: int  # elements processed per call
    bytes: int  # honest bytes per call: every byte the op must read plus every byte it writes
    make: Callable[[int], Any]  # seed -> one input set on the device (timing data)
    impls: list[Impl]
    check: Callable[[Impl], str | None]  # None if the impl matches the reference on fresh data, else the problem
    set_bytes: int = 0  # device bytes one input set touches (for cache rotation); default `bytes`
    tensor_bytes: int = 0  # size of the op's input tensor(s), for size-based targets (e.g. >= 256 MB)
    # Bytes the torch baseline moves for the same work (0: not counted): baseline_bytes / bytes is the ratio the two
    # would have at equal bandwidth, shown beside a ratio target (bench/targets.py).
    baseline_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    flops: int = 0  # floating-point operations per call (compute-bound ops: rows get TFLOP/s and % of the peak)
    tags: dict[str, Any] = field(default_factory=dict)  # copied into each row (e.g. family, m, n, k for geomeans)
    # Per-case caps on the run's timing settings (None: the run's own), for cases whose calls take milliseconds.
    reps: int | None = None
    budget_s: float | None = None


_PROVIDERS: dict[str, Callable[[Ctx], list[Case]]] = {}
# op -> wall seconds its cases may take (checks, i.e. compilation and autotuning, plus timing); once spent,
# the op's remaining cases are skipped and listed, so a slow op cannot push the whole run past bench/gpu_check's
# limit (which would lose every result: results.json is written at the end).
TIME_BUDGET_S: dict[str, float] = {}


def register(op: str, time_budget_s: float | None = None):
    def deco(fn):
        _PROVIDERS[op] = fn
        if time_budget_s is not None:
            TIME_BUDGET_S[op] = time_budget_s
        return fn

    return deco


def discover() -> dict[str, Callable[[Ctx], list[Case]]]:
    import bench

    for m in pkgutil.iter_modules(bench.__path__):
        if m.name.startswith("cases_"):
            importlib.import_module(f"bench.{m.name}")
    return dict(_PROVIDERS)


# ---- comparison helpers shared by the checks ----

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_mismatch(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> str | None:
    """None if equal bit for bit (any NaN matches any NaN at the same position), else a description."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return f"{what}: got {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} {tuple(expected.shape)}"
    a, e = actual.contiguous(), expected.contiguous()
    nan_a, nan_e = a.float().isnan(), e.float().isnan()
    if not torch.equal(nan_a, nan_e):
        return f"{what}: NaN positions differ in {int((nan_a != nan_e).sum())} elements"
    iv = _INT_VIEW[a.element_size()]
    diff = (a.view(iv) != e.view(iv)) & ~nan_e
    if bool(diff.any()):
        i = int(diff.flatten().nonzero()[0])
        return (
            f"{what}: {int(diff.sum())} of {diff.numel()} elements differ, first at {i}: "
            f"got {a.flatten()[i].float().item()!r}, expected {e.flatten()[i].float().item()!r}"
        )
    return None


def close_mismatch(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float, atol: float = 0.0):
    a, e = actual.double().cpu(), expected.double().cpu()
    if not torch.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True):
        return f"{what}: got {a.flatten()[:3].tolist()}, expected {e.flatten()[:3].tolist()} (rtol {rtol})"
    return None
