"""Timing shared by every benchmark case: warm-up first, then many timed calls, and the MEDIAN is what we report.
The implementations of one case (torch baseline, our backends) are timed interleaved, call by call.

GPU: one pair of CUDA events around each call, with the device kept busy by a spin kernel (torch.cuda._sleep) queued
before the start event, long enough for the host to queue the start event, the call and the end event behind it
(twice the slowest host time of the case's warm-up calls, 50 us to MAX_SPIN_S): so the events measure the call's DEVICE
time, not the host's launch path (an idle device would record the host's Python and dispatch work between the events
as time: ~20 us for a Triton launch, more than a small GEMM takes). Each round of calls starts on an idle device (a
synchronize), so the spins never pile up. The host's side is reported separately: `host_s`, the median wall time of
queuing one call (what a loop of small calls costs when the device is faster than the host). CPU: time.perf_counter
around each call (torch CPU ops return when done). Calls rotate over several input sets whose total size aims at 4x
the last-level cache, so a small case cannot be served from a cache warmed by the previous repetition (see `n_sets`:
at most max_sets sets, so the smallest cases may cover less). Each round calls the implementations in its own order
(`call_order`), so that none always follows the same one: a call pays for what its predecessor left behind (on the
CPU, up to a cache full of dirty lines to write back; see `call_order`).
"""

from __future__ import annotations

import functools
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    min_s: float
    reps: int
    sets: int
    host_s: float | None = None  # GPU: median host time to queue one call (perf_counter, no sync)
    spin_s: float | None = None  # GPU: the spin queued ahead of each call; a host_s beyond it leaks into median_s

    def asdict(self) -> dict:
        return asdict(self)


def n_sets(bytes_per_set: int, cache_bytes: int, max_sets: int) -> int:
    """Input sets to rotate over: 1 when one set is >= 4x the cache, else enough to cover 4x the cache, at most
    max_sets."""
    if bytes_per_set <= 0 or bytes_per_set >= 4 * cache_bytes:
        return 1
    return max(1, min(max_sets, math.ceil(4 * cache_bytes / bytes_per_set)))


# The longest spin: 50 ms. At 10 ms (until 2026-11-30) the H200's 2000-tensor optimizer steps, whose host side takes
# 12-24 ms, had the device idle for the rest: their "device" medians (2.2 ms for ours, 12.8 ms for torch's foreach
# AdamW) were mostly host time. A case whose host time still exceeds the spin is flagged (row "host_over_spin").
MAX_SPIN_S = 50e-3


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_s(device: torch.device) -> float:
    """Clock cycles per second of torch.cuda._sleep's spin loop on `device`, measured with events once per device
    (it only sizes the spin, which has a 2x margin)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)  # warm
    a.record()
    torch.cuda._sleep(2_000_000)
    b.record()
    torch.cuda.synchronize(device)
    return 2_000_000 / max(a.elapsed_time(b) * 1e-3, 1e-6)


def call_order(r: int, nf: int) -> list[int]:
    """The order in which round r calls the nf implementations: a permutation drawn from a generator seeded by r
    (the same every run), so that over a run each implementation follows each other one about equally often. In a
    fixed order each would always follow the same one, and pay for what it leaves: on the 2-core CPU, a call right
    after torch's foreach AdamW (which writes large temporaries) took 0.2-0.5 ms longer at 1M params (1.2 ms alone;
    bench/NOTES.md, "Call order")."""
    return random.Random(r).sample(range(nf), nf)


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def measure(
    fns: Sequence[Callable[[Any], Any]],
    inputs: Sequence[Any],
    device: torch.device,
    *,
    reps: int = 50,
    warmup: int = 3,
    min_reps: int = 5,
    budget_s: float = 1.0,
) -> list[Timing]:
    """Time each fn(input set), interleaved: rep r calls every fn once, in call_order(r), so that a machine whose speed
    drifts during the run (other load, a host scheduler) slows all of them alike and their ratios stay fair. Call
    j (counting every call of every fn) uses inputs[j % len(inputs)], so no call finds its data in the cache that
    the previous call warmed. Stops after `reps` rounds, or once `budget_s` x len(fns) of wall time is spent and
    at least `min_reps` rounds were timed. The warm-up calls every fn on every input set at least once (what a
    first call does per set, such as creating an optimizer's state, stays out of the times)."""
    k, nf = len(inputs), len(fns)
    host_warm = [0.0] * nf
    warmup = max(warmup, k)
    for i in range(warmup):
        for n, f in enumerate(fns):
            s = time.perf_counter()
            f(inputs[i % k])
            if i or warmup == 1:  # the first of several may compile: not a host time to size the spin by
                host_warm[n] = max(host_warm[n], time.perf_counter() - s)
    times: list[list[float]] = [[] for _ in fns]
    host: list[list[float]] = [[] for _ in fns]
    j = 0
    spin_s = None
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # Spin long enough for the host to queue start event, call and end event (2x the slowest warm call's host
        # time, at least 50 us, at most MAX_SPIN_S: a call whose host side is slower than that, or that syncs, is
        # host-bound anyway and its host_s says so); each spin is queued before the start event, never inside a
        # measurement.
        spin_s = min(MAX_SPIN_S, max(50e-6, 2 * max(host_warm)))
        spin = int(_sleep_cycles_per_s(device) * spin_s)
        events: list[list[tuple]] = [[] for _ in fns]
        for r in range(reps):
            # Each round starts on an idle device: every call adds a spin, so without this the device would fall
            # further behind each round, the launch queue would fill, and host_s would time waiting for a slot.
            torch.cuda.synchronize(device)
            for n in call_order(r, nf):
                f = fns[n]
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(spin)
                a.record()
                s = time.perf_counter()
                f(inputs[j % k])
                host[n].append(time.perf_counter() - s)
                b.record()
                events[n].append((a, b))
                j += 1
            if r + 1 >= min_reps and time.perf_counter() - t0 > budget_s * nf:
                break
        torch.cuda.synchronize(device)
        times = [[a.elapsed_time(b) * 1e-3 for a, b in ev] for ev in events]
    else:
        for r in range(reps):
            for n in call_order(r, nf):
                f = fns[n]
                s = time.perf_counter()
                f(inputs[j % k])
                times[n].append(time.perf_counter() - s)
                j += 1
            if r + 1 >= min_reps and time.perf_counter() - t0 > budget_s * nf:
                break
    return [Timing(statistics.median(t), _quantile(t, 0.2), _quantile(t, 0.8), min(t), len(t), k,
                   statistics.median(h) if h else None, spin_s if h else None) for t, h in zip(times, host)]
