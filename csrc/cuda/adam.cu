// CUDA kernel of mixprec::adam_step_: one fused Adam/AdamW step over a bucket of tensors, fp32 math, optional fp32
// master weights, optional AMSGrad, grad unscale (grad_scale), fused clipping (clip_coef) and found_inf skip, all
// read on the device (no host sync, graph-capturable).
//
// Bit-exact with adam_step_reference (mixprec_ops/ops/adam.py): every arithmetic op of the update is one IEEE fp32
// op through __fmul_rn / __fadd_rn / __fsub_rn / __fdiv_rn / __fsqrt_rn (never contracted into FMA, never
// approximated), in the docstring's order; conversions go through c10::Half / c10::BFloat16 (torch's own cast,
// round to nearest even); maximum() propagates NaN exactly like torch.maximum's CUDA kernel.
//
// Layout: multi-tensor apply (multi_tensor.cuh), lists [param, grad, exp_avg, exp_avg_sq, (max_exp_avg_sq),
// (master)], DEPTH = 4 + amsgrad + master, up to 2048 blocks and 446 / 377 / 327 tensors (DEPTH 4 / 5 / 6) per
// launch. One block = one chunk of kChunk = 65536 elements of one tensor (512 threads x 128 elements; the chunk is
// a multiple of every vector width, so a chunk is 16-byte aligned exactly when its tensor is). Each thread keeps
// kUnroll = 2 groups of 4 elements in flight (fp32 streams as 16-byte accesses, 16-bit ones as 8-byte accesses)
// when every pointer of the tensor is 16-byte aligned; otherwise, and for the < 4 trailing elements, a scalar path
// with the same unroll. Registers are capped at 64 (2 blocks = 1024 threads per SM, about 110 KB of loads in
// flight per SM at peak, several times what Little's law asks for at ~4.3 TB/s); kUnroll = 4 needs ~100-128
// registers (1 block per SM) and spills under the 64 cap. Per-tensor scalars [step_size, bc2_sqrt, decay] are read
// from row meta.index[t] of `scalars` (the tensor's index in the call, kept when a tensor spans two launches).
//
// Instantiations: kernel<P, G, S, MASTER, AMSGRAD> (AMSGRAD fixes DEPTH); P=f32: G=f32, no master, S in {f32, bf16};
// P in {f16, bf16}: G in {P, f32} x S in {f32, bf16} x master in {yes, no}; each with and without AMSGrad: 36.
// The other options (grad_scale, clip_coef, weight decay, decoupled, maximize) are block-uniform runtime flags.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../hold_args.h"
#include "multi_tensor.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kMinBlocksPerSm = 2;  // caps registers at 64: 1024 resident threads per SM
constexpr int64_t kChunk = 65536;   // elements per block: 128 per thread, 16 iterations of kUnroll x kVec
constexpr int kVec = 4;             // elements per vector access (16 bytes of fp32, 8 bytes of a 16-bit type)
constexpr int kUnroll = 2;          // independent groups in flight per thread (4 spills at 64 registers)
static_assert(kChunk % 8 == 0, "chunk starts must keep the 16-byte alignment of 2-byte streams");

// Runtime flags (uniform over the launch).
enum : uint32_t {
  kHasGradScale = 1u,
  kHasClip = 2u,
  kMaximize = 4u,
  kWeightDecay = 8u,  // weight_decay != 0 (tested in fp64 on the host, like the reference)
  kDecoupled = 16u,
};

struct AdamArgs {
  const float* scalars;     // (ntensors, 3): [step_size, bc2_sqrt, decay] per tensor index
  const float* grad_scale;  // nullable
  const float* found_inf;   // nullable
  const float* clip_coef;   // nullable
  float beta1, omb1, beta2, omb2, eps, wd;
  uint32_t flags;
};

// Everything one element's update needs that is uniform over the block.
struct BlockConsts {
  float beta1, omb1, beta2, omb2, eps, wd;
  float step_size, bc2_sqrt, decay;
  float grad_scale, clip;
  uint32_t flags;
};

// torch.maximum on CUDA: a if a is NaN, else b if b is NaN, else max(a, b).
__device__ __forceinline__ float nan_maximum(float a, float b) {
  return isnan(a) ? a : (isnan(b) ? b : fmaxf(a, b));
}

// One element of the update (module docstring of mixprec_ops/ops/adam.py). g: float(grad); w: master or
// float(param), updated in place; m, v: float(exp_avg), float(exp_avg_sq), replaced by the new moments;
// vmax: float(max_exp_avg_sq), replaced by maximum(vmax, v) (AMSGRAD only).
template <bool AMSGRAD>
__device__ __forceinline__ void adam_update(float g, float& w, float& m, float& v, float& vmax, const BlockConsts& c) {
  if (c.flags & kHasGradScale) g = __fdiv_rn(g, c.grad_scale);
  if (c.flags & kHasClip) g = __fmul_rn(g, c.clip);
  if (c.flags & kMaximize) g = -g;
  if (c.flags & kWeightDecay) {
    if (c.flags & kDecoupled)
      w = __fmul_rn(w, c.decay);
    else
      g = __fadd_rn(g, __fmul_rn(w, c.wd));
  }
  m = __fadd_rn(__fmul_rn(m, c.beta1), __fmul_rn(g, c.omb1));
  v = __fadd_rn(__fmul_rn(v, c.beta2), __fmul_rn(__fmul_rn(g, g), c.omb2));
  float vv = v;
  if constexpr (AMSGRAD) {
    vmax = nan_maximum(vmax, v);
    vv = vmax;
  }
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), c.bc2_sqrt), c.eps);
  w = __fsub_rn(w, __fmul_rn(c.step_size, __fdiv_rn(m, denom)));
}

template <typename P, typename G, typename S, bool MASTER, bool AMSGRAD>
struct Streams {
  P* p;
  const G* g;
  S* m;
  S* v;
  S* vmax;      // AMSGRAD only
  float* w;     // MASTER only
};

// Elements [first, first + W * ngroups) of the chunk, in groups of W consecutive elements: group j is handled by
// thread j % kThreads; each thread loads kUnroll groups before computing any. W > 1 needs every stream aligned to
// W * sizeof(element) at `first` (the caller checks 16 bytes for all streams with W = kVec = 4).
template <int W, typename P, typename G, typename S, bool MASTER, bool AMSGRAD>
__device__ __forceinline__ void adam_groups(const Streams<P, G, S, MASTER, AMSGRAD>& s, int first, int ngroups,
                                            const BlockConsts& c) {
  using PP = Pack<P, W>;
  using GP = Pack<G, W>;
  using SP = Pack<S, W>;
  using FP = Pack<float, W>;
  PP* pp = reinterpret_cast<PP*>(s.p + first);
  const GP* gp = reinterpret_cast<const GP*>(s.g + first);
  SP* mp = reinterpret_cast<SP*>(s.m + first);
  SP* vp = reinterpret_cast<SP*>(s.v + first);
  SP* xp = AMSGRAD ? reinterpret_cast<SP*>(s.vmax + first) : nullptr;
  FP* wp = MASTER ? reinterpret_cast<FP*>(s.w + first) : nullptr;
  for (int base = threadIdx.x; base < ngroups; base += kThreads * kUnroll) {
    GP rg[kUnroll];
    SP rm[kUnroll], rv[kUnroll], rx[kUnroll];
    FP rw[kUnroll];
    PP rp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * kThreads;
      if (j < ngroups) {
        rg[u] = gp[j];
        rm[u] = mp[j];
        rv[u] = vp[j];
        if constexpr (AMSGRAD) rx[u] = xp[j];
        if constexpr (MASTER)
          rw[u] = wp[j];
        else
          rp[u] = pp[j];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * kThreads;
      if (j < ngroups) {
#pragma unroll
        for (int k = 0; k < W; ++k) {
          float w, x = 0.0f;
          if constexpr (MASTER)
            w = rw[u].v[k];
          else
            w = static_cast<float>(rp[u].v[k]);
          if constexpr (AMSGRAD) x = static_cast<float>(rx[u].v[k]);
          float m = static_cast<float>(rm[u].v[k]);
          float v = static_cast<float>(rv[u].v[k]);
          adam_update<AMSGRAD>(static_cast<float>(rg[u].v[k]), w, m, v, x, c);
          rm[u].v[k] = static_cast<S>(m);
          rv[u].v[k] = static_cast<S>(v);
          if constexpr (AMSGRAD) rx[u].v[k] = static_cast<S>(x);
          if constexpr (MASTER) rw[u].v[k] = w;
          rp[u].v[k] = static_cast<P>(w);
        }
        mp[j] = rm[u];
        vp[j] = rv[u];
        if constexpr (AMSGRAD) xp[j] = rx[u];
        if constexpr (MASTER) wp[j] = rw[u];
        pp[j] = rp[u];
      }
    }
  }
}

template <typename P, typename G, typename S, bool MASTER, bool AMSGRAD>
using AdamMeta = TensorListMeta<4 + (AMSGRAD ? 1 : 0) + (MASTER ? 1 : 0)>;

template <typename P, typename G, typename S, bool MASTER, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    adam_kernel(const __grid_constant__ AdamMeta<P, G, S, MASTER, AMSGRAD> meta, const AdamArgs a) {
  // found_inf: the whole launch writes nothing (every block leaves before touching memory). NaN != 0 skips too,
  // like the reference's `found_inf != 0`.
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int n = static_cast<int>(min(kChunk, meta.numel[t] - start));
  const float* sc = a.scalars + 3 * static_cast<int64_t>(meta.index[t]);

  BlockConsts c;
  c.beta1 = a.beta1;
  c.omb1 = a.omb1;
  c.beta2 = a.beta2;
  c.omb2 = a.omb2;
  c.eps = a.eps;
  c.wd = a.wd;
  c.step_size = sc[0];
  c.bc2_sqrt = sc[1];
  c.decay = sc[2];
  c.flags = a.flags;
  c.grad_scale = (a.flags & kHasGradScale) ? *a.grad_scale : 1.0f;
  c.clip = (a.flags & kHasClip) ? *a.clip_coef : 1.0f;

  // Lists: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, then max_exp_avg_sq (AMSGRAD), then master (MASTER).
  Streams<P, G, S, MASTER, AMSGRAD> s;
  s.p = static_cast<P*>(meta.addr[0][t]) + start;
  s.g = static_cast<const G*>(meta.addr[1][t]) + start;
  s.m = static_cast<S*>(meta.addr[2][t]) + start;
  s.v = static_cast<S*>(meta.addr[3][t]) + start;
  s.vmax = nullptr;
  s.w = nullptr;
  if constexpr (AMSGRAD) s.vmax = static_cast<S*>(meta.addr[4][t]) + start;
  if constexpr (MASTER) s.w = static_cast<float*>(meta.addr[AMSGRAD ? 5 : 4][t]) + start;

  bool vec_ok = aligned(s.p, 16) && aligned(s.g, 16) && aligned(s.m, 16) && aligned(s.v, 16);
  if constexpr (AMSGRAD) vec_ok = vec_ok && aligned(s.vmax, 16);
  if constexpr (MASTER) vec_ok = vec_ok && aligned(s.w, 16);
  int done = 0;
  if (vec_ok) {
    const int ngroups = n / kVec;
    adam_groups<kVec>(s, 0, ngroups, c);
    done = ngroups * kVec;
  }
  if (done < n) adam_groups<1>(s, done, n - done, c);
}

template <typename P, typename G, typename S, bool MASTER, bool AMSGRAD>
void launch_typed(const std::vector<std::vector<at::Tensor>>& lists, const AdamArgs& args, cudaStream_t stream) {
  using Meta = AdamMeta<P, G, S, MASTER, AMSGRAD>;
  constexpr int kDepth = 4 + (AMSGRAD ? 1 : 0) + (MASTER ? 1 : 0);
  static_assert(sizeof(Meta) <= 32764, "kernel parameters over the CUDA limit");
  multi_tensor_apply<kDepth>(kChunk, lists, [&](const Meta& meta, int nblocks) {
    adam_kernel<P, G, S, MASTER, AMSGRAD><<<nblocks, kThreads, 0, stream>>>(meta, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename P, typename G, typename S, bool MASTER>
void launch_ams(bool amsgrad, const std::vector<std::vector<at::Tensor>>& lists, const AdamArgs& args,
                cudaStream_t stream) {
  if (amsgrad)
    launch_typed<P, G, S, MASTER, true>(lists, args, stream);
  else
    launch_typed<P, G, S, MASTER, false>(lists, args, stream);
}

template <typename P, typename G, typename S>
void launch_master(bool master, bool amsgrad, const std::vector<std::vector<at::Tensor>>& lists,
                   const AdamArgs& args, cudaStream_t stream) {
  if constexpr (std::is_same_v<P, float>) {  // fp32 params never have masters (checked in adam_step_cuda)
    launch_ams<P, G, S, false>(amsgrad, lists, args, stream);
  } else {
    if (master)
      launch_ams<P, G, S, true>(amsgrad, lists, args, stream);
    else
      launch_ams<P, G, S, false>(amsgrad, lists, args, stream);
  }
}

template <typename P, typename G>
void launch_state(at::ScalarType s, bool master, bool amsgrad, const std::vector<std::vector<at::Tensor>>& lists,
                  const AdamArgs& args, cudaStream_t stream) {
  if (s == at::kFloat)
    launch_master<P, G, float>(master, amsgrad, lists, args, stream);
  else
    launch_master<P, G, c10::BFloat16>(master, amsgrad, lists, args, stream);
}

template <typename P>
void launch_grad(at::ScalarType g, at::ScalarType s, bool master, bool amsgrad,
                 const std::vector<std::vector<at::Tensor>>& lists, const AdamArgs& args, cudaStream_t stream) {
  if (g == at::kFloat)
    launch_state<P, float>(s, master, amsgrad, lists, args, stream);
  else
    launch_state<P, P>(s, master, amsgrad, lists, args, stream);
}

// Same element order when walked linearly from data_ptr(): same shape with equal strides on every dim of size > 1
// (the stride of a size-1 dim is arbitrary), or both contiguous.
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() == b.sizes()) {
    for (int64_t d = 0; d < a.dim(); ++d)
      if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
    return true;
  }
  return a.is_contiguous() && b.is_contiguous();
}

void check_companion(const at::Tensor& t, const char* name, size_t i, const at::Tensor& p, at::ScalarType dtype,
                     const char* dtype_rule) {
  TORCH_CHECK(t.scalar_type() == dtype, name, "[", i, "] must be ", dtype_rule, " (", dtype, "), got ",
              t.scalar_type());
  TORCH_CHECK(t.layout() == at::kStrided, name, "[", i, "] must be a dense strided tensor");
  TORCH_CHECK(t.device() == p.device(), name, "[", i, "] is on ", t.device(), " but params[0] is on ", p.device(),
              "; all tensors must share one device");
  TORCH_CHECK(t.numel() == p.numel(), name, "[", i, "] must have the same number of elements as params[", i,
              "], got ", t.numel(), " vs ", p.numel());
  if (t.numel() == 0) return;
  TORCH_CHECK(walkable(t), name, "[", i, "] must be non-overlapping and dense");
  TORCH_CHECK(same_layout(t, p), name, "[", i, "] must have the same shape and strides as params[", i, "]");
  check_allocated(t, name, static_cast<int64_t>(i));
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
                    const at::Tensor& scalars, double beta1, double beta2, double eps, double weight_decay,
                    bool decoupled, bool maximize, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef) {
  const VersionBump bump({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters});
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "grads must have one tensor per param (", n, "), got ", grads.size());
  TORCH_CHECK(exp_avgs.size() == n, "exp_avgs must have one tensor per param (", n, "), got ", exp_avgs.size());
  TORCH_CHECK(exp_avg_sqs.size() == n, "exp_avg_sqs must have one tensor per param (", n, "), got ",
              exp_avg_sqs.size());
  TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n,
              "max_exp_avg_sqs must be empty or have one tensor per param (", n, "), got ", max_exp_avg_sqs.size());
  TORCH_CHECK(masters.empty() || masters.size() == n, "masters must be empty or have one tensor per param (", n,
              "), got ", masters.size());
  if (n == 0) return;
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const bool master = !masters.empty();

  const at::Tensor& p0 = params[0];
  const at::Device dev = p0.device();
  TORCH_CHECK(dev.is_cuda(), "params[0] must be a CUDA tensor, got device ", dev);
  const at::ScalarType pt = p0.scalar_type(), gt = grads[0].scalar_type(), st = exp_avgs[0].scalar_type();
  TORCH_CHECK(is_float_source(pt), "params must be float32, float16 or bfloat16, got ", pt);
  TORCH_CHECK(gt == pt || gt == at::kFloat, "grads must have the params' dtype (", pt, ") or float32, got ", gt);
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, "exp_avgs must be float32 or bfloat16, got ", st);
  TORCH_CHECK(!(master && pt == at::kFloat), "masters must be empty when params are float32");
  TORCH_CHECK(pt != at::kFloat || gt == at::kFloat, "grads must be float32 when params are float32");

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == pt, "params[", i, "] must have the dtype of params[0] (", pt, "), got ",
                p.scalar_type());
    TORCH_CHECK(p.layout() == at::kStrided, "params[", i, "] must be a dense strided tensor");
    TORCH_CHECK(p.device() == dev, "params[", i, "] is on ", p.device(), " but params[0] is on ", dev,
                "; all tensors must share one device");
    if (p.numel() > 0) TORCH_CHECK(walkable(p), "params[", i, "] must be non-overlapping and dense");
    check_allocated(p, "params", static_cast<int64_t>(i));
    check_companion(grads[i], "grads", i, p, gt, "the dtype of grads[0]");
    check_companion(exp_avgs[i], "exp_avgs", i, p, st, "the dtype of exp_avgs[0]");
    check_companion(exp_avg_sqs[i], "exp_avg_sqs", i, p, st, "the dtype of exp_avgs[0]");
    if (amsgrad) check_companion(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, p, st, "the dtype of exp_avgs[0]");
    if (master) check_companion(masters[i], "masters", i, p, at::kFloat, "float32");
  }

  TORCH_CHECK(scalars.scalar_type() == at::kFloat, "scalars must be a float32 tensor, got ", scalars.scalar_type());
  TORCH_CHECK(scalars.dim() == 2 && scalars.size(0) == static_cast<int64_t>(n) && scalars.size(1) == 3,
              "scalars must have shape (", n, ", 3) (one row per param), got ", dims(scalars.sizes()));
  TORCH_CHECK(scalars.is_contiguous(), "scalars must be contiguous");
  TORCH_CHECK(scalars.device() == dev, "scalars must be on ", dev, " (the params' device), got ", scalars.device());
  check_allocated(scalars, "scalars");
  if (grad_scale.has_value()) check_scalar_tensor(*grad_scale, "grad_scale", dev);
  if (found_inf.has_value()) check_scalar_tensor(*found_inf, "found_inf", dev);
  if (clip_coef.has_value()) check_scalar_tensor(*clip_coef, "clip_coef", dev);

  AdamArgs args;
  args.scalars = scalars.const_data_ptr<float>();
  args.grad_scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  args.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  args.clip_coef = clip_coef.has_value() ? clip_coef->const_data_ptr<float>() : nullptr;
  // Exactly the reference's fp32 constants: 1 - beta is taken in fp64, then rounded.
  args.beta1 = static_cast<float>(beta1);
  args.omb1 = static_cast<float>(1.0 - beta1);
  args.beta2 = static_cast<float>(beta2);
  args.omb2 = static_cast<float>(1.0 - beta2);
  args.eps = static_cast<float>(eps);
  args.wd = static_cast<float>(weight_decay);
  args.flags = (grad_scale.has_value() ? kHasGradScale : 0u) | (clip_coef.has_value() ? kHasClip : 0u) |
               (maximize ? kMaximize : 0u) | (weight_decay != 0.0 ? kWeightDecay : 0u) |
               (decoupled ? kDecoupled : 0u);

  std::vector<std::vector<at::Tensor>> lists;
  lists.reserve(6);
  lists.emplace_back(params.begin(), params.end());
  lists.emplace_back(grads.begin(), grads.end());
  lists.emplace_back(exp_avgs.begin(), exp_avgs.end());
  lists.emplace_back(exp_avg_sqs.begin(), exp_avg_sqs.end());
  if (amsgrad) lists.emplace_back(max_exp_avg_sqs.begin(), max_exp_avg_sqs.end());
  if (master) lists.emplace_back(masters.begin(), masters.end());

  const c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (pt) {
    case at::kFloat:  // grads float32, no masters
      launch_state<float, float>(st, false, amsgrad, lists, args, stream);
      break;
    case at::kHalf:
      launch_grad<c10::Half>(gt, st, master, amsgrad, lists, args, stream);
      break;
    default:
      launch_grad<c10::BFloat16>(gt, st, master, amsgrad, lists, args, stream);
      break;
  }
}

}  // namespace

// (as the CPU kernel: adam_step_ through holding_args, _adam_step_unboxed_ for adam_step_bucket_; csrc/cpu/adam.cpp)
TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("adam_step_", holding_args<&adam_step_cuda>());
  m.impl("_adam_step_unboxed_", &adam_step_cuda);
}

}  // namespace mixprec::cuda
