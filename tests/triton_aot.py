"""Compile every Triton kernel of mixprec_ops ahead of time, for real NVIDIA targets, on a machine without a GPU.

CI runs the kernels only under Triton's interpreter (TRITON_INTERPRET=1), which never builds the code a GPU runs:
branches the interpreter does not take (NATIVE_FP8's hardware conversion, the TMA kernel's descriptors on sm_90),
Triton API drift and type errors in compiled-only code would otherwise surface only in a rare GPU session. Triton's
compiler needs no GPU to go from a kernel to PTX and, through the ptxas it ships, to a cubin: this module does that
for every kernel, every constexpr variant the launchers produce, on sm_80 and sm_90.

How a variant is obtained: each case calls the kernel's real launcher (launch_cast_and_scale, launch_unscale,
launch_adam_step, launch_matmul) with small CPU tensors while the kernel object in its module is replaced by a
recorder, so the arguments and constexprs are whatever the launcher computes, not a hand-copied list. The launchers'
device queries are answered for the target (compute capability, SM count; the tensors report is_cuda). The recorded
call is then bound and specialised by Triton's own launch code (the binder and _pack_args that JITFunction.run uses:
signature types, tt.divisibility attributes, int arguments equal to 1 turned constant, tensor-descriptor types) and
compiled with triton.compile for GPUTarget("cuda", cap, 32). Only the case tables below (_cast_cases ...
_matmul_cases) are hand-written: what to ask each launcher for (dtypes, flags; the matmul configs come from
matmul's own tables), chosen so that every value of every constexpr occurs at least once and the combinations the
launchers branch on all occur (tests/test_triton_compile.py checks the values that were compiled).

Run as a script (needs TRITON_INTERPRET unset, and the package importable: `python -P tests/triton_aot.py` from a
directory other than the repo root, so that the installed mixprec_ops is used); prints (or writes, --out) JSON:
{"triton", "torch", "package", "package_file", "has_tma", "seconds", "kernels_without_cases", "records": [one per
compile: kernel, variant, target, ok, error, seconds, constexprs, ptx (counts of the PTX_WATCH instructions),
ttir (counts of the TTIR_WATCH patterns), shared (bytes), res ({regs, stack} from cuobjdump -res-usage, or None),
and for matmul config and default]}; exit status 1 if anything failed. Triton's disk cache is pointed at a fresh
temporary directory, so every kernel is really compiled. tests/test_triton_compile.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

# tests/cuobjdump.py, also when run as `python -P tests/triton_aot.py` (-P keeps the script's directory off sys.path;
# only the repo root must stay off it, so that the installed mixprec_ops is the one imported)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuobjdump import find_cuobjdump  # noqa: E402
from typing import Callable

TARGETS = (80, 90)
# SMs of the GPU behind each target (A100, H200): matmul's persistent kernel takes the count as a constexpr.
NUM_SMS = {80: 108, 90: 132}
# PTX instructions whose presence the tests check (counted in every compile's PTX).
PTX_WATCH = {
    "cvt_e4m3x2": "cvt.rn.satfinite.e4m3x2.f32",  # NATIVE_FP8 e4m3 on sm_90
    "cvt_e5m2x2": "cvt.rn.satfinite.e5m2x2.f32",  # NATIVE_FP8 e5m2 on sm_90
    "tma_load": "cp.async.bulk.tensor",  # TMA tile loads (the persistent matmul on sm_90)
    "wgmma": "wgmma.mma_async",  # Hopper tensor cores
    "mma_sync": "mma.sync.aligned",  # Ampere-style tensor cores
    "fma_f32": "fma.rn.f32",  # contracted multiply-adds (Adam must have none: enable_fp_fusion=False)
    "div_rn_f32": "div.rn.f32",
    "sqrt_rn_f32": "sqrt.rn.f32",
    "max_nan_f32": "max.NaN.f32",  # NaN-propagating maximum (matmul's relu, as torch.relu)
}
# Patterns whose matches the tests count in every compile's Triton IR (TTIR: before any lowering).
TTIR_WATCH = {
    # a 2-D tile of pointers offset by 32-bit values: an i32 product of a stride there can wrap (matmul's tiles
    # must all be offset in 64 bits)
    "addptr_2d_i32": r"tt\.addptr [^\n]*: tensor<\d+x\d+x!tt\.ptr<[^>]*>>, tensor<\d+x\d+xi32>",
    # float arithmetic, comparisons and selects in fp64 (scalar or tensor): an fp64 argument leaking into fp32 math
    "f64_math": r"arith\.(?:addf|subf|mulf|divf|cmpf|select)\b[^\n]*[x ]f64\b",
}


def float_negations(ttir: str) -> int:
    """Float negations in a TTIR: arith.negf (Triton 3.8's unary minus) and subtractions from a +0.0 constant (Triton
    3.6's, which gives +0.0 for -(+0.0)): the bit-exact kernels negate as x * -1.0 instead."""
    zeros = set(re.findall(r"(%[\w.#]+) = arith\.constant (?:dense<)?0\.0+e\+00\b", ttir))
    from_zero = [a for a in re.findall(r"arith\.subf (%[\w.#]+), ", ttir) if a in zeros]
    return ttir.count("arith.negf") + len(from_zero)


# ------------------------------------------------------------------------------------------------ the cases
@dataclass(frozen=True)
class Case:
    """One compile: ask `module`'s launcher for something (call(mod, T) launches once; T makes tensors) and
    compile what it launched of `kernel` for sm_`cap`. `patches`: module globals set for this case only (a rule
    of another torch or Triton release than the installed one). `info`: (key, value) pairs copied into the record
    for the tests (e.g. the matmul config and whether it is a candidate set's default)."""

    module: str
    kernel: str
    variant: str
    cap: int
    call: Callable = field(compare=False)
    patches: tuple = ()
    info: tuple = ()
    floats: str = "fp32"  # the type of the Python float arguments; "fp64" as Inductor types them (see below)


def _cast_cases():
    # (label, x dtype, y dtype, scale tensor?, amax?, saturate, numel): every output kind saturated and not (on
    # sm_90 the saturated fp8 ones take NATIVE_FP8), each input dtype (bf16: SRC_BF16), with and without a scale
    # tensor and amax, numel a multiple of 16 and not (divisibility specialisation of n).
    rows = [
        ("fp32->fp16 scale amax sat", "float32", "float16", True, True, True, 4096),
        ("fp16->fp16", "float16", "float16", False, False, False, 1000),
        ("bf16->bf16 amax sat", "bfloat16", "bfloat16", False, True, True, 4099),
        ("fp32->bf16 scale", "float32", "bfloat16", True, False, False, 8192),
        ("fp16->e4m3 scale amax sat", "float16", "float8_e4m3fn", True, True, True, 4096),
        ("fp32->e4m3 amax", "float32", "float8_e4m3fn", False, True, False, 1000),
        ("bf16->e5m2 scale amax sat", "bfloat16", "float8_e5m2", True, True, True, 4096),
        ("fp32->e5m2", "float32", "float8_e5m2", False, False, False, 777),
    ]

    def call(x_dt, y_dt, scale, amax, sat, n, scale_value=2.0):
        def go(mod, T):
            x = T((n,), x_dt)
            mod.launch_cast_and_scale(x, T((n,), y_dt), T((), "float32") if scale else None, scale_value,
                                      T((), "float32") if amax else None, sat)
        return go

    for cap in TARGETS:
        for label, *args in rows:
            yield Case("cast_and_scale", "_cast_and_scale_kernel", label, cap, call(*args))
        # OVERFLOW_NAN follows the installed torch (NaN before 2.12, saturation after): compile the other rule too,
        # since CI's torch and the GPU machine's differ.
        yield Case("cast_and_scale", "_cast_and_scale_kernel", "fp32->e4m3 amax (other torch's overflow rule)", cap,
                   call("float32", "float8_e4m3fn", False, True, False, 1000), (("E4M3_OVERFLOW_NAN", "flip"),))
        # A Python scale that fp32 holds only as a subnormal (the interpreter passes it as fp64; compiled: fp32)
        yield Case("cast_and_scale", "_cast_and_scale_kernel", "fp32->bf16 subnormal python scale", cap,
                   call("float32", "bfloat16", False, False, True, 1000, 1e-40))
        # The op launches through wrap_triton, so under torch.compile Inductor's wrapper launches it, typing every
        # Python float argument fp64 (torch's inductor config _use_fp64_for_unbacked_floats, torch 2.11 and 2.14):
        # each row again so. (The H200 of 2026-11-30 failed to compile the fp8 rows so: "Cannot bitcast data-type
        # of size 64 to data-type of size 32".)
        for label, *args in rows:
            yield Case("cast_and_scale", "_cast_and_scale_kernel", f"{label} (floats fp64: Inductor)", cap,
                       call(*args), floats="fp64")


def _cast_backward_cases():
    # (label, grad dtype, x dtype, target, scale tensor?, saturate): every grad kind (G_KIND 0-4) and x kind, with
    # and without the saturation mask (KEEP_INF: 16-bit targets) and a scale tensor.
    rows = [
        ("bf16 grad, fp32 x, ->bf16 scale sat", "bfloat16", "float32", "bfloat16", True, True),
        ("e4m3 grad, bf16 x, ->e4m3 scale sat", "float8_e4m3fn", "bfloat16", "float8_e4m3fn", True, True),
        ("e5m2 grad, fp16 x, ->e5m2", "float8_e5m2", "float16", "float8_e5m2", False, False),
        ("fp16 grad, bf16 x, ->fp16 sat", "float16", "bfloat16", "float16", False, True),
        ("fp32 grad, fp16 x, ->bf16 scale", "float32", "float16", "bfloat16", True, False),
    ]

    def call(g_dt, x_dt, target, scale, sat, n=4099):
        def go(mod, T):
            x = T((n,), x_dt)
            mod.launch_cast_and_scale_backward(T((n,), g_dt), x, T((n,), x_dt), getattr(_torch(), target),
                                               T((), "float32") if scale else None, 2.0, sat)
        return go

    for cap in TARGETS:
        for label, *args in rows:
            yield Case("cast_and_scale", "_cast_and_scale_backward_kernel", label, cap, call(*args))
            # launched through wrap_triton too: Inductor's fp64 floats (see _cast_cases)
            yield Case("cast_and_scale", "_cast_and_scale_backward_kernel", f"{label} (floats fp64: Inductor)", cap,
                       call(*args), floats="fp64")


def _unscale_cases():
    def call(dt, norm):
        def go(mod, T):
            inv = T((), "float32")
            inv.fill_(0.5)  # != 1: the store branch is live (it is a runtime test, compiled either way)
            mod.launch_unscale({getattr(_torch(), dt): [T((3000,), dt), T((70000,), dt)]}, inv, T((), "float32"),
                               norm)
        return go

    for cap, dt, norm in itertools.product(TARGETS, ("float32", "float16", "bfloat16"), (False, True)):
        yield Case("unscale", "_unscale_kernel", f"{dt}{' norm' if norm else ''}", cap, call(dt, norm))
        # its launcher takes `wrap` (torch.library.wrap_triton): Inductor's fp64 floats (see _cast_cases)
        yield Case("unscale", "_unscale_kernel", f"{dt}{' norm' if norm else ''} (floats fp64: Inductor)", cap,
                   call(dt, norm), floats="fp64")


def _adam_cases():
    # (label, param, grad, state dtypes, amsgrad, masters, weight_decay, decoupled, maximize, grad_scale,
    # found_inf, clip): each storage kind in each role, each flag on and off.
    rows = [
        ("fp32 Adam", "float32", "float32", "float32", False, False, 0.0, False, False, False, False, False),
        ("bf16 AdamW masters amsgrad scaler", "bfloat16", "bfloat16", "float32", True, True, 0.01, True, False, True,
         True, False),
        ("fp16 params fp32 grads fp16 states masters L2 maximize clip", "float16", "float32", "float16", False, True,
         0.01, False, True, False, False, True),
        ("bf16 params fp16 grads bf16 states amsgrad AdamW all flags", "bfloat16", "float16", "bfloat16", True, False,
         0.1, True, True, True, True, True),
    ]

    def call(p, g, s, ams, master, wd, dec, maxi, gs, fi, clip):
        def go(mod, T):
            shapes = ((1000,), (70000,))
            lst = lambda dt: [T(sh, dt) for sh in shapes]
            scalar = lambda: T((), "float32")
            mod.launch_adam_step(lst(p), lst(g), lst(s), lst(s), lst(s) if ams else [],
                                 lst("float32") if master else [], T((len(shapes), 3), "float32"), 0.9, 0.999, 1e-8,
                                 wd, dec, maxi, scalar() if gs else None, scalar() if fi else None,
                                 scalar() if clip else None)
        return go

    for cap in TARGETS:
        for label, *args in rows:
            yield Case("adam", "_adam_kernel", label, cap, call(*args))


def _matmul_cases(mm):
    """Every KernelConfig the launcher can pick (read from matmul's own config tables) on each target where it is
    offered (TMA: sm_90 only), with the epilogue constexprs cycling so that each value occurs: activation, bias
    (in the operand dtype and fp32), pre-activation store, output dtype, operand dtype, operand layouts."""
    tiled = list(dict.fromkeys(mm._SMALL_M_CONFIGS + mm._LARGE_CONFIGS + mm._MID_M_CONFIGS))
    acts = list(mm.ACTIVATIONS)
    outs = ("float16", "bfloat16", "float32")
    abs_ = ("float16", "bfloat16")

    def call(cfg, ab, out, act, bias, pre, a_col, b_col, m):
        """Launch C (m x 384) = A (m x 320) @ B with A, B row- or column-major."""

        def go(mod, T):
            k, n = 320, 384
            a = T((k, m), ab).t() if a_col else T((m, k), ab)
            b = T((n, k), ab).t() if b_col else T((k, n), ab)
            c = T((m, n), out)
            bias_t = T((n,), ab if bias == "ab" else "float32") if bias else None
            mod.launch_matmul(a, b, c, bias_t, act, pre=T((m, n), out) if pre else None, config=cfg)
        return go

    def label(cfg, ab, out, act, bias, pre, a_col, b_col, m):
        return (f"{cfg.label} {ab}->{out} act={act or 'none'} bias={bias or 'none'} pre={int(pre)} "
                f"A={'col' if a_col else 'row'} B={'col' if b_col else 'row'} M={m}")

    defaults = {mm._SMALL_M_CONFIGS[0], mm._LARGE_CONFIGS[0]}  # launched untuned (graph capture, autotune off)

    def case(cfg, cap, args, suffix="", patches=(), kernel=None):
        kernel = kernel or ("_matmul_tma_kernel" if cfg.variant == mm.TMA else "_matmul_kernel")
        info = (("config", cfg.label), ("default", cfg in defaults))
        return Case("matmul", kernel, label(cfg, *args) + suffix, cap, call(cfg, *args), patches, info)

    # A split-K launch is two kernels: each case compiles one, the other only recorded (a sink in its place).
    split_cfgs = list(dict.fromkeys(mm._SMALL_M_SPLIT_CONFIGS + mm._MID_M_SPLIT_CONFIGS))
    splitk, split_sum = "_matmul_splitk_kernel", "_matmul_splitk_sum_kernel"

    for cap in TARGETS:
        cfgs = tiled + (list(mm._TMA_CONFIGS) if cap >= 90 and mm.HAS_TMA else [])
        n_tma = 0
        for i, cfg in enumerate(cfgs):
            # A and B row- or column-major (a transposed view: the weight gradient's A, nn.Linear's B), cycled;
            # for TMA the A_KM x B_NK constexprs, where (col, col) gets an extra compile below.
            if cfg.variant == mm.TMA:
                a_col, b_col = divmod(n_tma % 4, 2)
                act = acts[(n_tma + 2) % len(acts)]  # the TMA set's own cycle (the extra cases below add the rest)
                n_tma += 1
            else:
                a_col, b_col = divmod(i % 4, 2)
                act = acts[i % len(acts)]
            args = (abs_[i % 2], outs[i % 3], act, (None, "ab", "fp32")[i % 3], i % 4 == 3,
                    bool(a_col), bool(b_col), 264 if i % 2 else 256)
            yield case(cfg, cap, args)
            if cfg.variant == mm.TMA:
                # The persistent kernel's shared memory grows with the output dtype (the epilogue's layout
                # conversion goes through it and, the loop being flattened, cannot reuse the pipeline's buffers;
                # the tiled kernel's does): compile each config with a 16-bit and an fp32 output, since
                # candidates() offers it per output size (test_shared_memory_fits checks both against the bound).
                if args[1] != "float32":
                    yield case(cfg, cap, ("float16", "float32", None, None, False, False, False, 256),
                               " (fp32 epilogue)")
                else:
                    yield case(cfg, cap, ("bfloat16", "bfloat16", None, None, False, False, False, 256),
                               " (16-bit epilogue)")
        if cap >= 90 and mm.HAS_TMA:
            yield case(mm._TMA_CONFIGS[0], cap, ("bfloat16", "bfloat16", "relu", "fp32", True, True, True, 256))
        # The defaults run untuned (graph capture, autotune off), so their register use is checked with the
        # heaviest epilogue: erf-GELU, fp32 bias, the pre-activation stored, fp32 out.
        for cfg in sorted(defaults, key=lambda c: c.label):
            yield case(cfg, cap, ("bfloat16", "float32", "gelu", "fp32", True, False, False, 256),
                       " (heaviest epilogue)")
        # Split-K: the first pass of each config (its split count is a grid size, not compiled in), A and B layouts
        # cycled; the second pass (the epilogue, no tile config of its own) with the epilogue constexprs cycled.
        for i, cfg in enumerate(split_cfgs):
            a_col, b_col = divmod(i % 4, 2)
            yield case(cfg, cap, ("float16" if i % 2 else "bfloat16", "float32", None, None, False, bool(a_col),
                                  bool(b_col), 128), patches=((split_sum, _Recorder(None)),), kernel=splitk)
        for i, act in enumerate(acts):
            args = (abs_[i % 2], outs[i % 3], act, (None, "ab", "fp32")[i % 3], i % 2 == 1, False, True, 100)
            yield case(split_cfgs[0], cap, args, patches=((splitk, _Recorder(None)),), kernel=split_sum)
        # USE_ERF=False (the polynomial erf, for a Triton without tl.math.erf): not what 3.6/3.8 take, kept compiling.
        yield case(tiled[0], cap, ("float16", "float16", "gelu", None, False, False, False, 256),
                   " (no tl.math.erf)", (("HAS_ERF", False),))


def build_cases(pkg) -> list[Case]:
    """All cases; the matmul ones depend on the module's config tables and feature detection."""
    mm = importlib.import_module(f"{pkg}.matmul")
    # Matmul first: the slowest compiles, so that a pool of workers ends evenly.
    return [*_matmul_cases(mm), *_adam_cases(), *_cast_cases(), *_cast_backward_cases(), *_unscale_cases()]


# ------------------------------------------------------------------------------------ recording a launch
def _torch():
    import torch

    return torch


def _gpu_tensor_type():
    """A torch.Tensor subclass whose instances say is_cuda: CPU memory, so launchers run here, but their "is this
    on a GPU" checks (cast_and_scale's NATIVE_FP8 rule) take the GPU answer."""
    torch = _torch()

    class OnGpu(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    return OnGpu


class _Recorder:
    """Stands in for a @triton.jit kernel in its module: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _plain(v):
    """Arguments as a real launch passes them: plain tensors (the binder specialises on them), descriptors kept."""
    torch = _torch()
    return v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v


@contextlib.contextmanager
def _patched(mod, values: dict):
    saved = {name: getattr(mod, name) for name in values}
    try:
        for name, v in values.items():
            setattr(mod, name, v)
        yield
    finally:
        for name, v in saved.items():
            setattr(mod, name, v)


def record(pkg, case: Case):
    """(jit function, args, kwargs) of the one launch that `case`'s launcher call makes for sm_`case.cap`."""
    torch = _torch()
    mod = importlib.import_module(f"{pkg}.{case.module}")
    rec = _Recorder(getattr(mod, case.kernel))
    values = {case.kernel: rec}
    # The launchers' device queries, answered for the target (only those the module has).
    if hasattr(mod, "_capability"):
        values["_capability"] = lambda device: divmod(case.cap, 10)
    if hasattr(mod, "_num_sms"):
        values["_num_sms"] = lambda device: NUM_SMS[case.cap]
    for name, v in case.patches:
        values[name] = (not getattr(mod, name)) if v == "flip" else v
    gpu = _gpu_tensor_type()

    def T(shape, dtype):
        """Zeros of `dtype` (a torch dtype name) that report is_cuda."""
        return torch.zeros(shape, dtype=getattr(torch, dtype)).as_subclass(gpu)

    with _patched(mod, values):
        case.call(mod, T)
    if len(rec.calls) != 1:
        raise RuntimeError(f"the launcher made {len(rec.calls)} launches of {case.kernel}, expected 1")
    args, kwargs = rec.calls[0]
    return rec.fn, [_plain(a) for a in args], {k: _plain(v) for k, v in kwargs.items()}


# ---------------------------------------------------------------------------------------------- compiling
def specialise(fn, args, kwargs, cap, floats="fp32"):
    """What `fn[grid](*args, **kwargs)` hands to triton.compile on an sm_`cap` GPU: the same steps as
    JITFunction.run (Triton 3.6 and 3.8 alike), with the target given instead of asked of a driver.
    `floats`: the type given to Python float arguments (Triton's launch: fp32; Inductor's wrapper: fp64).
    Returns (ASTSource, target, options dict, {constexpr name: value})."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    names = list(signature)
    if floats != "fp32":
        values = bound_args.values() if isinstance(bound_args, dict) else bound_args
        for name, v in zip(names, values):
            if isinstance(v, float) and signature[name] == "fp32":
                signature[name] = floats
    shown = {names[path[0]]: _show(v) for path, v in constexprs.items() if len(path) == 1}
    return ASTSource(fn, signature, constexprs, attrs), target, options.__dict__, shown


def _show(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def _error_text(e: BaseException) -> str:
    """The exception and its causes: a CompilationError shows where in the kernel the failing call is, and its
    cause where in the called jit function, and why."""
    parts = []
    while e is not None and len(parts) < 5:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n-- caused by --\n".join(parts)


def resource_usage(cubin: bytes) -> dict | None:
    """Registers per thread and stack bytes (register spills: what ptxas could not keep in registers) of the one
    kernel in `cubin`, from `cuobjdump -res-usage`; None when no cuobjdump is at hand."""
    import subprocess

    tool = find_cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK line:\n{out[-500:]}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2))}


def _empty_record(case: Case, error: str | None = None) -> dict:
    return {"kernel": case.kernel, "variant": case.variant, "target": f"sm_{case.cap}", "ok": False, "error": error,
            "seconds": None, "constexprs": None, "ptx": None, "ttir": None, "shared": None, "res": None,
            "floats": case.floats, "float_args": None, **dict(case.info)}


def run_case(pkg, case: Case) -> dict:
    """One record: the case compiled (or the error that stopped it, recording or compiling)."""
    import triton

    rec = _empty_record(case)
    t0 = time.perf_counter()
    try:
        fn, args, kwargs = record(pkg, case)
        src, target, options, rec["constexprs"] = specialise(fn, args, kwargs, case.cap, case.floats)
        rec["float_args"] = {k: t for k, t in src.signature.items() if t in ("fp32", "fp64")}  # name: type
        compiled = triton.compile(src, target=target, options=options)
        ptx = compiled.asm["ptx"]
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced (ptxas did not run)")
        rec["ptx"] = {k: ptx.count(s) for k, s in PTX_WATCH.items()}
        rec["ttir"] = {k: len(re.findall(p, compiled.asm["ttir"])) for k, p in TTIR_WATCH.items()}
        rec["ttir"]["float_neg"] = float_negations(compiled.asm["ttir"])
        rec["shared"] = compiled.metadata.shared
        rec["res"] = resource_usage(compiled.asm["cubin"])
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001  (any failure is the finding; report it whole)
        rec["error"] = _error_text(e)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def kernels_without_cases(pkg, cases) -> list[str]:
    """The package's @triton.jit kernels (jit functions no other jit function of the package calls) that no case
    compiles: a new kernel must get cases here before it passes."""
    import pkgutil

    from triton.runtime.jit import JITFunction

    root = importlib.import_module(pkg)
    fns = {}
    for info in pkgutil.iter_modules(root.__path__):
        mod = importlib.import_module(f"{pkg}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__:
                fns[f"{info.name}.{name}"] = obj
    called = {q for q, f in fns.items() for g in fns.values()
              if g is not f and re.search(rf"\b{re.escape(f.__name__)}\(", g.src)}
    covered = {f"{c.module}.{c.kernel}" for c in cases}
    return sorted(set(fns) - called - covered)


_PKG = None
_CASES: list[Case] = []


def _worker_init():
    _torch().set_num_threads(1)  # the tensors are tiny; two workers share two cores


def _run_index(i):
    return run_case(_PKG, _CASES[i])


def _run_pool(jobs):
    """Every case's record, compiled by `jobs` forked workers (they inherit the imported modules and the case
    list; nothing has been compiled before the fork). A worker that dies (a crash inside Triton's compiler) fails
    the cases still running or queued, with a note, instead of hanging."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork"), initializer=_worker_init) as pool:
        futures = [pool.submit(_run_index, i) for i in range(len(_CASES))]
        records = []
        for i, fut in enumerate(futures):
            try:
                records.append(fut.result())
            except Exception as e:  # noqa: BLE001  (BrokenProcessPool)
                records.append(_empty_record(_CASES[i], f"{type(e).__name__}: {e} (a compiling process died while "
                                             "this or another case ran; rerun with --jobs 1 --only KERNEL to find "
                                             "which)"))
    return records


def _preflight():
    """specialise() leans on Triton's launch internals (knobs, create_function_from_signature, _pack_args; the same
    in 3.6 and 3.8). If a Triton release moves them, say so once instead of failing every case with a raw error."""
    import triton.runtime.jit as jit

    missing = [] if hasattr(jit, "create_function_from_signature") else ["create_function_from_signature"]
    if not hasattr(jit.JITFunction, "_pack_args"):
        missing.append("JITFunction._pack_args")
    try:
        from triton import knobs  # noqa: F401
    except ImportError:
        missing.append("triton.knobs")
    if missing:
        import triton

        raise SystemExit(f"Triton {triton.__version__} changed the launch internals tests/triton_aot.py uses "
                         f"({', '.join(missing)} missing): update specialise()")


def main(argv=None) -> int:
    global _PKG, _CASES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", default="mixprec_ops.triton_kernels", help="the triton_kernels package to import")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    ap.add_argument("--only", action="append", help="compile only this kernel (repeatable)")
    ap.add_argument("--out", help="write the JSON here instead of stdout")
    opts = ap.parse_args(argv)

    # Before triton is imported: compile for real (no interpreter) into a cache nobody has filled.
    os.environ.pop("TRITON_INTERPRET", None)
    cache = tempfile.mkdtemp(prefix="mixprec_triton_aot_")
    os.environ["TRITON_CACHE_DIR"] = cache
    t0 = time.perf_counter()
    try:
        import torch
        import triton

        _preflight()
        tk = importlib.import_module(opts.package)
        if getattr(tk, "INTERPRETED", False):
            raise SystemExit(f"{opts.package} was imported with the Triton interpreter on")
        all_cases = build_cases(opts.package)
        _PKG, _CASES = opts.package, [c for c in all_cases if not opts.only or c.kernel in opts.only]
        if opts.jobs > 1:
            records = _run_pool(opts.jobs)
        else:
            records = [_run_index(i) for i in range(len(_CASES))]
        doc = {"triton": triton.__version__, "torch": torch.__version__, "package": tk.__name__,
               "package_file": tk.__file__, "has_tma": bool(importlib.import_module(f"{opts.package}.matmul").HAS_TMA),
               "seconds": round(time.perf_counter() - t0, 1),
               "kernels_without_cases": kernels_without_cases(opts.package, all_cases), "records": records}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    text = json.dumps(doc, indent=1)
    if opts.out:
        with open(opts.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    return 0 if all(r["ok"] for r in records) and not doc["kernels_without_cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
