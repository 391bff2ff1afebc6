"""matmul: every backend (the fp32 "torch" reference, and Triton: on CPU under the interpreter, on a GPU in
bench/gpu_check) against a float64 product.

Tolerance: the max |error| vs the fp64 result may be at most 2x the max |error| of torch's own computation in the
operand dtype (torch.matmul in fp16/bf16, then bias and activation in that dtype), plus a floor of 1e-6 x max|exact|
for the cases where torch's own error happens to be 0. Both round the output once to the operand dtype; we
accumulate in fp32 and apply the epilogue before that one rounding, so we should be as good or better; 2x leaves
room for a different summation order. For out_dtype=float32 the bound is torch's low-precision error (ours is far
smaller).

What the interpreter cannot show: the bf16 tensor-core path (bf16 tiles are upcast to fp32 before tl.dot under the
interpreter, whose bf16 tl.dot is wrong), the autotuned configs and the CUDA-graph-capture branch (one fixed
16x16x16 config is used); those run on a GPU through the cuda-triton parameters.
"""

import pytest
import torch
from conftest import HAS_CUDA, backend_params

import mixprec_ops
from mixprec_ops.ops.matmul import apply_activation, matmul_reference

OP = "matmul"
DTYPES = [torch.float16, torch.bfloat16]
ACTS = [None, "relu", "gelu", "gelu_tanh", "silu"]


def matmul_params():
    """(device, backend): the reference on CPU (and CUDA), Triton wherever it can run (else skipped with why)."""
    out = [pytest.param("cpu", "torch", id="cpu-torch"),
           pytest.param("cuda", "torch", id="cuda-torch", marks=pytest.mark.skipif(
               not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)"))]
    return out + [p for p in backend_params(OP) if p.values[1] == "triton"]


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
    if bias is not None:
        base = base + bias.to(a.dtype)
    base = apply_activation(base, act)
    err = (y.double().cpu() - exact).abs().max().item() if y.numel() else 0.0
    base_err = (base.double().cpu() - exact).abs().max().item() if y.numel() else 0.0
    floor = 1e-6 * exact.abs().max().item() if y.numel() else 0.0
    assert y.isfinite().all()
    assert err <= 2 * base_err + floor, f"{what}: max error {err:.3g} > 2 x torch's {base_err:.3g} (+{floor:.2g})"


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
    for name, a, b in [("a.t()", a_t, b_t[:, :]), ("b.t()", a_s, b_t), ("both strided", a_s, b_s),
                       ("both transposed", a_t, b_t)]:
        assert not (a.is_contiguous() and b.is_contiguous())
        check(mixprec_ops.matmul(a, b, bias=bias, activation="silu", backend=backend), a, b, bias, "silu", what=name)


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
    # Under the interpreter, fake-tensor tracing of a triton_op fails inside the interpreter (it touches the
    # storage); on a GPU the full check runs.
    utils = ("test_schema",) if device == "cpu" else ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in [(mm, (a, b, bias, "gelu", torch.float16)), (mm, (a, b.t().contiguous().t(), None, "none",
                                                                       torch.float32)),
                     (mm_pre, (a.bfloat16(), b.bfloat16(), None, "silu", torch.bfloat16))]:
        torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)")
def test_cuda_graph_capture_does_not_autotune():
    a = rand(300, 256, dtype=torch.bfloat16, device="cuda")
    b = rand(256, 192, dtype=torch.bfloat16, device="cuda")
    y0 = mixprec_ops.matmul(a, b, activation="relu")  # warm-up (autotunes this bucket)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = mixprec_ops.matmul(a, b, activation="relu")
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0)
    # a bucket never tuned: the default config, no benchmarking inside the capture
    a2 = rand(3, 256, dtype=torch.bfloat16, device="cuda")
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        y2 = mixprec_ops.matmul(a2, b)
    g2.replay()
    torch.cuda.synchronize()
    check(y2, a2, b)
