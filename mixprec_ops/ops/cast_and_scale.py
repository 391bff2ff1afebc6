"""cast_and_scale: y = cast(x * scale) to fp16/bf16/fp8 in one pass, with an optional running amax of |x|.

Side by side: the reference (pure torch, the oracle and the fallback), the fake (meta) implementation of the C++
op mixprec::cast_and_scale (schema in csrc/schemas.cpp; CPU kernel csrc/cpu/cast_and_scale.cpp; CUDA kernel
csrc/cuda/cast_and_scale.cu), the Triton op mixprec::cast_and_scale_triton (kernel in
triton_kernels/cast_and_scale.py), and the public function.
"""

from __future__ import annotations

import math
import numbers
import struct

import torch

from .. import _checks, _ext, backends

OP = "cast_and_scale"
backends.register_op(OP, ("cuda", "triton", "cpu"))

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def cast_and_scale_reference(x, dtype, scale=None, scale_value=1.0, amax=None, saturate=True):
    """Pure-torch reference. `scale` is a 1-element fp32 tensor or None (then `scale_value`, a Python float)."""
    xf = x.float()
    if amax is not None and x.numel() > 0:
        amax.copy_(torch.maximum(amax, xf.abs().amax().reshape(amax.shape)))  # NaN propagates
    # torch.full, not torch.tensor(..., device=): no host-to-device copy (no sync; capturable in a CUDA graph)
    s = scale.reshape(()) if scale is not None else torch.full((), scale_value, dtype=torch.float32, device=x.device)
    y = xf * s  # fp32 product: one rounding, then one more in the cast
    if saturate:
        # Values the saturation leaves unchanged pass through, and their gradient with them (the backward's rule,
        # whatever torch version: torch.clamp's own backward passes nothing at a bound in 2.14, all of it in 2.11).
        # The rest (beyond max, fp8's inf, NaN) takes the clamp, whose gradient is 0 there.
        fmax = torch.finfo(dtype).max
        y = torch.where(_unsaturated(y, dtype), y, y.clamp(-fmax, fmax))  # NaN stays NaN
    return y.to(dtype)


def _unsaturated(y, dtype):
    """Where saturating to dtype leaves the fp32 y = x * scale as it is: |y| <= dtype's largest finite value, and
    inf too for a 16-bit dtype (which keeps it); not NaN. What passes its gradient, in the reference and in
    _CastAndScale.backward alike."""
    passes = y.abs() <= torch.finfo(dtype).max
    if dtype not in _FP8:
        passes = passes | y.isinf()
    return passes


def _fp32_value(v: float) -> float:
    """v rounded to fp32 (to nearest even), as every backend multiplies by it: a value beyond fp32's range is inf
    (as the fp32 product x * v would be), a tiny one a subnormal or zero. Done here, once, so that the backends
    agree (the reference's torch.full raised on overflow, Triton typed such floats as fp64)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # rounds to inf
        return math.copysign(math.inf, v)


def _walkable(x):
    """x itself if its elements fill one run of memory (then empty_like keeps its strides), else a copy."""
    return x if torch.ops.aten.is_non_overlapping_and_dense(x) else x.contiguous()


if _ext.LOADED:

    @torch.library.register_fake("mixprec::cast_and_scale")
    def _cast_and_scale_fake(x, dtype, scale, scale_value, amax, saturate):
        _checks.float_tensor(x, "x")
        _checks.cast_target(dtype)
        # Mixed devices can route a real call here (a meta scale with a CPU x): refuse it, not a silent no-op.
        _checks.device_scalar(scale, "scale", x.device, allow_none=True)
        _checks.device_scalar(amax, "amax", x.device, allow_none=True)
        return torch.empty_like(_walkable(x), dtype=dtype)


_triton_op = None


def _get_triton_op():
    """mixprec::cast_and_scale_triton, registered on first use (importing triton is slow) by _select, outside any
    torch.compile trace. On a GPU a triton_op (torch.compile sees through it to the kernel launch); under the Triton
    interpreter, whose kernels are Python functions nothing can trace and which need real storage, a custom op with
    a fake implementation (kept whole by torch.compile, run on real tensors)."""
    global _triton_op
    if _triton_op is None:
        from ..triton_kernels import INTERPRETED, wrap_triton
        from ..triton_kernels.cast_and_scale import launch_cast_and_scale

        def cast_and_scale_triton(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None,
                                  scale_value: float, amax: torch.Tensor | None, saturate: bool) -> torch.Tensor:
            x = _walkable(x)
            y = torch.empty_like(x, dtype=dtype)
            launch_cast_and_scale(x, y, scale, scale_value, amax, saturate, wrap=wrap_triton)
            return y

        name = "mixprec::cast_and_scale_triton"
        if INTERPRETED:
            op = torch.library.custom_op(name, mutates_args={"amax"})(cast_and_scale_triton)
            op.register_fake(lambda x, dtype, *rest: torch.empty_like(_walkable(x), dtype=dtype))
        else:
            op = torch.library.triton_op(name, mutates_args={"amax"})(cast_and_scale_triton)
        _triton_op = op
    return _triton_op


_select = backends.selector(OP, _get_triton_op)  # registers the Triton op when it picks it


def cast_and_scale(x, dtype, scale=None, *, amax=None, saturate=True, backend=None):
    """Return cast(x * scale) in `dtype`, computed in one pass.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape; contiguous or not (a dense permuted layout such as a
            transpose is read in place and the output keeps its strides; other layouts are copied first).
        dtype: torch.float16, torch.bfloat16, torch.float8_e4m3fn or torch.float8_e5m2.
        scale: None (1.0), a Python float, or a 1-element float32 tensor on x's device (read on the device: no
            host sync). The product x * scale is computed in fp32 and rounded once, to nearest even, into dtype.
        amax: optional 1-element float32 tensor on x's device holding a non-negative value; updated in place to
            max(amax, max|x|) over the unscaled x, so it accumulates across calls. NaN in x makes it NaN.
        saturate: if True, finite values beyond dtype's range become +-(largest finite value of dtype); for fp8
            targets +-inf saturates too, for 16-bit targets inf stays inf. NaN stays NaN. If False, the cast is
            torch's own `.to(dtype)` (whose fp8 e4m3fn overflow rule changed in torch 2.12: NaN before, saturation
            after; every backend follows the installed torch).
        backend: "auto" (default, or the MIXPREC_BACKEND environment variable), "cuda", "triton", "cpu" or
            "torch"; see mixprec_ops.backends.

    Returns:
        A new tensor of `dtype` with x's shape.

    Autograd: differentiable in x and in a tensor scale, identically on every backend: the rounding passes the
    gradient straight through, a value the saturation changed (|x * scale| beyond dtype's largest finite value;
    fp8's inf) or a NaN passes none, one at exactly the largest finite value passes it (torch.clamp's own gradient
    at a bound is all of it in torch 2.11 and none in 2.14; this rule does not follow it). amax must not share
    memory with x or scale (ValueError).
    """
    _checks.float_tensor(x, "x")
    _checks.cast_target(dtype)
    if scale is None:
        scale_t, scale_value = None, 1.0
    elif isinstance(scale, torch.Tensor):
        _checks.device_scalar(scale, "scale", x.device)
        scale_t, scale_value = scale, 1.0
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale_t, scale_value = None, _fp32_value(float(scale))
    else:
        raise TypeError(f"scale must be None, a Python float or a 1-element float32 tensor, got {type(scale).__name__}")
    _checks.device_scalar(amax, "amax", x.device, allow_none=True, contiguous=True)
    if amax is not None:  # the kernels read x and scale while amax is being written
        _checks.disjoint(amax, "amax", x, "x")
        if scale_t is not None:
            _checks.disjoint(amax, "amax", scale_t, "scale")
    _checks.boolean(saturate, "saturate")
    b = _select(x.device, backend)
    if backends.transform_active():  # torch.func / forward AD: the reference's own autograd serves every transform
        return cast_and_scale_reference(x, dtype, scale_t, scale_value, amax, saturate)
    if torch.is_grad_enabled() and (x.requires_grad or (scale_t is not None and scale_t.requires_grad)):
        return _CastAndScale.apply(x, dtype, scale_t, scale_value, amax, saturate, b)
    return _forward(x, dtype, scale_t, scale_value, amax, saturate, b)


def _forward(x, dtype, scale_t, scale_value, amax, saturate, b):
    if b == "torch":
        return cast_and_scale_reference(x, dtype, scale_t, scale_value, amax, saturate)
    if b == "triton":
        from ..triton_kernels import device_guard

        with device_guard(x.device):
            return _get_triton_op()(x, dtype, scale_t, scale_value, amax, saturate)
    return torch.ops.mixprec.cast_and_scale(x, dtype, scale_t, scale_value, amax, saturate)


class _CastAndScale(torch.autograd.Function):
    """The gradient of y = cast(x * scale), the same on every backend (the reference's own autograd, in closed
    form): rounding passes the gradient straight through, as torch's `.to(dtype)` does; a value saturated to
    dtype's largest finite value gets none, one at exactly that value all (an inf kept by a 16-bit target too).
    grad_x = (grad_y * scale * m).to(x.dtype), grad_scale = sum(grad_y * x * m) in fp32, m = 1 where not
    saturated. amax is a side output, not differentiated."""

    # forward(ctx, ...), no separate setup_context: with one defined, Function.apply binds its arguments through
    # inspect.signature on every call (~30 us of host time; torch.func transforms, which would need the separate
    # form, run the reference instead)
    @staticmethod
    def forward(ctx, x, dtype, scale_t, scale_value, amax, saturate, b):
        ctx.save_for_backward(x, scale_t)
        ctx.dtype, ctx.scale_value, ctx.saturate = dtype, scale_value, saturate
        return _forward(x, dtype, scale_t, scale_value, amax, saturate, b)

    @staticmethod
    def backward(ctx, grad_y):
        """In few passes over the tensor: the scale as an fp32 tensor with x's dims, all of size 1, which (unlike a
        0-dim tensor or a Python float) takes part in type promotion, so that x * s and grad * s compute in fp32
        straight from x's and the grad's own dtypes (on a GPU, no fp32 copies of x and of the grad), and grad_x is
        stored into x's dtype by the product itself (one rounding from fp32, as .to()). For a bf16 x and grad and an
        fp8 target: 5 elementwise passes (product, abs, compare, select, scaled store) instead of the formula's 8
        in fp32. On a CPU, TensorIterator still makes the fp32 temporaries: same bits, no gain there."""
        x, scale_t = ctx.saved_tensors
        dims = [1] * x.dim()
        s = scale_t.reshape(dims) if scale_t is not None else torch.full(dims, ctx.scale_value, dtype=torch.float32,
                                                                           device=x.device)
        # a 0-dim x leaves s 0-dim, which does not promote: widen that one element instead; fp8 grads: few kernels
        # take them
        xs, g = (x, grad_y) if x.dim() > 0 else (x.float(), grad_y.float())
        if g.dtype not in _checks.FLOAT_SOURCES:
            g = g.float()
        if ctx.saturate:
            y = torch.mul(xs, s)  # fp32: the forward's product
            g = torch.where(_unsaturated(y, ctx.dtype), g, 0.0)  # a select in g's dtype: values move unrounded
        grad_x = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph=True: differentiable ops (an out= product is not)
                grad_x = (g * s).to(x.dtype)
            else:
                grad_x = torch.empty_like(x)
                torch.mul(g, s, out=grad_x)  # fp32 product, rounded once into x's dtype
        grad_s = None
        if scale_t is not None and ctx.needs_input_grad[2]:
            grad_s = (g.float() * x).sum().reshape(scale_t.shape)
        return grad_x, None, grad_s, None, None, None, None
