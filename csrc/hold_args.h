// A boxed kernel around an unboxed one that keeps a reference to every argument through the call and drops them
// afterwards, under one GIL acquisition when that release would end a tensor's hold on its Python object.
//
// Why (torch >= 2.10, "PyObject preservation"): a tensor whose only other owner is its Python object has
// refcount 1; a C++ reference taken while the GIL is held (the stack the Python call builds) makes it 2 and increfs
// the Python object, and dropping it back to 1 decrefs that object, which takes the GIL. torch.ops releases the GIL
// around the dispatch, and the unboxed wrapper drops the list arguments there: one GIL round trip per tensor. Over
// 2,000 fresh tensors (a list that torch.autograd.grad returned, the bench's bare unscale_) those round trips cost
// ~150-190 us of a ~400 us CPU call (bench/NOTES.md, "The GIL round trip per tensor"). torch's own foreach
// bindings drop their lists after taking the GIL back. Grads read from .grad are also held by their params: they
// pay nothing either way.
//
// For ops called from Python with lists: unscale_, adam_step_, param_grad_signature, grad_kinds,
// adam_bucket_unchanged, adam_step_bucket_. A C++ caller that calls such an op unboxed gets its arguments boxed (a
// copy of each list): C++ code calls adam_step_'s kernels as _adam_step_unboxed_ (the same kernels registered
// unboxed, csrc/schemas.cpp).
#pragma once
#include <ATen/core/boxing/KernelFunction.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace mixprec {

// Drops `held`; first takes the GIL (once) when a tensor in it has a Python object and no other C++ owner.
void release_held(std::vector<c10::IValue>& held) noexcept;

// Calls release_held when the kernel returns or throws (a refused call releases its arguments the same way).
struct ReleaseHeld {
  std::vector<c10::IValue>& held;
  ~ReleaseHeld() { release_held(held); }
};

template <auto Fn>
void call_holding_args(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  static const c10::KernelFunction kernel = c10::KernelFunction::makeFromUnboxedFunction(
      c10::CompileTimeFunctionPointer<std::remove_pointer_t<decltype(Fn)>, Fn>());
  const auto n = static_cast<std::ptrdiff_t>(op.schema().arguments().size());
  std::vector<c10::IValue> held(stack->end() - n, stack->end());  // (a list's copy shares its elements)
  const ReleaseHeld release{held};
  kernel.callBoxed(op, ks, stack);
}

// Holds the GIL for its lifetime when Python runs (a nested hold, the GIL already held, is fine): the kernels that read
// params' grads (p.grad()) read them under it. torch.ops releases the GIL around our call, and Python's `p.grad = g`
// (or `= None`) replaces a grad under the GIL: copying the handle while another thread replaces it is a use-after-free
// (a two-thread fuzz run crashed the process within a second, 2026-12-01). Under the GIL a read is as safe as a
// Python caller's `p.grad`; not safer: torch's own assignment lets the GIL go while it frees the old grad
// (THPVariable_clear, torch 2.11 and 2.14), and a pure-Python reader in that window crashes too (bench/NOTES.md).
// No effect where Python is not initialized.
class GradReadLock {
 public:
  GradReadLock() noexcept;
  ~GradReadLock();
  GradReadLock(const GradReadLock&) = delete;
  GradReadLock& operator=(const GradReadLock&) = delete;

 private:
  int state_ = 0;  // (a PyGILState_STATE: Python.h stays out of this header)
  bool held_ = false;
};

// m.impl(name, holding_args<&kernel>()): the kernel, registered through call_holding_args.
template <auto Fn>
torch::CppFunction holding_args() {
  return torch::CppFunction::makeFromBoxedFunction<&call_holding_args<Fn>>();
}

}  // namespace mixprec
