"""Which backend serves a call: the one module that decides.

Backends:
  "cuda"   - the CUDA kernels of the compiled extension (CUDA tensors)
  "triton" - the Triton kernels (CUDA tensors; CPU tensors only under the Triton interpreter, TRITON_INTERPRET=1)
  "cpu"    - the C++ CPU kernels of the compiled extension (CPU tensors)
  "torch"  - the pure-torch reference (any device; the test oracle and the universal fallback)
  "auto"   - the fastest available for the tensors' device; falls back with one warning per (op, device type)

The per-call `backend=` argument wins over the environment variable MIXPREC_BACKEND, which wins over "auto".
An explicit request for a backend that cannot serve the call raises ValueError with the reason.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import warnings
from functools import lru_cache

import torch
from torch.autograd import forward_ad

from . import _ext

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

# "auto" preference per device type; the Triton interpreter is never chosen automatically (it is slow).
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
# Per op: the backends that implement it (besides "torch"), and its "auto" order per device type.
_OPS: dict[str, dict] = {}
_warned: set[tuple[str, str]] = set()


def register_op(name: str, backends: tuple[str, ...], prefer: dict[str, tuple[str, ...]] | None = None) -> None:
    """Declare that op `name` is implemented by `backends` (a subset of "cuda", "triton", "cpu"; "torch" always
    serves). `prefer` overrides the "auto" order per device type, e.g. {"cuda": ("triton", "cuda")}."""
    order = {d: tuple(b for b in o if b in backends) for d, o in {**_AUTO_ORDER, **(prefer or {})}.items()}
    _OPS[name] = {"backends": tuple(backends), "auto": order}


@lru_cache(maxsize=1)
def _triton_status() -> tuple[bool, bool, str | None]:
    """(importable, interpreted, reason-if-not-importable)."""
    try:
        from . import triton_kernels
    except Exception as e:  # ImportError, or triton failing to initialise
        return False, False, f"triton is not importable ({type(e).__name__}: {e})"
    return True, triton_kernels.INTERPRETED, None


@lru_cache(maxsize=None)
def _extension_reason(op: str, backend: str) -> str | None:
    """Why the compiled extension cannot serve `op` with `backend` ("cuda"/"cpu"), or None. Fixed for the life of
    the process (the extension registers its kernels when it loads), so it is looked up once, not on every call."""
    if _ext.LOAD_ERROR is not None:
        return f"the compiled extension is unavailable: {_ext.LOAD_ERROR}"
    if not _ext.has_kernel(op, backend.upper()):
        why = "built without CUDA" if backend == "cuda" else "no CPU kernel registered"
        return f"the compiled extension has no {backend} kernel for {op} ({why}; {_ext.BUILD_INFO})"
    if backend == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """None if `backend` can serve `op` on `device`, else why not."""
    dev = device.type
    if backend == "torch":
        return None
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}")
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    if backend not in _OPS[op]["backends"]:
        return f"{op} has no {backend!r} implementation"
    if backend in ("cuda", "cpu") and backend != dev:
        return f"backend {backend!r} serves {backend} tensors only, got tensors on {device}"
    if dev not in ("cpu", "cuda"):
        return f"no {backend!r} kernels for {dev} tensors"
    if backend in ("cuda", "cpu"):
        return _extension_reason(op, backend)
    if backend == "triton":
        ok, interpreted, why = _triton_status()
        if not ok:
            return why
        if dev == "cpu" and not interpreted:
            return "Triton runs CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before importing)"
        if interpreted:  # CPU tensors, or CUDA tensors copied through the interpreter: the same limits
            from . import triton_kernels

            return triton_kernels.interpreter_problem(op)
        return None
    raise AssertionError("unreachable")


def transform_active() -> bool:
    """Inside a torch.func transform (grad, vjp, jvp, vmap, jacfwd, ...) or a forward-mode AD level, where the
    fused ops' custom autograd has no vmap or jvp rule (torch.func.jvp returned zero tangents through it): the
    public ops then run their pure-torch reference, the same numerics in plain torch ops, which every transform
    and derivative order supports. False while torch.compile traces (Dynamo runs the transforms its own way)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def requested(backend: str | None) -> str:
    b = backend if backend is not None else os.environ.get("MIXPREC_BACKEND", "auto")
    if not isinstance(b, str) or b not in BACKENDS:
        src = "backend" if backend is not None else "MIXPREC_BACKEND"
        raise ValueError(f"{src} must be one of {BACKENDS}, got {b!r}")
    return b


def constant_for_compile(fn):
    """torch.compiler.assume_constant_result(fn), without importing torch._dynamo (and with it triton) at
    `import mixprec_ops` (about 1 s on a CPU machine): the same marker, which Dynamo reads (torch 2.11 to 2.14).
    For the ops' backend selection (`selector`), which registers an op's Triton version on first use: torch.compile
    must call it, not trace it; tests/test_matmul.py, tests/test_cast_and_scale.py and tests/test_adam.py compile a
    first call through it."""
    fn._dynamo_marked_constant = True
    return fn


_PREPARE_LOCK = threading.RLock()


def selector(op: str, prepare_triton):
    """The per-op selection function the ops call: `fn(device, backend) -> backend name`, which runs
    `prepare_triton()` (the op's Triton registration on first use) when it picks Triton.

    Marked as a constant for torch.compile (constant_for_compile), which calls it instead of tracing it: neither an
    op's registration (Dynamo refuses to trace torch.library: "should not be traced (MOD_SKIPLIST torch/_library)")
    nor the interpreter probe behind the Triton backend's availability can be traced, and a program's first call of
    an op may well be inside a compiled function (a compiled model's first matmul, a compiled optimizer step). The
    choice (and MIXPREC_BACKEND, read here) is then fixed in the compiled code, as any Python-level decision taken
    while tracing. One function per op (a closure), so that Dynamo's constant call sees only constant arguments."""

    @constant_for_compile
    def select_backend(device: torch.device, backend: str | None = None) -> str:
        b = select(op, device, backend)
        if b == "triton":
            with _PREPARE_LOCK:  # first calls from several threads at once (nn.DataParallel): one registration
                prepare_triton()
        return b

    select_backend.__qualname__ = select_backend.__name__ = f"select_backend_{op}"
    return select_backend


def select(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that serves `op` for tensors on `device`."""
    b = requested(backend)
    if b != "auto":
        why = unavailable_reason(op, b, device)
        if why is not None:
            raise ValueError(f"mixprec_ops.{op}: backend {b!r} is unavailable: {why}")
        return b
    cand, reasons = _auto(op, device)
    if reasons and (op, device.type) not in _warned:
        _warned.add((op, device.type))
        warnings.warn(f"mixprec_ops.{op} on {device.type}: using backend {cand!r} because " + "; ".join(reasons),
                      RuntimeWarning, stacklevel=_caller_level())
    return cand


def _auto(op: str, device: torch.device) -> tuple[str, list[str]]:
    """"auto"'s choice for `op` on `device`, and why each preferred backend before it was passed over. The Triton
    interpreter (TRITON_INTERPRET=1) serves explicit requests only, also for CUDA tensors."""
    reasons = []
    for cand in _OPS[op]["auto"].get(device.type, ()) + ("torch",):
        why = unavailable_reason(op, cand, device)
        if why is None and cand == "triton" and _triton_status()[1]:
            why = "the Triton interpreter (TRITON_INTERPRET=1) is never chosen automatically"
        if why is None:
            return cand, reasons
        reasons.append(f"{cand!r}: {why}")
    raise AssertionError("unreachable: 'torch' always serves")


# Frames skipped when a warning names its caller: this package's, and torch's (its no_grad decorator around an
# optimizer step, its custom-op machinery around linear)
_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], torch))


def _caller_level() -> int:
    """warnings.warn's stacklevel for the first frame outside this package and torch, so that a warning names the
    user's line whichever op, optimizer, scaler or module led to it."""
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_INTERNAL_DIRS):
        f, level = f.f_back, level + 1
    return level


def report() -> dict:
    """For each op and device type: which backends serve it ("ok") and why the others don't; plus build facts."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ops = {}
    for op in sorted(_OPS):
        ops[op] = {}
        for d in devices:
            ops[op][d.type] = {
                b: (unavailable_reason(op, b, d) or "ok") for b in ("cuda", "triton", "cpu", "torch")
            }
            ops[op][d.type]["auto"] = _auto(op, d)[0]
        if not torch.cuda.is_available():  # the same shape as a visible device's entry
            ops[op]["cuda"] = {b: "no CUDA device visible" for b in ("cuda", "triton", "cpu", "torch", "auto")}
    return {
        "extension": "loaded" if _ext.LOADED else f"unavailable: {_ext.LOAD_ERROR}",
        "build": dict(_ext.BUILD_INFO),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cpu_isa": cpu_vector_isa(),
        "ops": ops,
    }


def cpu_vector_isa() -> str | None:
    """The widest vector code the C++ CPU kernels run on this machine, decided as the extension decides
    (csrc/cpu/cpu_isa.cpp, avx512_enabled): "avx512" when torch's own CPU capability is AVX512 (the CPU has AVX-512
    F/BW/VL/DQ and ATEN_CPU_CAPABILITY does not lower it) and the environment variable MIXPREC_CPU_ISA is not "avx2":
    cast_and_scale (forward and backward), and unscale_ on 16-bit tensors, then run AVX-512 code, every other
    kernel its AVX2 code. Else "avx2" on x86-64 (the extension's default build), "native" on other machines, None
    without the extension. The variable is read at every call, on both sides."""
    if not _ext.LOADED:
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        return "native"
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512") and os.environ.get("MIXPREC_CPU_ISA") != "avx2":
        return "avx512"
    return "avx2"


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__
