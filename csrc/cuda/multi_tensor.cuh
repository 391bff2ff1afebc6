// Multi-tensor apply: one kernel launch covers many tensors. The tensors' addresses and a block -> (tensor, chunk)
// map travel as one kernel parameter struct (no host->device copy, so the launches can be captured in a CUDA
// graph). Since CUDA 12.1, Volta+ kernels accept up to 32764 bytes of parameters; torch's own multi-tensor kernels
// still pack for the old 4 KB limit, so we fit ~8x more tensors and blocks into each launch.
#pragma once
#include <ATen/core/Tensor.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cuda_common.cuh"

namespace mixprec::cuda {

constexpr int kParamBytes = 32000;  // below the 32764-byte kernel-parameter limit (CUDA >= 12.1, sm_70+)

// DEPTH parallel lists (e.g. DEPTH=1: just the tensors; Adam: param, grad, m, v, ...).
template <int DEPTH>
struct TensorListMeta {
  // Capacity from the byte budget: each tensor costs DEPTH addresses + a size + an index (8 * DEPTH + 12 bytes),
  // each block 2 + 4 bytes; 64 bytes of slack cover block_offset and alignment padding.
  // kMaxTensors: DEPTH 1: 982, 4: 446, 5: 377, 6: 327.
  static constexpr int kMaxBlocks = 2048;
  static constexpr int kMaxTensors = (kParamBytes - kMaxBlocks * 6 - 64) / (8 * DEPTH + 12);
  static_assert(kMaxTensors >= 1, "DEPTH too large for the parameter budget");
  static_assert(kMaxTensors <= 65535, "block_to_tensor is 16-bit");
  void* addr[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t index[kMaxTensors];  // the tensor's position in the caller's lists (e.g. its row of a per-tensor table)
  uint16_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
  int64_t block_offset;  // index of this launch's first block among all launches of the call
};

// Calls launch(meta, nblocks) once per full (or final) meta; block offsets start at block_base. Returns the blocks
// launched. `lists[d][t]` is the d-th tensor of the t-th group;
// all lists have the same length and tensors of one group have the same numel. Zero-size tensors are skipped.
// meta.index[slot] is t (the group's position in `lists`), kept when a tensor continues into the next launch.
template <int DEPTH, typename Launch>
int64_t multi_tensor_apply(int64_t chunk, const std::vector<std::vector<at::Tensor>>& lists, Launch&& launch,
                           int64_t block_base = 0) {
  using Meta = TensorListMeta<DEPTH>;
  static_assert(sizeof(Meta) <= kParamBytes, "TensorListMeta exceeds the parameter budget");
  static_assert(sizeof(Meta) <= 32764, "TensorListMeta exceeds the CUDA kernel-parameter limit");
  TORCH_CHECK(lists[0].size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "multi_tensor_apply: too many tensors");
  Meta meta;
  meta.block_offset = block_base;
  int nt = 0, nb = 0;
  int64_t total_blocks = 0;
  const size_t ntensors = lists[0].size();
  for (size_t t = 0; t < ntensors; ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) continue;
    for (int d = 0; d < DEPTH; ++d) meta.addr[d][nt] = lists[d][t].data_ptr();
    meta.numel[nt] = numel;
    meta.index[nt] = static_cast<int32_t>(t);
    const int64_t nchunks = (numel + chunk - 1) / chunk;
    for (int64_t c = 0; c < nchunks; ++c) {
      meta.block_to_tensor[nb] = static_cast<uint16_t>(nt);
      meta.block_to_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool blocks_full = nb == Meta::kMaxBlocks;
      const bool tensors_full = nt + 1 == Meta::kMaxTensors && c + 1 == nchunks;
      const bool last = t + 1 == ntensors && c + 1 == nchunks;
      if (blocks_full || tensors_full || last) {
        launch(meta, nb);
        total_blocks += nb;
        meta.block_offset = block_base + total_blocks;
        nb = 0;
        if (c + 1 < nchunks) {  // this tensor continues in the next launch, as tensor 0
          for (int d = 0; d < DEPTH; ++d) meta.addr[d][0] = meta.addr[d][nt];
          meta.numel[0] = meta.numel[nt];
          meta.index[0] = meta.index[nt];
          nt = 0;
        } else {
          nt = -1;  // incremented below
        }
      }
    }
    ++nt;
  }
  if (nb > 0) {  // trailing zero-size tensors can leave a partial launch unsent
    launch(meta, nb);
    total_blocks += nb;
  }
  return total_blocks;
}

// Upper bound on the blocks multi_tensor_apply will launch (to size per-block scratch before launching).
inline int64_t count_chunks(const std::vector<at::Tensor>& tensors, int64_t chunk) {
  int64_t n = 0;
  for (const auto& t : tensors) n += (t.numel() + chunk - 1) / chunk;
  return n;
}

}  // namespace mixprec::cuda
