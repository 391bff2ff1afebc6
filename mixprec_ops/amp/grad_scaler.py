"""A drop-in torch.amp.GradScaler whose unscale step is mixprec_ops.unscale_: one fused multi-tensor pass per
device that handles float32, float16 AND bfloat16 grads (torch's own kernel rejects bf16 on some devices)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from itertools import chain, compress, repeat
from operator import attrgetter, is_not

import torch
from torch.amp.grad_scaler import _MultiDeviceReplicator

from .. import _checks, backends
from .._checks import FLOAT_SOURCES
from ..ops.unscale import unscale_, unscale_checked_

try:  # torch.distributed may be absent from a build
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.placement_types import Partial
except ImportError:
    DTensor = None


_grad = attrgetter("grad")
_layout = attrgetter("layout")
_group_by = torch._C._group_tensors_by_device_and_dtype  # C++; torch >= 2.1


def _plain_grads_by_device(optimizer, allow_fp16):
    """{device: the optimizer's grads there} (in param order when they share one device; else grouped by dtype too:
    the order of a device's list does not matter to unscale_) when every grad is a plain strided float32, float16 or
    bfloat16 tensor (the usual case), found by sweeps over whole lists in C; None for anything else (a sparse,
    DTensor or float64 grad, a param that is not a tensor, no grads, a trace by Dynamo), which GradScaler's loop
    over the params handles one by one. Raises torch's error for fp16 grads without allow_fp16, before anything is
    unscaled, as the loop does.

    The loop costs ~1 us a param on the CI CPU, as torch.amp.GradScaler's own does (2.1 ms at 2,000 params); these
    sweeps ~0.5 us (bench/NOTES.md, "GradScaler's grads, swept")."""
    if torch.compiler.is_compiling():
        return None
    try:
        grads = list(map(_grad, chain.from_iterable(g["params"] for g in optimizer.param_groups)))
    except AttributeError:
        return None
    grads = list(compress(grads, map(is_not, grads, repeat(None))))
    if not grads or not set(map(type, grads)) <= _checks.PLAIN or set(map(_layout, grads)) != {torch.strided}:
        return None
    kinds = _group_by([grads], False)
    if not all(dtype in FLOAT_SOURCES for _, dtype in kinds):
        return None
    if not allow_fp16 and any(dtype == torch.float16 for _, dtype in kinds):
        raise ValueError("Attempting to unscale FP16 gradients.")
    devices = {device for device, _ in kinds}
    if len(devices) == 1:  # one unscale_ call takes every dtype: the list as it is
        return {devices.pop(): grads}
    out: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for (device, _), (lists, _) in kinds.items():
        out[device].extend(lists[0])
    return out


class GradScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler with a fused unscale for every grad dtype.

    Same constructor (device="cuda", init_scale=2**16, growth_factor=2.0, backoff_factor=0.5,
    growth_interval=2000, enabled=True), methods (scale, unscale_, step, update, get_scale, state_dict,
    load_state_dict, ...) and state_dict keys as torch.amp.GradScaler; a state_dict of either loads into the
    other. Adds no host synchronisation beyond torch's (unscale_ reads inv_scale on the device).

    Extra keyword: backend ("auto", "cuda", "triton", "cpu", "torch") for the unscale kernel (the name is checked
    here; whether it can serve the grads' device, at the first unscale).

    One difference from torch's: inf/NaN is looked for in the unscaled grads, as stored. With a scale below 1
    (after many backoffs) a finite grad can overflow when unscaled; torch's kernel checks the input and steps with
    the inf, ours skips that step and backs off, as for any other overflow.

    DTensor grads (FSDP2, tensor parallel) are unscaled shard by shard and found_inf is max-reduced over the mesh,
    as torch's DTensor rule does for its own kernel: every rank skips the same steps.
    """

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True, *,
                 backend: str | None = None) -> None:
        backends.requested(backend)  # a bad name fails here, not after the first forward and backward
        with warnings.catch_warnings(record=True) as caught:  # torch's "CUDA is not available. Disabling."
            warnings.simplefilter("always")
            super().__init__(device, init_scale=init_scale, growth_factor=growth_factor,
                             backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled)
        for w in caught:  # re-issued at the caller's line, where torch's own class puts it (not at this file's)
            warnings.warn(w.message, w.category, stacklevel=2)
        self._backend = backend

    def _check_inf_per_device(self, optimizer):
        """torch's step() calls this (for an optimizer whose grads were not unscaled yet) to find inf/NaN with a
        read-only pass over every grad. An optimizer that reads every grad anyway before it steps and flags inf/NaN
        in that pass (mixprec_ops.optim.Adam/AdamW with max_grad_norm, and no step pre-hooks, which could change
        the grads after the check) is handed this optimizer's found-inf dict instead, and puts its flag in it when
        its pass has run: one read of the grads per step fewer, the same skip, and update() backs off on what the
        optimizer found (which includes a norm that overflowed fp32: a skip the scale must answer, or every later
        step would skip too). With no grads the dict stays empty, and update() raises as torch's does."""
        hand_over = getattr(optimizer, "_mixprec_flags_inf_itself", None)
        if hand_over is None or not hand_over():
            return super()._check_inf_per_device(optimizer)
        _scale, _ = self._check_scale_growth_tracker("_check_inf_per_device")
        found_inf_per_device: dict = {}  # filled by the optimizer's step, read by update()
        optimizer._mixprec_found_inf_out = (found_inf_per_device, _scale.device)
        state = self._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = found_inf_per_device
        state["mixprec_handed_over"] = True  # step() checks that the flag arrived
        return found_inf_per_device

    def step(self, optimizer, *args, **kwargs):
        """torch.amp.GradScaler.step. When the inf/NaN check was handed over (_check_inf_per_device) but the step
        did not fill the flag, the read-only check runs after the step instead, on the grads as the step left them
        (our optimizers only read grads): a step that never reached the optimizer's own (a subclass stepping every
        other call), or one compiled apart from the decision (torch.compile of a loop holding scaler.step, whose
        frames Dynamo compiles or runs eagerly one by one), would otherwise leave update() without a flag (an
        AssertionError) or with none from this optimizer (a scale that never backs off while every step skips)."""
        if not self._enabled:  # (torch keeps no per-optimizer states then)
            return super().step(optimizer, *args, **kwargs)
        try:
            retval = super().step(optimizer, *args, **kwargs)
        finally:
            optimizer.__dict__.pop("_mixprec_found_inf_out", None)  # (left there when the step did not take it)
        state = self._per_optimizer_states[id(optimizer)]
        if state.pop("mixprec_handed_over", False) and not state["found_inf_per_device"]:
            super()._check_inf_per_device(optimizer)
        return retval

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        per_device_inv_scale = _MultiDeviceReplicator(inv_scale)
        per_device_found_inf = _MultiDeviceReplicator(found_inf)
        with torch.no_grad():
            by_device = _plain_grads_by_device(optimizer, allow_fp16)
            if by_device is not None:  # checked as unscale_ checks its list: past those checks
                for device, grads in by_device.items():
                    inv, found = per_device_inv_scale.get(device), per_device_found_inf.get(device)
                    _checks.device_scalar(inv, "inv_scale", device)
                    _checks.device_scalar(found, "found_inf", device, contiguous=True)
                    unscale_checked_(grads, inv, found, False, self._backend)
                return per_device_found_inf._per_device_tensors
        plain: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        sharded: dict[tuple, list[torch.Tensor]] = defaultdict(list)  # (mesh, placements, device) -> local grads
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
                    if DTensor is not None and isinstance(g, DTensor):  # FSDP2, tensor parallel
                        local = g.to_local()
                        sharded[(g.device_mesh, g.placements, local.device)].append(local)
                    else:
                        plain[g.device].append(g)
            for device, grads in plain.items():
                self._unscale(grads, per_device_inv_scale.get(device), per_device_found_inf.get(device))
            for (mesh, placements, device), grads in sharded.items():
                self._unscale_shards(grads, mesh, placements, per_device_inv_scale.get(device),
                                     per_device_found_inf.get(device))
        return per_device_found_inf._per_device_tensors

    def _unscale_shards(self, grads, mesh, placements, inv_scale, found_inf):
        """Unscale the local shards of DTensor grads that share a mesh and placements, then share what any rank
        found: the flag is max-reduced over the mesh dims along which the grads are not replicated, as torch's
        DTensor rule for _amp_foreach_non_finite_check_and_unscale_ does, so every rank skips the same steps (a
        rank that stepped while another skipped would leave the shards of one param out of step)."""
        found = torch.zeros_like(found_inf)
        self._unscale(grads, inv_scale, found)
        spec = [p if isinstance(p, Replicate) else Partial("max") for p in placements]
        found = DTensor.from_local(found, mesh, spec, run_check=False).full_tensor()
        torch.maximum(found_inf, found, out=found_inf)

    def _unscale(self, grads, inv_scale, found_inf):
        """One device's grads: fp32/fp16/bf16 in one unscale_ call, any other dtype (float64) through torch's own
        kernel, one call per dtype."""
        others: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        ours = []
        for g in grads:
            (ours if g.dtype in FLOAT_SOURCES else others[g.dtype]).append(g)
        if ours:
            unscale_(ours, inv_scale, found_inf, backend=self._backend)
        for group in others.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
