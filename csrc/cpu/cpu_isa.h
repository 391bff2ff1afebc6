// Which vector code the CPU kernels run: the AVX-512 paths (cast_and_scale_avx512.cpp,
// cast_and_scale_backward_avx512.cpp, unscale_avx512.cpp) or the AVX2 code the library is compiled for.
#pragma once

namespace mixprec::cpu {

// True when the AVX-512 kernels may run: the CPU has AVX-512 F, BW and VL, torch's own CPU capability is AVX512
// (so ATEN_CPU_CAPABILITY=avx2, which keeps torch's kernels off AVX-512, keeps ours off too), and the environment
// variable MIXPREC_CPU_ISA is not "avx2" (read at every call: the tests run both paths in one process). Mirrored in
// Python by mixprec_ops.backends.cpu_vector_isa.
bool avx512_enabled();

}  // namespace mixprec::cpu
