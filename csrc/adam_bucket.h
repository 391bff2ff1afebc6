// mixprec::AdamBucket: the state lists of one launch of the optimizer's steady-state step (mixprec_ops/optim/
// _steady.py), kept on the C++ side between steps, so that a step converts only the params from Python (~0.1 us a
// tensor: 6,000 fewer for 2,000 bf16 params with masters); the grads are read from the params at each step. The
// params themselves are not held: a reference from C++ would make torch.utils.swap_tensors refuse them (it wants
// the param's only reference) and hide a reference cycle through a param from Python's garbage collector.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <optional>
#include <utility>
#include <vector>

namespace mixprec {

struct AdamBucket : torch::CustomClassHolder {
  std::vector<at::Tensor> exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters;

  AdamBucket(std::vector<at::Tensor> exp_avgs_, std::vector<at::Tensor> exp_avg_sqs_,
             std::vector<at::Tensor> max_exp_avg_sqs_, std::vector<at::Tensor> masters_)
      : exp_avgs(std::move(exp_avgs_)),
        exp_avg_sqs(std::move(exp_avg_sqs_)),
        max_exp_avg_sqs(std::move(max_exp_avg_sqs_)),
        masters(std::move(masters_)) {}
};

// mixprec::adam_step_bucket_'s kernel (csrc/adam_bucket.cpp), for every device.
void adam_step_bucket(at::TensorList params, const c10::intrusive_ptr<AdamBucket>& bucket, const at::Tensor& scalars,
                      double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& clip_coef);

}  // namespace mixprec
