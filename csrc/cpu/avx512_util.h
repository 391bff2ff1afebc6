// Shared pieces of the AVX-512 kernels (cast_and_scale_avx512.cpp, cast_and_scale_backward_avx512.cpp,
// unscale_avx512.cpp): the target attribute, loads and stores of 16 lanes, and when the casts stream their outputs.
// The library is compiled for AVX2 (-mavx2); every function here and in those files carries MIXPREC_AVX512 (a
// function target attribute) and may only run after avx512_enabled() (cpu_isa.h).
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MIXPREC_HAVE_AVX512 1
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "prefetch.h"  // kCastStreamMin

#define MIXPREC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace mixprec::cpu::avx512 {

MIXPREC_AVX512 inline __m512i i32(int32_t v) { return _mm512_set1_epi32(v); }

// 16 fp16 or bf16 patterns as fp32 (exact).
template <typename T>
MIXPREC_AVX512 inline __m512 widen16(__m256i h) {
  if constexpr (std::is_same_v<T, c10::Half>) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 elements of T (float, c10::Half or c10::BFloat16) as fp32 (exact); the masked form reads only the lanes in m
// and zeroes the others.
template <typename T>
MIXPREC_AVX512 inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) return _mm512_maskz_loadu_ps(m, p);
  else return widen16<T>(_mm256_maskz_loadu_epi16(m, p));
}
template <typename T>
MIXPREC_AVX512 inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) return _mm512_loadu_ps(p);
  else return widen16<T>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// fp32 -> bf16 bits, round to nearest even as c10 does ((u + 0x7FFF + lsb) >> 16, overflow rounding to inf); a NaN
// keeps its sign and top payload bits, made quiet (c10 writes 0x7FC0, torch's vectorized casts other patterns:
// every test compares NaNs as NaNs).
MIXPREC_AVX512 inline __m256i f32_to_bf16_bits(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), i32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, i32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q),
                            _mm512_or_si512(_mm512_srli_epi32(u, 16), i32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// 16 fp32 lanes rounded to T's 16-bit patterns (round to nearest even; fp16 by vcvtps2ph, which is IEEE and so
// c10's rounding).
template <typename T>
MIXPREC_AVX512 inline __m256i f32_to_16bit(__m512 y) {
  if constexpr (std::is_same_v<T, c10::Half>) return _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  else return f32_to_bf16_bits(y);
}

}  // namespace mixprec::cpu::avx512
#endif
