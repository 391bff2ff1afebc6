"""Where the host time of small steps goes: mixprec_ops.optim.AdamW against torch's fused AdamW, and unscale_.

    python3 -m bench.host_profile [--device cuda|cpu] [--out DIR] [--steps N] [--scale S]

Why: on the H200 (2026-11-30, bench rows "AdamW bf16+masters 1M params", 40 tensors) our CUDA step took 44 us of
device time against torch's 98 us, but 546 us of host time a call against torch's 481 us, and the host decides a
loop of such steps. The bench says how long; this says where. For each case (40 tensors of 1M params in all, as the
bench's row; 2000 x 4096; a bare unscale_ over 2000 x 4096 fp32 grads, fresh and as params' .grad) and each
implementation (ours on each backend the device has; torch.optim.AdamW(fused=True) on fp32 params + _foreach_copy_
to bf16, the bench's baseline; torch._amp_foreach_non_finite_check_and_unscale_ for unscale_):
  - host: the median wall time of one step() while the device is kept busy by a spin queued ahead (as bench.timing
    does), so a step that waits for the device shows up here as a long host time;
  - synced: the median of one step() followed by a synchronize;
  - torch.profiler's table of self CPU time per op and CUDA runtime call over a few steps (a cudaStreamSynchronize or
    cudaMemcpy in a step is a sync), and cProfile's Python functions by own time.
Writes OUT/host_profile.json and OUT/host_profile.md (tables last). On CPU (tests, or no GPU) the same runs on the
CPU backends, without the spin: there the kernels run inside step() and host equals synced.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time

import torch

from .cases_adam import HP, _params, split_sizes


def _impls(device: torch.device, op: str = "adam_step_"):
    from mixprec_ops import backends

    ours = [b for b in (("cuda", "triton") if device.type == "cuda" else ("cpu",))
            if backends.unavailable_reason(op, b, device) is None]
    return [f"ours-{b}" for b in ours] + ["torch-fused"]


def _make_unscale(impl: str, sizes, device, held: bool = False):
    """One unscale_ call over fresh fp32 grads of `sizes` (inv_scale 1.0: the values stay as they are, call after
    call; the kernels still read every element and write none, as torch's does at 1.0). held: the grads of params
    (p.grad), which their params also own, instead of tensors only Python owns (the two differ in what a call from
    Python costs per tensor on torch >= 2.10: csrc/hold_args.h)."""
    g = torch.Generator(device=device).manual_seed(0)
    ts = [torch.randn(n, generator=g, device=device) for n in sizes]
    if held:
        params = [torch.nn.Parameter(torch.empty_like(t)) for t in ts]
        for p, t in zip(params, ts, strict=True):
            p.grad = t
        ts = [p.grad for p in params]
    inv, found = torch.ones((), device=device), torch.zeros(1, device=device)
    if impl == "torch-fused":
        return lambda: torch._amp_foreach_non_finite_check_and_unscale_(ts, found, inv)
    from mixprec_ops import unscale_

    backend = impl.removeprefix("ours-")
    return lambda: unscale_(ts, inv, found, backend=backend)


def _make(impl: str, sizes, device):
    """A step function for `impl` over fresh params of `sizes` (grads set, as in the bench)."""
    if impl == "torch-fused":
        fp32 = _params(sizes, torch.float32, device, 0)
        model = [torch.empty(n, dtype=torch.bfloat16, device=device) for n in sizes]
        opt = torch.optim.AdamW(fp32, **HP, fused=True)

        def step():
            opt.step()
            torch._foreach_copy_(model, fp32)
        return step
    from mixprec_ops.optim import AdamW

    opt = AdamW(_params(sizes, torch.bfloat16, device, 0), **HP, backend=impl.removeprefix("ours-"))
    return opt.step


def _spin(device, seconds):
    if device.type == "cuda":
        from .timing import _sleep_cycles_per_s

        torch.cuda._sleep(int(_sleep_cycles_per_s(device) * seconds))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile_table(step, device, steps: int, rows: int = 20) -> tuple[list[dict], str]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)  # the CUDA runtime calls, with their host time
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    avg = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    out = [{"name": e.key, "calls_per_step": e.count / steps, "self_cpu_us_per_step": e.self_cpu_time_total / steps,
            "cpu_us_per_step": e.cpu_time_total / steps} for e in avg]
    lines = ["| op or runtime call | calls/step | self CPU us/step | incl. CPU us/step |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| `{r['name'][:70]}` | {r['calls_per_step']:g} | {r['self_cpu_us_per_step']:.1f} | "
              f"{r['cpu_us_per_step']:.1f} |" for r in out]
    return out, "\n".join(lines)


def _cprofile(step, steps: int, rows: int = 15) -> tuple[list[dict], str]:
    """The Python functions (and builtins: op calls show as torch._ops.mixprec.*) by own time, in us a step."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    stats = pstats.Stats(pr).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:rows]
    out = [{"function": f"{os.path.basename(f)}:{line}({name})" if f != "~" else name, "calls_per_step": nc / steps,
            "own_us_per_step": tt / steps * 1e6, "cum_us_per_step": ct / steps * 1e6}
           for (f, line, name), (_cc, nc, tt, ct, _callers) in top]
    lines = ["| Python function | calls/step | own us/step | cumulative us/step |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| `{r['function'][:80]}` | {r['calls_per_step']:g} | {r['own_us_per_step']:.1f} | "
              f"{r['cum_us_per_step']:.1f} |" for r in out]
    return out, "\n".join(lines)


def measure(impl: str, sizes, device, steps: int, op: str = "adam_step_", held: bool = False) -> dict:
    step = _make(impl, sizes, device) if op == "adam_step_" else _make_unscale(impl, sizes, device, held)
    for _ in range(5):  # state creation, first-call compilation, the steady step's recording
        step()
    _sync(device)
    host, synced = [], []
    for i in range(steps):
        if i % 10 == 0:
            _sync(device)  # keep the launch queue short: a full queue would block the host, not the step
        _spin(device, 0.004)
        t = time.perf_counter()
        step()
        host.append(time.perf_counter() - t)
    _sync(device)
    for _ in range(max(5, steps // 4)):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        synced.append(time.perf_counter() - t)
    prof_rows, prof_md = _profile_table(step, device, max(3, steps // 10))
    py_rows, py_md = _cprofile(step, max(3, steps // 10))
    return {"impl": impl, "host_us": statistics.median(host) * 1e6, "synced_us": statistics.median(synced) * 1e6,
            "profile": prof_rows, "python": py_rows, "md": prof_md + "\n\n" + py_md}


def cases(scale: float) -> dict[str, tuple[str, list[int], bool]]:
    """{name: (op, tensor sizes, held)}; held: unscale_'s grads as params' .grad (_make_unscale)."""
    return {"AdamW 1M params in 40 tensors": ("adam_step_", split_sizes(max(40, int(1_000_000 * scale)), 40), False),
            "AdamW 2000 x 4096": ("adam_step_", [max(1, int(4096 * scale))] * 2000, False),
            # the bare unscale_ over 2000 tensors read 0.50x (CUDA) and 0.23x (Triton) a call on the H200
            "unscale_ 2000 x 4096 fp32": ("unscale_", [max(1, int(4096 * scale))] * 2000, False),
            "unscale_ 2000 x 4096 fp32, p.grad": ("unscale_", [max(1, int(4096 * scale))] * 2000, True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="host_profile_out")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--scale", type=float, default=1.0, help="tensor sizes times this (tests: small)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    doc = {"device": str(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "steps": a.steps, "cases": []}
    if device.type == "cuda":
        doc["gpu"] = torch.cuda.get_device_name(device)
    md = [f"# Host time of small optimizer steps ({doc.get('gpu', 'CPU')}, torch {torch.__version__})", "",
          "host: median wall time of one step() with the device busy (a spin ahead); synced: step() + synchronize.",
          "", "| case | impl | host us | synced us |", "| --- | --- | ---: | ---: |"]
    details = []
    for name, (op, sizes, held) in cases(a.scale).items():
        for impl in _impls(device, op):
            r = measure(impl, sizes, device, a.steps, op, held)
            doc["cases"].append({"case": name, **{k: v for k, v in r.items() if k != "md"}})
            md.append(f"| {name} | {impl} | {r['host_us']:.1f} | {r['synced_us']:.1f} |")
            details += ["", f"## {name}: {impl}", "", r["md"]]
            print(f"{name:32s} {impl:12s} host {r['host_us']:9.1f} us  synced {r['synced_us']:9.1f} us", flush=True)
            _write(a.out, doc, md + details)  # after each: a run stopped at its limit keeps what it measured
    return 0


def _write(out: str, doc: dict, md: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "host_profile.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out, "host_profile.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
