// CUDA kernel of mixprec::cast_and_scale: grid-stride over one wave of resident blocks, 16-byte loads, 64-bit
// indexing, one atomic per block for amax. Conversions give exactly torch's own cast (c10's, round-to-nearest-even):
// c10's types, or for saturated fp8 on sm_89+ the hardware conversion, which gives the same bits (store_fp8_hw).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <cuda_fp8.h>
#include <torch/library.h>

#include <type_traits>

#include "../common.h"
#include "cuda_common.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread

template <bool SAT, bool KEEP_INF>
__device__ __forceinline__ float scale_clamp(float v, float s, float fmax) {
  float y = v * s;
  if constexpr (SAT) {
    // Clamp finite overflow to +-fmax; for 16-bit targets inf stays inf, for fp8 it saturates too. NaN stays NaN.
    if (fabsf(y) > fmax && !(KEEP_INF && isinf(y))) y = copysignf(fmax, y);
  }
  return y;
}

// Saturated values y (|y| <= fmax, or NaN) to fp8 with the hardware conversion, cvt.rn.satfinite.{e4m3,e5m2}x2.f32
// (sm_89+; F2FP in SASS): two values per instruction instead of ~20 integer ops each in c10's
// fp8e4m3fn_from_fp32_value / fp8e5m2_from_fp32_value. The bits are c10's: both round to nearest even (subnormal
// results and ties included), and both are sign-magnitude, so a value rounding to zero (an fp32 subnormal too) keeps
// its sign as c10's `| sign` does; saturation never engages, the clamp came first. NaN differs: c10 gives 0x7F | sign,
// the instruction a canonical NaN (0x7F in cuda_fp8.hpp's host model of it) whose sign is not to be relied on, so NaN
// bytes are rewritten, on a branch that only packs holding a NaN take.
template <typename Dst, int N>
__device__ __forceinline__ void store_fp8_hw(Pack<Dst, N>* dst, const float (&y)[N]) {
  constexpr __nv_fp8_interpretation_t kind = std::is_same_v<Dst, at::Float8_e4m3fn> ? __NV_E4M3 : __NV_E5M2;
  const auto c10_fp8_nan = [](float v) -> uint32_t { return 0x7Fu | (__float_as_uint(v) >> 31 << 7); };  // both formats
  if constexpr (N == 1) {
    const uint32_t b = __nv_cvt_float_to_fp8(y[0], __NV_SATFINITE, kind);
    dst->v[0] = Dst(y[0] != y[0] ? c10_fp8_nan(y[0]) : b, Dst::from_bits());
  } else {
    static_assert(N % 2 == 0, "fp8 pairs");
    Pack<__nv_fp8x2_storage_t, N / 2> p;  // same bytes and alignment as Pack<Dst, N>
    bool any_nan = false;
#pragma unroll
    for (int k = 0; k < N; k += 2) {
      p.v[k / 2] = __nv_cvt_float2_to_fp8x2(make_float2(y[k], y[k + 1]), __NV_SATFINITE, kind);
      any_nan |= (y[k] != y[k]) | (y[k + 1] != y[k + 1]);  // one unordered compare (FSETP.NAN) per pair
    }
    if (__builtin_expect(any_nan, 0)) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int shift = 8 * (k % 2);
        if (y[k] != y[k]) p.v[k / 2] = (p.v[k / 2] & ~(0xFFu << shift)) | (c10_fp8_nan(y[k]) << shift);
      }
    }
    *reinterpret_cast<Pack<__nv_fp8x2_storage_t, N / 2>*>(dst) = p;
  }
}

// Rounds y to Dst and stores it: c10's conversion, or on sm_89+ the hardware one for saturated fp8 (bit-identical,
// see store_fp8_hw). Unsaturated fp8 keeps c10's, whose overflow rule is the installed torch's (it changed in 2.12:
// NaN before, saturation after). The sm_80 code always takes c10's.
template <typename Dst, bool SAT, int N>
__device__ __forceinline__ void store_cast(Pack<Dst, N>* dst, const float (&y)[N]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  constexpr bool kHw = SAT && kIsFp8<Dst>;
#else
  constexpr bool kHw = false;
#endif
  if constexpr (kHw) {
    store_fp8_hw(dst, y);
  } else {
    Pack<Dst, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) out.v[k] = static_cast<Dst>(y[k]);
    *dst = out;
  }
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
        float out[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float v = static_cast<float>(in[u].v[k]);
          if constexpr (AMAX) m = max(m, abs_bits(v));
          out[k] = scale_clamp<SAT, KEEP_INF>(v, s, fmax);
        }
        store_cast<Dst, SAT>(yv + i, out);
      }
    }
  }
  // Tail (< VEC elements), done by the first threads of block 0.
  if (blockIdx.x == 0 && threadIdx.x < n - nvec * VEC) {
    const int64_t i = nvec * VEC + threadIdx.x;
    const float v = static_cast<float>(x[i]);
    if constexpr (AMAX) m = max(m, abs_bits(v));
    const float out[1] = {scale_clamp<SAT, KEEP_INF>(v, s, fmax)};
    store_cast<Dst, SAT>(reinterpret_cast<Pack<Dst, 1>*>(y + i), out);
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
  constexpr auto with_amax = &cast_and_scale_kernel<Src, Dst, VEC, SAT, KEEP_INF, true>;
  constexpr auto without = &cast_and_scale_kernel<Src, Dst, VEC, SAT, KEEP_INF, false>;
  if (amax_bits)
    with_amax<<<grid_stride_blocks<with_amax>(want, kThreads), kThreads, 0, stream>>>(x, y, n, scale_ptr,
                                                                                     scale_value, fmax, amax_bits);
  else
    without<<<grid_stride_blocks<without>(want, kThreads), kThreads, 0, stream>>>(x, y, n, scale_ptr, scale_value,
                                                                                  fmax, amax_bits);
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
  const VersionBump bump({}, amax.has_value() ? &*amax : nullptr);
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
