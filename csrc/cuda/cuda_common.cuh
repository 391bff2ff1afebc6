// Small CUDA helpers shared by mixprec's kernels. Light headers only: ATen/cuda/CUDAContext.h pulls cusparse.h,
// which the toolkits on our build machines lack (see shared/notes/environment.md).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace mixprec::cuda {

// Number of multiprocessors of the current device (cached per device).
inline int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && cache[dev]) return cache[dev];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cache[dev] = n;
  return n;
}

// Grid for a grid-stride kernel in which every block does the same share of the work: `want` blocks (enough for one
// pass), at most one full wave of the blocks `Kernel` keeps resident at `threads` threads a block. Beyond that wave
// the blocks left over run in a second, partial one, after the first has finished its equal shares: e.g. 8 blocks
// a multiprocessor where 6 fit at 40 registers a thread leaves the last quarter of the work to 2 blocks a
// multiprocessor, too few loads in flight to keep HBM busy. Cached per kernel and device.
template <auto Kernel>
int grid_stride_blocks(int64_t want, int threads) {
  static std::atomic<int> cache[64];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int wave = dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (wave == 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, 0));
    wave = std::max(1, per_sm) * sm_count();
    if (dev < 64) cache[dev].store(wave, std::memory_order_relaxed);
  }
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, wave)));
}

// `N` elements of T moved as one aligned access (16 bytes for the widest case).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__host__ __device__ inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// |x| as its bit pattern: for non-negative floats (inf and NaN too) unsigned order equals float order, and NaN
// sorts above everything, so an unsigned max over these propagates NaN like torch.amax.
__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide max of `v`, valid in thread 0. `smem` holds one slot per warp (<= 32).
__device__ __forceinline__ uint32_t block_max(uint32_t v, uint32_t* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? smem[lane] : 0u;
    v = warp_max(v);
  }
  return v;
}

__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? smem[lane] : 0.0f;
    v = warp_sum(v);
  }
  return v;
}

}  // namespace mixprec::cuda
