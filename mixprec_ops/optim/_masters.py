"""The fp32 masters of mixprec_ops.optim.Adam kept in step with their 16-bit params: writes made to the params
between steps (found from version counters and storage) reach the masters, element by element; masters met by
fp32 params are taken over by them. A mixin of Adam: it reads the optimizer's state, param groups and plans."""

from __future__ import annotations

import torch

from .._dtensor import local as _local


def _versions(plan):
    """The version counter(s) of a planned param that a write moves: the tensor's own; for a DTensor (FSDP2) also
    the DTensor's, which its in-place ops (p.zero_() under no_grad, a model's load_state_dict) move without moving
    the local tensor's, while our kernels write the local tensor."""
    lp = plan[4]
    return lp._version if plan[11] else (lp._version, plan[2]._version)


def check_state_shape(key, lp, t) -> None:
    """A param's state tensor (or its local shard) must have the param's shape: a state of another param (same
    numel or not) is refused, naming both shapes, before anything is updated."""
    if t.shape != lp.shape:
        raise ValueError(f"state[{key!r}] of a {tuple(lp.shape)} param has shape {tuple(t.shape)}")


class MasterSyncMixin:
    """Adam's master-weight upkeep between steps (this module's docstring)."""

    def _adopt_master(self, p, state):
        """A master of an fp32 (or float64) param: a 16-bit run resumed in fp32 (its checkpoint loaded into an fp32
        model, or model.float() after 16-bit steps). The param becomes its own master: elements that still hold the
        master's bf16 or fp16 rounding take its fp32 value, so training continues from the masters, not from their
        roundings; elements written since (a re-initialised head) keep what was written, unless the written value
        happens to equal the master's bf16 or fp16 rounding (e.g. a LayerNorm weight reset to 1.0 whose master is
        within a 16-bit ulp of 1). Then the master goes."""
        lp, master = _local(p), _local(state["master_param"])
        check_state_shape("master_param", lp, master)
        if self._capturing(lp.device):  # the graph would record the copy and redo it every replay
            raise RuntimeError(
                f"mixprec_ops.optim: the fp32 master of a {tuple(lp.shape)} {str(lp.dtype)[6:]} param (a 16-bit run "
                "resumed in fp32) would be taken over inside a CUDA graph capture; run one step outside the capture "
                "first")
        with torch.no_grad():
            held = (master.to(torch.bfloat16).float() == lp) | (master.to(torch.float16).float() == lp)
            lp.copy_(torch.where(held, master.to(lp.device), lp))
        del state["master_param"]

    @torch._disable_dynamo
    def resync_masters(self):
        """Take what was written to the 16-bit params since the last step into their fp32 masters, element by
        element (an element whose param no longer holds its master's rounding takes the param's value; the rest keep
        their fp32 bits; after a load or a change of the param's dtype the rounding through the other 16-bit format
        counts as held too), and let fp32 params take over masters loaded for them. Every master's shape is checked
        before anything changes.

        An eager step does this by itself, for the params whose version counter or storage changed. A compiled
        step cannot (version counters do not trace, so it trusts the masters): after writing params between
        compiled steps (a model's load_state_dict, an EMA swap, nn.init under torch.no_grad()) or after
        load_state_dict, call this eagerly before the next step, or the step rebuilds the params from masters
        that never saw the writes. One elementwise pass per param with a master, no host sync; not inside a CUDA
        graph capture."""
        self._forget_steady()  # (its versions into the plans, before they are updated below)
        pairs, plans, adopt = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st or "master_param" not in st:
                    continue
                lp, master = _local(p), _local(st["master_param"])
                check_state_shape("master_param", lp, master)  # every one before anything changes
                if p.dtype in (torch.float32, torch.float64):  # (no master of its own: it takes this one over)
                    adopt.append((p, st))
                    continue
                plan = self._plans.get(id(p))
                # the other 16-bit format's rounding counts as unwritten after a load or a dtype change (_resync)
                pairs.append((lp, master, plan is None or plan[17] == -1 or plan[10] is not lp.dtype))
                plans.append(plan)
        with torch.no_grad():  # (a step runs under no_grad; called eagerly, the copies must not join autograd)
            for p, st in adopt:
                self._adopt_master(p, st)
            self._resync(pairs)
        for plan in plans:  # in sync now: the next eager step need not check these params again
            if plan is not None and plan[17] is not None:
                plan[17], plan[18] = _versions(plan), plan[4].data_ptr()

    def _note_versions(self, planned):
        """After every launch of the step: each master-carrying param's version counter, as our own writes left it
        (read, not predicted: every backend moves it, as torch's in-place ops do, and params that are views of one
        buffer share one counter). ~0.09 us per param."""
        for _, buckets, fallback in planned:
            for entries in [e for e, _ in buckets.values()] + [fallback]:
                for e in entries:
                    if e[3] is not None:
                        e[4][17] = e[0]._version if e[4][11] else _versions(e[4])  # (inline: ~0.1 us per param)

    def _resync(self, pairs):
        """A 16-bit param written outside the optimizer since its last step (clamp_ under no_grad, nn.init, a
        model's load_state_dict, p.data = t) must not be overwritten from a master that never saw the write, which
        a fused master-weight step would do. Such params are found in _bucket_group from the param's version
        counter and data pointer, compared with what they were after our last step (_note_versions; host cost
        with the read-back ~0.27 us per param with a master, bench/NOTES.md; a write through p.data's own
        in-place ops is invisible: p.data has its own version counter. Not under torch.compile, whose tracing
        cannot branch on the counter).

        Per element, a master whose param no longer holds the master's rounding takes the param's value: what was
        written wins, and elements nobody touched keep their fp32 bits (an eval-time swap to other weights and
        back, or a model's load_state_dict of the checkpoint the masters come from, change nothing). One
        elementwise pass per such param, no host sync. Inside a CUDA graph capture it would be recorded and
        replayed every step: a written param raises there instead (step once eagerly after writing)."""
        for lp, _master, _cross in pairs:
            if self._capturing(lp.device):
                raise RuntimeError(
                    f"mixprec_ops.optim: a {tuple(lp.shape)} param was written outside the optimizer since its last "
                    "step, and its fp32 master must take the write; that cannot be recorded in a CUDA graph "
                    "capture: run one step outside the capture first")
        for lp, master, cross in pairs:
            held = master.to(lp.dtype) == lp
            if cross:
                # A model moved between the 16-bit formats (model.half() after bf16 steps, a bf16 run's checkpoint
                # loaded into an fp16 model) holds the master's rounding through the other format: not a write
                # either. Only then: otherwise a real write near the master (clamp_(max=1.0) of an fp16 param, a
                # zeroed bf16 element whose master fp16 flushes to 0) would look like that rounding and be undone.
                other = torch.float16 if lp.dtype == torch.bfloat16 else torch.bfloat16
                held |= master.to(other).to(lp.dtype) == lp
            master.copy_(torch.where(held, master, lp.float()))
