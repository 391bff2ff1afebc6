// Software prefetch for the CPU kernels' loops over memory-sized inputs. Each iteration requests the lines it will
// read kPrefetchBytes later: a page ahead of its loads, where the hardware prefetcher (which stops at each 4 KB
// page) has not gone yet. Values are unchanged; a request past the end of an input is harmless (a prefetch never
// faults). Measured on the 2-core CI machine, inputs rotated out of cache (bench/NOTES.md, seventeenth session).
#pragma once
#include <cstdint>

namespace mixprec::cpu {

constexpr int64_t kPrefetchBytes = 4096;

// Casts (forward and backward, AVX2 and AVX-512 code) of at least this many elements store a 16-bit target or
// grad_x past the cache (streaming stores, whole 64-byte lines: no line read for ownership; f32 -> bf16 moves 6 B an
// element instead of 8). Measured at 16M elements on the 2-core CI machine, AVX-512 code: f32 -> bf16 1.10x,
// f32 -> f16 1.15x, the backward 1.05-1.30x; fp8 targets gain nothing (compute-bound there) and are not streamed.
// Smaller outputs stay in cache for the op that reads them next.
constexpr int64_t kCastStreamMin = int64_t{1} << 23;

// Requests the kBytes bytes at p + kPrefetchBytes (whole 64-byte lines; p need not be aligned) for reading.
template <int64_t kBytes>
inline void prefetch_ahead(const void* p) {
  static_assert(kBytes > 0 && kBytes % 64 == 0, "whole lines");
  const char* a = static_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t l = 0; l < kBytes; l += 64) __builtin_prefetch(a + l, 0, 3);
}

// For loops that step through p by kStep elements, a line or less at a time (kStep * sizeof(T) divides 64): at
// element i, requests the line kPrefetchBytes ahead when p + i lies in the first kStep elements' bytes of its line.
// Steps kStep apart, exactly one iteration starts there in each line, whatever p's alignment and wherever the loop
// began: one request a line. (A burst of requests for a whole tile at its start ran 0.8-0.9x on the AVX2 cast loop:
// the core stalls while they wait for line-fill buffers.)
template <int64_t kStep, typename T>
inline void prefetch_stream(const T* p, int64_t i) {
  constexpr int64_t kStepBytes = kStep * static_cast<int64_t>(sizeof(T));
  static_assert(kStepBytes > 0 && 64 % kStepBytes == 0, "a step of a line or a divisor of it");
  if (static_cast<int64_t>(reinterpret_cast<uintptr_t>(p + i) % 64) < kStepBytes) {
    __builtin_prefetch(reinterpret_cast<const char*>(p + i) + kPrefetchBytes, 0, 3);
  }
}

}  // namespace mixprec::cpu
