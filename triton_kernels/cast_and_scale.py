"""Triton kernels of cast_and_scale: y = cast(x * scale) and amax = max(amax, max|x|) in one pass; and its backward,
grad_x = (unsaturated ? grad_y : 0) * scale in x's dtype, in one pass."""

import math

import torch
import triton
import triton.language as tl

from . import INTERPRETED, device_capability as _capability
from .fp_convert import (
    e4m3fn_bits_to_f32,
    e5m2_bits_to_f32,
    f32_to_bf16_bits,
    f32_to_e4m3fn_bits,
    f32_to_e5m2_bits,
    f32_to_fp8_bits_native,
)

# Output kinds (constexpr): how the fp32 result is rounded and stored.
_OUT_KIND = {torch.float16: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}
# Bit container the result is stored through (bf16 and fp8 bits come from fp_convert's functions).
_STORE_VIEW = {torch.float16: torch.float16, torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8,
               torch.float8_e5m2: torch.uint8}


def _torch_e4m3_overflow_is_nan() -> bool:
    """torch < 2.12 casts fp32 overflow (and inf) to e4m3fn NaN; later releases saturate. Follow the installed one."""
    return bool(torch.tensor([1e6]).to(torch.float8_e4m3fn).float().isnan().item())


E4M3_OVERFLOW_NAN = _torch_e4m3_overflow_is_nan()


@triton.jit
def _cast_and_scale_kernel(x_ptr, y_ptr, n, scale_ptr, scale_value, amax_ptr, fmax,
                           HAS_SCALE: tl.constexpr, HAS_AMAX: tl.constexpr, SAT: tl.constexpr,
                           KEEP_INF: tl.constexpr, OUT_KIND: tl.constexpr, OVERFLOW_NAN: tl.constexpr,
                           NATIVE_FP8: tl.constexpr, SRC_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _load_f32(x_ptr, offs, mask, 2 if SRC_BF16 else 0)  # bf16 arrives as int16 bits
    # fp32 whatever the launch typed it: Inductor types a Python float argument fp64 (torch's
    # config._use_fp64_for_unbacked_floats), which made y fp64 and the fp8 bit conversion fail to compile.
    fmax = tl.full((), fmax, tl.float32)
    if HAS_AMAX:
        # |x| as int32 bits: order-preserving for non-negative floats, NaN above inf (propagates like torch.amax).
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        tl.atomic_max(amax_ptr, tl.max(tl.where(mask, bits, 0), axis=0))
    if HAS_SCALE:
        s = tl.load(scale_ptr)
    else:
        s = tl.full((), scale_value, tl.float32)  # the interpreter passes Python floats as fp64 scalars
    y = x * s
    if SAT:
        over = tl.abs(y) > fmax
        if KEEP_INF:
            over = over & (tl.abs(y) != float("inf"))
        y = tl.where(over, tl.where(y > 0, fmax, fmax * -1.0), y)  # no unary minus: tests/test_triton_compile.py
    if OUT_KIND == 0:
        out = y.to(tl.float16)
    elif OUT_KIND == 1:
        out = f32_to_bf16_bits(y).to(tl.uint16).to(tl.int16, bitcast=True)
    elif NATIVE_FP8:
        out = f32_to_fp8_bits_native(y, tl.float8e4nv if OUT_KIND == 2 else tl.float8e5).to(tl.uint8)
    elif OUT_KIND == 2:
        out = f32_to_e4m3fn_bits(y, OVERFLOW_NAN).to(tl.uint8)
    else:
        out = f32_to_e5m2_bits(y).to(tl.uint8)
    tl.store(y_ptr + offs, out, mask=mask)


FINITE_MAX = {d: torch.finfo(d).max for d in _OUT_KIND}


def _native_fp8(x, dtype, saturate) -> bool:
    """Round with the hardware conversion (fp_convert.f32_to_fp8_bits_native, which says why only here): saturated
    fp8 targets on an NVIDIA sm_90+ GPU, not interpreted (ROCm also reports CUDA devices, with capabilities such as
    (9, 4): its fp8 lowering was never checked, so it keeps the integer path)."""
    return (bool(saturate) and dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and not INTERPRETED and x.is_cuda
            and torch.version.hip is None and _capability(x.device) >= (9, 0))


def _signed_zero_as_tensor(scale, scale_value, device):
    """The scale the launchers pass: a scalar -0.0 as a 1-element tensor, since -0.0 as a scalar argument arrives as
    +0.0 (seen under the interpreter) and its sign shows in the output's zeros; anything else as it is."""
    if scale is None and scale_value == 0.0 and math.copysign(1.0, scale_value) < 0:
        return torch.full((1,), -0.0, dtype=torch.float32, device=device)
    return scale


def launch_cast_and_scale(x, y, scale, scale_value, amax, saturate, wrap=lambda k: k, block=4096):
    """x: dense (walkable) tensor; y: empty_like(x, dtype) (same strides). `wrap` is torch.library.wrap_triton
    when called from a triton_op. `block`: elements a program (a power of two); the op always takes 4096, the
    benchmark also times 8192 for 2-byte sources (bench/cases_cast.py)."""
    n = x.numel()
    if n == 0:
        return
    dtype = y.dtype
    scale = _signed_zero_as_tensor(scale, scale_value, x.device)
    grid = (triton.cdiv(n, block),)
    wrap(_cast_and_scale_kernel)[grid](
        x.view(torch.int16) if x.dtype == torch.bfloat16 else x, y.view(_STORE_VIEW[dtype]), n,
        scale if scale is not None else x, float(scale_value),
        amax.view(torch.int32) if amax is not None else x, FINITE_MAX[dtype],
        HAS_SCALE=scale is not None, HAS_AMAX=amax is not None, SAT=bool(saturate),
        KEEP_INF=dtype in (torch.float16, torch.bfloat16), OUT_KIND=_OUT_KIND[dtype],
        OVERFLOW_NAN=E4M3_OVERFLOW_NAN, NATIVE_FP8=_native_fp8(x, dtype, saturate), SRC_BF16=x.dtype == torch.bfloat16,
        BLOCK=block, num_warps=8,
    )


# How the backward reads a tensor (constexpr kind) and the container it is passed through: bf16 and fp8 as bits
# (the interpreter's bf16 load flushes subnormals, and it has no fp8 type at all).
_IN_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3, torch.float8_e5m2: 4}
_IN_VIEW = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.int16,
            torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


@triton.jit
def _load_f32(ptr, offs, mask, KIND: tl.constexpr):
    """Elements at ptr + offs as fp32, exactly: KIND 0/1 a float32/float16 pointer; 2 bf16 passed as int16 bits,
    widened by shifting (the interpreter's bf16 load flushes subnormals); 3/4 e4m3fn/e5m2 passed as uint8 bits."""
    if KIND == 2:
        b = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        v = (b << 16).to(tl.float32, bitcast=True)
    elif KIND == 3:
        v = e4m3fn_bits_to_f32(tl.load(ptr + offs, mask=mask, other=0))
    elif KIND == 4:
        v = e5m2_bits_to_f32(tl.load(ptr + offs, mask=mask, other=0))
    else:
        v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _cast_and_scale_backward_kernel(g_ptr, x_ptr, out_ptr, n, scale_ptr, scale_value, fmax,
                                    HAS_SCALE: tl.constexpr, SAT: tl.constexpr, KEEP_INF: tl.constexpr,
                                    G_KIND: tl.constexpr, X_KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_SCALE:
        s = tl.load(scale_ptr)
    else:
        s = tl.full((), scale_value, tl.float32)  # the interpreter passes Python floats as fp64 scalars
    g = _load_f32(g_ptr, offs, mask, G_KIND)
    fmax = tl.full((), fmax, tl.float32)  # as in the forward: an fp64 bound would compare |x * s| in fp64
    if SAT:
        a = tl.abs(_load_f32(x_ptr, offs, mask, X_KIND) * s)
        passes = a <= fmax  # NaN: False
        if KEEP_INF:
            passes = passes | (a == float("inf"))
        g = tl.where(passes, g, 0.0)
    out = g * s
    if X_KIND == 1:
        out = out.to(tl.float16)
    elif X_KIND == 2:
        out = f32_to_bf16_bits(out).to(tl.uint16).to(tl.int16, bitcast=True)
    tl.store(out_ptr + offs, out, mask=mask)


def launch_cast_and_scale_backward(grad_y, x, out, dtype, scale, scale_value, saturate, wrap=lambda k: k):
    """grad_y and x walked linearly in one memory order (_backward_layout); out: empty_like(x). `wrap` is
    torch.library.wrap_triton when called from a triton_op."""
    n = x.numel()
    if n == 0:
        return
    scale = _signed_zero_as_tensor(scale, scale_value, x.device)
    block = 4096
    wrap(_cast_and_scale_backward_kernel)[(triton.cdiv(n, block),)](
        grad_y.view(_IN_VIEW[grad_y.dtype]), x.view(_IN_VIEW[x.dtype]), out.view(_IN_VIEW[out.dtype]), n,
        scale if scale is not None else x, float(scale_value), FINITE_MAX[dtype],
        HAS_SCALE=scale is not None, SAT=bool(saturate), KEEP_INF=dtype in (torch.float16, torch.bfloat16),
        G_KIND=_IN_KIND[grad_y.dtype], X_KIND=_IN_KIND[x.dtype], BLOCK=block, num_warps=8,
    )
