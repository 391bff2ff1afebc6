// Exhaustive check of csrc/cpu/fp8_convert_avx2.h: every one of the 2^32 fp32 bit patterns, converted 32 at a time
// by the AVX2 code (plain, and after the kernel's saturating clamp with SAT=true), must give c10's own fp8 bits
// (c10::Float8_e4m3fn / Float8_e5m2 construction: torch's cast), NaN included. Built and run by
// tests/test_native_exhaustive.py (compiled against the installed torch's headers, -mavx2, OpenMP).
// Prints one line per case and exits non-zero on any mismatch.
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "cpu/fp8_convert_avx2.h"

namespace {

template <int FMT>
uint8_t c10_bits(float f) {
  if constexpr (FMT == 2) return c10::Float8_e5m2(f).x;
  else return c10::Float8_e4m3fn(f).x;
}

template <int FMT, bool SAT>
long long mismatches() {
  const float fmax = FMT == 2 ? 57344.0f : 448.0f;
  long long bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static)
  for (long long base = 0; base < (1LL << 32); base += 32) {
    alignas(32) float f[32];
    alignas(32) uint8_t out[32];
    for (int k = 0; k < 32; ++k) {
      const uint32_t b = static_cast<uint32_t>(base + k);
      std::memcpy(&f[k], &b, 4);
    }
    __m256i q[4];
    for (int v = 0; v < 4; ++v) {
      __m256 y = _mm256_load_ps(f + 8 * v);
      if (SAT) y = _mm256_min_ps(_mm256_set1_ps(fmax), _mm256_max_ps(_mm256_set1_ps(-fmax), y));  // the kernel's
      _mm256_store_ps(f + 8 * v, y);
      q[v] = mixprec::cpu::avx2::f32_to_fp8_bits<FMT, SAT>(y);
    }
    mixprec::cpu::avx2::store_bytes32(out, q[0], q[1], q[2], q[3]);
    for (int k = 0; k < 32; ++k) {
      const uint8_t want = c10_bits<FMT>(f[k]);
      if (out[k] != want) {
        if (bad < 3) {
          uint32_t b;
          std::memcpy(&b, &f[k], 4);
#pragma omp critical
          std::printf("  FMT %d SAT %d: input bits %08x: got %02x, c10 %02x\n", FMT, SAT, b, out[k], want);
        }
        ++bad;
      }
    }
  }
  return bad;
}

}  // namespace

int main() {
  // The kernel picks FMT 0 or 1 for e4m3fn by the overflow rule of the torch it was built with; check that one.
  const bool nan_rule = c10::Float8_e4m3fn(1.0e6f).isnan();
  long long total = 0, n;
  if (nan_rule) {
    total += n = mismatches<0, false>(); std::printf("e4m3fn (overflow -> NaN): %lld mismatches\n", n);
    total += n = mismatches<0, true>(); std::printf("e4m3fn saturated: %lld mismatches\n", n);
  } else {
    total += n = mismatches<1, false>(); std::printf("e4m3fn (overflow saturates): %lld mismatches\n", n);
    total += n = mismatches<1, true>(); std::printf("e4m3fn saturated: %lld mismatches\n", n);
  }
  total += n = mismatches<2, false>(); std::printf("e5m2: %lld mismatches\n", n);
  total += n = mismatches<2, true>(); std::printf("e5m2 saturated: %lld mismatches\n", n);
  return total == 0 ? 0 : 1;
}
