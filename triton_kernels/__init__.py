"""Triton kernels of mixprec_ops, installed as the subpackage `mixprec_ops.triton_kernels`.

Each module holds @triton.jit kernels and a small launcher that takes torch tensors. The op layer
(mixprec_ops/ops/*.py) registers the launchers as torch ops: through torch.library.triton_op where one kernel is
the op (cast_and_scale, matmul; on a GPU, custom_op under the interpreter), through torch.library.custom_op for
the multi-tensor ops (unscale_, adam_step_).

INTERPRETED is True when Triton's interpreter was on (TRITON_INTERPRET=1) as these kernels were defined: then
they run on CPU tensors, which the tests use on machines without a GPU.
"""

import contextlib
import functools
import os

import torch
import triton  # noqa: F401  (fail here, not later, when triton is unusable)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Ops whose kernels loop over a bound known only at run time: loaded from memory (the multi-tensor tables of
# adam_step_ and unscale_) or computed from a scalar argument (matmul's tl.cdiv(K, BLOCK_K)).
RUNTIME_LOOP_BOUND_OPS = frozenset({"adam_step_", "unscale_", "matmul"})


_LOOP_BOUND_ERROR = "0-dimensional arrays can be converted to Python scalars"  # NumPy's TypeError text


@functools.lru_cache(maxsize=1)
def _loop_bound_problem() -> str | None:
    """Why this interpreter cannot loop over a run-time bound, or None. Triton's interpreter holds scalars (loaded
    ones and scalar arguments) as 1-element arrays and, before Triton 3.7, made them loop bounds with int(array),
    which NumPy 2.4 rejects. Compiled kernels are not affected. Probed by running a tiny kernel, not by version
    numbers; only that exact TypeError gates (anything else is left for the real kernels to report), and the probe
    runs on a real CPU tensor even when called under a fake or meta mode."""
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        import triton.language as tl

        @triton.jit
        def _probe(p):
            s = 0
            for i in range(0, tl.load(p), 1):
                s += i
            tl.store(p, s)

        with _disable_current_modes(), torch.device("cpu"):
            t = torch.full((1,), 3, dtype=torch.int64, device="cpu")
            _probe[(1,)](t)
    except Exception as e:  # the TypeError arrives wrapped in triton's InterpreterError
        chain, cause = [], e
        while cause is not None and len(chain) < 8:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if any(_LOOP_BOUND_ERROR in str(c) for c in chain):
            return (f"Triton {triton.__version__}'s interpreter cannot run loops over run-time bounds with this "
                    f"NumPy (TypeError: only {_LOOP_BOUND_ERROR}); Triton >= 3.7 can, and compiled kernels are "
                    "not affected")
    return None


def interpreter_problem(op: str) -> str | None:
    """Why op's Triton kernel cannot run under this interpreter (None when it can, or when not interpreted)."""
    return _loop_bound_problem() if INTERPRETED and op in RUNTIME_LOOP_BOUND_OPS else None


@functools.lru_cache(maxsize=None)
def device_capability(device: torch.device) -> tuple[int, int]:
    """torch.cuda.get_device_capability, cached per device (asked on every launch that picks a code path by arch)."""
    return torch.cuda.get_device_capability(device)


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel), for launches from inside a torch.library.triton_op. Under the interpreter
    the kernel is an InterpretedFunction, which nothing can trace: torch >= 2.12 hands it back unchanged, torch 2.11
    raises ("wrap_triton only works on functions annotated with triton.jit"), so hand it back here."""
    return kernel if INTERPRETED else torch.library.wrap_triton(kernel)


def device_guard(device: torch.device):
    """torch.cuda.device(device) around a launch on a CUDA device: Triton launches on the CURRENT device and its
    current stream, whatever device the tensors are on (a cuda:1 tensor with cuda:0 current would be read from the
    wrong device). A no-op for other devices, and while torch.compile traces (its generated code sets the device
    itself, and the context manager is not for Dynamo to trace)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
