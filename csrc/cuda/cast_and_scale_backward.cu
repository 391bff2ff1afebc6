// CUDA kernel of mixprec::cast_and_scale_backward: grad_x = (m ? grad_y : 0) * scale, rounded once into x's dtype, m
// = "saturation left x * scale as it was" (see cast_and_scale_backward_reference in mixprec_ops/ops/cast_and_scale.py).
// One pass: grid-stride, vector loads of up to 16 bytes, 64-bit indexing; conversions are c10's (torch's own).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "cuda_common.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent vector loads in flight per thread

template <bool SAT, bool KEEP_INF>
__device__ __forceinline__ float grad_of(float x, float g, float s, float fmax) {
  if constexpr (SAT) {
    const float a = fabsf(x * s);
    if (!(a <= fmax || (KEEP_INF && isinf(a)))) g = 0.0f;  // saturated (or NaN): no gradient
  }
  return g * s;
}

// VEC elements per access (1 when a pointer is not aligned for vector access).
template <typename X, typename G, int VEC, bool SAT, bool KEEP_INF>
__global__ void __launch_bounds__(kThreads) cast_and_scale_backward_kernel(const X* __restrict__ x,
                                                                           const G* __restrict__ g,
                                                                           X* __restrict__ out, int64_t n,
                                                                           const float* __restrict__ scale_ptr,
                                                                           float scale_value, float fmax) {
  const float s = scale_ptr ? *scale_ptr : scale_value;
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  using XPack = Pack<X, VEC>;
  using GPack = Pack<G, VEC>;
  const XPack* xv = reinterpret_cast<const XPack*>(x);
  const GPack* gv = reinterpret_cast<const GPack*>(g);
  XPack* ov = reinterpret_cast<XPack*>(out);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < nvec;
       base += stride * kUnroll) {
    XPack xin[kUnroll];
    GPack gin[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < nvec) {
        if constexpr (SAT) xin[u] = xv[i];  // unsaturated: x is not read
        gin[u] = gv[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < nvec) {
        XPack o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float xk = SAT ? static_cast<float>(xin[u].v[k]) : 0.0f;
          o.v[k] = static_cast<X>(grad_of<SAT, KEEP_INF>(xk, static_cast<float>(gin[u].v[k]), s, fmax));
        }
        ov[i] = o;
      }
    }
  }
  // Tail (< VEC elements), done by the first threads of block 0.
  if (blockIdx.x == 0 && threadIdx.x < n - nvec * VEC) {
    const int64_t i = nvec * VEC + threadIdx.x;
    out[i] = static_cast<X>(grad_of<SAT, KEEP_INF>(static_cast<float>(x[i]), static_cast<float>(g[i]), s, fmax));
  }
}

template <typename X, typename G, int VEC, bool SAT, bool KEEP_INF>
void launch_vec(const X* x, const G* g, X* out, int64_t n, const float* scale_ptr, float scale_value, float fmax,
                cudaStream_t stream) {
  const int64_t nvec = n / VEC;
  const int64_t want = (nvec + static_cast<int64_t>(kThreads) * kUnroll - 1) / (kThreads * kUnroll);
  constexpr auto kernel = &cast_and_scale_backward_kernel<X, G, VEC, SAT, KEEP_INF>;
  kernel<<<grid_stride_blocks<kernel>(want, kThreads), kThreads, 0, stream>>>(x, g, out, n, scale_ptr, scale_value,
                                                                              fmax);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename X, typename G, bool SAT, bool KEEP_INF>
void launch(const at::Tensor& x, const at::Tensor& g, at::Tensor& out, const float* scale_ptr, float scale_value,
            float fmax, cudaStream_t stream) {
  // 16 bytes of the wider of the two element types per access
  constexpr int VEC = 16 / (sizeof(X) > sizeof(G) ? sizeof(X) : sizeof(G));
  const X* xp = static_cast<const X*>(x.const_data_ptr());
  const G* gp = static_cast<const G*>(g.const_data_ptr());
  X* op = static_cast<X*>(out.data_ptr());
  const int64_t n = x.numel();
  if (aligned(xp, sizeof(X) * VEC) && aligned(gp, sizeof(G) * VEC) && aligned(op, sizeof(X) * VEC))
    launch_vec<X, G, VEC, SAT, KEEP_INF>(xp, gp, op, n, scale_ptr, scale_value, fmax, stream);
  else
    launch_vec<X, G, 1, SAT, KEEP_INF>(xp, gp, op, n, scale_ptr, scale_value, fmax, stream);
}

template <typename X, typename G>
void dispatch_mode(const at::Tensor& x, const at::Tensor& g, at::Tensor& out, const float* scale_ptr,
                   float scale_value, bool sat, at::ScalarType dtype, cudaStream_t stream) {
  const float fmax = finite_max(dtype);
  if (!sat) return launch<X, G, false, false>(x, g, out, scale_ptr, scale_value, fmax, stream);
  if (is_fp8(dtype)) return launch<X, G, true, false>(x, g, out, scale_ptr, scale_value, fmax, stream);
  launch<X, G, true, true>(x, g, out, scale_ptr, scale_value, fmax, stream);
}

template <typename X>
void dispatch_grad(const at::Tensor& x, const at::Tensor& g, at::Tensor& out, const float* scale_ptr,
                   float scale_value, bool sat, at::ScalarType dtype, cudaStream_t stream) {
  switch (g.scalar_type()) {
    case at::kFloat: return dispatch_mode<X, float>(x, g, out, scale_ptr, scale_value, sat, dtype, stream);
    case at::kHalf: return dispatch_mode<X, at::Half>(x, g, out, scale_ptr, scale_value, sat, dtype, stream);
    case at::kBFloat16: return dispatch_mode<X, at::BFloat16>(x, g, out, scale_ptr, scale_value, sat, dtype, stream);
    case at::kFloat8_e4m3fn:
      return dispatch_mode<X, c10::Float8_e4m3fn>(x, g, out, scale_ptr, scale_value, sat, dtype, stream);
    case at::kFloat8_e5m2:
      return dispatch_mode<X, c10::Float8_e5m2>(x, g, out, scale_ptr, scale_value, sat, dtype, stream);
    default: TORCH_CHECK(false, "unreachable");
  }
}

at::Tensor cast_and_scale_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x_in, at::ScalarType dtype,
                                        const std::optional<at::Tensor>& scale, double scale_value, bool saturate) {
  check_cast_and_scale_backward_args(grad_y, x_in, dtype, scale);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto [x, g] = backward_layout(x_in, grad_y);
  at::Tensor out = at::empty_like(x);  // x's strides, which g shares: all three walked linearly
  if (x.numel() == 0) return out;
  const float* scale_ptr = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
  const float sv = static_cast<float>(scale_value);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_grad<float>(x, g, out, scale_ptr, sv, saturate, dtype, stream); break;
    case at::kHalf: dispatch_grad<at::Half>(x, g, out, scale_ptr, sv, saturate, dtype, stream); break;
    case at::kBFloat16: dispatch_grad<at::BFloat16>(x, g, out, scale_ptr, sv, saturate, dtype, stream); break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) { m.impl("cast_and_scale_backward", &cast_and_scale_backward_cuda); }

}  // namespace mixprec::cuda
