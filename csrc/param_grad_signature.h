// The metadata the optimizer's steady-state step rests on (mixprec_ops/optim/_steady.py), one int64 run per param:
// shared by mixprec::param_grad_signature (csrc/param_grad_signature.cpp) and the AdamBucket's own check
// (mixprec::adam_bucket_unchanged, csrc/adam_bucket.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mixprec {

// Appends params' signature to `sig` (see csrc/param_grad_signature.cpp for what it holds) and, when `grads` is
// given, every param's grad to it as long as all have one. Returns whether every param has a grad.
bool append_param_grad_signature(at::TensorList params, std::vector<int64_t>& sig, std::vector<at::Tensor>* grads);

}  // namespace mixprec
