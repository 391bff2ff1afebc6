"""A drop-in torch.amp.GradScaler whose unscale step is mixprec_ops.unscale_: one fused multi-tensor pass per
device that handles float32, float16 AND bfloat16 grads (torch's own kernel rejects bf16 on some devices)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.amp.grad_scaler import _MultiDeviceReplicator

from .._checks import FLOAT_SOURCES
from ..ops.unscale import unscale_


class GradScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler with a fused unscale for every grad dtype.

    Same constructor (device="cuda", init_scale=2**16, growth_factor=2.0, backoff_factor=0.5,
    growth_interval=2000, enabled=True), methods (scale, unscale_, step, update, get_scale, state_dict,
    load_state_dict, ...) and state_dict keys as torch.amp.GradScaler; a state_dict of either loads into the
    other. Adds no host synchronisation beyond torch's (unscale_ reads inv_scale on the device).

    Extra keyword: backend ("auto", "cuda", "triton", "cpu", "torch") for the unscale kernel.
    """

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True, *,
                 backend: str | None = None) -> None:
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor,
                         backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled)
        self._backend = backend

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        per_device_inv_scale = _MultiDeviceReplicator(inv_scale)
        per_device_found_inf = _MultiDeviceReplicator(found_inf)
        ours: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        others: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)  # e.g. float64
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    if (not allow_fp16) and param.grad.dtype == torch.float16:
                        raise ValueError("Attempting to unscale FP16 gradients.")
                    if param.grad.is_sparse:
                        # Coalesce first (duplicate indices are summed), as torch does, then unscale the values.
                        if param.grad.dtype is torch.float16:
                            param.grad = param.grad.coalesce()
                        g = param.grad._values()
                    else:
                        g = param.grad
                    if g.dtype in FLOAT_SOURCES:
                        ours[g.device].append(g)
                    else:
                        others[(g.device, g.dtype)].append(g)
            for device, grads in ours.items():
                unscale_(grads, per_device_inv_scale.get(device), per_device_found_inf.get(device),
                         backend=self._backend)
            for (device, _), grads in others.items():
                torch._amp_foreach_non_finite_check_and_unscale_(
                    grads, per_device_found_inf.get(device), per_device_inv_scale.get(device))
        return per_device_found_inf._per_device_tensors
