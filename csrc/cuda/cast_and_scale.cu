// CUDA kernel of mixprec::cast_and_scale: grid-stride, 16-byte loads, 64-bit indexing, one atomic per block for
// amax. Conversions use c10's types, i.e. exactly torch's own cast (round-to-nearest-even).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../common.h"
#include "cuda_common.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread

template <typename Dst, bool SAT, bool KEEP_INF>
__device__ __forceinline__ Dst scale_cast(float v, float s, float fmax) {
  float y = v * s;
  if constexpr (SAT) {
    // Clamp finite overflow to +-fmax; for 16-bit targets inf stays inf, for fp8 it saturates too. NaN stays NaN.
    if (fabsf(y) > fmax && !(KEEP_INF && isinf(y))) y = copysignf(fmax, y);
  }
  return static_cast<Dst>(y);
}

// VEC elements per access: 16 bytes of Src (1 when the pointers are not aligned for vector access).
template <typename Src, typename Dst, int VEC, bool SAT, bool KEEP_INF, bool AMAX>
__global__ void __launch_bounds__(kThreads) cast_and_scale_kernel(const Src* __restrict__ x, Dst* __restrict__ y,
                                                                  int64_t n, const float* __restrict__ scale_ptr,
                                                                  float scale_value, float fmax,
                                                                  uint32_t* __restrict__ amax_bits) {
  __shared__ uint32_t smem[32];
  const float s = scale_ptr ? *scale_ptr : scale_value;
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint32_t m = 0u;
  using InPack = Pack<Src, VEC>;
  using OutPack = Pack<Dst, VEC>;
  const InPack* xv = reinterpret_cast<const InPack*>(x);
  OutPack* yv = reinterpret_cast<OutPack*>(y);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < nvec;
       base += stride * kUnroll) {
    InPack in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < nvec) in[u] = xv[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < nvec) {
        OutPack out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float v = static_cast<float>(in[u].v[k]);
          if constexpr (AMAX) m = max(m, abs_bits(v));
          out.v[k] = scale_cast<Dst, SAT, KEEP_INF>(v, s, fmax);
        }
        yv[i] = out;
      }
    }
  }
  // Tail (< VEC elements), done by the first threads of block 0.
  if (blockIdx.x == 0 && threadIdx.x < n - nvec * VEC) {
    const int64_t i = nvec * VEC + threadIdx.x;
    const float v = static_cast<float>(x[i]);
    if constexpr (AMAX) m = max(m, abs_bits(v));
    y[i] = scale_cast<Dst, SAT, KEEP_INF>(v, s, fmax);
  }
  if constexpr (AMAX) {
    m = block_max(m, smem);
    // Signed max on the bits: |x| bits are non-negative ints, in float order (NaN above inf); an amax that starts
    // at -0.0 or a negative value reads as a negative int, so any |x| replaces it (float max semantics).
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(amax_bits), static_cast<int>(m));
  }
}

template <typename Src, typename Dst, int VEC, bool SAT, bool KEEP_INF>
void launch_amax(const Src* x, Dst* y, int64_t n, const float* scale_ptr, float scale_value, float fmax,
                 uint32_t* amax_bits, cudaStream_t stream) {
  const int64_t nvec = n / VEC;
  const int64_t want = (nvec + static_cast<int64_t>(kThreads) * kUnroll - 1) / (kThreads * kUnroll);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, sm_count() * 8LL)));
  if (amax_bits)
    cast_and_scale_kernel<Src, Dst, VEC, SAT, KEEP_INF, true>
        <<<blocks, kThreads, 0, stream>>>(x, y, n, scale_ptr, scale_value, fmax, amax_bits);
  else
    cast_and_scale_kernel<Src, Dst, VEC, SAT, KEEP_INF, false>
        <<<blocks, kThreads, 0, stream>>>(x, y, n, scale_ptr, scale_value, fmax, amax_bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Src, typename Dst, bool KEEP_INF>
void launch(const at::Tensor& x, at::Tensor& y, const float* scale_ptr, float scale_value, bool sat, float fmax,
            uint32_t* amax_bits, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(Src);
  const Src* xp = static_cast<const Src*>(x.const_data_ptr());
  Dst* yp = static_cast<Dst*>(y.data_ptr());
  const int64_t n = x.numel();
  const bool vec_ok = aligned(xp, 16) && aligned(yp, sizeof(Dst) * VEC);
  if (vec_ok) {
    if (sat) launch_amax<Src, Dst, VEC, true, KEEP_INF>(xp, yp, n, scale_ptr, scale_value, fmax, amax_bits, stream);
    else launch_amax<Src, Dst, VEC, false, KEEP_INF>(xp, yp, n, scale_ptr, scale_value, fmax, amax_bits, stream);
  } else {
    if (sat) launch_amax<Src, Dst, 1, true, KEEP_INF>(xp, yp, n, scale_ptr, scale_value, fmax, amax_bits, stream);
    else launch_amax<Src, Dst, 1, false, KEEP_INF>(xp, yp, n, scale_ptr, scale_value, fmax, amax_bits, stream);
  }
}

template <typename Src>
void dispatch_dst(const at::Tensor& x, at::Tensor& y, at::ScalarType dtype, const float* scale_ptr,
                  float scale_value, bool sat, uint32_t* amax_bits, cudaStream_t stream) {
  const float fmax = finite_max(dtype);
  switch (dtype) {
    case at::kHalf: return launch<Src, at::Half, true>(x, y, scale_ptr, scale_value, sat, fmax, amax_bits, stream);
    case at::kBFloat16:
      return launch<Src, at::BFloat16, true>(x, y, scale_ptr, scale_value, sat, fmax, amax_bits, stream);
    case at::kFloat8_e4m3fn:
      return launch<Src, at::Float8_e4m3fn, false>(x, y, scale_ptr, scale_value, sat, fmax, amax_bits, stream);
    case at::kFloat8_e5m2:
      return launch<Src, at::Float8_e5m2, false>(x, y, scale_ptr, scale_value, sat, fmax, amax_bits, stream);
    default: TORCH_CHECK(false, "unreachable");
  }
}

at::Tensor cast_and_scale_cuda(const at::Tensor& x_in, at::ScalarType dtype, const std::optional<at::Tensor>& scale,
                               double scale_value, const std::optional<at::Tensor>& amax, bool saturate) {
  check_cast_and_scale_args(x_in, dtype, scale, amax);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = walkable(x_in) ? x_in : x_in.contiguous();
  at::Tensor y = at::empty_like(x, x.options().dtype(dtype));  // same strides as x: walk both linearly
  if (x.numel() == 0) return y;
  const float* scale_ptr = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
  uint32_t* amax_bits = amax.has_value() ? reinterpret_cast<uint32_t*>(amax->data_ptr<float>()) : nullptr;
  const float sv = static_cast<float>(scale_value);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_dst<float>(x, y, dtype, scale_ptr, sv, saturate, amax_bits, stream); break;
    case at::kHalf: dispatch_dst<at::Half>(x, y, dtype, scale_ptr, sv, saturate, amax_bits, stream); break;
    case at::kBFloat16: dispatch_dst<at::BFloat16>(x, y, dtype, scale_ptr, sv, saturate, amax_bits, stream); break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) { m.impl("cast_and_scale", &cast_and_scale_cuda); }

}  // namespace mixprec::cuda
