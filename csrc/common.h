// Argument checks and small helpers shared by the CPU and CUDA kernels. Every check names the argument, so a
// direct torch.ops.mixprec.* call fails as clearly as the Python wrappers (which run the same checks first).
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace mixprec {

// "[3, 4]": sizes or strides in an error message, formatted here instead of through c10's operator<< for ArrayRef.
// On the H200 machine's build (its own GCC, torch 2.11, 2026-11-30) each direct op call whose failing check printed
// t.sizes() that way crashed the process (SIGSEGV inside the op), while the checks printing dtypes in the same
// functions raised cleanly; the cause was not established there, and this keeps shapes out of that path.
inline std::string dims(at::IntArrayRef d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  return s + "]";
}

// Moves the version counters of the tensors an in-place kernel writes, once, when the kernel returns (not when it
// throws: a refused call writes nothing), as torch's own in-place ops do (their ADInplaceOrView kernels): autograd
// then sees the write (a forward, then optimizer.step(), then backward raises "modified by an inplace operation"
// as with torch.optim; the Triton ops bump through their custom op), and the optimizer sees its own steps move its
// params (it reads the versions back after each launch). A normal tensor's moves in inference mode too, as torch's;
// an inference tensor (no counter) is refused outside inference mode before anything is written, as torch refuses
// it. While it lives, the kernel's own ATen calls (copy_, fill_) run below ADInplaceOrView, as in torch's
// ADInplaceOrView kernels, so that they do not move the counters a second time. Constructed first thing in the
// kernel; the lists are the kernel's own arguments.
class VersionBump {
 public:
  explicit VersionBump(std::initializer_list<at::TensorList> lists, const at::Tensor* single = nullptr)
      : single_(single), exceptions_(std::uncaught_exceptions()) {
    TORCH_INTERNAL_ASSERT(lists.size() <= lists_.size());
    for (at::TensorList l : lists) lists_[count_++] = l;
    if (!c10::InferenceMode::is_enabled()) each(refuse_inference);
  }
  VersionBump(const VersionBump&) = delete;
  VersionBump& operator=(const VersionBump&) = delete;
  ~VersionBump() {
    if (std::uncaught_exceptions() > exceptions_) return;
    each(bump);
  }

 private:
  template <typename F>
  void each(F f) const {  // every tensor the kernel writes
    for (size_t i = 0; i < count_; ++i) {
      for (const at::Tensor& t : lists_[i]) f(t);
    }
    if (single_ != nullptr) f(*single_);
  }
  static void bump(const at::Tensor& t) {  // (never throws: bump() refuses only a tensor without a counter)
    if (t.defined() && t.unsafeGetTensorImpl()->version_counter().enabled()) t.unsafeGetTensorImpl()->bump_version();
  }
  static void refuse_inference(const at::Tensor& t) {
    TORCH_CHECK(!t.defined() || !t.is_inference(),
                "mixprec: an in-place update of an inference tensor outside InferenceMode is not allowed (torch "
                "refuses it too): create the tensor outside torch.inference_mode(), or call the op inside it");
  }
  at::AutoDispatchBelowADInplaceOrView below_;  // (destroyed after the destructor's bumps)
  std::array<at::TensorList, 5> lists_{};
  size_t count_ = 0;
  const at::Tensor* single_;
  int exceptions_;
};

inline bool is_float_source(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_cast_target(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2;
}

// Largest finite value of a cast target, as fp32.
inline float finite_max(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return 65504.0f;
    case at::kBFloat16: return 3.38953139e38f;
    case at::kFloat8_e4m3fn: return 448.0f;
    case at::kFloat8_e5m2: return 57344.0f;
    default: TORCH_CHECK(false, "mixprec: no finite max for ", t);
  }
}

// |v| at or above OverflowAt<T>::value rounds to inf when stored as T (largest finite + half an ulp; the tie rounds
// to the even neighbour, which is inf). `!(fabs(v) < value)` is therefore "non-finite once stored", NaN included.
template <typename T>
struct OverflowAt;
template <>
struct OverflowAt<float> {
  static constexpr float value = std::numeric_limits<float>::infinity();
};
template <>
struct OverflowAt<c10::Half> {
  static constexpr float value = 65520.0f;
};
template <>
struct OverflowAt<c10::BFloat16> {
  static constexpr float value = 3.3961775292304957e38f;  // bits 0x7F7F8000
};

inline bool is_fp8(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

// The same, for an element type (the kernels' templates).
template <typename T>
constexpr bool kIsFp8 = std::is_same_v<T, c10::Float8_e4m3fn> || std::is_same_v<T, c10::Float8_e5m2>;

// t's elements lie inside memory it holds. A tensor whose storage was freed (FSDP frees grads and params with
// untyped_storage().resize_(0)) or shrunk under it has a null or short buffer, which the kernels, reading raw
// pointers, would dereference (a crash on the CPU, an illegal address on a GPU). Index i < 0: no index in the name.
inline bool allocated(const at::Tensor& t) {
  // (read on the TensorImpl: no dim wrapping, no storage-access check; it runs on every tensor of every call)
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->numel() == 0) return true;
  if (!impl->has_storage()) return false;
  const c10::Storage& storage = impl->unsafe_storage();
  if (storage.data() == nullptr) return false;
  const auto sizes = impl->sizes();
  const auto strides = impl->strides();
  int64_t last = impl->storage_offset();  // the furthest element, in elements from the storage's start
  for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
  return static_cast<uint64_t>(last + 1) * impl->itemsize() <= storage.nbytes();
}

inline void check_allocated(const at::Tensor& t, const char* name, int64_t i = -1) {
  if (i < 0) {
    TORCH_CHECK(allocated(t), name, " has no allocated memory for its elements (a freed or shrunk storage)");
  } else {
    TORCH_CHECK(allocated(t), name, "[", i, "] has no allocated memory for its elements (a freed or shrunk storage)");
  }
}

// False only when t's elements provably occupy distinct memory: at::has_internal_overlap, and where that cannot tell
// (a view such as as_strided((4, 4), (1, 1))), the sufficient rule that, dims ordered by stride, each stride exceeds
// the span of the smaller ones (an exotic non-overlapping view may fail it and is then refused too).
inline bool may_share_memory(const at::Tensor& t) {
  if (t.is_contiguous()) return false;  // (cannot overlap itself; the common case, from a cached flag)
  const at::MemOverlap o = at::has_internal_overlap(t);
  if (o != at::MemOverlap::TooHard) return o == at::MemOverlap::Yes;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims with more than one element
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // furthest offset reachable with the dims so far
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return true;
    span += stride * (size - 1);
  }
  return false;
}

// A 1-element fp32 tensor on `device` (a device scalar such as scale, inv_scale, amax, found_inf).
inline void check_scalar_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be a float32 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1, name, " must have exactly 1 element, got shape ", dims(t.sizes()));
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " (the data's device), got ", t.device());
  check_allocated(t, name);
}

inline void check_cast_and_scale_args(const at::Tensor& x, at::ScalarType dtype,
                                      const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& amax) {
  TORCH_CHECK(is_float_source(x.scalar_type()), "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(is_cast_target(dtype), "dtype must be float16, bfloat16, float8_e4m3fn or float8_e5m2, got ", dtype);
  check_allocated(x, "x");
  if (scale.has_value()) check_scalar_tensor(*scale, "scale", x.device());
  if (amax.has_value()) {
    check_scalar_tensor(*amax, "amax", x.device());
    TORCH_CHECK(amax->is_contiguous(), "amax must be contiguous");
  }
}

inline void check_unscale_args(at::TensorList tensors, const at::Tensor& inv_scale, const at::Tensor& found_inf) {
  check_scalar_tensor(inv_scale, "inv_scale", inv_scale.device());
  check_scalar_tensor(found_inf, "found_inf", inv_scale.device());
  TORCH_CHECK(found_inf.is_contiguous(), "found_inf must be contiguous");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(is_float_source(t.scalar_type()), "tensors[", i, "] must be float32, float16 or bfloat16, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == inv_scale.device(), "tensors[", i, "] is on ", t.device(),
                " but inv_scale is on ", inv_scale.device(), "; all must share one device");
    TORCH_CHECK(!t.is_sparse() && t.layout() == at::kStrided, "tensors[", i, "] must be a dense strided tensor");
    check_allocated(t, "tensors", static_cast<int64_t>(i));
    // Written in place: elements sharing memory (an expanded or self-overlapping view) would be scaled more than
    // once, and the layout fallback would find them only after other tensors were already scaled.
    TORCH_CHECK(!may_share_memory(t), "tensors[", i,
                "] has elements that share memory (an expanded or overlapping view); unscale_ writes it in place");
  }
}

// adam_scalars: steps a float32 tensor of step counters (any shape, read as a flat list), lr absent or a 1-element
// float32 / float64 tensor on the steps' device.
inline void check_adam_scalars_args(const at::Tensor& steps, const std::optional<at::Tensor>& lr) {
  TORCH_CHECK(steps.scalar_type() == at::kFloat, "steps must be a float32 tensor, got ", steps.scalar_type());
  TORCH_CHECK(steps.layout() == at::kStrided, "steps must be a dense strided tensor");
  check_allocated(steps, "steps");
  if (lr.has_value()) {
    TORCH_CHECK(lr->scalar_type() == at::kFloat || lr->scalar_type() == at::kDouble,
                "lr must be a float32 or float64 tensor, got ", lr->scalar_type());
    TORCH_CHECK(lr->numel() == 1, "lr must have exactly 1 element, got shape ", dims(lr->sizes()));
    TORCH_CHECK(lr->device() == steps.device(), "lr must be on ", steps.device(), " (the steps' device), got ",
                lr->device());
    check_allocated(*lr, "lr");
  }
}

// Elements of a non-overlapping, dense tensor occupy one contiguous run of memory (in some permuted order), so a
// kernel can walk [data_ptr, data_ptr + numel) linearly and an output made by empty_like has the same layout.
inline bool walkable(const at::Tensor& t) { return t.is_non_overlapping_and_dense(); }

inline bool is_grad_of_cast(at::ScalarType t) { return is_float_source(t) || is_fp8(t); }

// cast_and_scale_backward: grad_y (of x's shape; float32, float16, bfloat16 or either fp8) and x on one device.
inline void check_cast_and_scale_backward_args(const at::Tensor& grad_y, const at::Tensor& x, at::ScalarType dtype,
                                               const std::optional<at::Tensor>& scale) {
  check_cast_and_scale_args(x, dtype, scale, std::nullopt);
  TORCH_CHECK(is_grad_of_cast(grad_y.scalar_type()),
              "grad_y must be float32, float16, bfloat16, float8_e4m3fn or float8_e5m2, got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.layout() == at::kStrided, "grad_y must be a dense strided tensor");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "grad_y must have x's shape ", dims(x.sizes()), ", got ",
              dims(grad_y.sizes()));
  TORCH_CHECK(grad_y.device() == x.device(), "grad_y must be on ", x.device(), " (x's device), got ", grad_y.device());
  check_allocated(grad_y, "grad_y");
}

// (x, grad_y) as the backward kernels walk them: both linearly, in one memory order. x as it is when walkable and
// grad_y shares its strides (the usual case: autograd hands back a grad laid out like y, which is laid out like x);
// otherwise both contiguous (an expanded grad of y.sum(), a transposed one). mixprec_ops/ops/cast_and_scale.py's
// _backward_layout is the same rule, for the fake.
inline std::pair<at::Tensor, at::Tensor> backward_layout(const at::Tensor& x, const at::Tensor& grad_y) {
  if (walkable(x) && walkable(grad_y) && grad_y.strides() == x.strides()) return {x, grad_y};
  return {x.contiguous(), grad_y.contiguous()};
}

}  // namespace mixprec
