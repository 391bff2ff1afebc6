// avx512_enabled (cpu_isa.h).
#include "cpu_isa.h"

#include <ATen/Version.h>

#include <cstdlib>
#include <cstring>

#include "avx512_util.h"

namespace mixprec::cpu {

bool avx512_enabled() {
#if defined(MIXPREC_HAVE_AVX512)
  static const bool capable = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") && at::get_cpu_capability().rfind("AVX512", 0) == 0;
  if (!capable) return false;
  const char* isa = std::getenv("MIXPREC_CPU_ISA");
  return isa == nullptr || std::strcmp(isa, "avx2") != 0;
#else
  return false;
#endif
}

}  // namespace mixprec::cpu
