// mixprec::AdamBucket: the state lists of one launch of the optimizer's steady-state step (mixprec_ops/optim/
// _steady.py), kept on the C++ side between steps, so that a step converts only the params from Python (~0.1 us a
// tensor: 6,000 fewer for 2,000 bf16 params with masters); the grads are read from the params at each step. The
// params themselves are not held: a reference from C++ would make torch.utils.swap_tensors refuse them (it wants
// the param's only reference) and hide a reference cycle through a param from Python's garbage collector. What is
// kept of them is their metadata signature when the bucket was made (csrc/param_grad_signature.h), which
// mixprec::adam_bucket_unchanged compares with theirs at each step.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace mixprec {

struct AdamBucket : torch::CustomClassHolder {
  std::vector<at::Tensor> exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters;
  std::vector<int64_t> signature;  // the params' (with their grads), when the bucket was made

  // params: the launch's params, each with its grad (their signature is taken; they are not held)
  AdamBucket(const std::vector<at::Tensor>& params, std::vector<at::Tensor> exp_avgs_,
             std::vector<at::Tensor> exp_avg_sqs_, std::vector<at::Tensor> max_exp_avg_sqs_,
             std::vector<at::Tensor> masters_);
};

// mixprec::adam_bucket_unchanged's kernel: the params have the signature the bucket was made with (the same
// tensors' metadata, a grad each of the same kind). Metadata only, any device.
bool adam_bucket_unchanged(at::TensorList params, const c10::intrusive_ptr<AdamBucket>& bucket);

// mixprec::adam_step_bucket_'s kernel (csrc/adam_bucket.cpp), for every device.
void adam_step_bucket(at::TensorList params, const c10::intrusive_ptr<AdamBucket>& bucket, const at::Tensor& steps,
                      const std::optional<at::Tensor>& lr, double lr_value, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled, bool maximize, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                      at::TensorList grads);

}  // namespace mixprec
