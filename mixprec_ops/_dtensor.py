"""DTensor (FSDP2, tensor parallelism) support shared by the optimizer's modules and linear."""

from __future__ import annotations

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


def local(t):
    """The local shard of a DTensor (FSDP2 params, grads and states), else t itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def any_dtensor(tensors) -> bool:
    """Whether any of `tensors` is a DTensor (False where torch has no distributed)."""
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)
