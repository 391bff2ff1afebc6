"""matmul: every backend (the fp32 "torch" reference; Triton: on CPU under the interpreter, on a GPU in
bench/gpu_check; the cuBLASLt "cuda" backend, on a GPU only) against a float64 product.

Tolerance: the max |error| vs the fp64 result may be at most 2x the max |error| of torch's own computation in the
operand dtype (torch.matmul in fp16/bf16, then bias and activation in that dtype), plus a floor of 1e-6 x max|exact|
for the cases where torch's own error happens to be 0. Both round the output once to the operand dtype; we
accumulate in fp32 and apply the epilogue before that one rounding, so we should be as good or better; 2x leaves
room for a different summation order. For out_dtype=float32 the bound is torch's low-precision error (ours is far
smaller), and a second, absolute bound that a single 16-bit rounding anywhere would break: the worst-case fp32
accumulation error 2 (K + 2) u (|a| @ |b| + |bias|) (u = 2^-24; 16-bit products are exact in fp32; the factor 2
allows a tensor-core adder that truncates), times 1.13 (the steepest slope of the activations), plus 8 u of the
exact output and of the exact pre-activation (the activation's own error; erf's 1 + erf(x) cancels for x << 0).

What the interpreter cannot show: the bf16 tensor-core path (bf16 tiles are upcast to fp32 before tl.dot under the
interpreter, whose bf16 tl.dot is wrong), the autotuned configs and the CUDA-graph-capture branch (one fixed
16x16x16 config is used); those run on a GPU through the cuda-triton parameters. The cuda-cuda parameters and the
test_cuda_* tests (cuBLASLt: every epilogue mapping, its fp32 fallback path, the pre-activation and row-sum variants,
poisoned outputs, graph capture, direct calls with bad inputs) run on a GPU only.
"""

import json
import os

import pytest
import torch
from conftest import HAS_CUDA, backend_params, extension_backend, poison_allocator, run_fresh_process

import mixprec_ops
from mixprec_ops.ops.matmul import apply_activation, matmul_and_rowsum, matmul_reference, matmul_with_preactivation

OP = "matmul"
DTYPES = [torch.float16, torch.bfloat16]
ACTS = [None, "relu", "gelu", "gelu_tanh", "silu"]


def matmul_params():
    """(device, backend): the reference on CPU (and CUDA), Triton wherever it can run, cuBLASLt ("cuda") on CUDA
    (else skipped with why). There is no CPU kernel of our own: CPU tensors get the reference."""
    out = [pytest.param("cpu", "torch", id="cpu-torch"),
           pytest.param("cuda", "torch", id="cuda-torch", marks=pytest.mark.skipif(
               not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)"))]
    return out + [p for p in backend_params(OP) if p.values[1] in ("cuda", "triton")]


PARAMS = matmul_params()


def check(y, a, b, bias=None, act=None, out_dtype=None, what=""):
    out_dtype = a.dtype if out_dtype is None else out_dtype
    exp_shape = (*a.shape[:-1], b.shape[1])
    assert y.shape == exp_shape and y.dtype == out_dtype and y.device == a.device, (y.shape, y.dtype, y.device)
    exact = a.double().cpu() @ b.double().cpu()
    if bias is not None:
        exact = exact + bias.double().cpu()
    exact = apply_activation(exact, act)
    base = torch.matmul(a, b)
    if not base.isfinite().all() and exact.isfinite().all():
        # torch's own error from contiguous copies: torch 2.14's CPU bf16 GEMM (seen on a Xeon with AVX-512 BF16; not
        # 2.11's) reads a row-major a past its K columns, multiplying what it finds there by 0, so a view into a
        # NaN-filled buffer (test_operands_inside_nan_padding) comes out NaN; finite values there do no harm
        base = torch.matmul(a.contiguous(), b.contiguous())
    if bias is not None:
        base = base + bias.to(a.dtype)
    base = apply_activation(base, act)
    err = (y.double().cpu() - exact).abs().max().item() if y.numel() else 0.0
    base_err = (base.double().cpu() - exact).abs().max().item() if y.numel() else 0.0
    floor = 1e-6 * exact.abs().max().item() if y.numel() else 0.0
    assert y.isfinite().all()
    assert err <= 2 * base_err + floor, f"{what}: max error {err:.3g} > 2 x torch's {base_err:.3g} (+{floor:.2g})"
    if out_dtype == torch.float32 and y.numel():
        check_fp32_accuracy(y, a, b, bias, exact, what)


def check_fp32_accuracy(y, a, b, bias, exact, what):
    """fp32 output: within the fp32 bound of the module docstring (no 16-bit rounding on the way)."""
    u = 2.0 ** -24
    mag = a.double().abs().cpu() @ b.double().abs().cpu()
    pre = a.double().cpu() @ b.double().cpu()
    if bias is not None:
        mag = mag + bias.double().abs().cpu()
        pre = pre + bias.double().cpu()
    bound = 1.13 * 2 * (a.shape[-1] + 2) * u * mag + 8 * u * (exact.abs() + pre.abs())
    excess = ((y.double().cpu() - exact).abs() - bound).max().item()
    assert excess <= 0, f"{what}: fp32 output off by {excess:.3g} more than the fp32 accumulation bound"


def rand(*shape, dtype, device):
    return torch.randn(*shape, dtype=torch.float32).to(dtype).to(device)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 37, 19), (5, 3, 1), (33, 17, 45), (70, 50, 90), (16, 32, 48)])
def test_shapes(device, backend, dtype, m, n, k):
    a, b = rand(m, k, dtype=dtype, device=device), rand(k, n, dtype=dtype, device=device)
    check(mixprec_ops.matmul(a, b, backend=backend), a, b, what=f"{m}x{n}x{k}")
    bias = rand(n, dtype=dtype, device=device)
    check(mixprec_ops.matmul(a, b, bias=bias, backend=backend), a, b, bias, what=f"{m}x{n}x{k} bias")


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_epilogue(device, backend, dtype, act, out_dtype):
    a, b = rand(19, 40, dtype=dtype, device=device), rand(40, 23, dtype=dtype, device=device)
    bias = rand(23, dtype=torch.float32, device=device)  # an fp32 bias is accepted as is
    y = mixprec_ops.matmul(a, b, bias=bias, activation=act, out_dtype=out_dtype, backend=backend)
    if out_dtype in (None, dtype, torch.float32):
        check(y, a, b, bias, act, out_dtype, what=f"{act} -> {out_dtype}")
    else:  # cross 16-bit out dtype: compare with the reference (one rounding of the same fp32 value, +- 1 ulp)
        ref = matmul_reference(a.cpu(), b.cpu(), bias.cpu(), act, out_dtype)
        assert y.dtype == out_dtype
        torch.testing.assert_close(y.cpu().float(), ref.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(device, backend, dtype):
    m, n, k = 21, 18, 35
    a_t = rand(k, m, dtype=dtype, device=device).t()       # transposed a: stride (1, m)
    b_t = rand(n, k, dtype=dtype, device=device).t()       # transposed b (weight.t())
    big_a = rand(2 * m, 3 * k, dtype=dtype, device=device)
    big_b = rand(2 * k, n + 5, dtype=dtype, device=device)
    a_s, b_s = big_a[::2, 1::3], big_b[::2, 2:2 + n]         # strided slices with offsets
    bias = rand(n, dtype=dtype, device=device)
    b_rows = rand(k, n, dtype=dtype, device=device)          # row-major b
    for name, a, b in [("a.t()", a_t, b_rows), ("b.t()", a_s, b_t), ("both strided", a_s, b_s),
                       ("both transposed", a_t, b_t)]:
        assert not (a.is_contiguous() and b.is_contiguous())
        check(mixprec_ops.matmul(a, b, bias=bias, activation="silu", backend=backend), a, b, bias, "silu", what=name)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", [(17, 19, 21), (5, 33, 3), (33, 5, 40), (16, 16, 16)])
def test_operands_inside_nan_padding(device, backend, dtype, m, n, k):
    """a and b are views into NaN-filled buffers, row- and column-major: every element just past K (a's columns,
    b's rows) and past M / N is NaN, so a kernel that reads one element past an operand's end (a K-tail mask
    dropped on one side, a wrong stride) turns its output NaN, deterministically (past the end of a plain tensor
    lies whatever memory held before, which caught such slips only by luck)."""
    nan = float("nan")

    def padded(rows, cols, col_major):
        buf = torch.full((cols + 16, rows + 16) if col_major else (rows + 16, cols + 16), nan, dtype=dtype,
                         device=device)
        view = buf[:cols, :rows].t() if col_major else buf[:rows, :cols]
        view.copy_(rand(rows, cols, dtype=dtype, device=device))
        return view

    for a_cm, b_cm in ((False, False), (True, True), (False, True), (True, False)):
        a, b = padded(m, k, a_cm), padded(k, n, b_cm)
        check(mixprec_ops.matmul(a, b, backend=backend), a, b, what=f"a col-major {a_cm}, b col-major {b_cm}")


@pytest.mark.parametrize("device,backend", PARAMS)
def test_bias_strides(device, backend):
    """A bias that is not contiguous: a strided slice, an expanded scalar (stride 0, one element of storage) and an
    expanded element of a larger tensor (stride 0, the elements after it are other values). The Triton kernels read
    the bias with unit stride: the launcher must hand them a contiguous copy (without it the slice read every other
    value wrongly and the expanded scalar read past its storage)."""
    n = 24
    a, b = rand(8, 40, dtype=torch.float16, device=device), rand(40, n, dtype=torch.float16, device=device)
    for name, bias in [("strided", rand(2 * n, dtype=torch.float16, device=device)[::2]),
                       ("expanded scalar", rand(1, dtype=torch.float32, device=device).expand(n)),
                       ("expanded element", rand(3 * n, dtype=torch.float16, device=device)[5:6].expand(n))]:
        assert not bias.is_contiguous()
        check(mixprec_ops.matmul(a, b, bias=bias, activation="gelu", backend=backend), a, b, bias, "gelu",
              what=name)
        y, pre = matmul_with_preactivation(a, b, bias=bias, activation="relu", backend=backend)
        check(y, a, b, bias, "relu", what=name + " (with pre)")
        check(pre, a, b, bias, None, what=name + " pre")


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched(device, backend, dtype):
    b = rand(24, 17, dtype=dtype, device=device)
    bias = rand(17, dtype=dtype, device=device)
    a3 = rand(3, 7, 24, dtype=dtype, device=device)
    a4 = rand(2, 2, 5, 24, dtype=dtype, device=device)
    a_perm = rand(7, 3, 24, dtype=dtype, device=device).transpose(0, 1)  # leading dims not flattenable: copied
    for name, a in [("3d", a3), ("4d", a4), ("permuted batch", a_perm), ("empty batch", a3[:0])]:
        y = mixprec_ops.matmul(a, b, bias=bias, activation="gelu", backend=backend)
        check(y, a, b, bias, "gelu", what=name)


@pytest.mark.parametrize("device,backend", [p for p in PARAMS if p.values[1] in ("torch", "triton")])
@pytest.mark.parametrize("act", ACTS[1:], ids=str)
def test_activation_formula_on_exact_accumulators(device, backend, act):
    """The activation itself, free of accumulation error: K = 1 and b = 1, so the fp32 accumulator is x exactly (fp16
    values over [-8, 8] and a few near 0), fp32 output, against the fp64 activation of x within c u (|x| + |y|)
    (u = 2^-24). c = 8 for the fp32 reference and the interpreter (a handful of correctly rounded fp32 ops); c = 64
    on a GPU, where tl.sigmoid's exp and division are the approximate instructions (ex2.approx, div.full: ~2 ulp
    each, the exponent's rounding scaled by |x| ln 2). The matmul tests above cannot see an error in the formula of
    1e-5: their fp32 bound is dominated by the accumulation's (K + 2) u |a| @ |b|. Here a wrong constant (erf's
    1/sqrt(2) to 4 digits, tanh's 0.044715 as 0.0447, silu's argument off by 1e-4) exceeds it. The cuBLASLt backend
    has its own GELU (not this formula) and is held to the bounds of the other tests."""
    x = torch.cat([torch.linspace(-8, 8, 301), torch.tensor([1e-3, -1e-3, 0.5, -0.5, 1.4142, -1.4142])])
    a = x.to(torch.float16)[:, None].to(device)
    b = torch.ones(1, 16, dtype=torch.float16, device=device)
    y = mixprec_ops.matmul(a, b, activation=act, out_dtype=torch.float32, backend=backend).cpu().double()
    xd = a.cpu().double()
    want = apply_activation(xd, act).expand_as(y)
    c = 64 if device == "cuda" and backend == "triton" else 8
    excess = ((y - want).abs() - c * 2.0**-24 * (xd.abs() + want.abs())).max().item()
    assert excess <= 0, f"{act}: off by {excess:.3g} more than {c} u (|x| + |y|)"


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_nan_propagates(device, backend, act):
    """A NaN in a makes its whole output row NaN through every activation, as torch.relu & co. keep NaN (a plain
    max(x, 0) would turn it into 0 and hide it from AMP's inf/NaN check); the pre-activation too. Other rows exact
    as usual."""
    a = rand(6, 40, dtype=torch.float16, device=device)
    b = rand(40, 24, dtype=torch.float16, device=device)
    bias = rand(24, dtype=torch.float16, device=device)
    a[2, 7] = float("nan")
    rows = torch.arange(6, device=device) != 2
    for with_bias in (False, True):
        bb = bias if with_bias else None
        y = mixprec_ops.matmul(a, b, bias=bb, activation=act, backend=backend)
        y2, pre = matmul_with_preactivation(a, b, bias=bb, activation=act, backend=backend)
        for name, t, t_act in (("y", y, act), ("y (with pre)", y2, act), ("pre", pre, None)):
            assert t[2].isnan().all(), f"{act} bias={with_bias} {name}: row with a NaN input: {t[2]}"
            check(t[rows], a[rows], b, bb, t_act, what=f"{act} bias={with_bias} {name}, other rows")


@pytest.mark.parametrize("device,backend", PARAMS)
def test_k_zero_and_empty(device, backend):
    a, b = torch.zeros(4, 0, dtype=torch.float16, device=device), torch.zeros(0, 5, dtype=torch.float16, device=device)
    bias = torch.arange(5, dtype=torch.float16, device=device) - 2
    y = mixprec_ops.matmul(a, b, bias=bias, activation="relu", backend=backend)
    assert torch.equal(y.cpu(), torch.relu(bias.cpu()).expand(4, 5))
    assert mixprec_ops.matmul(a[:0], b, backend=backend).shape == (0, 5)


def test_auto_backend_and_reference():
    a, b = rand(9, 11, dtype=torch.bfloat16, device="cpu"), rand(11, 6, dtype=torch.bfloat16, device="cpu")
    assert mixprec_ops.backends.select(OP, torch.device("cpu"), "auto") == "torch"
    y = mixprec_ops.matmul(a, b)
    assert torch.equal(y, (a.float() @ b.float()).to(torch.bfloat16))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bad_inputs(device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device (runs in bench/gpu_check)")
    h = torch.ones(4, 3, dtype=torch.float16, device=device)
    w = torch.ones(3, 5, dtype=torch.float16, device=device)
    cases = [
        (dict(a=h, b=w.bfloat16()), TypeError, "same dtype"),
        (dict(a=h.float(), b=w.float()), TypeError, "a must be float16 or bfloat16"),
        (dict(a=h.int(), b=w), TypeError, "a must be float16 or bfloat16"),
        (dict(a=h, b=w.to(torch.int8)), TypeError, "b must be float16 or bfloat16"),
        (dict(a=h, b=w[:2]), ValueError, "shapes do not match"),
        (dict(a=h[0], b=w), ValueError, "a must have shape"),
        (dict(a=h, b=w[None]), ValueError, "b must have shape"),
        (dict(a=h, b=w, bias=torch.ones(4, dtype=torch.float16, device=device)), ValueError, "bias must have shape"),
        (dict(a=h, b=w, bias=torch.ones(5, dtype=torch.bfloat16, device=device)), TypeError, "bias must be"),
        (dict(a=h, b=w, activation="tanh"), ValueError, "activation must be one of"),
        (dict(a=h, b=w, out_dtype=torch.float64), TypeError, "out_dtype must be"),
        (dict(a=h, b=w, backend="nope"), ValueError, "backend must be one of"),
        (dict(a=h.tolist(), b=w), TypeError, "a must be a torch.Tensor"),
    ]
    if HAS_CUDA:
        other = "cpu" if device == "cuda" else "cuda"
        cases += [(dict(a=h, b=w.to(other)), ValueError, "b must be on"),
                  (dict(a=h, b=w, bias=torch.ones(5, dtype=torch.float16, device=other)), ValueError, "bias must be on")]
    for kw, exc, msg in cases:
        a, b = kw.pop("a"), kw.pop("b")
        with pytest.raises(exc, match=msg):
            mixprec_ops.matmul(a, b, **kw)


def test_triton_unavailable_reason_on_cpu():
    why = mixprec_ops.backends.unavailable_reason(OP, "triton", torch.device("cpu"))
    if why is None:
        pytest.skip("Triton runs CPU tensors here (interpreter)")
    with pytest.raises(ValueError, match="backend 'triton' is unavailable"):
        mixprec_ops.matmul(torch.ones(2, 2, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float16),
                           backend="triton")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_opcheck_triton_op(device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device (runs in bench/gpu_check)")
    if mixprec_ops.backends.unavailable_reason(OP, "triton", torch.device(device)):
        pytest.skip("Triton cannot run here")
    from mixprec_ops.ops.matmul import _get_triton_ops

    mm, mm_pre = _get_triton_ops()
    a, b = rand(20, 24, dtype=torch.float16, device=device), rand(24, 18, dtype=torch.float16, device=device)
    bias = rand(18, dtype=torch.float32, device=device)
    # Under the interpreter the ops are custom ops with fake implementations (the interpreter cannot run on fake
    # tensors); on a GPU triton_ops, whose fake-tensor run traces the kernel launch.
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in [(mm, (a, b, bias, "gelu", torch.float16)), (mm, (a, b.t().contiguous().t(), None, "none",
                                                                       torch.float32)),
                     (mm_pre, (a.bfloat16(), b.bfloat16(), None, "silu", torch.bfloat16))]:
        torch.library.opcheck(op, args, test_utils=utils)


_COMPILE_FIRST_CALL = """
import json, sys
import torch
dynamo_before = "torch._dynamo" in sys.modules
import mixprec_ops
from mixprec_ops.ops.matmul import matmul_with_preactivation
light = dynamo_before or "torch._dynamo" not in sys.modules  # the import did not pull in torch._dynamo (~1 s)

dev = sys.argv[1]
torch.manual_seed(0)
a = torch.randn(20, 40).half().to(dev)
b = torch.randn(40, 24).half().to(dev)
bias = torch.randn(24).to(dev)


def f(a, b, bias):
    y = mixprec_ops.matmul(a, b, bias=bias, activation="gelu", backend="triton")
    y2, pre = matmul_with_preactivation(a, b, bias=bias, activation="relu", backend="triton")
    return y, y2, pre


compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
got = compiled(a, b, bias)  # the first Triton matmul call of this process, inside the trace
want = f(a, b, bias)
print("RESULT " + json.dumps({"equal": [torch.equal(g, w) for g, w in zip(got, want)], "light": light}))
"""


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_fullgraph_first_triton_call(device, tmp_path):
    """torch.compile(fullgraph=True) of a function whose Triton matmul call is the first of the process: the op
    must be registered outside the trace (Dynamo refuses to trace torch.library's registration: "should not be
    traced (MOD_SKIPLIST torch/_library)"), and the backend choice and the device guard must trace. A fresh process
    (other tests register the op earlier in this one); results equal to the eager calls'; `import mixprec_ops`
    still light (no torch._dynamo, which the registration imports). On CPU under the
    interpreter the ops are opaque custom ops; only a GPU shows the real triton_op traced by AOTAutograd into the
    kernel's wrap_triton call (the triton.autotune launch on fake tensors)."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device (runs in bench/gpu_check)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)")
    why = mixprec_ops.backends.unavailable_reason(OP, "triton", torch.device(device))
    if why is not None:
        pytest.skip(why)
    res = run_fresh_process(_COMPILE_FIRST_CALL, device, cwd=tmp_path)
    assert res["equal"] == [True, True, True], res
    assert res["light"], "import mixprec_ops imported torch._dynamo"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)")
def test_cuda_graph_capture_does_not_autotune(tmp_path, monkeypatch):
    """Nothing is benchmarked during a CUDA graph capture: a bucket tuned before uses its choice ("memory"), one never
    tuned its candidate set's default ("default (capture)"). Each shape runs once before its capture, as the capture
    rule asks (Triton loads a kernel's binary at its first launch in a process, which CUDA forbids while capturing):
    the never-tuned one with autotuning off, which launches that same default config and tunes and stores nothing,
    so that the capture, with autotuning on, still has to choose without benchmarking."""
    from mixprec_ops.triton_kernels import matmul as km
    from mixprec_ops.triton_kernels.tune_cache import TuneCache

    monkeypatch.setenv("MIXPREC_CACHE_DIR", str(tmp_path))  # no choice on disk from an earlier run
    monkeypatch.setattr(km, "_CHOSEN", {})
    monkeypatch.setattr(km, "_CACHE", TuneCache("matmul_autotune.json"))
    monkeypatch.setenv(km.AUTOTUNE_ENV, "1")
    a = rand(300, 256, dtype=torch.bfloat16, device="cuda")
    b = rand(256, 192, dtype=torch.bfloat16, device="cuda")
    with km.record_choices() as warm:
        y0 = mixprec_ops.matmul(a, b, activation="relu", backend="triton")  # warm-up: tunes this bucket
    assert [c["source"] for c in warm] == ["tuned"], warm

    def no_benchmark(fn):
        raise AssertionError("benchmarked during a CUDA graph capture")

    monkeypatch.setattr(km, "_benchmark", no_benchmark)
    g = torch.cuda.CUDAGraph()
    with km.record_choices() as got, torch.cuda.graph(g):
        y = mixprec_ops.matmul(a, b, activation="relu", backend="triton")
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0)
    assert [(c["source"], c["config"]) for c in got] == [("memory", warm[0]["config"])], got
    # a bucket never tuned: warmed up with autotuning off, then captured with it on
    a2 = rand(3, 256, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv(km.AUTOTUNE_ENV, "0")
    with km.record_choices() as warm:
        mixprec_ops.matmul(a2, b, backend="triton")
    monkeypatch.setenv(km.AUTOTUNE_ENV, "1")
    g2 = torch.cuda.CUDAGraph()
    with km.record_choices() as got, torch.cuda.graph(g2):
        y2 = mixprec_ops.matmul(a2, b, backend="triton")
    g2.replay()
    torch.cuda.synchronize()
    check(y2, a2, b)
    assert [c["source"] for c in warm] == ["default (autotune off)"], warm
    assert [(c["source"], c["config"]) for c in got] == [("default (capture)", warm[0]["config"])], got
    entries = json.loads((tmp_path / "matmul_autotune.json").read_text())["entries"]
    assert len(entries) == 1, list(entries)  # the tuned bucket only: nothing stored with autotuning off or captured


# ---- the cuBLASLt backend ("cuda"): GPU only ------------------------------------------------------------------------


def cuda_backend():
    """Skips the test (with the reason) unless the cuBLASLt backend serves CUDA tensors here."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device (runs in bench/gpu_check)")
    return extension_backend(OP, "cuda")


def check_any(y, a, b, bias, act, out_dtype, what):
    """check() where torch has a same-dtype yardstick; a cross 16-bit out dtype against the reference (+- 1 ulp)."""
    if out_dtype in (None, a.dtype, torch.float32):
        check(y, a, b, bias, act, out_dtype, what=what)
    else:
        ref = matmul_reference(a.cpu(), b.cpu(), None if bias is None else bias.cpu(), act, out_dtype)
        assert y.dtype == out_dtype and y.shape == ref.shape, what
        assert y.isfinite().all(), what
        torch.testing.assert_close(y.cpu().float(), ref.float(), atol=1e-2, rtol=1e-2, msg=lambda m: f"{what}: {m}")


def test_cuda_auto_prefers_cublaslt():
    cuda_backend()
    assert mixprec_ops.backends.select(OP, torch.device("cuda"), "auto") == "cuda"
    with pytest.raises(ValueError, match="backend 'cuda' serves cuda tensors only"):
        mixprec_ops.matmul(torch.ones(2, 2, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float16),
                           backend="cuda")


def check_poisoned_both_ways(a, b, bias, act, out_dtype, backend, what):
    """matmul, then matmul_with_preactivation, each into poisoned memory (an unwritten element is NaN), all three
    outputs checked (check_any); returns (y, pre) of the second call."""
    m, n = a.shape[0], b.shape[1]
    poison_allocator(8 * m * n + 4096, a.device.type)
    y = mixprec_ops.matmul(a, b, bias=bias, activation=act, out_dtype=out_dtype, backend=backend)
    check_any(y, a, b, bias, act, out_dtype, what)
    poison_allocator(8 * m * n + 4096, a.device.type)
    y2, pre = matmul_with_preactivation(a, b, bias=bias, activation=act, out_dtype=out_dtype, backend=backend)
    check_any(y2, a, b, bias, act, out_dtype, what + " (with pre)")
    check_any(pre, a, b, bias, None, out_dtype, what + " pre")
    return y2, pre


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("m,n,k", [(37, 24, 45), (19, 23, 40), (1, 40, 16), (64, 1, 33), (5, 8, 1)])
def test_cuda_epilogues(dtype, act, m, n, k):
    """Every epilogue mapping of the cuBLASLt backend: fused (bias of the out dtype or an fp32 out, relu, gelu_tanh,
    GELU_AUX when N % 8 == 0) and the fp32 path (gelu, silu, fp32 bias with 16-bit out, cross 16-bit out, GELU_AUX
    with N % 8 != 0), with and without the pre-activation, into poisoned memory (an unwritten element is NaN)."""
    backend = cuda_backend()
    a, b = rand(m, k, dtype=dtype, device="cuda"), rand(k, n, dtype=dtype, device="cuda")
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    for out_dtype in (None, dtype, other, torch.float32):
        for bias_dtype in (None, dtype, torch.float32):
            bias = None if bias_dtype is None else rand(n, dtype=bias_dtype, device="cuda")
            what = f"{act} out={out_dtype} bias={bias_dtype}"
            y2, pre = check_poisoned_both_ways(a, b, bias, act, out_dtype, backend, what)
            assert pre.data_ptr() != y2.data_ptr()
            if act == "relu":  # y = relu(pre) exactly (relu commutes with the one rounding)
                assert torch.equal(y2, torch.relu(pre)), what
            if act is None:
                assert torch.equal(y2, pre), what


@pytest.mark.parametrize("act", ["relu", "gelu", None], ids=str)
def test_cuda_large_output_epilogue(act):
    """An output larger than one pass of the epilogue kernel's grid (8 blocks per SM x 256 threads x 8 elements: about
    2.2M 16-bit outputs on an H200), with a tail that is not a whole vector: the grid-stride loop and the tail, for
    relu in place, the fp32 path (gelu; out=fp32: in place in y) and the pre-activation, into poisoned memory."""
    backend = cuda_backend()
    m, n, k = 2053, 2051, 16
    a, b = rand(m, k, dtype=torch.bfloat16, device="cuda"), rand(k, n, dtype=torch.bfloat16, device="cuda")
    bias = rand(n, dtype=torch.bfloat16, device="cuda")
    for out_dtype in (None, torch.float32):
        check_poisoned_both_ways(a, b, bias, act, out_dtype, backend, f"{act} out={out_dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["relu", "gelu_tanh", None], ids=str)
def test_cuda_layouts_fused(dtype, act):
    """Transposed, strided, offset (2-byte aligned) and broadcast operands through the fused epilogues (bias of a's
    dtype): read in place when a leading dimension exists, else copied; an unaligned pointer gets an algorithm for
    its alignment or falls back."""
    backend = cuda_backend()
    m, n, k = 21, 24, 35
    a_t = rand(k, m, dtype=dtype, device="cuda").t()
    b_t = rand(n, k, dtype=dtype, device="cuda").t()
    big_a = rand(2 * m, 3 * k, dtype=dtype, device="cuda")
    a_s, b_s = big_a[::2, 1::3], rand(2 * k, n + 5, dtype=dtype, device="cuda")[::2, 2:2 + n]
    a_off = rand(m * k + 1, dtype=dtype, device="cuda")[1:].view(m, k)         # storage offset 1: 2-byte aligned
    b_rows = rand(k, n + 3, dtype=dtype, device="cuda")[:, :n]                  # ld = n + 3 (odd)
    a_bc = rand(1, k, dtype=dtype, device="cuda").expand(m, k)                  # stride 0: copied
    bias = rand(n, dtype=dtype, device="cuda")
    bias_off = rand(n + 1, dtype=dtype, device="cuda")[1:]
    cases = [("a.t()", a_t, rand(k, n, dtype=dtype, device="cuda"), bias), ("b.t()", a_s, b_t, bias),
             ("both strided", a_s, b_s, bias), ("both transposed", a_t, b_t, bias),
             ("offset a, odd ld b", a_off, b_rows, bias), ("broadcast a", a_bc, b_t, bias),
             ("offset bias", a_t, b_t, bias_off)]
    for name, a, b, bb in cases:
        for with_pre in (False, True):
            poison_allocator(8 * m * n + 4096, "cuda")
            if with_pre:
                y, pre = matmul_with_preactivation(a, b, bias=bb, activation=act, backend=backend)
                check(pre, a, b, bb, None, what=f"{name} pre")
            else:
                y = mixprec_ops.matmul(a, b, bias=bb, activation=act, backend=backend)
            check(y, a, b, bb, act, what=f"{name} {act} pre={with_pre}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_batched_and_degenerate(dtype):
    backend = cuda_backend()
    b = rand(24, 16, dtype=dtype, device="cuda")
    bias = rand(16, dtype=dtype, device="cuda")
    a_perm = rand(7, 3, 24, dtype=dtype, device="cuda").transpose(0, 1)   # batch dims do not flatten: copied
    a_tb = rand(3, 24, 7, dtype=dtype, device="cuda").transpose(1, 2)     # each matrix transposed
    for name, a in [("3d", rand(3, 7, 24, dtype=dtype, device="cuda")), ("4d", rand(2, 2, 5, 24, dtype=dtype,
                                                                                         device="cuda")),
                    ("permuted batch", a_perm), ("transposed matrices", a_tb), ("empty batch", a_perm[:0])]:
        for act in ("gelu_tanh", "silu"):
            y, pre = matmul_with_preactivation(a, b, bias=bias, activation=act, backend=backend)
            check(y, a, b, bias, act, what=f"{name} {act}")
            check(pre, a, b, bias, None, what=f"{name} {act} pre")
    # K = 0 with a batch: act(bias) everywhere
    a0 = torch.zeros(2, 3, 0, dtype=dtype, device="cuda")
    y = mixprec_ops.matmul(a0, b[:0], bias=bias, activation="gelu", out_dtype=torch.float32, backend=backend)
    assert y.shape == (2, 3, 16)
    torch.testing.assert_close(y.cpu(), torch.nn.functional.gelu(bias.float().cpu()).expand(2, 3, 16))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16], ids=str)
def test_matmul_and_rowsum(device, out_dtype):
    """(a @ b, a.float().sum(1)) rounded once each: on cuda one GEMM with the BGRADB epilogue (or the fallback sum),
    elsewhere the product and the sum. a as the wgrad GEMM gets it (g.t(): column-major) and row-major."""
    if device == "cuda":
        backend = cuda_backend()
    else:
        backend = "torch"
    for dtype in DTYPES:
        for m, n, k in [(23, 40, 37), (8, 16, 64), (1, 5, 3), (16, 9, 1)]:
            g = rand(k, m, dtype=dtype, device=device)
            x = rand(k, n, dtype=dtype, device=device)
            for name, a in [("g.t()", g.t()), ("contiguous", g.t().contiguous())]:
                poison_allocator(8 * m * n + 4096, device)
                y, rs = matmul_and_rowsum(a, x, out_dtype=out_dtype, backend=backend)
                od = dtype if out_dtype is None else out_dtype
                check_any(y, a, x, None, None, out_dtype, f"{name} {dtype} {m}x{n}x{k} product")
                ref = a.double().cpu().sum(1).to(od)
                assert rs.dtype == od and rs.shape == (m,), (rs.dtype, rs.shape)
                if device == "cpu":
                    assert torch.equal(rs, a.float().sum(1).to(od))
                # one rounding of an fp32 sum of exact values: within one ulp of the exact sum's rounding
                torch.testing.assert_close(rs.cpu().double(), ref.double(), atol=1e-5, rtol=2 * torch.finfo(od).eps,
                                           msg=lambda e: f"{name} {dtype} {m}x{n}x{k} rowsum: {e}")
    with pytest.raises(ValueError, match=r"a must have shape \(M, K\)"):
        matmul_and_rowsum(rand(2, 3, 4, dtype=torch.float16, device=device), rand(4, 5, dtype=torch.float16,
                                                                                   device=device))


def test_cuda_graph_capture_cublaslt():
    """cuBLASLt inside a CUDA graph: a shape seen before (cached algorithm) and one first seen during the capture
    (the heuristic query is host-only; the workspace comes from the graph's pool)."""
    backend = cuda_backend()
    a = rand(300, 256, dtype=torch.bfloat16, device="cuda")
    b = rand(256, 192, dtype=torch.bfloat16, device="cuda")
    bias = rand(192, dtype=torch.bfloat16, device="cuda")
    y0 = mixprec_ops.matmul(a, b, bias=bias, activation="gelu", backend=backend)
    a2 = rand(5, 256, dtype=torch.bfloat16, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = mixprec_ops.matmul(a, b, bias=bias, activation="gelu", backend=backend)
        y2, pre2 = matmul_with_preactivation(a2, b, bias=bias, activation="gelu_tanh", backend=backend)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0)
    check(y2, a2, b, bias, "gelu_tanh")
    check(pre2, a2, b, bias, None)


def test_cuda_op_rejects_bad_inputs():
    """Direct torch.ops.mixprec.* calls (past the Python checks) raise, naming the problem, instead of crashing."""
    cuda_backend()
    h = torch.ones(4, 3, dtype=torch.float16, device="cuda")
    w = torch.ones(3, 5, dtype=torch.float16, device="cuda")
    mm = torch.ops.mixprec.matmul
    cases = [
        ((h, w.bfloat16(), None, "none", torch.float16), "same dtype"),
        ((h.float(), w.float(), None, "none", torch.float16), "a must be float16 or bfloat16"),
        ((h, w[:2], None, "none", torch.float16), "shapes do not match"),
        ((h[0], w, None, "none", torch.float16), "a must have shape"),
        ((h, w[None], None, "none", torch.float16), "b must have shape"),
        ((h, w, torch.ones(4, dtype=torch.float16, device="cuda"), "none", torch.float16), "bias must have shape"),
        ((h, w, torch.ones(5, dtype=torch.bfloat16, device="cuda"), "none", torch.float16), "bias must be"),
        ((h, w, torch.ones(5, dtype=torch.float16), "none", torch.float16), "bias must be on"),
        ((h, w.cpu(), None, "none", torch.float16), "b must be a CUDA tensor"),
        ((h, w, None, "tanh", torch.float16), "activation must be one of"),
        ((h, w, None, "none", torch.float64), "out_dtype must be"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            mm(*args)
    with pytest.raises(RuntimeError, match="a must have shape"):
        torch.ops.mixprec.matmul_rowsum(h[None], w, torch.float16)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_opcheck_cuda_ops(device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device (runs in bench/gpu_check)")
    extension_backend(OP, device)  # skips on CPU: no CPU kernel of our own (the reference serves CPU tensors)
    a, b = rand(20, 24, dtype=torch.float16, device=device), rand(24, 16, dtype=torch.float16, device=device)
    bias = rand(16, dtype=torch.float32, device=device)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in [(torch.ops.mixprec.matmul.default, (a, b, bias, "gelu", torch.float16)),
                     (torch.ops.mixprec.matmul.default, (a.t().contiguous().t(), b, None, "relu", torch.float32)),
                     (torch.ops.mixprec.matmul_pre.default, (a.bfloat16(), b.bfloat16(), bias, "gelu_tanh",
                                                             torch.bfloat16)),
                     (torch.ops.mixprec.matmul_rowsum.default, (a.t().contiguous().t(), b, torch.float16))]:
        torch.library.opcheck(op, args, test_utils=utils)


def test_meta_tensors_give_shapes():
    """Shape propagation on meta tensors (a model built on "meta"): matmul, linear and a converted Linear give the
    shapes torch gives (the reference's autocast query raised for "meta")."""
    from mixprec_ops.nn import convert
    from mixprec_ops.nn.functional import linear

    a = torch.empty(2, 4, 8, dtype=torch.bfloat16, device="meta")
    b = torch.empty(8, 6, dtype=torch.bfloat16, device="meta")
    assert mixprec_ops.matmul(a, b, activation="gelu").shape == (2, 4, 6)
    y, pre = matmul_with_preactivation(a, b, activation="relu")
    assert y.shape == pre.shape == (2, 4, 6) and y.device.type == "meta"
    assert linear(a, b.t()).shape == (2, 4, 6)
    model = convert(torch.nn.Linear(8, 3, device="meta", dtype=torch.bfloat16))
    assert model(a).shape == (2, 4, 3)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=["out=a", "out=fp32"])
def test_matmul_gradients_on_every_backend(device, backend, out_dtype):
    """matmul is differentiable on every backend (only the reference was: the cuBLASLt and Triton ops have no
    autograd, and backward raised there), fp32 outputs included. Against the reference's own autograd in
    float64 on the same inputs: within 2**-7 of the largest gradient (the backward rounds act'(pre) * grad to
    bf16 before its products, and each gradient to its tensor's dtype)."""
    torch.manual_seed(2)
    a0 = torch.randn(5, 12).to(torch.bfloat16)
    b0 = (torch.randn(12, 7) / 3).to(torch.bfloat16)
    bias0 = torch.randn(7)
    g = torch.randn(5, 7)
    a, b, bias = (t.clone().to(device).requires_grad_(True) for t in (a0, b0, bias0))
    y = mixprec_ops.matmul(a, b, bias=bias, activation="silu", out_dtype=out_dtype, backend=backend)
    assert y.dtype == (out_dtype or torch.bfloat16)
    y.backward(g.to(device, y.dtype))
    ra, rb, rbias = (t.double().requires_grad_(True) for t in (a0, b0, bias0))
    torch.nn.functional.silu(ra @ rb + rbias).backward(g.to(y.dtype).double())
    for got, want, name in ((a.grad, ra.grad, "a"), (b.grad, rb.grad, "b"), (bias.grad, rbias.grad, "bias")):
        assert got is not None and got.dtype == {"bias": torch.float32}.get(name, torch.bfloat16), name
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= 2**-7 * want.abs().max().item(), (name, err)


def test_preactivation_never_aliases_the_output():
    """With an fp32 output and no activation, the reference returned one tensor as both y and pre."""
    a, b = torch.randn(3, 8).bfloat16(), torch.randn(8, 4).bfloat16()
    for act in (None, "relu"):
        y, pre = matmul_with_preactivation(a, b, activation=act, out_dtype=torch.float32, backend="torch")
        assert y.untyped_storage().data_ptr() != pre.untyped_storage().data_ptr()

