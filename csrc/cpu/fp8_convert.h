// Branchless fp32 -> fp8 conversions, bit-identical to c10's (torch's own cast), written as straight-line integer
// code (selects by masks) so that the compiler vectorizes a loop over them; c10's scalar versions branch per
// element and run several times slower. Tested bit for bit against torch's cast on every class of input
// (tests/test_cast_and_scale.py).
#pragma once
#include <c10/util/Float8_e4m3fn.h>

#include <cstdint>

namespace mixprec::cpu {

// torch < 2.12 casts e4m3fn overflow (and inf) to NaN; later releases saturate. Follow the headers we build with.
inline bool e4m3fn_overflow_is_nan() {
  static const bool v = c10::Float8_e4m3fn(1.0e6f).isnan();
  return v;
}

namespace detail {
inline uint32_t mask_if(bool c) { return 0u - static_cast<uint32_t>(c); }
inline uint32_t select(bool c, uint32_t a, uint32_t b) { return (a & mask_if(c)) | (b & ~mask_if(c)); }
// Values below the smallest normal: adding 2^k (k chosen per format) makes the fp32 adder round the subnormal
// mantissa to nearest even; subtracting the bias bits leaves the fp8 pattern.
inline uint32_t subnormal_bits(uint32_t b, uint32_t denorm_mask) {
  return __builtin_bit_cast(uint32_t, __builtin_bit_cast(float, b) + __builtin_bit_cast(float, denorm_mask)) -
         denorm_mask;
}
}  // namespace detail

template <bool OVERFLOW_NAN>
inline uint8_t f32_to_e4m3fn_bits(float f) {
  using namespace detail;
  uint32_t b = __builtin_bit_cast(uint32_t, f);
  const uint32_t sign = b & 0x80000000u;
  b ^= sign;
  const uint32_t dn = subnormal_bits(b, 141u << 23) & 0xFFu;
  const uint32_t mant_odd = (b >> 20) & 1u;
  uint32_t nr = ((b + 0xC407FFFFu + mant_odd) >> 20) & 0xFFu;  // rebias exponent by (7 - 127), round to even
  if constexpr (!OVERFLOW_NAN) nr = select(nr == 0x7Fu, 0x7Eu, nr);  // rounding up into NaN saturates
  uint32_t r = select(b < (121u << 23), dn, nr);
  const uint32_t over = OVERFLOW_NAN ? 0x7Fu : select(b > 0x7F800000u, 0x7Fu, 0x7Eu);
  r = select(b >= (1087u << 20), over, r);
  return static_cast<uint8_t>(r | (sign >> 24));
}

inline uint8_t f32_to_e5m2_bits(float f) {
  using namespace detail;
  uint32_t b = __builtin_bit_cast(uint32_t, f);
  const uint32_t sign = b & 0x80000000u;
  b ^= sign;
  const uint32_t dn = subnormal_bits(b, 134u << 23) & 0xFFu;
  const uint32_t mant_odd = (b >> 21) & 1u;
  const uint32_t nr = ((b + 0xC80FFFFFu + mant_odd) >> 21) & 0xFFu;  // rebias by (15 - 127), round to even
  uint32_t r = select(b < (113u << 23), dn, nr);
  r = select(b >= (143u << 23), select(b > 0x7F800000u, 0x7Fu, 0x7Cu), r);
  return static_cast<uint8_t>(r | (sign >> 24));
}

}  // namespace mixprec::cpu
