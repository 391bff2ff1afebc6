// The AVX-512 path of the CPU cast_and_scale kernel (cast_and_scale_avx512.cpp), chosen at run time.
#pragma once
#include <cstdint>

#include "cpu_isa.h"

namespace mixprec::cpu {

// out = target(x * scale) over n contiguous elements, saturating finite products to +-fmax when `saturate` (fp8
// targets: infinite ones too); returns max|x| (NaN if any x is NaN). fmt: 0 = e4m3fn with overflow -> NaN (torch
// < 2.12), 1 = e4m3fn saturating on overflow, 2 = e5m2, 3 = bfloat16, 4 = float16. Src is float, c10::Half or
// c10::BFloat16. Call only when avx512_enabled().
template <typename Src>
float cast_avx512(const Src* x, void* out, int64_t n, float scale, bool saturate, float fmax, int fmt);

}  // namespace mixprec::cpu
