// AVX-512 path of the CPU cast_and_scale kernel for fp8 targets: load, max|x|, scale, clamp and round in one loop,
// 16 elements a vector, the tail under a mask (no scalar loop). The library is compiled for AVX2; these functions
// carry target attributes (MIXPREC_AVX512) and run only when avx512_enabled() says so.
#include "cast_and_scale_avx512.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fp8_convert_avx512.h"

namespace mixprec::cpu {

#if defined(MIXPREC_HAVE_AVX512)

bool avx512_enabled() {
  static const bool capable = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") && at::get_cpu_capability().rfind("AVX512", 0) == 0;
  if (!capable) return false;
  const char* isa = std::getenv("MIXPREC_CPU_ISA");
  return isa == nullptr || std::strcmp(isa, "avx2") != 0;
}

namespace {

using namespace avx512;

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task, as in cast_and_scale.cpp

// 16 elements of Src as fp32 (exact); the masked form reads only the lanes in m and zeroes the others.
template <typename Src>
MIXPREC_AVX512 inline __m512 load16(const Src* p, __mmask16 m) {
  if constexpr (std::is_same_v<Src, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    if constexpr (std::is_same_v<Src, c10::Half>) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}
template <typename Src>
MIXPREC_AVX512 inline __m512 load16(const Src* p) {
  if constexpr (std::is_same_v<Src, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<Src, c10::Half>) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// Folds |v| into amax_bits (the bits of |x| as int32 order like the floats, NaN above inf, so a NaN propagates
// through an integer max), then scales, clamps (max/min return their second operand on NaN: y second keeps a NaN)
// and rounds to fp8.
template <int FMT, bool SAT>
MIXPREC_AVX512 inline __m128i step(__m512 v, __m512 s, __m512 lo, __m512 hi, __m512i& amax_bits) {
  amax_bits = _mm512_max_epi32(amax_bits, _mm512_and_si512(_mm512_castps_si512(v), i32(INT32_MAX)));
  __m512 y = _mm512_mul_ps(v, s);
  if constexpr (SAT) y = _mm512_min_ps(hi, _mm512_max_ps(lo, y));
  return f32_to_fp8_bytes<FMT, SAT>(y);
}

template <int FMT, bool SAT, typename Src>
MIXPREC_AVX512 float range(const Src* x, uint8_t* out, int64_t n, float scale, float fmax) {
  const __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(fmax), lo = _mm512_set1_ps(-fmax);
  __m512i amax_bits = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {  // four vectors an iteration: independent chains for the out-of-order core
    const __m128i q0 = step<FMT, SAT>(load16(x + i), s, lo, hi, amax_bits);
    const __m128i q1 = step<FMT, SAT>(load16(x + i + 16), s, lo, hi, amax_bits);
    const __m128i q2 = step<FMT, SAT>(load16(x + i + 32), s, lo, hi, amax_bits);
    const __m128i q3 = step<FMT, SAT>(load16(x + i + 48), s, lo, hi, amax_bits);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), q0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16), q1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 32), q2);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 48), q3);
  }
  for (; i + 16 <= n; i += 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), step<FMT, SAT>(load16(x + i), s, lo, hi, amax_bits));
  }
  if (i < n) {  // masked lanes load as 0 (no effect on max|x|) and are not stored
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m128i q = step<FMT, SAT>(load16(x + i, m), s, lo, hi, amax_bits);
    _mm_mask_storeu_epi8(out + i, m, q);
  }
  const int32_t bits = _mm512_reduce_max_epi32(amax_bits);
  float a;
  std::memcpy(&a, &bits, 4);
  return a;
}

template <int FMT, bool SAT, typename Src>
float run(const Src* x, uint8_t* out, int64_t numel, float scale, float fmax) {
  const int64_t ntasks = at::divup(numel, kGrain);
  std::vector<float> partial(std::max<int64_t>(ntasks, 1), 0.0f);
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t lo = begin * kGrain, hi = std::min(numel, end * kGrain);
    partial[begin] = range<FMT, SAT>(x + lo, out + lo, hi - lo, scale, fmax);
  });
  float m = 0.0f;
  for (float p : partial) m = (std::isnan(p) || p > m) ? p : m;
  return m;
}

}  // namespace

template <typename Src>
float cast_to_fp8_avx512(const Src* x, uint8_t* out, int64_t n, float scale, bool saturate, float fmax, int fmt) {
  switch (fmt * 2 + saturate) {
    case 0: return run<0, false>(x, out, n, scale, fmax);
    case 1: return run<0, true>(x, out, n, scale, fmax);
    case 2: return run<1, false>(x, out, n, scale, fmax);
    case 3: return run<1, true>(x, out, n, scale, fmax);
    case 4: return run<2, false>(x, out, n, scale, fmax);
    case 5: return run<2, true>(x, out, n, scale, fmax);
    default: TORCH_CHECK(false, "mixprec: cast_to_fp8_avx512: bad format ", fmt);
  }
}

#else  // not x86-64 GCC/Clang: no AVX-512 path

bool avx512_enabled() { return false; }

template <typename Src>
float cast_to_fp8_avx512(const Src*, uint8_t*, int64_t, float, bool, float, int) {
  TORCH_CHECK(false, "mixprec: this build has no AVX-512 path");
}

#endif

template float cast_to_fp8_avx512(const float*, uint8_t*, int64_t, float, bool, float, int);
template float cast_to_fp8_avx512(const c10::Half*, uint8_t*, int64_t, float, bool, float, int);
template float cast_to_fp8_avx512(const c10::BFloat16*, uint8_t*, int64_t, float, bool, float, int);

}  // namespace mixprec::cpu
