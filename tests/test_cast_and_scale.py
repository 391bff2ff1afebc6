"""cast_and_scale: every kernel backend against the pure-torch reference, bit for bit.

Tolerance: none. The reference is torch's own arithmetic (fp32 product, then torch's round-to-nearest-even cast),
and each kernel does the same two roundings, so every element must match exactly (any NaN matches any NaN:
payload bits differ between CPU and GPU casts). Under the Triton interpreter too: environment.md notes that the
interpreter's native fp32->bf16 cast truncates and its fp8 casts differ from torch in 2-4% of elements, so the
Triton kernel rounds bf16 and fp8 in integer arithmetic (triton_kernels/fp_convert.py) and fp16 through the native
cast, which the interpreter does exactly; a 1-ulp allowance is therefore not needed and not granted. (Saturated fp8
on a GPU takes the hardware conversion instead: test_saturated_fp8_bits_match_torch_on_device.)
"""

import os

import pytest
import torch
from conftest import (
    CPU_ISAS,
    DEVICES,
    OpLog,
    assert_bit_exact,
    assert_lists_bit_exact,
    backend_params,
    bits,
    extension_backend,
    poison_allocator,
    run_fresh_process,
    wide_random,
)

import mixprec_ops
from mixprec_ops.ops import cast_and_scale_reference
from mixprec_ops.ops.cast_and_scale import cast_and_scale_backward, cast_and_scale_backward_reference

SOURCES = [torch.float32, torch.float16, torch.bfloat16]
TARGETS = [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
OP = "cast_and_scale"
SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 6e-8, 2.0**-140, 65504.0, 65520.0,
            448.0, 464.0, 470.0, 480.0, 57344.0, 61440.0, 3.4e38, -3.4e38, 1.0, -1.0]


def make_x(n, src, device, specials=True):
    hi = {torch.float16: 4.5}.get(src, 6.0)  # fp16 inputs mostly finite
    x = wide_random((n,), torch.float32, "cpu", lo=-9.0, hi=hi)
    if specials and n >= len(SPECIALS):
        idx = torch.randperm(n)[: len(SPECIALS)]
        x[idx] = torch.tensor(SPECIALS)
    return x.to(src).to(device)


def run(x, dtype, scale, amax, saturate, backend, device):
    poison_allocator(x.numel() * torch.empty((), dtype=dtype).element_size(), device)
    return mixprec_ops.cast_and_scale(x, dtype, scale, amax=amax, saturate=saturate, backend=backend)


def expected(x, dtype, scale, amax, saturate):
    s_t = scale if isinstance(scale, torch.Tensor) else None
    s_v = 1.0 if scale is None or s_t is not None else float(scale)
    return cast_and_scale_reference(x.cpu(), dtype, None if s_t is None else s_t.cpu(), s_v,
                                    None if amax is None else amax.cpu(), saturate)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("src", SOURCES, ids=str)
@pytest.mark.parametrize("dst", TARGETS, ids=str)
@pytest.mark.parametrize("n", [0, 1, 7, 1023, 65537])
def test_all_dtype_pairs_and_sizes(device, backend, src, dst, n):
    x = make_x(n, src, device)
    x_host, scale_t = x.cpu(), torch.tensor([2.75])
    got, want, labels = [], [], []  # read back and compared at the end (one transfer per element width: to_host)
    for scale, scale_host in ((None, None), (0.3712, 0.3712), (scale_t.to(device), scale_t)):
        for saturate in (True, False):
            amax = torch.full((1,), 0.125, device=device)
            amax_ref = torch.full((1,), 0.125)
            y = run(x, dst, scale, amax, saturate, backend, device)
            assert y.device == x.device
            what = f"{src}->{dst} n={n} scale={scale_host} saturate={saturate}"
            got += [y, amax]
            want += [expected(x_host, dst, scale_host, amax_ref, saturate), amax_ref]
            labels += [what, f"{what}: amax"]
    assert_lists_bit_exact(got, want, labels=labels)


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("src,dst", [(torch.float32, torch.float8_e4m3fn), (torch.bfloat16, torch.float8_e5m2),
                                     (torch.float16, torch.bfloat16)], ids=str)
def test_few_million(device, backend, src, dst):
    n = 3_000_017 if backend != "triton" or device != "cpu" else 400_003  # the interpreter is slow
    x = make_x(n, src, device)
    amax = torch.zeros(1, device=device)
    y = run(x, dst, torch.tensor([0.01], device=device), amax, True, backend, device)
    assert_bit_exact(y, expected(x, dst, torch.tensor([0.01]), torch.zeros(1), True))
    assert amax.item() == x.float().abs().amax().item() or amax.isnan().item()


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dst", TARGETS, ids=str)
def test_non_contiguous_inputs(device, backend, dst):
    base = make_x(67 * 45, torch.float32, device).reshape(67, 45)
    cases = {
        "transposed": base.t(),                                 # dense, permuted: read in place
        "permuted3d": base.reshape(67, 5, 9).permute(2, 0, 1),  # dense, permuted
        "sliced": base[:, 1::2],                                # gaps: copied first
        "offset": base.flatten()[3:3001],                       # storage offset (unaligned for vector loads)
        "expanded": base[:1].expand(4, 45),                     # overlapping
        "bf16_transposed": base.to(torch.bfloat16).t(),
    }
    for name, x in cases.items():
        amax, amax_ref = torch.zeros(1, device=device), torch.zeros(1)
        y = run(x, dst, 1.75, amax, True, backend, device)
        ref = expected(x, dst, 1.75, amax_ref, True)
        assert y.shape == x.shape
        if torch.ops.aten.is_non_overlapping_and_dense(x):
            assert y.stride() == x.stride(), f"{name}: output should keep x's layout"
        assert_bit_exact(y, ref, name)
        assert_bit_exact(amax, amax_ref, f"{name} amax")


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_amax_accumulates_across_calls(device, backend):
    amax = torch.zeros(1, device=device)
    xs = [make_x(1000 + 37 * i, torch.float32, device, specials=False) for i in range(4)]
    running = 0.0
    for x in xs:
        mixprec_ops.cast_and_scale(x, torch.float8_e4m3fn, 2.0, amax=amax, backend=backend)
        running = max(running, x.abs().max().item())
        assert amax.item() == running  # exact: max|x| is a value of x
    # A smaller tensor leaves it alone; a NaN makes it NaN (like torch.amax); NaN then stays.
    mixprec_ops.cast_and_scale(torch.full((5,), 1e-3, device=device), torch.float16, amax=amax, backend=backend)
    assert amax.item() == running
    mixprec_ops.cast_and_scale(torch.tensor([1.0, float("nan")], device=device), torch.float16, amax=amax,
                               backend=backend)
    assert amax.isnan().item()
    # An amax that starts negative (or at -inf) is simply replaced by max|x|.
    for start in (-1.0, float("-inf")):
        amax = torch.full((1,), start, device=device)
        mixprec_ops.cast_and_scale(xs[0], torch.bfloat16, amax=amax, backend=backend)
        assert amax.item() == xs[0].abs().max().item()


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_special_values(device, backend):
    x = torch.tensor(SPECIALS, device=device)
    for dst in TARGETS:
        for saturate in (True, False):
            assert_bit_exact(run(x, dst, None, None, saturate, backend, device), expected(x, dst, None, None, saturate),
                             f"{dst} saturate={saturate}")
    # Saturation rules, spelled out: finite overflow clamps; inf clamps for fp8 only; NaN stays NaN.
    y = mixprec_ops.cast_and_scale(torch.tensor([1e6, -1e6, float("inf"), float("nan")], device=device),
                                   torch.float8_e5m2, saturate=True, backend=backend).float().cpu()
    assert y[:3].tolist() == [57344.0, -57344.0, 57344.0] and y[3].isnan()
    y = mixprec_ops.cast_and_scale(torch.tensor([1e6, float("inf")], device=device), torch.float16,
                                   saturate=True, backend=backend).float().cpu()
    assert y.tolist() == [65504.0, float("inf")]
    y = mixprec_ops.cast_and_scale(torch.tensor([1e6], device=device), torch.float8_e5m2, saturate=False,
                                   backend=backend).float().cpu()
    assert y.tolist() == [float("inf")]


def fp8_probes(src: torch.dtype, dst: torch.dtype) -> torch.Tensor:
    """Inputs (CPU, dtype `src`) on every rule of c10's fp8 rounding for `dst`: each tie between adjacent fp8 values
    (0 and the smallest subnormal, subnormal/normal boundary, odd and even neighbours, the largest finite value and
    the first overflow) and the source values either side of it, negated too; then every fp32 whose bits are
    i << 13 (all signs and exponents with 10 leading mantissa bits: +-0, fp32 subnormals, overflow, +-inf, NaNs of
    both signs); then SPECIALS."""
    top = 0x7F if dst == torch.float8_e4m3fn else 0x7C  # first non-finite pattern
    fp8 = torch.arange(top, dtype=torch.uint8).view(dst).float()  # +0 up to the largest finite value
    ties = torch.cat([(fp8[:-1] + fp8[1:]) / 2, (fp8[-1:] * 3 - fp8[-2:-1]) / 2])  # exact in fp32 and fp16/bf16
    width = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[src]
    tb = ties.to(src).view(width)
    near = torch.cat([tb - 1, tb, tb + 1]).view(src)  # positive: bits +-1 is the next value down / up
    bits = torch.arange(1 << 19, dtype=torch.int64) << 13
    grid = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    return torch.cat([near, -near, grid.to(src), torch.tensor(SPECIALS).to(src)])


@pytest.mark.parametrize("device,backend", [p for p in backend_params(OP) if p.values[0] == "cuda"])
@pytest.mark.parametrize("src", SOURCES, ids=str)
@pytest.mark.parametrize("dst", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_saturated_fp8_bits_match_torch_on_device(device, backend, src, dst):
    """Saturated fp8, which both GPU kernels convert in hardware (CUDA on sm_89+, Triton on sm_90+): every byte, NaN
    included, equals torch's own (x * scale).clamp(-fmax, fmax).to(dst) computed on the same GPU. (The CPU kernel:
    test_fp8_nan_bytes_on_the_cpu_kernel.)"""
    x = fp8_probes(src, dst).to(device)
    scale = torch.tensor([1.0], device=device)
    fmax = torch.finfo(dst).max
    for name, xs in (("aligned", x), ("offset", x[1:])):  # offset: the CUDA kernel's one-element (VEC=1) path
        y = mixprec_ops.cast_and_scale(xs, dst, scale, amax=torch.zeros(1, device=device), backend=backend)
        ref = (xs.float() * scale).clamp(-fmax, fmax).to(dst)
        bad = (y.view(torch.uint8) != ref.view(torch.uint8)).nonzero().flatten().cpu()
        width = {4: torch.int32, 2: torch.int16}[xs.element_size()]
        xb, yb, rb = (t.cpu()[bad[:5]] for t in (xs.view(width), y.view(torch.uint8), ref.view(torch.uint8)))
        assert bad.numel() == 0, f"{src}->{dst} {name}: {bad.numel()} of {xs.numel()} differ, e.g. " + ", ".join(
            f"x bits {int(a) & (1 << 8 * xs.element_size()) - 1:#x}: got {int(g):#04x}, torch {int(r):#04x}"
            for a, g, r in zip(xb, yb, rb))


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("src", SOURCES, ids=str)
@pytest.mark.parametrize("dst", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_probes_on_the_cpu_kernel(src, dst, cpu_isa):
    """The C++ CPU kernel's fp8 rounding (the adder-based vector code of csrc/cpu/fp8_convert_avx2.h or
    fp8_convert_avx512.h, each checked offline on all 2^32 fp32 inputs by test_native_exhaustive.py) on every tie and
    rounding boundary of fp8_probes, saturated and not, with amax, aligned and shifted by one element (another split
    between the vector loops and the tail), against the reference bit for bit (NaN-blind, see
    test_saturated_fp8_bits_match_torch_on_device)."""
    backend = extension_backend(OP, "cpu")
    x = fp8_probes(src, dst)
    for name, xs in (("aligned", x), ("offset", x[1:])):
        for scale, saturate in ((None, True), (None, False), (0.75, True)):
            amax = torch.full((1,), 0.125)
            amax_ref = amax.clone()
            y = run(xs, dst, scale, amax, saturate, backend, "cpu")
            assert_bit_exact(y, expected(xs, dst, scale, amax_ref, saturate), f"{name} scale={scale} sat={saturate}")
            assert_bit_exact(amax, amax_ref, f"{name} amax")


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("dst", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_nan_bytes_on_the_cpu_kernel(dst, cpu_isa):
    """Every saturated fp8 byte of the C++ kernel equals torch's (x * scale).clamp(-fmax, fmax).to(dst), and a NaN's
    byte keeps the input NaN's sign: 0x7F for +NaN, 0xFF for -NaN. (torch does so from fp32, but its CPU widening
    of fp16 NaN makes every one +NaN and its bf16 rounding every one -NaN, so the sign is taken from the input's
    bits.) The kernel's 8-lane vector clamp used at::vec::maximum/minimum, which return the all-ones NaN: +NaN
    became 0xFF in the 8-element blocks between the 32-wide fused loop and the scalar tail (found by a user trial;
    the probe tests compare NaN-blind). Every length 1..72 with NaNs of both signs at every position class, and
    the probes."""
    backend = extension_backend(OP, "cpu")
    fmax = torch.finfo(dst).max
    nan = torch.tensor(float("nan"))
    for src in SOURCES:
        cases = [fp8_probes(src, dst), fp8_probes(src, dst)[1:]]
        for n in range(1, 73):
            x = torch.linspace(-600.0, 600.0, n)
            x[::3] = nan
            x[1::5] = -nan
            cases.append(x.to(src))
        for xs in cases:
            for scale in (1.0, 0.75):
                y = mixprec_ops.cast_and_scale(xs, dst, torch.tensor([scale]), amax=torch.zeros(1), backend=backend)
                ref = (xs.float() * scale).clamp(-fmax, fmax).to(dst).view(torch.uint8)
                sign = bits(xs) < 0
                ref = torch.where(xs.isnan(), torch.where(sign, 0xFF, 0x7F).to(torch.uint8), ref)
                bad = (y.view(torch.uint8) != ref).nonzero().flatten()
                assert bad.numel() == 0, (src, xs.numel(), scale, bad[:8].tolist(),
                                          y.view(torch.uint8)[bad[:4]].tolist(), ref[bad[:4]].tolist())


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("src,dst", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)], ids=str)
def test_cpu_large_16bit_outputs(src, dst, cpu_isa):
    """From 2^23 elements both code paths store 16-bit outputs past the cache (kCastStreamMin in csrc/cpu/prefetch.h;
    every task's 64-element blocks on AVX-512, 32-element ones on AVX2, then the ordinary tail). 2^23 + 45 elements
    (a task and a tail beyond the last block), read from an offset view, SPECIALS spread over it and a NaN in the
    last full task: the output and amax against the reference, bit for bit."""
    backend = extension_backend(OP, "cpu")
    n = (1 << 23) + 45
    x = make_x(n + 1, src, "cpu")[1:]
    x[n - 50] = float("nan")
    amax, amax_ref = torch.full((1,), 0.5), torch.full((1,), 0.5)
    y = run(x, dst, torch.tensor([0.625]), amax, True, backend, "cpu")
    assert_bit_exact(y, expected(x, dst, torch.tensor([0.625]), amax_ref, True), f"n={n}")
    assert_bit_exact(amax, amax_ref, "amax")


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("src", SOURCES, ids=str)
@pytest.mark.parametrize("dst", TARGETS, ids=str)
def test_cpu_kernel_lengths_and_tasks(src, dst, cpu_isa):
    """The CPU kernel's loops split each task's range into 64- and 16-element pieces and a masked tail (AVX-512), or
    32-element fused pieces (within 1024-element tiles for fp8 targets) and 8-wide and scalar tails (AVX2), and the
    tensor into 32768-element parallel tasks whose max|x| are combined: every length 1..130, lengths either side of
    one and two tasks, from an offset view (the same kernel on a pointer not 64-byte aligned) and a transposed one
    (walked in memory order); SPECIALS (infinities, NaN, values either side of each target's overflow) at random
    places from length 21 on. Outputs are poisoned first; the results and amax must equal the reference bit for bit,
    with a NaN, and separately an inf, placed in the last task only (a max|x| lost in the combination of tasks or in
    the tail shows)."""
    backend = extension_backend(OP, "cpu")
    gen = torch.Generator().manual_seed(15)
    specials = torch.tensor(SPECIALS)
    lengths = list(range(1, 131)) + [32767, 32768, 32769, 65536 + 63, 65536 + 64 + 15]
    for n in lengths:
        base = torch.rand(n + 1, generator=gen) * 1200 - 600
        if n >= len(SPECIALS):
            base[1 + torch.randperm(n, generator=gen)[: len(SPECIALS)]] = specials
        base = base.to(src)
        for view in ("offset", "last-nan", "last-inf"):
            x = base[1:].clone() if view != "offset" else base[1:]
            if view == "last-nan":
                x[-1] = float("nan")
            elif view == "last-inf":
                x[-1] = -float("inf")
            for scale, saturate in ((0.75, True), (None, False)):
                amax = torch.full((1,), 0.5)
                amax_ref = amax.clone()
                y = run(x, dst, scale, amax, saturate, backend, "cpu")
                what = f"n={n} {view} scale={scale} sat={saturate}"
                assert_bit_exact(y, expected(x, dst, scale, amax_ref, saturate), what)
                assert_bit_exact(amax, amax_ref, what + " amax")
    xt = (torch.rand(129, 257, generator=gen) * 900 - 450).to(src).t()  # walked in memory order, as x.t() is laid out
    amax, amax_ref = torch.zeros(1), torch.zeros(1)
    y = run(xt, dst, 2.0, amax, True, backend, "cpu")
    assert y.stride() == xt.stride()
    assert_bit_exact(y, expected(xt, dst, 2.0, amax_ref, True), "transposed")
    assert_bit_exact(amax, amax_ref, "transposed amax")


@pytest.mark.parametrize("device", DEVICES)
def test_reference_matches_float64_definition(device):
    """The oracle itself: its result is the dtype value nearest (ties to even) to the fp32 product, checked
    against float64 arithmetic for fp16 (whose neighbours are easy to enumerate)."""
    x = make_x(4099, torch.float32, device, specials=False) * 1e-2
    s = 0.7
    y = cast_and_scale_reference(x, torch.float16, None, s, None, False)
    prod = (x * torch.tensor(s, dtype=torch.float32, device=device)).double()
    err = (y.double() - prod).abs()
    finite = y.isfinite()
    # No other fp16 value is closer: the next fp16 up/down are at least as far.
    up = torch.nextafter(y, torch.full_like(y, float("inf"))).double()
    dn = torch.nextafter(y, torch.full_like(y, float("-inf"))).double()
    assert (err[finite] <= (up - prod).abs()[finite]).all() and (err[finite] <= (dn - prod).abs()[finite]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_extension_op(device):
    extension_backend(OP, device)
    x = make_x(300, torch.float32, device, specials=False).reshape(20, 15)  # opcheck compares NaN != NaN
    for args in [
        (x, torch.float8_e4m3fn, torch.tensor([0.5], device=device), 1.0, torch.zeros(1, device=device), True),
        (x.t(), torch.bfloat16, None, 3.0, None, False),
        (x.to(torch.float16), torch.float8_e5m2, None, 1.0, torch.zeros(1, device=device), True),
    ]:
        torch.library.opcheck(torch.ops.mixprec.cast_and_scale.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton_op(device):
    if mixprec_ops.backends.unavailable_reason(OP, "triton", torch.device(device)):
        pytest.skip("Triton cannot run here")
    from mixprec_ops.ops.cast_and_scale import _get_triton_op

    x = make_x(300, torch.float32, device, specials=False).reshape(20, 15)
    # Under the interpreter, fake-tensor tracing of a triton_op fails inside the interpreter (it touches the
    # storage); on a GPU the full check runs.
    utils = ("test_schema",) if device == "cpu" else ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(_get_triton_op(), (x, torch.float8_e4m3fn, torch.tensor([0.5], device=device), 1.0,
                                             torch.zeros(1, device=device), True), test_utils=utils)


_COMPILE_FIRST_CALL = """
import json, sys
import torch
import mixprec_ops

dev = sys.argv[1]
torch.manual_seed(0)
x = torch.randn(37, 19) * 300
x[0, 0], x[5, 7] = 2000.0, -3000.0  # saturating at scale 0.5 (|x| * 0.5 > 448): their gradient is 0 in every draw
x = x.to(dev)


def f(x, amax):
    return mixprec_ops.cast_and_scale(x, torch.float8_e4m3fn, 0.5, amax=amax, backend="triton")


compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
a1, a2 = torch.zeros(1, device=dev), torch.zeros(1, device=dev)
x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
got = compiled(x1, a1)  # the first Triton cast of this process, inside the trace
want = f(x2, a2)
g = torch.randn(37, 19, device=dev).to(torch.float8_e4m3fn)
got.backward(g)  # the Triton backward op, as the compiled graph's backward holds it
want.backward(g)
print("RESULT " + json.dumps({"equal": torch.equal(got.view(torch.uint8), want.view(torch.uint8)),
                              "amax": torch.equal(a1, a2) and a1.item() > 0,
                              "grad": torch.equal(x1.grad, x2.grad) and bool((x1.grad == 0).any())
                              and bool((x1.grad != 0).any())}))
"""


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_first_triton_call(device, tmp_path):
    """torch.compile(fullgraph=True) of a function whose Triton cast is the first of the process: the op is
    registered by the backend choice, which torch.compile calls instead of tracing (it refuses to trace
    torch.library's registration), the backward's op with it. A fresh process; bytes, amax and x's gradient (some
    elements saturated, some not) equal to the eager call's. On CPU under the interpreter the ops are opaque custom
    ops; a GPU traces the real triton_ops."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)")
    why = mixprec_ops.backends.unavailable_reason("cast_and_scale", "triton", torch.device(device))
    if why is not None:
        pytest.skip(why)
    res = run_fresh_process(_COMPILE_FIRST_CALL, device, cwd=tmp_path)
    assert res == {"equal": True, "amax": True, "grad": True}, res


@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + backend_params(OP))
@pytest.mark.parametrize("scale", [1e-40, -1e-40, 1e-38, 1e-46, 3.4e38, 3.4028236e38, 1e39, -1e300, -0.0],
                         ids=lambda s: f"{s!r}")
def test_python_scale_is_its_fp32_value_on_every_backend(device, backend, scale):
    """A Python float scale acts as its fp32 rounding (a subnormal, zero, or +-inf beyond fp32's range, as the fp32
    product x * scale would give) on every backend: the reference raised on overflow, the Triton interpreter on
    anything fp32 holds only as a subnormal or not at all, and dropped the sign of -0.0. Bit for bit (signed zeros
    included) against the reference with the same value as an fp32 tensor, which torch rounds the same way."""
    import numpy as np

    x = make_x(64, torch.float32, device)
    with np.errstate(over="ignore"):
        s32 = torch.from_numpy(np.array([scale], dtype=np.float32)).to(device)  # C's double -> float rounding
    for dst in (torch.bfloat16, torch.float8_e4m3fn):
        y = run(x, dst, scale, None, True, backend, device)
        assert_bit_exact(y, expected(x, dst, s32, None, True), f"{dst} scale={scale!r}")


@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + backend_params(OP))
@pytest.mark.parametrize("dst", [torch.bfloat16, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_same_on_every_backend(device, backend, dst, src):
    """cast_and_scale is differentiable on every backend, as the reference's own autograd (the cpu backend's op
    used to return an output whose backward left x.grad None, with a warning; Triton's raised): straight through
    the rounding, nothing through a saturated value (torch.clamp's rule). x's gradient bit for bit, signed zeros
    included (-0.0 grads of passing elements stay -0.0); the scale's (a sum over x) to fp32 summation-order
    accuracy. Some values saturate (|x * scale| > dtype's max)."""
    gen = torch.Generator().manual_seed(4)
    x0 = (torch.randn(300, generator=gen) * 100).to(src)
    x0[:4] = torch.tensor([1e6, -1e6, 3e38, 0.5]).to(src)  # 3e38 * 3 overflows: inf (kept by a 16-bit target)
    g = torch.randn(300, generator=gen)
    g[[0, 3, 7, 11]] = -0.0  # a saturated element's and passing elements'
    g = g.to(dst)
    for scale_kind in ("tensor", "float"):
        x = x0.clone().to(device).requires_grad_(True)
        s = torch.tensor([3.0], device=device, requires_grad=True) if scale_kind == "tensor" else 3.0
        y = mixprec_ops.cast_and_scale(x, dst, s, saturate=True, backend=backend)
        y.backward(g.to(device))
        xr = x0.clone().requires_grad_(True)
        sr = torch.tensor([3.0], requires_grad=True) if scale_kind == "tensor" else None
        yr = cast_and_scale_reference(xr, dst, sr, 3.0, None, True)
        yr.backward(g)
        assert_bit_exact(y.detach(), yr.detach(), "y")
        assert_bit_exact(x.grad, xr.grad, f"x.grad ({scale_kind} scale)")
        if dst == torch.float8_e4m3fn:
            assert (x.grad[:3] == 0).all() and (x.grad[3:] != 0).any()  # saturated: no gradient
        if scale_kind == "tensor":
            torch.testing.assert_close(s.grad.cpu(), sr.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + backend_params(OP))
@pytest.mark.parametrize("dst", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16], ids=str)
def test_gradient_at_the_saturation_boundary(device, backend, dst):
    """x * scale equal to +-max (a value the saturation leaves unchanged) passes its gradient, the fp32 value just
    beyond gets none, on every backend and in the reference's autograd, under any torch: torch.clamp's own gradient
    at a bound is 1 in torch 2.11 and 0 in 2.14, which the reference once followed (ours: always 1)."""
    fmax = torch.tensor(torch.finfo(dst).max)
    beyond = torch.nextafter(fmax, torch.tensor(float("inf")))
    x0 = torch.stack([fmax, -fmax, beyond, -beyond, torch.tensor(1.0)])
    x = x0.clone().to(device).requires_grad_(True)
    y = mixprec_ops.cast_and_scale(x, dst, torch.ones(1, device=device), saturate=True, backend=backend)
    y.backward(torch.ones(5, device=device).to(dst))
    xr = x0.clone().requires_grad_(True)
    cast_and_scale_reference(xr, dst, torch.ones(1), 1.0, None, True).backward(torch.ones(5).to(dst))
    assert x.grad.tolist() == xr.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0], (x.grad, xr.grad)


@pytest.mark.parametrize("dst", [torch.float8_e4m3fn, torch.bfloat16], ids=str)
def test_backward_is_one_op(dst):
    """x's gradient is one pass, the fused op on the forward's backend (it was 5-8 eager passes: the product, abs,
    compare, select and scaled store, plus the fp32 copy of an fp8 grad); nothing else but autograd's detach. The
    values are test_backward_kernels_match_reference's."""
    x = (torch.randn(64, 33) * 100).bfloat16().requires_grad_(True)
    y = mixprec_ops.cast_and_scale(x, dst, torch.tensor([3.0]), backend="cpu")
    g = torch.randn(64, 33).to(dst)
    with OpLog() as log:
        y.backward(g)
    assert [op for op in log.ops if op != "aten.detach.default"] == ["mixprec.cast_and_scale_backward.default"], \
        log.ops


GRAD_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def make_grad(n, dtype, device):
    """Random grads of `dtype`; fp8 ones hold every one of the 256 bit patterns (NaN, zeros and subnormals among
    them) in a random order, so each element value is read somewhere; the wider ones get inf and NaN too."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        g = torch.arange(256, dtype=torch.uint8).repeat(n // 256 + 1)[torch.randperm(256 * (n // 256 + 1))][:n]
        return g.view(dtype).to(device)
    g = wide_random((n,), torch.float32, "cpu", lo=-6.0, hi=4.0)
    if n >= 8:
        g[torch.randperm(n)[:3]] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    return g.to(dtype).to(device)


def run_backward(g, x, dst, scale, saturate, backend, device):
    poison_allocator(x.numel() * x.element_size(), device)
    return cast_and_scale_backward(g, x, dst, scale, saturate=saturate, backend=backend)


def expected_backward(g, x, dst, scale, saturate):
    s_t = scale.cpu() if isinstance(scale, torch.Tensor) else None
    s_v = 1.0 if scale is None or s_t is not None else float(scale)
    return cast_and_scale_backward_reference(g.cpu(), x.cpu(), dst, s_t, s_v, saturate)


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("src", SOURCES, ids=str)
@pytest.mark.parametrize("dst", TARGETS, ids=str)
def test_cpu_backward_lengths_and_paths(src, dst, cpu_isa):
    """The CPU backward on each code path (AVX2 loop with a 16-wide body, an 8-wide step and a scalar tail;
    AVX-512 with 16 lanes, a masked tail and fp8 grads widened by arithmetic): lengths either side of each vector
    width and of one and two parallel tasks, every grad dtype (every fp8 bit pattern from 256 elements on), a tensor
    scale, a scale of 1 (from 21 elements on, x holds SPECIALS: the fp8 and fp16 largest finite values, which must
    pass, as |x * s| <= fmax) and a negative float one (the sign of the zeros where saturated), saturate on and off;
    outputs poisoned first, bit for bit against the reference."""
    backend = extension_backend(OP, "cpu")
    torch.manual_seed(152)
    for n in (1, 2, 15, 16, 17, 31, 33, 1037, 32769, 65553):
        x = make_x(n, src, "cpu")
        for gd in GRAD_DTYPES:
            g = make_grad(n, gd, "cpu")
            for scale in (torch.tensor([2.75]), 1.0, -3.0):
                for saturate in (True, False):
                    got = run_backward(g, x, dst, scale, saturate, backend, "cpu")
                    assert_bit_exact(got, expected_backward(g, x, dst, scale, saturate),
                                     f"n={n} grad {gd} scale {scale} saturate {saturate}")


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("src,gd", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float8_e4m3fn)], ids=str)
def test_cpu_backward_large_outputs(src, gd, cpu_isa):
    """From 2^23 elements the backward stores grad_x past the cache (kCastStreamMin in csrc/cpu/prefetch.h): in each
    parallel task, ordinary stores up to grad_x's first 64-byte boundary (AVX-512: vectors, then a masked one;
    AVX2: two vectors, one, then scalars), whole lines streamed, then the ordinary tail. Two threads (pinned here),
    so the second task starts (n + 1) // 2 elements in: n = 2^23 + 45 gives a head of 9 elements (fp32 and 16-bit x
    alike), n = 2^23 + 1 one of 15 (fp32) or 31 (16-bit). Bit for bit against the reference. Outputs this large are
    fresh zero pages (glibc maps them: poison_allocator cannot reach them), so the scale is negative: a saturated
    element is then -0.0, and the expected output holds +0.0 only where the grad is -0.0 (1 fp8 pattern in 256), so
    an element left unwritten (+0.0) fails the comparison."""
    backend = extension_backend(OP, "cpu")
    torch.manual_seed(153)
    dst = torch.float8_e4m3fn if gd == torch.float8_e4m3fn else torch.bfloat16
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in ((1 << 23) + 45, (1 << 23) + 1):
            x = make_x(n, src, "cpu")
            g = make_grad(n, gd, "cpu")
            want = expected_backward(g, x, dst, torch.tensor([-0.625]), True)
            zeros = (want.view(torch.int16 if want.element_size() == 2 else torch.int32) == 0).float().mean().item()
            assert zeros < 0.005, zeros
            got = run_backward(g, x, dst, torch.tensor([-0.625]), True, backend, "cpu")
            assert_bit_exact(got, want, f"n={n}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("src", SOURCES, ids=str)
@pytest.mark.parametrize("dst", TARGETS, ids=str)
def test_backward_kernels_match_reference(device, backend, src, dst):
    """The fused backward, bit for bit against the reference (no tolerance: each element is one fp32 product
    g * scale, or a zero times it where the saturation changed x * scale, rounded once into x's dtype by torch's
    own rounding; the kernels convert the grad exactly, fp8 included, and round the same way). Every grad dtype
    (autograd hands back y's; the op takes fp32 too), x with inf, NaN and values that saturate, grads with every fp8
    bit pattern or with inf and NaN, a tensor scale, a Python float one and a negative one (the zeros' sign),
    saturate on and off. n = 1037 leaves a tail after every vector width. Triton on a GPU takes the grad of y's dtype
    (autograd's) and fp32 only: each grad dtype is another compiled variant (~120 in all would cost bench/gpu_check
    a minute or two of its test time; tests/test_triton_compile.py compiles every grad kind for sm_80/sm_90)."""
    n = 1037
    x = make_x(n, src, device)
    x_host, scale_t = x.cpu(), torch.tensor([2.75])
    grad_dtypes = [dst, torch.float32] if (device, backend) == ("cuda", "triton") else GRAD_DTYPES
    got, want, labels = [], [], []  # read back and compared at the end (one transfer: to_host)
    mixed = []  # where saturated (zero) and passing elements must both be met: e4m3 at the float scale, saturating
    for gd in grad_dtypes:
        g = make_grad(n, gd, device)
        g_host = g.cpu()
        for scale, scale_host in ((scale_t.to(device), scale_t), (0.3712, 0.3712), (-3.0, -3.0)):
            for saturate in (True, False):
                out = run_backward(g, x, dst, scale, saturate, backend, device)
                assert out.device == x.device
                got.append(out)
                want.append(expected_backward(g_host, x_host, dst, scale_host, saturate))
                labels.append(f"grad {gd}, scale {scale_host}, saturate {saturate}")
                if saturate and scale_host == 0.3712 and dst == torch.float8_e4m3fn:
                    mixed.append(len(want) - 1)
    assert_lists_bit_exact(got, want, labels=labels)
    assert len(mixed) == (len(grad_dtypes) if dst == torch.float8_e4m3fn else 0)
    for i in mixed:  # (want: the kernel's output has its bits, checked just now)
        assert (want[i] == 0).any() and (want[i] != 0).any(), labels[i]


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("n", [0, 1, 7, 65537])
def test_backward_sizes(device, backend, n):
    """Empty, a lone tail element, fewer than one vector, several blocks plus a tail."""
    x = make_x(n, torch.bfloat16, device)
    g = make_grad(n, torch.float8_e4m3fn, device)
    for s in (torch.tensor([0.75], device=device), 1.0):
        got = run_backward(g, x, torch.float8_e4m3fn, s, True, backend, device)
        assert_bit_exact(got, expected_backward(g, x, torch.float8_e4m3fn, s, True), f"n={n}")


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_backward_layouts(device, backend):
    """x and grad_y of any layout, read where they lie when they share one memory order (a transposed x with a
    grad laid out like it: the output keeps x's strides, as autograd's grads of y do), else both copied contiguous
    first: a transposed grad of a contiguous x, a grad expanded from one value (y.sum().backward()), a strided
    slice, a 0-dim x. The output's layout is what the fake (meta) implementation says."""
    base = make_x(40 * 30, torch.bfloat16, device).reshape(40, 30)
    xt = base.t()  # (30, 40), dense, transposed
    cases = [
        ("transposed x, grad alike", xt, make_grad(1200, torch.bfloat16, device).reshape(40, 30).t()),
        ("contiguous x, transposed grad", xt.contiguous(), make_grad(1200, torch.bfloat16, device).reshape(40, 30).t()),
        ("expanded grad", xt, torch.tensor(1.5, dtype=torch.bfloat16, device=device).expand(30, 40)),
        ("strided slices", base[::2, 1::3], make_grad(1200, torch.bfloat16, device).reshape(40, 30)[1::2, ::3]),
        ("0-dim", base[3, 4], make_grad(1, torch.bfloat16, device).reshape(())),
    ]
    for what, x, g in cases:
        got = run_backward(g, x, torch.float8_e4m3fn, 0.75, True, backend, device)
        assert_bit_exact(got, expected_backward(g, x, torch.float8_e4m3fn, 0.75, True), what)
        with torch._subclasses.FakeTensorMode() as mode:
            fake = torch.ops.mixprec.cast_and_scale_backward(mode.from_tensor(g), mode.from_tensor(x),
                                                             torch.float8_e4m3fn, None, 0.75, True)
        assert got.stride() == fake.stride(), (what, got.stride(), fake.stride())
    assert run_backward(*cases[0][1:][::-1], torch.float8_e4m3fn, 0.75, True, backend, device).stride() == xt.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_ops(device):
    extension_backend(OP, device)
    # no fp8 grad: opcheck's own schema check multiplies the inputs, which torch cannot do for fp8 (the kernel
    # tests cover fp8 grads); no NaN: opcheck compares NaN != NaN
    x = make_x(300, torch.bfloat16, device, specials=False).reshape(20, 15)
    g = make_grad(300, torch.float8_e5m2, device).reshape(20, 15).float().nan_to_num(0.5)
    cases = [(g.half(), x, torch.float8_e5m2, torch.tensor([0.5], device=device), 1.0, True),
             (g.t(), x.t(), torch.float16, None, 3.0, False),
             (g, x.float(), torch.bfloat16, None, 1e30, True)]
    for args in cases:
        torch.library.opcheck(torch.ops.mixprec.cast_and_scale_backward.default, args)
    if mixprec_ops.backends.unavailable_reason(OP, "triton", torch.device(device)) is None:
        from mixprec_ops.ops.cast_and_scale import _get_triton_op

        _get_triton_op()
        from mixprec_ops.ops.cast_and_scale import _triton_backward_op

        utils = ("test_schema",) if device == "cpu" else ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(_triton_backward_op, cases[0], test_utils=utils)


@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + backend_params(OP))
def test_backward_bad_inputs(device, backend):
    """Clear errors naming the argument, from the public function and (C++ checks) from the raw op."""
    x = make_x(12, torch.float32, device).reshape(3, 4)
    g = make_grad(12, torch.bfloat16, device).reshape(3, 4)
    bad = [
        (dict(g=g.to(torch.int32)), TypeError, "grad_y must be float32"),
        (dict(g=g.double()), TypeError, "grad_y must be float32"),
        (dict(g=g.reshape(4, 3)), ValueError, "grad_y must have x's shape .3, 4."),
        (dict(g=g.to("meta")), ValueError, "grad_y must be on"),
        (dict(x=x.to(torch.int32)), TypeError, "x must be float32"),
        (dict(dst=torch.float32), TypeError, "dtype must be one of"),
        (dict(scale=torch.ones(2, device=device)), ValueError, "scale must have exactly 1 element"),
        (dict(scale=torch.ones(1, dtype=torch.float64, device=device)), TypeError, "scale must be a float32"),
    ]
    for kw, exc, msg in bad:
        a = dict(g=g, x=x, dst=torch.bfloat16, scale=None) | kw
        with pytest.raises(exc, match=msg):
            cast_and_scale_backward(a["g"], a["x"], a["dst"], a["scale"], backend=backend)
    if backend in ("cpu", "cuda"):
        raw = torch.ops.mixprec.cast_and_scale_backward
        for kw, _, msg in bad[:3] + bad[4:]:
            a = dict(g=g, x=x, dst=torch.bfloat16, scale=None) | kw
            with pytest.raises(RuntimeError, match=msg.replace(" one of", "")):
                raw(a["g"], a["x"], a["dst"], a["scale"], 1.0, True)


@pytest.mark.parametrize("shape", [(), (37,)], ids=["0-dim", "1-D"])
@pytest.mark.parametrize("dst", [torch.bfloat16, torch.float16], ids=str)
def test_gradients_with_create_graph_and_0dim(shape, dst):
    """The paths the bit-exact gradient test does not take: create_graph=True (grad_x as differentiable ops) with
    second-order gradients, and a 0-dim x (whose 0-dim scale does not promote): the reference's own autograd's
    values, first and second order. As in test_gradients_same_on_every_backend: x's and grad_y's gradients bit
    for bit, the scale's (a sum over x; a saturated element's zero may carry the other sign) to rtol 1e-6. Some
    values saturate."""
    gen = torch.Generator().manual_seed(6)
    x0 = (torch.randn(shape, generator=gen) * 3e4).to(torch.bfloat16)
    g0 = torch.randn(shape, generator=gen).to(dst)
    results = []
    for fn in (lambda x, s: mixprec_ops.cast_and_scale(x, dst, s),
               lambda x, s: cast_and_scale_reference(x, dst, s, 1.0, None, True)):
        x, s = x0.clone().requires_grad_(True), torch.tensor([3.0], requires_grad=True)
        g = g0.clone().requires_grad_(True)
        gx, gs = torch.autograd.grad(fn(x, s), [x, s], g, create_graph=True)
        ggx, ggs, ggg = torch.autograd.grad((gx.float() * 1.5).sum() + gs.sum(), [x, s, g], allow_unused=True)
        results.append(dict(gx=gx, gs=gs, ggx=ggx, ggs=ggs, ggg=ggg))
    ours, ref = results
    for k in ("gx", "ggx", "ggg"):
        assert_bit_exact(ours[k].detach(), ref[k].detach(), k)
    for k in ("gs", "ggs"):
        torch.testing.assert_close(ours[k].detach(), ref[k].detach(), rtol=1e-6, atol=0)


def test_gradients_under_compile_fullgraph():
    """torch.compile(fullgraph=True) of a differentiable cast (Dynamo traces the autograd.Function's forward(ctx)
    and backward) gives eager's output and gradients bit for bit."""
    torch._dynamo.reset()
    x = (torch.randn(61, generator=torch.Generator().manual_seed(5)) * 300).to(torch.bfloat16)
    s = torch.tensor([2.0])

    def f(x, s):
        return mixprec_ops.cast_and_scale(x, torch.float8_e4m3fn, s).float().sum()

    out = {}
    for name, fn in (("eager", f), ("compiled", torch.compile(f, fullgraph=True, backend="aot_eager"))):
        xg, sg = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
        y = fn(xg, sg)
        y.backward()
        out[name] = (y.detach(), xg.grad, sg.grad)
    assert (out["eager"][1] == 0).any() and (out["eager"][1] != 0).any()  # saturated and passing elements
    for a, b in zip(out["eager"], out["compiled"], strict=True):
        assert_bit_exact(b, a, "compiled vs eager")


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_inductor_compiles_casts_without_amax(device, backend):
    """torch.compile's default backend, Inductor, failed on every cast without amax ("getitem is not an
    OpOverload": torch's Inductor mishandles a custom op whose mutable Optional[Tensor] argument is None, torch 2.11
    and 2.14; bench/NOTES.md has a pure-torch reproduction), so a model casting without amax could not be compiled
    (tests used backend="aot_eager" only). Compiled with Inductor: y, amax and x's gradient (through the fused
    backward) equal eager's, bit for bit; with and without amax. On a GPU Inductor traces the Triton ops through
    wrap_triton, and calls the CUDA ones."""
    torch._dynamo.reset()
    x0 = (torch.randn(37, 19, generator=torch.Generator().manual_seed(8)) * 300).to(torch.bfloat16).to(device)
    g = torch.randn(37, 19).to(torch.float8_e4m3fn).to(device)

    def f(x, amax):
        return mixprec_ops.cast_and_scale(x, torch.float8_e4m3fn, 0.5, amax=amax, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    for with_amax in (False, True):
        out = []
        for fn in (f, compiled):
            x = x0.clone().requires_grad_(True)
            amax = torch.zeros(1, device=device) if with_amax else None
            y = fn(x, amax)
            y.backward(g)
            out.append((y.detach(), amax, x.grad))
        (ye, ae, ge), (yc, ac, gc) = out
        assert_bit_exact(yc, ye, f"y (amax {with_amax})")
        assert_bit_exact(gc, ge, f"x.grad (amax {with_amax})")
        assert (ge == 0).any() and (ge != 0).any()  # saturated and passing elements
        if with_amax:
            assert torch.equal(ac, ae) and ae.item() > 0


@pytest.mark.parametrize("compiler", [None, "aot_eager", "inductor"])
def test_gradient_uses_the_scale_of_its_forward(compiler):
    """A scale tensor rewritten in place after the cast and before backward (what an fp8 recipe's update() does):
    x's gradient uses the forward's scale. Eager autograd raised a version-counter error; compiled, the backward
    read the new scale, silently (torch's partitioner moved the saved copy of the scale into the backward graph,
    behind the in-place update: hence the opaque mixprec::scale_snapshot). Bit for bit against no rewrite."""
    torch._dynamo.reset()
    x0 = (torch.randn(33, generator=torch.Generator().manual_seed(9)) * 1000).to(torch.bfloat16)

    def f(x, s, rewrite):
        y = mixprec_ops.cast_and_scale(x, torch.float8_e4m3fn, s, backend="cpu").float().sum()
        if rewrite:
            s.mul_(7.0)
        return y

    fn = f if compiler is None else torch.compile(f, backend=compiler)
    grads = []
    for rewrite in (False, True):
        x, s = x0.clone().requires_grad_(True), torch.tensor([0.5])
        fn(x, s, rewrite).backward()
        assert s.item() == (3.5 if rewrite else 0.5)
        grads.append(x.grad)
    assert_bit_exact(grads[1], grads[0], "x.grad")
    assert (grads[0] == 0).any() and (grads[0] != 0).any()  # saturated and passing elements


def test_compiled_torch_func_grad_and_the_raw_op():
    """torch.compile of torch.func.grad through cast_and_scale gave a zero gradient, silently (torch's default
    autograd fallback for the raw op, which the compiled transform reached): the ops now carry an autograd kernel
    that fails at backward, naming the op. The compiled transform then gives eager's gradient (torch 2.14: Dynamo
    falls back to eager) or raises naming the op (torch 2.11: Dynamo fails while tracing); never zeros."""
    x = torch.tensor([1.0, -2.0, 1000.0, 0.5, -3.25])
    f = lambda x: mixprec_ops.cast_and_scale(x, torch.float8_e4m3fn, 3.0, saturate=True).float().sum()  # noqa: E731
    eager = torch.func.grad(f)(x)
    assert torch.equal(eager, torch.tensor([3.0, 3.0, 0.0, 3.0, 3.0]))  # 1000 * 3 saturates: no gradient
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mixprec::cast_and_scale", "Autograd"):
        pytest.xfail("this build registers no autograd kernel for the raw ops (the stable-ABI build has no way to "
                     "register torch's not-implemented kernel): compiled torch.func.grad still gives zeros there")
    torch._dynamo.reset()
    try:
        got = torch.compile(torch.func.grad(f), backend="aot_eager")(x)
    except Exception as e:  # noqa: BLE001  (torch 2.11's Dynamo traces into the raw op and raises; 2.14 runs eager)
        assert "derivative for mixprec::cast_and_scale is not implemented" in str(e), e
    else:
        assert torch.equal(got, eager)
    if mixprec_ops.backends.unavailable_reason(OP, "cpu", torch.device("cpu")) is None:
        xr = x.clone().requires_grad_(True)
        y = torch.ops.mixprec.cast_and_scale(xr, torch.bfloat16, None, 2.0, None, False)
        with pytest.raises(RuntimeError, match="derivative for mixprec::cast_and_scale is not implemented"):
            y.float().sum().backward()


def test_amax_may_not_alias_x_or_scale():
    """amax is written while x and scale are read: an overlap gave backend-dependent results (the reference
    updates amax first); refused, naming both. Disjoint parts of one buffer are fine."""
    buf = torch.rand(10) + 1
    with pytest.raises(ValueError, match="amax must not share memory with x"):
        mixprec_ops.cast_and_scale(buf, torch.bfloat16, amax=buf[:1])
    s = torch.ones(1)
    with pytest.raises(ValueError, match="amax must not share memory with scale"):
        mixprec_ops.cast_and_scale(buf, torch.bfloat16, s, amax=s)
    amax = buf[9:]
    y = mixprec_ops.cast_and_scale(buf[:9], torch.bfloat16, amax=amax)
    assert y.shape == (9,) and amax.item() == max(buf[9].item(), buf[:9].max().item())


def test_torch_func_transforms_run_the_reference():
    """Under torch.func (vmap of grad: per-sample gradients) cast_and_scale runs the reference, whose own autograd
    every transform supports (the autograd.Function has no vmap rule)."""
    x = torch.randn(4, 6)
    per_row = torch.func.vmap(torch.func.grad(
        lambda r: mixprec_ops.cast_and_scale(r, torch.bfloat16, 3.0).float().sum()))(x)
    assert torch.equal(per_row, torch.full((4, 6), 3.0))


@pytest.mark.parametrize("device", DEVICES)
def test_extension_kernel_bumps_amax_version(device):
    """The C++ / CUDA cast_and_scale moves amax's version counter by one a call (it writes amax in place; csrc/common.h
    VersionBump), as torch's in-place ops do, and not x's or scale's; without amax nothing moves; a refused call
    (an unsupported target) moves none."""
    backend = extension_backend(OP, device)
    x = make_x(1000, torch.float32, device)
    scale, amax = torch.tensor([0.5], device=device), torch.zeros(1, device=device)
    before = (x._version, scale._version, amax._version)
    mixprec_ops.cast_and_scale(x, torch.bfloat16, scale, amax=amax, backend=backend)
    assert (x._version, scale._version, amax._version) == (before[0], before[1], before[2] + 1)
    mixprec_ops.cast_and_scale(x, torch.float8_e4m3fn, scale, backend=backend)
    with pytest.raises((RuntimeError, TypeError, ValueError), match="dtype"):
        torch.ops.mixprec.cast_and_scale(x, torch.int8, scale, 1.0, amax, True)
    assert (x._version, scale._version, amax._version) == (before[0], before[1], before[2] + 1)
