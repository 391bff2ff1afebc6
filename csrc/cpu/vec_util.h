// at::vec helpers for the CPU kernels: load any of float/Half/BFloat16 as fp32 lanes, store fp32 lanes back.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <tuple>

// at::vec's AVX2 Vectorized is in use (fVec converts to and from __m256 / __m256i): setup.py defines
// CPU_CAPABILITY_AVX2 with -mavx2. Flags that give AVX2 another way (MIXPREC_CPU_FLAGS=-march=haswell) leave at::vec
// generic, so code mixing fVec with raw AVX2 intrinsics is compiled only under this macro.
#if defined(__AVX2__) && defined(CPU_CAPABILITY_AVX2)
#define MIXPREC_VEC_AVX2 1
#include <immintrin.h>
#endif

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

// 2 * kLanes consecutive elements of T as two fp32 vectors, and back (16-bit types: one full-width load / store, and
// one conversion for both vectors; store_from_f32 converts a whole 16-bit vector to keep half of it).
template <typename T>
inline void load2_f32(const T* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + kLanes);
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store2_from_f32(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kLanes);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);  // round to nearest even, exactly torch's cast
  }
}

}  // namespace mixprec::cpu
