// The one place where mixprec's operator schemas are defined. Each backend file registers its kernels with
// TORCH_LIBRARY_IMPL(mixprec, <DispatchKey>, m); fakes (meta) are registered in Python (mixprec_ops/ops/*.py).
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "adam_bucket.h"
#include "hold_args.h"

extern "C" {
// `import mixprec_ops._C` loads this library, which runs the static registrations below. No Python bindings:
// everything is reached through torch.ops.mixprec.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mixprec, m) {
  // y = cast(x * scale) to `dtype` in one pass; amax (1-element fp32), if given, becomes max(amax, max|x|).
  // scale: a 1-element fp32 tensor on x's device, or None and then `scale_value` is used.
  m.def(
      "cast_and_scale(Tensor x, ScalarType dtype, Tensor? scale, float scale_value, Tensor(a!)? amax, "
      "bool saturate) -> Tensor");
  // grad_x of cast_and_scale (x, dtype, scale, scale_value, saturate as its forward had them): grad_y * scale where
  // the saturation left x * scale unchanged, 0 elsewhere, rounded once into x's dtype. grad_y: y's shape, float32,
  // float16, bfloat16 or either fp8 (autograd hands back a grad of y's dtype). Returns a new tensor (x's strides when
  // grad_y shares them, else contiguous).
  m.def(
      "cast_and_scale_backward(Tensor grad_y, Tensor x, ScalarType dtype, Tensor? scale, float scale_value, "
      "bool saturate) -> Tensor");
  // In place: t *= inv_scale for every t; found_inf = 1 if any element is inf/NaN. Returns the global L2 norm of
  // the unscaled values (0-dim fp32) when return_norm, else an empty tensor.
  m.def("unscale_(Tensor(a!)[] tensors, Tensor inv_scale, Tensor(b!) found_inf, bool return_norm) -> Tensor");
  // One Adam/AdamW step over many tensors, math in fp32 (see mixprec_ops/ops/adam.py, adam_step_reference, for
  // the exact element-wise definition). masters / max_exp_avg_sqs are empty lists when unused. scalars is a
  // (len(params), 3) fp32 tensor of per-tensor [step_size, bias_correction2_sqrt, decay_factor]. Nothing is
  // written when found_inf holds a non-zero value.
#define MIXPREC_ADAM_STEP_ARGS                                                                                   \
  "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "                     \
  "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, Tensor scalars, float beta1, float beta2, float eps, "   \
  "float weight_decay, bool decoupled, bool maximize, Tensor? grad_scale, Tensor? found_inf, "                  \
  "Tensor? clip_coef) -> ()"
  m.def("adam_step_" MIXPREC_ADAM_STEP_ARGS);
  // adam_step_ for C++ callers (adam_step_bucket_): the same kernels registered unboxed, so that a typed call passes
  // the lists by reference; adam_step_'s own are boxed (holding_args: a call from Python releases its lists after
  // taking the GIL back, once, instead of once a tensor: csrc/hold_args.h), and a typed call would box six lists.
  m.def("_adam_step_unboxed_" MIXPREC_ADAM_STEP_ARGS);
#undef MIXPREC_ADAM_STEP_ARGS
  // The (n, 3) fp32 per-tensor scalars [step_size, bias_correction2_sqrt, decay_factor] of an Adam step from n step
  // counters (float32, the count before this step), computed in fp64: see adam_scalars_reference in
  // mixprec_ops/ops/adam.py. lr: a 1-element float32/float64 tensor on the steps' device, or None and then lr_value.
  m.def(
      "adam_scalars(Tensor steps, Tensor? lr, float lr_value, float beta1, float beta2, float weight_decay) -> "
      "Tensor");
  // out = cast(act(a @ b + bias)) with fp32 accumulation, the epilogue on the fp32 accumulator and one rounding to
  // out_dtype (see mixprec_ops/ops/matmul.py, matmul_reference). a: (..., M, K) and b: (K, N), both float16 or both
  // bfloat16, any strides; bias: (N,) of a's dtype or float32; activation: "none", "relu", "gelu" (erf),
  // "gelu_tanh" or "silu"; out_dtype: float16, bfloat16 or float32. Returns a new (..., M, N) tensor.
  m.def("matmul(Tensor a, Tensor b, Tensor? bias, str activation, ScalarType out_dtype) -> Tensor");
  // matmul, and the pre-activation cast(a @ b + bias) in out_dtype (saved by the autograd of linear).
  m.def("matmul_pre(Tensor a, Tensor b, Tensor? bias, str activation, ScalarType out_dtype) -> (Tensor, Tensor)");
  // (cast(a @ b), cast(a.sum(1))) for a 2-D a: the product and the fp32-accumulated row sums of a, both rounded once
  // to out_dtype. With a = grad_out^T of a linear layer this is (grad_weight, grad_bias) from one GEMM.
  m.def("matmul_rowsum(Tensor a, Tensor b, ScalarType out_dtype) -> (Tensor, Tensor)");
  // The grads of `params` (an empty list unless every param has one) and a 1-D int64 CPU tensor of the metadata the
  // optimizer's steady-state step rests on (csrc/param_grad_signature.cpp). Reads metadata only; any device.
  m.def("param_grad_signature(Tensor[] params) -> (Tensor[], Tensor)");
  // Per param, an int8 CPU tensor: 0 no grad, 1 a grad that passes the optimizer's Python checks, 2 one they must
  // read (csrc/param_grad_signature.cpp). Reads metadata only; any device.
  m.def("grad_kinds(Tensor[] params) -> Tensor");
  // The state lists of one adam_step_ launch (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters: csrc/adam_bucket.h),
  // held between the optimizer's steady-state steps, made from the launch's params (each with its grad; only their
  // metadata signature is kept) and those lists. adam_bucket_unchanged: the params' signature is still the one the
  // bucket was made with. adam_step_bucket_: the scalars from the step counters `steps` (1-D float32, one a param:
  // the optimizer's step buffer; lr as adam_scalars takes it), adam_step_ over the params and the bucket's lists,
  // the grads read from the params (p.grad) at the call when `grads` is empty, else `grads` (one a param: DTensor
  // params' local shards, which have no .grad; such a bucket is made from no params, so it has no signature), then
  // steps += (found_inf == 0) (+1 without found_inf).
  m.class_<mixprec::AdamBucket>("AdamBucket")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>>());
  m.def("adam_bucket_unchanged(Tensor[] params, __torch__.torch.classes.mixprec.AdamBucket bucket) -> bool");
  m.def(
      "adam_step_bucket_(Tensor(a!)[] params, __torch__.torch.classes.mixprec.AdamBucket bucket, Tensor(b!) steps, "
      "Tensor? lr, float lr_value, float beta1, float beta2, float eps, float weight_decay, bool decoupled, "
      "bool maximize, Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef, Tensor[] grads) -> ()");
  // (through holding_args: the params are released after the GIL is taken back, once a call; csrc/hold_args.h)
  m.impl("adam_bucket_unchanged",
         torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                         mixprec::holding_args<&mixprec::adam_bucket_unchanged>()));
  m.impl("adam_step_bucket_",
         torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, mixprec::holding_args<&mixprec::adam_step_bucket>()));
}

// The ops' gradients live in Python, around them (mixprec::linear and the autograd.Functions of mixprec_ops.ops).
// Reached directly with inputs that require grad (say, torch.compile of torch.func.grad, which sees through those
// wrappers), an op must fail at backward, naming itself, not hand back zero gradients with a warning (torch's
// default autograd fallback). When nothing requires grad this kernel only redispatches; the in-place kernels move
// the versions of what they write themselves (VersionBump, csrc/common.h).
TORCH_LIBRARY_IMPL(mixprec, Autograd, m) {
  m.impl("cast_and_scale", torch::autograd::autogradNotImplementedFallback());
  m.impl("cast_and_scale_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("unscale_", torch::autograd::autogradNotImplementedFallback());
  m.impl("adam_step_", torch::autograd::autogradNotImplementedFallback());
  m.impl("_adam_step_unboxed_", torch::autograd::autogradNotImplementedFallback());
  m.impl("adam_scalars", torch::autograd::autogradNotImplementedFallback());
  m.impl("adam_step_bucket_", torch::autograd::autogradNotImplementedFallback());
  m.impl("matmul", torch::autograd::autogradNotImplementedFallback());
  m.impl("matmul_pre", torch::autograd::autogradNotImplementedFallback());
  m.impl("matmul_rowsum", torch::autograd::autogradNotImplementedFallback());
  // Metadata-only ops (int8 codes, a bool, a signature and the grads as they are): nothing to differentiate, and
  // torch's default autograd fallback would build an AccumulateGrad node a param when called under grad mode
  m.impl("param_grad_signature", torch::CppFunction::makeFallthrough());
  m.impl("grad_kinds", torch::CppFunction::makeFallthrough());
  m.impl("adam_bucket_unchanged", torch::CppFunction::makeFallthrough());
}

// adam_step_bucket_ writes `steps` (and the params) after the step: torch's negative-bit fallback would run it on a
// resolved copy of a torch._neg_view argument, step the params and states, then fail to write the copy back (the op
// returns nothing; a fuzz run found the step taken and the call raising). Falling through, the kernel sees the view
// and refuses it before anything is written (csrc/adam_bucket.cpp).
TORCH_LIBRARY_IMPL(mixprec, Negative, m) {
  m.impl("adam_step_bucket_", torch::CppFunction::makeFallthrough());
}
