// The AVX-512 path of the CPU cast_and_scale_backward kernel (cast_and_scale_backward_avx512.cpp), chosen at run
// time.
#pragma once
#include <cstdint>

#include "cpu_isa.h"

namespace mixprec::cpu {

// out[i] = (pass(x[i]) ? g[i] : 0) * scale over [0, n), contiguous, rounded once into X; pass = |x * scale| <= fmax
// (or, with keep_inf, infinite) when `sat`, else always. X: float, c10::Half, c10::BFloat16; G: those or an fp8
// type. Runs its own parallel loop. Call only when avx512_enabled().
template <typename X, typename G>
void cast_backward_avx512(const X* x, const G* g, X* out, int64_t n, float scale, bool sat, bool keep_inf, float fmax);

}  // namespace mixprec::cpu
