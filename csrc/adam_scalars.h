// The per-tensor scalars of one Adam step, shared by the CPU and CUDA kernels of mixprec::adam_scalars. The
// definition is adam_scalars_reference (mixprec_ops/ops/adam.py): with t = step + 1, in fp64, each op rounded on its
// own (no FMA: -ffp-contract=off on the host, explicit _rn intrinsics on the device), each result rounded once to
// fp32:
//   step_size = lr / (1 - beta1^t),  bc2_sqrt = sqrt(1 - beta2^t),  decay = 1 - lr * weight_decay.
// pow is the platform's fp64 pow (glibc on the CPU; libdevice on the GPU, which is also what torch.pow calls there);
// ATen's vectorised CPU pow (Sleef, <= 1 fp64 ulp) can differ from glibc's in the last fp64 bit. That bit reaches the
// fp32 result only when the fp64 value lies within it of an fp32 rounding boundary; 1 - beta^t cancels at small t
// (t = 1, beta = 0.9999: the error grows ~1e4 times), which makes it likelier there than 2^-29, still rare. No value
// differs in tests/test_adam_kernels.py's sweep (2e6 steps x 5 betas x 4 lr).
#pragma once
#include <torch/headeronly/macros/Macros.h>

#include <cmath>

namespace mixprec {

C10_HOST_DEVICE inline void adam_scalars_row(double step, double lr, double beta1, double beta2, double weight_decay,
                                             float* out) {
#ifdef __CUDA_ARCH__
  const double t = __dadd_rn(step, 1.0);
  out[0] = static_cast<float>(__ddiv_rn(lr, __dsub_rn(1.0, ::pow(beta1, t))));
  out[1] = static_cast<float>(__dsqrt_rn(__dsub_rn(1.0, ::pow(beta2, t))));
  out[2] = static_cast<float>(__dsub_rn(1.0, __dmul_rn(lr, weight_decay)));
#else
  const double t = step + 1.0;
  out[0] = static_cast<float>(lr / (1.0 - std::pow(beta1, t)));
  out[1] = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  out[2] = static_cast<float>(1.0 - lr * weight_decay);
#endif
}

}  // namespace mixprec
