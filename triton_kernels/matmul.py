"""Triton kernels of matmul: C = cast(act(A @ B + bias)) with an fp32 accumulator and a fused epilogue.

Three kernel variants, one epilogue (_epilogue, shared, so all give the same results from the same sums):

- "tiled" (_matmul_kernel): one program per BLOCK_M x BLOCK_N tile of C, with grouped ("swizzled") program ordering:
  programs are numbered so that GROUP_M consecutive row-tiles share the same column-tiles of B, which keeps B tiles
  in L2. A and B are read through their strides (pointer loads), so any layout works without a copy.
- "tma_persistent" (_matmul_tma_kernel), Hopper (sm_90) and newer: one program per SM loops over the tiles in the
  same grouped order; A and B tiles are fetched by the Tensor Memory Accelerator through host-side tensor
  descriptors (triton.tools.tensor_descriptor.TensorDescriptor, present in Triton 3.6 and 3.8 alike; the device-side
  tl.make_tensor_descriptor is not used, so no global-scratch allocator, triton.set_allocator, is needed). A
  descriptor needs the operand's inner dimension contiguous and the other stride and the base 16-byte aligned: A is
  described as (M, K) when row-major or as A.T (K, M) when column-major (the loaded tile is then transposed), and
  B as (K, N) or B.T (N, K) (the nn.Linear weight case). Out-of-bounds parts of a tile read as zeros (the K tail
  needs no mask); C is written with masked pointer stores by the shared epilogue. Feature-detected (HAS_TMA: the
  descriptor class, tl.tensor_descriptor and tl.range(..., flatten=) all present) and a candidate only on sm_90+,
  for shapes with M, N, K >= TMA_MIN_DIM whose operands are TMA-compatible. Triton 3.8's interpreter runs it on
  CPU tensors (tests/test_matmul_autotune.py forces it there); whether and where it beats the tiled kernel only a
  GPU shows.

- "split_k" (_matmul_splitk_kernel, then _matmul_splitk_sum_kernel), for M <= 128 with a long K: the tiled
  kernel's loop over one of S runs of K tiles per program, on a (tiles, S) grid, each partial stored in fp32 to a
  (S, M, N) workspace; the second kernel adds the S partials in order and applies the epilogue. Few tiles of C
  (small M) fill few SMs; S times the programs fill more, for 2 x S x M x N x 4 bytes of workspace traffic.

Epilogue, on the fp32 accumulator: + bias (fp32), then the activation (relu, gelu with erf, gelu with tanh, silu),
then one cast to the output dtype. Optionally the pre-activation (acc + bias, cast) is stored too; the autograd
of mixprec_ops.nn.functional.linear saves it for the activation's gradient.

Config selection (launch_matmul), per call:
- Under the Triton interpreter (TRITON_INTERPRET=1): one fixed small tiled config (autotuning there is far too
  slow; nothing is benchmarked, the disk cache is never touched), and bf16 tiles are upcast to fp32 before tl.dot
  (the interpreter's bf16 tl.dot is wrong, see shared/notes/environment.md); on a GPU bf16 and fp16 go to the
  tensor cores directly.
- On a GPU, eager calls: the candidates for the shape (a small-M set for M <= 64, a large set otherwise, pruned by
  N and K, plus tall tiles and split-K configs for M <= 128 and the TMA configs where eligible) are benchmarked
  once per key (select_config) and the fastest is kept in memory and in the on-disk cache (tune_cache.py:
  $MIXPREC_CACHE_DIR/matmul_autotune.json, default ~/.cache/mixprec_ops), so a later process reuses it without
  benchmarking. The key (tune_key) holds the GPU name and compute capability, the Triton and torch versions, the
  shape bucket (M rounded up to a power of two, N, K), the operand, output and bias dtypes, the activation and
  whether the pre-activation is stored, and the layout class (row-/column-major/strided A, B, C, and TMA
  eligibility). A cached config that the current code does not offer for the key is ignored; one chosen among
  another candidate set (an entry records its set: _offered_tag) is tuned again, so that new candidates (split-K,
  2026-11-30) get their chance, except where nothing may be tuned (a graph capture, tuning off), where it still
  serves. (Triton's own disk cache, triton.autotune(cache_results=True), is
  not used: one Autotuner tunes one kernel while the choice here is among three, and it keys on Triton's hashes in
  Triton's cache dir.)
- During CUDA graph capture nothing is benchmarked: the config already chosen (memory, then disk) for the key is
  used, else the candidate set's default (its first entry); nothing is stored. Rule, as for any Triton kernel: run
  each shape once (eagerly) before capturing it. Triton loads a kernel's binary (cuModuleLoadData) at the first
  launch of each config and specialization (dtypes, flags, the divisibility of M, N, K and the strides by 16) in a
  process, which CUDA refuses while a stream is capturing ("operation not permitted when stream is capturing"); a
  config read from the disk cache, or the default of a key never tuned, may never have been launched. A launch
  that fails during a capture raises a RuntimeError that says so and names the shape.
- While torch.compile traces the op (fake tensors), the tiled kernel goes through triton.autotune as before (the
  compiler tunes it), since nothing can be benchmarked on fake tensors.
- Determinism: a tuned choice depends on timing noise, so two processes (ranks) may choose configs with different
  BLOCK_K or split-K runs for one key, which sum in different orders and may differ in the last bits. The same
  choice everywhere: one tuning process's cache file given to all (a choice on disk is used, not re-tuned), or
  MIXPREC_MATMUL_AUTOTUNE=0 with an empty cache directory (with tuning off, choices on disk are still used).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from . import INTERPRETED, device_capability as _capability
from .fp_convert import f32_to_bf16_bits
from .tune_cache import TuneCache

try:  # host-side tensor descriptors (Triton >= 3.3; 3.6 and 3.8 both have them)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None


def _range_has_flatten() -> bool:
    try:
        return "flatten" in inspect.signature(tl.range.__init__).parameters
    except (TypeError, ValueError, AttributeError):  # pragma: no cover
        return False


HAS_TMA = TensorDescriptor is not None and hasattr(tl, "tensor_descriptor") and _range_has_flatten()
TMA_MIN_DIM = 256  # the persistent TMA kernel is a candidate only when M, N and K are all at least this

ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
HAS_ERF = hasattr(tl, "math") and hasattr(tl.math, "erf")

# Output kinds (constexpr): 0 fp16, 1 bf16 (native cast, round-to-nearest-even on a GPU), 2 bf16 rounded in
# integer arithmetic (the interpreter's native fp32->bf16 cast truncates), 3 fp32.
_OUT_KIND = {torch.float16: 0, torch.bfloat16: 2 if INTERPRETED else 1, torch.float32: 3}


@triton.jit
def _erf_poly(x):
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), only used where tl.math.erf is missing.
    s = tl.where(x < 0, -1.0, 1.0)
    ax = tl.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * ax)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t \
        * tl.exp(-ax * ax)
    return s * y


@triton.jit
def _cast_out(v, OUT_KIND: tl.constexpr):
    if OUT_KIND == 0:
        r = v.to(tl.float16)
    elif OUT_KIND == 1:
        r = v.to(tl.bfloat16)
    elif OUT_KIND == 2:
        r = f32_to_bf16_bits(v).to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        r = v
    return r


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of tile number `tile_id` in the grouped order (GROUP_M row-tiles per group)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, c_ptr, pre_ptr, bias_ptr, stride_cm, stride_cn,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, OUT_KIND: tl.constexpr,
              USE_ERF: tl.constexpr):
    """On the fp32 tile acc (rows offs_m, columns offs_n of C): + bias, store the pre-activation if asked, the
    activation, one cast, masked store to C. Shared by both kernel variants."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    c_offs = offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + c_offs, _cast_out(acc, OUT_KIND), mask=c_mask)
    if ACT == 1:  # torch.relu keeps NaN; tl.maximum's default (max.f32) would return 0 for it
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        if USE_ERF:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        else:
            acc = 0.5 * acc * (1.0 + _erf_poly(acc * 0.7071067811865476))
    elif ACT == 3:  # 0.5 x (1 + tanh(u)) == x * sigmoid(2u)
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc * tl.sigmoid(2.0 * u)
    elif ACT == 4:
        acc = acc * tl.sigmoid(acc)
    tl.store(c_ptr + c_offs, _cast_out(acc, OUT_KIND), mask=c_mask)


@triton.jit
def _tile_product(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n, split, n_splits,
                  SPLIT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """(acc, offs_m, offs_n): the fp32 product of tile (pid_m, pid_n) of C, A and B read through their strides, over
    all of K, or with SPLIT over the split-th of n_splits equal runs of K tiles (the last runs shorter, or empty).
    Without SPLIT it compiles to the tiled kernel's code from before split-K (the same registers, shared memory and
    instruction counts for all 30 AOT variants; bench/NOTES.md)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    # The pointer step along K in 64 bits: Triton passes an int argument that fits in 32 bits as i32, so
    # BLOCK_K * stride_ak would be an i32 product, which wraps for a K stride >= 2^31 / BLOCK_K (a column-major A,
    # stride M, with M >= 16.8M rows at BLOCK_K = 128). tl.cast, not .to: a stride equal to 1 arrives as a constexpr.
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT:
        k_tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_tiles, n_splits)
        kt_start = split * per_split
        kt_end = tl.minimum(kt_start + per_split, k_tiles)
        a_ptrs += kt_start * a_step
        b_ptrs += kt_start * b_step
    else:
        kt_start = 0
        kt_end = tl.cdiv(K, BLOCK_K)
    for kt in range(kt_start, kt_end):
        k_left = K - kt * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if UPCAST:  # interpreter + bf16: its bf16 tl.dot is wrong; fp32 tiles give the same (exact) products
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc, offs_m, offs_n


# M_BUCKET is read by nothing but triton.autotune's key (the traced path): not specialized on its value (16-divisible
# or 1), which would only multiply the compiled (and, before a graph capture, to-be-loaded) binaries.
@triton.jit(do_not_specialize=["M_BUCKET"])
def _matmul_kernel(a_ptr, b_ptr, c_ptr, pre_ptr, bias_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   M_BUCKET,  # triton.autotune key only (M rounded up to a power of two)
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, UPCAST: tl.constexpr,
                   OUT_KIND: tl.constexpr, USE_ERF: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    acc, offs_m, offs_n = _tile_product(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m,
                                        pid_n, 0, 1, False, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    _epilogue(acc, offs_m, offs_n, M, N, c_ptr, pre_ptr, bias_ptr, stride_cm, stride_cn,
              HAS_BIAS, ACT, STORE_PRE, OUT_KIND, USE_ERF)


@triton.jit
def _matmul_splitk_kernel(a_ptr, b_ptr, ws_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                          UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """Split-K, first pass: program (t, s) of a (tiles, S) grid sums tile t's products over the s-th of S equal runs
    of K tiles (the last runs shorter, or empty: zeros) and stores that fp32 partial to ws[s], ws being (S, M, N)
    fp32, contiguous. _matmul_splitk_sum_kernel adds the S partials and applies the epilogue."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    split = tl.program_id(1)
    acc, offs_m, offs_n = _tile_product(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m,
                                        pid_n, split, tl.num_programs(1), True, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    offs = (tl.cast(split, tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :].to(tl.int64))
    tl.store(ws_ptr + offs, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _matmul_splitk_sum_kernel(ws_ptr, c_ptr, pre_ptr, bias_ptr, M, N, stride_cm, stride_cn, SPLIT_K,
                              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
                              OUT_KIND: tl.constexpr, USE_ERF: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K, second pass: C = epilogue(ws[0] + ws[1] + ... + ws[SPLIT_K - 1]), added in that order (the same
    bits at every call), with the tiled kernel's epilogue."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :].to(tl.int64)
    mn = tl.cast(M, tl.int64) * N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + s * mn + offs, mask=mask, other=0.0)
    _epilogue(acc, offs_m, offs_n, M, N, c_ptr, pre_ptr, bias_ptr, stride_cm, stride_cn,
              HAS_BIAS, ACT, STORE_PRE, OUT_KIND, USE_ERF)


@triton.jit
def _matmul_tma_kernel(a_desc, b_desc, c_ptr, pre_ptr, bias_ptr, M, N, K, stride_cm, stride_cn,
                       A_KM: tl.constexpr, B_NK: tl.constexpr,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, UPCAST: tl.constexpr,
                       OUT_KIND: tl.constexpr, USE_ERF: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Persistent: program p handles tiles p, p + NUM_SMS, ... in the grouped order. a_desc describes A as (M, K),
    or A.T as (K, M) when A_KM; b_desc describes B as (K, N), or B.T as (N, K) when B_NK. FLATTEN lets Triton
    software-pipeline across tile boundaries (the next tile's loads overlap this tile's epilogue)."""
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    # The epilogue's tile number is counted separately (as in Triton's persistent-matmul tutorial): a value used
    # both before the K loop and after it defeats the pipelining of the flattened loop.
    tile_id_c = start_pid - NUM_SMS
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            if A_KM:
                a = a_desc.load([off_k, off_m]).T
            else:
                a = a_desc.load([off_m, off_k])
            if B_NK:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            if UPCAST:  # interpreter + bf16, as in _matmul_kernel
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue(acc, offs_m, offs_n, M, N, c_ptr, pre_ptr, bias_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACT, STORE_PRE, OUT_KIND, USE_ERF)


# ---- configs ----

TILED, TMA, SPLIT_K = "tiled", "tma_persistent", "split_k"
VARIANTS = (TILED, TMA, SPLIT_K)


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: the kernel variant and its meta-parameters."""

    variant: str
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1  # SPLIT_K: the runs K is split into (>= 2); 1 for the other variants

    def __post_init__(self):
        if (self.split_k >= 2) != (self.variant == SPLIT_K):
            raise ValueError(f"split_k {self.split_k!r} does not go with variant {self.variant!r}")

    @property
    def label(self) -> str:
        return (f"{self.variant} {self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} "
                f"s{self.num_stages}" + (f" k{self.split_k}" if self.variant == SPLIT_K else ""))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> KernelConfig:
        """Strict: a dict with exactly these fields (split_k may be missing, as in caches written before it: 1), a
        known variant and positive ints that go together; else ValueError."""
        names = [f for f in cls.__dataclass_fields__]
        if isinstance(d, dict) and "split_k" not in d:
            d = {**d, "split_k": 1}
        if not isinstance(d, dict) or sorted(d) != sorted(names):
            raise ValueError(f"not a KernelConfig dict: {d!r}")
        if d["variant"] not in VARIANTS:
            raise ValueError(f"unknown kernel variant {d['variant']!r}")
        for f in names[1:]:
            v = d[f]
            if type(v) is not int or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        return cls(**d)

    def triton_config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                              "GROUP_M": self.group_m}, num_warps=self.num_warps, num_stages=self.num_stages)


def _tiled(bm, bn, bk, warps, stages, group=8):
    return KernelConfig(TILED, bm, bn, bk, group, warps, stages)


def _tma(bm, bn, bk, warps, stages, group=8):
    return KernelConfig(TMA, bm, bn, bk, group, warps, stages)


def _split(bm, bn, bk, warps, stages, split_k, group=8):
    return KernelConfig(SPLIT_K, bm, bn, bk, group, warps, stages, split_k)


# First entry of each set: its default (used when capturing a CUDA graph before the key was tuned).
_SMALL_M_CONFIGS = (_tiled(16, 64, 128, 4, 4), _tiled(16, 128, 64, 4, 4), _tiled(32, 64, 64, 4, 4),
                    _tiled(32, 128, 64, 4, 4), _tiled(16, 256, 64, 8, 3))
_LARGE_CONFIGS = (_tiled(128, 128, 64, 8, 3), _tiled(128, 256, 64, 8, 3), _tiled(64, 256, 32, 4, 4),
                  _tiled(128, 128, 32, 4, 4), _tiled(128, 64, 32, 4, 4), _tiled(64, 128, 64, 4, 4),
                  _tiled(64, 64, 64, 4, 4))
# Tall, narrow tiles for 64 < M <= 128 (candidates add them to the large set there, when one of it fits): one tile
# row covers all of M, so each program streams its own columns of B once; 128x32 makes N / 32 programs (128 at
# N=4096, where 64x128 and 128x64 make 64). On the H200 (2026-11-30) the tuner's best of the sets above ran M=128 at
# 0.54-0.77x torch (K=4096, N=4096: 64x128 tiles, 64 programs on 132 SMs, 29.0 us against torch's 16.3 us): the
# layer's weight is the traffic, and half the SMs streamed it. The 128x64 one differs from the large set's 128x64x32
# in BLOCK_K and stages only.
_MID_M_CONFIGS = (_tiled(128, 32, 128, 4, 3), _tiled(128, 64, 128, 4, 3))
# Persistent TMA configs. Shared memory: stages x (BM + BN) x BK x 2 bytes of pipeline plus the epilogue's BM x BN
# tile in the output dtype (tma_shared_bytes); H100/H200 allow 227 KB per block, so fp32 outputs there drop the
# first and the last (candidates).
_TMA_CONFIGS = (_tma(128, 256, 64, 8, 3), _tma(128, 128, 64, 8, 4), _tma(128, 128, 128, 8, 3))
# Split-K configs, candidates for M <= 128 with K long enough to split (SPLIT_K_MIN_K_TILES K tiles per run at
# least). There the tiles of C are too few to fill the GPU: on the H200 (132 SMs) M=128, N=4096 makes 128 tiles of
# 64x64 (the Triton kernel ran at 0.52-0.8x torch there, 2026-11-30) and M=16, N=4096 makes 64 of 16x64. Splitting
# K into S runs makes S times the programs; the fp32 partials (S x M x N x 4 bytes) are added by a second kernel
# with the epilogue. Whether and where they win only the tuner on a GPU tells.
_SMALL_M_SPLIT_CONFIGS = (_split(16, 64, 128, 4, 4, 2), _split(16, 64, 128, 4, 4, 4))
_MID_M_SPLIT_CONFIGS = (_split(64, 64, 64, 4, 4, 2), _split(64, 64, 64, 4, 4, 4), _split(128, 64, 64, 4, 4, 4))
SPLIT_K_MAX_M = 128
SPLIT_K_MIN_K_TILES = 4
_SPLIT_SUM_TILE = (32, 128)  # the second pass's tile (BLOCK_M, BLOCK_N), 4 warps
_INTERPRETER_CONFIG = _tiled(16, 16, 16, 1, 1, group=2)
_INTERPRETER_TMA_CONFIG = _tma(16, 16, 16, 1, 1, group=2)  # for tests that force the persistent kernel there
_INTERPRETER_NUM_SMS = 3  # the persistent kernel under the interpreter: 3 "SMs", so programs loop over tiles
_KEY = ["M_BUCKET", "N", "K"]
AUTOTUNE_ENV = "MIXPREC_MATMUL_AUTOTUNE"  # "0": no benchmarking, each set's default config (see select_config)


def tma_shared_bytes(cfg: KernelConfig, out_bytes: int) -> int:
    """An upper bound on the persistent kernel's shared memory: the pipeline's A and B buffers plus the epilogue's
    layout conversion of the accumulator tile in the output dtype, which (the loop being flattened) cannot reuse
    them, plus 1 KB for the pipeline's barriers and alignment (24-56 bytes compiled). The compiled sizes (Triton 3.6
    and 3.8 agree), checked against this bound for every TMA config in tests/test_triton_compile.py, are within
    1 KB of it for fp32 outputs and up to 33 KB under it for 16-bit ones."""
    return (cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * 2 + cfg.block_m * cfg.block_n * out_bytes
            + 1024)


def candidates(m: int, n: int, k: int, tma: bool, out_bytes: int = 2,
               shared_limit: int | None = None) -> tuple[KernelConfig, ...]:
    """The configs to try for this shape: the small-M set for M <= 64, else the large set (with the tall, narrow
    tiles for M <= 128 when one of the large set fits), without tiles much larger than the problem (nothing fits:
    the set's smallest); for M <= 128 the split-K configs that leave each run of K at least SPLIT_K_MIN_K_TILES
    tiles; plus the persistent TMA configs when `tma` (the caller decided eligibility) whose shared memory for an
    output of `out_bytes` per element fits `shared_limit` (bytes per block; None: no limit). On an H200 (227 KB) two
    of them do not fit an fp32 output."""
    base = _SMALL_M_CONFIGS if m <= 64 else _LARGE_CONFIGS
    pn, pk = max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(k))

    def fits(c):
        return c.block_n <= 2 * pn and c.block_k <= 2 * pk

    kept = tuple(c for c in base if fits(c))
    # The tall tiles only beside a fitting large one: a lone candidate runs untuned (graph capture, autotune off),
    # and these need ~120-144 KB of shared memory, over the 99 KB of sm_86/89/120.
    if kept and 64 < m <= SPLIT_K_MAX_M:
        kept += tuple(c for c in _MID_M_CONFIGS if fits(c))
    kept = kept or base[-1:]
    if m <= SPLIT_K_MAX_M:
        split = _SMALL_M_SPLIT_CONFIGS if m <= 64 else _MID_M_SPLIT_CONFIGS
        kept += tuple(c for c in split if fits(c) and triton.cdiv(k, c.block_k) >= SPLIT_K_MIN_K_TILES * c.split_k)
    if tma:
        kept += tuple(c for c in _TMA_CONFIGS if fits(c) and (
            shared_limit is None or tma_shared_bytes(c, out_bytes) <= shared_limit))
    return kept


# ---- the key of a tuning result ----


@lru_cache(maxsize=None)
def _device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    p = torch.cuda.get_device_properties(device)
    return f"{p.name} sm_{p.major}{p.minor}"


@lru_cache(maxsize=None)
def _shared_limit(device: torch.device) -> int | None:
    """Shared memory a block may opt in to on `device` (cudaDevAttrMaxSharedMemoryPerBlockOptin, the limit Triton
    checks at launch); None for other devices."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _layout(t: torch.Tensor) -> str:
    return "row" if t.stride(-1) == 1 else "col" if t.stride(-2) == 1 else "strided"


def tune_key(device_tag: str, m: int, n: int, k: int, ab_dtype: torch.dtype, c_dtype: torch.dtype,
             bias_dtype: torch.dtype | None, activation: str | None, store_pre: bool, layout: str) -> str:
    """The string a tuning result is stored under: everything the fastest config depends on."""
    dt = lambda d: str(d).replace("torch.", "")
    return " | ".join([
        device_tag, f"triton {triton.__version__}", f"torch {torch.__version__}",
        f"M<={triton.next_power_of_2(m)} N={n} K={k}",
        f"{dt(ab_dtype)}->{dt(c_dtype)} bias {dt(bias_dtype) if bias_dtype is not None else 'none'}",
        f"act {activation or 'none'} pre {int(bool(store_pre))}", layout,
    ])


def _tma_operands(a: torch.Tensor, b: torch.Tensor):
    """((A or A.T, A is column-major), (B or B.T, B is column-major)) as 2-D tensors whose inner dimension is
    contiguous, with the base and the outer stride 16-byte aligned (what a TMA descriptor requires); None if either
    operand does not allow it. A broadcast operand (a stride 0, which the alignment test alone would pass) is
    refused too: a descriptor's zero global stride is undocumented; the tiled kernel reads it through its strides."""
    out = []
    for t in (a, b):
        e = t.element_size()
        if t.data_ptr() % 16 or 0 in t.shape or 0 in t.stride():
            return None
        if t.stride(1) == 1 and (t.stride(0) * e) % 16 == 0:
            out.append((t, False))
        elif t.stride(0) == 1 and (t.stride(1) * e) % 16 == 0:
            out.append((t.t(), True))
        else:
            return None
    return tuple(out)


def _tma_eligible(a: torch.Tensor, m: int, n: int, k: int) -> bool:
    """The persistent TMA kernel is a candidate: Triton has the API, the GPU is sm_90+, the shape is large."""
    return HAS_TMA and a.is_cuda and min(m, n, k) >= TMA_MIN_DIM and _capability(a.device)[0] >= 9


# ---- choosing a config: memory, then disk, then a benchmark ----

_CACHE = TuneCache("matmul_autotune.json")
_CHOSEN: dict[str, KernelConfig] = {}  # key -> config, this process
_RECORDERS: list[list] = []  # open record_choices() lists
_failed_warned: set[str] = set()
_oom_warned: set[str] = set()  # keys


def _benchmark(fn) -> float:
    """Median seconds of fn() on the GPU (triton.testing.do_bench: warm-up, then ~20 ms of calls)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e-3


def _offered_tag(cands) -> str:
    """A short digest of a candidate set (its configs' labels, in order), stored with each tuning result."""
    return f"{zlib.crc32('|'.join(c.label for c in cands).encode()):08x}"


def select_config(key: str, cands: tuple[KernelConfig, ...], run, *, capturing: bool, cache: TuneCache | None = None,
                  benchmark=None) -> tuple[KernelConfig, str]:
    """(config, where it came from) for `key` among `cands`; `run(config)` launches the kernel with it.

    Order: this process's earlier choice ("memory"); the disk cache ("disk", if the stored config is one of
    `cands` and was chosen among `cands`, or chosen among another set while nothing may be tuned); during a CUDA
    graph capture, the default cands[0] ("default (capture)": nothing benchmarked or stored);
    with MIXPREC_MATMUL_AUTOTUNE=0, the same default ("default (autotune off)": one compilation per kernel
    specialization instead of one per candidate, for time-bounded runs; results found in memory or on disk are
    still used);
    a single candidate ("only candidate"); else every candidate is benchmarked (`benchmark(fn)` -> seconds; a
    candidate that raises, e.g. too much shared memory, is skipped with a warning) and the fastest is kept in
    memory and written to the disk cache ("tuned"). Out of memory while benchmarking (torch.OutOfMemoryError) ends
    the tuning with the default, nothing kept ("default (out of memory)", one warning per key), or with a cached
    choice among another set where there is one ("disk"). A cached choice among another set is never kept in
    memory: the next call that may tune does."""
    cache = _CACHE if cache is None else cache

    def untuned(why):  # where nothing is tuned: a cached choice among another set if any, else the default
        return (stale, "disk") if stale is not None else (cands[0], why)

    cfg = _CHOSEN.get(key)
    if cfg is not None and cfg in cands:
        return cfg, "memory"
    entry = cache.get(key)
    stale = None  # a cached choice among another candidate set: what serves where nothing may be tuned
    if entry is not None:
        try:
            cfg = KernelConfig.from_dict(entry.get("config"))
        except (ValueError, TypeError):
            cfg = None
        if cfg is not None and cfg in cands:
            if entry.get("offered") == _offered_tag(cands):
                _CHOSEN[key] = cfg
                return cfg, "disk"
            stale = cfg  # (not kept in memory: the next call that may tune does)
    if capturing:
        return untuned("default (capture)")
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return untuned("default (autotune off)")
    if len(cands) == 1:
        _CHOSEN[key] = cands[0]
        return cands[0], "only candidate"
    bench = _benchmark if benchmark is None else benchmark
    times, first_err = {}, None
    for c in cands:
        try:
            times[c] = float(bench(lambda c=c: run(c)))
        except torch.OutOfMemoryError as e:
            # Not the config's fault (do_bench allocates a 256 MB buffer to flush L2) and the others would fail
            # alike: the default, kept neither in memory nor on disk, so that a later call tunes this key again.
            if key not in _oom_warned:
                _oom_warned.add(key)
                warnings.warn(f"mixprec_ops matmul autotune: out of memory while benchmarking for [{key}]; using the "
                              f"{'cached' if stale is not None else 'default'} config "
                              f"{(stale or cands[0]).label} ({str(e).splitlines()[0][:200]})",
                              RuntimeWarning, stacklevel=2)
            return untuned("default (out of memory)")
        except Exception as e:  # noqa: BLE001  (compilation or launch failure of one config: try the others)
            first_err = first_err or e
            times[c] = math.inf
            if c.label not in _failed_warned:
                _failed_warned.add(c.label)
                warnings.warn(f"mixprec_ops matmul autotune: config {c.label} failed for [{key}] and is skipped "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                              RuntimeWarning, stacklevel=2)
    best = min(cands, key=lambda c: times[c])
    if not math.isfinite(times[best]):
        raise first_err
    _CHOSEN[key] = best
    cache.put(key, {"config": best.to_dict(), "us": round(times[best] * 1e6, 3), "candidates": len(cands),
                    "offered": _offered_tag(cands)})
    return best, "tuned"


@contextlib.contextmanager
def record_choices():
    """Collect, for each launch in the block, {"m", "n", "k", "config" (label), "source"} (for the benchmarks)."""
    got: list[dict] = []
    _RECORDERS.append(got)
    try:
        yield got
    finally:
        _RECORDERS.remove(got)


def chosen_configs() -> dict[str, KernelConfig]:
    """This process's choices so far, by key."""
    return dict(_CHOSEN)


@lru_cache(maxsize=None)
def _tuner(configs_key):
    """triton.autotune over tiled configs: only for calls traced by torch.compile (fake tensors)."""
    return triton.autotune(configs=[c.triton_config() for c in configs_key], key=_KEY)(_matmul_kernel)


def _is_traced(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


# ---- launch ----


def _launch(cfg: KernelConfig, a, b, c, pre, bias, M, N, K, consts, tma_ops, wrap):
    """One launch of `cfg`'s variant (c/pre: already viewed as the kernel stores them)."""
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if cfg.variant == TILED:
        wrap(_matmul_kernel)[(tiles,)](a, b, c, pre, bias, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                                        b.stride(1), c.stride(0), c.stride(1), triton.next_power_of_2(M),
                                        **consts, **meta)
        return
    if cfg.variant == SPLIT_K:
        ws = torch.empty((cfg.split_k, M, N), dtype=torch.float32, device=a.device)  # every element written
        wrap(_matmul_splitk_kernel)[(tiles, cfg.split_k)](a, b, ws, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                                                           b.stride(1), UPCAST=consts["UPCAST"], **meta)
        sm, sn = _SPLIT_SUM_TILE
        epilogue = {k: v for k, v in consts.items() if k != "UPCAST"}
        wrap(_matmul_splitk_sum_kernel)[(triton.cdiv(M, sm) * triton.cdiv(N, sn),)](
            ws, c, pre, bias, M, N, c.stride(0), c.stride(1), cfg.split_k, **epilogue, BLOCK_M=sm, BLOCK_N=sn,
            num_warps=4)
        return
    if tma_ops is None:
        raise ValueError(f"{cfg.label}: the operands are not TMA-compatible (inner dimension contiguous, base and "
                         "outer stride 16-byte aligned, no stride 0) or this Triton has no tensor descriptors")
    (a_t, a_km), (b_t, b_nk) = tma_ops
    a_desc = TensorDescriptor.from_tensor(a_t, [cfg.block_k, cfg.block_m] if a_km else [cfg.block_m, cfg.block_k])
    b_desc = TensorDescriptor.from_tensor(b_t, [cfg.block_n, cfg.block_k] if b_nk else [cfg.block_k, cfg.block_n])
    nsm = _num_sms(a.device)
    # Called directly, not through wrap: only eager calls with real tensors get here (where torch's wrap_triton is
    # a pass-through); traced calls take the triton.autotune path.
    _matmul_tma_kernel[(min(nsm, tiles),)](a_desc, b_desc, c, pre, bias, M, N, K, c.stride(0), c.stride(1),
                                           A_KM=a_km, B_NK=b_nk, NUM_SMS=nsm, FLATTEN=True, **consts, **meta)


def launch_matmul(a, b, c, bias, activation, pre=None, wrap=lambda k: k, config: KernelConfig | None = None):
    """a: (M, K), b: (K, N), both fp16 or both bf16, any strides; c: (M, N) output (fp16/bf16/fp32), any strides;
    pre: None or a tensor like c for the pre-activation; bias: None or (N,), any stride. `wrap` is
    torch.library.wrap_triton when called from a triton_op. `config` forces one KernelConfig (tests, experiments):
    no tuning, no cache; a TMA config raises ValueError when the operands do not allow it."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    out_kind = _OUT_KIND[c.dtype]
    view = (lambda t: t.view(torch.int16)) if out_kind == 2 else (lambda t: t)
    if pre is not None and pre.stride() != c.stride():
        raise ValueError("pre must have c's strides")
    c_v = view(c)
    pre_v = view(pre) if pre is not None else c_v
    # The kernels read the bias at bias_ptr + n (unit stride): a strided or expanded (stride 0) bias is made
    # contiguous here (a copy of N elements; none when it already is).
    bias_t = bias.contiguous() if bias is not None else c_v  # c_v: never read without HAS_BIAS
    consts = dict(HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], STORE_PRE=pre is not None,
                  UPCAST=INTERPRETED and a.dtype == torch.bfloat16, OUT_KIND=out_kind, USE_ERF=HAS_ERF)

    def launch(cfg, tma_ops):
        _launch(cfg, a, b, c_v, pre_v, bias_t, M, N, K, consts, tma_ops, wrap)

    if config is not None or INTERPRETED:  # forced, or the interpreter's one fixed config: never tuned or cached
        cfg = config or _INTERPRETER_CONFIG
        launch(cfg, _tma_operands(a, b) if (cfg.variant == TMA and HAS_TMA) else None)
        _record(M, N, K, cfg, "forced" if config is not None else "interpreter")
        return
    if _is_traced(a):  # torch.compile tracing: nothing to benchmark on fake tensors
        configs = tuple(c for c in candidates(M, N, K, False) if c.variant == TILED)  # (what triton.autotune runs)
        args = (a, b, c_v, pre_v, bias_t, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                c.stride(0), c.stride(1), triton.next_power_of_2(M))
        wrap(_tuner(configs))[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](
            *args, **consts)
        return
    tma_ops = _tma_operands(a, b) if _tma_eligible(a, M, N, K) else None
    cands = candidates(M, N, K, tma_ops is not None, c.element_size(), _shared_limit(a.device))
    key = tune_key(_device_tag(a.device), M, N, K, a.dtype, c.dtype, None if bias is None else bias.dtype,
                   activation, pre is not None,
                   f"a {_layout(a)} b {_layout(b)} c {_layout(c)} tma {int(tma_ops is not None)}")
    capturing = a.is_cuda and torch.cuda.is_current_stream_capturing()  # never benchmark inside a graph capture
    cfg, source = select_config(key, cands, lambda cc: launch(cc, tma_ops), capturing=capturing)
    try:
        launch(cfg, tma_ops)
    except Exception as e:
        if not capturing:
            raise
        raise RuntimeError(
            f"mixprec_ops matmul: the Triton kernel {cfg.label} ({source}) for M={M} N={N} K={K} "
            f"({a.dtype} -> {c.dtype}) failed to launch during a CUDA graph capture ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}). Triton loads a kernel's binary at the first launch of "
            "each config and specialization in a process, which CUDA does not permit while capturing: run each "
            "shape once before capturing it (as for any Triton kernel)") from e
    _record(M, N, K, cfg, source)


def _record(m, n, k, cfg, source):
    for rec in _RECORDERS:
        rec.append({"m": m, "n": n, "k": k, "config": cfg.label, "source": source})
