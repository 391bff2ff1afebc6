// mixprec::adam_step_bucket_: mixprec::adam_step_ over params and an AdamBucket's state lists (csrc/adam_bucket.h),
// the grads read from the params (p.grad) at the call. One kernel for every device: it calls adam_step_'s own
// kernel for the params' device through the dispatcher, unboxed, below autograd (the op's autograd kernel, as
// adam_step_'s, refuses params that require grad under grad mode), so the checks and the launches are adam_step_'s.
// Registered in csrc/schemas.cpp, after the class (the kernel's signature names it: registered from another file's
// static initializer, it could come first, and loading the library aborts).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "adam_bucket.h"

namespace mixprec {

using AdamStep = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      const at::Tensor&, double, double, double, double, bool, bool, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

void adam_step_bucket(at::TensorList params, const c10::intrusive_ptr<AdamBucket>& bucket, const at::Tensor& scalars,
                      double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& clip_coef) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mixprec::adam_step_", "").typed<AdamStep>();
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& g = params[i].grad();
    TORCH_CHECK(g.defined(), "params[", i, "] has no grad");
    grads.push_back(g);
  }
  // below autograd and the view/in-place bookkeeping: straight to the device's kernel (no boxing of the lists)
  const c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
  op.call(params, grads, bucket->exp_avgs, bucket->exp_avg_sqs, bucket->max_exp_avg_sqs, bucket->masters, scalars,
          beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale, found_inf, clip_coef);
}

}  // namespace mixprec
