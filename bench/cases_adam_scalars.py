"""adam_scalars cases: the per-tensor [step_size, bc2_sqrt, decay] of one Adam step from a bucket's step counters,
mixprec::adam_scalars (one kernel) against its definition, the torch expression adam_scalars_reference (~13 small
ops). A host-time / launch-count case: the bytes (4 read + 12 written per counter) are tiny, so GB/s says little;
the time and the ratio are what matter. Served by the "cpu" and "cuda" backends only ("triton" and "torch" steps
use the expression itself)."""

from __future__ import annotations

import torch

from mixprec_ops.ops.adam import adam_scalars_reference

from .registry import BASELINE, Case, Ctx, Impl, bit_mismatch, register

HP = (0.9, 0.999, 0.01)  # beta1, beta2, weight_decay


def _make(n, device, seed, equal=False):
    """n random step counters, or (equal) one random value n times: a bucket whose params all step together, the
    usual case, which the CPU kernel computes once per run of equal counters."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    steps = torch.randint(0, 100_000, (1 if equal else n,), generator=g).float().expand(n).contiguous().to(device)
    return {"steps": steps, "lr": torch.full((), 1e-3, dtype=torch.float32, device=device)}


def _case(ctx: Ctx, n: int, equal: bool = False) -> Case:
    dev = ctx.device

    def ours(d):
        return torch.ops.mixprec.adam_scalars(d["steps"], d["lr"], 0.0, *HP)

    def check(impl: Impl):
        d = _make(n, dev, seed=777, equal=equal)
        return bit_mismatch(impl.fn(d), adam_scalars_reference(d["steps"], d["lr"], *HP), "scalars")

    impls = [Impl(BASELINE, lambda d: adam_scalars_reference(d["steps"], d["lr"], *HP),
                  "adam_scalars_reference: the fp64 torch expression (~13 ops)")]
    impls += [Impl(b, ours) for b in ctx.backends if b in ("cpu", "cuda")]
    name = f"{n} equal step counters" if equal else f"{n} step counters"
    return Case("adam_scalars", name, n, 16 * n, lambda seed: _make(n, dev, seed, equal), impls, check,
                notes=["adam_scalars: launch-bound; 4 B read + 12 B written per counter"])


@register("adam_scalars")
def cases(ctx: Ctx) -> list[Case]:
    if not hasattr(torch.ops.mixprec, "adam_scalars"):
        return []
    return [_case(ctx, 40), _case(ctx, 2000), _case(ctx, 2000, equal=True)]
