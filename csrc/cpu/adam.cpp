// C++ CPU kernel of mixprec::adam_step_: one fused Adam/AdamW step over many tensors, fp32 math, optional fp32
// master weights. The element-wise definition (and the oracle this kernel matches bit for bit) is
// mixprec_ops/ops/adam.py: every step is one IEEE fp32 operation in the documented order, no FMA (the build uses
// -ffp-contract=off and the vector code only uses at::vec's separate operator* / operator+ / operator/ / sqrt).
// sqrt is the correctly rounded IEEE one (vsqrtps / sqrtss), as in the reference, which computes it in fp64 and
// rounds (exact for every fp32 input): torch's own fp32 CPU sqrt (MKL VML vsSqrt, mkl_vml_kernel_sSqrt_EXHAynn on
// the AMD EPYC dev machines) is 1 ulp off for ~17% of inputs.
//
// Work is split into units of (tensor, chunk of kChunk elements) run over at::parallel_for. Inside a unit, tiles of
// kTile elements go through two passes: the gradient is loaded, converted to fp32, unscaled / clipped / negated
// into an L1-resident fp32 buffer (prep_grad, templated on those flags), then the Adam update runs over the tile
// (adam_tile, templated on param / state dtypes, masters, amsgrad and L2 decay). Both are chosen once per call, so
// no runtime flag is tested inside a vector loop.
//
// With masters, the 16-bit param is written and never read: in large buckets it is stored past the cache (streaming
// stores: no line read for ownership, 2 of the 30 B a param would otherwise move). Every input stream is requested a
// page ahead of its loads (prefetch.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "../hold_args.h"
#include "prefetch.h"
#include "vec_util.h"

namespace mixprec::cpu {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per work unit (parallel granularity)
constexpr int64_t kTile = 1024;      // elements per inner tile (the fp32 gradient buffer: 4 KB, stays in L1)
static_assert(kChunk % kTile == 0 && kTile % (4 * kLanes) == 0, "tiles must split chunks and vector steps evenly");

// Call-wide fp32 constants, converted exactly as the reference does (1 - beta in fp64, then rounded).
struct Consts {
  float beta1, omb1, beta2, omb2, eps, wd;
};

// One tensor index of the bucket: raw pointers (walked linearly over numel) and its per-tensor scalars.
struct Slot {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // null without amsgrad
  float* master;         // null without masters
  float step_size, bc2_sqrt, decay;  // decay is 1 unless decoupled weight decay is on (w * 1 == w bitwise)
};

struct Unit {
  int64_t slot, begin, end;
};

// Buckets of at least this many elements store 16-bit params past the cache (28 B a param: 7 MB, beyond the two
// cores' L2 here). Measured on the 2-core CI machine: 1.03-1.12x from 2M to 100M params. Smaller buckets stay in
// cache for the next forward.
constexpr int64_t kStreamMin = 1 << 18;

// Stores two fp32 vectors as 2 * kLanes 16-bit values, 32-byte aligned, bypassing the cache (with at::vec's AVX2
// Vectorized, whose __m256i the streaming store takes; plain stores otherwise: vec_util.h).
template <typename T>
inline void stream2_from_f32(T* p, const fVec& a, const fVec& b) {
#if defined(MIXPREC_VEC_AVX2)
  static_assert(sizeof(T) == 2, "only 16-bit params are streamed");
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), static_cast<__m256i>(at::vec::convert_from_float<T>(a, b)));
#else
  store2_from_f32(p, a, b);
#endif
}

// NaN-propagating maximum with the same operand roles as at::vec::maximum(a, b) (= _mm256_max_ps(a, b) | NaN).
inline float max_nan(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  return a > b ? a : b;
}

// g = float(grad); g = g / grad_scale; g = g * clip_coef; g = -g (each only when its flag is set) -> out (fp32).
template <typename G, bool kScale, bool kClip, bool kMaximize>
void prep_grad(const void* grad, int64_t off, int64_t n, float gs, float clip, float* out) {
  const G* g = static_cast<const G*>(grad) + off;
  const fVec s(gs), c(clip);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch_stream<kLanes>(g, i);  // a later tile's grads (prefetch.h)
    fVec x = load_f32(g + i);
    if constexpr (kScale) x = x / s;
    if constexpr (kClip) x = x * c;
    if constexpr (kMaximize) x = x.neg();
    x.store(out + i);
  }
  for (; i < n; ++i) {
    float x = static_cast<float>(g[i]);
    if constexpr (kScale) x = x / gs;
    if constexpr (kClip) x = x * clip;
    if constexpr (kMaximize) x = -x;
    out[i] = x;
  }
}

// The Adam update of elements [off, off + n) of one slot, the fp32 gradient already in g.
// stream: the bucket is large enough to store 16-bit params past the cache (used with masters, where p is not read).
template <typename P, typename S, bool kMaster, bool kAmsgrad, bool kL2>
void adam_tile(const Slot& sl, int64_t off, int64_t n, const float* g, const Consts& c, bool stream) {
  P* p = static_cast<P*>(sl.param) + off;
  S* m = static_cast<S*>(sl.exp_avg) + off;
  S* v = static_cast<S*>(sl.exp_avg_sq) + off;
  S* vmax = kAmsgrad ? static_cast<S*>(sl.max_exp_avg_sq) + off : nullptr;
  float* master = kMaster ? sl.master + off : nullptr;

  const fVec b1(c.beta1), omb1(c.omb1), b2(c.beta2), omb2(c.omb2), eps(c.eps), wd(c.wd);
  const fVec step_size(sl.step_size), bc2(sl.bc2_sqrt), decay(sl.decay);
  // One vector of the documented sequence; w, m_, v_ and vmax_ come in as loaded and leave as updated.
  auto update = [&](fVec gv, fVec& w, fVec& m_, fVec& v_, fVec& vmax_) {
    if constexpr (kL2) {
      gv = gv + w * wd;
    } else {
      w = w * decay;  // decay is 1 unless decoupled weight decay is on
    }
    m_ = m_ * b1 + gv * omb1;
    v_ = v_ * b2 + (gv * gv) * omb2;
    fVec vv = v_;
    if constexpr (kAmsgrad) {
      vmax_ = at::vec::maximum(vmax_, v_);  // NaN propagates, as torch.maximum
      vv = vmax_;
    }
    const fVec denom = vv.sqrt() / bc2 + eps;
    w = w - step_size * (m_ / denom);
  };
  // 16-bit params are streamed from 64-byte aligned tiles (an iteration writes whole lines: kStep elements of 2
  // bytes); others take ordinary stores.
  bool stream_p = false;
  if constexpr (kMaster && sizeof(P) == 2) stream_p = stream && reinterpret_cast<uintptr_t>(p) % 64 == 0;

  // kVecs independent vectors per iteration: all loads, then the updates (interleaved by the compiler), then all
  // stores. The sqrt/div chain of one vector is long; several in flight keep the divider busy (4 beat 2 and 8,
  // which runs out of the 16 ymm registers).
  constexpr int kVecs = 4;
  constexpr int64_t kStep = kVecs * kLanes;
  static_assert(kStep * 2 % 64 == 0, "whole lines of 16-bit params an iteration");
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    // What a later iteration reads (prefetch.h); g too, when it is a float32 grad read in place (else g is the
    // tile's L1 buffer, and the request touches the stack above it: harmless). In the bench, bf16 params with
    // masters: 1.09x at 1M params, 1.14x at 10M, 1.15x at 100M.
    prefetch_ahead<kStep * 4>(g + i);
    if constexpr (kMaster) prefetch_ahead<kStep * 4>(master + i);
    else prefetch_ahead<kStep * sizeof(P)>(p + i);
    prefetch_ahead<kStep * sizeof(S)>(m + i);
    prefetch_ahead<kStep * sizeof(S)>(v + i);
    if constexpr (kAmsgrad) prefetch_ahead<kStep * sizeof(S)>(vmax + i);
    fVec w[kVecs], mm[kVecs], vv[kVecs], vx[kVecs];
    for (int h = 0; h < kVecs / 2; ++h) {
      const int64_t k = i + 2 * h * kLanes;
      const int u = 2 * h;
      if constexpr (kMaster) {
        load2_f32(master + k, w[u], w[u + 1]);
      } else {
        load2_f32(p + k, w[u], w[u + 1]);
      }
      load2_f32(m + k, mm[u], mm[u + 1]);
      load2_f32(v + k, vv[u], vv[u + 1]);
      if constexpr (kAmsgrad) load2_f32(vmax + k, vx[u], vx[u + 1]);
    }
    for (int u = 0; u < kVecs; ++u) update(fVec::loadu(g + i + u * kLanes), w[u], mm[u], vv[u], vx[u]);
    for (int h = 0; h < kVecs / 2; ++h) {
      const int64_t k = i + 2 * h * kLanes;
      const int u = 2 * h;
      store2_from_f32(m + k, mm[u], mm[u + 1]);
      store2_from_f32(v + k, vv[u], vv[u + 1]);
      if constexpr (kAmsgrad) store2_from_f32(vmax + k, vx[u], vx[u + 1]);
      if constexpr (kMaster) store2_from_f32(master + k, w[u], w[u + 1]);
      if (!stream_p) store2_from_f32(p + k, w[u], w[u + 1]);
    }
    if constexpr (kMaster && sizeof(P) == 2) {
      if (stream_p) {  // the iteration's 64-byte line of params, its halves back to back (written whole, unread)
        for (int h = 0; h < kVecs / 2; ++h) stream2_from_f32(p + i + 2 * h * kLanes, w[2 * h], w[2 * h + 1]);
      }
    }
  }
  // Scalar tail (under kStep elements, only at the end of a tensor): the same IEEE operations one by one.
  for (; i < n; ++i) {
    float gv = g[i];
    float w = kMaster ? master[i] : static_cast<float>(p[i]);
    if constexpr (kL2) {
      gv = gv + w * c.wd;
    } else {
      w = w * sl.decay;
    }
    const float mv = static_cast<float>(m[i]) * c.beta1 + gv * c.omb1;
    const float vv = static_cast<float>(v[i]) * c.beta2 + (gv * gv) * c.omb2;
    float vu = vv;
    if constexpr (kAmsgrad) {
      vu = max_nan(static_cast<float>(vmax[i]), vv);
      vmax[i] = static_cast<S>(vu);
    }
    const float denom = std::sqrt(vu) / sl.bc2_sqrt + c.eps;
    w = w - sl.step_size * (mv / denom);
    m[i] = static_cast<S>(mv);
    v[i] = static_cast<S>(vv);
    if constexpr (kMaster) master[i] = w;
    p[i] = static_cast<P>(w);
  }
}

using PrepFn = void (*)(const void*, int64_t, int64_t, float, float, float*);
using TileFn = void (*)(const Slot&, int64_t, int64_t, const float*, const Consts&, bool);

template <typename G>
PrepFn pick_prep(bool scale, bool clip, bool maximize) {
  const int k = (scale ? 4 : 0) | (clip ? 2 : 0) | (maximize ? 1 : 0);
  switch (k) {
    case 0: return &prep_grad<G, false, false, false>;
    case 1: return &prep_grad<G, false, false, true>;
    case 2: return &prep_grad<G, false, true, false>;
    case 3: return &prep_grad<G, false, true, true>;
    case 4: return &prep_grad<G, true, false, false>;
    case 5: return &prep_grad<G, true, false, true>;
    case 6: return &prep_grad<G, true, true, false>;
    default: return &prep_grad<G, true, true, true>;
  }
}

PrepFn pick_prep(at::ScalarType g, bool scale, bool clip, bool maximize) {
  switch (g) {
    case at::kFloat: return pick_prep<float>(scale, clip, maximize);
    case at::kHalf: return pick_prep<at::Half>(scale, clip, maximize);
    default: return pick_prep<at::BFloat16>(scale, clip, maximize);
  }
}

template <typename P, typename S, bool kMaster>
TileFn pick_tile(bool amsgrad, bool l2) {
  if (amsgrad) return l2 ? &adam_tile<P, S, kMaster, true, true> : &adam_tile<P, S, kMaster, true, false>;
  return l2 ? &adam_tile<P, S, kMaster, false, true> : &adam_tile<P, S, kMaster, false, false>;
}

template <typename P, typename S>
TileFn pick_tile(bool master, bool amsgrad, bool l2) {
  return master ? pick_tile<P, S, true>(amsgrad, l2) : pick_tile<P, S, false>(amsgrad, l2);
}

template <typename P>
TileFn pick_tile(at::ScalarType s, bool master, bool amsgrad, bool l2) {
  return s == at::kFloat ? pick_tile<P, float>(master, amsgrad, l2) : pick_tile<P, at::BFloat16>(master, amsgrad, l2);
}

TileFn pick_tile(at::ScalarType p, at::ScalarType s, bool master, bool amsgrad, bool l2) {
  switch (p) {
    case at::kFloat: return pick_tile<float>(s, master, amsgrad, l2);
    case at::kHalf: return pick_tile<at::Half>(s, master, amsgrad, l2);
    default: return pick_tile<at::BFloat16>(s, master, amsgrad, l2);
  }
}

// Same order of elements in memory: both contiguous, or the same sizes and strides (strides of size-1 dims aside).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return true;
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) return false;
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_walkable(const at::Tensor& t, const char* name, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), name, "[", i, "] must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, name, "[", i, "] must be a dense strided tensor");
  TORCH_CHECK(walkable(t), name, "[", i, "] must be non-overlapping and dense (got sizes ", dims(t.sizes()),
              ", strides ", dims(t.strides()), ")");
  check_allocated(t, name, static_cast<int64_t>(i));
}

// t = list[i] must be a CPU tensor of `dtype` laid out like params[i] with as many elements.
void check_companion(const at::Tensor& t, const char* name, size_t i, const at::Tensor& p, at::ScalarType dtype,
                     const char* dtype_rule) {
  TORCH_CHECK(t.scalar_type() == dtype, name, "[", i, "] must be ", dtype_rule, " (", dtype, "), got ",
              t.scalar_type());
  check_walkable(t, name, i);
  TORCH_CHECK(t.numel() == p.numel(), name, "[", i, "] must have the same number of elements as params[", i,
              "] (", p.numel(), "), got ", t.numel());
  TORCH_CHECK(same_layout(t, p), name, "[", i, "] must have the same layout as params[", i, "] (sizes ",
              dims(p.sizes()), ", strides ", dims(p.strides()), "), got sizes ", dims(t.sizes()), ", strides ",
              dims(t.strides()));
}

void check_list_size(at::TensorList l, const char* name, size_t n) {
  TORCH_CHECK(l.size() == n, name, " must have one tensor per param (", n, "), got ", l.size());
}

float read_scalar(const std::optional<at::Tensor>& t, const char* name) {
  check_scalar_tensor(*t, name, at::Device(at::kCPU));
  return *t->const_data_ptr<float>();
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList masters, const at::Tensor& scalars, double beta1,
                   double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& clip_coef) {
  const VersionBump bump({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters});
  const size_t n = params.size();
  check_list_size(grads, "grads", n);
  check_list_size(exp_avgs, "exp_avgs", n);
  check_list_size(exp_avg_sqs, "exp_avg_sqs", n);
  TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n,
              "max_exp_avg_sqs must be empty or have one tensor per param (", n, "), got ", max_exp_avg_sqs.size());
  TORCH_CHECK(masters.empty() || masters.size() == n, "masters must be empty or have one tensor per param (", n,
              "), got ", masters.size());
  const bool amsgrad = !max_exp_avg_sqs.empty(), has_master = !masters.empty();
  float gs = 1.0f, clip = 1.0f;
  if (grad_scale.has_value()) gs = read_scalar(grad_scale, "grad_scale");
  if (clip_coef.has_value()) clip = read_scalar(clip_coef, "clip_coef");
  const bool skip = found_inf.has_value() && !(read_scalar(found_inf, "found_inf") == 0.0f);  // NaN skips too
  if (n == 0) return;

  const at::ScalarType pt = params[0].scalar_type(), gt = grads[0].scalar_type(), st = exp_avgs[0].scalar_type();
  TORCH_CHECK(is_float_source(pt), "params[0] must be float32, float16 or bfloat16, got ", pt);
  TORCH_CHECK(is_float_source(gt), "grads[0] must be float32, float16 or bfloat16, got ", gt);
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, "exp_avgs[0] must be float32 or bfloat16, got ", st);
  // The combinations every backend takes (the CUDA kernel instantiates only these; mixprec_ops/ops/adam.py checks
  // the same for the Triton and torch backends): grads in the params' dtype or float32, masters for 16-bit params.
  TORCH_CHECK(gt == pt || gt == at::kFloat, "grads must have the params' dtype (", pt, ") or float32, got ", gt);
  TORCH_CHECK(!(has_master && pt == at::kFloat), "masters must be empty when params are float32");
  TORCH_CHECK(scalars.device().is_cpu(), "scalars must be a CPU tensor, got one on ", scalars.device());
  TORCH_CHECK(scalars.scalar_type() == at::kFloat, "scalars must be float32, got ", scalars.scalar_type());
  TORCH_CHECK(scalars.dim() == 2 && scalars.size(0) == static_cast<int64_t>(n) && scalars.size(1) == 3,
              "scalars must have shape (len(params), 3) = (", n, ", 3), got ", dims(scalars.sizes()));
  TORCH_CHECK(scalars.is_contiguous(), "scalars must be contiguous");
  check_allocated(scalars, "scalars");

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == pt, "params[", i, "] must have the dtype of params[0] (", pt, "), got ",
                p.scalar_type());
    check_walkable(p, "params", i);
    check_companion(grads[i], "grads", i, p, gt, "the dtype of grads[0]");
    check_companion(exp_avgs[i], "exp_avgs", i, p, st, "the dtype of exp_avgs[0]");
    check_companion(exp_avg_sqs[i], "exp_avg_sqs", i, p, st, "the state dtype of exp_avgs[0]");
    if (amsgrad) check_companion(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, p, st, "the state dtype of exp_avgs[0]");
    if (has_master) check_companion(masters[i], "masters", i, p, at::kFloat, "float32");
  }
  if (skip) return;

  const Consts c{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                 static_cast<float>(1.0 - beta2),  static_cast<float>(eps),         static_cast<float>(weight_decay)};
  const bool l2 = weight_decay != 0.0 && !decoupled;
  const bool decay_on = weight_decay != 0.0 && decoupled;
  const float* sc = scalars.const_data_ptr<float>();

  std::vector<Slot> slots;
  std::vector<Unit> units;
  slots.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const int64_t s = static_cast<int64_t>(slots.size());
    slots.push_back({params[i].data_ptr(), grads[i].const_data_ptr(), exp_avgs[i].data_ptr(),
                     exp_avg_sqs[i].data_ptr(), amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr,
                     has_master ? masters[i].data_ptr<float>() : nullptr, sc[3 * i], sc[3 * i + 1],
                     decay_on ? sc[3 * i + 2] : 1.0f});
    for (int64_t b = 0; b < numel; b += kChunk) units.push_back({s, b, std::min(numel, b + kChunk)});
    total += numel;
  }
  if (units.empty()) return;

  const bool has_scale = grad_scale.has_value(), has_clip = clip_coef.has_value();
  // A float32 gradient with nothing to apply is read in place; otherwise each tile is prepared into a buffer.
  const PrepFn prep = (gt == at::kFloat && !has_scale && !has_clip && !maximize)
                          ? nullptr
                          : pick_prep(gt, has_scale, has_clip, maximize);
  const TileFn tile = pick_tile(pt, st, has_master, amsgrad, l2);
  const int64_t nunits = static_cast<int64_t>(units.size());
  // Small buckets run on the calling thread: waking the pool costs more than the work. NB: at::parallel_for is an
  // inline template over `#pragma omp parallel`; a translation unit compiled without -fopenmp runs it serially.
  const int64_t grain = total < 2 * kChunk ? nunits : 1;
  const bool stream = has_master && total >= kStreamMin;
  at::parallel_for(0, nunits, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float gbuf[kTile];
    for (int64_t u = begin; u < end; ++u) {
      const Unit& w = units[u];
      const Slot& sl = slots[w.slot];
      for (int64_t off = w.begin; off < w.end; off += kTile) {
        const int64_t len = std::min(kTile, w.end - off);
        const float* g;
        if (prep == nullptr) {
          g = static_cast<const float*>(sl.grad) + off;
        } else {
          prep(sl.grad, off, len, gs, clip, gbuf);
          g = gbuf;
        }
        tile(sl, off, len, g, c, stream);
      }
    }
#if defined(MIXPREC_VEC_AVX2)
    if (stream) _mm_sfence();  // the streamed stores are weakly ordered: visible before this thread's work ends
#endif
  });
}

}  // namespace

// adam_step_ through holding_args (a call from Python drops its lists after taking the GIL back, once: the params
// and states, held by their Python objects alone, cost one GIL round trip each otherwise; csrc/hold_args.h), and
// unboxed as _adam_step_unboxed_ for adam_step_bucket_'s typed call (csrc/schemas.cpp).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("adam_step_", holding_args<&adam_step_cpu>());
  m.impl("_adam_step_unboxed_", &adam_step_cpu);
}

}  // namespace mixprec::cpu
