"""Loading of the compiled extension `mixprec_ops._C` (C++ CPU and CUDA kernels, TORCH_LIBRARY schemas).

Importing mixprec_ops never fails because the extension is missing or broken: the reason is kept in
`LOAD_ERROR`, reported once by a warning, and shown by `mixprec_ops.backends.report()`.
"""

from __future__ import annotations

import logging
import platform
import warnings

import torch

LOADED: bool = False
LOAD_ERROR: str | None = None
BUILD_INFO: dict = {}


def _build_info() -> dict:
    try:
        from . import _build_info as bi
    except ImportError:
        return {}
    return {k: getattr(bi, k) for k in ("TORCH_VERSION", "TORCH_CUDA", "WITH_CUDA", "CUDA_ARCHS")}


def _load() -> None:
    global LOADED, LOAD_ERROR, BUILD_INFO
    BUILD_INFO = _build_info()
    built = BUILD_INFO.get("TORCH_VERSION")
    running = torch.__version__
    if built and built.split("+")[0] != running.split("+")[0]:
        LOAD_ERROR = (
            f"the extension was built against torch {built} but torch {running} is installed; C++ ABIs differ "
            f"between torch releases: rebuild mixprec_ops (pip install --no-build-isolation .) or install torch {built}"
        )
        return
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        LOAD_ERROR = "this CPU lacks AVX2, which the extension's CPU kernels are compiled for"
        return
    try:
        from . import _C  # noqa: F401  (registers torch.ops.mixprec.*)
    except ImportError as e:  # missing file, or undefined symbols from a torch mismatch
        LOAD_ERROR = f"could not load mixprec_ops._C: {e}"
        if "undefined symbol" in str(e):
            LOAD_ERROR += f" (built against torch {built or '?'}, running torch {running})"
        return
    LOADED = True


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.mixprec.<op> has a kernel registered for `dispatch_key` ("CPU" or "CUDA"); False when the
    loaded extension does not define the op at all."""
    if not LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"mixprec::{op}", dispatch_key)
    except RuntimeError:  # "operator mixprec::<op> does not exist"
        return False


_load()
if LOAD_ERROR is not None:
    try:
        warnings.warn(f"mixprec_ops: C++/CUDA kernels unavailable: {LOAD_ERROR}", RuntimeWarning, stacklevel=2)
    except RuntimeWarning:  # warnings turned into errors (-W error, pytest's filterwarnings): the import still works
        logging.getLogger("mixprec_ops").warning("C++/CUDA kernels unavailable: %s", LOAD_ERROR)
