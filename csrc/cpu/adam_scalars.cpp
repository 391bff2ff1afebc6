// C++ CPU kernel of mixprec::adam_scalars: the (n, 3) per-tensor scalars of an Adam step from n step counters, one
// op instead of the ~13 of the torch expression (adam_scalars_reference in mixprec_ops/ops/adam.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "../adam_scalars.h"
#include "../common.h"

namespace mixprec::cpu {
namespace {

at::Tensor adam_scalars_cpu(const at::Tensor& steps, const std::optional<at::Tensor>& lr, double lr_value,
                            double beta1, double beta2, double weight_decay) {
  check_adam_scalars_args(steps, lr);
  TORCH_CHECK(steps.device().is_cpu(), "steps must be a CPU tensor, got one on ", steps.device());
  const at::Tensor s = steps.contiguous();
  const int64_t n = s.numel();
  at::Tensor out = at::empty({n, 3}, steps.options().dtype(at::kFloat));
  const double lr_d = !lr.has_value() ? lr_value
                      : lr->scalar_type() == at::kDouble ? *lr->const_data_ptr<double>()
                                                         : static_cast<double>(*lr->const_data_ptr<float>());
  const float* sp = s.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    // A bucket's counters are mostly equal (its params step together): a counter equal to the one before it gets
    // that row (the same t, so the same bits; +0 and -0 give the same t; NaN never compares equal), and the two
    // glibc pows (~45 ns, serial) are paid once per run of equal counters.
    if (i > 0 && sp[i] == sp[i - 1]) {
      std::copy(o + 3 * (i - 1), o + 3 * i, o + 3 * i);
      continue;
    }
    adam_scalars_row(static_cast<double>(sp[i]), lr_d, beta1, beta2, weight_decay, o + 3 * i);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("adam_scalars", &adam_scalars_cpu); }

}  // namespace mixprec::cpu
