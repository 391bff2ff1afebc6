"""Triton kernel of matmul: C = cast(act(A @ B + bias)) with an fp32 accumulator and a fused epilogue.

A tiled GEMM (one program per BLOCK_M x BLOCK_N tile of C) with grouped ("swizzled") program ordering: programs
are numbered so that GROUP_M consecutive row-tiles share the same column-tiles of B, which keeps B tiles in L2.
A and B are read through their strides, so a transposed (or otherwise strided) operand needs no copy.

Epilogue, on the fp32 accumulator: + bias (fp32), then the activation (relu, gelu with erf, gelu with tanh, silu),
then one cast to the output dtype. Optionally the pre-activation (acc + bias, cast) is stored too; the autograd
of mixprec_ops.nn.functional.linear saves it for the activation's gradient.

Configs: a small list, split by M into a small-M set (decode-like shapes, BLOCK_M 16/32) and a large set, pruned
by N and K, autotuned per shape bucket (M rounded up to a power of two, N, K, dtypes). Under the Triton
interpreter (TRITON_INTERPRET=1) one fixed small config is used (autotuning there is far too slow), and bf16 tiles
are upcast to fp32 before tl.dot (the interpreter's bf16 tl.dot is wrong, see shared/notes/environment.md); on a
GPU bf16 and fp16 go to the tensor cores directly. During CUDA graph capture nothing is benchmarked: the best config
already found for the shape bucket is used, else the set's default.

Future work: a persistent, TMA-based (tensor descriptor) kernel for Hopper/Blackwell with warp specialization; the
descriptor APIs differ between Triton 3.6 and 3.8 and would need feature detection.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from .fp_convert import f32_to_bf16_bits

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
def _matmul_kernel(a_ptr, b_ptr, c_ptr, pre_ptr, bias_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   M_BUCKET,  # autotune key only (M rounded up to a power of two)
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, UPCAST: tl.constexpr,
                   OUT_KIND: tl.constexpr, USE_ERF: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if UPCAST:  # interpreter + bf16: its bf16 tl.dot is wrong; fp32 tiles give the same (exact) products
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    c_offs = offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + c_offs, _cast_out(acc, OUT_KIND), mask=c_mask)
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
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


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# First entry of each set: its default (used when capturing a CUDA graph before the bucket was tuned).
_SMALL_M_CONFIGS = (_cfg(16, 64, 128, 4, 4), _cfg(16, 128, 64, 4, 4), _cfg(32, 64, 64, 4, 4),
                    _cfg(32, 128, 64, 4, 4), _cfg(16, 256, 64, 8, 3))
_LARGE_CONFIGS = (_cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(64, 256, 32, 4, 4),
                  _cfg(128, 128, 32, 4, 4), _cfg(128, 64, 32, 4, 4), _cfg(64, 128, 64, 4, 4),
                  _cfg(64, 64, 64, 4, 4))
_INTERPRETER_CONFIG = _cfg(16, 16, 16, 1, 1, group=2)
_KEY = ["M_BUCKET", "N", "K"]


def _pruned(m, n, k):
    """The configs for this shape: the small-M set for M <= 64, and no tile much larger than the problem."""
    base = _SMALL_M_CONFIGS if m <= 64 else _LARGE_CONFIGS
    pn, pk = max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(k))
    kept = tuple(c for c in base if c.kwargs["BLOCK_N"] <= 2 * pn and c.kwargs["BLOCK_K"] <= 2 * pk)
    return kept or base[-1:]


def _config_key(c):
    return (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)


@lru_cache(maxsize=None)
def _tuner(configs_key):
    configs = [_BY_KEY[k] for k in configs_key]
    return triton.autotune(configs=configs, key=_KEY)(_matmul_kernel)


_BY_KEY = {_config_key(c): c for c in _SMALL_M_CONFIGS + _LARGE_CONFIGS}


def _capture_config(tuner, configs, m_bucket, n, k):
    """The config the autotuner already chose for this bucket (any dtype), else the set's default."""
    for key, cfg in getattr(tuner, "cache", {}).items():
        if tuple(key[:3]) == (m_bucket, n, k):
            return cfg
    return configs[0]


def launch_matmul(a, b, c, bias, activation, pre=None, wrap=lambda k: k):
    """a: (M, K), b: (K, N), both fp16 or both bf16, any strides; c: (M, N) output (fp16/bf16/fp32), any strides;
    pre: None or a tensor like c for the pre-activation; bias: None or (N,). `wrap` is torch.library.wrap_triton
    when called from a triton_op."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    out_kind = _OUT_KIND[c.dtype]
    view = (lambda t: t.view(torch.int16)) if out_kind == 2 else (lambda t: t)
    upcast = INTERPRETED and a.dtype == torch.bfloat16
    if pre is not None and pre.stride() != c.stride():
        raise ValueError("pre must have c's strides")
    args = (a, b, view(c), view(pre) if pre is not None else view(c), bias if bias is not None else a, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            triton.next_power_of_2(M))
    consts = dict(HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], STORE_PRE=pre is not None,
                  UPCAST=upcast, OUT_KIND=out_kind, USE_ERF=HAS_ERF)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if INTERPRETED:
        cfg = _INTERPRETER_CONFIG
        wrap(_matmul_kernel)[grid](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages)
        return
    configs = _pruned(M, N, K)
    tuner = _tuner(tuple(_config_key(c) for c in configs))
    if a.is_cuda and torch.cuda.is_current_stream_capturing():  # never benchmark inside a graph capture
        cfg = _capture_config(tuner, configs, triton.next_power_of_2(M), N, K)
        wrap(_matmul_kernel)[grid](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages)
        return
    wrap(tuner)[grid](*args, **consts)
