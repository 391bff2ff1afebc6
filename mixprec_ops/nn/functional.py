"""linear(x, weight, bias, activation) = act(x @ weight.T + bias) on the fused matmul, with autograd.

The forward and its gradient are one custom op, mixprec::linear, with torch.library.register_autograd, so
torch.compile(fullgraph=True) traces through it without a graph break (the op is opaque to the compiler; its fake
implementation gives the shapes). The op returns (y, pre): pre is the pre-activation x @ weight.T + bias (cast to
x's dtype, stored by the same kernel launch), saved for the activation's gradient; it is empty when there is no
activation. Backward, every product accumulated in fp32 by the matmul op (cuBLASLt or Triton on a GPU, the fp32
reference on CPU), transposes read in place:
    g     = grad_y * act'(pre)        (in fp32, then rounded to x's dtype, as torch's own autograd does)
    dx    = g @ weight                (..., out) @ (out, in)
    dw    = g2d.T @ x2d               (out, rows) @ (rows, in)
    dbias = g2d.float().sum(0)
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

from ..ops.matmul import (ACTIVATIONS, _as_2d, activation_grad, apply_activation, matmul, matmul_and_rowsum,
                          matmul_with_preactivation)


def _bk(backend: str):
    return None if backend == "" else backend


@torch.library.custom_op("mixprec::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    act = None if activation == "none" else activation
    if act is None:
        y = matmul(x, weight.t(), bias=bias, backend=_bk(backend))
        return y, y.new_empty(0)
    y, pre = matmul_with_preactivation(x, weight.t(), bias=bias, activation=act, backend=_bk(backend))
    return y, pre


@_linear_op.register_fake
def _(x, weight, bias, activation, backend):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, (x.new_empty(0) if activation == "none" else torch.empty_like(y))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.activation = None if activation == "none" else activation
    ctx.backend = _bk(backend)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y, grad_pre):
    x, weight, pre = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    g = grad_y
    if ctx.activation is not None:
        g = (g.float() * activation_grad(pre, ctx.activation)).to(x.dtype)
    elif g.dtype != x.dtype:
        g = g.to(x.dtype)
    g2 = _as_2d(g)  # (rows, out); not reshape(-1, out): ambiguous when out_features == 0
    need_b = need_b and ctx.bias_dtype is not None
    dx = matmul(g, weight, backend=ctx.backend) if need_x else None
    dw = db = None
    if need_w:
        x2 = _as_2d(x)
        if need_b and ctx.bias_dtype == weight.dtype:  # dbias from the wgrad GEMM (BGRADB on cuda)
            dw, db = matmul_and_rowsum(g2.t(), x2, out_dtype=weight.dtype, backend=ctx.backend)
        else:
            dw = matmul(g2.t(), x2, out_dtype=weight.dtype, backend=ctx.backend)
    if need_b and db is None:
        db = g2.float().sum(0).to(ctx.bias_dtype)
    return dx, dw, db, None, None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def linear(x, weight, bias=None, activation=None, *, backend=None):
    """act(x @ weight.T + bias), like torch.nn.functional.linear followed by the activation, fused.

    Args:
        x: (..., in_features), float16 or bfloat16 (float32 falls back to torch.nn.functional.linear).
        weight: (out_features, in_features), x's dtype.
        bias: optional (out_features,), x's dtype or float32.
        activation: None, "relu", "gelu", "gelu_tanh" or "silu".
        backend: as for mixprec_ops.matmul (forward and backward).
    """
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and weight.dtype == torch.float32:
        return apply_activation(torch.nn.functional.linear(x, weight, bias), activation)
    if isinstance(weight, torch.Tensor) and weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    return _linear_op(x, weight, bias, "none" if activation is None else activation,
                      "" if backend is None else backend)[0]
