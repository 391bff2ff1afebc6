"""matmul: out = cast(act(a @ b + bias)) with fp16/bf16 operands, fp32 accumulation and a fused epilogue.

Side by side: the reference (pure torch, fp32 arithmetic; the oracle and the CPU path), the CUDA ops
mixprec::matmul / matmul_pre / matmul_rowsum (cuBLASLt with its fused epilogues, csrc/cuda/matmul_cublaslt.cu;
schemas in csrc/schemas.cpp, fakes here), the Triton op mixprec::matmul_triton (kernel in triton_kernels/matmul.py)
and the public function. A private variant that also returns the pre-activation (acc + bias, cast) serves the
autograd of mixprec_ops.nn.functional.linear, and another one returns the row sums of a with the product (the bias
gradient from the weight-gradient GEMM, cuBLASLt's BGRADB epilogue on the cuda backend).
"""

from __future__ import annotations

import math

import torch

from .. import _checks, _ext, backends

OP = "matmul"
# "auto" on CUDA tensors: the cuBLASLt op, then Triton; CPU tensors get the reference (no CPU GEMM of our own).
backends.register_op(OP, ("cuda", "triton"))

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")
OPERAND_DTYPES = (torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The activation in y's dtype (fp32 in the reference)."""
    if activation is None:
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return torch.nn.functional.gelu(y)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(y)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_grad(pre: torch.Tensor, activation: str | None) -> torch.Tensor:
    """d act(p) / dp at p = pre (fp32 out), as differentiable torch ops: for a backward whose own graph is built
    (create_graph=True; aten's silu_backward has no derivative). Otherwise activation_backward is the fused form."""
    p = pre.float()
    if activation is None:
        return torch.ones_like(p)
    if activation == "relu":
        return (p > 0).to(p.dtype)
    if activation == "gelu":
        return 0.5 * (1.0 + torch.erf(p * (1.0 / math.sqrt(2.0)))) + p * torch.exp(-0.5 * p * p) / math.sqrt(
            2.0 * math.pi)
    if activation == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (p + 0.044715 * p * p * p))
        return 0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * p * p)
    if activation == "silu":
        s = torch.sigmoid(p)
        return s * (1.0 + p * (1.0 - s))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_backward(grad: torch.Tensor, pre: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(pre), as torch's own autograd computes it: one fused ATen kernel (gelu_backward, silu_backward,
    threshold_backward: fp32 arithmetic inside for 16-bit inputs, one rounding to grad's dtype; differentiable
    again, for a double backward). The derivative's formula as separate fp32 ops took ~12 passes over the tensor for
    gelu (bench/NOTES.md, "The activation's backward"). grad and pre have the same dtype."""
    aten = torch.ops.aten
    if activation == "relu":
        return aten.threshold_backward(grad, pre, 0)
    if activation == "gelu":
        return aten.gelu_backward(grad, pre)
    if activation == "gelu_tanh":
        return aten.gelu_backward(grad, pre, approximate="tanh")
    if activation == "silu":
        return aten.silu_backward(grad, pre)
    raise ValueError(f"activation must be one of {ACTIVATIONS[1:]}, got {activation!r}")


def autocast_on(device: torch.device) -> bool:
    """torch.is_autocast_enabled for the device's type; False for a type autocast does not know (meta, whose
    query raises)."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def matmul_reference(a, b, bias=None, activation=None, out_dtype=None, return_pre=False):
    """Pure-torch reference: fp32 product (a.float() @ b.float()), + bias.float(), activation in fp32, one cast.
    The same inside a torch.autocast region, which is switched off around it (its fp32 `@` would run in 16 bits
    and round the accumulator before the bias and the activation)."""
    if autocast_on(a.device):
        with torch.autocast(a.device.type, enabled=False):
            return matmul_reference(a, b, bias, activation, out_dtype, return_pre)
    out_dtype = a.dtype if out_dtype is None else out_dtype
    acc = a.float() @ b.float()
    if bias is not None:
        acc = acc + bias.float()
    y = apply_activation(acc, activation).to(out_dtype)
    # copy=True: with an fp32 output and no activation, y is acc itself, and pre must not alias it
    return (y, acc.to(out_dtype, copy=True)) if return_pre else y


def _as_2d(a):
    """a (..., M, K) as (rows, K): a view when the strides allow it (no copy), else a copy (reshape's rule; not a
    view attempt caught on failure: a fake tensor, under torch.compile, fails it with another exception type)."""
    if a.dim() == 2:
        return a
    rows = math.prod(a.shape[:-1])  # not -1: ambiguous when K == 0
    return a.reshape(rows, a.shape[-1])


if _ext.LOADED:  # the schemas exist whenever the extension loads (CUDA kernels or not)

    def _out_like(a, b, out_dtype):
        torch._check(a.dim() >= 2 and b.dim() == 2 and a.shape[-1] == b.shape[0],
                     lambda: f"matmul: bad shapes a {tuple(a.shape)}, b {tuple(b.shape)}")
        return a.new_empty((*a.shape[:-1], b.shape[1]), dtype=out_dtype)

    @torch.library.register_fake("mixprec::matmul")
    def _matmul_fake(a, b, bias, activation, out_dtype):
        return _out_like(a, b, out_dtype)

    @torch.library.register_fake("mixprec::matmul_pre")
    def _matmul_pre_fake(a, b, bias, activation, out_dtype):
        return _out_like(a, b, out_dtype), _out_like(a, b, out_dtype)

    @torch.library.register_fake("mixprec::matmul_rowsum")
    def _matmul_rowsum_fake(a, b, out_dtype):
        torch._check(a.dim() == 2, lambda: f"matmul_rowsum: a must be 2-D, got {tuple(a.shape)}")
        return _out_like(a, b, out_dtype), a.new_empty((a.shape[0],), dtype=out_dtype)


_triton_ops = None


def _get_triton_ops():
    """(mixprec::matmul_triton, mixprec::matmul_pre_triton), registered on first use (importing triton and
    torch.library.triton_op's machinery is slow: about 1 s on a CPU machine, most of it torch._dynamo), by _select,
    outside any torch.compile trace.

    On a GPU they are triton_ops: torch.compile sees through them to the kernel launch (wrap_triton). Under the
    Triton interpreter the kernels are Python functions that nothing can trace (wrap_triton hands them back as they
    are) and that need real storage, so there they are plain custom ops with fake implementations, which
    torch.compile keeps whole and runs on real tensors."""
    global _triton_ops
    if _triton_ops is None:
        from ..triton_kernels import INTERPRETED, wrap_triton
        from ..triton_kernels.matmul import launch_matmul

        def _run(a, b, bias, activation, out_dtype, with_pre):
            act = None if activation == "none" else activation
            a2 = _as_2d(a)
            out_shape = (*a.shape[:-1], b.shape[1])
            c = torch.empty((a2.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
            pre = torch.empty_like(c) if with_pre else None
            launch_matmul(a2, b, c, bias, act, pre=pre, wrap=wrap_triton)
            return c.view(out_shape), (pre.view(out_shape) if with_pre else None)

        def _new_out(a, b, out_dtype):
            return a.new_empty((*a.shape[:-1], b.shape[1]), dtype=out_dtype)

        def define(name, fn, fake):
            if not INTERPRETED:
                return torch.library.triton_op(name, mutates_args=())(fn)
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op

        def matmul_triton(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str,
                          out_dtype: torch.dtype) -> torch.Tensor:
            return _run(a, b, bias, activation, out_dtype, False)[0]

        def matmul_pre_triton(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str,
                              out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            return _run(a, b, bias, activation, out_dtype, True)

        _triton_ops = (
            define("mixprec::matmul_triton", matmul_triton, lambda a, b, bias, act, od: _new_out(a, b, od)),
            define("mixprec::matmul_pre_triton", matmul_pre_triton,
                   lambda a, b, bias, act, od: (_new_out(a, b, od), _new_out(a, b, od))),
        )
        from .._flops import count_flops, matmul_flops

        count_flops("matmul_triton", matmul_flops)
        count_flops("matmul_pre_triton", matmul_flops)
    return _triton_ops


_select = backends.selector(OP, _get_triton_ops)  # registers the Triton ops when it picks them


def _check(a, b, bias, activation, out_dtype):
    _checks.tensor(a, "a")
    _checks.tensor(b, "b")
    for t, name in ((a, "a"), (b, "b")):
        if t.dtype not in OPERAND_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16, got {t.dtype}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense strided tensor, got layout {t.layout}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got a {a.dtype} and b {b.dtype}")
    if a.dim() < 2:
        raise ValueError(f"a must have shape (M, K) or (..., M, K), got {tuple(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"b must have shape (K, N), got {tuple(b.shape)}")
    if a.shape[-1] != b.shape[0]:
        raise ValueError(f"a and b shapes do not match: a {tuple(a.shape)} has K={a.shape[-1]}, "
                         f"b {tuple(b.shape)} has K={b.shape[0]}")
    if b.device != a.device:
        raise ValueError(f"b must be on a's device {a.device}, got {b.device}")
    if bias is not None:
        _checks.tensor(bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != b.shape[1]:
            raise ValueError(f"bias must have shape (N,) = ({b.shape[1]},), got {tuple(bias.shape)}")
        if bias.dtype not in (a.dtype, torch.float32):
            raise TypeError(f"bias must be {a.dtype} (a's dtype) or float32, got {bias.dtype}")
        if bias.device != a.device:
            raise ValueError(f"bias must be on a's device {a.device}, got {bias.device}")
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be None (a's dtype), float16, bfloat16 or float32, got {out_dtype}")


def _dispatch(a, b, bias, activation, out_dtype, backend, return_pre):
    _check(a, b, bias, activation, out_dtype)
    out_dtype = a.dtype if out_dtype is None else out_dtype
    return _run(_select(a.device, backend), a, b, bias, activation, out_dtype, return_pre)


def _run(bk, a, b, bias, activation, out_dtype, return_pre):
    """The product on backend bk, arguments already checked and out_dtype resolved."""
    if bk == "cuda":
        act = "none" if activation is None else activation
        if return_pre:
            return torch.ops.mixprec.matmul_pre(a, b, bias, act, out_dtype)
        return torch.ops.mixprec.matmul(a, b, bias, act, out_dtype)
    if bk == "triton":
        from ..triton_kernels import device_guard

        mm, mm_pre = _get_triton_ops()  # registered by _select already: traced, this only reads them
        act = "none" if activation is None else activation
        with device_guard(a.device):
            return (mm_pre if return_pre else mm)(a, b, bias, act, out_dtype)
    return matmul_reference(a, b, bias, activation, out_dtype, return_pre=return_pre)


def matmul(a, b, *, bias=None, activation=None, out_dtype=None, backend=None):
    """Return cast(act(a @ b + bias)), accumulated in fp32, with the epilogue applied to the fp32 accumulator.

    Args:
        a: (M, K) or (..., M, K), float16 or bfloat16; any strides (a transposed a is read in place; a batched a
            whose leading dims cannot be flattened without a copy is copied).
        b: (K, N), same dtype as a, any strides (e.g. weight.t()).
        bias: optional (N,) tensor, a's dtype or float32, added in fp32.
        activation: None, "relu", "gelu" (erf), "gelu_tanh" or "silu", applied in fp32 after the bias.
        out_dtype: None (a's dtype), torch.float16, torch.bfloat16 or torch.float32.
        backend: "auto" (default, or MIXPREC_BACKEND): the cuBLASLt op ("cuda") for CUDA tensors, else Triton; the
            pure-torch reference ("torch") for CPU tensors; "triton" on CPU tensors only under the Triton interpreter.

    Returns:
        A new (..., M, N) tensor of out_dtype.

    Autograd: differentiable in a, b and bias on every backend (when inputs need grad the call runs as the op
    behind mixprec_ops.nn.functional.linear, mixprec::linear(a, b.T, ...), whose backward uses the same kernels;
    the gradients reaching a and b are rounded to their dtype). Under torch.func transforms and forward-mode AD
    the reference serves. Not differentiable: matmul_with_preactivation and matmul_and_rowsum (the building
    blocks of linear's forward and backward).
    """
    if backends.transform_active():
        _check(a, b, bias, activation, out_dtype)
        return matmul_reference(a, b, bias, activation, out_dtype)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (a, b, bias)):
        _check(a, b, bias, activation, out_dtype)
        from ..nn.functional import _apply_linear  # nn.functional imports this module

        act = "none" if activation is None else activation
        return _apply_linear(a, b.t(), bias, act, "" if backend is None else backend, out_dtype)
    return _dispatch(a, b, bias, activation, out_dtype, backend, False)


def matmul_with_preactivation(a, b, *, bias=None, activation=None, out_dtype=None, backend=None):
    """(matmul(...), cast(a @ b + bias)): the output and the pre-activation, from one call (one GEMM)."""
    return _dispatch(a, b, bias, activation, out_dtype, backend, True)


def matmul_and_rowsum(a, b, *, out_dtype=None, backend=None):
    """(matmul(a, b, out_dtype=out_dtype), a.float().sum(1).to(out_dtype)) for a 2-D a: with a = grad_out^T of a
    linear layer, its weight and bias gradients. On the cuda backend one cuBLASLt GEMM with the BGRADB epilogue
    (the sum is then done by cuBLASLt, in fp32, and rounded once); elsewhere the product and a separate sum."""
    _check(a, b, None, None, out_dtype)
    if a.dim() != 2:
        raise ValueError(f"a must have shape (M, K), got {tuple(a.shape)}")
    out_dtype = a.dtype if out_dtype is None else out_dtype
    return _rowsum_run(_select(a.device, backend), a, b, out_dtype)


def _rowsum_run(bk, a, b, out_dtype):
    """matmul_and_rowsum on backend bk, arguments already checked and out_dtype resolved."""
    if bk == "cuda":
        return torch.ops.mixprec.matmul_rowsum(a, b, out_dtype)
    # sum(dtype=float32): on a GPU accumulated in fp32 as the inputs are read, no fp32 copy of a (2 bytes read per
    # element of a 16-bit a instead of 2 + 4 written + 4 read); ATen's CPU sum makes that fp32 copy first
    return _run(bk, a, b, None, None, out_dtype, False), a.sum(1, dtype=torch.float32).to(out_dtype)
