// at::vec helpers for the CPU kernels: load any of float/Half/BFloat16 as fp32 lanes, store fp32 lanes back.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace mixprec::cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fVec::size();

// Loads kLanes elements of T as fp32 (exact: fp16/bf16 -> fp32 is lossless).
template <typename T>
inline fVec load_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

// Stores kLanes fp32 values into T with round-to-nearest-even (at::vec's conversions match torch's own cast).
template <typename T>
inline void store_from_f32(T* p, const fVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    // convert_from_float packs two fp32 vectors into one 16-bit vector; store only the first half.
    at::vec::convert_from_float<T>(v, v).store(p, kLanes);
  }
}

}  // namespace mixprec::cpu
