// C++ CPU kernel of mixprec::cast_and_scale_backward: grad_x = (m ? grad_y : 0) * scale, rounded once into x's dtype,
// with m = "saturation left x * scale as it was" (see cast_and_scale_backward_reference in
// mixprec_ops/ops/cast_and_scale.py). One pass reading x and grad_y, writing grad_x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <type_traits>

#include "../common.h"
#include "cast_and_scale_backward_avx512.h"
#include "prefetch.h"
#include "vec_util.h"

namespace mixprec::cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task

// The 256 fp32 values of an fp8 type, from c10's own conversion: a table lookup per element instead of c10's
// ~10 integer ops (measured: the bf16 x / e4m3 grad case went from 2.5 GB/s to copy speed on 2 cores).
template <typename G>
const float* fp8_table() {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = static_cast<float>(G(static_cast<uint8_t>(b), G::from_bits()));
    return t;
  }();
  return table.data();
}

// kLanes grad elements as fp32 (every conversion is exact).
template <typename G>
inline fVec load_grad(const G* p) {
  if constexpr (kIsFp8<G>) {
    const float* table = fp8_table<G>();
    const uint8_t* bits = reinterpret_cast<const uint8_t*>(p);
    alignas(64) float tmp[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) tmp[k] = table[bits[k]];
    return fVec::loadu(tmp);
  } else {
    return load_f32(p);
  }
}

// kLanes results: grad_x = (m ? grad_y : 0) * scale, m = "saturation left x * scale as it was".
template <typename X, typename G, bool SAT, bool KEEP_INF>
inline fVec grad_vec(const X* x, const G* g, const fVec& s, const fVec& hi) {
  fVec gv = load_grad(g);
  if constexpr (SAT) {
    const fVec a = (load_f32(x) * s).abs();
    fVec pass = a <= hi;  // all bits set where true; NaN compares false
    if constexpr (KEEP_INF) pass = pass | (a == fVec(std::numeric_limits<float>::infinity()));
    gv = fVec::blendv(fVec(0.0f), gv, pass);
  }
  return gv * s;
}

// Elements [i, end) with ordinary stores: two vectors an iteration (16-bit x: one conversion for both), then one,
// then scalars.
template <typename X, typename G, bool SAT, bool KEEP_INF>
void plain(const X* x, const G* g, X* out, int64_t i, int64_t end, float scale, float fmax) {
  const fVec s(scale), hi(fmax);
  for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
    // a later part's input (prefetch.h; x is read only to saturate). Not with fp8 grads: their table lookups, one
    // element at a time, bound the loop; with requests it read 0.7-0.94x at 16M (bf16 x), but that row varied
    // 5.1-8.5 ms between runs of the same code here, so no gain is shown either way
    if constexpr (!kIsFp8<G>) {
      prefetch_stream<2 * kLanes>(g, i);
      if constexpr (SAT) prefetch_stream<2 * kLanes>(x, i);
    }
    store2_from_f32(out + i, grad_vec<X, G, SAT, KEEP_INF>(x + i, g + i, s, hi),
                    grad_vec<X, G, SAT, KEEP_INF>(x + i + kLanes, g + i + kLanes, s, hi));
  }
  if (i + kLanes <= end) {
    store_from_f32(out + i, grad_vec<X, G, SAT, KEEP_INF>(x + i, g + i, s, hi));
    i += kLanes;
  }
  for (; i < end; ++i) {
    float gv = static_cast<float>(g[i]);
    if constexpr (SAT) {
      const float a = std::fabs(static_cast<float>(x[i]) * scale);
      if (!(a <= fmax || (KEEP_INF && std::isinf(a)))) gv = 0.0f;
    }
    out[i] = static_cast<X>(gv * scale);
  }
}

#if defined(MIXPREC_VEC_AVX2)
// From 2^23 elements grad_x goes past the cache (kCastStreamMin, prefetch.h; fp32 x and grad_x with a bf16 grad move
// 10 B an element instead of 14): ordinary stores up to out's first 64-byte boundary, then whole lines streamed,
// then the rest as without. Returns the elements done.
template <typename X, typename G, bool SAT, bool KEEP_INF>
int64_t streamed(const X* x, const G* g, X* out, int64_t i, int64_t end, float scale, float fmax) {
  constexpr int64_t kLine = 64 / sizeof(X);  // elements a line: 16 fp32 or 32 16-bit
  const uintptr_t addr = reinterpret_cast<uintptr_t>(out + i);
  const int64_t head = std::min<int64_t>(end, i + static_cast<int64_t>((64 - addr % 64) % 64 / sizeof(X)));
  plain<X, G, SAT, KEEP_INF>(x, g, out, i, head, scale, fmax);
  const fVec s(scale), hi(fmax);
  for (i = head; i + kLine <= end; i += kLine) {
    if constexpr (!kIsFp8<G>) {  // a line of x and the grads' share of one a page ahead (prefetch.h)
      if constexpr (SAT) prefetch_ahead<64>(x + i);
      if constexpr (kLine * sizeof(G) >= 64) prefetch_ahead<kLine * sizeof(G)>(g + i);
      else prefetch_stream<kLine>(g, i);
    }
    for (int64_t k = i; k < i + kLine; k += 2 * kLanes) {
      const fVec a = grad_vec<X, G, SAT, KEEP_INF>(x + k, g + k, s, hi);
      const fVec b = grad_vec<X, G, SAT, KEEP_INF>(x + k + kLanes, g + k + kLanes, s, hi);
      if constexpr (std::is_same_v<X, float>) {
        _mm256_stream_ps(out + k, a);
        _mm256_stream_ps(out + k + kLanes, b);
      } else {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(out + k), at::vec::convert_from_float<X>(a, b));
      }
    }
  }
  _mm_sfence();  // weakly ordered: visible before this task's work is done
  return i;
}
#endif

template <typename X, typename G, bool SAT, bool KEEP_INF>
void run(const X* x, const G* g, X* out, int64_t n, float scale, float fmax) {
  const bool stream = n >= kCastStreamMin;
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    int64_t i = lo;
#if defined(MIXPREC_VEC_AVX2)
    if (stream && reinterpret_cast<uintptr_t>(out) % sizeof(X) == 0) {  // (empty_like's always is)
      i = streamed<X, G, SAT, KEEP_INF>(x, g, out, i, hi, scale, fmax);
    }
#else
    (void)stream;
#endif
    plain<X, G, SAT, KEEP_INF>(x, g, out, i, hi, scale, fmax);
  });
}

template <typename X, typename G>
void dispatch_mode(const at::Tensor& x, const at::Tensor& g, at::Tensor& out, float s, bool sat, at::ScalarType dtype) {
  const X* xp = x.const_data_ptr<X>();
  const G* gp = static_cast<const G*>(g.const_data_ptr());
  X* op = out.data_ptr<X>();
  const int64_t n = x.numel();
  const float fmax = finite_max(dtype);
  if (avx512_enabled()) return cast_backward_avx512(xp, gp, op, n, s, sat, !is_fp8(dtype), fmax);
  if (!sat) return run<X, G, false, false>(xp, gp, op, n, s, fmax);
  if (is_fp8(dtype)) return run<X, G, true, false>(xp, gp, op, n, s, fmax);
  run<X, G, true, true>(xp, gp, op, n, s, fmax);
}

template <typename X>
void dispatch_grad(const at::Tensor& x, const at::Tensor& g, at::Tensor& out, float s, bool sat, at::ScalarType dtype) {
  switch (g.scalar_type()) {
    case at::kFloat: return dispatch_mode<X, float>(x, g, out, s, sat, dtype);
    case at::kHalf: return dispatch_mode<X, at::Half>(x, g, out, s, sat, dtype);
    case at::kBFloat16: return dispatch_mode<X, at::BFloat16>(x, g, out, s, sat, dtype);
    case at::kFloat8_e4m3fn: return dispatch_mode<X, c10::Float8_e4m3fn>(x, g, out, s, sat, dtype);
    case at::kFloat8_e5m2: return dispatch_mode<X, c10::Float8_e5m2>(x, g, out, s, sat, dtype);
    default: TORCH_CHECK(false, "unreachable");
  }
}

at::Tensor cast_and_scale_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_in, at::ScalarType dtype,
                                       const std::optional<at::Tensor>& scale, double scale_value, bool saturate) {
  check_cast_and_scale_backward_args(grad_y, x_in, dtype, scale);
  auto [x, g] = backward_layout(x_in, grad_y);
  at::Tensor out = at::empty_like(x);  // x's strides, which g shares: all three walked linearly
  const float s = scale.has_value() ? scale->item<float>() : static_cast<float>(scale_value);
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_grad<float>(x, g, out, s, saturate, dtype); break;
    case at::kHalf: dispatch_grad<at::Half>(x, g, out, s, saturate, dtype); break;
    case at::kBFloat16: dispatch_grad<at::BFloat16>(x, g, out, s, saturate, dtype); break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("cast_and_scale_backward", &cast_and_scale_backward_cpu); }

}  // namespace mixprec::cpu
