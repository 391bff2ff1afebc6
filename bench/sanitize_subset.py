"""Run every CUDA kernel of mixprec_ops on awkward inputs, for `compute-sanitizer --tool memcheck` (bench/gpu_check).

  cast_and_scale: every source (f32, f16, bf16) x target (f16, bf16, e4m3fn, e5m2) pair, on odd sizes, an unaligned
                  storage offset, a non-dense slice and a transpose; with scale tensor + amax + saturate, and with a
                  Python scale, no amax, saturate=False. Its backward on the same inputs, the grad laid out like x
                  and contiguous (and at an unaligned offset), both saturate modes.
  adam_step_:     buckets of several dtype combinations (masters, amsgrad, bf16 states) with odd sizes, an empty
                  tensor and an unaligned storage offset.
  unscale_:       mixed-dtype lists (odd sizes, an unaligned view, a transpose, a non-dense slice, an empty tensor), a
                  list longer than one launch holds (1300 tensors), each with and without return_norm, and once more
                  with an inf planted (found_inf must be set). --big adds a bf16 tensor longer than one launch's
                  2048 blocks (needs ~0.6 GB, slow under the sanitizer).
  matmul:         the cuBLASLt backend (and its epilogue kernel) on odd shapes, M = 1, K = 1, K = 0, a transposed /
                  2-byte-aligned / broadcast operand, a batched a; each case through every activation, the fused and
                  fp32 paths (bias of a's dtype / fp32, pre-activation, fp32 and cross 16-bit out), and
                  matmul_and_rowsum (BGRADB). CUDA only (CPU tensors are served by the reference: nothing of ours).

Every result is also compared with the reference (bit for bit; the norm to rtol 1e-4; matmul, whose summation order
is cuBLASLt's, to 2 ulps of the output's largest magnitude), so a wrong answer fails too.
The reference runs on CPU copies, so that under the sanitizer few GPU kernels besides ours are launched.
Usage: python3 bench/sanitize_subset.py [--device cuda|cpu] [--big]
  --device cpu runs the same calls through the C++ CPU kernels: a check of this script on a machine without a GPU.
Exit status: 0 all good, 1 some result differs from the reference, 2 no CUDA device (with --device cuda).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

SRC = (torch.float32, torch.float16, torch.bfloat16)
DST = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
SIZES = (1, 3, 17, 4095, 65537, 300_007)
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous(), b.contiguous()
    na, nb = a.float().isnan(), b.float().isnan()
    iv = _INT[a.element_size()]
    return bool(torch.equal(na, nb)) and not bool(((a.view(iv) != b.view(iv)) & ~nb).any())


def wide(n: int, device, dtype=torch.float32, g=None) -> torch.Tensor:
    """Values over a wide magnitude range (subnormal to overflow for fp8/fp16), a few inf/NaN."""
    mag = torch.pow(10.0, torch.empty(n).uniform_(-9, 6, generator=g))
    x = torch.where(torch.rand(n, generator=g) < 0.5, -mag, mag)
    if n >= 8:
        x[n // 3], x[n // 2], x[-1] = math.inf, -math.inf, math.nan
    return x.to(dtype).to(device)


def cast_inputs(src, device, g):
    for n in SIZES:
        yield f"n={n}", wide(n, device, src, g)
    yield "offset+1", wide(4097, device, src, g)[1:]
    yield "slice[:, :65]", wide(64 * 66, device, src, g).view(64, 66)[:, :65]
    yield "transpose", wide(33 * 65, device, src, g).view(33, 65).t()


def check_cast(backend, device, g) -> list[str]:
    from mixprec_ops import cast_and_scale
    from mixprec_ops.ops import cast_and_scale_reference

    bad = []
    cpu = torch.device("cpu")
    for src in SRC:
        for dst in DST:
            for what, x in cast_inputs(src, device, g):
                xc = x.cpu()  # the reference runs on CPU: no extra GPU kernels under the sanitizer
                scale = torch.full((1,), 0.37, device=device)
                amax, ref_amax = torch.zeros(1, device=device), torch.zeros(1, device=cpu)
                y = cast_and_scale(x, dst, scale, amax=amax, backend=backend)
                ref = cast_and_scale_reference(xc, dst, scale.cpu(), amax=ref_amax)
                if not same_bits(y.cpu(), ref) or not same_bits(amax.cpu(), ref_amax):
                    bad.append(f"cast {src}->{dst} {what} scale+amax")
                y = cast_and_scale(x, dst, 0.75, saturate=False, backend=backend)
                if not same_bits(y.cpu(), cast_and_scale_reference(xc, dst, None, 0.75, None, False)):
                    bad.append(f"cast {src}->{dst} {what} float scale, saturate=False")
    return bad


def check_cast_backward(backend, device, g) -> list[str]:
    """cast_and_scale_backward: each (x dtype, target) pair with the grad in the target's dtype (as autograd hands
    it back), laid out like x (read in place: x's odd sizes, its unaligned offset, its transpose) and contiguous
    (a transposed or sliced x is then copied first); plus a grad at an unaligned offset beside an aligned x."""
    from mixprec_ops.ops.cast_and_scale import cast_and_scale_backward, cast_and_scale_backward_reference

    bad = []
    for src in SRC:
        for dst in DST:
            inputs = list(cast_inputs(src, device, g))
            inputs.append(("grad offset+1", wide(4096, device, src, g)))
            for what, x in inputs:
                gflat = wide(x.numel() + 1, device, dst, g)
                grads = [("grad like x", torch.empty_like(x, dtype=dst).copy_(gflat[:-1].view(x.shape)))]
                if not x.is_contiguous():  # (for a contiguous x the two are the same layout)
                    grads.append(("grad contiguous", gflat[:-1].view(x.shape)))
                if what == "grad offset+1":
                    grads = [("grad offset+1", gflat[1:])]
                for gwhat, gy in grads:
                    for scale, sat in ((torch.full((1,), 0.37, device=device), True), (0.75, False)):
                        got = cast_and_scale_backward(gy, x, dst, scale, saturate=sat, backend=backend)
                        s_t = scale.cpu() if isinstance(scale, torch.Tensor) else None
                        ref = cast_and_scale_backward_reference(gy.cpu(), x.cpu(), dst, s_t, 0.75, sat)
                        if not same_bits(got.cpu(), ref):
                            bad.append(f"cast backward {src}, grad {dst}, {what}, {gwhat}, saturate={sat}")
    return bad


def unscale_lists(device, big):
    """name -> builder of a fresh list (same values on every call)."""

    def builder(make):
        def build():
            g = torch.Generator().manual_seed(1)
            return make(lambda n, dt: torch.randn(n, generator=g).to(dt).to(device))

        return build

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    out = {
        "mixed": builder(
            lambda r: [
                r(1, f32),
                r(4097, f32),
                r(65537, f16),
                r(3, bf16),
                r(1001, f32)[1:],  # [4]: unaligned view
                r(33 * 65, bf16).view(33, 65).t(),
                r(40 * 64, f16).view(40, 64)[:, ::2],  # transpose; non-dense
                r(0, f32),
                r(131072 + 5, bf16),
            ]
        ),
        "1300 tensors": builder(lambda r: [r(17 + i % 5, (f32, bf16)[i % 2]) for i in range(1300)]),
    }
    if big:
        out["bf16 over 2048 blocks"] = builder(lambda r: [r(1000, bf16), r(2048 * 65536 + 12345, bf16)])
    return out


def check_unscale(backend, device, big) -> list[str]:
    from mixprec_ops import unscale_
    from mixprec_ops.ops import unscale_reference

    bad = []
    for what, build in unscale_lists(device, big).items():
        for norm in (False, True):
            for plant_inf in (False, True):
                work = build()
                if plant_inf:
                    work[1].view(-1)[7] = math.inf
                ref = [t.cpu().clone() for t in work]  # the reference runs on CPU
                inv = torch.full((1,), 1 / 3, device=device)
                found, ref_found = torch.zeros(1, device=device), torch.zeros(1)
                out = unscale_(work, inv, found, return_norm=norm, backend=backend)
                ref_out = unscale_reference(ref, inv.cpu(), ref_found, return_norm=norm)
                tag = f"unscale {what} norm={norm} inf={plant_inf}"
                if not all(same_bits(a.cpu(), b) for a, b in zip(work, ref, strict=True)):
                    bad.append(f"{tag}: tensors differ")
                if float(found) != float(ref_found):
                    bad.append(f"{tag}: found_inf {float(found)} != {float(ref_found)}")
                if norm and not plant_inf and not torch.allclose(out.double().cpu(), ref_out.double().cpu(), rtol=1e-4):
                    bad.append(f"{tag}: norm {float(out)} != {float(ref_out)}")
    return bad


def check_adam(backend, device) -> list[str]:
    """adam_step_ on buckets of odd sizes (with an empty tensor and a 1-element storage offset: scalar paths),
    several dtype combinations, amsgrad and masters; compared bit for bit with the reference run on CPU copies
    (the per-tensor scalars are computed once, on CPU, and copied: the same inputs for both)."""
    from mixprec_ops.ops.adam import adam_scalars, adam_step_, adam_step_reference

    bad = []
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    combos = [(f32, f32, f32, False, False), (bf16, bf16, f32, True, True), (f16, f32, bf16, True, False),
              (bf16, bf16, bf16, False, True)]
    for P, G, S, master, ams in combos:
        g = torch.Generator().manual_seed(3)
        sizes = (1, 5, 0, 4097, 65543, 70001)
        mk = lambda n, dt, pos=False: (torch.randn(n, generator=g).abs() * 1e-3 if pos  # noqa: E731
                                       else torch.randn(n, generator=g)).to(dt)
        cpu = {"p": [mk(n, P) for n in sizes], "g": [mk(n, G) for n in sizes], "m": [mk(n, S) for n in sizes],
               "v": [mk(n, S, True) for n in sizes]}
        cpu["x"] = [mk(n, S, True) for n in sizes] if ams else []
        cpu["w"] = [p.float() for p in cpu["p"]] if master else []

        def to_dev(t, i):
            if i != 4:
                return t.to(device)
            b = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)  # storage offset 1: unaligned
            b[1:] = t.to(device)
            return b[1:]

        dev = {k: [to_dev(t, i) for i, t in enumerate(v)] for k, v in cpu.items()}
        steps = [torch.tensor(float(i + 3)) for i in range(len(sizes))]
        sc = adam_scalars(steps, 1e-3, 0.9, 0.999, 0.01)
        hp = (0.9, 0.999, 1e-8, 0.01, True, False)
        gs = torch.tensor([2.0])
        adam_step_reference(cpu["p"], cpu["g"], cpu["m"], cpu["v"], cpu["x"], cpu["w"], sc, *hp, gs, None, None)
        adam_step_(dev["p"], dev["g"], dev["m"], dev["v"], dev["x"], dev["w"], sc.to(device), *hp, gs.to(device),
                   None, None, backend=backend)
        for k in cpu:
            for i, (a, b) in enumerate(zip(dev[k], cpu[k], strict=True)):
                if not same_bits(a.cpu(), b):
                    bad.append(f"adam {P}/{G}/{S} master={master} ams={ams}: {k}[{i}] differs")
    return bad


def check_matmul(backend, device) -> list[str]:
    """matmul on the cuBLASLt backend: each result against the reference run on CPU copies, to 2 ulps (of the out
    dtype, or of the operand dtype for fp32 out) of the largest output magnitude."""
    from mixprec_ops.ops.matmul import matmul, matmul_and_rowsum, matmul_reference, matmul_with_preactivation

    bad = []
    g = torch.Generator().manual_seed(5)

    def r(*shape, dtype):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    def close(y, ref, dtype, what):
        ulp = torch.finfo(dtype if y.dtype == torch.float32 else y.dtype).eps
        err = (y.double().cpu() - ref.double()).abs().max().item() if y.numel() else 0.0
        scale = ref.double().abs().max().item() if ref.numel() else 0.0
        if y.shape != ref.shape or y.dtype != ref.dtype or not err <= 2 * ulp * scale + 1e-6:
            bad.append(f"matmul {what}: max error {err:.3g} (scale {scale:.3g}, {y.dtype} {tuple(y.shape)})")

    for dtype in (torch.float16, torch.bfloat16):
        other = torch.bfloat16 if dtype == torch.float16 else torch.float16
        off = torch.empty(37 * 45 + 1, dtype=dtype, device=device)
        off[1:] = r(37 * 45, dtype=dtype).flatten()
        cases = [("37x24x45", r(37, 45, dtype=dtype), r(45, 24, dtype=dtype)),
                 ("19x23x40 a.t() b.t()", r(40, 19, dtype=dtype).t(), r(23, 40, dtype=dtype).t()),
                 ("M=1", r(1, 33, dtype=dtype), r(33, 17, dtype=dtype)),
                 ("K=1", r(9, 1, dtype=dtype), r(1, 16, dtype=dtype)),
                 ("K=0", r(5, 0, dtype=dtype), r(0, 8, dtype=dtype)),
                 ("offset a", off[1:].view(37, 45), r(45, 24, dtype=dtype)),
                 ("broadcast a", r(1, 45, dtype=dtype).expand(37, 45), r(45, 24, dtype=dtype)),
                 ("batched", r(3, 7, 45, dtype=dtype), r(45, 24, dtype=dtype))]
        for what, a, b in cases:  # every mapping once per case, not the full product (memcheck is slow)
            ac, bc = a.cpu(), b.cpu()
            n = b.shape[1]
            bias, bias32 = r(n, dtype=dtype), r(n, dtype=torch.float32)
            calls = [(act, bias, dtype, False) for act in (None, "relu", "gelu", "gelu_tanh", "silu")]
            calls += [("relu", bias, dtype, True), ("gelu_tanh", None, dtype, True), ("gelu", bias32, dtype, True),
                      ("silu", bias32, torch.float32, False), (None, None, other, False)]
            for act, bb, out, with_pre in calls:
                bbc = None if bb is None else bb.cpu()
                tag = f"{what} {dtype} {act} bias={None if bb is None else bb.dtype} out={out} pre={with_pre}"
                if with_pre:
                    y, pre = matmul_with_preactivation(a, b, bias=bb, activation=act, out_dtype=out, backend=backend)
                    ry, rpre = matmul_reference(ac, bc, bbc, act, out, return_pre=True)
                    close(pre, rpre, dtype, tag + " (pre)")
                else:
                    y = matmul(a, b, bias=bb, activation=act, out_dtype=out, backend=backend)
                    ry = matmul_reference(ac, bc, bbc, act, out)
                close(y, ry, dtype, tag)
        for what, a in [("g.t()", r(40, 23, dtype=dtype).t()), ("contiguous", r(23, 40, dtype=dtype))]:
            x = r(40, 24, dtype=dtype)
            for out in (dtype, torch.float32):
                y, rs = matmul_and_rowsum(a, x, out_dtype=out, backend=backend)
                close(y, matmul_reference(a.cpu(), x.cpu(), None, None, out), dtype, f"rowsum {what} {out} product")
                close(rs, a.cpu().float().sum(1).to(out), dtype, f"rowsum {what} {out} sums")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--big", action="store_true")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print(
            "sanitize_subset: no CUDA device visible; this script exercises the CUDA kernels "
            "(use --device cpu to run the same calls on the CPU kernels)",
            file=sys.stderr,
        )
        return 2
    import mixprec_ops

    device = torch.device(a.device)
    backend = a.device
    why = mixprec_ops.backends.unavailable_reason("cast_and_scale", backend, device)
    if why:
        print(f"sanitize_subset: backend {backend!r} unavailable: {why}", file=sys.stderr)
        return 1
    print(f"sanitize_subset: mixprec_ops from {mixprec_ops.__file__}, backend {backend}")
    g = torch.Generator().manual_seed(0)
    sections = [("cast_and_scale", lambda: check_cast(backend, device, g)),
                ("unscale_", lambda: check_unscale(backend, device, a.big)),
                ("adam_step_", lambda: check_adam(backend, device))]
    if device.type == "cuda":
        sections.append(("matmul", lambda: check_matmul(backend, device)))
    else:
        print("sanitize_subset: matmul skipped on cpu (no CPU kernel of ours: the reference serves CPU tensors)")
    # last: the newest section cannot crowd the others out of bench/gpu_check's time limit for this step
    sections.append(("cast_and_scale_backward", lambda: check_cast_backward(backend, device, g)))
    bad = []
    for name, run in sections:  # each section's verdict as soon as it is known (the step may hit its time limit)
        t = time.perf_counter()
        got = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        for b in got:
            print(f"MISMATCH {b}", flush=True)
        print(f"sanitize_subset: {name}: {'ok' if not got else f'{len(got)} mismatches'} "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
        bad += got
    print(f"sanitize_subset: {'OK' if not bad else f'{len(bad)} mismatches'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
