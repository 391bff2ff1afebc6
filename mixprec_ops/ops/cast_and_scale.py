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
        # The rest (beyond max, fp8's inf, NaN) takes the clamp, and no gradient: the clamped branch is detached, so
        # autograd does not add its zeros to the passing gradient (which would turn a -0.0 gradient into +0.0).
        fmax = torch.finfo(dtype).max
        y = torch.where(_unsaturated(y, dtype), y, y.detach().clamp(-fmax, fmax))  # NaN stays NaN
    return y.to(dtype)


def _unsaturated(y, dtype):
    """Where saturating to dtype leaves the fp32 y = x * scale as it is: |y| <= dtype's largest finite value, and
    inf too for a 16-bit dtype (which keeps it); not NaN. What passes its gradient, in the reference and in
    _CastAndScale.backward alike."""
    passes = y.abs() <= torch.finfo(dtype).max
    if dtype not in _FP8:
        passes = passes | y.isinf()
    return passes


def cast_and_scale_backward_reference(grad_y, x, dtype, scale=None, scale_value=1.0, saturate=True):
    """Pure-torch reference of the backward: grad_x of y = cast_and_scale(x, dtype, scale, saturate=saturate) for
    the gradient grad_y of y, in x's dtype. The rounding passes the gradient straight through (as torch's
    `.to(dtype)` does); with saturate, an element whose x * scale the saturation changed (or NaN) passes none
    (_unsaturated): grad_x = (m ? grad_y : 0) * scale, the product in fp32, rounded once into x's dtype.
    Differentiable (it serves create_graph=True).

    The scale is an fp32 tensor with x's dims, all of size 1, which (unlike a 0-dim tensor or a Python float) takes
    part in type promotion: x * s and g * s compute in fp32 straight from x's and the grad's own dtypes."""
    dims = [1] * x.dim()
    s = scale.reshape(dims) if scale is not None else torch.full(dims, scale_value, dtype=torch.float32,
                                                                  device=x.device)
    # a 0-dim x leaves s 0-dim, which does not promote: widen that one element instead; fp8 grads: few kernels
    # take them
    xs, g = (x, grad_y) if x.dim() > 0 else (x.float(), grad_y.float())
    if g.dtype not in _checks.FLOAT_SOURCES:
        g = g.float()
    if saturate:
        g = torch.where(_unsaturated(torch.mul(xs, s), dtype), g, 0.0)  # a select in g's dtype: values unrounded
    return (g * s).to(x.dtype)


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
    return x if _checks.walkable(x) else x.contiguous()


def _backward_layout(x, grad_y):
    """(x, grad_y) as the backward kernels walk them, both linearly in one memory order: as they are when x is
    walkable and grad_y shares its strides, else both contiguous. csrc/common.h's backward_layout is the same rule."""
    if _checks.walkable(x) and _checks.walkable(grad_y) and x.stride() == grad_y.stride():
        return x, grad_y
    return x.contiguous(), grad_y.contiguous()


_GRAD_DTYPES = (*_checks.FLOAT_SOURCES, *_FP8)


def _check_backward_args(grad_y, x, dtype):
    _checks.float_tensor(x, "x")
    _checks.cast_target(dtype)
    _checks.tensor(grad_y, "grad_y")
    if grad_y.dtype not in _GRAD_DTYPES:
        raise TypeError(f"grad_y must be float32, float16, bfloat16, float8_e4m3fn or float8_e5m2, got {grad_y.dtype}")
    if grad_y.layout != torch.strided:
        raise TypeError(f"grad_y must be a dense strided tensor, got layout {grad_y.layout}")
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    if grad_y.device != x.device:
        raise ValueError(f"grad_y must be on {x.device} (x's device), got {grad_y.device}")


if _ext.LOADED:

    @torch.library.register_fake("mixprec::cast_and_scale_backward")
    def _cast_and_scale_backward_fake(grad_y, x, dtype, scale, scale_value, saturate):
        _check_backward_args(grad_y, x, dtype)
        _checks.device_scalar(scale, "scale", x.device, allow_none=True)
        return torch.empty_like(_backward_layout(x, grad_y)[0])

    @torch.library.register_fake("mixprec::cast_and_scale")
    def _cast_and_scale_fake(x, dtype, scale, scale_value, amax, saturate):
        _checks.float_tensor(x, "x")
        _checks.cast_target(dtype)
        # Mixed devices can route a real call here (a meta scale with a CPU x): refuse it, not a silent no-op.
        _checks.device_scalar(scale, "scale", x.device, allow_none=True)
        _checks.device_scalar(amax, "amax", x.device, allow_none=True)
        return torch.empty_like(_walkable(x), dtype=dtype)


_triton_op = None
_triton_backward_op = None


def _get_triton_op():
    """mixprec::cast_and_scale_triton, registered on first use (importing triton is slow) by _select, outside any
    torch.compile trace. On a GPU a triton_op (torch.compile sees through it to the kernel launch); under the Triton
    interpreter, whose kernels are Python functions nothing can trace and which need real storage, a custom op with
    a fake implementation (kept whole by torch.compile, run on real tensors)."""
    global _triton_op, _triton_backward_op
    if _triton_op is None:
        from ..triton_kernels import INTERPRETED, wrap_triton
        from ..triton_kernels.cast_and_scale import launch_cast_and_scale, launch_cast_and_scale_backward

        def cast_and_scale_triton(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None,
                                  scale_value: float, amax: torch.Tensor | None, saturate: bool) -> torch.Tensor:
            x = _walkable(x)
            y = torch.empty_like(x, dtype=dtype)
            launch_cast_and_scale(x, y, scale, scale_value, amax, saturate, wrap=wrap_triton)
            return y

        def cast_and_scale_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
                                           scale: torch.Tensor | None, scale_value: float,
                                           saturate: bool) -> torch.Tensor:
            x, grad_y = _backward_layout(x, grad_y)
            out = torch.empty_like(x)
            launch_cast_and_scale_backward(grad_y, x, out, dtype, scale, scale_value, saturate, wrap=wrap_triton)
            return out

        name = "mixprec::cast_and_scale_triton"
        bname = "mixprec::cast_and_scale_backward_triton"
        if INTERPRETED:
            op = torch.library.custom_op(name, mutates_args={"amax"})(cast_and_scale_triton)
            op.register_fake(lambda x, dtype, *rest: torch.empty_like(_walkable(x), dtype=dtype))
            bop = torch.library.custom_op(bname, mutates_args=())(cast_and_scale_backward_triton)
            bop.register_fake(lambda grad_y, x, *rest: torch.empty_like(_backward_layout(x, grad_y)[0]))
        else:
            op = torch.library.triton_op(name, mutates_args={"amax"})(cast_and_scale_triton)
            bop = torch.library.triton_op(bname, mutates_args=())(cast_and_scale_backward_triton)
        _triton_backward_op = bop
        _triton_op = op  # last: the `is None` test above then means both are registered
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
    at a bound is all of it in torch 2.11 and none in 2.14; this rule does not follow it). x's gradient is one
    fused pass (cast_and_scale_backward). Note that torch's autograd hands every gradient over in its tensor's
    dtype: the gradient reaching an fp8 y has been rounded to that fp8 format, as for any fp8 tensor in a graph
    (beyond e4m3fn's +-448 it saturates from torch 2.12 and becomes NaN before: scale the loss, or keep fp8 casts
    out of the differentiated path and cast gradients explicitly, e.g. to e5m2 with a scale of their own). amax must
    not share memory with x or scale (ValueError).
    """
    _checks.float_tensor(x, "x")
    _checks.cast_target(dtype)
    scale_t, scale_value = _scale_args(scale, x)
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


def _scale_args(scale, x):
    """(scale_t, scale_value) of the ops' schema from the public `scale` argument."""
    if scale is None:
        return None, 1.0
    if isinstance(scale, torch.Tensor):
        _checks.device_scalar(scale, "scale", x.device)
        return scale, 1.0
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        return None, _fp32_value(float(scale))
    raise TypeError(f"scale must be None, a Python float or a 1-element float32 tensor, got {type(scale).__name__}")


def cast_and_scale_backward(grad_y, x, dtype, scale=None, *, saturate=True, backend=None):
    """grad_x of y = cast_and_scale(x, dtype, scale, saturate=saturate) for the gradient grad_y of y, in one pass:
    what autograd runs for x's gradient (see cast_and_scale_backward_reference for the rule).

    Args:
        grad_y: of x's shape and device; float32, float16, bfloat16, float8_e4m3fn or float8_e5m2 (autograd hands
            back a gradient of y's dtype).
        x, dtype, scale, saturate: as the forward call had them.
        backend: as for cast_and_scale.

    Returns:
        A new tensor of x's dtype and shape: on the kernel backends with x's strides when grad_y shares them, else
        contiguous; on "torch", laid out by torch's own elementwise rules.
    """
    _check_backward_args(grad_y, x, dtype)
    scale_t, scale_value = _scale_args(scale, x)
    _checks.boolean(saturate, "saturate")
    return _backward(grad_y, x, dtype, scale_t, scale_value, saturate, _select(x.device, backend))


def _backward(grad_y, x, dtype, scale_t, scale_value, saturate, b):
    if b == "torch":
        return cast_and_scale_backward_reference(grad_y, x, dtype, scale_t, scale_value, saturate)
    if b == "triton":
        from ..triton_kernels import device_guard

        _get_triton_op()
        with device_guard(x.device):
            return _triton_backward_op(grad_y, x, dtype, scale_t, scale_value, saturate)
    return torch.ops.mixprec.cast_and_scale_backward(grad_y, x, dtype, scale_t, scale_value, saturate)


def _forward(x, dtype, scale_t, scale_value, amax, saturate, b):
    if b == "torch":
        return cast_and_scale_reference(x, dtype, scale_t, scale_value, amax, saturate)
    if amax is None and torch.compiler.is_compiling():
        # Inductor (torch.compile's default backend) fails on a custom op whose mutable Optional[Tensor] argument is
        # None ("AssertionError: <built-in function getitem> is not an OpOverload"; torch 2.11 and 2.14 alike, a
        # pure-torch reproduction in bench/NOTES.md). A scratch amax avoids it: the kernels' max over |x| costs no
        # extra memory traffic, and nothing else changes.
        amax = torch.zeros(1, dtype=torch.float32, device=x.device)
    if b == "triton":
        from ..triton_kernels import device_guard

        with device_guard(x.device):
            return _get_triton_op()(x, dtype, scale_t, scale_value, amax, saturate)
    return torch.ops.mixprec.cast_and_scale(x, dtype, scale_t, scale_value, amax, saturate)


@torch.library.custom_op("mixprec::scale_snapshot", mutates_args=())
def _scale_snapshot(t: torch.Tensor) -> torch.Tensor:
    """A copy of t that torch.compile's partitioner cannot move into the backward graph (see _CastAndScale.forward)."""
    return t.clone()


_scale_snapshot.register_fake(lambda t: torch.empty_like(t))


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
        # The scale as it is now: the backward must use the forward's value, and scales are state that changes in
        # place (a recipe's next quantize() or update() rewrites its scale before this backward runs: saved as is,
        # eager autograd then raised a version-counter error and a compiled graph used the new value, silently).
        # Compiled, through an opaque op: torch's partitioner moves an aten copy (clone, s * 1, ...) of a graph input
        # that the graph later mutates into the backward graph, where it reads the mutated input (torch 2.11 and
        # 2.14, aot_eager and Inductor alike; a pure-torch reproduction in bench/NOTES.md). A scale that requires grad
        # (learned, not a recipe's state) is saved as it is, as torch's ops save theirs: double backward needs it.
        snap = scale_t
        if scale_t is not None and not scale_t.requires_grad:
            snap = _scale_snapshot(scale_t) if torch.compiler.is_compiling() else scale_t.clone()
        ctx.save_for_backward(x, snap)
        ctx.dtype, ctx.scale_value, ctx.saturate, ctx.backend = dtype, scale_value, saturate, b
        return _forward(x, dtype, scale_t, scale_value, amax, saturate, b)

    @staticmethod
    def backward(ctx, grad_y):
        """grad_x in one pass (cast_and_scale_backward, on the forward's backend; with create_graph=True the
        reference, whose ops are differentiable). grad_scale, rarely wanted, in eager passes."""
        x, scale_t = ctx.saved_tensors
        grad_x = grad_s = None
        if ctx.needs_input_grad[0]:
            b = "torch" if torch.is_grad_enabled() else ctx.backend
            grad_x = _backward(grad_y, x, ctx.dtype, scale_t, ctx.scale_value, ctx.saturate, b)
        if scale_t is not None and ctx.needs_input_grad[2]:
            g = grad_y if grad_y.dtype in _checks.FLOAT_SOURCES else grad_y.float()
            if ctx.saturate:
                g = torch.where(_unsaturated(x.float() * scale_t.reshape(()), ctx.dtype), g, 0.0)
            grad_s = (g.float() * x).sum().reshape(scale_t.shape)
        return grad_x, None, grad_s, None, None, None, None
