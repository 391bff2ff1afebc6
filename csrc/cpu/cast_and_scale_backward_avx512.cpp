// AVX-512 path of the CPU cast_and_scale_backward kernel: 16 elements a vector, the tail under a mask, fp8 grads
// widened by arithmetic (the AVX2 loop looks them up in a table one at a time). Same values as
// cast_and_scale_backward.cpp's loop. Target attributes, not build flags (avx512_util.h): runs only when
// avx512_enabled() says so.
#include "cast_and_scale_backward_avx512.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../common.h"
#include "avx512_util.h"
#include "prefetch.h"

namespace mixprec::cpu {

#if defined(MIXPREC_HAVE_AVX512)

namespace {

using namespace avx512;

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task, as cast_and_scale_backward.cpp

// 16 grad elements as fp32 (exact); masked lanes read nothing. fp8 by arithmetic, through fp16 (vcvtph2ps, exact for
// fp16 subnormals too): an e5m2 byte is the high byte of the same value's fp16; an e4m3fn byte's low 7 bits put 7
// bits down are an fp16 with the same fields, worth 2^-8 of the e4m3fn value (normal and subnormal alike: both
// formats' subnormals have the exponent of their smallest normal), and 0x7F / 0xFF, e4m3fn's NaNs, are set apart.
// (A gather from the 256-entry table, as the AVX2 loop looks values up, ran at 0.72x of that loop here.)
template <typename G, bool FULL>
MIXPREC_AVX512 inline __m512 load_grad(const G* p, __mmask16 m) {
  if constexpr (kIsFp8<G>) {
    const __m128i b = FULL ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(m, p);
    const __m256i w = _mm256_cvtepu8_epi16(b);
    if constexpr (std::is_same_v<G, c10::Float8_e5m2>) {
      return _mm512_cvtph_ps(_mm256_slli_epi16(w, 8));
    } else {
      const __m256i low = _mm256_and_si256(w, _mm256_set1_epi16(0x7F));
      const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8),
                                        _mm256_slli_epi16(low, 7));
      const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
      return _mm512_mask_mov_ps(v, _mm256_cmpeq_epi16_mask(low, _mm256_set1_epi16(0x7F)),
                                _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
    }
  } else {
    return FULL ? load16(p) : load16(p, m);
  }
}

// grad_x of 16 elements in fp32 (masked lanes read nothing).
template <typename X, typename G, bool SAT, bool KEEP_INF, bool FULL>
MIXPREC_AVX512 inline __m512 grad_x(const X* x, const G* g, __mmask16 m, __m512 s, __m512 hi) {
  __m512 gv = load_grad<G, FULL>(g, m);
  if constexpr (SAT) {
    const __m512 xs = _mm512_mul_ps(FULL ? load16(x) : load16(x, m), s);
    const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(xs), i32(INT32_MAX)));
    __mmask16 pass = _mm512_cmp_ps_mask(a, hi, _CMP_LE_OQ);  // false for NaN
    if constexpr (KEEP_INF) pass |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(std::numeric_limits<float>::infinity()),
                                                       _CMP_EQ_OQ);
    gv = _mm512_maskz_mov_ps(pass, gv);  // +0 where saturated, then times scale (the AVX2 loop's blend with 0)
  }
  return _mm512_mul_ps(gv, s);
}

template <typename X, typename G, bool SAT, bool KEEP_INF, bool FULL>
MIXPREC_AVX512 inline void step(const X* x, const G* g, X* out, __mmask16 m, __m512 s, __m512 hi) {
  const __m512 r = grad_x<X, G, SAT, KEEP_INF, FULL>(x, g, m, s, hi);
  if constexpr (std::is_same_v<X, float>) {
    if constexpr (FULL) _mm512_storeu_ps(out, r);
    else _mm512_mask_storeu_ps(out, m, r);
  } else {
    const __m256i q = f32_to_16bit<X>(r);
    if constexpr (FULL) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), q);
    else _mm256_mask_storeu_epi16(out, m, q);
  }
}

// One 64-byte line of grad_x (16 fp32 or 32 16-bit elements) at a 64-byte aligned out, stored past the cache, its
// two halves back to back (a line the write-combining buffer holds whole is written without being read).
template <typename X, typename G, bool SAT, bool KEEP_INF>
MIXPREC_AVX512 inline void stream_line(const X* x, const G* g, X* out, __m512 s, __m512 hi) {
  if constexpr (std::is_same_v<X, float>) {
    _mm512_stream_ps(out, grad_x<X, G, SAT, KEEP_INF, true>(x, g, 0xFFFF, s, hi));
  } else {
    const __m256i q0 = f32_to_16bit<X>(grad_x<X, G, SAT, KEEP_INF, true>(x, g, 0xFFFF, s, hi));
    const __m256i q1 = f32_to_16bit<X>(grad_x<X, G, SAT, KEEP_INF, true>(x + 16, g + 16, 0xFFFF, s, hi));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out), q0);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out + 16), q1);
  }
}

// stream: grad_x goes past the cache (kCastStreamMin; fp32 x and grad_x with a bf16 grad move 10 B an element
// instead of 14): ordinary vectors up to the first 64-byte boundary of out, then
// whole lines streamed; the rest as without.
template <typename X, typename G, bool SAT, bool KEEP_INF>
MIXPREC_AVX512 void range(const X* x, const G* g, X* out, int64_t n, float scale, float fmax, bool stream) {
  const __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(fmax);
  constexpr int64_t kLine = 64 / sizeof(X);  // elements a line
  int64_t i = 0;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(out);
  if (stream && addr % sizeof(X) == 0) {
    const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((64 - addr % 64) % 64 / sizeof(X)));
    for (; i + 16 <= head; i += 16) step<X, G, SAT, KEEP_INF, true>(x + i, g + i, out + i, 0xFFFF, s, hi);
    if (i < head) {
      const __mmask16 m = static_cast<__mmask16>((1u << (head - i)) - 1u);
      step<X, G, SAT, KEEP_INF, false>(x + i, g + i, out + i, m, s, hi);
      i = head;
    }
    // a line of x an iteration, and the grads' share of one (prefetch.h)
    for (; i + kLine <= n; i += kLine) {
      if constexpr (SAT) prefetch_ahead<64>(x + i);
      if constexpr (kLine * sizeof(G) >= 64) prefetch_ahead<kLine * sizeof(G)>(g + i);
      else prefetch_stream<kLine>(g, i);
      stream_line<X, G, SAT, KEEP_INF>(x + i, g + i, out + i, s, hi);
    }
    _mm_sfence();  // weakly ordered: visible before this task's work is done
  }
  for (; i + 16 <= n; i += 16) {
    if constexpr (SAT) prefetch_stream<16>(x, i);
    prefetch_stream<16>(g, i);
    step<X, G, SAT, KEEP_INF, true>(x + i, g + i, out + i, 0xFFFF, s, hi);
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    step<X, G, SAT, KEEP_INF, false>(x + i, g + i, out + i, m, s, hi);
  }
}

template <typename X, typename G, bool SAT, bool KEEP_INF>
void run(const X* x, const G* g, X* out, int64_t n, float scale, float fmax) {
  const bool stream = n >= kCastStreamMin;
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    range<X, G, SAT, KEEP_INF>(x + lo, g + lo, out + lo, hi - lo, scale, fmax, stream);
  });
}

}  // namespace

template <typename X, typename G>
void cast_backward_avx512(const X* x, const G* g, X* out, int64_t n, float scale, bool sat, bool keep_inf, float fmax) {
  if (!sat) return run<X, G, false, false>(x, g, out, n, scale, fmax);
  if (!keep_inf) return run<X, G, true, false>(x, g, out, n, scale, fmax);
  run<X, G, true, true>(x, g, out, n, scale, fmax);
}

#else  // not x86-64 GCC/Clang: no AVX-512 path

template <typename X, typename G>
void cast_backward_avx512(const X*, const G*, X*, int64_t, float, bool, bool, float) {
  TORCH_CHECK(false, "mixprec: this build has no AVX-512 path");
}

#endif

#define MIXPREC_INSTANTIATE(X)                                                                              \
  template void cast_backward_avx512(const X*, const float*, X*, int64_t, float, bool, bool, float);          \
  template void cast_backward_avx512(const X*, const c10::Half*, X*, int64_t, float, bool, bool, float);      \
  template void cast_backward_avx512(const X*, const c10::BFloat16*, X*, int64_t, float, bool, bool, float);  \
  template void cast_backward_avx512(const X*, const c10::Float8_e4m3fn*, X*, int64_t, float, bool, bool,     \
                                     float);                                                                  \
  template void cast_backward_avx512(const X*, const c10::Float8_e5m2*, X*, int64_t, float, bool, bool, float);
MIXPREC_INSTANTIATE(float)
MIXPREC_INSTANTIATE(c10::Half)
MIXPREC_INSTANTIATE(c10::BFloat16)
#undef MIXPREC_INSTANTIATE

}  // namespace mixprec::cpu
