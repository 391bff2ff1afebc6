"""Triton kernel of unscale_: multi-tensor in-place t *= inv_scale, found_inf flag, optional L2-norm partials.

One launch per dtype group covers every tensor of that dtype: each program reads its tensor's address from a
cached device table (tables.py: rows [address, numel, index], then [row, chunk] per program).
"""

import torch
import triton
import triton.language as tl

from .fp_convert import f32_to_bf16_bits
from .tables import get_tables

CHUNK = 65536  # elements per program
# bf16 travels as int16 bits: widened by a shift and rounded in integer arithmetic (exact on the interpreter too).
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.int16}
# |v| at or above this rounds to inf in the tensor's dtype (max finite + half an ulp; ties go up, to inf).
OVERFLOW_AT = {torch.float32: float("inf"), torch.float16: 65520.0, torch.bfloat16: 3.3961775292304957e38}


@triton.jit
def _unscale_kernel(tab_ptr, map_ptr, inv_ptr, found_ptr, partial_ptr, overflow_at, DTYPE: tl.constexpr,
                    IS_BF16: tl.constexpr, NORM: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tab_ptr + tl.load(map_ptr + 2 * pid) * 3
    start = tl.load(map_ptr + 2 * pid + 1) * CHUNK
    p = tl.load(row).to(tl.pointer_type(DTYPE))
    numel = tl.load(row + 1)
    inv = tl.load(inv_ptr)
    # fp32 however the launch typed it (Triton's own launch: fp32; Inductor's wrapper: fp64, which would compare in
    # fp64 against the bf16 bound 3.3961775292304957e38, just above fp32's 0x7F7F8000, a value that rounds to inf).
    overflow_at = tl.full((), overflow_at, tl.float32)
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        m = offs < numel
        if IS_BF16:
            raw = tl.load(p + offs, mask=m, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
            v = (raw << 16).to(tl.float32, bitcast=True) * inv
        else:
            v = tl.load(p + offs, mask=m, other=0.0).to(tl.float32) * inv
        # Non-finite once stored: inf/NaN, or beyond the dtype's range (the comparison is False for NaN).
        bad = bad | ((~(tl.abs(v) < overflow_at)) & m).to(tl.int32)
        if NORM:
            sq += v * v
        # inv_scale == 1 cannot change a value: then the pass only reads (inf/NaN probe, clipping norm).
        if inv != 1.0:
            if IS_BF16:
                tl.store(p + offs, f32_to_bf16_bits(v).to(tl.uint16).to(tl.int16, bitcast=True), mask=m)
            else:
                tl.store(p + offs, v.to(DTYPE), mask=m)
    tl.store(found_ptr, 1.0, mask=tl.max(bad, axis=0) > 0)
    if NORM:
        tl.store(partial_ptr + pid, tl.sum(sq, axis=0))


def launch_unscale(groups, inv_scale, found_inf, return_norm, wrap=lambda k: k):
    """groups: {dtype: [dense tensors]} (all on inv_scale's device). Returns the norm (0-dim fp32) or None."""
    device = inv_scale.device
    partials = []
    for dtype, ts in groups.items():
        rows, prog_map, n_programs = get_tables([ts], device, CHUNK, "unscale_")
        if n_programs == 0:
            continue
        part = torch.empty(n_programs if return_norm else 1, dtype=torch.float32, device=device)
        wrap(_unscale_kernel)[(n_programs,)](
            rows, prog_map, inv_scale, found_inf, part, OVERFLOW_AT[dtype], DTYPE=_TL_DTYPE[dtype],
            IS_BF16=dtype == torch.bfloat16, NORM=bool(return_norm), CHUNK=CHUNK, BLOCK=2048, num_warps=8,
        )
        if return_norm:
            partials.append(part)
    if not return_norm:
        return None
    if not partials:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.cat(partials).double().sum().sqrt().float()
