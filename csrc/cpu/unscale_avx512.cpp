// AVX-512 path of the CPU unscale_ kernel for fp16 and bf16 tensors: 16 lanes a vector, so the widening, the
// multiply and the rounding back take half the instructions of the AVX2 loop (unscale.cpp), whose results it
// reproduces: the same values (a NaN's payload aside: avx512_util.h), found_inf, and the norm bit for bit. Target
// attributes, not build flags (avx512_util.h): runs only when avx512_enabled() says so. (fp32 tensors stay on the
// AVX2 loop: they stream at the memory's rate already.)
#include "unscale_avx512.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../common.h"
#include "avx512_util.h"
#include "prefetch.h"

namespace mixprec::cpu {

#if defined(MIXPREC_HAVE_AVX512)

namespace {

using namespace avx512;

constexpr int64_t kFlush = 1024;  // as unscale.cpp: 8 fp32 lane sums flushed into the fp64 total this often

// One vector of up to 16 elements at p (the lanes in m): unscaled, max|v| folded into amax_bits (integer max on the
// bits of |v|: NaN above inf), squares added to the 8 lane sums in the AVX2 loop's order (its lane j takes elements
// j, j + 8, j + 16, ... one addition at a time: the low 8 of this vector, then the high 8), stored back.
template <typename T, bool WRITE, bool NORM, bool FULL>
MIXPREC_AVX512 inline void step(T* p, __mmask16 m, __m512 s, __m512i& amax_bits, __m256& sq) {
  const __m512 v = _mm512_mul_ps(FULL ? load16(p) : load16(p, m), s);
  amax_bits = _mm512_max_epi32(amax_bits, _mm512_and_si512(_mm512_castps_si512(v), i32(INT32_MAX)));
  if constexpr (NORM) {
    const __m512 v2 = _mm512_mul_ps(v, v);
    sq = _mm256_add_ps(sq, _mm512_castps512_ps256(v2));
    if (FULL || (m >> 8)) {  // the high 256 bits (extractf64x4 is AVX-512F; extractf32x8 would need DQ)
      sq = _mm256_add_ps(sq, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v2), 1)));
    }
  }
  if constexpr (WRITE) {
    const __m256i q = f32_to_16bit<T>(v);
    if constexpr (FULL) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), q);
    else _mm256_mask_storeu_epi16(p, m, q);
  }
}

template <typename T, bool WRITE, bool NORM>
MIXPREC_AVX512 void range(T* p, int64_t n, float inv, double* sumsq, bool* nonfinite) {
  const __m512 s = _mm512_set1_ps(inv);
  __m512i amax_bits = _mm512_setzero_si512();
  float lanes[8];
  int64_t i = 0;
  // Blocks of kFlush elements, as the AVX2 loop makes them: whole vectors of 8 (here 16, then at most one 8 under a
  // mask) up to the last multiple of 8, then the scalar tail.
  while (i + 8 <= n) {
    __m256 sq = _mm256_setzero_ps();
    const int64_t stop = std::min(n, i + kFlush);
    for (; i + 16 <= stop; i += 16) {
      prefetch_stream<16>(p, i);  // a later block (prefetch.h)
      step<T, WRITE, NORM, true>(p + i, 0xFFFF, s, amax_bits, sq);
    }
    if (i + 8 <= stop) {
      step<T, WRITE, NORM, false>(p + i, 0x00FF, s, amax_bits, sq);
      i += 8;
    }
    if constexpr (NORM) {
      _mm256_storeu_ps(lanes, sq);
      for (int l = 0; l < 8; ++l) *sumsq += lanes[l];
    }
  }
  float tail_max = 0.0f;
  for (; i < n; ++i) {  // the AVX2 loop's scalar tail, statement for statement
    float v = static_cast<float>(p[i]) * inv;
    tail_max = (std::isnan(v) || std::fabs(v) > tail_max) ? std::fabs(v) : tail_max;
    if constexpr (NORM) *sumsq += v * v;
    if constexpr (WRITE) p[i] = static_cast<T>(v);
  }
  const int32_t bits = _mm512_reduce_max_epi32(amax_bits);
  float vmax;
  std::memcpy(&vmax, &bits, 4);
  *nonfinite |= !(tail_max < OverflowAt<T>::value) || !(vmax < OverflowAt<T>::value);
}

}  // namespace

template <typename T>
void unscale_16bit_avx512(T* p, int64_t n, float inv, bool write, bool want_norm, double* sumsq, bool* nonfinite) {
  if (write) {
    if (want_norm) return range<T, true, true>(p, n, inv, sumsq, nonfinite);
    return range<T, true, false>(p, n, inv, sumsq, nonfinite);
  }
  if (want_norm) return range<T, false, true>(p, n, inv, sumsq, nonfinite);
  range<T, false, false>(p, n, inv, sumsq, nonfinite);
}

#else  // not x86-64 GCC/Clang: no AVX-512 path

template <typename T>
void unscale_16bit_avx512(T*, int64_t, float, bool, bool, double*, bool*) {
  TORCH_CHECK(false, "mixprec: this build has no AVX-512 path");
}

#endif

template void unscale_16bit_avx512(c10::Half*, int64_t, float, bool, bool, double*, bool*);
template void unscale_16bit_avx512(c10::BFloat16*, int64_t, float, bool, bool, double*, bool*);

}  // namespace mixprec::cpu
