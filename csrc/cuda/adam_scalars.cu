// CUDA kernel of mixprec::adam_scalars: the (n, 3) per-tensor scalars of an Adam step from n step counters, one
// launch instead of the ~13 of the torch expression (adam_scalars_reference in mixprec_ops/ops/adam.py). lr is read
// on the device when it is a tensor (no host sync; graph-capturable).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../adam_scalars.h"
#include "../common.h"
#include "cuda_common.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kThreads = 128;

// lr_kind: 0 = lr_value, 1 = *lr as float32, 2 = *lr as float64.
__global__ void adam_scalars_kernel(const float* __restrict__ steps, int64_t n, const void* __restrict__ lr,
                                    int lr_kind, double lr_value, double beta1, double beta2, double weight_decay,
                                    float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  const double lr_d = lr_kind == 0   ? lr_value
                      : lr_kind == 1 ? static_cast<double>(*static_cast<const float*>(lr))
                                     : *static_cast<const double*>(lr);
  adam_scalars_row(static_cast<double>(steps[i]), lr_d, beta1, beta2, weight_decay, out + 3 * i);
}

at::Tensor adam_scalars_cuda(const at::Tensor& steps, const std::optional<at::Tensor>& lr, double lr_value,
                             double beta1, double beta2, double weight_decay) {
  check_adam_scalars_args(steps, lr);
  TORCH_CHECK(steps.device().is_cuda(), "steps must be a CUDA tensor, got one on ", steps.device());
  const c10::cuda::CUDAGuard guard(steps.device());
  const at::Tensor s = steps.contiguous();
  const int64_t n = s.numel();
  at::Tensor out = at::empty({n, 3}, steps.options().dtype(at::kFloat));
  if (n == 0) return out;
  const int lr_kind = !lr.has_value() ? 0 : lr->scalar_type() == at::kFloat ? 1 : 2;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= 0x7fffffff, "steps has too many elements (", n, ") for one launch");
  adam_scalars_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      s.const_data_ptr<float>(), n, lr.has_value() ? lr->const_data_ptr() : nullptr, lr_kind, lr_value, beta1, beta2,
      weight_decay, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) { m.impl("adam_scalars", &adam_scalars_cuda); }

}  // namespace mixprec::cuda
