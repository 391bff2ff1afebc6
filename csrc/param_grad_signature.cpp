// mixprec::param_grad_signature: the metadata sweep of the optimizer's steady-state step (mixprec_ops/optim/_steady.py)
// in one C++ call instead of ~8 Python sweeps over thousands of params; mixprec::grad_kinds: the grad checks of its
// full planning (mixprec_ops/optim/adam.py, _collect) in one. Both read metadata only, on any device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DispatchKey.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "common.h"
#include "hold_args.h"
#include "param_grad_signature.h"

namespace mixprec {

// Per param: its dims, sizes, dtype, device, contiguity and data pointer; then its grad's dtype (-1: no grad) and
// two flags: the grad is a plain strided tensor (no Python subclass with its own dispatch, such as DTensor), and it
// lies on the param's device with the param's sizes, contiguous. Equal signatures mean equal metadata: the Python
// side compares them whole (torch.equal), never element by element; the AdamBucket keeps its own (adam_bucket.cpp).
bool append_param_grad_signature(at::TensorList params, std::vector<int64_t>& sig, std::vector<at::Tensor>* grads) {
  sig.reserve(sig.size() + params.size() * 12);
  if (grads != nullptr) grads->reserve(grads->size() + params.size());
  const GradReadLock gil;  // (the grads are read under the GIL: hold_args.h)
  bool all = true;
  for (const at::Tensor& p : params) {
    sig.push_back(p.dim());
    for (const int64_t s : p.sizes()) sig.push_back(s);
    sig.push_back(static_cast<int64_t>(p.scalar_type()));
    sig.push_back(static_cast<int64_t>(p.device().type()));
    sig.push_back(p.device().index());
    sig.push_back(p.is_contiguous() ? 1 : 0);
    sig.push_back(static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(p.const_data_ptr())));
    const at::Tensor g = p.grad();  // (a reference of our own, taken under the GIL)
    if (!g.defined()) {
      sig.push_back(-1);
      all = false;
      continue;
    }
    sig.push_back(static_cast<int64_t>(g.scalar_type()));
    const bool plain = g.layout() == at::kStrided && !g.key_set().has(c10::DispatchKey::Python);
    sig.push_back(plain ? 1 : 0);
    sig.push_back(plain && g.device() == p.device() && g.sizes() == p.sizes() && g.is_contiguous() ? 1 : 0);
    if (all && grads != nullptr) grads->push_back(g);
  }
  if (!all && grads != nullptr) grads->clear();
  return all;
}

namespace {

std::tuple<std::vector<at::Tensor>, at::Tensor> param_grad_signature(at::TensorList params) {
  std::vector<int64_t> sig;
  std::vector<at::Tensor> grads;
  append_param_grad_signature(params, sig, &grads);
  at::Tensor out = at::empty({static_cast<int64_t>(sig.size())}, at::TensorOptions().dtype(at::kLong));
  if (!sig.empty()) std::memcpy(out.data_ptr<int64_t>(), sig.data(), sig.size() * sizeof(int64_t));
  return {std::move(grads), out};
}

// Per param (int8): 0 no grad; 1 a grad that passes the optimizer's Python checks (a strided tensor of a float dtype
// it steps, on the param's device, of the param's shape, neither it nor the param a Python subclass with its own
// dispatch; the planning may still copy it into the param's layout); 2 anything else, which the Python checks then read (mixprec_ops/optim/adam.py, _collect: they
// raise the error, or handle DTensor params). Metadata only, any device.
at::Tensor grad_kinds(at::TensorList params) {
  at::Tensor out = at::empty({static_cast<int64_t>(params.size())}, at::TensorOptions().dtype(at::kChar));
  int8_t* o = out.data_ptr<int8_t>();
  const GradReadLock gil;  // (the grads are read under the GIL: hold_args.h)
  for (const at::Tensor& p : params) {
    const at::Tensor g = p.grad();  // (a reference of our own, taken under the GIL)
    int8_t kind = 0;
    if (g.defined()) {
      const bool plain = !g.key_set().has(c10::DispatchKey::Python) && !p.key_set().has(c10::DispatchKey::Python);
      kind = plain && g.layout() == at::kStrided && is_float_source(g.scalar_type()) && g.device() == p.device() &&
                     g.sizes() == p.sizes()
                 ? 1
                 : 2;
    }
    *o++ = kind;
  }
  return out;
}

}  // namespace

// (through holding_args: the params, whose only other owner is their Python object, are released after the GIL is
// taken back, once; csrc/hold_args.h)
TORCH_LIBRARY_IMPL(mixprec, CompositeExplicitAutograd, m) {
  m.impl("param_grad_signature", holding_args<&param_grad_signature>());
  m.impl("grad_kinds", holding_args<&grad_kinds>());
}

}  // namespace mixprec
