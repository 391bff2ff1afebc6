// AVX-512 path of the CPU cast_and_scale kernel: load, max|x|, scale, clamp and round in one loop, 16 elements a
// vector, the tail under a mask (no scalar loop), for every source and target. Target attributes, not build flags
// (avx512_util.h): runs only when avx512_enabled() says so.
#include "cast_and_scale_avx512.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fp8_convert_avx512.h"
#include "prefetch.h"

namespace mixprec::cpu {

#if defined(MIXPREC_HAVE_AVX512)

namespace {

using namespace avx512;

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task, as in cast_and_scale.cpp

// Targets: FMT 0-2 are the fp8 formats of f32_to_fp8_bytes (16 bytes a vector), 3 = bfloat16, 4 = float16 (16
// halfwords a vector, in a 256-bit register).
constexpr int kBF16 = 3, kF16 = 4;
// (A specialization, not std::conditional_t: a vector type as a template argument drops its may_alias attribute,
// which GCC warns about.)
template <bool Wide>
struct PackedOf {
  using type = __m128i;
};
template <>
struct PackedOf<true> {
  using type = __m256i;
};
template <int FMT>
using Packed = typename PackedOf<(FMT >= kBF16)>::type;

// Folds |v| into amax_bits (the bits of |x| as int32 order like the floats, NaN above inf, so a NaN propagates
// through an integer max), then scales, clamps (max/min return their second operand on NaN: y second keeps a NaN;
// 16-bit targets keep an infinite product, fp8 ones clamp it too) and rounds to the target.
template <int FMT, bool SAT>
MIXPREC_AVX512 inline Packed<FMT> step(__m512 v, __m512 s, __m512 lo, __m512 hi, __m512i& amax_bits) {
  const __m512i abs_bits = _mm512_and_si512(_mm512_castps_si512(v), i32(INT32_MAX));
  amax_bits = _mm512_max_epi32(amax_bits, abs_bits);
  __m512 y = _mm512_mul_ps(v, s);
  if constexpr (SAT) {
    const __m512 c = _mm512_min_ps(hi, _mm512_max_ps(lo, y));
    if constexpr (FMT >= kBF16) {
      const __mmask16 inf = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(y), i32(INT32_MAX)),
                                                    i32(0x7F800000));
      y = _mm512_mask_mov_ps(c, inf, y);
    } else {
      y = c;
    }
  }
  if constexpr (FMT == kBF16) {
    return f32_to_16bit<c10::BFloat16>(y);
  } else if constexpr (FMT == kF16) {
    return f32_to_16bit<c10::Half>(y);
  } else {
    return f32_to_fp8_bytes<FMT, SAT>(y);
  }
}

template <int FMT>
MIXPREC_AVX512 inline void store(void* out, int64_t i, Packed<FMT> q) {
  if constexpr (FMT >= kBF16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), q);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(out) + i), q);
}

// A 16-bit target's vector stored past the cache (see kCastStreamMin); blocks() writes whole 64-byte lines.
template <int FMT>
MIXPREC_AVX512 inline void stream(void* out, int64_t i, Packed<FMT> q) {
  static_assert(FMT >= kBF16, "only 16-bit targets are streamed");
  _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), q);
}

template <int FMT>
MIXPREC_AVX512 inline void store_masked(void* out, int64_t i, __mmask16 m, Packed<FMT> q) {
  if constexpr (FMT >= kBF16) _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, m, q);
  else _mm_mask_storeu_epi8(static_cast<uint8_t*>(out) + i, m, q);
}

// Elements [0, 64 * (n / 64)): four vectors an iteration (independent chains for the out-of-order core), their input
// requested kPrefetchBytes ahead; Stream: their stores bypass the cache. Returns the elements done.
template <int FMT, bool SAT, bool Stream, typename Src>
MIXPREC_AVX512 inline int64_t blocks(const Src* x, void* out, int64_t n, __m512 s, __m512 lo, __m512 hi,
                                     __m512i& amax_bits) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    prefetch_ahead<64 * sizeof(Src)>(x + i);
    Packed<FMT> q[4];
    for (int u = 0; u < 4; ++u) q[u] = step<FMT, SAT>(load16(x + i + 16 * u), s, lo, hi, amax_bits);
    for (int u = 0; u < 4; ++u) {
      if constexpr (Stream) stream<FMT>(out, i + 16 * u, q[u]);
      else store<FMT>(out, i + 16 * u, q[u]);
    }
  }
  if constexpr (Stream) _mm_sfence();  // weakly ordered: visible before this task's work is done
  return i;
}

template <int FMT, bool SAT, typename Src>
MIXPREC_AVX512 float range(const Src* x, void* out, int64_t n, float scale, float fmax, bool stream_out) {
  const __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(fmax), lo = _mm512_set1_ps(-fmax);
  __m512i amax_bits = _mm512_setzero_si512();
  int64_t i;
  if constexpr (FMT >= kBF16) {
    i = stream_out && reinterpret_cast<uintptr_t>(out) % 64 == 0
            ? blocks<FMT, SAT, true>(x, out, n, s, lo, hi, amax_bits)
            : blocks<FMT, SAT, false>(x, out, n, s, lo, hi, amax_bits);
  } else {
    i = blocks<FMT, SAT, false>(x, out, n, s, lo, hi, amax_bits);
  }
  for (; i + 16 <= n; i += 16) store<FMT>(out, i, step<FMT, SAT>(load16(x + i), s, lo, hi, amax_bits));
  if (i < n) {  // masked lanes load as 0 (no effect on max|x|) and are not stored
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    store_masked<FMT>(out, i, m, step<FMT, SAT>(load16(x + i, m), s, lo, hi, amax_bits));
  }
  const int32_t bits = _mm512_reduce_max_epi32(amax_bits);
  float a;
  std::memcpy(&a, &bits, 4);
  return a;
}

template <int FMT, bool SAT, typename Src>
float run(const Src* x, void* out, int64_t numel, float scale, float fmax) {
  constexpr int64_t kOutBytes = FMT >= kBF16 ? 2 : 1;
  const int64_t ntasks = at::divup(numel, kGrain);
  std::vector<float> partial(std::max<int64_t>(ntasks, 1), 0.0f);
  const bool stream_out = numel >= kCastStreamMin;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t lo = begin * kGrain, hi = std::min(numel, end * kGrain);
    partial[begin] =
        range<FMT, SAT>(x + lo, static_cast<char*>(out) + lo * kOutBytes, hi - lo, scale, fmax, stream_out);
  });
  float m = 0.0f;
  for (float p : partial) m = (std::isnan(p) || p > m) ? p : m;
  return m;
}

}  // namespace

template <typename Src>
float cast_avx512(const Src* x, void* out, int64_t n, float scale, bool saturate, float fmax, int fmt) {
  switch (fmt * 2 + saturate) {
    case 0: return run<0, false>(x, out, n, scale, fmax);
    case 1: return run<0, true>(x, out, n, scale, fmax);
    case 2: return run<1, false>(x, out, n, scale, fmax);
    case 3: return run<1, true>(x, out, n, scale, fmax);
    case 4: return run<2, false>(x, out, n, scale, fmax);
    case 5: return run<2, true>(x, out, n, scale, fmax);
    case 6: return run<kBF16, false>(x, out, n, scale, fmax);
    case 7: return run<kBF16, true>(x, out, n, scale, fmax);
    case 8: return run<kF16, false>(x, out, n, scale, fmax);
    case 9: return run<kF16, true>(x, out, n, scale, fmax);
    default: TORCH_CHECK(false, "mixprec: cast_avx512: bad target format ", fmt);
  }
}

#else  // not x86-64 GCC/Clang: no AVX-512 path

template <typename Src>
float cast_avx512(const Src*, void*, int64_t, float, bool, float, int) {
  TORCH_CHECK(false, "mixprec: this build has no AVX-512 path");
}

#endif

template float cast_avx512(const float*, void*, int64_t, float, bool, float, int);
template float cast_avx512(const c10::Half*, void*, int64_t, float, bool, float, int);
template float cast_avx512(const c10::BFloat16*, void*, int64_t, float, bool, float, int);

}  // namespace mixprec::cpu
