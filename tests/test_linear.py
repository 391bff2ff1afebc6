"""mixprec_ops.nn: functional.linear (forward and autograd), the Linear module, convert(), torch.compile.

Gradient tolerance: the truth is torch autograd in float64 on the same (rounded) inputs; our gradients may be off
by at most 2x the error of torch's own autograd in the operand dtype (F.linear + activation in fp16/bf16), plus a
floor of 1e-6 x max|exact|. Like the forward, each of our gradients is one fp32-accumulated product rounded once,
except that g = grad * act'(pre) is rounded to the operand dtype before the dgrad/wgrad products, as torch's own
low-precision autograd does too; so torch's own low-precision error is the fair yardstick, 2x covers summation
order and the pre-activation being stored in the operand dtype.
"""

import pytest
import torch
from conftest import HAS_CUDA, OpLog, poison_allocator

import mixprec_ops
from mixprec_ops.nn import Linear, convert
from mixprec_ops.nn.functional import linear
from mixprec_ops.ops.matmul import apply_activation

ACTS = [None, "relu", "gelu", "gelu_tanh", "silu"]
DTYPES = [torch.float16, torch.bfloat16]


def backends_here():
    out = [pytest.param("cpu", "torch", id="cpu-torch")]
    why = mixprec_ops.backends.unavailable_reason("matmul", "triton", torch.device("cpu"))
    out.append(pytest.param("cpu", "triton", id="cpu-triton", marks=pytest.mark.skipif(why is not None,
                                                                                        reason=str(why))))
    out.append(pytest.param("cuda", None, id="cuda-auto", marks=pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)")))
    for bk in ("cuda", "triton"):  # explicitly: cuBLASLt (auto's choice) and Triton
        why = "needs a CUDA device (runs in bench/gpu_check)" if not HAS_CUDA else \
            mixprec_ops.backends.unavailable_reason("matmul", bk, torch.device("cuda"))
        out.append(pytest.param("cuda", bk, id=f"cuda-{bk}", marks=pytest.mark.skipif(why is not None,
                                                                                       reason=str(why))))
    return out


def grads(fn, x, w, b, gy):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(gy.to(y.dtype))
    return y.detach(), x.grad, w.grad, b.grad


def torch_linear(act):
    return lambda x, w, b: apply_activation(torch.nn.functional.linear(x, w, b), act)


@pytest.mark.parametrize("device,backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_forward_backward_vs_autograd(device, backend, dtype, act):
    x = torch.randn(2, 9, 40).to(dtype).to(device)
    w = (torch.randn(23, 40) / 6).to(dtype).to(device)
    b = torch.randn(23).to(dtype).to(device)
    gy = torch.randn(2, 9, 23).to(dtype).to(device)
    ours = grads(lambda x, w, b: linear(x, w, b, act, backend=backend), x, w, b, gy)
    exact = grads(torch_linear(act), x.double().cpu(), w.double().cpu(), b.double().cpu(), gy.double().cpu())
    theirs = grads(torch_linear(act), x, w, b, gy)
    for name, o, e, t in zip(("y", "dx", "dw", "db"), ours, exact, theirs):
        assert o.dtype == dtype and o.shape == e.shape and o.device.type == device, (name, o.dtype, o.shape)
        err = (o.double().cpu() - e).abs().max().item()
        base = (t.double().cpu() - e).abs().max().item()
        floor = 1e-6 * e.abs().max().item()
        assert err <= 2 * base + floor, f"{name}: max error {err:.3g} > 2 x torch's {base:.3g} (+{floor:.2g})"


@pytest.mark.parametrize("device,backend", backends_here())
@pytest.mark.parametrize("in_f,out_f,rows", [(0, 5, 3), (4, 0, 3), (4, 5, 0)], ids=["in0", "out0", "rows0"])
def test_empty_dimensions_backward(device, backend, in_f, out_f, rows):
    """Layers with no input or output features, and empty batches: forward and backward give torch's shapes and
    values (zeros and bias only), where reshape(-1, 0) would be ambiguous."""
    x = torch.randn(2, rows, in_f).to(torch.bfloat16).to(device)
    w = torch.randn(out_f, in_f).to(torch.bfloat16).to(device)
    b = torch.randn(out_f).to(torch.bfloat16).to(device)
    gy = torch.randn(2, rows, out_f).to(torch.bfloat16).to(device)
    for act in (None, "gelu"):
        ours = grads(lambda x, w, b: linear(x, w, b, act, backend=backend), x, w, b, gy)
        theirs = grads(torch_linear(act), x.double(), w.double(), b.double(), gy.double())
        for name, o, t in zip(("y", "dx", "dw", "db"), ours, theirs):
            assert o.shape == t.shape and o.dtype == torch.bfloat16, (name, act, o.shape, t.shape)
            torch.testing.assert_close(o.double(), t, rtol=1e-2, atol=1e-2, msg=lambda m: f"{name} ({act}): {m}")


@pytest.mark.parametrize("device,backend", [p for p in backends_here() if p.values[0] == "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("bias_dtype", ["same", torch.float32], ids=str)
def test_backward_matches_reference_backend(device, backend, dtype, act, bias_dtype):
    """The GPU backward against the reference backward (backend="torch") on the same CUDA tensors: both accumulate
    every product in fp32 and round once, so they differ by summation order only (an ulp or so of the output, a
    little more where the pre-activation rounded differently). dbias: from the wgrad GEMM (cuBLASLt BGRADB) when the
    bias has the weight's dtype, the separate fp32 sum for an fp32 bias. Odd sizes; outputs into poisoned memory."""
    bd = dtype if bias_dtype == "same" else bias_dtype
    x = torch.randn(3, 7, 45).to(dtype).to(device)
    w = (torch.randn(29, 45) / 6).to(dtype).to(device)
    b = torch.randn(29).to(bd).to(device)
    gy = torch.randn(3, 7, 29).to(dtype).to(device)
    poison_allocator(1 << 20, device)
    ours = grads(lambda x, w, b: linear(x, w, b, act, backend=backend), x, w, b, gy)
    ref = grads(lambda x, w, b: linear(x, w, b, act, backend="torch"), x, w, b, gy)
    eps = torch.finfo(dtype).eps
    allow = relu_flip_allowance(act, ours[0], ref[0], x, w, gy, eps)
    for name, o, r in zip(("y", "dx", "dw", "db"), ours, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, (name, o.dtype, r.dtype, o.shape)
        assert o.isfinite().all(), name
        scale = r.double().abs().max().item()
        atol = 4 * eps * scale + allow.get(name, 0.0)
        err = (o.double() - r.double()).abs() - (4 * eps * r.double().abs() + atol)
        assert (err <= 0).all(), f"{name}: {int((err > 0).sum())} of {err.numel()} beyond tolerance, worst by " \
                                 f"{err.max().item():.3g} (scale {scale:.3g}, eps {eps:.3g})"


def relu_flip_allowance(act, y_ours, y_ref, x, w, gy, eps):
    """relu's derivative jumps at 0: an output that one backend's pre-activation puts on the other side of zero than
    the other's (they round the same sum differently: summation order, and where the bias is added) takes or drops a
    whole grad_y there, by right on both sides. Such flips must be few and within rounding of zero; each widens the
    tolerance of dx, dw and db by exactly the terms it moves (|grad_y| x |w| row, |grad_y| x |x| column, |grad_y|)."""
    if act != "relu":
        return {}
    flip = (y_ours > 0) != (y_ref > 0)
    n = int(flip.sum())
    if n == 0:
        return {}
    near = torch.maximum(y_ours.double().abs(), y_ref.double().abs())[flip].max().item()
    assert n <= 2 + flip.numel() // 100 and near <= 8 * eps * y_ref.double().abs().max().item(), \
        f"relu masks differ at {n} outputs, up to {near:.3g} from zero: not rounding"
    g = (gy.double().abs() * flip).reshape(-1, gy.shape[-1])  # (rows, out)
    return {"dx": (g @ w.double().abs()).reshape(x.shape),
            "dw": g.t() @ x.double().abs().reshape(-1, x.shape[-1]),
            "db": g.sum(0)}


def test_backward_partial_and_no_bias():
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    w = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    y = linear(x, w, None, "relu")
    y.float().sum().backward()
    ref_w = w.detach().float().requires_grad_(True)
    torch.relu(x.float() @ ref_w.t()).sum().backward()
    torch.testing.assert_close(w.grad.float(), ref_w.grad, atol=0.05, rtol=0.02)
    assert x.grad is None


def test_float32_falls_back_to_torch():
    x, w, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
    torch.testing.assert_close(linear(x, w, b, "gelu"), torch.nn.functional.gelu(x @ w.t() + b))


def test_module_is_a_torch_linear():
    m = Linear(7, 5, bias=True, dtype=torch.bfloat16, activation="silu")
    ref = torch.nn.Linear(7, 5, dtype=torch.bfloat16)
    assert isinstance(m, torch.nn.Linear)
    assert list(m.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    assert m.weight.dtype == torch.bfloat16 and m.weight.shape == (5, 7)
    assert "activation='silu'" in repr(m)
    assert list(Linear(3, 2, bias=False).state_dict()) == ["weight"]
    m.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, dtype=torch.bfloat16)
    torch.testing.assert_close(m(x).float(), torch.nn.functional.silu(ref(x).float()), atol=0.03, rtol=0.02)
    with pytest.raises(ValueError, match="activation must be one of"):
        Linear(3, 2, activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        linear(x, m.weight, None, "softplus")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_convert_keeps_parameters_outputs_and_keys(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Sequential(torch.nn.Linear(32, 8)),
                                torch.nn.LayerNorm(8)).to(dtype)
    model[0].bias.requires_grad_(False)
    x = torch.randn(4, 12, dtype=dtype)
    before = model(x).detach()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert convert(model) is model
    assert type(model[0]) is Linear and type(model[2][0]) is Linear and isinstance(model[0], torch.nn.Linear)
    assert {n: p for n, p in model.named_parameters()} == params  # the very same Parameter objects
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    after = model(x).detach()
    if dtype == torch.float32:
        assert torch.equal(after, before)
    else:
        torch.testing.assert_close(after.float(), before.float(), atol=0.05, rtol=0.02)
    model(x).float().sum().backward()
    assert model[0].weight.grad is not None and model[0].bias.grad is None
    single = convert(torch.nn.Linear(3, 3, dtype=torch.float16))
    assert type(single) is Linear
    assert mixprec_ops.convert is convert and mixprec_ops.nn.Linear is Linear


def _fake_hf_conv1d_class():
    """A stand-in for transformers.pytorch_utils.Conv1D (same module prefix, attributes and forward)."""

    class Conv1D(torch.nn.Module):
        def __init__(self, nf, nx, dtype):
            super().__init__()
            self.nf, self.nx = nf, nx
            self.weight = torch.nn.Parameter(torch.randn(nx, nf, dtype=dtype) * 0.2)
            self.bias = torch.nn.Parameter(torch.randn(nf, dtype=dtype))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)

    Conv1D.__module__ = "transformers.fake_pytorch_utils"
    return Conv1D


def test_convert_hf_conv1d_keeps_parameters_and_computes_x_at_w_plus_b():
    cls = _fake_hf_conv1d_class()
    model = torch.nn.Sequential(cls(24, 12, torch.bfloat16), torch.nn.ReLU(), cls(5, 24, torch.bfloat16))
    x = torch.randn(3, 7, 12, dtype=torch.bfloat16, requires_grad=True)
    params = list(model.parameters())
    keys = list(model.state_dict())
    convert(model, activation=None)
    assert isinstance(model[0], cls) and type(model[0]) is not cls and type(model[0]) is type(model[2])
    assert all(p is q for p, q in zip(model.parameters(), params)) and list(model.state_dict()) == keys
    y = model(x)
    # Oracle: the same product in fp32 with one rounding per layer (what the fused kernel computes).
    h = (x.detach().float() @ params[0].detach().float() + params[1].detach().float()).to(torch.bfloat16)
    ref = (torch.relu(h).float() @ params[2].detach().float() + params[3].detach().float()).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params) and x.grad.shape == x.shape
    # A module merely named Conv1D outside transformers is left alone.
    other = _fake_hf_conv1d_class()
    other.__module__ = "mymodels"
    m = other(4, 3, torch.bfloat16)
    convert(m)
    assert type(m) is other


def test_convert_real_hf_gpt2_conv1d():
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (make test)")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    m = Conv1D(16, 8).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    before = m(x)
    convert(m)
    assert isinstance(m, Conv1D) and type(m) is not Conv1D, transformers.__version__
    torch.testing.assert_close(m(x).float(), before.float(), atol=0.02, rtol=0.02)  # torch's bf16 addmm rounds too


def test_converted_hf_conv1d_unpickles_where_nothing_was_converted(monkeypatch):
    """torch.save(model) of a converted GPT-2 pickles its Conv1D subclass by reference (a class made at run time).
    Loading it in a process that has not converted one failed ("Can't get attribute 'Conv1D_...'"): the module
    now rebuilds the class from its name. Simulated here by emptying the registry between dumps and loads."""
    pytest.importorskip("transformers", reason="transformers is a test dependency (make test)")
    import pickle

    from transformers.pytorch_utils import Conv1D

    from mixprec_ops.nn import linear as linear_module

    torch.manual_seed(0)
    m = convert(torch.nn.Sequential(Conv1D(16, 8), torch.nn.GELU(), Conv1D(4, 16)).to(torch.bfloat16))
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    before = m(x)
    name = type(m[0]).__name__
    blob = pickle.dumps(m)
    monkeypatch.setattr(linear_module, "_CONV1D_CLASSES", {})
    monkeypatch.delattr(linear_module, name)
    loaded = pickle.loads(blob)
    assert type(loaded[0]) is getattr(linear_module, name) and type(loaded[0]) is not type(m[0])
    assert isinstance(loaded[2], Conv1D) and type(loaded[2]) is type(loaded[0])
    assert torch.equal(loaded(x), before)
    for bad in ("Conv1D__os__path", "Conv1D__transformers__no_such_module_here", "Conv1D_x"):
        with pytest.raises((AttributeError, ModuleNotFoundError)):
            getattr(linear_module, bad)


def test_fx_symbolic_trace_records_the_fused_linear():
    """torch.fx.symbolic_trace traces into modules outside torch.nn, so it traced into Linear.forward and linear's
    argument checks met Proxy objects (TypeError; a user trial found FX quantization failing the same way). The
    fused linear is now an FX leaf function: the traced GraphModule calls it (Linear and a converted HF Conv1D) and
    gives the module's outputs bit for bit."""
    torch.manual_seed(0)
    conv1d = _fake_hf_conv1d_class()
    model = convert(torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), conv1d(5, 16, torch.bfloat16))
                    .to(torch.bfloat16))
    gm = torch.fx.symbolic_trace(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(mixprec_ops.nn.functional.linear) == 2, calls
    x = torch.randn(3, 7, 12, dtype=torch.bfloat16)
    assert torch.equal(gm(x), model(x))


def test_compile_fullgraph(monkeypatch):
    """No graph break: dynamo traces through the custom op, and AOTAutograd through its registered backward
    (aot_eager: the cheapest backend that also traces the backward). The custom op, not the eager route's
    _LinearFunction (which Dynamo would inline, op by op), is what the compiled graph calls."""
    from mixprec_ops.nn import functional as F

    torch._dynamo.reset()
    model = torch.nn.Sequential(Linear(16, 24, dtype=torch.bfloat16, activation="gelu_tanh"),
                                Linear(24, 8, dtype=torch.bfloat16))
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    eager = model(x)
    eager.float().sum().backward()
    g_eager = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    for p in model.parameters():
        p.grad = None
    x.grad = None

    def refuse(*args):
        raise AssertionError("_LinearFunction traced by torch.compile")

    monkeypatch.setattr(F._LinearFunction, "apply", refuse)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.float().sum().backward()
    assert torch.equal(out, eager)
    for g, ge in zip([p.grad for p in model.parameters()] + [x.grad], g_eager):
        assert torch.equal(g, ge)


def test_compile_with_inductor():
    """torch.compile's default backend, Inductor (the other compile tests use aot_eager, which keeps eager's ops):
    a Linear + GELU model compiles whole and trains one step. Close to eager, not bit-equal: Inductor fuses the
    elementwise ops around the layer (and, on a CPU, the reference matmul's epilogue) keeping fp32 intermediates
    where eager rounds to bf16 between ops (the gradient after GELU's backward, for one), and sums over such values
    cancel, so an element near zero can differ by much of itself: the bound is 4 bf16 ulps of the tensor's largest
    element (2^-6 of max|t|; measured: up to 1.9 of those ulps, in x.grad)."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = torch.nn.Sequential(Linear(24, 40, activation="gelu", dtype=torch.bfloat16),
                                Linear(40, 8, dtype=torch.bfloat16))
    x0 = torch.randn(6, 24, dtype=torch.bfloat16)
    results = []
    for fn in (model, torch.compile(model, fullgraph=True)):
        x = x0.clone().requires_grad_(True)
        for p in model.parameters():
            p.grad = None
        out = fn(x)
        out.float().sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        bound = 2.0**-6 * a.float().abs().max()
        assert ((b.float() - a.float()).abs() <= bound).all(), ((b.float() - a.float()).abs().max(), bound)


def test_compile_with_non_contiguous_activations():
    """Inputs and incoming gradients that are transposed views (a per-token loss over logits.transpose(1, 2),
    nn.MultiheadAttention's output): compiled, the (..., M, K) -> (rows, K) flattening copies where a view is
    impossible, as eager does (it used to try a view and catch RuntimeError; a fake tensor raises ValueError, so
    compiling failed). Output and gradients as eager's, bit for bit."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    head = Linear(32, 10, dtype=torch.bfloat16)
    h0 = torch.randn(5, 2, 32, dtype=torch.bfloat16).transpose(0, 1)  # (2, 5, 32), strides (32, 64, 1)
    y = torch.randint(0, 10, (2, 5))

    def loss_fn(h):
        return torch.nn.functional.cross_entropy(head(h).transpose(1, 2).float(), y)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager")):
        h = h0.detach().requires_grad_(True)
        for p in head.parameters():
            p.grad = None
        loss = fn(h)
        loss.backward()
        results.append([loss.detach(), h.grad, head.weight.grad, head.bias.grad])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_opcheck_linear_op():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    w = torch.randn(5, 6, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(5, dtype=torch.bfloat16, requires_grad=True)
    for act in ("none", "relu", "gelu"):
        for out_dtype in (None, torch.float32, torch.float16):  # the fake's pre had x's dtype for "none"
            torch.library.opcheck(torch.ops.mixprec.linear.default, (x, w, b, act, "", out_dtype))


def test_fp32_bias_gradient_sums_the_unrounded_gradient():
    """An fp32 bias's gradient is summed from the gradient before its rounding to the operands' dtype (an fp32
    output's own gradient, or act' * grad in fp32): over 4096 rows the rounded sum was 1.5e-3 off (normwise), up
    to 4% per element. Against float64 autograd: within fp32 summation error (fp32 outputs, whose saved
    pre-activation is fp32 too)."""
    torch.manual_seed(9)
    x = torch.randn(4096, 16).bfloat16()
    w = (torch.randn(8, 16) / 4).bfloat16()
    for act, out_dtype in ((None, torch.float32), ("gelu", torch.float32)):
        b = torch.randn(8, requires_grad=True)
        y = mixprec_ops.matmul(x, w.t(), bias=b, activation=act, out_dtype=out_dtype)
        g = torch.randn(y.shape).to(y.dtype)
        y.backward(g)
        bd = b.detach().double().requires_grad_(True)
        apply_activation(x.double() @ w.double().t() + bd, act).backward(g.double())
        err = ((b.grad.double() - bd.grad).norm() / bd.grad.norm()).item()
        assert err <= 1e-5, (act, out_dtype, err)


@pytest.mark.parametrize("device,backend", backends_here())
def test_backward_with_broadcast_grad(device, backend):
    """y.sum().backward() hands backward an expanded grad (all strides 0): the kernels read it in place."""
    x = torch.randn(2, 9, 20, dtype=torch.bfloat16, device=device, requires_grad=True)
    w = torch.randn(7, 20, dtype=torch.bfloat16, device=device, requires_grad=True)
    b = torch.randn(7, dtype=torch.bfloat16, device=device, requires_grad=True)
    linear(x, w, b, backend=backend).sum().backward()
    xr, wr, br = (t.detach().double().cpu().requires_grad_(True) for t in (x, w, b))
    torch.nn.functional.linear(xr, wr, br).sum().backward()
    # each gradient is a sum of up to 18 exact bf16 values accumulated in fp32, rounded once to bf16
    for g, r in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(g.double().cpu(), r, atol=1e-6, rtol=2 ** -8)


def assert_within_2x_torchs_error(names, ours, exact, theirs):
    """Each of ours within 2x the max error of torch's own fp16 computation (theirs) against float64 (exact), plus a
    floor of 1e-3 of the largest exact value (+1e-6)."""
    for name, o, e, t in zip(names, ours, exact, theirs):
        err, base = (o - e).abs().max().item(), (t - e).abs().max().item()
        floor = 1e-3 * e.abs().max().item() + 1e-6
        assert err <= 2 * base + floor, f"{name}: max error {err:.3g} > 2 x torch's {base:.3g} (+{floor:.2g})"


def second_order(fn, x, w, b):
    """(d2/dx2, d2/dxdw) of sum(fn(x, w, b)) as the gradients of sum(d/dx) w.r.t. x and w (float64, on the CPU)."""
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    (gx,) = torch.autograd.grad(fn(x, w, b).float().sum(), x, create_graph=True)
    hx, hw = torch.autograd.grad(gx.float().sum(), (x, w), allow_unused=True, materialize_grads=True)
    return hx.double().cpu(), hw.double().cpu()


@pytest.mark.parametrize("device,backend", backends_here())
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_double_backward(device, backend, act):
    """Second derivatives through the fused layer (gradient penalties, Hessian-vector products): the activation's
    second derivative reaches the op through its saved pre-activation output, whose gradient the backward must add
    (it was dropped: d2/dx2 came out exactly 0 for gelu/silu), and the products of the first backward must have
    gradients themselves on every backend (the cuBLASLt and Triton matmul ops have none: the first backward runs
    them through linear when a graph is being built). Same tolerance as the first-order test: 2x torch's own
    fp16 error against float64 on the same inputs, plus a floor."""
    torch.manual_seed(7)
    dtype = torch.float16
    x = torch.randn(5, 12).to(dtype).to(device)
    w = (torch.randn(7, 12) / 3).to(dtype).to(device)
    b = torch.randn(7).to(dtype).to(device)
    ours = second_order(lambda x, w, b: linear(x, w, b, act, backend=backend), x, w, b)
    exact = second_order(torch_linear(act), x.double().cpu(), w.double().cpu(), b.double().cpu())
    theirs = second_order(torch_linear(act), x, w, b)
    assert_within_2x_torchs_error(("d2/dx2", "d2/dxdw"), ours, exact, theirs)
    if act in ("gelu", "silu", "gelu_tanh"):
        assert exact[0].abs().max() > 0.1  # the case tests a non-zero second derivative


def penalty_grads(fn, x, w, b, create_graph):
    """Gradients w.r.t. (x, w, b) of sum(y) + sum((dsum(y)/dx)^2), a gradient penalty (WGAN-GP): its backward
    reaches the layer through y AND through the saved pre-activation (both gradients at once); with create_graph
    that backward builds a graph itself (a third derivative would follow)."""
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    (gx,) = torch.autograd.grad(y.float().sum(), x, create_graph=True)
    loss = y.float().sum() + gx.float().square().sum()
    return [g.double().cpu() for g in torch.autograd.grad(loss, (x, w, b), create_graph=create_graph)]


@pytest.mark.parametrize("device,backend", backends_here())
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu"], ids=str)
@pytest.mark.parametrize("create_graph", [False, True], ids=["", "create_graph"])
def test_gradient_penalty(device, backend, act, create_graph):
    """A backward that receives gradients for both outputs (y and the pre-activation) must add them; the double
    backward test above only sends the pre-activation's. Same tolerance as there."""
    torch.manual_seed(8)
    dtype = torch.float16
    x = torch.randn(5, 12).to(dtype).to(device)
    w = (torch.randn(7, 12) / 3).to(dtype).to(device)
    b = torch.randn(7).to(dtype).to(device)
    ours = penalty_grads(lambda x, w, b: linear(x, w, b, act, backend=backend), x, w, b, create_graph)
    exact = penalty_grads(torch_linear(act), x.double().cpu(), w.double().cpu(), b.double().cpu(), False)
    theirs = penalty_grads(torch_linear(act), x, w, b, False)
    assert_within_2x_torchs_error(("dx", "dw", "db"), ours, exact, theirs)


@pytest.mark.parametrize("act", [None, "gelu"], ids=str)
def test_torch_func_transforms(act):
    """torch.func.jvp / jacfwd / grad / vmap and forward-mode AD (the fused op has no jvp or vmap rule: jvp used
    to return zero tangents through it, grad raised) run the same numerics as plain torch ops. Checked against the
    same transform of torch's linear in float64, to bf16 accuracy (2**-7 relative to the largest value)."""
    torch.manual_seed(3)
    dt = torch.bfloat16
    x, w, b, t = torch.randn(3, 8).to(dt), (torch.randn(5, 8) / 3).to(dt), torch.randn(5).to(dt), torch.randn(3, 8)

    def ours(x):
        return linear(x, w, b, act)

    def exact(x):
        return torch_linear(act)(x, w.double(), b.double())

    def close(got, want):
        got, want = got.double(), want.double()
        assert (got - want).abs().max() <= 2 ** -7 * want.abs().max() + 1e-6, (got, want)
        assert want.abs().max() > 0.1

    close(torch.func.jvp(ours, (x,), (t.to(dt),))[1], torch.func.jvp(exact, (x.double(),), (t.double(),))[1])
    close(torch.func.jacfwd(ours)(x), torch.func.jacfwd(exact)(x.double()))
    close(torch.func.jacrev(ours)(x), torch.func.jacrev(exact)(x.double()))
    close(torch.func.grad(lambda x: ours(x).float().sum())(x), torch.func.grad(lambda x: exact(x).sum())(x.double()))
    per_row = torch.func.vmap(torch.func.grad(lambda r: ours(r).float().sum()))(x)
    close(per_row, torch.func.vmap(torch.func.grad(lambda r: exact(r).sum()))(x.double()))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(ours(fwAD.make_dual(x, t.to(dt)))).tangent
    close(tangent, torch.func.jvp(exact, (x.double(),), (t.double(),))[1])


def test_autocast_runs_the_fused_kernel_on_cast_arguments():
    """Inside torch.autocast a converted float32 model behaves as torch's: every argument is cast to the autocast
    dtype (a two-layer fp32 model used to fail at its second layer, which got a bf16 input and an fp32 weight);
    the output is the autocast dtype and equals our kernel on the cast tensors, bit for bit (the pure-torch path
    keeps its fp32 accumulation inside the region: the fp32 @ is not cast down); grads reach the fp32 params."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.GELU(), torch.nn.Linear(9, 4))
    convert(model)
    x = torch.randn(6, 12)
    for dt in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dt):
            y = model(x)
        assert y.dtype == dt
        h = torch.nn.functional.gelu(linear(x.to(dt), model[0].weight.to(dt), model[0].bias.to(dt)))
        assert torch.equal(y, linear(h, model[2].weight.to(dt), model[2].bias.to(dt)))
        y.float().sum().backward()
        assert model[0].weight.grad.dtype == torch.float32 and model[0].weight.grad.abs().sum() > 0
        model.zero_grad()
    a, bm = torch.randn(5, 40).to(torch.bfloat16), torch.randn(40, 3).to(torch.bfloat16)
    want = mixprec_ops.matmul(a, bm, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mixprec_ops.matmul(a, bm, backend="torch")
    assert torch.equal(got, want)


def test_float64_and_1d_inputs_like_torch():
    """float64 layers (gradcheck) run torch's linear, as float32 ones do; a 1-D input of a 16-bit layer gives a
    1-D output equal to the row it is (torch's linear takes 1-D inputs; ours raised for fp16/bf16)."""
    torch.manual_seed(2)
    m = Linear(6, 4, dtype=torch.float64, activation="gelu")
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))
    assert torch.autograd.gradgradcheck(lambda x: m(x), (x,))
    for dt in DTYPES:
        m = Linear(6, 4, dtype=dt, activation="silu")
        v = torch.randn(6).to(dt)
        y = m(v)
        assert y.shape == (4,) and torch.equal(y, m(v[None])[0])


def test_bad_arguments_are_named_as_torch_names_them():
    """Errors name input / weight / bias with the user's shapes (not the internal matmul's a and b, with the weight
    transposed); a bias on another device (meta) is refused, not run through the fake kernel into garbage."""
    bf = torch.bfloat16
    x, w, b = torch.randn(3, 7).to(bf), torch.randn(4, 6).to(bf), torch.randn(4).to(bf)
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., in_features\) = \(\.\.\., 6\) to match "
                                         r"weight \(4, 6\), got \(3, 7\)"):
        linear(x, w, b)
    with pytest.raises(TypeError, match=r"input \(torch.float32\) and weight \(torch.bfloat16\) must have the same"):
        linear(torch.randn(3, 6), w, b)
    with pytest.raises(ValueError, match="bias must be on input's device cpu, got meta"):
        linear(torch.randn(3, 6).to(bf), w, torch.empty(4, dtype=bf, device="meta"))
    with pytest.raises(ValueError, match=r"bias must have shape \(out_features,\) = \(4,\), got \(5,\)"):
        linear(torch.randn(3, 6).to(bf), w, torch.randn(5).to(bf))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        linear([1.0] * 6, w, b)


def test_convert_warns_about_the_linear_subclasses_it_leaves():
    """A parametrized Linear (its class becomes ParametrizedLinear) and a LazyLinear not yet run are left as they
    are, as every subclass is, but no longer silently: one warning names them. MultiheadAttention's out_proj (its
    forward never runs) and an already converted model give none."""
    lin = torch.nn.Linear(4, 4)
    torch.nn.utils.parametrizations.spectral_norm(lin)
    model = torch.nn.Sequential(lin, torch.nn.LazyLinear(3))
    with pytest.warns(UserWarning, match=r"left unconverted.*0 \(ParametrizedLinear\), 1 \(LazyLinear\)"):
        convert(model)
    assert type(model[1]) is torch.nn.LazyLinear
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2), torch.nn.Linear(8, 8)))
        convert(convert(torch.nn.Sequential(torch.nn.Linear(8, 8))))


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    """A torch function mode that changes nothing: its presence alone sends linear through the custom op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("act", ACTS, ids=str)
def test_eager_function_and_custom_op_agree(monkeypatch, act):
    """linear's two eager routes, the plain autograd.Function (_LinearFunction, no mode active) and the
    mixprec::linear custom op (taken under any torch function or dispatch mode, by torch.compile, for subclasses):
    the same outputs, first and second derivatives, bit for bit (they share forward, setup_context and backward).
    Each route is checked to be taken, so the comparison is not of a route with itself."""
    from mixprec_ops.nn import functional as F

    torch.manual_seed(3)
    x = torch.randn(6, 10).to(torch.bfloat16)
    w = (torch.randn(9, 10) / 3).to(torch.bfloat16)
    b = torch.randn(9).to(torch.bfloat16)
    gy = torch.randn(6, 9).to(torch.bfloat16)
    calls = {"function": 0, "custom_op": 0}
    apply, op = F._LinearFunction.apply, F._linear_op

    def counting_apply(*args):
        calls["function"] += 1
        return apply(*args)

    def counting_op(*args):
        calls["custom_op"] += 1
        return op(*args)

    monkeypatch.setattr(F._LinearFunction, "apply", counting_apply)
    monkeypatch.setattr(F, "_linear_op", counting_op)
    fn = lambda x, w, b: linear(x, w, b, act)  # noqa: E731
    got = {}
    for route in ("function", "custom_op"):
        before = dict(calls)
        if route == "custom_op":
            with _PassThroughMode():
                got[route] = (grads(fn, x, w, b, gy), second_order(fn, x, w, b))
        else:
            got[route] = (grads(fn, x, w, b, gy), second_order(fn, x, w, b))
        assert calls[route] > before[route], calls
        if route == "function":  # (under the mode, the double backward's own products may take either route:
            assert calls["custom_op"] == before["custom_op"], calls  # the engine runs backward outside the mode)
    flat = {route: [*got[route][0], *got[route][1]] for route in got}
    for a, c in zip(flat["function"], flat["custom_op"], strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("route", ["function", "custom_op"])
def test_unused_pre_activation_gradient_is_not_materialised(monkeypatch, route):
    """The op's second output (the saved pre-activation) has no gradient in an ordinary backward: it must reach
    _backward as None, not as a zero tensor (which cost an fp32 allocation and a full add per backward with an
    activation); a double backward that reaches pre still delivers its gradient (test_double_backward)."""
    from mixprec_ops.nn import functional as F

    seen = []

    def spy(ctx, grad_y, grad_pre):
        seen.append(grad_pre)
        return F._backward.__wrapped__(ctx, grad_y, grad_pre)

    spy.__wrapped__ = F._backward
    monkeypatch.setattr(F, "_backward", spy)  # what _LinearFunction calls
    F._linear_op.register_autograd(spy, setup_context=F._setup_context)  # what the custom op calls
    try:
        x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(5, 8, dtype=torch.bfloat16, requires_grad=True)
        for act in ("gelu", None):
            if route == "custom_op":
                with _PassThroughMode():
                    linear(x, w, None, act).float().sum().backward()
            else:
                linear(x, w, None, act).float().sum().backward()
    finally:
        F._linear_op.register_autograd(spy.__wrapped__, setup_context=F._setup_context)
    assert len(seen) == 2 and all(g is None for g in seen), seen


def test_modes_and_fake_tensors_take_the_custom_op(monkeypatch):
    """Under FakeTensorMode (what torch.compile and torch.export trace with) linear runs the registered op, whose
    fake implementation gives shapes and dtypes without computing; _LinearFunction, which would hide the op from
    the mode, must not serve."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mixprec_ops.nn import functional as F

    def refuse(*args):
        raise AssertionError("_LinearFunction served under a dispatch mode")

    monkeypatch.setattr(F._LinearFunction, "apply", refuse)
    with FakeTensorMode():
        x = torch.empty(3, 5, 8, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(6, 8, dtype=torch.bfloat16, requires_grad=True)
        y = linear(x, w, None, "gelu")
        assert y.shape == (3, 5, 6) and y.dtype == torch.bfloat16
        y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("act,kernel", [("relu", "threshold_backward"), ("gelu", "gelu_backward"),
                                        ("gelu_tanh", "gelu_backward"), ("silu", "silu_backward")])
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_activation_backward_is_one_fused_kernel(act, kernel, bias_dtype):
    """grad * act'(pre) in the backward is one fused ATen kernel, as in torch's own autograd, not the derivative's
    formula as separate fp32 ops (~12 passes over the layer's output for gelu: on a GPU as much time as the layer's
    GEMMs). The ops the backward dispatches are logged; the formula would show erf/tanh/sigmoid/gt."""
    x = torch.randn(6, 10, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(7, 10, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(7, dtype=bias_dtype, requires_grad=True)
    y = linear(x, w, b, act)
    with OpLog() as log:
        y.backward(torch.randn_like(y))
    names = [op.split(".")[1] for op in log.ops]  # "aten.gelu_backward.default" -> "gelu_backward"
    assert names.count(kernel) == 1, log.ops
    assert not {"erf", "tanh", "sigmoid", "gt", "exp"} & set(names), log.ops


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_first_order_gradients_do_not_depend_on_create_graph(dtype):
    """create_graph=True (a gradient penalty will follow) must not change the first-order gradients: relu and gelu
    use the same fused kernel either way (it is differentiable); silu, whose kernel is not, runs its formula, as
    torch's own silu does, and is compared to a tolerance only."""
    torch.manual_seed(0)
    x, w = (torch.randn(64, 48) * 2).to(dtype), (torch.randn(40, 48) / 4).to(dtype)
    b, g = torch.randn(40).to(dtype), torch.randn(64, 40).to(dtype)
    for act in ACTS:
        out = []
        for create_graph in (False, True):
            xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, b))
            out.append(torch.autograd.grad(linear(xx, ww, bb, act), (xx, ww, bb), g, create_graph=create_graph))
        for a, c in zip(*out, strict=True):
            if act == "silu":
                torch.testing.assert_close(a, c, rtol=2 ** -7, atol=1e-3)
            else:
                assert torch.equal(a, c), act


def test_jit_trace_records_the_op_and_saves(tmp_path):
    """torch.jit.trace records mixprec::linear (the eager route's Python autograd.Function could be traced but not
    saved: "Could not export Python function call")."""
    m = torch.nn.Sequential(Linear(8, 6, dtype=torch.bfloat16, activation="gelu"), Linear(6, 4, dtype=torch.bfloat16))
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    traced = torch.jit.trace(m, x)
    assert "mixprec::linear" in str(traced.inlined_graph)
    torch.jit.save(traced, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    assert torch.equal(loaded(x), m(x))


def test_default_device_context_keeps_the_eager_route(monkeypatch):
    """torch.set_default_device / `with torch.device(...)` push a torch function mode that only picks where factory
    functions allocate: linear keeps its cheap eager route under it (other modes take the custom op)."""
    from mixprec_ops.nn import functional as F

    calls = []
    apply = F._LinearFunction.apply
    monkeypatch.setattr(F._LinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.device("cpu"):
        linear(x, w).float().sum().backward()
    assert calls == [1]
    with _PassThroughMode():
        linear(x, w)
    assert calls == [1]


@pytest.mark.parametrize("route", ["function", "custom_op"])
@pytest.mark.parametrize("needs", ["x", "w", "x,w", "b"])
@pytest.mark.parametrize("act", [None, "gelu"], ids=str)
def test_saves_only_what_the_gradients_need(route, needs, act):
    """As torch's linear: the input is saved only for the weight's gradient and the weight only for the input's, so a
    frozen layer keeps no activation alive (prompt tuning, adapters) and an in-place write to what was not saved
    stays legal before backward. The gradients equal those of the run where everything needs a gradient."""
    torch.manual_seed(5)
    bf = torch.bfloat16
    x0, w0, b0 = torch.randn(6, 8).to(bf), (torch.randn(5, 8) / 3).to(bf), torch.randn(5).to(bf)

    def run(x_grad, w_grad, b_grad):
        x, w, b = x0.clone(), w0.clone(), b0.clone()
        x.requires_grad_(x_grad)
        w.requires_grad_(w_grad)
        b.requires_grad_(b_grad)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if route == "custom_op":
                with _PassThroughMode():
                    y = linear(x * 1, w * 1, b * 1, act)  # (* 1: leaves stay unwritten, writes go to the copies)
            else:
                y = linear(x * 1, w * 1, b * 1, act)
        return x, w, b, y, saved

    x_grad, w_grad, b_grad = "x" in needs.split(","), "w" in needs.split(","), needs == "b"
    full = run(True, True, True)
    full[3].float().square().sum().backward()
    x, w, b, y, saved = run(x_grad, w_grad, b_grad)
    shapes = sorted(tuple(t.shape) for t in saved if t.numel())
    expect = sorted([(6, 8)] * w_grad + [(5, 8)] * x_grad + [(6, 5)] * (act is not None))
    assert shapes == expect, (shapes, expect)
    y.float().square().sum().backward()
    for got, want, wanted in ((x, full[0], x_grad), (w, full[1], w_grad), (b, full[2], b_grad)):
        assert (got.grad is not None) == wanted
        if wanted:
            assert torch.equal(got.grad, want.grad)


@pytest.mark.parametrize("route", ["function", "custom_op"])
def test_unsaved_input_may_be_written_before_backward(route):
    """torch's own rule: with a frozen weight the input is not saved, so writing it in place after the forward is
    legal (the version-counter check fires only for saved tensors)."""
    torch.manual_seed(6)
    bf = torch.bfloat16
    w = torch.randn(5, 8).to(bf)
    h = torch.randn(6, 8).to(bf).requires_grad_(True)
    x = h * 2
    if route == "custom_op":
        with _PassThroughMode():
            y = linear(x, w, None)
    else:
        y = linear(x, w, None)
    x.add_(1.0)  # no error at backward
    y.float().sum().backward()
    torch.testing.assert_close(h.grad, (2 * w.float().sum(0)).to(bf).expand(6, 8), rtol=0, atol=0.02)


def test_bad_arguments_raise_what_torch_linear_raises_too():
    """torch.nn.functional.linear raises RuntimeError for a shape or dtype mismatch: ours are ValueError / TypeError
    and RuntimeError at once, so `except RuntimeError` written for torch still catches them."""
    bf = torch.bfloat16
    layer = Linear(6, 4, dtype=bf)
    x = torch.randn(3, 6).to(bf)
    for bad, bias in ((torch.randn(3, 6), layer.bias), (torch.randn(3, 7).to(bf), layer.bias),
                      (torch.tensor(1.0, dtype=bf), layer.bias), (x, layer.bias.detach().half())):
        with pytest.raises(RuntimeError) as torch_err:
            torch.nn.functional.linear(bad, layer.weight, bias)
        with pytest.raises(RuntimeError) as ours:
            linear(bad, layer.weight, bias)
        assert isinstance(ours.value, (ValueError, TypeError)), (torch_err.value, ours.value)


_FLOP_SCRIPT = r"""
import importlib, importlib.util, sys
if sys.argv[1] == "counter_first":
    import torch.utils.flop_counter
import torch, mixprec_ops
if sys.argv[1] == "probe_first":  # a find_spec probe that imports nothing must not use the hook up
    assert importlib.util.find_spec("torch.utils.flop_counter") is not None
import torch.utils.flop_counter
if sys.argv[1] == "reload":  # a reload rebuilds the registry: the formulas are registered again
    importlib.reload(torch.utils.flop_counter)
from torch.utils.flop_counter import FlopCounterMode
counts = []
for cls in (torch.nn.Linear, mixprec_ops.nn.Linear):
    torch.manual_seed(0)
    m = cls(64, 32, dtype=torch.bfloat16)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        m(x)
    with FlopCounterMode(display=False) as both:
        m(x).float().sum().backward()
    counts.append((fwd.get_total_flops(), both.get_total_flops()))
print(counts)
"""


@pytest.mark.parametrize("order", ["counter_first", "mixprec_first", "probe_first", "reload"])
def test_flop_counter_counts_the_fused_linear_like_torch(order):
    """FlopCounterMode (Lightning's measure_flops, MFU tools) counted 0 for a 16-bit layer's forward: mixprec::linear
    was opaque to it. The formulas are registered whichever of torch.utils.flop_counter and mixprec_ops is imported
    first (the mode copies the registry when created), also after a find_spec probe or a reload of
    torch.utils.flop_counter, in a fresh process for each case."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-P", "-c", _FLOP_SCRIPT, order], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    torch_counts, ours = eval(out.stdout.strip().splitlines()[-1])
    assert torch_counts == (2 * 16 * 64 * 32, 3 * 2 * 16 * 64 * 32)
    assert ours == torch_counts


@pytest.mark.parametrize("device,backend", backends_here())
def test_flop_counter_counts_every_backends_products(device, backend):
    """Each product of the forward and backward once, 2 * M * N * K as torch counts mm, whichever op runs it (the
    fused linear, the cuBLASLt and Triton matmul ops, or the reference's aten.mm)."""
    from torch.utils.flop_counter import FlopCounterMode

    bf = torch.bfloat16
    x = torch.randn(10, 24, dtype=bf, device=device, requires_grad=True)
    w = torch.randn(12, 24, dtype=bf, device=device, requires_grad=True)
    b = torch.randn(12, dtype=bf, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        linear(x, w, b, "gelu", backend=backend)
    with FlopCounterMode(display=False) as both:
        linear(x, w, b, "gelu", backend=backend).float().sum().backward()
    with FlopCounterMode(display=False) as plain:
        mixprec_ops.matmul(x.detach(), w.detach().t(), backend=backend)
    assert (fwd.get_total_flops(), both.get_total_flops(), plain.get_total_flops()) == (
        2 * 10 * 12 * 24, 3 * 2 * 10 * 12 * 24, 2 * 10 * 12 * 24)


@pytest.mark.parametrize("route", ["function", "custom_op"])
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_saved_bytes_equal_torchs(route, act):
    """What the layer keeps alive, its output and what it saves for backward, is what torch's linear + activation
    keeps: y, x, the weight and the activation's input (gelu, silu) or its result (relu: y itself, no second
    output-sized tensor), counted as distinct bytes of memory."""
    torch.manual_seed(8)
    bf = torch.bfloat16
    x0, w0, b0 = torch.randn(12, 16).to(bf), torch.randn(24, 16).to(bf), torch.randn(24).to(bf)

    def saved_bytes(fn):
        x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn(x, w, b)
        pack(y)
        return sum(seen.values()), y

    def ours(x, w, b):
        if route == "custom_op":
            with _PassThroughMode():
                return linear(x, w, b, act)
        return linear(x, w, b, act)

    theirs, _ = saved_bytes(torch_linear(act))
    mine, y = saved_bytes(ours)
    assert mine == theirs, (mine, theirs)


@pytest.mark.parametrize("act", [None, "relu"], ids=str)
def test_gradient_reaching_the_empty_pre_output_adds_nothing(act):
    """Without an activation and for relu the op's second output (pre) is empty; a gradient reaching it (a caller
    of the raw op that sums both outputs, torch.compile of such a function) adds nothing, instead of failing on the
    size mismatch."""
    x = torch.randn(4, 6, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.bfloat16, requires_grad=True)
    y, pre = torch.ops.mixprec.linear(x, w, None, "none" if act is None else act, "", None)
    assert pre.numel() == 0
    (y.float().sum() + pre.float().sum()).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    linear(x, w, None, act).float().sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)


def test_convert_under_accelerate_hooks_and_instance_forwards():
    """accelerate's hooks (device_map dispatch with offload, cpu_offload) keep nn.Linear.forward bound as
    m._old_forward and call it from a wrapper set on the instance: convert swapped the class but the layer went on
    running torch's linear (a fused relu was silently dropped: negative outputs). The bound forward is re-bound to
    ours now. A forward replaced on the instance otherwise is left unconverted, with the warning."""
    hooks = pytest.importorskip("accelerate.hooks")
    torch.manual_seed(9)
    bf = torch.bfloat16
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).to(bf)
    hooks.add_hook_to_module(model[0], hooks.ModelHook())
    patched = model[1]
    patched.forward = lambda x: torch.nn.functional.linear(x, patched.weight, patched.bias)
    x = torch.randn(5, 8).to(bf)
    with pytest.warns(UserWarning, match=r"left unconverted.*1 \(forward set on the instance\)"):
        convert(model, activation="relu")
    assert type(model[0]) is Linear and type(model[1]) is torch.nn.Linear
    y = model[0](x)
    assert torch.equal(y, linear(x, model[0].weight, model[0].bias, "relu")) and (y >= 0).all()
    hooks.remove_hook_from_module(model[0])  # accelerate's own removal keeps the converted forward
    assert torch.equal(model[0](x), y)
