"""Triton kernel of adam_step_: one fused Adam/AdamW step over a bucket of tensors, in a single launch.

The element-wise definition (and the reference every backend matches bit for bit) is in mixprec_ops/ops/adam.py.
Bit-exactness rests on:
  - one IEEE fp32 operation per step of the definition, in its order, and no contraction into fused multiply-adds:
    the kernel is compiled with enable_fp_fusion=False (LLVM contraction off, ptxas --fmad=false);
  - divisions and the square root rounded to nearest even: tl.math.div_rn / tl.math.sqrt_rn (Triton's `/` and
    tl.sqrt lower to approximate instructions on NVIDIA GPUs);
  - maximum with NaN propagation (tl.maximum(..., propagate_nan=ALL)), like torch.maximum;
  - negation as g * -1.0, which flips the sign of zeros like torch's neg: Triton 3.6's unary minus is 0 - g (3.8's
    is an fneg), so -(+0.0) came out +0.0 and a maximized step's moments lost the sign of zero (H200, 2026-11-30);
  - bf16 travelling as int16 bits: widened by a shift, rounded in integer arithmetic (fp_convert.py); fp16 through
    native casts (exact round-to-nearest-even on GPUs and on the interpreter).

Multi-tensor layout (as in unscale.py): a device table holds, per non-empty tensor, one row of int64
[addresses of param, grad, exp_avg, exp_avg_sq, (max_exp_avg_sq), (master), numel, original index]; a program map
holds [row, chunk] per program. Tables are cached per (device, addresses, numels, lists present), so a steady-state
step does no host-to-device copy (and can be captured in a CUDA graph once a warm-up step has built its table).
"""

import functools
import warnings

import torch
import triton
import triton.language as tl

from .fp_convert import f32_to_bf16_bits
from .tables import get_tables_capped

# One 1024-element block a program, 4 warps (8 elements a thread). On the H200 (2026-11-30, bench rows side by side)
# this reached 90% of copy at 100M params and 96% at 1e9 (735.7 us, 6.92 ms), where a loop over 65536 elements in
# 1024-element blocks with 8 warps reached 80% and 85% (827.6 us, 7.78 ms): that kernel issued one block's loads at a
# time, ~3 programs and ~43 KB of loads in flight an SM against ~7 programs and ~100 KB here (the CUDA kernel's
# amount). The price: a program-map entry (16 bytes) a program, built at a bucket's first step and whenever its
# tensors' addresses change. Past MAX_PROGRAMS (~1e9 elements, 16 MB) a program covers 2048, 4096, ... elements
# instead (a loop over 1024-element blocks, as the former tiles did), so the map stays under ~16 MB.
CHUNK = 1024  # elements per program (the least: tables.get_tables_capped doubles it for huge buckets)
BLOCK = 1024  # elements per loop iteration of a program
NUM_WARPS = 4
MAX_PROGRAMS = 1 << 20

# Storage kinds (constexpr): how a tensor is loaded and stored. bf16 travels as int16 bits.
_F32, _F16, _BF16 = 0, 1, 2
_KIND = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16}


# ----------------------------------------------------------------------------------------------- feature detection
def _fp_fusion_option():
    """Launch options turning off fp contraction. enable_fp_fusion is a compile option of the NVIDIA and AMD
    backends (Triton >= 2.2, including 3.6 and 3.8); the interpreter ignores launch options."""
    fields = set()
    for mod, cls in (("triton.backends.nvidia.compiler", "CUDAOptions"),
                     ("triton.backends.amd.compiler", "HIPOptions")):
        try:
            fields |= set(getattr(__import__(mod, fromlist=[cls]), cls).__dataclass_fields__)
        except Exception:  # backend not installed
            pass
    if "enable_fp_fusion" in fields:
        return {"enable_fp_fusion": False}
    if fields:
        warnings.warn("mixprec_ops: this Triton has no enable_fp_fusion option; the Triton Adam kernel may contract "
                      "multiply-adds and differ from the reference in the last bit")
    return {}


_LAUNCH_OPTS = _fp_fusion_option()

# IEEE round-to-nearest division and square root (tl.math.div_rn / sqrt_rn exist in Triton 3.x; older releases had
# tl.math.fdiv(ieee_rounding=True) and libdevice's sqrt_rn).
if hasattr(tl.math, "div_rn"):

    @triton.jit
    def _div_rn(x, y):
        return tl.math.div_rn(x, y)

else:  # pragma: no cover

    @triton.jit
    def _div_rn(x, y):
        return tl.math.fdiv(x, y, ieee_rounding=True)


if hasattr(tl.math, "sqrt_rn"):

    @triton.jit
    def _sqrt_rn(x):
        return tl.math.sqrt_rn(x)

else:  # pragma: no cover
    from triton.language.extra import libdevice as _libdevice

    @triton.jit
    def _sqrt_rn(x):
        return _libdevice.sqrt_rn(x)


# ------------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _load_f32(addr, offs, mask, KIND: tl.constexpr):
    """Elements offs of the tensor at int64 address addr, widened exactly to fp32."""
    if KIND == 2:
        raw = tl.load(addr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0)
        return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 1:
        return tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)


@triton.jit
def _store_f32(addr, offs, v, mask, KIND: tl.constexpr):
    """Round fp32 v to nearest even in the tensor's dtype and store it."""
    if KIND == 2:
        bits = f32_to_bf16_bits(v).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(addr.to(tl.pointer_type(tl.int16)) + offs, bits, mask=mask)
    elif KIND == 1:
        tl.store(addr.to(tl.pointer_type(tl.float16)) + offs, v.to(tl.float16), mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, v, mask=mask)


@triton.jit
def _adam_kernel(tab_ptr, map_ptr, scalars_ptr, grad_scale_ptr, found_inf_ptr, clip_ptr,
                 beta1, omb1, beta2, omb2, eps, wd,
                 P_KIND: tl.constexpr, G_KIND: tl.constexpr, S_KIND: tl.constexpr, ROW: tl.constexpr,
                 AMSGRAD: tl.constexpr, MASTER: tl.constexpr, VMAX_COL: tl.constexpr, MASTER_COL: tl.constexpr,
                 HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(map_ptr + 2 * pid)
    chunk = tl.load(map_ptr + 2 * pid + 1)
    row = tab_ptr + t * ROW
    p_addr = tl.load(row + 0)
    g_addr = tl.load(row + 1)
    m_addr = tl.load(row + 2)
    v_addr = tl.load(row + 3)
    numel = tl.load(row + ROW - 2)
    orig = tl.load(row + ROW - 1)  # index of the tensor in the caller's lists: its row of `scalars`
    start = chunk * CHUNK
    n = tl.minimum(numel - start, CHUNK)
    if HAS_FOUND_INF:
        # Non-zero (or NaN) found_inf: this step is skipped, nothing is read or written.
        n = tl.where(tl.load(found_inf_ptr) == 0.0, n, 0)

    step_size = tl.load(scalars_ptr + orig * 3)
    bc2_sqrt = tl.load(scalars_ptr + orig * 3 + 1)
    decay = tl.load(scalars_ptr + orig * 3 + 2)
    # Python floats arrive as fp32 kernel arguments when compiled; the interpreter keeps them as Python floats and
    # would type subnormal ones fp64: the casts pin fp32 (exact, the launcher passes fp32-representable values).
    b1 = tl.cast(beta1, tl.float32)
    c1 = tl.cast(omb1, tl.float32)
    b2 = tl.cast(beta2, tl.float32)
    c2 = tl.cast(omb2, tl.float32)
    e = tl.cast(eps, tl.float32)
    if HAS_GRAD_SCALE:
        gs = tl.load(grad_scale_ptr)
    if HAS_CLIP:
        cc = tl.load(clip_ptr)
    if HAS_WD:
        if not DECOUPLED:
            wdf = tl.cast(wd, tl.float32)
    if AMSGRAD:
        vmax_addr = tl.load(row + VMAX_COL)
    if MASTER:
        w_addr = tl.load(row + MASTER_COL)

    for i in range(0, n, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        g = _load_f32(g_addr, offs, mask, G_KIND)
        if HAS_GRAD_SCALE:
            g = _div_rn(g, gs)
        if HAS_CLIP:
            g = g * cc
        if MAXIMIZE:
            g = g * -1.0  # not -g: Triton 3.6 compiles unary minus as 0 - g, which gives +0.0 for g = +0.0
        if MASTER:
            w = _load_f32(w_addr, offs, mask, 0)
        else:
            w = _load_f32(p_addr, offs, mask, P_KIND)
        if HAS_WD:
            if DECOUPLED:
                w = w * decay
            else:
                g = g + w * wdf
        m = _load_f32(m_addr, offs, mask, S_KIND) * b1 + g * c1
        v = _load_f32(v_addr, offs, mask, S_KIND) * b2 + (g * g) * c2
        if AMSGRAD:
            vv = tl.maximum(_load_f32(vmax_addr, offs, mask, S_KIND), v, propagate_nan=tl.PropagateNan.ALL)
            _store_f32(vmax_addr, offs, vv, mask, S_KIND)
        else:
            vv = v
        denom = _div_rn(_sqrt_rn(vv), bc2_sqrt) + e
        w = w - step_size * _div_rn(m, denom)
        _store_f32(m_addr, offs, m, mask, S_KIND)
        _store_f32(v_addr, offs, v, mask, S_KIND)
        if MASTER:
            _store_f32(w_addr, offs, w, mask, 0)
        _store_f32(p_addr, offs, w, mask, P_KIND)


# ------------------------------------------------------------------------------------------------------ launcher
@functools.lru_cache(maxsize=256)
def _fp32(x):
    """A Python float holding exactly fp32(x), rounded as the reference rounds it (torch.tensor(x, float32))."""
    return torch.tensor(x, dtype=torch.float32).item()


def launch_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, scalars, beta1, beta2, eps,
                     weight_decay, decoupled, maximize, grad_scale, found_inf, clip_coef):
    """One fused step over the bucket, one launch, no host sync. See mixprec_ops/ops/adam.py for the contract."""
    if not params:
        return
    device = params[0].device
    amsgrad = len(max_exp_avg_sqs) > 0
    master = len(masters) > 0
    lists = [params, grads, exp_avgs, exp_avg_sqs]
    vmax_col = master_col = 0
    if amsgrad:
        vmax_col = len(lists)
        lists.append(max_exp_avg_sqs)
    if master:
        master_col = len(lists)
        lists.append(masters)
    (rows, prog_map, n_programs), chunk = get_tables_capped(lists, device, CHUNK, "adam_step_", MAX_PROGRAMS)
    if n_programs == 0:
        return
    beta1, beta2 = float(beta1), float(beta2)
    _adam_kernel[(n_programs,)](
        rows, prog_map, scalars,
        grad_scale if grad_scale is not None else scalars,
        found_inf if found_inf is not None else scalars,
        clip_coef if clip_coef is not None else scalars,
        _fp32(beta1), _fp32(1.0 - beta1), _fp32(beta2), _fp32(1.0 - beta2), _fp32(float(eps)),
        _fp32(float(weight_decay)),
        P_KIND=_KIND[params[0].dtype], G_KIND=_KIND[grads[0].dtype], S_KIND=_KIND[exp_avgs[0].dtype],
        ROW=len(lists) + 2, AMSGRAD=amsgrad, MASTER=master, VMAX_COL=vmax_col, MASTER_COL=master_col,
        HAS_WD=float(weight_decay) != 0.0, DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize),
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, HAS_CLIP=clip_coef is not None,
        CHUNK=chunk, BLOCK=BLOCK, num_warps=NUM_WARPS, **_LAUNCH_OPTS,
    )
