// C++ CPU kernel of mixprec::unscale_: one pass over every tensor multiplying by inv_scale in place, flagging
// non-finite values and (optionally) accumulating the squared L2 norm of the unscaled values.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "../common.h"
#include "../hold_args.h"
#include "prefetch.h"
#include "unscale_avx512.h"
#include "vec_util.h"

namespace mixprec::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per work unit

struct Unit {
  void* data;
  at::ScalarType dtype;
  int64_t begin, end;
};

struct Acc {
  double sumsq = 0.0;
  bool nonfinite = false;
};

constexpr int64_t kFlush = 1024;  // fp32 lane sums are flushed into fp64 this often (keeps the norm accurate)

// WRITE=false when inv_scale == 1: the values cannot change, so the pass only reads (a pure inf/NaN + norm check,
// as GradScaler's found-inf probe and the optimizer's clipping pass use it).
template <typename T, bool WRITE>
void unscale_range(T* p, int64_t n, float inv, bool want_norm, Acc& acc) {
  const fVec s(inv);
  fVec vmax(0.0f);  // max |v|; at::vec::maximum propagates NaN
  float lanes[kLanes];
  int64_t i = 0;
  while (i + kLanes <= n) {
    fVec sq(0.0f);
    const int64_t stop = std::min(n, i + kFlush);
    // Two vectors at a time: 16-bit types load, convert and store a whole register pair at once. The squares are
    // added in element order, as one vector at a time would (the norm's bits do not depend on the pairing).
    for (; i + 2 * kLanes <= stop; i += 2 * kLanes) {
      prefetch_stream<2 * kLanes>(p, i);  // a later block (prefetch.h)
      fVec a, b;
      load2_f32(p + i, a, b);
      a = a * s;
      b = b * s;
      vmax = at::vec::maximum(at::vec::maximum(vmax, a.abs()), b.abs());
      if (want_norm) sq = (sq + a * a) + b * b;
      if constexpr (WRITE) store2_from_f32(p + i, a, b);
    }
    for (; i + kLanes <= stop; i += kLanes) {
      fVec v = load_f32(p + i) * s;
      vmax = at::vec::maximum(vmax, v.abs());
      if (want_norm) sq = sq + v * v;
      if constexpr (WRITE) store_from_f32(p + i, v);
    }
    if (want_norm) {
      sq.store(lanes);
      for (int64_t l = 0; l < kLanes; ++l) acc.sumsq += lanes[l];
    }
  }
  float tail_max = 0.0f;
  for (; i < n; ++i) {
    float v = static_cast<float>(p[i]) * inv;
    tail_max = (std::isnan(v) || std::fabs(v) > tail_max) ? std::fabs(v) : tail_max;
    acc.sumsq += v * v;  // squared in fp32, as the vector body and the other kernels do (same range)
    if constexpr (WRITE) p[i] = static_cast<T>(v);
  }
  vmax.store(lanes);
  bool bad = !(tail_max < OverflowAt<T>::value);
  for (int64_t l = 0; l < kLanes; ++l) bad |= !(lanes[l] < OverflowAt<T>::value);
  acc.nonfinite |= bad;
}

template <typename T>
void run_range(T* p, int64_t n, float inv, bool want_norm, bool wide, Acc& acc) {
  if constexpr (!std::is_same_v<T, float>) {  // 16-bit tensors on the AVX-512 loop where it runs (the same results)
    if (wide) return unscale_16bit_avx512(p, n, inv, inv != 1.0f, want_norm, &acc.sumsq, &acc.nonfinite);
  }
  if (inv == 1.0f) unscale_range<T, false>(p, n, inv, want_norm, acc);
  else unscale_range<T, true>(p, n, inv, want_norm, acc);
}

at::Tensor unscale_cpu(at::TensorList tensors, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                       bool return_norm) {
  const VersionBump bump({tensors}, &found_inf);
  check_unscale_args(tensors, inv_scale, found_inf);
  const float inv = inv_scale.item<float>();
  std::vector<Unit> units;
  std::vector<at::Tensor> slow;  // overlapping or gapped layouts: handled with ATen ops
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    if (!walkable(t)) {
      slow.push_back(t);
      continue;
    }
    for (int64_t b = 0; b < t.numel(); b += kChunk)
      units.push_back({t.data_ptr(), t.scalar_type(), b, std::min(t.numel(), b + kChunk)});
  }
  const int nthreads = at::get_num_threads();
  std::vector<Acc> accs(nthreads);
  const bool wide = avx512_enabled();  // (read once a call, not once a unit)
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    Acc& acc = accs[at::get_thread_num()];
    for (int64_t u = begin; u < end; ++u) {
      const Unit& w = units[u];
      const int64_t n = w.end - w.begin;
      switch (w.dtype) {
        case at::kFloat: run_range(static_cast<float*>(w.data) + w.begin, n, inv, return_norm, wide, acc); break;
        case at::kHalf: run_range(static_cast<at::Half*>(w.data) + w.begin, n, inv, return_norm, wide, acc); break;
        case at::kBFloat16:
          run_range(static_cast<at::BFloat16*>(w.data) + w.begin, n, inv, return_norm, wide, acc);
          break;
        default: TORCH_CHECK(false, "unreachable");
      }
    }
  });
  Acc total;
  for (const Acc& a : accs) {
    total.sumsq += a.sumsq;
    total.nonfinite |= a.nonfinite;
  }
  for (auto& t : slow) {
    at::Tensor v = t.to(at::kFloat).mul_(inv);
    at::Tensor r = v.to(t.scalar_type());
    total.nonfinite |= !r.isfinite().all().item<bool>();
    if (return_norm) total.sumsq += v.square().to(at::kDouble).sum().item<double>();
    t.copy_(r);
  }
  if (total.nonfinite) found_inf.fill_(1.0);
  if (!return_norm) return at::empty({0}, inv_scale.options());
  return at::full({}, static_cast<float>(std::sqrt(total.sumsq)), inv_scale.options());
}

}  // namespace

// (through holding_args: a call from Python drops its list after taking the GIL back, once; csrc/hold_args.h)
TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("unscale_", holding_args<&unscale_cpu>()); }

}  // namespace mixprec::cpu
