// release_held and GradReadLock (csrc/hold_args.h): the one place outside the module's init that calls into Python,
// through the limited API (Py_IsInitialized, PyGILState_Ensure / _Release). release_held takes the GIL where and when
// torch's own decref of those Python objects would have (c10's PyInterpreter decref: the same Py_IsInitialized check,
// then the GIL), once instead of once a tensor; nested calls (the GIL already held) are fine, and the deadlock hazard
// is torch's. GradReadLock takes it for a sweep that reads grads, as a Python caller of torch's would hold it.
#include "hold_args.h"

#include <Python.h>

namespace mixprec {
namespace {

// Dropping our reference would take the tensor's refcount to 1 with its Python object attached: torch then decrefs
// that object, under the GIL.
bool last_native_owner(const at::Tensor& t) {
  return t.defined() && t.use_count() == 2 && t.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj() != nullptr;
}

bool needs_gil(const std::vector<c10::IValue>& held) {
  for (const auto& v : held) {
    if (v.isTensor()) {
      if (last_native_owner(v.toTensor())) return true;
    } else if (v.isTensorList()) {
      for (const auto& e : v.toListRef())
        if (last_native_owner(e.toTensor())) return true;
    }
  }
  return false;
}

}  // namespace

void release_held(std::vector<c10::IValue>& held) noexcept {
  if (!needs_gil(held) || !Py_IsInitialized()) {
    held.clear();
    return;
  }
  const PyGILState_STATE state = PyGILState_Ensure();
  held.clear();
  PyGILState_Release(state);
}

GradReadLock::GradReadLock() noexcept {
  if (Py_IsInitialized()) {
    state_ = static_cast<int>(PyGILState_Ensure());
    held_ = true;
  }
}

GradReadLock::~GradReadLock() {
  if (held_) PyGILState_Release(static_cast<PyGILState_STATE>(state_));
}

}  // namespace mixprec
