// Exhaustive check of csrc/cpu/fp8_convert_avx2.h and, where the CPU has AVX-512 F/BW/VL, fp8_convert_avx512.h: every
// one of the 2^32 fp32 bit patterns, converted 32 at a time by the AVX2 code and 16 at a time by the AVX-512 code
// (plain, and after the kernel's saturating clamp with SAT=true), must give c10's own fp8 bits (c10::Float8_e4m3fn /
// Float8_e5m2 construction: torch's cast), NaN included. Built and run by tests/test_native_exhaustive.py (compiled
// against the installed torch's headers, -mavx2 like the library, OpenMP). Prints one line per case ("... 0
// mismatches"; the AVX-512 lines start with "avx512") and exits non-zero on any mismatch.
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "cpu/fp8_convert_avx2.h"
#include "cpu/fp8_convert_avx512.h"

namespace {

template <int FMT>
uint8_t c10_bits(float f) {
  if constexpr (FMT == 2) return c10::Float8_e5m2(f).x;
  else return c10::Float8_e4m3fn(f).x;
}

// The kernel's saturating clamp, then the conversion under test, for the 32 inputs at f; results to out.
template <int FMT, bool SAT>
void convert32_avx2(float* f, uint8_t* out, float fmax) {
  __m256i q[4];
  for (int v = 0; v < 4; ++v) {
    __m256 y = _mm256_load_ps(f + 8 * v);
    if (SAT) y = _mm256_min_ps(_mm256_set1_ps(fmax), _mm256_max_ps(_mm256_set1_ps(-fmax), y));  // the kernel's
    _mm256_store_ps(f + 8 * v, y);
    q[v] = mixprec::cpu::avx2::f32_to_fp8_bits<FMT, SAT>(y);
  }
  mixprec::cpu::avx2::store_bytes32(out, q[0], q[1], q[2], q[3]);
}

#if defined(MIXPREC_HAVE_AVX512)
template <int FMT, bool SAT>
MIXPREC_AVX512 void convert32_avx512(float* f, uint8_t* out, float fmax) {
  for (int v = 0; v < 2; ++v) {
    __m512 y = _mm512_load_ps(f + 16 * v);
    if (SAT) y = _mm512_min_ps(_mm512_set1_ps(fmax), _mm512_max_ps(_mm512_set1_ps(-fmax), y));  // the kernel's
    _mm512_store_ps(f + 16 * v, y);
    _mm_store_si128(reinterpret_cast<__m128i*>(out + 16 * v), mixprec::cpu::avx512::f32_to_fp8_bytes<FMT, SAT>(y));
  }
}
#endif

template <int FMT, bool SAT, bool AVX512>
long long mismatches() {
  const float fmax = FMT == 2 ? 57344.0f : 448.0f;
  long long bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static)
  for (long long base = 0; base < (1LL << 32); base += 32) {
    alignas(64) float f[32];
    alignas(64) uint8_t out[32];
    for (int k = 0; k < 32; ++k) {
      const uint32_t b = static_cast<uint32_t>(base + k);
      std::memcpy(&f[k], &b, 4);
    }
#if defined(MIXPREC_HAVE_AVX512)
    if (AVX512) convert32_avx512<FMT, SAT>(f, out, fmax);
    else
#endif
      convert32_avx2<FMT, SAT>(f, out, fmax);
    for (int k = 0; k < 32; ++k) {
      const uint8_t want = c10_bits<FMT>(f[k]);
      if (out[k] != want) {
        if (bad < 3) {
          uint32_t b;
          std::memcpy(&b, &f[k], 4);
#pragma omp critical
          std::printf("  FMT %d SAT %d AVX512 %d: input bits %08x: got %02x, c10 %02x\n", FMT, SAT, AVX512, b, out[k],
                      want);
        }
        ++bad;
      }
    }
  }
  return bad;
}

// The four cases of one ISA: e4m3fn with the installed torch's overflow rule (the kernel picks FMT 0 or 1 by it),
// e5m2, each plain and saturated.
template <bool AVX512>
long long check_all(const char* isa) {
  const bool nan_rule = c10::Float8_e4m3fn(1.0e6f).isnan();
  long long total = 0, n;
  if (nan_rule) {
    total += n = mismatches<0, false, AVX512>(); std::printf("%s e4m3fn (overflow -> NaN): %lld mismatches\n", isa, n);
    total += n = mismatches<0, true, AVX512>(); std::printf("%s e4m3fn saturated: %lld mismatches\n", isa, n);
  } else {
    total += n = mismatches<1, false, AVX512>(); std::printf("%s e4m3fn (overflow saturates): %lld mismatches\n", isa, n);
    total += n = mismatches<1, true, AVX512>(); std::printf("%s e4m3fn saturated: %lld mismatches\n", isa, n);
  }
  total += n = mismatches<2, false, AVX512>(); std::printf("%s e5m2: %lld mismatches\n", isa, n);
  total += n = mismatches<2, true, AVX512>(); std::printf("%s e5m2 saturated: %lld mismatches\n", isa, n);
  return total;
}

}  // namespace

int main() {
  long long total = check_all<false>("avx2");
#if defined(MIXPREC_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    total += check_all<true>("avx512");
  } else {
    std::printf("avx512: not checked (this CPU lacks AVX-512 F/BW/VL)\n");
  }
#else
  std::printf("avx512: not checked (not an x86-64 GCC/Clang build)\n");
#endif
  return total == 0 ? 0 : 1;
}
