"""Argument validation shared by the public ops. Every error names the argument. Checks run before any tensor is
touched, so a rejected call leaves all tensors unchanged. The C++ kernels repeat the essential checks (a direct
torch.ops.mixprec.* call gets the same messages)."""

from __future__ import annotations

from operator import attrgetter

import torch

class ValueAndRuntimeError(ValueError, RuntimeError):
    """A ValueError where the torch op we replace raises RuntimeError for the same bad argument (torch.nn.functional
    .linear's shape checks): handlers written for either catch it."""


class TypeAndRuntimeError(TypeError, RuntimeError):
    """A TypeError where the torch op we replace raises RuntimeError (linear's dtype mismatch)."""


FLOAT_SOURCES = (torch.float32, torch.float16, torch.bfloat16)
CAST_TARGETS = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def float_tensor(x, name: str) -> None:
    tensor(x, name)
    if x.dtype not in FLOAT_SOURCES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense strided tensor, got layout {x.layout}")


def device_scalar(t, name: str, device: torch.device, *, allow_none: bool = False, contiguous: bool = False) -> None:
    """A 1-element float32 tensor on `device` (scale, inv_scale, amax, found_inf)."""
    if t is None and allow_none:
        return
    tensor(t, name)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 tensor, got {t.dtype}")
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly 1 element, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the data's device), got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def cast_target(dtype, name: str = "dtype") -> None:
    if dtype not in CAST_TARGETS:
        raise TypeError(f"{name} must be one of float16, bfloat16, float8_e4m3fn, float8_e5m2, got {dtype}")


def boolean(v, name: str) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


# Exactly these types are plain tensors with memory of their own (not FakeTensor, DTensor or another subclass)
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def only_device_modes() -> bool:
    """Whether every active torch function mode is a default-device context (torch.set_default_device, `with
    torch.device(...)`), which only picks where factory functions allocate: no reason to leave an eager route."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext

    return all(isinstance(m, DeviceContext) for m in _get_current_function_mode_stack())


def eager_unobserved() -> bool:
    """Plain eager execution that nothing needs to see an op in: not compiling or tracing, no dispatch mode, no
    function mode but a default-device one. The eager routes past an op's Python wrapper (linear's
    autograd.Function, plain_eager below) are taken only then."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
                or (torch._C._len_torch_function_stack() and not only_device_modes()))


def eager_untransformed() -> bool:
    """eager_unobserved() and no torch.func transform or forward-AD level (backends.transform_active: a transform's
    wrapped tensors are of type torch.Tensor too): where plain C++ ops may be called past their Python wrappers."""
    from .backends import transform_active

    return eager_unobserved() and not transform_active()


def walkable(t) -> bool:
    """t's elements fill one run of memory (non-overlapping and dense): the cached contiguity flag first (~0.07 us),
    the op call (~1.6 us; 3.2 ms of host time over 2,000 grads on the CI CPU) only for the others."""
    return t.is_contiguous() or torch.ops.aten.is_non_overlapping_and_dense(t)


PLAIN = frozenset(PLAIN_TYPES)


def plain_eager(tensor_lists, tensors) -> bool:
    """Whether nothing needs to see a custom op (a Triton op's Python wrapper, ~1 us a mutated tensor for its
    version bumps alone): eager_untransformed(), plain tensors only (lists of tensors, and single tensors or None),
    and no autograd to record (grad mode off, or nothing requiring grad). The caller then runs the op's body and
    bumps the versions of what it mutates itself (torch._C._increment_version takes a list: one C++ call)."""
    if not eager_untransformed():
        return False
    ts = [t for t in tensors if t is not None]
    if not set(map(type, ts)) <= PLAIN or not all(set(map(type, lst)) <= PLAIN for lst in tensor_lists):
        return False
    if torch.is_grad_enabled():
        return not any(map(requires_grad, ts)) and not any(any(map(requires_grad, lst)) for lst in tensor_lists)
    return True


requires_grad = attrgetter("requires_grad")  # (map over it: a sweep in C; eager-only code, Dynamo cannot trace it)


def _byte_span(t):
    """[first byte, one past the last byte] of t's elements."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def disjoint(a, name_a: str, b, name_b: str) -> None:
    """a and b must not overlap in memory (a written while b is read). Only for plain tensors with memory: not for
    meta tensors, tensor subclasses (FakeTensor, DTensor, ...) or while torch.compile traces."""
    if (torch.compiler.is_compiling() or type(a) not in PLAIN_TYPES or type(b) not in PLAIN_TYPES or a.is_meta
            or b.is_meta or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()):
        return
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{name_a} must not share memory with {name_b} ({name_a} is written while {name_b} is read)")

