"""matmul cases: mixprec_ops.matmul (bf16, fp32 accumulation) against torch's cuBLAS GEMM, and the fused
Linear + bias + GELU forward+backward (mixprec_ops.nn.functional.linear) against torch eager, timed in the same run.

GEMM grid (issue 5): M in {16, 128, 8192} x (K, N) in {(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192),
(8192, 28672), (28672, 8192)}, plus 4096^3 (8192^3 is in the grid already). Operands are laid out as in nn.Linear:
a (M, K) row-major and the weight w (N, K) row-major, so ours computes matmul(a, w.t()) (B read transposed, in place)
and the baseline is F.linear(a, w) (what torch runs for nn.Linear; the same cuBLAS GEMM as torch.matmul(a, w.t())).
Rows report TFLOP/s (2 M N K per call), % of torch's bf16 matmul rate measured at the start of the same run
(ceilings.py, 8192^3 on random data), "vs torch" and, for Triton, which kernel variant/config the autotuner picked.

Linear + bias + GELU (erf and tanh) forward+backward: y = gelu(x @ w.T + b), then dx, dw, db from one
torch.autograd.grad call; ours is linear(x, w, b, activation=...) (one fused GEMM + epilogue forward, the saved
pre-activation for the backward), torch eager is F.gelu(F.linear(x, w, b)). TFLOP/s counts the three GEMMs only
(6 M N K); the honest bytes are x, w, y (forward) plus grad_y, x, w, dx, dw (backward), in bf16. A second Linear
case per shape, "(recompute pre)", saves only the inputs and recomputes the pre-activation in the backward (one more
GEMM, 8 M N K in all, still counted as 6): the other way issue 4 asks to measure; outside the geomean groups.

Targets on an H200 (the report prints each backend's geometric mean of "vs torch" against them): >= 1.0x
torch at M = 8192, >= 0.9x at M <= 128, fused Linear >= 1.1x eager. 4096^3 is reported outside the groups.

Correctness first, on fresh data at the case's own shape (so the autotuned config that gets timed is the one
checked): the fp32 product (a.float() @ w.float().t(), and fp32 autograd for Linear) is the reference; each of our
outputs must be within 2x torch's own bf16 error against it (max |error| over the tensor, + 1e-6 x max|ref|), the
bound tests/test_matmul.py uses; torch itself must be within 2^-6 x max|ref| (a sanity bound).

CPU: no CPU kernel implements matmul (the fp32 reference serves CPU tensors; Triton on CPU would be its interpreter,
which the suite never times), so on CPU the grid is not run: one small GEMM and one small Linear case time torch
alone, which exercises the cases' data, checks and reporting (tests/test_bench.py runs it); the geomean lines then
say that no kernel backend was timed.

GPU time: the checks call each shape first, which is where Triton compiles and autotunes (shown as "1st call"); the
per-case timing is capped (CASE_REPS, CASE_BUDGET_S), and all matmul cases together get TIME_BUDGET_S of wall
time, after which the rest are skipped and listed (bench/gpu_check's bench step must not time out: that would lose
every result). Autotuning results are cached on disk (triton_kernels/tune_cache.py), so a second run on the same
machine skips the benchmarking of configs, though not Triton's compilation unless its own cache is kept too.
`--quick` runs a subset (M in {16, 128, 8192} x {(4096, 4096), (8192, 28672)}, 4096^3, one Linear shape).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .registry import BASELINE, Case, Ctx, Impl, register

DTYPE = torch.bfloat16
MS = (16, 128, 8192)
KNS = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192))
QUICK_KNS = ((4096, 4096), (8192, 28672))
CUBES = (4096,)  # M = K = N; 8192^3 is the grid's (M 8192, K 8192, N 8192)
# Linear + bias + GELU: (M, in_features K, out_features N).
LINEAR_SHAPES = ((8192, 4096, 4096), (8192, 4096, 11008))
QUICK_LINEAR_SHAPES = ((8192, 4096, 11008),)
ACTIVATIONS = ("gelu", "gelu_tanh")
# On CPU: one small case per family (torch only; see the module docstring).
CPU_MM = (16, 256, 256)
CPU_LINEAR = (64, 256, 512)

CASE_REPS = 30  # cap on timed reps per case: the largest GEMM takes ~5 ms a call
CASE_BUDGET_S = 0.1  # cap on timing wall time per implementation and case
# Wall time all matmul cases may take (the run skips and lists the rest once it is spent). Most of it is
# Triton compiling its candidate configs (~1-2 s each, once per kernel specialization) during the first calls.
# The H200 run of 2026-11-30 took 73 s of 80; the split-K candidates (M <= 128) add ~6 compiles.
TIME_BUDGET_S = 105.0  # the H200 run of 2026-11-30 18:03 spent 87.9 s of 95; the tall M <= 128 tiles add tuning

GEOMEANS = {  # group -> target geomean of "vs torch" (issue 5, H200)
    "matmul M=8192": 1.0,
    "matmul M<=128": 0.9,
    "linear+bias+gelu fwd+bwd": 1.1,
}


def grid(ctx: Ctx) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(GEMM shapes (M, K, N), Linear shapes (M, K, N)) for this run."""
    if ctx.device.type != "cuda":
        return [CPU_MM], [CPU_LINEAR]
    kns = QUICK_KNS if ctx.quick else KNS
    mm = [(m, k, n) for m in MS for k, n in kns] + [(c, c, c) for c in CUBES]
    return mm, list(QUICK_LINEAR_SHAPES if ctx.quick else LINEAR_SHAPES)


def _group(m: int, k: int, n: int) -> str | None:
    if (m, k, n) in [(c, c, c) for c in CUBES]:
        return None
    return "matmul M=8192" if m >= 8192 else "matmul M<=128" if m <= 128 else None


def _randn(shape, g, dev, scale=1.0):
    return (torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * scale).to(DTYPE)


def _err(y, exact):
    return (y.float() - exact).abs().max().item() if y.numel() else 0.0


def _within(what, y, exact, base_err, scale, backend):
    """None if y is within the bound (see the module docstring), else why not."""
    if y.shape != exact.shape or y.dtype != DTYPE:
        return f"{what}: got {y.dtype} {tuple(y.shape)}, expected {DTYPE} {tuple(exact.shape)}"
    if not bool(y.isfinite().all()):
        return f"{what}: non-finite values"
    err = _err(y, exact)
    bound = 2.0**-6 * scale if backend.startswith(BASELINE) else 2.0 * base_err + 1e-6 * scale
    if err > bound:
        return f"{what}: max error {err:.3g} > bound {bound:.3g} (torch's own error {base_err:.3g})"
    return None


def _memo_check(case_ref, build, compare):
    """A check that computes the reference (`build()`: the fresh data, the exact results and torch's errors) once per
    case, shares it between the implementations and frees it after the case's last implementation was checked (the
    largest references are ~1 GB of fp32 on the GPU)."""
    memo = {}

    def check(impl: Impl):
        try:
            if not memo:
                memo.update(build())
            return compare(impl, memo)
        finally:
            impls = case_ref[0].impls if case_ref else []
            if not impls or impl is impls[-1]:
                memo.clear()

    return check


def _choices_label(fn, d, parts):
    """Run fn(d) once while the Triton matmul records the config of each launch; label them by `parts`."""
    km = importlib.import_module("mixprec_ops.triton_kernels.matmul")
    record = getattr(km, "record_choices", None)
    if record is None:
        return ""
    with record() as got:
        fn(d)
    labels = [f"{c['config']} ({c['source']})" for c in got]
    if len(parts) == len(labels) and len(labels) > 1:
        return "; ".join(f"{p}: {lab}" for p, lab in zip(parts, labels, strict=True))
    return "; ".join(labels)


# ---- GEMM ----


def _mm_make(m, k, n, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    return {"a": _randn((m, k), g, dev), "w": _randn((n, k), g, dev, scale=k**-0.5)}


def _mm_case(ctx: Ctx, m: int, k: int, n: int) -> Case:
    import mixprec_ops

    dev = ctx.device

    def ours(backend):
        return lambda d: mixprec_ops.matmul(d["a"], d["w"].t(), backend=backend)

    def base(d):
        return F.linear(d["a"], d["w"])

    def build():
        d = _mm_make(m, k, n, dev, seed=12345)
        exact = d["a"].float() @ d["w"].float().t()
        return {"d": d, "exact": exact, "base_err": _err(base(d), exact), "scale": exact.abs().max().item()}

    def compare(impl, r):
        return _within("y", impl.fn(r["d"]), r["exact"], r["base_err"], r["scale"], impl.backend)

    impls = [Impl(BASELINE, base, "F.linear(a, w) (cuBLAS, = torch.matmul(a, w.t()))")]
    for b in ctx.backends:
        fn = ours(b)
        info = (lambda d, fn=fn: _choices_label(fn, d, ())) if b == "triton" else None
        impls.append(Impl(b, fn, info=info))
    ref = []
    group = _group(m, k, n)
    case = Case(
        "matmul",
        f"bf16 M={m} K={k} N={n}",
        m * n,
        2 * (m * k + k * n + m * n),
        lambda seed: _mm_make(m, k, n, dev, seed),
        impls,
        _memo_check(ref, build, compare),
        tensor_bytes=2 * (m * k + k * n),
        flops=2 * m * n * k,
        tags={"family": "matmul", "m": m, "n": n, "k": k, "geomean": group, "target": GEOMEANS.get(group)},
        reps=CASE_REPS,
        budget_s=CASE_BUDGET_S,
    )
    ref.append(case)
    return case


# ---- Linear + bias + GELU, forward + backward ----


def _lin_make(m, k, n, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    return {
        "x": _randn((m, k), g, dev).requires_grad_(True),
        "w": _randn((n, k), g, dev, scale=k**-0.5).requires_grad_(True),
        "b": _randn((n,), g, dev, scale=0.1).requires_grad_(True),
        "go": _randn((m, n), g, dev),
    }


def _approx(act):
    return "tanh" if act == "gelu_tanh" else "none"


class _RecomputeLinear(torch.autograd.Function):
    """linear(x, w, b, act) that saves only its inputs and recomputes the pre-activation x @ w.T + b (one more GEMM)
    in the backward: the alternative to the fused forward storing it (issue 4 asks which is better). Measured here
    only, side by side with the shipped path; the backward after the recomputation is the shipped one."""

    @staticmethod
    def forward(ctx, x, w, b, act, backend):
        from mixprec_ops import matmul

        ctx.save_for_backward(x, w, b)
        ctx.act, ctx.backend = act, backend
        return matmul(x, w.t(), bias=b, activation=act, backend=backend)

    @staticmethod
    def backward(ctx, grad_y):
        from types import SimpleNamespace

        from mixprec_ops import matmul
        from mixprec_ops.nn import functional

        x, w, b = ctx.saved_tensors
        pre = matmul(x, w.t(), bias=b, backend=ctx.backend)  # the extra GEMM that saving pre avoids
        shim = SimpleNamespace(saved_tensors=(x, w, pre), needs_input_grad=ctx.needs_input_grad[:3],
                               activation=ctx.act, backend=ctx.backend, bias_dtype=b.dtype, x_dtype=x.dtype,
                               x_device=x.device)
        return functional._backward(shim, grad_y, None)


def _lin_case(ctx: Ctx, m: int, k: int, n: int, act: str, recompute: bool = False) -> Case:
    from mixprec_ops.nn.functional import linear

    dev = ctx.device

    def fwd_bwd(forward):
        def fn(d):
            with torch.enable_grad():
                y = forward(d)
                return (y, *torch.autograd.grad(y, (d["x"], d["w"], d["b"]), d["go"]))

        return fn

    def ours(backend):
        if recompute:
            return fwd_bwd(lambda d: _RecomputeLinear.apply(d["x"], d["w"], d["b"], act, backend))
        return fwd_bwd(lambda d: linear(d["x"], d["w"], d["b"], activation=act, backend=backend))

    base = fwd_bwd(lambda d: F.gelu(F.linear(d["x"], d["w"], d["b"]), approximate=_approx(act)))

    def build():
        d = _lin_make(m, k, n, dev, seed=12345)
        xf, wf, bf = (d[t].detach().float().requires_grad_(True) for t in ("x", "w", "b"))
        with torch.enable_grad():
            y = F.gelu(F.linear(xf, wf, bf), approximate=_approx(act))
            exact = (y.detach(), *torch.autograd.grad(y, (xf, wf, bf), d["go"].float()))
        got = base(d)
        return {
            "d": d,
            "exact": exact,
            "base_err": [_err(g, e) for g, e in zip(got, exact, strict=True)],
            "scale": [e.abs().max().item() for e in exact],
        }

    def compare(impl, r):
        got = impl.fn(r["d"])
        for i, what in enumerate(("y", "dx", "dw", "db")):
            bad = _within(what, got[i], r["exact"][i], r["base_err"][i], r["scale"][i], impl.backend)
            if bad:
                return bad
        return None

    impls = [Impl(BASELINE, base, f"F.gelu(F.linear(x, w, b), approximate={_approx(act)!r}) + autograd.grad")]
    for b in ctx.backends:
        fn = ours(b)
        info = (lambda d, fn=fn: _choices_label(fn, d, ("fwd", "dx", "dw"))) if b == "triton" else None
        impls.append(Impl(b, fn, info=info))
    ref = []
    group = None if recompute else "linear+bias+gelu fwd+bwd"
    case = Case(
        "matmul",
        f"linear+bias+{act} fwd+bwd{' (recompute pre)' if recompute else ''} M={m} {k}->{n}",
        m * n,
        2 * ((m * k + n * k + m * n) + (m * n + m * k + n * k + m * k + n * k)),
        lambda seed: _lin_make(m, k, n, dev, seed),
        impls,
        _memo_check(ref, build, compare),
        tensor_bytes=2 * (m * k + n * k),
        flops=6 * m * n * k,
        tags={"family": "linear", "m": m, "n": n, "k": k, "geomean": group, "target": GEOMEANS.get(group)},
        reps=CASE_REPS,
        budget_s=CASE_BUDGET_S,
    )
    ref.append(case)
    return case


# ---- Linear's weight and bias gradients: the BGRADB epilogue against a GEMM and a separate sum ----


def _wgrad_make(m, k, n, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    return {"g": _randn((m, n), g, dev), "x": _randn((m, k), g, dev)}


def _wgrad_case(ctx: Ctx, m: int, k: int, n: int) -> Case:
    """dW = g^T x and db = sum of g's rows, as a Linear's backward needs them (g: grad at the pre-activation, (M, N);
    x: the input, (M, K)). Ours, cuda only: matmul_and_rowsum (one cuBLASLt GEMM with the BGRADB epilogue, which the
    Linear's backward uses for a bias of the weight's dtype) and "cuda-gemm+sum" (the GEMM, then a separate fp32 sum
    of g); torch: mm + sum, as its autograd does. Measures whether BGRADB costs more than the sum it saves (the
    suspect for the erf-GELU Linear trailing torch by ~4% on the H200, 2026-11-30). Outside the geomean groups."""
    import mixprec_ops
    from mixprec_ops.ops.matmul import matmul_and_rowsum

    dev = ctx.device

    def fused(backend):
        return lambda d: matmul_and_rowsum(d["g"].t(), d["x"], backend=backend)

    def separate(backend):
        return lambda d: (mixprec_ops.matmul(d["g"].t(), d["x"], backend=backend),
                          d["g"].sum(0, dtype=torch.float32).to(DTYPE))

    def base(d):
        return d["g"].t().mm(d["x"]), d["g"].sum(0)

    def build():
        d = _wgrad_make(m, k, n, dev, seed=12345)
        dw, db = d["g"].float().t() @ d["x"].float(), d["g"].float().sum(0)
        bw, bb = base(d)
        return {"d": d, "dw": dw, "db": db, "dw_err": _err(bw, dw), "db_err": _err(bb, db),
                "dw_scale": dw.abs().max().item(), "db_scale": db.abs().max().item()}

    def compare(impl, r):
        dw, db = impl.fn(r["d"])
        return (_within("dW", dw, r["dw"], r["dw_err"], r["dw_scale"], impl.backend)
                or _within("db", db, r["db"], r["db_err"], r["db_scale"], impl.backend))

    impls = [Impl(BASELINE, base, "g.t().mm(x), g.sum(0) (torch's Linear backward)")]
    if "cuda" in ctx.backends:  # the question is cuBLASLt's (Triton's matmul_and_rowsum is the GEMM and a sum)
        impls.append(Impl("cuda", fused("cuda"), "matmul_and_rowsum: one cuBLASLt GEMM with the BGRADB epilogue"))
        impls.append(Impl("cuda-gemm+sum", separate("cuda"), "matmul (cuBLASLt), then g.sum(0, dtype=float32)"))
    ref = []
    case = Case(
        "matmul",
        f"wgrad+bias grad M={m} {k}->{n}",
        n * k,
        2 * (m * n + m * k + n * k + n),
        lambda seed: _wgrad_make(m, k, n, dev, seed),
        impls,
        _memo_check(ref, build, compare),
        tensor_bytes=2 * (m * n + m * k),
        flops=2 * m * n * k,
        tags={"family": "wgrad", "m": m, "n": n, "k": k, "geomean": None, "target": None},
        reps=CASE_REPS,
        budget_s=CASE_BUDGET_S,
    )
    ref.append(case)
    return case


@register("matmul", time_budget_s=TIME_BUDGET_S)
def cases(ctx: Ctx) -> list[Case]:
    """In the order they run (if the time budget runs out, the last ones are skipped): the target groups' GEMMs,
    the Linear cases, then 4096^3."""
    mm, lin = grid(ctx)
    out = [_mm_case(ctx, m, k, n) for m, k, n in mm if _group(m, k, n)]
    out += [_lin_case(ctx, m, k, n, act) for m, k, n in lin for act in ACTIVATIONS]
    # Saved pre-activation (shipped) vs recomputed in the backward, same shapes, erf-GELU only: a GEMM (2MNK flops)
    # against writing and reading M x N 16-bit values; the time and memory trade-off, measured.
    out += [_lin_case(ctx, m, k, n, "gelu", recompute=True) for m, k, n in lin]
    out += [_wgrad_case(ctx, m, k, n) for m, k, n in lin]
    out += [_mm_case(ctx, m, k, n) for m, k, n in mm if not _group(m, k, n)]
    if ctx.device.type != "cuda":
        out[0].notes.append(
            "matmul on CPU: no CPU kernel (the fp32 reference serves CPU tensors), so only small torch cases run "
            "here (they check the bench's matmul cases); the grid and the targets are GPU-only"
        )
    else:
        out[0].notes.append(
            "matmul: bf16 operands as in nn.Linear (ours matmul(a, w.t()), torch F.linear(a, w)); TFLOP/s counts 2MNK "
            "(Linear fwd+bwd: 6MNK); %peak is of torch's bf16 matmul rate measured in this run"
        )
    return out

