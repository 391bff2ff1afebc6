"""unscale_ cases: in place t *= inv_scale over a list of grads + found_inf (+ the global L2 norm), against torch's
torch._amp_foreach_non_finite_check_and_unscale_ (what GradScaler.unscale_ calls).
Honest bytes per call: every grad read once and written once (2 x the bytes of all tensors).

Timing repeats the call on the same tensors with inv_scale alternating 2.0 and 0.5 per input set (exact in every
dtype, so values neither drift to 0/inf nor lose bits, and every call writes: with inv_scale = 1.0, what an earlier
version timed, our kernels take their read-only probe path while torch's kernel still writes, and the reported
bandwidth counted writes that never happened: the H200 run's 183% of copy). The correctness check runs each
implementation on fresh data with inv_scale = 1/3 (every product rounds), with an inf planted (found_inf must be
set), and with inv_scale = 1 (the probe path: nothing may change).

The GradScaler case times what an AMP loop pays per step for the same grads: GradScaler._unscale_grads_ over an
optimizer's params (what scaler.unscale_(opt) runs, and step() for its inf check), ours against
torch.amp.GradScaler's. At many params its host time is the loop over the params as much as the kernel."""

from __future__ import annotations

import math

import torch

from mixprec_ops import unscale_
from mixprec_ops.amp import GradScaler
from mixprec_ops.ops import unscale_reference

from .registry import BASELINE, UNCHECKED, Case, Ctx, Impl, bit_mismatch, close_mismatch, register

N_LARGE = 50


def large_sizes(total: int, count: int = N_LARGE) -> list[int]:
    """`count` tensor sizes summing to about `total`, spread log-normally like a model's parameters (a few big
    matrices, many small vectors); some sizes are odd so vector tails get exercised."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(count, generator=g, dtype=torch.float64).mul_(1.5).exp_()
    return [max(1, int(total * float(wi) / float(w.sum()))) + (i % 3) for i, wi in enumerate(w)]


def _amp_accepts(dtype: torch.dtype, device: torch.device) -> str | None:
    """None if torch's fused unscale accepts `dtype` on `device`, else its error."""
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(
            [torch.ones(8, dtype=dtype, device=device)], torch.zeros(1, device=device), torch.ones(1, device=device)
        )
        return None
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return str(e).splitlines()[0][:160]


def _make(sizes, dtype, device, seed, inv=None):
    """An input set. inv=None: a timing set, whose inv_scale alternates 2.0 and 0.5 from call to call (_inv)."""
    g = torch.Generator(device=device).manual_seed(seed)
    flat = torch.randn(sum(sizes), generator=g, device=device, dtype=torch.float32).to(dtype)
    ts = [c.clone() for c in flat.split(sizes)]  # separate allocations, aligned as real grads are
    invs = [torch.full((1,), v, device=device) for v in ((2.0, 0.5) if inv is None else (inv,))]
    return {"ts": ts, "invs": invs, "calls": [0], "found": torch.zeros(1, device=device)}


def _inv(d):
    """This call's inv_scale: the set's values alternate (2.0, 0.5, 2.0, ...), the same for every implementation."""
    k = d["calls"][0]
    d["calls"][0] = k + 1
    return d["invs"][k % len(d["invs"])]


def _case(ctx: Ctx, name: str, sizes: list[int], dtype: torch.dtype, norm: bool) -> Case:
    dev = ctx.device
    notes = []
    amp_err = _amp_accepts(dtype, dev)
    if amp_err is None:

        def unscale_base(d):
            torch._amp_foreach_non_finite_check_and_unscale_(d["ts"], d["found"], _inv(d))

        desc = "torch._amp_foreach_non_finite_check_and_unscale_"
    else:

        def unscale_base(d):
            torch._foreach_mul_(d["ts"], _inv(d).reshape(()))
            m = torch.stack(torch._foreach_norm(d["ts"], math.inf))  # max|t|: inf/NaN propagate, finite stays finite
            d["found"].copy_(torch.where(m.isfinite().all(), d["found"], torch.ones_like(d["found"])))

        desc = "torch._foreach_mul_ + _foreach_norm(inf) finite check"
        notes.append(f"torch's fused unscale rejects {dtype} on {dev.type} ({amp_err}); baseline is {desc}")
    if norm:

        def base(d):
            unscale_base(d)
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(d["ts"])))

        desc += " + linalg.vector_norm(stack(_foreach_norm))"
    else:
        base = unscale_base

    def ours(backend):
        return lambda d: unscale_(d["ts"], _inv(d), d["found"], return_norm=norm, backend=backend)

    def check(impl: Impl):
        if impl.backend == BASELINE and amp_err is not None:
            return UNCHECKED  # the stand-in (_foreach_mul_) rounds x * inv in the tensor's dtype: not the oracle
        for inv in (1.0 / 3.0, 1.0):  # every product rounds; then the read-only probe path
            d = _make(sizes, dtype, dev, seed=777, inv=inv)
            ref_ts, ref_found = [t.clone() for t in d["ts"]], torch.zeros(1, device=dev)
            ref_norm = unscale_reference(ref_ts, d["invs"][0], ref_found, return_norm=norm)
            out = impl.fn(d)
            for i, (t, r) in enumerate(zip(d["ts"], ref_ts, strict=True)):
                bad = bit_mismatch(t, r, f"tensors[{i}] (inv_scale {inv:.3g})")
                if bad:
                    return bad
            if float(d["found"]) != float(ref_found):
                return f"found_inf is {float(d['found'])} on finite data"
            if norm and (bad := close_mismatch(out, ref_norm, "norm", rtol=1e-4)):
                return bad
            del d, ref_ts
        d = _make(sizes, dtype, dev, seed=778, inv=1.0 / 3.0)
        t = d["ts"][len(sizes) // 2]
        t.view(-1)[t.numel() // 2] = math.inf
        impl.fn(d)
        return None if float(d["found"]) == 1.0 else "found_inf not set by an inf"

    nbytes = 2 * sum(sizes) * (torch.finfo(dtype).bits // 8)
    # torch's fused op reads and writes each grad once; the stand-in (_foreach_mul_ + a max-norm) reads once more,
    # and so does the norm's own pass
    base_bytes = nbytes // 2 * (2 + (amp_err is not None) + norm)
    impls = [Impl(BASELINE, base, desc)] + [Impl(b, ours(b)) for b in ctx.backends]
    return Case(
        "unscale_",
        name,
        sum(sizes),
        nbytes,
        lambda seed: _make(sizes, dtype, dev, seed),
        impls,
        check,
        set_bytes=nbytes // 2,
        tensor_bytes=nbytes // 2,
        baseline_bytes=base_bytes,
        notes=notes,
    )


def _scaler_make(sizes, device, seed, inv=None):
    """An input set for the GradScaler case: _make's grads as the .grad of params in one SGD optimizer."""
    d = _make(sizes, torch.float32, device, seed, inv)
    ps = [torch.nn.Parameter(torch.empty_like(t)) for t in d["ts"]]
    for p, t in zip(ps, d["ts"], strict=True):
        p.grad = t
    d["opt"], d["scalers"], d["device"] = torch.optim.SGD(ps, lr=0.1), {}, device
    return d


def _scaler_fn(cls, **kw):
    """One _unscale_grads_ call of a `cls` scaler (made at the set's first call) over the set's optimizer, with this
    call's inv_scale (_inv); returns the scaler's {device: found_inf}. An input set serves every implementation of
    the case: each keeps its own scaler in it."""
    which = (cls, tuple(sorted(kw.items())))

    def fn(d):
        inv = _inv(d)
        made = d["scalers"].get(which)
        if made is None:
            made = d["scalers"][which] = (cls(d["device"], **kw), torch.zeros((), device=d["device"]))
        scaler, found_inf = made
        return scaler._unscale_grads_(d["opt"], inv, found_inf, False)

    return fn


def _scaler_case(ctx: Ctx, name: str, sizes: list[int]) -> Case:
    dev = ctx.device

    def make(seed, inv=None):
        return _scaler_make(sizes, dev, seed, inv)

    def check(impl: Impl):  # (torch's scaler too: its fp32 kernel rounds the same fp32 products)
        for inv in (1.0 / 3.0, 1.0):
            d = make(777, inv)
            ref_ts, ref_found = [t.clone() for t in d["ts"]], torch.zeros(1, device=dev)
            unscale_reference(ref_ts, d["invs"][0], ref_found)
            per_device = impl.fn(d)
            for i, (t, r) in enumerate(zip(d["ts"], ref_ts, strict=True)):
                if bad := bit_mismatch(t, r, f"grads[{i}] (inv_scale {inv:.3g})"):
                    return bad
            if sum(float(v) for v in per_device.values()) != 0.0:
                return "found_inf set on finite data"
        d = make(778, 1.0 / 3.0)
        d["ts"][len(sizes) // 2].view(-1)[0] = math.inf
        per_device = impl.fn(d)
        return None if sum(float(v) for v in per_device.values()) == 1.0 else "found_inf not set by an inf"

    nbytes = 2 * sum(sizes) * 4
    impls = [Impl(BASELINE, _scaler_fn(torch.amp.GradScaler), "torch.amp.GradScaler._unscale_grads_")]
    impls += [Impl(b, _scaler_fn(GradScaler, backend=b)) for b in ctx.backends]
    return Case("unscale_", name, sum(sizes), nbytes, make, impls, check, set_bytes=nbytes // 2,
                tensor_bytes=nbytes // 2, baseline_bytes=nbytes,
                notes=["GradScaler: _unscale_grads_ over an SGD optimizer's params (scaler.unscale_(opt)'s work), "
                       "ours vs torch.amp.GradScaler's, f32 grads"])


@register("unscale_")
def cases(ctx: Ctx) -> list[Case]:
    if ctx.device.type == "cuda":
        total = 25_000_000 if ctx.quick else 100_000_000
    else:
        total = 4_000_000 if ctx.quick else 10_000_000
    big = large_sizes(total)
    small = [4096] * 2000
    return [
        _case(ctx, f"{N_LARGE} tensors f32", big, torch.float32, False),
        _case(ctx, f"{N_LARGE} tensors bf16", big, torch.bfloat16, False),
        _case(ctx, f"{N_LARGE} tensors f32 +norm", big, torch.float32, True),
        _case(ctx, "2000x4096 f32", small, torch.float32, False),
        _scaler_case(ctx, "GradScaler 2000x4096 f32", small),
    ]
