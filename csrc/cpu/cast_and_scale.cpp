// C++ CPU kernel of mixprec::cast_and_scale: one pass over x computing y = cast(x * scale) and max|x|.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "cast_and_scale_avx512.h"
#include "fp8_convert.h"
#include "fp8_convert_avx2.h"
#include "prefetch.h"
#include "vec_util.h"

namespace mixprec::cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task
constexpr int64_t kTile = 1024;      // elements converted per inner tile (fits L1 as fp32)

// max|x| folds, NaN-propagating: a NaN taken in wins and stays.
inline float fold_max(float m, float v) { return (std::isnan(v) || v > m) ? v : m; }
inline float fold_lanes(float m, const fVec& acc) {
  float lanes[kLanes];
  acc.store(lanes);
  for (int64_t l = 0; l < kLanes; ++l) m = fold_max(m, lanes[l]);
  return m;
}
inline float fold_partials(const std::vector<float>& partial) {
  float m = 0.0f;
  for (float p : partial) m = fold_max(m, p);
  return m;
}

// Scales one tile into fp32 `buf`, applies saturation, and folds max|x| into `amax_acc`/`tail_max` (NaN
// propagates: at::vec::maximum does, and the scalar update takes a NaN).
template <typename Src>
inline void scale_tile(const Src* x, int64_t n, float scale, bool sat, bool keep_inf, float fmax, float* buf,
                       fVec& amax_acc, float& tail_max) {
  const fVec s(scale), hi(fmax), lo(-fmax), inf(std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch_stream<kLanes>(x, i);  // a later tile's input (prefetch.h)
    fVec v = load_f32(x + i);
    amax_acc = at::vec::maximum(amax_acc, v.abs());
    fVec y = v * s;
    if (sat) {
      // Clamp by comparisons, which are false for NaN: a NaN stays the same NaN (sign and payload; the fp8 byte
      // keeps its sign). at::vec::maximum/minimum return the all-ones NaN (sign set) instead.
      fVec c = fVec::blendv(y, hi, y > hi);
      c = fVec::blendv(c, lo, c < lo);
      y = keep_inf ? fVec::blendv(c, y, y.abs() == inf) : c;
    }
    y.store(buf + i);
  }
  for (; i < n; ++i) {
    float v = static_cast<float>(x[i]);
    float a = std::fabs(v);
    if (std::isnan(a) || a > tail_max) tail_max = a;
    float y = v * scale;
    if (sat && std::fabs(y) > fmax && !(keep_inf && std::isinf(y))) y = std::copysign(fmax, y);
    buf[i] = y;
  }
}

// Rounds fp32 `buf` into the destination type (round-to-nearest-even, exactly torch's conversion).
template <typename Dst>
inline void store_tile(const float* buf, int64_t n, Dst* y) {
  if constexpr (std::is_same_v<Dst, at::Half> || std::is_same_v<Dst, at::BFloat16>) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) store_from_f32(y + i, fVec::loadu(buf + i));
    for (; i < n; ++i) y[i] = static_cast<Dst>(buf[i]);
  } else if constexpr (std::is_same_v<Dst, at::Float8_e4m3fn>) {
    uint8_t* out = reinterpret_cast<uint8_t*>(y);
    if (e4m3fn_overflow_is_nan()) {
      for (int64_t i = 0; i < n; ++i) out[i] = f32_to_e4m3fn_bits<true>(buf[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = f32_to_e4m3fn_bits<false>(buf[i]);
    }
  } else {
    uint8_t* out = reinterpret_cast<uint8_t*>(y);
    for (int64_t i = 0; i < n; ++i) out[i] = f32_to_e5m2_bits(buf[i]);
  }
}

// (The fused fp8 loop mixes fVec with raw __m256: only with at::vec's AVX2 code, vec_util.h; otherwise the
// tile-by-tile path serves fp8 targets too.)
#if defined(MIXPREC_VEC_AVX2)
// fp8 targets: scale, clamp, amax and the rounding in one loop, 32 elements at a time (no fp32 tile written and
// read back), with the adder-based AVX2 rounding (fp8_convert_avx2.h); the last n % 32 go the scalar way.
template <int FMT, bool SAT, typename Src>
inline void scale_store_fp8(const Src* x, int64_t n, float scale, float fmax, uint8_t* out, float* buf,
                            fVec& amax_acc, float& tail_max) {
  const __m256 s = _mm256_set1_ps(scale), hi = _mm256_set1_ps(fmax), lo = _mm256_set1_ps(-fmax);
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  // max|x| on the bits of |x| as int32: order-preserving for non-negative floats, NaN above inf, so a NaN
  // propagates with one integer max per vector.
  __m256i amax_bits = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    prefetch_ahead<4 * kLanes * sizeof(Src)>(x + i);  // a later tile's input (prefetch.h)
    __m256i q[4];
    for (int u = 0; u < 4; ++u) {
      const __m256 v = load_f32(x + i + u * kLanes);
      amax_bits = _mm256_max_epi32(amax_bits, _mm256_and_si256(_mm256_castps_si256(v), abs_mask));
      __m256 y = _mm256_mul_ps(v, s);
      // max_ps / min_ps return their SECOND operand when either is NaN: with y second, NaN stays NaN.
      if constexpr (SAT) y = _mm256_min_ps(hi, _mm256_max_ps(lo, y));
      q[u] = avx2::f32_to_fp8_bits<FMT, SAT>(y);
    }
    avx2::store_bytes32(out + i, q[0], q[1], q[2], q[3]);
  }
  amax_acc = at::vec::maximum(amax_acc, fVec(_mm256_castsi256_ps(amax_bits)));  // NaN-propagating
  if (i < n) {
    using Dst = std::conditional_t<FMT == 2, at::Float8_e5m2, at::Float8_e4m3fn>;
    scale_tile(x + i, n - i, scale, SAT, false, fmax, buf, amax_acc, tail_max);
    store_tile(buf, n - i, reinterpret_cast<Dst*>(out + i));
  }
}

template <int FMT, typename Src>
inline void scale_store_fp8(const Src* x, int64_t n, float scale, bool sat, float fmax, uint8_t* out, float* buf,
                            fVec& amax_acc, float& tail_max) {
  if (sat) return scale_store_fp8<FMT, true>(x, n, scale, fmax, out, buf, amax_acc, tail_max);
  scale_store_fp8<FMT, false>(x, n, scale, fmax, out, buf, amax_acc, tail_max);
}

// 16-bit targets: max|x|, scale, clamp and rounding in one loop over a thread's whole range, 32 elements (64 output
// bytes, a line) an iteration, two vectors rounded by one at::vec conversion (round to nearest even, torch's own);
// Stream: whole aligned lines stored past the cache (kCastStreamMin, prefetch.h). Returns the elements done.
template <typename Dst, bool SAT, bool Stream, typename Src>
inline int64_t blocks16(const Src* x, Dst* out, int64_t n, float scale, float fmax, __m256i& amax_bits) {
  const __m256 s = _mm256_set1_ps(scale), hi = _mm256_set1_ps(fmax), lo = _mm256_set1_ps(-fmax);
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), inf_bits = _mm256_set1_epi32(0x7F800000);
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    prefetch_ahead<4 * kLanes * sizeof(Src)>(x + i);
    __m256 y[4];
    for (int u = 0; u < 4; ++u) {
      const __m256 v = load_f32(x + i + u * kLanes);
      amax_bits = _mm256_max_epi32(amax_bits, _mm256_and_si256(_mm256_castps_si256(v), abs_mask));
      y[u] = _mm256_mul_ps(v, s);
      if constexpr (SAT) {  // finite overflow clamps (y second: NaN stays); an infinite product stays infinite
        const __m256 c = _mm256_min_ps(hi, _mm256_max_ps(lo, y[u]));
        const __m256i inf = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(y[u]), abs_mask), inf_bits);
        y[u] = _mm256_blendv_ps(c, y[u], _mm256_castsi256_ps(inf));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i q = at::vec::convert_from_float<Dst>(fVec(y[2 * h]), fVec(y[2 * h + 1]));
      __m256i* dst = reinterpret_cast<__m256i*>(out + i + 2 * h * kLanes);
      if constexpr (Stream) _mm256_stream_si256(dst, q);
      else _mm256_storeu_si256(dst, q);
    }
  }
  if constexpr (Stream) _mm_sfence();  // weakly ordered: visible before this task's work is done
  return i;
}

template <typename Dst, bool SAT, typename Src>
float range16(const Src* x, Dst* out, int64_t n, float scale, float fmax, bool stream) {
  __m256i amax_bits = _mm256_setzero_si256();
  const int64_t i = stream && reinterpret_cast<uintptr_t>(out) % 64 == 0
                        ? blocks16<Dst, SAT, true>(x, out, n, scale, fmax, amax_bits)
                        : blocks16<Dst, SAT, false>(x, out, n, scale, fmax, amax_bits);
  fVec acc(_mm256_castsi256_ps(amax_bits));
  float m = 0.0f;
  if (i < n) {  // the last n % 32: the tile path
    alignas(64) float buf[4 * kLanes];
    scale_tile(x + i, n - i, scale, SAT, true, fmax, buf, acc, m);
    store_tile(buf, n - i, out + i);
  }
  return fold_lanes(m, acc);
}

template <typename Src, typename Dst>
float run16(const Src* x, Dst* y, int64_t numel, float scale, bool sat, float fmax) {
  const int64_t ntasks = at::divup(numel, kGrain);
  std::vector<float> partial(std::max<int64_t>(ntasks, 1), 0.0f);
  const bool stream = numel >= kCastStreamMin;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t lo = begin * kGrain, n = std::min(numel, end * kGrain) - lo;
    partial[begin] = sat ? range16<Dst, true>(x + lo, y + lo, n, scale, fmax, stream)
                         : range16<Dst, false>(x + lo, y + lo, n, scale, fmax, stream);
  });
  return fold_partials(partial);
}
#endif

// One tile: scaled into buf, then rounded into y; fp8 targets on AVX2 in one fused loop.
template <typename Src, typename Dst>
inline void tile(const Src* x, int64_t n, float scale, bool sat, bool keep_inf, float fmax, float* buf, Dst* y,
                 fVec& amax_acc, float& tail_max) {
#if defined(MIXPREC_VEC_AVX2)
  if constexpr (std::is_same_v<Dst, at::Float8_e4m3fn>) {
    uint8_t* out = reinterpret_cast<uint8_t*>(y);
    if (e4m3fn_overflow_is_nan()) return scale_store_fp8<0>(x, n, scale, sat, fmax, out, buf, amax_acc, tail_max);
    return scale_store_fp8<1>(x, n, scale, sat, fmax, out, buf, amax_acc, tail_max);
  } else if constexpr (std::is_same_v<Dst, at::Float8_e5m2>) {
    return scale_store_fp8<2>(x, n, scale, sat, fmax, reinterpret_cast<uint8_t*>(y), buf, amax_acc, tail_max);
  }
#endif
  scale_tile(x, n, scale, sat, keep_inf, fmax, buf, amax_acc, tail_max);
  store_tile(buf, n, y);
}

template <typename Src, typename Dst>
float run(const Src* x, Dst* y, int64_t numel, float scale, bool sat, bool keep_inf, float fmax) {
  const int64_t ntasks = at::divup(numel, kGrain);
  std::vector<float> partial(std::max<int64_t>(ntasks, 1), 0.0f);
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kTile];
    for (int64_t t = begin; t < end; ++t) {
      fVec acc(0.0f);
      float m = 0.0f;
      const int64_t lo = t * kGrain, hi = std::min(numel, lo + kGrain);
      for (int64_t i = lo; i < hi; i += kTile) {
        const int64_t n = std::min(kTile, hi - i);
        tile(x + i, n, scale, sat, keep_inf, fmax, buf, y + i, acc, m);
      }
      partial[t] = fold_lanes(m, acc);
    }
  });
  return fold_partials(partial);
}

// The AVX-512 code's number for a target (cast_and_scale_avx512.h).
inline int avx512_format(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat8_e4m3fn: return e4m3fn_overflow_is_nan() ? 0 : 1;
    case at::kFloat8_e5m2: return 2;
    case at::kBFloat16: return 3;
    default: return 4;  // kHalf
  }
}

template <typename Src>
float dispatch_dst(const Src* x, at::Tensor& y, int64_t numel, float scale, bool sat, at::ScalarType dtype) {
  const float fmax = finite_max(dtype);
  if (avx512_enabled()) return cast_avx512(x, y.data_ptr(), numel, scale, sat, fmax, avx512_format(dtype));
  switch (dtype) {
#if defined(MIXPREC_VEC_AVX2)
    case at::kHalf: return run16(x, y.data_ptr<at::Half>(), numel, scale, sat, fmax);
    case at::kBFloat16: return run16(x, y.data_ptr<at::BFloat16>(), numel, scale, sat, fmax);
#else
    case at::kHalf: return run(x, y.data_ptr<at::Half>(), numel, scale, sat, true, fmax);
    case at::kBFloat16: return run(x, y.data_ptr<at::BFloat16>(), numel, scale, sat, true, fmax);
#endif
    case at::kFloat8_e4m3fn: return run(x, y.data_ptr<at::Float8_e4m3fn>(), numel, scale, sat, false, fmax);
    case at::kFloat8_e5m2: return run(x, y.data_ptr<at::Float8_e5m2>(), numel, scale, sat, false, fmax);
    default: TORCH_CHECK(false, "unreachable");
  }
}

at::Tensor cast_and_scale_cpu(const at::Tensor& x_in, at::ScalarType dtype, const std::optional<at::Tensor>& scale,
                              double scale_value, const std::optional<at::Tensor>& amax, bool saturate) {
  const VersionBump bump({}, amax.has_value() ? &*amax : nullptr);
  check_cast_and_scale_args(x_in, dtype, scale, amax);
  const at::Tensor x = walkable(x_in) ? x_in : x_in.contiguous();
  at::Tensor y = at::empty_like(x, x.options().dtype(dtype));  // same strides as x: walk both linearly
  const float s = scale.has_value() ? scale->item<float>() : static_cast<float>(scale_value);
  const int64_t n = x.numel();
  float m = 0.0f;
  switch (x.scalar_type()) {
    case at::kFloat: m = dispatch_dst(x.const_data_ptr<float>(), y, n, s, saturate, dtype); break;
    case at::kHalf: m = dispatch_dst(x.const_data_ptr<at::Half>(), y, n, s, saturate, dtype); break;
    case at::kBFloat16: m = dispatch_dst(x.const_data_ptr<at::BFloat16>(), y, n, s, saturate, dtype); break;
    default: TORCH_CHECK(false, "unreachable");
  }
  if (amax.has_value()) {
    float* a = amax->data_ptr<float>();
    if (std::isnan(m) || m > *a) *a = m;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("cast_and_scale", &cast_and_scale_cpu); }

}  // namespace mixprec::cpu
