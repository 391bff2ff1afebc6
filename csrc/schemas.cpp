// The one place where mixprec's operator schemas are defined. Each backend file registers its kernels with
// TORCH_LIBRARY_IMPL(mixprec, <DispatchKey>, m); fakes (meta) are registered in Python (mixprec_ops/ops/*.py).
#include <Python.h>
#include <torch/library.h>

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
  // In place: t *= inv_scale for every t; found_inf = 1 if any element is inf/NaN. Returns the global L2 norm of
  // the unscaled values (0-dim fp32) when return_norm, else an empty tensor.
  m.def("unscale_(Tensor(a!)[] tensors, Tensor inv_scale, Tensor(b!) found_inf, bool return_norm) -> Tensor");
}
