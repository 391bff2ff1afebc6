"""Bit-exact fp32 -> bf16 / fp8 rounding in integer arithmetic, identical to torch's (c10's) own conversions.

Native casts would do on a GPU, but Triton's interpreter truncates fp32 -> bf16 and rounds fp8 differently
(shared/notes/environment.md); integer emulation gives the same bits on the interpreter and on every GPU, and
lets saturate=False follow the installed torch's fp8 overflow rule (NaN before torch 2.12, saturation after).
Each function returns the target's bit pattern in a uint32 tensor (the caller narrows and stores it).

The exception is f32_to_fp8_bits_native: the hardware conversion, for saturated values on sm_90+ GPUs only.
"""

import triton
import triton.language as tl


@triton.jit
def f32_to_bf16_bits(y):
    b = y.to(tl.uint32, bitcast=True)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    is_nan = (b & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, 0x7FC0, rounded)


@triton.jit
def f32_to_e4m3fn_bits(y, OVERFLOW_NAN: tl.constexpr):
    """c10::detail::fp8e4m3fn_from_fp32_value. OVERFLOW_NAN: the rule of torch < 2.12 (overflow and inf -> NaN)."""
    b = y.to(tl.uint32, bitcast=True)
    sign = b & 0x80000000
    b = b ^ sign
    # Subnormal range (< 2^-6): let the fp32 adder round, as c10 does.
    denorm_mask: tl.constexpr = 141 << 23
    dn = (b.to(tl.float32, bitcast=True) + tl.full(b.shape, denorm_mask, tl.uint32).to(tl.float32, bitcast=True))
    dn = dn.to(tl.uint32, bitcast=True) - denorm_mask
    # Normal range: rebias the exponent ((7 - 127) << 23, mod 2^32) and round to nearest even.
    mant_odd = (b >> 20) & 1
    nr = ((b + 0xC407FFFF + mant_odd) >> 20) & 0xFF
    if not OVERFLOW_NAN:
        nr = tl.where(nr == 0x7F, 0x7E, nr)
    r = tl.where(b < (121 << 23), dn & 0xFF, nr)
    if OVERFLOW_NAN:
        over = tl.full(b.shape, 0x7F, tl.uint32)
    else:
        over = tl.where(b > 0x7F800000, 0x7F, 0x7E)
    r = tl.where(b >= (1087 << 20), over, r)
    return r | (sign >> 24)


@triton.jit
def f32_to_e5m2_bits(y):
    """c10::detail::fp8e5m2_from_fp32_value (overflow -> inf, NaN -> NaN)."""
    b = y.to(tl.uint32, bitcast=True)
    sign = b & 0x80000000
    b = b ^ sign
    denorm_mask: tl.constexpr = 134 << 23
    dn = (b.to(tl.float32, bitcast=True) + tl.full(b.shape, denorm_mask, tl.uint32).to(tl.float32, bitcast=True))
    dn = dn.to(tl.uint32, bitcast=True) - denorm_mask
    # (15 - 127) << 23 mod 2^32 = 0xC8000000, plus the rounding bias 0xFFFFF.
    mant_odd = (b >> 21) & 1
    nr = ((b + 0xC80FFFFF + mant_odd) >> 21) & 0xFF
    r = tl.where(b < (113 << 23), dn & 0xFF, nr)
    r = tl.where(b >= (143 << 23), tl.where(b > 0x7F800000, 0x7F, 0x7C), r)
    return r | (sign >> 24)


@triton.jit
def f32_to_fp8_bits_native(y, FP8: tl.constexpr):
    """c10's fp8 bits (FP8: tl.float8e4nv or tl.float8e5) through the hardware conversion, for y already saturated
    (|y| <= the largest finite fp8 value, or NaN), compiled for sm_90+ and not interpreted.

    There Triton lowers the cast to cvt.rn.satfinite.{e4m3,e5m2}x2.f32 (two values per instruction instead of ~20
    integer ops each): round to nearest even like c10, and sign-magnitude like c10, so values rounding to zero keep
    their sign. On sm_89 Triton (3.6, 3.8) goes through fp16 (rz, then rn: double rounding), and the interpreter
    rounds differently (environment.md): neither gives c10's bits. NaN is rewritten to c10's 0x7F | sign: the
    hardware's NaN sign is not to be relied on.
    """
    bits = y.to(FP8).to(tl.uint8, bitcast=True).to(tl.uint32)
    nan = (y.to(tl.uint32, bitcast=True) >> 24) | 0x7F  # 0x7F with y's sign
    return tl.where(y != y, nan, bits)


@triton.jit
def e4m3fn_bits_to_f32(b):
    """fp32 value of e4m3fn bits (any integer tensor holding 0..255): exact, like c10's fp8e4m3fn_to_fp32_value (NaN
    for 0x7F / 0xFF, no infinities). Integer arithmetic, so the interpreter gives what a GPU gives."""
    b = b.to(tl.uint32) & 0xFF
    mag = b & 0x7F
    # exponent field e >= 1: rebias by 127 - 7 = 120 and move the 3 mantissa bits to the top of fp32's 23
    normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    sub = (mag & 7).to(tl.float32) * 0.001953125  # e == 0: mantissa * 2^-9 (exact)
    v = tl.where(mag < 8, sub, normal)
    v = tl.where(mag == 0x7F, float("nan"), v)
    # the sign as a bit (Triton 3.6's interpreter negates as 0 - v: -0.0 would come back +0.0)
    return (v.to(tl.uint32, bitcast=True) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def e5m2_bits_to_f32(b):
    """fp32 value of e5m2 bits (any integer tensor holding 0..255): e5m2 is the top byte of an fp16, so exact."""
    h = (b.to(tl.uint32) & 0xFF) << 8
    return h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
