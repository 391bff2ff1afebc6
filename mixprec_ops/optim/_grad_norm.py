"""The clipping norm of mixprec_ops.optim.Adam's step: one read-only pass over the grads for their global L2 norm
and an inf/NaN flag, across devices, ranks (ZeroRedundancyOptimizer) and DTensor meshes (FSDP2, tensor
parallelism). A mixin of Adam: it reads the optimizer's max_grad_norm, norm_across_ranks, backend and params."""

from __future__ import annotations

from collections import defaultdict

import torch

from .._dtensor import DTensor
from .._dtensor import local as _local
from ..ops.unscale import unscale_, unscale_checked_

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coef = max_norm / (norm + 1e-6), at most 1


class GradNormMixin:
    """Adam's clipping norm and inf/NaN flag (this module's docstring)."""

    def _grad_stats(self, collected, grad_scale, found_inf, by_device=None, wide=False):
        """One read-only pass over all grads: global L2 norm (of the unscaled grads) and inf/NaN detection.
        Returns (clip_coef, found) as device tensors, on the first grad's device; found is non-zero when the step
        must be skipped (1, or the scaler's found_inf where that is larger: torch's GradScaler sums its devices'
        flags). by_device: {device: grads} in collected's order, when the caller knows them and has checked them as
        unscale_ would (the steady step, whose metadata signature did). wide: some grads may be float64 (float64
        params, Adam._step_wide): their squares are summed in float64, apart from the pass's."""
        per_device = defaultdict(list) if by_device is None else by_device
        dtensor_grads = []
        for _, ps in collected if by_device is None else ():
            for p in ps:
                (dtensor_grads if _local(p.grad) is not p.grad else per_device[p.grad.device]).append(p.grad)
        if len(per_device) == 1 and not self._has_dtensor_params and self.norm_across_ranks is False and not wide:
            # The common case, one device: the pass's norm and flag are the answer, without the general path's ~10
            # small ops (the same bits wherever sqrt is correctly rounded and n * n neither overflows, see below,
            # nor underflows: sqrt(fl(n * n)) == n in binary floating point; torch's fp32 CPU sqrt misses that for
            # ~1e-5 of inputs, where this one is the exact one; a norm below ~1e-19 is now reported, not 0).
            ((dev, grads),) = per_device.items()
            found = torch.zeros(1, dtype=torch.float32, device=dev)
            # inv_scale == 1: the kernels only read (no write-back), so this pass costs one read of the grads.
            if by_device is None:
                norm = unscale_(grads, self._one(dev), found, return_norm=True, backend=self.backend)
            else:  # the steady step's grads: its signature has checked them as unscale_ would
                norm = unscale_checked_(grads, self._one(dev), found, True, self.backend)
            narrow = norm
        else:
            dev = (next(iter(per_device)) if per_device else dtensor_grads[0].device if dtensor_grads
                   else self._collective_device())
            found = torch.zeros(1, dtype=torch.float32, device=dev)
            # fp64 sums of the parts' squares, as the pass combines its partial sums: finite for any finite parts
            # (fl(n * n) in fp32 overflows from n = 2^64 on, before the scale is divided out: see below)
            # (and float64 grads' squares apart, wsq: the fp32 overflow rule below is not theirs)
            sumsq = torch.zeros((), dtype=torch.float64, device=dev)
            wsq = torch.zeros((), dtype=torch.float64, device=dev)
            count = sumsq.new_full((), float(sum(len(g) for g in per_device.values())))  # grads held, over ranks
            for d, grads in per_device.items():
                s, w, f = self._sumsq_found(grads, d, wide)
                sumsq = sumsq + s.to(dev)
                wsq = wsq if w is None else wsq + w.to(dev)
                found = found + f.to(dev)
            if self.norm_across_ranks is not False:  # this rank holds a share of the params: sum over the ranks
                both = torch.stack([sumsq, found.reshape(()).double(), count, wsq]).to(self._collective_device())
                torch.distributed.all_reduce(both, group=self._norm_group())
                both = both.to(dev)
                sumsq, found, count, wsq = both[0], both[1].reshape(1).float(), both[2], both[3]
            if self._has_dtensor_params:  # FSDP2, TP: the shards' sums, then collectives across the meshes
                s, f, c, w = self._dtensor_grad_stats(dtensor_grads, dev, wide)
                sumsq, found, count, wsq = sumsq + s, found + f, count + c, wsq + w
            # read by a step that held no grads itself: did any rank hold one (then its flag counts)?
            self._last["grads_anywhere"] = count
            narrow = sumsq.sqrt().float()  # one part: its own norm, exactly (n * n is exact in fp64)
            # (with no float64 grads wsq is +0.0 and norm has narrow's bits; a float64 norm beyond fp32's range
            # is inf here, the step skipped)
            norm = (sumsq + wsq).sqrt().float()
            found = found.clamp(max=1.0)  # a count over devices or ranks: 0 or 1, as the one-device case
        if grad_scale is not None:
            scale = grad_scale.to(dev).reshape(())
            same = narrow is norm
            norm = norm / scale
            narrow = norm if same else narrow / scale
        # The norm of the unscaled grads (torch's recipe: unscale_, then clip_grad_norm_) is inf where torch's fp32
        # sum of squares overflows, fl(n * n) = inf exactly from n = 2^64 on (the docstring's rule); a still-scaled
        # norm past 2^64 with a finite unscaled one steps (it skipped, and torch's GradScaler, which does not see
        # this optimizer's skips, then never backed off: every later step skipped too). NaN stays NaN.
        # (The rule is the fp32 pass's: float64 grads' squares, summed in float64, do not overflow there.)
        norm = norm.masked_fill(narrow >= 2.0**64, float("inf"))
        found = torch.where(norm < float("inf"), found, self._one(dev))  # a non-finite norm (inf, NaN) flags it too
        if found_inf is not None:
            found = torch.maximum(found, found_inf.to(dev).reshape(1))
        self._last["grad_norm"] = norm
        # as torch.nn.utils.clip_grad_norm_: float / tensor (a reciprocal and a product), then at most 1
        clip = torch.clamp(self.max_grad_norm / (norm + _CLIP_EPS), max=1.0).reshape(1)
        return clip, found

    def _dtensor_grad_stats(self, grads, dev, wide=False):
        """(sum of squares, inf/NaN count, grad count, float64 grads' sum of squares) of DTensor grads on `dev`: each
        rank's local shards go through the same norm pass as plain grads (fp32 squares, fp64 partial sums, the pass's
        own inf/NaN flag; float64 shards: _sumsq_found), then the four numbers are summed over the mesh dims the
        grads are not replicated on (Shard, and _StridedShard, FSDP2's layout over a tensor-parallel param; a
        replicated dim holds the same values on every rank: counted once).
        One collective per layout (mesh and placements) of this optimizer's DTensor params, with or without
        grads, in param-group order: every rank issues the same ones even when its grads differ (a grad None on
        one rank only). (torch's get_total_norm, used before, works in the grads' dtype: fp16 shards' partial norms
        overflowed past ~256 and every step was skipped; bf16 norms were 8-bit precise.)"""
        from torch.distributed.tensor import Partial, Replicate

        by_layout = {}
        for group in self.param_groups:
            for p in group["params"]:
                if isinstance(p, DTensor):
                    by_layout.setdefault((p.device_mesh, tuple(p.placements)), [])
        for g in grads:  # laid out like their params (_collect)
            by_layout[(g.device_mesh, tuple(g.placements))].append(_local(g))
        sumsq = torch.zeros((), dtype=torch.float64, device=dev)
        found = torch.zeros(1, dtype=torch.float32, device=dev)
        count = torch.zeros((), dtype=torch.float64, device=dev)
        wsq = torch.zeros((), dtype=torch.float64, device=dev)
        for (mesh, placements), local in by_layout.items():
            if local:
                s, w, f = self._sumsq_found(local, local[0].device, wide)
                both = torch.stack([s, f.reshape(()).double(), s.new_full((), float(len(local))),
                                    s.new_zeros(()) if w is None else w])
            else:  # this rank holds no grad of this layout: its share is 0, but the collective is everyone's
                d = (torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda"
                     else torch.device(mesh.device_type))
                both = torch.zeros(4, dtype=torch.float64, device=d)
            if not all(pl.is_replicate() for pl in placements):
                summed = [Replicate() if pl.is_replicate() else Partial() for pl in placements]
                both = DTensor.from_local(both, mesh, summed, run_check=False).full_tensor()
            sumsq = sumsq + both[0].to(dev)
            found = found + both[1].to(dev, torch.float32).reshape(1)
            count = count + both[2].to(dev)
            wsq = wsq + both[3].to(dev)
        return sumsq, found, count, wsq

    def _sumsq_found(self, grads, device, wide):
        """(sum of squares of the fp32 / fp16 / bf16 grads, of the float64 ones or None, inf/NaN flag) of grads on one
        device: fp64 0-dim tensors and a 1-element fp32 one. The first from the norm pass (fp32 squares: its norm
        squared in fp64 is exact); the second, only when `wide` says float64 grads may be there (float64 params),
        from torch's float64 norms (an inf or NaN among them makes it non-finite, which flags the step as any
        non-finite norm does)."""
        found = torch.zeros(1, dtype=torch.float32, device=device)
        wsq = None
        if wide:
            w = [g for g in grads if g.dtype is torch.float64]
            if w:
                grads = [g for g in grads if g.dtype is not torch.float64]
                wsq = torch.stack(torch._foreach_norm(w)).square().sum()
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=device), wsq, found
        norm = unscale_(grads, self._one(device), found, return_norm=True, backend=self.backend)
        return norm.double().square(), wsq, found

    def _one(self, device):
        """A 1-element fp32 1.0 on `device` (the norm pass's inv_scale, which it only reads), made once per device;
        made anew, not kept, while compiling or capturing (a tensor filled inside a CUDA graph capture holds its
        value only in replays)."""
        if torch.compiler.is_compiling():  # not read either: a guard on the dict's contents would recompile
            return torch.ones(1, dtype=torch.float32, device=device)
        t = self._ones.get(device)
        if t is None:
            t = torch.ones(1, dtype=torch.float32, device=device)
            if not self._capturing(device):
                self._ones[device] = t
        return t

    def _norm_group(self):
        return None if self.norm_across_ranks is True else self.norm_across_ranks

    def _collective_device(self) -> torch.device:
        """The device of norm_across_ranks' all_reduce, by one rule every rank applies alike whatever grads it
        holds: the process group's device for collectives (CUDA when it has NCCL, as torch's object collectives
        choose), else the CPU."""
        from torch.distributed import distributed_c10d as c10d

        pick = getattr(c10d, "_get_object_coll_device", None)
        if pick is not None:
            dev = torch.device(pick(self._norm_group()))
        else:  # older torch
            dev = c10d._get_pg_default_device(self._norm_group())
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev
