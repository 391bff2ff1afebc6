// The AVX-512 path of the CPU unscale_ kernel for 16-bit tensors (unscale_avx512.cpp), chosen at run time.
#pragma once
#include <cstdint>

#include "cpu_isa.h"

namespace mixprec::cpu {

// p[0:n) *= inv in place (only read when !write: inv is 1), for T = c10::Half or c10::BFloat16. Adds the squares of
// the unscaled values to *sumsq when want_norm, in the order and with the roundings of unscale.cpp's AVX2 loop (so
// the norm has the same bits on either path), and sets *nonfinite when a stored value would be inf or NaN. Call
// only when avx512_enabled().
template <typename T>
void unscale_16bit_avx512(T* p, int64_t n, float inv, bool write, bool want_norm, double* sumsq, bool* nonfinite);

}  // namespace mixprec::cpu
