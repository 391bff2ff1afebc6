"""Adam/AdamW step cases: mixprec_ops.optim.AdamW with bf16 params, bf16 grads, fp32 masters and fp32 moments,
against the same work done the torch way: torch.optim.AdamW(fused=True) on fp32 params (fp32 grads) followed by
torch._foreach_copy_ into the bf16 model params ("torch", the ratio's baseline), and the same with foreach=True
("torch-foreach").

Honest bytes per param of our step: bf16 grad read 2 + fp32 master read/write 8 + m r/w 8 + v r/w 8 + bf16 param
write 2 = 28 B (the param is not read: the master holds it). ns/param = median time / params.
"""

from __future__ import annotations

import contextlib

import torch

from mixprec_ops.optim import AdamW

from .registry import BASELINE, UNCHECKED, Case, Ctx, Impl, bit_mismatch, register

BYTES_PER_PARAM = 28
# torch's fused AdamW on fp32: grad r 4, param r/w 8, m r/w 8, v r/w 8; then _foreach_copy_ fp32 r 4 -> bf16 w 2
TORCH_BYTES_PER_PARAM = 34
HP = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def split_sizes(total: int, count: int) -> list[int]:
    """`count` tensor sizes summing to about `total`, a few large matrices and smaller vectors, some odd."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(count, generator=g, dtype=torch.float64).mul_(1.2).exp_()
    return [max(1, int(total * float(wi) / float(w.sum()))) + (i % 3) for i, wi in enumerate(w)]


def _params(sizes, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    ps = []
    for n in sizes:
        p = torch.nn.Parameter((torch.randn(n, generator=g, device=device) * 0.02).to(dtype))
        p.grad = (torch.randn(n, generator=g, device=device) * 1e-3).to(dtype)
        ps.append(p)
    return ps


def _make(sizes, device, seed):
    """One input set: fp32 params+grads and bf16 copies for the torch baselines; bf16 params+grads for each of our
    backends, its own (made with its optimizer at its first call, in the warm-up): two of our optimizers stepping
    the same params would each see the other's writes as writes from outside and resync their masters every step
    (a one-sided cost: the Triton op moves the params' version counters, the C++ ops do not)."""
    return {"sizes": sizes, "seed": seed, "device": device, "fp32": _params(sizes, torch.float32, device, seed),
            "model": [torch.empty(n, dtype=torch.bfloat16, device=device) for n in sizes], "opts": {}, "bf16": {}}


def _ours(backend, label=None, tiles=None):
    """Our optimizer on `backend`, kept in the input set under `label` (default: the backend's name); `tiles`:
    (CHUNK, BLOCK, num_warps) of the Triton kernel for this implementation's steps (an experiment row)."""
    key = label or backend

    def fn(d):
        o = d["opts"].get(key)
        if o is None:
            ps = d["bf16"][key] = _params(d["sizes"], torch.bfloat16, d["device"], d["seed"])
            o = d["opts"][key] = AdamW(ps, **HP, backend=backend)
        if tiles is None:
            o.step()
        else:
            with _triton_tiles(*tiles):
                o.step()

    return fn


# An experiment row, not a backend (the targets skip labels with a colon): the Triton AdamW kernel at the tiles it
# had until 2026-11-30, a loop over 65536 elements in 1024-element blocks a program, 8 warps, beside the op's one
# 1024-element block a program with 4 warps (triton_kernels/adam.py says why that won: 90% and 96% of copy on the
# H200 at 100M and 1e9 params against 80% and 85%). Kept one more GPU run to confirm the swap on the op's own rows.
EXPERIMENT_TILES = "triton:chunk65536w8"
TILES = (65536, 1024, 8)


@contextlib.contextmanager
def _triton_tiles(chunk, block, warps):
    from mixprec_ops.triton_kernels import adam as ta

    old = ta.CHUNK, ta.BLOCK, ta.NUM_WARPS
    ta.CHUNK, ta.BLOCK, ta.NUM_WARPS = chunk, block, warps
    try:
        yield
    finally:
        ta.CHUNK, ta.BLOCK, ta.NUM_WARPS = old


def _torch(kind):
    def fn(d):
        o = d["opts"].get(kind)
        if o is None:
            o = d["opts"][kind] = torch.optim.AdamW(d["fp32"], **HP, fused=kind == "fused",
                                                    foreach=kind == "foreach")
        o.step()
        torch._foreach_copy_(d["model"], d["fp32"])

    return fn


CHECK_PARAMS = 100_000_000  # the check's size cap (it runs the reference too, on a second copy)


def _check(sizes, device):
    def check(impl: Impl):
        """Two steps of the implementation exactly as timed (impl.fn on an input set's bf16 params), bit for bit
        against the reference backend: every tensor of the case (more than one launch holds, tensors longer than
        one chunk), scaled down proportionally past CHECK_PARAMS."""
        if impl.backend.startswith(BASELINE):
            return UNCHECKED  # torch's own AdamW: fp32 params, another rounding order than the oracle's
        f = CHECK_PARAMS / sum(sizes)
        check_sizes = sizes if f >= 1 else [max(1, int(n * f)) + (n % 3) for n in sizes]
        mine = {"sizes": check_sizes, "seed": 99, "device": device, "opts": {}, "bf16": {}}
        ref = _params(check_sizes, torch.bfloat16, device, seed=99)
        ref_opt = AdamW(ref, **HP, backend="torch")
        for _ in range(2):
            impl.fn(mine)
            ref_opt.step()
            for ps in (mine["bf16"][impl.backend], ref):
                for p in ps:  # other grads next step
                    p.grad.mul_(-1.01)
        opt = mine["opts"][impl.backend]
        for i, (a, b) in enumerate(zip(mine["bf16"][impl.backend], ref)):
            bad = bit_mismatch(a.detach(), b.detach(), f"param {i}")
            for k in opt.state[a]:
                bad = bad or bit_mismatch(opt.state[a][k], ref_opt.state[b][k], f"param {i} {k}")
            if bad:
                return bad
        return None

    return check


def _case(ctx: Ctx, name: str, sizes: list[int]) -> Case:
    dev = ctx.device
    n = sum(sizes)
    impls = ([Impl(BASELINE, _torch("fused"), "torch.optim.AdamW(fused=True) fp32 + _foreach_copy_ to bf16"),
              Impl(BASELINE + "-foreach", _torch("foreach"), "torch.optim.AdamW(foreach=True) fp32 + _foreach_copy_")]
             + [Impl(b, _ours(b)) for b in ctx.backends])
    if "triton" in ctx.backends:
        impls.append(Impl(EXPERIMENT_TILES, _ours("triton", EXPERIMENT_TILES, TILES),
                          "the Triton kernel at CHUNK 65536, BLOCK 1024, 8 warps (the tiles before 2026-11-30): "
                          "an experiment"))
    return Case("adam_step_", name, n, BYTES_PER_PARAM * n, lambda seed: _make(sizes, dev, seed), impls,
                _check(sizes, dev), set_bytes=BYTES_PER_PARAM * n, tensor_bytes=BYTES_PER_PARAM * n,
                baseline_bytes=TORCH_BYTES_PER_PARAM * n,
                notes=["adam: 28 B/param (bf16 grad r, fp32 master r/w, m r/w, v r/w, bf16 param w); the torch "
                       "baselines move more (fp32 grads, fp32 params, and the bf16 copy)"])


@register("adam_step_")
def cases(ctx: Ctx) -> list[Case]:
    if ctx.device.type == "cuda":
        totals = [1_000_000, 100_000_000] if ctx.quick else [1_000_000, 100_000_000, 1_000_000_000]
    else:
        totals = [1_000_000, 4_000_000] if ctx.quick else [1_000_000, 10_000_000, 100_000_000]
    out = [_case(ctx, f"AdamW bf16+masters {t / 1e6:g}M params", split_sizes(t, 40)) for t in totals]
    out.append(_case(ctx, "AdamW 2000x4096 tensors", [4096] * 2000))
    return out
