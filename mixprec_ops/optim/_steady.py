"""The steady-state step of mixprec_ops.optim.Adam: when nothing the last step's planning rested on has changed (the
same params with grads, in the same groups and options, holding the same state tensors, their grads plain and
contiguous with the same shapes, dtypes and devices, no param written outside the optimizer; for DTensor params
(FSDP2, tensor parallelism), the same local shards and layouts, and DTensor grads laid out as the params), the step
reuses that planning's launch lists, the state lists held on the C++ side too (mixprec::AdamBucket, so that the launch
converts only the params from Python, and the scalars, the step and the counters' count are one op call; DTensor
params' launches are given their local grads, which the op cannot read from local shards), and only reads the new
grads.

Every check runs over whole lists in C: map over getters and identity comparisons, and the grads' and params' metadata
in one C++ call when the extension has it (mixprec::adam_bucket_unchanged against the bucket's own record, or
mixprec::param_grad_signature where no bucket is passed: its first step, a subclass's params, a dispatch mode). At
2,000 small params on the CI CPU a step takes ~0.4 of a fully planned one (bench/NOTES.md, "The steady-state
optimizer step"). Any difference, or anything the checks cannot read, sends the step to the full planning (adam.py:
_collect, _bucket_group), which raises the errors, creates missing state and resyncs written params; that step
records anew."""

from __future__ import annotations

from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not, itemgetter

import torch

from .. import _ext
from .._checks import PLAIN
from .._dtensor import DTensor
from ..ops.adam import BUCKET_TAKES_GRADS, bucket_unchanged, bucket_usable, new_bucket
from ._masters import _versions

_grad = attrgetter("grad")
_version = attrgetter("_version")
_local_tensor = attrgetter("_local_tensor")  # a DTensor's local shard, the very tensor (to_local() may make a view)
_spec = attrgetter("_spec")  # a DTensor's layout (mesh, placements, shape)
_dtype = attrgetter("dtype")
_placements = attrgetter("_spec.placements")
_size = torch.Tensor.size
_contiguous = torch.Tensor.is_contiguous
_data_ptr = torch.Tensor.data_ptr
_group_by = torch._C._group_tensors_by_device_and_dtype  # C++; torch >= 2.1


# mixprec::param_grad_signature, or None (no extension, or one built before the op: the sweeps run in Python)
_SIGNATURE = (torch.ops.mixprec.param_grad_signature.default
              if _ext.has_kernel("param_grad_signature", "CompositeExplicitAutograd") else None)


# The backend label of a launch of float64 params (Adam._units, Adam._run_group): torch's fused Adam (Adam._step_wide)
WIDE = "float64"


def _same(a, b) -> bool:
    """The very same objects, position by position (never ==: tensors compare element-wise)."""
    return len(a) == len(b) and all(map(is_, a, b))


def _kinds(tensors):
    """The (device, dtype) pairs of a list of tensors, as one C++ sweep finds them."""
    return list(_group_by([tensors], False))


class _Bucket:
    """One launch of the recorded step: its lists (but the grads) and what must hold for them to be reused."""

    __slots__ = ("params", "lists", "bucket", "plain", "buf", "states", "lens", "getter", "held", "signature",
                 "sizes", "pkinds", "gkinds", "plans", "versions", "ptrs", "dparams", "locals", "specs", "dtypes",
                 "placements", "steps")

    def __init__(self, entries, lists, buf, keys, versions, dparams=None):
        ps = lists[0]
        self.params = ps  # the launch's params: for DTensor params, their local shards as the plans took them
        # DTensor params (FSDP2, tensor parallelism; every param of the bucket is one, or none is): the DTensors,
        # their local tensors, layouts and dtypes as planned (what the plan's staleness check reads, Adam._bucket_group:
        # `p.data = t` can change a DTensor's dtype and keep its local tensor and spec), and the placements their grads
        # had (the params', or _collect would have laid the grads out like them)
        self.dparams = dparams
        self.locals = None if dparams is None else list(map(_local_tensor, dparams))
        self.specs = None if dparams is None else list(map(_spec, dparams))
        self.dtypes = None if dparams is None else list(map(_dtype, dparams))
        self.placements = None if dparams is None else list(map(_placements, dparams))
        masters = lists[5]
        # (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters): the launch lists after the params and grads
        self.lists = lists[2:]
        # the state lists on the C++ side too (ops.adam.new_bucket), made at the record's first use: a third of the
        # cost of recording, which records no step uses (the back-off's case) need not pay
        self.bucket = None
        # torch.Tensor and nn.Parameter params only: the C++ bucket's ops are called with the subclasses' torch
        # function handling off (ops.adam.bucket_unchanged, adam_step_bucket_), which another subclass's
        # __torch_function__ would miss; its params take the signature and the lists' op. Checked again at each step
        # (grads_if_unchanged): a param whose class changes to such a subclass (p.__class__ = ...,
        # torch.utils.swap_tensors) keeps its id, data and version.
        # (DTensor params: not plain; their grads are read from the DTensors and given to the launch)
        self.plain = dparams is None and set(map(type, ps)) <= PLAIN
        self.buf = buf
        # float64 params (buf None: torch's fused Adam counts per-param counters, Adam._step_wide): those counters
        self.steps = [e[4][7] for e in entries] if buf is None else None  # (plan[7]: Adam._STEP)
        self.states = [e[4][0] for e in entries]  # the state dicts
        self.lens = list(map(len, self.states))
        self.getter = itemgetter(*keys)  # "step", the moments and the master: the tensors the lists hold
        self.held = list(chain.from_iterable(map(self.getter, self.states)))
        # the grads' and params' metadata: one C++ signature, or the Python sweeps' lists
        self.signature = None if _SIGNATURE is None or dparams is not None else _SIGNATURE(ps)[1]
        python = self.signature is None
        self.sizes = list(map(_size, ps)) if python else None
        self.pkinds = _kinds(ps) if python else None
        self.gkinds = _kinds(lists[1]) if python else None
        # a master-carrying param's version counter and storage after our last step (see Adam._resync); the
        # versions go back into the plans when the record is dropped (_forget_steady)
        self.plans = [e[4] for e in entries]
        self.versions = versions if masters else None
        self.ptrs = list(map(_data_ptr, ps)) if masters and python else None

    def grads_if_unchanged(self, usable):
        """This step's grads for the launch, or None when the recorded lists no longer serve; True when the bucket
        checked them (usable: ops.adam.bucket_usable() this step), whose op then reads them from the params. The
        optimizer's state maps these params to the recorded state dicts (SteadyStepMixin._steady_step has checked it
        whole)."""
        ps = self.params
        dps = self.dparams
        if self.plain and not set(map(type, ps)) <= PLAIN:  # (~20 ns a param)
            return None  # a param became a subclass: its next record gives it no bucket
        if dps is not None:
            # DTensor params: the same local tensors and layouts as planned (FSDP2 may swap a local tensor), and grads
            # that are DTensors laid out as recorded (else _collect redistributes them, or names the error); then
            # their local shards are checked as plain grads are below
            if not (_same(list(map(_local_tensor, dps)), self.locals) and _same(list(map(_spec, dps)), self.specs)
                    and _same(list(map(_dtype, dps)), self.dtypes)):
                return None
            dgs = list(map(_grad, dps))
            if (not all(map(is_, map(type, dgs), repeat(DTensor)))
                    or list(map(_placements, dgs)) != self.placements):
                return None
        if usable and self.bucket is not None and dps is None:  # (the data pointers included)
            if not bucket_unchanged(ps, self.bucket):
                return None
            gs = True
        elif self.signature is not None:  # (the data pointers included)
            gs, signature = _SIGNATURE(ps)
            if not gs or not torch.equal(signature, self.signature):
                return None
        else:
            gs = list(map(_grad, ps)) if dps is None else list(map(_local_tensor, dgs))
            if (not all(map(is_, map(type, gs), repeat(torch.Tensor))) or list(map(_size, gs)) != self.sizes
                    or list(map(_size, ps)) != self.sizes or not all(map(_contiguous, gs))
                    or not all(map(_contiguous, ps)) or _kinds(gs) != self.gkinds or _kinds(ps) != self.pkinds
                    or self.ptrs is not None and list(map(_data_ptr, ps)) != self.ptrs):
                return None
        states = self.states
        if list(map(len, states)) != self.lens or not _same(list(chain.from_iterable(map(self.getter, states))),
                                                            self.held):
            return None
        if self.versions is not None and self.read_versions() != self.versions:
            return None  # written outside the optimizer: the full planning resyncs its master
        return gs

    def read_versions(self):
        """The params' version counters as the plans keep them: each param's own counter, or for DTensor params
        masters._versions of each plan (the local tensor's with the DTensor's: its own in-place ops move only the
        DTensor's; our kernels write the local tensor)."""
        if self.dparams is None:
            return list(map(_version, self.params))
        return list(map(_versions, self.plans))


class SteadyStepMixin:
    """Adam's steady-state step (this module's docstring). The record is self._steady; None: plan in full.

    Recording costs about a quarter of a full planning (the C++ bucket is made at the record's first use). A record
    dropped before any step used it (the params with grads change every step: experts a router skipped, layers
    unfrozen one by one) makes the next records wait: 1, 2, 4, ... up to 16 fully planned steps (so a settled loop
    is served again within 17 steps), back to every step once a record serves."""

    def _steady_reset(self):
        self._steady = None  # the last step's planning, for the next to reuse
        self._steady_wait = 0  # fully planned steps to let pass before recording again
        self._steady_backoff = 1

    def _remember_steady(self, planned):
        """After a fully planned eager step: record it when a later step can reuse it. Not for params served by the
        reference (fallback, but for float64 params: torch's fused Adam, recorded as a launch of their own), grads
        that needed a copy, a cast or a redistribution, non-contiguous params, a bucket mixing DTensor params with
        plain ones, or a step inside a CUDA graph capture (no step buffer)."""
        if self._steady_wait > 0:
            self._steady_wait -= 1
            return
        P, C, V, G = self._PLAIN, self._CONTIG, self._VER, self._P
        per_group, with_grad = [], set()
        index = {id(g): i for i, g in enumerate(self.param_groups)}
        for group, buckets, fallback in planned:
            amsgrad = group["amsgrad"]
            wide = {}
            for e in fallback:
                # float64 params only (Adam._step_wide, a launch per device), plain and contiguous, their grads as
                # they are; the reference's per-param steps (layouts the kernels cannot walk) are not recorded
                plan = e[4]
                if not (e[0].dtype is torch.float64 and plan[P] and plan[C] and e[1] is plan[G].grad):
                    return
                wide.setdefault(e[0].device, []).append(e)
            bs = []
            for entries, buf in buckets.values():
                if buf is None:
                    return
                plans = [e[4] for e in entries]
                # plain contiguous params whose grads went to the launch as they are, and every master's version known
                dparams = None
                if not all(map(itemgetter(P), plans)):
                    # DTensor params (FSDP2, tensor parallelism): all of the bucket's, each with a DTensor grad whose
                    # local shard went to the launch as it is, as the plan's local param did
                    dparams = list(map(itemgetter(G), plans))
                    dgrads = list(map(_grad, dparams))
                    if not (DTensor is not None and all(map(is_, map(type, dparams), repeat(DTensor)))
                            and all(map(is_, map(type, dgrads), repeat(DTensor)))):
                        return
                    grads = list(map(_local_tensor, dgrads))
                else:
                    grads = list(map(_grad, map(itemgetter(G), plans)))
                if not (all(map(itemgetter(C), plans)) and all(map(is_, [e[1] for e in entries], grads))):
                    return
                master = entries[0][3] is not None
                versions = list(map(itemgetter(V), plans))
                if master and any(map(is_, versions, repeat(None))):
                    return
                keys = ("step", "exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ()),
                        *(("master_param",) if master else ()))
                try:
                    bs.append(_Bucket(entries, self._lists(entries, amsgrad), buf, keys, versions, dparams))
                except RuntimeError:  # metadata the sweeps cannot read (a tensor without storage): plan in full
                    return
            for entries in wide.values():  # (after the buckets, as Adam._units orders the launches)
                keys = ("step", "exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ()))
                try:
                    bs.append(_Bucket(entries, self._lists(entries, amsgrad), None, keys, None))
                except RuntimeError:
                    return
            gparams = group["params"]
            # the group's params with grads, in its order (the norm pass sums in it)
            ps = list(compress(gparams, map(is_not, map(_grad, gparams), repeat(None))))
            with_grad.update(map(id, ps))
            per_group.append((index[id(group)], ps, bs, self._plan_options(group)))
        if not per_group:
            return
        devices = {b.params[0].device for _, _, bs, _ in per_group for b in bs}
        all_params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        ids = list(map(id, all_params))
        # The record holds what the plans hold (params with grads, their states), nothing more: the groups and the
        # params by id, the params without grads by position, so that a frozen param dropped from the groups is freed
        # at once, as with torch's optimizers. (An id is reused only by a new object after the old one is freed: not
        # the params with grads, which the buckets hold; a new param without a grad where a freed one was is stepped
        # by nothing either way, and one with a grad fails the check of the positions without grads. A group's id
        # reused by a new group dict passes only if that group holds the same params with the same options: then
        # the record serves it as well.)
        self._steady = dict(
            state=self.state, state_keys=list(map(id, self.state)), state_values=list(map(id, self.state.values())),
            groups=list(map(id, self.param_groups)), ids=ids,
            sizes=[len(g["params"]) for g in self.param_groups],
            without_grad=[i for i, k in enumerate(ids) if k not in with_grad], per_group=per_group, used=False,
            cuda=any(d.type == "cuda" for d in devices), device=next(iter(devices)) if len(devices) == 1 else None,
            dtensor=any(b.dparams is not None for _, _, bs, _ in per_group for b in bs),
            wide=any(b.steps is not None for _, _, bs, _ in per_group for b in bs))

    def _steady_step(self):
        """[(group, params with grads, units)] for this step from the record, or None (plan in full). units as
        _units makes them."""
        rec = self._steady
        if rec is None or torch.compiler.is_compiling():
            return None
        state, groups = self.state, self.param_groups
        # The state holds the same entries, as ids (a dict's keys and values are swept without hashing the params:
        # a lookup per param calls Tensor.__hash__ in Python, ~0.1-0.15 us each). The params with grads and their
        # state dicts are held by the record, so their ids are theirs alone: each maps to its recorded dict.
        if (state is not rec["state"] or list(map(id, state)) != rec["state_keys"]
                or list(map(id, state.values())) != rec["state_values"] or list(map(id, groups)) != rec["groups"]):
            return None
        params = list(chain.from_iterable(g["params"] for g in groups))
        # (the sizes too: a param moved to the next group, the flattened order unchanged, takes that group's options)
        if [len(g["params"]) for g in groups] != rec["sizes"] or list(map(id, params)) != rec["ids"]:
            return None
        if any(map(is_not, map(_grad, map(params.__getitem__, rec["without_grad"])), repeat(None))):
            return None  # a param without a grad at the last step has one now
        if rec["cuda"] and torch.cuda.is_current_stream_capturing():
            return None  # a capture needs the full planning's per-param step counts
        out = []
        usable = bucket_usable()
        try:
            for gi, ps, buckets, options in rec["per_group"]:
                group = groups[gi]
                if self._plan_options(group) != options:
                    return None
                units = []
                for b in buckets:
                    gs = b.grads_if_unchanged(usable)
                    if gs is None:
                        return None
                    if b.steps is not None:  # float64 params: torch's fused Adam, given the grads (no C++ bucket)
                        units.append(((b.params, gs, *b.lists), b.steps, WIDE, None))
                        continue
                    if usable and b.bucket is None:
                        if b.plain:
                            b.bucket = new_bucket(b.params, *b.lists)  # (every param has its grad: checked just now)
                        elif b.dparams is not None and BUCKET_TAKES_GRADS:
                            # DTensor params: the state lists held all the same, and the local grads given at each
                            # launch (a local shard has no .grad: no signature, the checks above are the Python ones)
                            b.bucket = new_bucket([], *b.lists)
                    units.append(((b.params, None if gs is True else gs, *b.lists), b.buf, self.backend,
                                  b.bucket if usable else None))
                out.append((group, ps, units))
        except (RuntimeError, TypeError, KeyError, AttributeError):  # something the checks cannot read (a recorded
            # DTensor param whose class was changed: no _local_tensor): the full planning names it
            return None
        rec["used"] = True
        return out

    def _steady_grads(self, collected):
        """{device: this step's grads in collected's order} for the norm pass, when the record's params are all on
        one device and none is a DTensor's (else None: the pass sorts them itself, and sums DTensor shards across
        their meshes)."""
        dev = self._steady["device"]
        if dev is None or self._steady["dtensor"]:  # (float64 grads among them: _grad_stats sums them apart)
            return None
        return {dev: list(chain.from_iterable(map(_grad, ps) for _, ps in collected))}

    def _steady_noted(self):
        """After a step from the record: each master-carrying param's version counter as our launch left it (kept in
        the record; _forget_steady hands them to the plans). Before the launch they equalled b.versions (checked by
        grads_if_unchanged); every backend's launch moves them (as torch's in-place ops do), views of one buffer
        share a counter, so they are read, not predicted (~70 ns a param)."""
        for _, _, buckets, _ in self._steady["per_group"]:
            for b in buckets:
                if b.versions is not None:
                    b.versions = b.read_versions()

    def _forget_steady(self):
        """Before a fully planned step: drop the record, its params' versions handed back to their plans. A record
        no step used doubles the wait before the next (the class docstring)."""
        rec, self._steady = self._steady, None
        if rec is not None:
            if rec["used"]:
                self._steady_backoff = 1
            else:
                self._steady_wait = self._steady_backoff
                self._steady_backoff = min(2 * self._steady_backoff, 16)
            for _, _, buckets, _ in rec["per_group"]:
                for b in buckets:
                    if b.versions is not None:
                        for plan, v in zip(b.plans, b.versions):
                            plan[self._VER] = v

    def _plan_options(self, group):
        """The group's options a plan rests on (Adam._bucket_group)."""
        return (group["amsgrad"], group["master_weights"], group["state_dtype"], self.backend)


