// AVX2 fp32 -> fp8 conversions, 8 lanes at a time, bit-identical to c10's (torch's own cast) and to the scalar ones
// in fp8_convert.h: tests/test_native_exhaustive.py checks every one of the 2^32 fp32 inputs. Instead of emulating
// round-to-nearest-even in integer arithmetic (~25 ops a lane), the fp32 adder does it: for |y| with exponent e,
// (|y| + 2^(e' + 23 - m)) - 2^(e' + 23 - m) rounds |y| to m mantissa bits (ties to even), where e' = max(e, the
// format's smallest normal exponent), so subnormal results get the fixed subnormal quantum. The rounded value is
// then exactly representable: normals take their bits by rebiasing the exponent, subnormals by r * 2^(bias + m - 1).
// Inputs that are NaN, inf or too large are replaced afterwards by selects, so the adder's results there (with an
// overflowed magic number) never matter. Works under any MXCSR flush-to-zero / denormals-are-zero setting: fp32
// subnormal inputs round to (signed) zero either way, and the magic numbers and results are normal or zero.
#pragma once
#if defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>

namespace mixprec::cpu::avx2 {

inline __m256i i32(int32_t v) { return _mm256_set1_epi32(v); }

// FMT: 0 = e4m3fn with torch < 2.12's overflow rule (overflow and inf -> NaN), 1 = e4m3fn saturating (later torch),
// 2 = e5m2 (overflow -> inf). SAT: the caller has clamped y to +-(largest finite fp8) (NaN stays NaN), so only NaN
// needs the overflow branch. Returns the 8 fp8 bit patterns in the low byte of each 32-bit lane.
template <int FMT, bool SAT = false>
inline __m256i f32_to_fp8_bits(__m256 y) {
  constexpr bool kE5 = FMT == 2;
  constexpr int kMant = kE5 ? 2 : 3;
  constexpr int32_t kMinNormalExp = kE5 ? 113 : 121;  // biased fp32 exponent of 2^-14 / 2^-6
  constexpr int32_t kRebias = kE5 ? 112 : 120;         // 127 - fp8 bias
  constexpr int32_t kOverflow = kE5 ? (143 << 23) : (1087 << 20);  // |y| from here on: c10's overflow branch
  const __m256i b = _mm256_castps_si256(y);
  const __m256i sign = _mm256_and_si256(b, i32(INT32_MIN));
  const __m256i a = _mm256_xor_si256(b, sign);
  const __m256i e = _mm256_and_si256(a, i32(0x7F800000));
  const __m256 magic =
      _mm256_castsi256_ps(_mm256_add_epi32(_mm256_max_epi32(e, i32(kMinNormalExp << 23)), i32((23 - kMant) << 23)));
  const __m256 r = _mm256_sub_ps(_mm256_add_ps(_mm256_castsi256_ps(a), magic), magic);
  const __m256i rb = _mm256_castps_si256(r);
  const __m256i normal = _mm256_srli_epi32(_mm256_sub_epi32(rb, i32(kRebias << 23)), 23 - kMant);
  const __m256i sub = _mm256_cvttps_epi32(_mm256_mul_ps(r, _mm256_set1_ps(kE5 ? 65536.0f : 512.0f)));
  __m256i out = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(i32(kMinNormalExp << 23), rb));
  const __m256i nan = _mm256_cmpgt_epi32(a, i32(0x7F800000));
  if constexpr (SAT) {  // in range: no rounding into NaN or inf; NaN -> 0x7F in all three formats
    return _mm256_or_si256(_mm256_blendv_epi8(out, i32(0x7F), nan), _mm256_srli_epi32(sign, 24));
  }
  __m256i over;
  if constexpr (FMT == 0) {
    over = i32(0x7F);
  } else if constexpr (FMT == 1) {
    out = _mm256_blendv_epi8(out, i32(0x7E), _mm256_cmpeq_epi32(out, i32(0x7F)));  // rounding up into NaN saturates
    over = _mm256_blendv_epi8(i32(0x7E), i32(0x7F), nan);
  } else {
    over = _mm256_blendv_epi8(i32(0x7C), i32(0x7F), nan);
  }
  out = _mm256_blendv_epi8(out, over, _mm256_cmpgt_epi32(a, i32(kOverflow - 1)));
  return _mm256_or_si256(out, _mm256_srli_epi32(sign, 24));
}

// Stores 32 bytes: the low bytes of the lanes of q0..q3 (values 0..255), in order.
inline void store_bytes32(uint8_t* dst, __m256i q0, __m256i q1, __m256i q2, __m256i q3) {
  const __m256i w01 = _mm256_packus_epi32(q0, q1);  // per 128-bit half: q0 lanes, q1 lanes
  const __m256i w23 = _mm256_packus_epi32(q2, q3);
  const __m256i bytes = _mm256_packus_epi16(w01, w23);  // half 0: q0[0:4] q1[0:4] q2[0:4] q3[0:4]; half 1: [4:8]
  const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), ordered);
}

}  // namespace mixprec::cpu::avx2
#endif
