// mixprec::AdamBucket's kernels (csrc/adam_bucket.h), one for every device:
// - adam_bucket_unchanged: the steady-state step's check that the params still have the metadata the bucket's lists
//   were made for (their signature, csrc/param_grad_signature.h), compared here rather than returned to Python as a
//   tensor and compared there (no tensor made, no grads handed out, one op call);
// - adam_step_bucket_: a whole launch of the optimizer over the params and the bucket's state lists, the grads read
//   from the params (p.grad) at the call: the per-tensor scalars from the bucket's step counters (adam_scalars),
//   adam_step_, then the counters' count (+1, or +0 when found_inf says the step is skipped); or the grads given, one
//   a param (DTensor params' local shards, which have no .grad: mixprec_ops/optim/_steady.py). Three ops that the
//   optimizer called one by one from Python (~10 us of host time each on the CI CPU), here called typed through the
//   dispatcher (adam_step_'s kernels as _adam_step_unboxed_, csrc/schemas.cpp) below autograd (this op's own
//   Autograd kernel, csrc/schemas.cpp, refuses params that require grad under grad mode), so the checks and the
//   launches are those ops' own; adam_step_'s checks run before the count, which a refused call leaves unchanged.
// Registered in csrc/schemas.cpp, after the class (the kernels' signatures name it: registered from another file's
// static initializer, they could come first, and loading the library aborts).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/eq.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "adam_bucket.h"
#include "common.h"
#include "hold_args.h"
#include "param_grad_signature.h"

namespace mixprec {

using AdamStep = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      const at::Tensor&, double, double, double, double, bool, bool, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
using AdamScalars = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, double, double, double, double);

AdamBucket::AdamBucket(const std::vector<at::Tensor>& params, std::vector<at::Tensor> exp_avgs_,
                       std::vector<at::Tensor> exp_avg_sqs_, std::vector<at::Tensor> max_exp_avg_sqs_,
                       std::vector<at::Tensor> masters_)
    : exp_avgs(std::move(exp_avgs_)),
      exp_avg_sqs(std::move(exp_avg_sqs_)),
      max_exp_avg_sqs(std::move(max_exp_avg_sqs_)),
      masters(std::move(masters_)) {
  TORCH_CHECK(append_param_grad_signature(params, signature, nullptr),
              "AdamBucket: every param must have a grad when the bucket is made");
}

bool adam_bucket_unchanged(at::TensorList params, const c10::intrusive_ptr<AdamBucket>& bucket) {
  thread_local std::vector<int64_t> sig;  // (its capacity kept from call to call)
  sig.clear();
  return append_param_grad_signature(params, sig, nullptr) && sig == bucket->signature;
}

void adam_step_bucket(at::TensorList params, const c10::intrusive_ptr<AdamBucket>& bucket, const at::Tensor& steps,
                      const std::optional<at::Tensor>& lr, double lr_value, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled, bool maximize, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                      at::TensorList given_grads) {
  static const auto step_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mixprec::_adam_step_unboxed_", "")
          .typed<AdamStep>();
  static const auto scalars_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mixprec::adam_scalars", "").typed<AdamScalars>();
  TORCH_CHECK(steps.dim() == 1 && steps.size(0) == static_cast<int64_t>(params.size()),
              "steps must be a 1-D tensor of one counter a param (", params.size(), "), got shape ",
              dims(steps.sizes()));
  // Refused here, before anything is written, what the count at the end would refuse after the step: counters that
  // share memory (an expanded or overlapping view: add_ refuses to write one element twice) and a negative-bit view
  // (torch's fallback would step a resolved copy; this op's Negative key falls through to reach this check,
  // csrc/schemas.cpp). The optimizer's step buffer is a plain contiguous tensor.
  TORCH_CHECK(steps.is_contiguous(), "steps must be contiguous (one counter of its own a param), got strides ",
              dims(steps.strides()));
  TORCH_CHECK(!steps.is_neg(), "steps must not be a negative-bit view (torch._neg_view); resolve_neg() it first");
  TORCH_CHECK(given_grads.empty() || given_grads.size() == params.size(),
              "grads must be empty (the params' own grads are read) or hold one grad a param (", params.size(),
              "), got ", given_grads.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(!params[i].is_neg(), "params[", i, "] must not be a negative-bit view (torch._neg_view)");
  }
  std::vector<at::Tensor> grads;
  if (!given_grads.empty()) {
    // (their dtypes, devices, element counts and layouts checked by adam_step_'s kernel, as its own arguments; the
    // shape here: p.grad's is torch's to enforce, a given grad's is not)
    for (size_t i = 0; i < params.size(); ++i) {
      TORCH_CHECK(given_grads[i].sizes() == params[i].sizes(), "grads[", i, "] must have params[", i, "]'s shape ",
                  dims(params[i].sizes()), ", got ", dims(given_grads[i].sizes()));
    }
    grads.assign(given_grads.begin(), given_grads.end());
  } else {
    grads.reserve(params.size());
    const GradReadLock gil;  // (the grads are read under the GIL: hold_args.h)
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& g = params[i].grad();
      TORCH_CHECK(g.defined(), "params[", i, "] has no grad");
      grads.push_back(g);
    }
  }
  // The counters' version moves once, when the call returns, as with the add_ that counted from Python (params and
  // states: adam_step_'s kernel moves theirs). Constructed before the guard below: both hold it, this one longest.
  const VersionBump bump({}, &steps);
  // below autograd and the view/in-place bookkeeping: straight to the device's kernels (no boxing of the lists)
  const c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
  const at::Tensor scalars = scalars_op.call(steps, lr, lr_value, beta1, beta2, weight_decay);
  step_op.call(params, grads, bucket->exp_avgs, bucket->exp_avg_sqs, bucket->max_exp_avg_sqs, bucket->masters,
               scalars, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale, found_inf, clip_coef);
  // a skipped step does not count (+ (found_inf == 0)), as with torch's fused Adam under a GradScaler
  if (found_inf.has_value()) {
    steps.add_(at::eq(found_inf->reshape({}), 0));
  } else {
    steps.add_(1.0);
  }
}

}  // namespace mixprec
