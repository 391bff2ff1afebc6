"""linear(x, weight, bias, activation) = act(x @ weight.T + bias) on the fused matmul, with autograd.

The forward and its gradient are one custom op, mixprec::linear, with torch.library.register_autograd, so
torch.compile(fullgraph=True) traces through it without a graph break (the op is opaque to the compiler; its fake
implementation gives the shapes). Plain eager calls apply the same forward and backward as an autograd.Function
(_LinearFunction), which skips the custom op's dispatch: 20 us instead of 45 us of host time per forward of a small
layer (bench/NOTES.md, "linear's host time"). The op returns (y, pre): pre is the pre-activation x @ weight.T + bias
(cast to x's dtype, stored by the same kernel launch), saved for the activation's gradient; it is empty when there is
no activation, and for relu, whose gradient reads y instead (as torch's relu saves its result: no second tensor).
Backward, every product accumulated in fp32 by the matmul op (cuBLASLt or Triton on a GPU, the fp32 reference on
CPU), transposes read in place:
    g     = grad_y * act'(pre)        (one fused ATen kernel, fp32 inside, one rounding, as torch's autograd)
    dx    = g @ weight                (..., out) @ (out, in)
    dw    = g2d.T @ x2d               (out, rows) @ (rows, in)
    dbias = g2d.sum(0, dtype=float32)
When the bias has the weight's dtype, dw and dbias come from one call, matmul_and_rowsum: on the cuda backend a single
cuBLASLt GEMM with the BGRADB epilogue (the reduction over rows of g is done inside the wgrad GEMM, in fp32, rounded
once), elsewhere the product and the same fp32 sum. An fp32 bias of a 16-bit layer keeps the separate fp32 sum
(cuBLASLt's bias gradient has the GEMM output's type, which would round it to 16 bits).
cuBLASLt's DGELU(_BGRAD)/DRELU epilogues are not used: they multiply the GEMM's OUTPUT by act'(aux), which is the
chain rule for the layer below this one (its dgrad GEMM times its own activation's derivative). This layer needs
g = grad_y * act'(pre) BEFORE its GEMMs, an element-wise product; fusing it into the previous layer's dgrad would
take an op spanning two layers (and DGELU is the tanh-approximate derivative, right only for "gelu_tanh").
float32 inputs (which the fp16/bf16 matmul does not take) go through torch.nn.functional.linear.
"""

from __future__ import annotations

import torch

from .. import _checks, backends
from .._dtensor import any_dtensor
from ..ops.matmul import (ACTIVATIONS, OPERAND_DTYPES, _as_2d, _rowsum_run, _run, _select, activation_backward,
                          activation_grad, apply_activation, autocast_on, matmul, matmul_reference,
                          matmul_with_preactivation)


def _bk(backend: str):
    return None if backend == "" else backend


def _pre_unneeded(activation: str) -> bool:
    """No pre-activation output: without an activation, and for relu, whose gradient reads y itself (y > 0 exactly
    where pre > 0: both are the same rounding of a positive value; as torch's relu saves its result)."""
    return activation in ("none", "relu")


def _linear_forward(x, weight, bias, activation, backend, out_dtype=None):
    """mixprec::linear's forward: (y, pre), pre empty where _pre_unneeded."""
    act = None if activation == "none" else activation
    if _pre_unneeded(activation):
        y = matmul(x, weight.t(), bias=bias, activation=act, out_dtype=out_dtype, backend=_bk(backend))
        return y, y.new_empty(0)
    return matmul_with_preactivation(x, weight.t(), bias=bias, activation=act, out_dtype=out_dtype,
                                     backend=_bk(backend))


@torch.library.custom_op("mixprec::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, backend: str,
               out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_forward(x, weight, bias, activation, backend, out_dtype)


@_linear_op.register_fake
def _(x, weight, bias, activation, backend, out_dtype=None):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype or x.dtype)
    return y, (y.new_empty(0) if _pre_unneeded(activation) else torch.empty_like(y))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, backend, _ = inputs
    # as torch's linear: x only for weight's gradient, weight only for x's (a frozen layer keeps no input alive, and
    # an in-place write to what is not saved stays legal); pre for the activation's gradient (y itself for relu)
    need_x, need_w = ctx.needs_input_grad[:2]
    ctx.save_for_backward(x if need_w else None, weight if need_x else None,
                          output[0] if activation == "relu" else output[1])
    ctx.x_dtype, ctx.x_device = x.dtype, x.device
    ctx.activation = None if activation == "none" else activation
    ctx.backend = _bk(backend)
    ctx.bias_dtype = None if bias is None else bias.dtype
    # an unused output's gradient arrives as None, not as zeros: without an activation pre is empty, and with one
    # it is used only by a double backward (zeros would cost an fp32 allocation and an add over the whole output)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_pre):
    x, weight, pre = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if _pre_unneeded(ctx.activation or "none"):  # pre is an empty output: its gradient (empty too) adds nothing
        grad_pre = None
    # g32: the gradient at the pre-activation before its rounding to x's dtype: grad_y * act'(pre) by one fused ATen
    # kernel, as torch's own autograd computes it (fp32 inside, rounded once to y's dtype), on fp32 operands where
    # the result is used unrounded (an fp32 bias's gradient) or added to (grad_pre). grad_y is None when only pre's
    # gradient arrives (a double backward that reached pre but not y); grad_pre is None unless pre was reached (by a
    # double backward through act'(pre) in the first backward above)
    if grad_y is None and grad_pre is None:
        return None, None, None, None, None, None
    if ctx.activation is None:
        g32 = grad_y
    elif grad_y is None:
        g32 = grad_pre.float()
    elif torch.is_grad_enabled() and ctx.activation == "silu":
        # create_graph: aten's silu_backward has no derivative; its formula as differentiable ops (torch's own silu
        # gradient differs with create_graph too). relu and gelu's fused kernels are differentiable: below.
        g32 = grad_y.float() * activation_grad(pre, ctx.activation)
        if grad_pre is not None:
            g32 = g32 + grad_pre.float()
    elif grad_pre is None and ctx.bias_dtype != torch.float32:
        g32 = activation_backward(grad_y, pre, ctx.activation)  # the same kernel with or without create_graph
    else:
        g32 = activation_backward(grad_y.float(), pre.float(), ctx.activation)
        if grad_pre is not None:
            g32 = g32 + grad_pre.float()
    g = g32.to(ctx.x_dtype)  # the GEMMs' operand
    g2 = _as_2d(g)  # (rows, out); not reshape(-1, out): ambiguous when out_features == 0
    need_b = need_b and ctx.bias_dtype is not None
    dw = db = None
    if torch.is_grad_enabled():
        # create_graph=True (a double backward will follow): every product through linear itself, which has a
        # gradient on every backend (the matmul ops it would otherwise call have none on cuda and triton)
        dx = linear(g, weight.t(), backend=ctx.backend) if need_x else None
        if need_w:
            dw = linear(g2.t(), _as_2d(x).t(), backend=ctx.backend)
    else:
        # the operands were checked by the forward: the products go straight to the backend, selected once for the
        # three (matmul's own checks and selection cost ~5 us of host time per product)
        bk = _select(ctx.x_device, ctx.backend)
        dx = _run(bk, g, weight, None, None, ctx.x_dtype, False) if need_x else None
        if need_w:
            x2 = _as_2d(x)
            if need_b and ctx.bias_dtype == ctx.x_dtype:  # dbias from the wgrad GEMM (BGRADB on cuda)
                dw, db = _rowsum_run(bk, g2.t(), x2, ctx.x_dtype)
            else:
                dw = _run(bk, g2.t(), x2, None, None, ctx.x_dtype, False)
    if need_b and db is None:
        # an fp32 bias sums the unrounded gradient (an fp32 output's, or act' * grad in fp32); a 16-bit bias the
        # GEMM operand, as the BGRADB epilogue does
        db = _as_2d(g32 if ctx.bias_dtype == torch.float32 else g).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, dw, db, None, None, None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _LinearFunction(torch.autograd.Function):
    """mixprec::linear in eager mode: the same forward, setup_context and backward as the custom op, applied as a
    plain autograd.Function, which skips the custom op's two dispatcher trips and its Python autograd wrapper (about
    half of a small layer's host time: see bench/NOTES.md, "linear's host time"). The custom op stays the op's one
    schema, and serves whenever something may need to see it: torch.compile, a dispatch or function mode
    (FakeTensorMode, FlopCounterMode, ...), tensor subclasses, meta tensors."""

    # forward(ctx, ...) rather than a separate setup_context: with setup_context defined, Function.apply binds its
    # arguments through inspect.signature on every call (~30 us, more than the rest of a small layer's forward)
    @staticmethod
    def forward(ctx, x, weight, bias, activation, backend, out_dtype):
        output = _linear_forward(x, weight, bias, activation, backend, out_dtype)
        _setup_context(ctx, (x, weight, bias, activation, backend, out_dtype), output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_pre):
        return _backward(ctx, grad_y, grad_pre)


def _all_plain(x, weight, bias) -> bool:
    """x, weight and bias (or None) are plain tensors: not FakeTensor, DTensor or another subclass."""
    plain = _checks.PLAIN_TYPES
    return type(x) in plain and type(weight) in plain and (bias is None or type(bias) in plain)


def _apply_linear(x, weight, bias, activation, backend, out_dtype=None):
    """mixprec::linear(x, weight, bias, activation, backend, out_dtype)[0], through _LinearFunction where plain eager
    execution allows it, else through the custom op (which torch.jit.trace, too, must record: a traced Python
    autograd.Function cannot be saved)."""
    if _all_plain(x, weight, bias) and x.device.type != "meta" and _checks.eager_unobserved():
        return _LinearFunction.apply(x, weight, bias, activation, backend, out_dtype)[0]
    return _linear_op(x, weight, bias, activation, backend, out_dtype)[0]


def _autocast(x, weight, bias):
    """torch.autocast's policy for linear ("lower precision fp"): inside an enabled autocast region for x's device
    type, every float16/bfloat16/float32 argument is cast to the region's dtype (float64 is left alone), so a
    float32 model runs the fused 16-bit kernel and returns the autocast dtype, as torch.nn.functional.linear does.
    (matmul_reference, the pure-torch path, switches autocast off around its fp32 ops.)"""
    if not autocast_on(x.device):
        return x, weight, bias
    dt = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t if t is None or t.dtype == dt or t.dtype not in (torch.float32, *OPERAND_DTYPES) else t.to(dt)

    return cast(x), cast(weight), cast(bias)


def _dtensor_linear(x, weight, bias, activation):
    """linear of DTensors (tensor parallelism: ColwiseParallel / RowwiseParallel shard a Linear's weight and wrap its
    input): torch's linear and activation ops, whose sharding DTensor propagates (the fused op has no sharding rule),
    so a converted layer computes what torch.nn.Linear followed by the activation computes, bit for bit: the product
    rounded to x's dtype, then the activation (two roundings where the fused kernel makes one). An fp32 bias is
    added to the rounded product in fp32, the activation applied in fp32, and the result rounded to x's dtype.
    Under RowwiseParallel the product is a Partial sum (each rank's share rounded to x's dtype first, as for torch's
    modules), and an activation fused into such a layer must see the whole sum: DTensor all-reduces before it, where
    torch's modules (the activation a module after the layer) reduce-scatter first under sequence parallelism, and
    the activation then runs on every rank's full output: keep activations out of row-wise layers there."""
    if bias is not None and bias.dtype != x.dtype:
        return apply_activation(torch.nn.functional.linear(x, weight).float() + bias, activation).to(x.dtype)
    return apply_activation(torch.nn.functional.linear(x, weight, bias), activation)


def _check_args(x, weight, bias):
    """The fused path's arguments, named as torch.nn.functional.linear names them (x, weight and bias are tensors,
    checked before the autocast cast). The errors are also RuntimeErrors, which torch's linear raises for them."""
    value_error, type_error = _checks.ValueAndRuntimeError, _checks.TypeAndRuntimeError
    if weight.dim() != 2:
        raise value_error(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise value_error(f"input must have shape (..., in_features) = (..., {weight.shape[1]}) to match weight "
                          f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise type_error(f"input ({x.dtype}) and weight ({weight.dtype}) must have the same dtype (inside "
                         "torch.autocast both are cast to its dtype)")
    if weight.device != x.device:
        raise value_error(f"weight must be on input's device {x.device}, got {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise value_error(f"bias must have shape (out_features,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise value_error(f"bias must be on input's device {x.device}, got {bias.device}")
        if bias.dtype not in (x.dtype, torch.float32):
            raise type_error(f"bias must be {x.dtype} (input's dtype) or float32, got {bias.dtype}")


def linear(x, weight, bias=None, activation=None, *, backend=None):
    """act(x @ weight.T + bias), like torch.nn.functional.linear followed by the activation, fused.

    Args:
        x: (..., in_features) or (in_features,), float16 or bfloat16 (float32 and float64 fall back to
            torch.nn.functional.linear). Inside torch.autocast, x, weight and bias are first cast to the autocast
            dtype, as torch does for linear (a float32 model then runs the fused kernel). Unlike torch's autocast,
            which caches the cast of a weight for the rest of the region, each call casts again: a layer called T
            times in one region (a shared or recurrent layer) keeps T 16-bit copies of its weight for backward.
        weight: (out_features, in_features), x's dtype.
        bias: optional (out_features,), x's dtype or float32 (with an activation, an fp32 bias's gradient is
            summed from fp32 copies of the output gradient and pre-activation: ~12 bytes of temporaries per output
            element in the backward, against 2 for a bias of x's dtype).
        activation: None, "relu", "gelu", "gelu_tanh" or "silu" (relu's gradient reads the output, as torch's relu
            does: an in-place write to it before backward raises there too).
        backend: as for mixprec_ops.matmul (forward and backward).

    Autograd: first and higher-order gradients on every backend (a double backward runs the products of the first
    backward through linear again). Under torch.func transforms (grad, vmap, jvp, jacfwd, ...) and forward-mode AD
    the forward's numerics run as plain torch ops (fp32 product, one rounding), which every transform supports;
    their gradients are torch autograd's of those ops, which round differently from the fused backward (within
    about one 16-bit ulp of the largest element). torch.compile of a torch.func transform over it runs eagerly
    (fullgraph=True fails: torch's custom-op autograd does not compose with torch.func).

    DTensor arguments (tensor parallelism: torch.distributed.tensor.parallel's ColwiseParallel / RowwiseParallel on
    a Linear) run torch's linear and then the activation, which DTensor knows how to shard: the result and the
    gradients are those of torch.nn.Linear followed by the activation, bit for bit (the product rounded to x's
    dtype before the activation), not the fused kernel's.
    """
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _checks.tensor(x, "input")
    _checks.tensor(weight, "weight")
    if bias is not None:
        _checks.tensor(bias, "bias")
    x, weight, bias = _autocast(x, weight, bias)
    if x.dtype == weight.dtype and x.dtype not in OPERAND_DTYPES:  # float32, float64: torch's linear (and checks)
        return apply_activation(torch.nn.functional.linear(x, weight, bias), activation)
    _check_args(x, weight, bias)
    if backends.transform_active():
        return matmul_reference(x, weight.t(), bias, activation)  # the fused op's numerics, in plain torch ops
    if not _all_plain(x, weight, bias) and any_dtensor((x, weight, bias)):
        return _dtensor_linear(x, weight, bias, activation)
    one_d = x.dim() == 1
    if one_d:
        x = x.unsqueeze(0)
    act = "none" if activation is None else activation
    y = _apply_linear(x, weight, bias, act, "" if backend is None else backend)
    return y.squeeze(0) if one_d else y
