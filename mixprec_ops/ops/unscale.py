"""unscale_: in place t *= inv_scale over many tensors, found_inf flag, optional global L2 norm, in one pass.

Side by side: the reference (pure torch), the fake of the C++ op mixprec::unscale_ (schema csrc/schemas.cpp; CPU
kernel csrc/cpu/unscale.cpp; CUDA kernel csrc/cuda/unscale.cu), the Triton op mixprec::unscale_triton_ (kernel in
triton_kernels/unscale.py) and the public function.
"""

from __future__ import annotations

import torch

from .. import _checks, _ext, backends

OP = "unscale_"
backends.register_op(OP, ("cuda", "triton", "cpu"))


def unscale_reference(tensors, inv_scale, found_inf, return_norm=False):
    """Pure-torch reference: fp32 products rounded once into each tensor's dtype; norm accumulated in fp64."""
    inv = inv_scale.reshape(())
    bad = torch.zeros((), dtype=torch.bool, device=inv_scale.device)
    sumsq = torch.zeros((), dtype=torch.float64, device=inv_scale.device)
    for t in tensors:
        v = t.float() * inv
        r = v.to(t.dtype)  # non-finite once stored counts: a finite fp32 product can overflow fp16
        bad |= ~r.isfinite().all()
        if return_norm:
            sumsq += v.double().square().sum()
        t.copy_(r)
    found_inf.copy_(torch.where(bad, torch.ones_like(found_inf), found_inf))  # no host sync
    return sumsq.sqrt().float() if return_norm else None


if _ext.LOADED:

    @torch.library.register_fake("mixprec::unscale_")
    def _unscale_fake(tensors, inv_scale, found_inf, return_norm):
        # Mixed devices can route a real call here (a meta tensor among CPU ones): refuse it, not a silent no-op.
        _check_tensors(tensors, inv_scale.device)
        _checks.device_scalar(found_inf, "found_inf", inv_scale.device)
        return inv_scale.new_empty(() if return_norm else (0,))


_triton_op = None
# (the Triton op's body, never traced: its sweep over thousands of grads as map over the unbound method, in C, ~30%
# faster than a generator expression)
_contiguous = torch.Tensor.is_contiguous


def _unscale_triton_impl(tensors, inv_scale, found_inf, return_norm, grouped=None):
    """The Triton op's body: the tensors grouped by dtype (a non-dense one through a dense copy, written back),
    then one launch per dtype. `grouped`: torch's grouping of these very tensors, when the caller's check made it."""
    from ..triton_kernels.unscale import launch_unscale

    copy_back = []
    if all(map(_contiguous, tensors)):  # grads as autograd makes them: no per-tensor work below
        work = tensors
    else:
        work = []
        for t in tensors:
            w = t if _checks.walkable(t) else t.contiguous()
            if w is not t:
                copy_back.append((t, w))
            work.append(w)
    # by dtype, each list in the given order (torch's C++ grouping, which refuses an empty list)
    if grouped is None or work is not tensors:
        grouped = _group_by_device_and_dtype([list(work)], False) if work else {}
    groups = {dtype: lists[0] for (_, dtype), (lists, _) in grouped.items()}
    norm = launch_unscale(groups, inv_scale, found_inf, return_norm)
    for t, w in copy_back:
        t.copy_(w)
    return norm if norm is not None else inv_scale.new_empty((0,))


def _get_triton_op():
    """mixprec::unscale_triton_, registered on first use. A custom_op rather than a triton_op: the kernel reads
    tensor addresses from a table built on the host, which torch.compile cannot trace; the op stays opaque."""
    global _triton_op
    if _triton_op is None:

        @torch.library.custom_op("mixprec::unscale_triton_", mutates_args={"tensors", "found_inf"})
        def unscale_triton_(tensors: list[torch.Tensor], inv_scale: torch.Tensor, found_inf: torch.Tensor,
                            return_norm: bool) -> torch.Tensor:
            return _unscale_triton_impl(tensors, inv_scale, found_inf, return_norm)

        @unscale_triton_.register_fake
        def _(tensors, inv_scale, found_inf, return_norm):
            return inv_scale.new_empty(() if return_norm else (0,))

        _triton_op = unscale_triton_
    return _triton_op


_OK_DTYPES = frozenset(_checks.FLOAT_SOURCES)
_group_by_device_and_dtype = torch._C._group_tensors_by_device_and_dtype  # C++; torch >= 2.1


_select = backends.selector(OP, _get_triton_op)  # registers the Triton op when it picks it
_CPP_BACKENDS = frozenset(("cuda", "cpu"))  # the backends served by the C++ op mixprec::unscale_


def _check_tensors(tensors, device):
    """Validate the list in one cheap sweep (thousands of grads per step); find the culprit only on failure.
    torch's C++ grouping by (device, dtype) plus one sweep over the layouts: 0.26 ms for 2,000 tensors on the
    2-core CI CPU, against 0.45 ms for a Python sweep over (dtype, device, layout) (reading .device builds a
    torch.device object per tensor). Returns that grouping (the Triton route launches by it), or None for an empty
    list."""
    try:
        grouped = _group_by_device_and_dtype([list(tensors)], False) if tensors else {}
        layouts = {t.layout for t in tensors}  # (not map over an attrgetter: a compiled step traces this)
    except (AttributeError, TypeError, RuntimeError):  # a non-tensor in the list: the loop below names it
        grouped = layouts = None
    if grouped is not None and layouts <= {torch.strided} and all(d in _OK_DTYPES and dev == device
                                                                  for dev, d in grouped):
        return grouped or None
    for i, t in enumerate(tensors):
        _checks.float_tensor(t, f"tensors[{i}]")
        if t.device != device:
            raise ValueError(f"tensors[{i}] is on {t.device} but inv_scale is on {device}; all must share one device")


def _check_writable(tensors):
    """What an in-place write would refuse partway through the list, refused before any is written: a tensor whose
    elements share memory (expanded, or an overlapping view: the C++ op's own rule, may_share_memory in
    csrc/common.h, which also refuses an exotic as_strided view it cannot prove free of overlap), and with grad mode
    on, a leaf that requires grad or a view of one (the Triton op wrote such a view, and so the leaf, unrefused)."""
    if not all(map(_contiguous, tensors)):  # (a contiguous tensor never overlaps itself)
        for i, t in enumerate(tensors):
            if not t.is_contiguous() and _may_share_memory(t):
                raise ValueError(f"tensors[{i}] has elements that share memory (an expanded or overlapping view); "
                                 "unscale_ writes it in place")
    if torch.is_grad_enabled() and any(map(_checks.requires_grad, tensors)):
        for i, t in enumerate(tensors):
            base = t._base
            if t.requires_grad and (t.is_leaf or (base is not None and base.is_leaf and base.requires_grad)):
                what = "a leaf tensor" if t.is_leaf else "a view of a leaf tensor"
                raise RuntimeError(f"tensors[{i}] is {what} that requires grad; unscale_ writes it in place, which "
                                   "autograd refuses (call it under torch.no_grad(), or pass the grads)")


def _may_share_memory(t) -> bool:
    """csrc/common.h's may_share_memory: torch's internal-overlap test, and where that cannot tell, the sufficient
    rule that, dims ordered by stride, each stride exceeds the span of the smaller ones."""
    o = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: too hard to tell
    if o != 2:
        return o == 1
    span = 0
    for stride, size in sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def unscale_(tensors, inv_scale, found_inf, *, return_norm=False, backend=None):
    """Multiply every tensor by inv_scale in place; set found_inf to 1 if any element is inf or NaN.

    A fused, multi-tensor replacement for torch._amp_foreach_non_finite_check_and_unscale_ that also accepts
    bfloat16 (torch's rejects it), mixes float32/float16/bfloat16 tensors in one call, and can return the global
    L2 norm of the unscaled values from the same pass (for fused gradient clipping).

    Args:
        tensors: a tensor or a sequence of float32/float16/bfloat16 tensors, all on inv_scale's device. They must
            not overlap one another (nor may one tensor appear twice): the kernels unscale them in parallel, so an
            element reached twice is scaled once or twice, unpredictably. A tensor overlapping itself (expanded)
            is refused; overlap across tensors is not looked for (it would cost a sort of every tensor's memory
            range per call), and optimizers' param lists never have it.
        inv_scale: 1-element float32 tensor (read on the device: no host sync).
        found_inf: 1-element float32 tensor; set to 1.0 if any unscaled value, as stored in its tensor's dtype, is
            inf or NaN (so an fp16 value that overflows when inv_scale > 1 counts too); otherwise left as is.
            With inv_scale == 1 the kernels only read (nothing can change): a pure inf/NaN (and norm) probe.
        return_norm: also return sqrt(sum of squares) of all unscaled values as a 0-dim float32 tensor. Every
            kernel squares in fp32 (as torch.nn.utils.clip_grad_norm_ and torch.linalg.vector_norm do for fp32),
            whatever the tensor's size, so a finite value beyond ~1.8e19 gives an inf norm and values below ~1e-23
            add nothing; partial sums are combined in fp64, in a backend-specific order (norms may differ in the
            last bit between backends). The reference squares in fp64: the tests hold the kernels to it within
            that range.
        backend: "auto" (default, or MIXPREC_BACKEND), "cuda", "triton", "cpu" or "torch".

    Returns:
        The norm if return_norm, else None.
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(f"tensors must be a tensor or a sequence of tensors, got {type(tensors).__name__}") from None
    _checks.device_scalar(inv_scale, "inv_scale", getattr(inv_scale, "device", None))
    _checks.device_scalar(found_inf, "found_inf", inv_scale.device, contiguous=True)
    _checks.boolean(return_norm, "return_norm")
    b = _select(inv_scale.device, backend)
    if torch.compiler.is_compiling():  # (the op's fake and its kernel check the rest)
        _check_tensors(tensors, inv_scale.device)
        return _run(b, tensors, inv_scale, found_inf, return_norm)
    if b in _CPP_BACKENDS:
        # The C++ op checks every tensor before it touches any (csrc/common.h check_unscale_args), so the Python
        # sweeps run only to word its error: ~45% of a 2,000-tensor call's host time saved (bench/NOTES.md).
        try:
            return _run(b, tensors, inv_scale, found_inf, return_norm)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
            failed = e
        _check_tensors(tensors, inv_scale.device)  # (outside the handler: the error alone, as a user's own)
        _check_writable(tensors)
        raise failed  # what the sweeps do not look for
    # the reference and the Triton op write tensor by tensor, or copy a non-dense one back: all checks first
    grouped = _check_tensors(tensors, inv_scale.device)
    _check_writable(tensors)
    return _run(b, tensors, inv_scale, found_inf, return_norm, grouped)


def unscale_checked_(tensors, inv_scale, found_inf, return_norm, backend):
    """unscale_ past its argument checks, for a caller that has made the same checks: a list of plain strided
    float32/float16/bfloat16 tensors on inv_scale's device, inv_scale and found_inf 1-element float32 tensors there
    (the optimizer's steady step, whose grads its metadata signature has checked; ~0.3 us a tensor saved)."""
    return _run(_select(inv_scale.device, backend), tensors, inv_scale, found_inf, return_norm)


def _run(b, tensors, inv_scale, found_inf, return_norm, grouped=None):
    """unscale_ on backend `b`, past every check (`grouped`: the check's grouping of the tensors, if it made one)."""
    if b == "torch":
        return unscale_reference(tensors, inv_scale, found_inf, return_norm)
    if b == "triton":
        from ..triton_kernels import device_guard

        with device_guard(inv_scale.device):
            if _checks.plain_eager([tensors], [inv_scale, found_inf]):
                # the op's body itself, and the versions bumped in one call (the custom op's wrapper bumps them one
                # Python call a tensor: 2 ms of a 2,000-grad call's ~2.6 ms host time on the CI CPU)
                _get_triton_op()  # registered all the same: the op exists whichever route a call takes
                norm = _unscale_triton_impl(tensors, inv_scale, found_inf, return_norm, grouped)
                torch._C._increment_version([*tensors, found_inf])
            else:
                norm = _get_triton_op()(tensors, inv_scale, found_inf, return_norm)
    else:
        norm = torch.ops.mixprec.unscale_(tensors, inv_scale, found_inf, return_norm)
    return norm if return_norm else None
