"""adam_step_: one fused Adam/AdamW step over many tensors, fp32 math, optional fp32 master weights.

Side by side: the reference (pure torch; THE definition every backend reproduces bit for bit), the per-tensor
scalar preparation shared by all backends, the fake of the C++ op mixprec::adam_step_ (schema csrc/schemas.cpp; CPU
kernel csrc/cpu/adam.cpp; CUDA kernel csrc/cuda/adam.cu), the Triton op mixprec::adam_step_triton_ (kernel in
triton_kernels/adam.py) and the dispatching function. The optimizer classes live in mixprec_ops/optim.

Element-wise definition (every operation is one IEEE fp32 operation, rounded to nearest even; no fused
multiply-add, so that the C++, CUDA and Triton kernels match the reference bit for bit):

    g = float(grad)
    if grad_scale:  g = g / grad_scale          # AMP: grads arrive multiplied by the loss scale
    if clip_coef:   g = g * clip_coef           # fused global-norm clipping
    if maximize:    g = -g
    w = master if masters else float(param)
    if weight_decay != 0:
        if decoupled: w = w * decay             # AdamW: decay = fp32(1 - lr * weight_decay)
        else:         g = g + w * wd            # Adam (L2): wd = fp32(weight_decay)
    m = float(exp_avg) * beta1 + g * omb1       # beta1 = fp32(beta1), omb1 = fp32(1 - beta1) (1 - beta1 in fp64)
    v = float(exp_avg_sq) * beta2 + (g * g) * omb2
    if amsgrad: vmax = maximum(float(max_exp_avg_sq), v) (NaN propagates); vv = vmax  else: vv = v
    denom = sqrt(vv) / bc2_sqrt + eps           # sqrt correctly rounded (IEEE sqrtf)
    w = w - step_size * (m / denom)
    store: master = w; param = round(w) (to param dtype); exp_avg = round(m), exp_avg_sq = round(v),
           max_exp_avg_sq = round(vmax) (to the state dtype: fp32, or bf16 with round-to-nearest-even)

Per tensor, [step_size, bc2_sqrt, decay] = fp32 of fp64 [lr / (1 - beta1**t), sqrt(1 - beta2**t), 1 - lr*wd] with
t = step + 1, computed once per call on the device by `adam_scalars` (so all backends see the same scalars; the C++ op
mixprec::adam_scalars, kernels csrc/cpu/adam_scalars.cpp and csrc/cuda/adam_scalars.cu, one launch per bucket).
If found_inf holds a non-zero value nothing is written (params, masters, states are left bit-unchanged).

dtypes (one bucket, every backend): params float32, float16 or bfloat16; grads the params' dtype or float32;
states float32 or bfloat16; masters (float32) only with float16/bfloat16 params.
"""

from __future__ import annotations

import torch

from .. import _checks, _ext, backends

OP = "adam_step_"
backends.register_op(OP, ("cuda", "triton", "cpu"))
# mixprec::adam_scalars has C++ kernels only (Triton steps take the reference's scalars); registered so that
# backends.report() and the bench can say where it runs.
backends.register_op("adam_scalars", ("cuda", "cpu"))


def adam_scalars_reference(steps, lr, beta1: float, beta2: float, weight_decay: float) -> torch.Tensor:
    """(n, 3) fp32 [step_size, bc2_sqrt, decay] for the step about to be taken (t = step + 1), computed in fp64 on
    the steps' device (no host sync; lr may be a device tensor). steps: a list of n 0-dim tensors or one tensor of n
    counters (the optimizer's per-bucket step buffer). Pure torch: the definition of mixprec::adam_scalars, and what
    serves devices the extension does not (about 13 small kernels where the op is one)."""
    t = (steps if isinstance(steps, torch.Tensor) else torch.stack(steps)).reshape(-1).double() + 1
    # a float lr as a tensor too (a fill, no copy from the host): float / tensor would be computed as
    # tensor.reciprocal() * float, two roundings, where torch's Adam divides once; and a CPU lr tensor, which the
    # optimizer reads on the host, must give the same scalars as the tensor itself
    lr_t = lr.double().reshape(()) if isinstance(lr, torch.Tensor) else torch.full_like(t, lr)
    step_size = lr_t / (1 - torch.pow(beta1, t))
    bc2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
    decay = (1 - lr_t * weight_decay) * torch.ones_like(t)
    return torch.stack([step_size, bc2_sqrt, decay], dim=1).float()


# Device types whose mixprec::adam_scalars kernel the loaded extension has: looked up once here, not during a call,
# which torch.compile may be tracing (the dispatcher query does not trace).
_SCALARS_OP = {t: _ext.has_kernel("adam_scalars", key) for t, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def adam_scalars(steps, lr, beta1: float, beta2: float, weight_decay: float, *, backend=None) -> torch.Tensor:
    """adam_scalars_reference's values for an adam_step_ served by `backend` (a name adam_step_ takes; None /
    "auto" is resolved as adam_step_ resolves it). The "cpu" and "cuda" backends get them from one op,
    mixprec::adam_scalars (their extension's C++ / CUDA kernel; float32 steps, lr a float or a float32 / float64
    tensor on the steps' device), saving ~12 kernel launches per bucket and step; "torch" and "triton" from the
    reference (pure torch, which also serves a GPU the extension was not built for). Same bits either way
    (tests/test_adam_kernels.py)."""
    s = steps if isinstance(steps, torch.Tensor) else torch.stack(steps)
    if backend not in ("cpu", "cuda", "torch", "triton"):
        backend = _select(s.device, backend)
    if backend in ("cpu", "cuda") and s.dtype == torch.float32 and _SCALARS_OP.get(s.device.type, False):
        if not isinstance(lr, torch.Tensor):
            return torch.ops.mixprec.adam_scalars(s, None, float(lr), float(beta1), float(beta2),
                                                  float(weight_decay))
        if lr.dtype in (torch.float32, torch.float64) and lr.numel() == 1 and lr.device == s.device:
            return torch.ops.mixprec.adam_scalars(s, lr, 0.0, float(beta1), float(beta2), float(weight_decay))
    return adam_scalars_reference(s, lr, beta1, beta2, weight_decay)


def _f32(v, device):
    # A fill kernel, not torch.tensor(v, device=...): that copies from pageable host memory and syncs the stream,
    # which is a host sync per step and fails inside a CUDA graph capture.
    return torch.full((), v, dtype=torch.float32, device=device)


def adam_step_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, scalars, beta1, beta2, eps,
                        weight_decay, decoupled, maximize, grad_scale=None, found_inf=None, clip_coef=None):
    """Pure-torch reference of one step (see the module docstring). Works on any device without host syncs."""
    if not params:
        return
    dev = params[0].device
    b1, b2, omb1, omb2 = _f32(beta1, dev), _f32(beta2, dev), _f32(1.0 - beta1, dev), _f32(1.0 - beta2, dev)
    e, wd = _f32(eps, dev), _f32(weight_decay, dev)
    skip = None if found_inf is None else found_inf.reshape(()) != 0

    def put(dst, val):
        val = val.to(dst.dtype)
        dst.copy_(val if skip is None else torch.where(skip, dst, val))

    for i, p in enumerate(params):
        g = grads[i].float()
        if grad_scale is not None:
            g = g / grad_scale.reshape(())
        if clip_coef is not None:
            g = g * clip_coef.reshape(())
        if maximize:
            g = -g
        w = masters[i].clone() if masters else p.float()
        step_size, bc2_sqrt, decay = scalars[i, 0], scalars[i, 1], scalars[i, 2]
        if weight_decay != 0:
            if decoupled:
                w = w * decay
            else:
                g = g + w * wd
        m = exp_avgs[i].float() * b1 + g * omb1
        v = exp_avg_sqs[i].float() * b2 + (g * g) * omb2
        if max_exp_avg_sqs:
            vv = torch.maximum(max_exp_avg_sqs[i].float(), v)
            put(max_exp_avg_sqs[i], vv)
        else:
            vv = v
        # IEEE sqrt: torch's CPU fp32 sqrt (Sleef, 0.5001 ulp) is 1 ulp off for ~1 in 6 inputs; the square root
        # of a float computed in double and rounded once to float is the correctly rounded fp32 square root.
        denom = vv.double().sqrt().float() / bc2_sqrt + e
        w = w - step_size * (m / denom)
        put(exp_avgs[i], m)
        put(exp_avg_sqs[i], v)
        if masters:
            put(masters[i], w)
        put(p, w)


if _ext.LOADED and hasattr(torch.ops.mixprec, "adam_scalars"):  # (an extension built before the op lacks it)

    @torch.library.register_fake("mixprec::adam_scalars")
    def _adam_scalars_fake(steps, lr, lr_value, beta1, beta2, weight_decay):
        # the C++ checks (csrc/common.h, check_adam_scalars_args), so that a compiled graph fails where eager does
        if steps.dtype != torch.float32:
            raise RuntimeError(f"steps must be a float32 tensor, got {steps.dtype}")
        if lr is not None:
            if lr.dtype not in (torch.float32, torch.float64):
                raise RuntimeError(f"lr must be a float32 or float64 tensor, got {lr.dtype}")
            if lr.numel() != 1:
                raise RuntimeError(f"lr must have exactly 1 element, got shape {list(lr.shape)}")
            if lr.device != steps.device:
                raise ValueError(f"lr must be on {steps.device} (the steps' device), got {lr.device}")
        return steps.new_empty((steps.numel(), 3), dtype=torch.float32)


if _ext.LOADED:

    @torch.library.register_fake("mixprec::adam_step_")
    def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, scalars, beta1, beta2, eps,
                        weight_decay, decoupled, maximize, grad_scale, found_inf, clip_coef):
        # Mixed devices can route a real call here (one meta tensor among CPU ones): refuse it, not a silent no-op.
        if not params:
            return None
        dev = params[0].device
        lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                 "max_exp_avg_sqs": max_exp_avg_sqs, "masters": masters}
        for name, lst in lists.items():
            for i, t in enumerate(lst):
                if t.device != dev:
                    raise ValueError(f"{name}[{i}] is on {t.device} but params[0] is on {dev}; all must share one "
                                     "device")
        for name, t in (("scalars", scalars), ("grad_scale", grad_scale), ("found_inf", found_inf),
                        ("clip_coef", clip_coef)):
            if t is not None and t.device != dev:
                raise ValueError(f"{name} must be on {dev} (the params' device), got {t.device}")
        return None


_triton_op = None


def _get_triton_op():
    """mixprec::adam_step_triton_, registered on first use. A custom_op (opaque to torch.compile): the kernel reads
    tensor addresses from a device table, which tracing cannot follow."""
    global _triton_op
    if _triton_op is None:
        from ..triton_kernels.adam import launch_adam_step

        @torch.library.custom_op("mixprec::adam_step_triton_",
                                 mutates_args={"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters"})
        def adam_step_triton_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                              exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                              masters: list[torch.Tensor], scalars: torch.Tensor, beta1: float, beta2: float,
                              eps: float, weight_decay: float, decoupled: bool, maximize: bool,
                              grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
                              clip_coef: torch.Tensor | None) -> None:
            launch_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, scalars, beta1, beta2,
                             eps, weight_decay, decoupled, maximize, grad_scale, found_inf, clip_coef)

        @adam_step_triton_.register_fake
        def _(*args):
            return None

        _triton_op = adam_step_triton_
    return _triton_op


def _check_combination(pt, gt, has_master):
    """The dtype combinations every backend takes (the CUDA kernel instantiates only these): grads in the params'
    dtype or float32, masters only for 16-bit params. The C++ kernels raise the same messages."""
    if gt is not None and gt != pt and gt != torch.float32:
        raise RuntimeError(f"grads must have the params' dtype ({pt}) or float32, got {gt}")
    if has_master and pt == torch.float32:
        raise RuntimeError("masters must be empty when params are float32")


_select = backends.selector(OP, _get_triton_op)  # registers the Triton op when it picks it
# the extension has mixprec::AdamBucket, adam_bucket_unchanged and adam_step_bucket_ taking the step counters (one
# built before them has not)
_HAS_BUCKET = (_ext.LOADED and _ext.has_kernel("adam_bucket_unchanged", "CompositeExplicitAutograd")
               and _ext.has_kernel("adam_step_bucket_", "CompositeExplicitAutograd"))


def _past_packet(packet):
    """An op's C++ entry, past its torch.ops packet: the packet of an op taking a script object first walks every
    argument, list items included, looking for a FakeScriptObject (torch/_ops.py _must_dispatch_in_python; 25 us at
    40 params, 0.5-1 ms at 2,000 on the CI CPU). Only compile/export make those, and a bucket is passed only in plain
    eager execution (bucket_usable). The packet itself where a torch lacks the attribute."""
    return getattr(packet, "_op", packet)


_BUCKET_OP = _past_packet(torch.ops.mixprec.adam_step_bucket_) if _HAS_BUCKET else None
# adam_step_bucket_ takes the grads too (DTensor params' local shards); an extension built before that has not
BUCKET_TAKES_GRADS = _HAS_BUCKET and any(
    a.name == "grads" for a in torch.ops.mixprec.adam_step_bucket_.default._schema.arguments)
_UNCHANGED_OP = _past_packet(torch.ops.mixprec.adam_bucket_unchanged) if _HAS_BUCKET else None
_NO_SUBCLASS_TORCH_FUNCTION = torch._C.DisableTorchFunctionSubclass


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, scalars, beta1, beta2, eps,
               weight_decay, decoupled, maximize, grad_scale=None, found_inf=None, clip_coef=None, *, backend=None):
    """Dispatch one fused step over a bucket of tensors that share (param dtype, grad dtype, state dtype, masters
    or not) and one device. Callers (mixprec_ops.optim) validate; this layer only picks the backend."""
    if not params:
        return
    b = _select(params[0].device, backend)
    if b in ("torch", "triton"):  # the C++ kernels check the same (csrc/cpu/adam.cpp, csrc/cuda/adam.cu)
        # len(masters) > 0, not bool(masters): torch 2.11's Dynamo cannot trace bool() of a list (a compiled step)
        _check_combination(params[0].dtype, grads[0].dtype if grads else None, len(masters) > 0)
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, scalars, float(beta1), float(beta2),
            float(eps), float(weight_decay), bool(decoupled), bool(maximize), grad_scale, found_inf, clip_coef)
    if b == "torch":
        adam_step_reference(*args)
    elif b == "triton":
        from ..triton_kernels import device_guard

        with device_guard(params[0].device):
            op = _get_triton_op()
            if _checks.plain_eager(args[:6], (scalars, grad_scale, found_inf, clip_coef)):
                # the op's body itself, and the mutated lists' versions bumped in one call: the custom op's wrapper
                # bumps them one Python call a tensor (~1 us each: 8,000 for 2,000 params with masters)
                from ..triton_kernels.adam import launch_adam_step

                launch_adam_step(*args)
                torch._C._increment_version([*params, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs, *masters])
            else:
                op(*args)
    else:
        torch.ops.mixprec.adam_step_(*args)


# The bucket: the optimizer's steady-state step (mixprec_ops/optim/_steady.py) keeps each launch's state lists on the
# C++ side (csrc/adam_bucket.h), so that a step converts only the params from Python (~0.1 us a tensor), checks
# their metadata in one call and launches the scalars, the step and the counters' count in one more.

def bucket_usable() -> bool:
    """Whether a bucket may be passed now: the extension has it, and plain eager execution that nothing needs to see
    an op in (no mode, no torch.func transform): a bucket is a torch.ScriptObject, which fake tensors and transforms
    do not take, and its ops are called past their packets (_past_packet)."""
    return _HAS_BUCKET and _checks.eager_untransformed()


def new_bucket(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters):
    """A torch.classes.mixprec.AdamBucket holding these state lists and the signature of `params` (each with its
    grad; their metadata only, not the tensors), for bucket_unchanged and adam_step_bucket_; None when the loaded
    extension lacks it. With no params (DTensor params' local shards, which have no grads to sign) the bucket has no
    signature: its launches are given the grads, and bucket_unchanged does not serve it."""
    if not _HAS_BUCKET:
        return None
    return torch.classes.mixprec.AdamBucket(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters)


def bucket_unchanged(params, bucket) -> bool:
    """Whether params (torch.Tensor or nn.Parameter objects, no subclass) still have the signature `bucket` was made
    with: the same metadata and data pointers, each with a grad of the same kind (mixprec::param_grad_signature's
    contents; csrc/param_grad_signature.cpp). Only when bucket_usable()."""
    # Subclasses' torch function handling off for the call: torch would look up __torch_function__ on the bucket (a
    # torch.ScriptObject), where the failed lookup throws and catches a C++ exception and formats a Python
    # AttributeError: ~15 us a call on the CI CPU. Plain params have no __torch_function__ of their own to miss.
    with _NO_SUBCLASS_TORCH_FUNCTION():
        return _UNCHANGED_OP(params, bucket)


def adam_step_bucket_(params, bucket, steps, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                      grad_scale=None, found_inf=None, clip_coef=None, grads=None):
    """One launch of the C++ / CUDA backend over params and the state lists `bucket` holds, the grads read from the
    params (p.grad) at the call, or `grads` (one a param; only where BUCKET_TAKES_GRADS): the scalars from `steps`
    (the bucket's step buffer: 1-D float32, one counter a param, on the params' device) and lr (a float, or a
    1-element float32 / float64 tensor on that device), adam_step_, then steps += 1, or + (found_inf == 0) with a
    found_inf: what adam_scalars, adam_step_ and steps.add_ do, in one op call (mixprec::adam_step_bucket_). Params
    as for bucket_unchanged; only when bucket_usable()."""
    lr_t, lr_value = (lr, 0.0) if isinstance(lr, torch.Tensor) else (None, float(lr))
    if BUCKET_TAKES_GRADS:
        extra = ([] if grads is None else grads,)  # (empty: the op reads the params' own)
    elif grads is None:
        extra = ()
    else:
        raise RuntimeError("this build of the extension's adam_step_bucket_ does not take grads; reinstall mixprec_ops")
    with _NO_SUBCLASS_TORCH_FUNCTION():  # (as in bucket_unchanged)
        _BUCKET_OP(params, bucket, steps, lr_t, lr_value, float(beta1), float(beta2), float(eps), float(weight_decay),
                   bool(decoupled), bool(maximize), grad_scale, found_inf, clip_coef, *extra)
