// CUDA kernel of mixprec::unscale_: multi-tensor, in place t *= inv_scale, found_inf flag, optional L2 norm.
// fp32, fp16 and bf16 tensors may be mixed (one launch series per dtype). The norm is deterministic: each block
// writes its partial sum of squares to a scratch slot and one final block adds them in fp64.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"
#include "../hold_args.h"
#include "multi_tensor.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kUnroll = 4;
using Meta = TensorListMeta<1>;

template <typename T, bool NORM>
__global__ void __launch_bounds__(kThreads)
    unscale_kernel(const __grid_constant__ Meta meta, const float* __restrict__ inv_scale,
                   float* __restrict__ found_inf, float* __restrict__ partials) {
  constexpr int VEC = 16 / sizeof(T);
  using P = Pack<T, VEC>;
  __shared__ float smem[32];
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  T* p = static_cast<T*>(meta.addr[0][t]) + start;
  const int64_t n = min(kChunk, meta.numel[t] - start);
  const float inv = *inv_scale;
  const bool write = inv != 1.0f;  // x * 1 == x: then the pass only reads (inf/NaN probe, clipping norm)
  float sq = 0.0f;
  bool bad = false;
  int64_t done = 0;
  if (aligned(p, 16)) {
    const int64_t nvec = n / VEC;
    P* pv = reinterpret_cast<P*>(p);
    for (int64_t base = threadIdx.x; base < nvec; base += kThreads * kUnroll) {
      P r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * kThreads < nvec) r[u] = pv[base + u * kThreads];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kThreads < nvec) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float v = static_cast<float>(r[u].v[k]) * inv;
            bad |= !(fabsf(v) < OverflowAt<T>::value);  // non-finite once stored as T
            if constexpr (NORM) sq = fmaf(v, v, sq);
            r[u].v[k] = static_cast<T>(v);
          }
          if (write) pv[base + u * kThreads] = r[u];
        }
      }
    }
    done = nvec * VEC;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    const float v = static_cast<float>(p[i]) * inv;
    bad |= !(fabsf(v) < OverflowAt<T>::value);
    if constexpr (NORM) sq = fmaf(v, v, sq);
    if (write) p[i] = static_cast<T>(v);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
  if constexpr (NORM) {
    sq = block_sum(sq, smem);
    if (threadIdx.x == 0) partials[meta.block_offset + blockIdx.x] = sq;
  }
}

__global__ void finish_norm_kernel(const float* __restrict__ partials, int64_t n, float* __restrict__ out) {
  __shared__ double smem[1024 / 32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<double>(partials[i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double tot = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) tot += smem[w];
    *out = static_cast<float>(sqrt(tot));
  }
}

template <typename T>
int64_t launch_group(const std::vector<at::Tensor>& ts, const float* inv, float* found_inf, float* partials,
                     int64_t block_base, cudaStream_t stream) {
  return multi_tensor_apply<1>(
      kChunk, {ts},
      [&](const Meta& meta, int nblocks) {
        if (partials)
          unscale_kernel<T, true><<<nblocks, kThreads, 0, stream>>>(meta, inv, found_inf, partials);
        else
          unscale_kernel<T, false><<<nblocks, kThreads, 0, stream>>>(meta, inv, found_inf, partials);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      block_base);
}

at::Tensor unscale_cuda(at::TensorList tensors, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                        bool return_norm) {
  const VersionBump bump({tensors}, &found_inf);
  check_unscale_args(tensors, inv_scale, found_inf);
  const c10::cuda::CUDAGuard guard(inv_scale.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> groups[3];  // float, half, bfloat16
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (original, dense working copy)
  int64_t nchunks = 0;
  for (const auto& t0 : tensors) {
    at::Tensor t = t0;
    if (t.numel() == 0) continue;
    if (!walkable(t)) {
      t = t0.contiguous();
      copy_back.emplace_back(t0, t);
    }
    const int g = t.scalar_type() == at::kFloat ? 0 : t.scalar_type() == at::kHalf ? 1 : 2;
    groups[g].push_back(t);
    nchunks += (t.numel() + kChunk - 1) / kChunk;
  }
  at::Tensor partials, norm;
  if (return_norm) {
    partials = at::empty({std::max<int64_t>(nchunks, 1)}, inv_scale.options());
    norm = at::empty({}, inv_scale.options());
  }
  const float* inv = inv_scale.const_data_ptr<float>();
  float* fi = found_inf.data_ptr<float>();
  float* part = return_norm ? partials.data_ptr<float>() : nullptr;
  int64_t base = 0;
  base += launch_group<float>(groups[0], inv, fi, part, base, stream);
  base += launch_group<at::Half>(groups[1], inv, fi, part, base, stream);
  base += launch_group<at::BFloat16>(groups[2], inv, fi, part, base, stream);
  for (auto& [orig, work] : copy_back) orig.copy_(work);
  if (!return_norm) return at::empty({0}, inv_scale.options());
  finish_norm_kernel<<<1, 1024, 0, stream>>>(part, base, norm.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return norm;
}

}  // namespace

// (through holding_args: a call from Python drops its list after taking the GIL back, once; csrc/hold_args.h)
TORCH_LIBRARY_IMPL(mixprec, CUDA, m) { m.impl("unscale_", holding_args<&unscale_cuda>()); }

}  // namespace mixprec::cuda
