// AVX-512 fp32 -> fp8 conversion, 16 lanes at a time: the rounding of fp8_convert_avx2.h (the fp32 adder rounds
// |y| to the format's mantissa, ties to even; see there) with mask registers for the selects and vpmovdb for the
// narrowing. Bit-identical to c10's conversion (torch's cast) and to the AVX2 and scalar versions:
// tests/native/fp8_avx2_exhaustive.cpp checks every one of the 2^32 fp32 inputs where the CPU has AVX-512.
//
// Compiled with function target attributes, not -mavx512* (avx512_util.h): call only after avx512_enabled().
#pragma once
#include "avx512_util.h"
#if defined(MIXPREC_HAVE_AVX512)

namespace mixprec::cpu::avx512 {

// FMT: 0 = e4m3fn with torch < 2.12's overflow rule (overflow and inf -> NaN), 1 = e4m3fn saturating (later torch),
// 2 = e5m2 (overflow -> inf). SAT: the caller has clamped y to +-(largest finite fp8) (NaN stays NaN), so only NaN
// needs the overflow branch. Returns the 16 fp8 bit patterns, in order.
template <int FMT, bool SAT = false>
MIXPREC_AVX512 inline __m128i f32_to_fp8_bytes(__m512 y) {
  constexpr bool kE5 = FMT == 2;
  constexpr int kMant = kE5 ? 2 : 3;
  constexpr int32_t kMinNormalExp = kE5 ? 113 : 121;  // biased fp32 exponent of 2^-14 / 2^-6
  constexpr int32_t kRebias = kE5 ? 112 : 120;         // 127 - fp8 bias
  constexpr int32_t kOverflow = kE5 ? (143 << 23) : (1087 << 20);  // |y| from here on: c10's overflow branch
  const __m512i b = _mm512_castps_si512(y);
  const __m512i a = _mm512_and_si512(b, i32(INT32_MAX));
  const __m512i e = _mm512_and_si512(a, i32(0x7F800000));
  const __m512 magic =
      _mm512_castsi512_ps(_mm512_add_epi32(_mm512_max_epi32(e, i32(kMinNormalExp << 23)), i32((23 - kMant) << 23)));
  const __m512 r = _mm512_sub_ps(_mm512_add_ps(_mm512_castsi512_ps(a), magic), magic);
  const __m512i rb = _mm512_castps_si512(r);
  const __m512i normal = _mm512_srli_epi32(_mm512_sub_epi32(rb, i32(kRebias << 23)), 23 - kMant);
  const __m512i sub = _mm512_cvttps_epi32(_mm512_mul_ps(r, _mm512_set1_ps(kE5 ? 65536.0f : 512.0f)));
  __m512i out = _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(rb, i32(kMinNormalExp << 23)), normal, sub);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(a, i32(0x7F800000));
  if constexpr (SAT) {  // in range: no rounding into NaN or inf; NaN -> 0x7F in all three formats
    out = _mm512_mask_mov_epi32(out, nan, i32(0x7F));
  } else {
    __m512i over;
    if constexpr (FMT == 0) {
      over = i32(0x7F);
    } else if constexpr (FMT == 1) {
      out = _mm512_mask_mov_epi32(out, _mm512_cmpeq_epi32_mask(out, i32(0x7F)), i32(0x7E));  // rounding into NaN
      over = _mm512_mask_blend_epi32(nan, i32(0x7E), i32(0x7F));
    } else {
      over = _mm512_mask_blend_epi32(nan, i32(0x7C), i32(0x7F));
    }
    out = _mm512_mask_mov_epi32(out, _mm512_cmpge_epi32_mask(a, i32(kOverflow)), over);
  }
  // The sign bit (b's bit 31) to bit 7: out | ((b >> 24) & 0x80), one ternary-logic op for the and-or.
  out = _mm512_ternarylogic_epi32(out, _mm512_srli_epi32(b, 24), i32(0x80), 0xF8);  // A | (B & C)
  return _mm512_cvtepi32_epi8(out);
}

}  // namespace mixprec::cpu::avx512
#endif
