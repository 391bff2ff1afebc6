"""adam_step_ kernels (C++ CPU, Triton, CUDA) against adam_step_reference, bit for bit, on raw buckets.

Every backend performs the documented sequence of IEEE fp32 operations (no FMA, correctly rounded div and sqrt)
on the same per-tensor scalars, so all outputs must equal the reference's bits (any NaN matches any NaN). Inputs
include inf/NaN/+-0/subnormals, odd sizes, a 1-element storage offset (no vector access), dense permuted layouts,
and found_inf set (nothing may be written).
"""

import itertools
import math
import random
import zlib

import numpy as np
import pytest
import torch
from conftest import (
    DEVICES,
    HAS_CUDA,
    OpLog,
    assert_bit_exact,
    assert_lists_bit_exact,
    backend_params,
    extension_backend,
    outside,
    poison_allocator,
    to_device,
)

from mixprec_ops.ops.adam import adam_scalars, adam_scalars_reference, adam_step_, adam_step_reference

SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 3e38, 1e-45, 7e4]
COMBOS = [(torch.float32, torch.float32, s, False) for s in (torch.float32, torch.bfloat16)] + [
    (p, g, s, m) for p in (torch.float16, torch.bfloat16) for g in ("P", torch.float32)
    for s in (torch.float32, torch.bfloat16) for m in (True, False)]


def rand(n, dtype, device, gen, positive=False):
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    if positive:
        x = x.abs() * 1e-3
    if n:
        idx = torch.randint(0, n, (max(1, n // 50),), generator=gen)
        x[idx] = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), idx.shape, generator=gen)]
    if positive:  # second moments are never negative, nor -0.0 (whose max with +0.0 is unspecified)
        x = x.abs()
    return x.to(dtype).to(device)


def layout(t, kind):
    n = t.numel()
    if kind == "offset":  # storage offset of one element: misaligned for 16-byte access (b[0]: see outside())
        b = torch.full((n + 1,), -7.0, dtype=t.dtype, device=t.device)
        b[1:] = t
        return b[1:]
    if kind == "perm" and n % 6 == 0:  # dense but permuted (same strides for every tensor of the entry)
        return t.view(6, n // 6).t().contiguous().t()
    return t


def make_bucket(P, G, S, master, ams, sizes, kind, device, gen):
    G = P if G == "P" else G
    d = {k: [] for k in ("p", "g", "m", "v", "x", "w")}
    for n in sizes:  # made on the CPU (the generator's draws in this order), then moved a list at a time
        p = rand(n, P, "cpu", gen)
        d["p"].append(p)
        d["g"].append(rand(n, G, "cpu", gen))
        d["m"].append(rand(n, S, "cpu", gen))
        d["v"].append(rand(n, S, "cpu", gen, positive=True))
        if ams:
            d["x"].append(rand(n, S, "cpu", gen, positive=True))
        if master:
            d["w"].append(p.float() + rand(n, torch.float32, "cpu", gen) * 1e-3)
    return {k: [layout(t, kind) for t in to_device(v, device)] for k, v in d.items()}


def run(fn, d, sc, hp, gs, fi, cl, **kw):
    fn(d["p"], d["g"], d["m"], d["v"], d["x"], d["w"], sc, *hp, gs, fi, cl, **kw)


def step_and_compare(d, sc, hp, backend, what=""):
    """One step of `backend` on bucket d against the reference on copies: bit for bit, every list."""
    ref = {k: [t.clone() for t in v] for k, v in d.items()}
    around = {k: [outside(t) for t in v] for k, v in d.items()}  # what the views do not reach must stay as it is
    run(adam_step_reference, ref, sc, hp, None, None, None)
    run(adam_step_, d, sc, hp, None, None, None, backend=backend)
    for k in d:
        assert_lists_bit_exact(d[k], ref[k], f"{what}{k}")
        assert_lists_bit_exact([outside(t) for t in d[k]], around[k], f"{what}{k} (outside the views)")


@pytest.mark.parametrize("device,backend", backend_params("adam_step_"))
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_bit_identical_to_reference(device, backend, combo):
    P, G, S, master = combo
    seed = zlib.crc32(repr(combo).encode())  # stable across processes (hash() of dtypes is not)
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    small = backend == "triton" and device == "cpu"  # the interpreter is slow
    sizes = [0, 1, 5, 4097, 65543] if not small else [0, 1, 5, 1031]
    for ams, kind in itertools.product((False, True), ("contig", "offset", "perm")):
        d = make_bucket(P, G, S, master, ams, sizes + ([6 * 1001] if kind == "perm" else []), kind, device, gen)
        b1, b2, eps, lr = rnd.choice([(0.9, 0.999, 1e-8, 1e-3), (0.8, 0.95, 1e-6, 0.1), (0.0, 0.0, 0.0, 1.0)])
        wd = rnd.choice([0.0, 0.1])
        hp = (b1, b2, eps, wd, rnd.random() < 0.5, rnd.random() < 0.3)
        steps = to_device([torch.tensor(float(rnd.randint(0, 1000))) for _ in d["p"]], device)
        sc = adam_scalars(steps, lr, b1, b2, wd)
        # every row its own decay too (one lr gives every row the same): each tensor must read its own row
        sc[:, 2] -= torch.arange(len(steps), device=device) * 2.0**-12
        gs = rnd.choice([None, torch.tensor([65536.0], device=device), torch.tensor([3.0], device=device)])
        cl = rnd.choice([None, torch.tensor([0.37], device=device)])
        for fi_val in (None, 0.0, 1.0):
            fi = None if fi_val is None else torch.tensor([fi_val], device=device)
            ref = {k: [t.clone() for t in v] for k, v in d.items()}
            # the kernel's copies keep d's layout: clone() keeps a dense permutation's strides but not the storage
            # offset (until 2026-12-01 the misaligned case never reached the kernel here)
            out = {k: [layout(t.clone(), kind) if kind == "offset" else t.clone() for t in v] for k, v in d.items()}
            assert kind != "offset" or all(t.storage_offset() == 1 for v in out.values() for t in v)
            assert kind != "perm" or not out["p"][-1].is_contiguous()
            around = {k: [outside(t) for t in v] for k, v in out.items()}  # (b[0] of each offset view)
            run(adam_step_reference, ref, sc, hp, gs, fi, cl)
            run(adam_step_, out, sc, hp, gs, fi, cl, backend=backend)
            for k in d:
                what = f"{k} (sizes {[t.numel() for t in d[k]]}) ams={ams} layout={kind} found_inf={fi_val}"
                assert_lists_bit_exact(out[k], ref[k], what)
                assert_lists_bit_exact([outside(t) for t in out[k]], around[k], what + " (outside the views)")
                if fi_val == 1.0:
                    assert_lists_bit_exact(out[k], d[k], what + " (written despite found_inf)")


@pytest.mark.parametrize("device,backend", [p for p in backend_params("adam_step_") if p.values[1] == "triton"])
def test_triton_eager_route_bumps_every_mutated_version(device, backend):
    """Plain eager calls run the Triton op's body past the custom op's wrapper (mixprec_ops._checks.plain_eager) and
    bump the versions themselves: every list the op mutates (params, moments, max moments, masters) exactly as the
    custom op does (the optimizer's master resync compares param versions), the grads and scalars not at all."""
    from conftest import OpLog

    gen = torch.Generator().manual_seed(5)
    hp = (0.9, 0.999, 1e-8, 0.01, True, False)
    deltas = []
    for route in ("eager", "op"):
        d = make_bucket(torch.bfloat16, "P", torch.float32, True, True, [5, 1031], "contig", device, gen)
        sc = adam_scalars([torch.tensor(1.0, device=device)] * 2, 1e-3, 0.9, 0.999, 0.01)
        before = {k: [t._version for t in v] for k, v in d.items()}
        if route == "eager":
            run(adam_step_, d, sc, hp, None, None, None, backend=backend)
        else:
            with OpLog() as log:  # a dispatch mode: the call goes through mixprec::adam_step_triton_
                run(adam_step_, d, sc, hp, None, None, None, backend=backend)
            assert "mixprec.adam_step_triton_.default" in log.ops
        deltas.append({k: [t._version - b for t, b in zip(v, before[k], strict=True)] for k, v in d.items()})
    eager, op = deltas
    assert eager == op, (eager, op)
    assert all(x > 0 for k in ("p", "m", "v", "x", "w") for x in eager[k]) and all(x == 0 for x in eager["g"])


@pytest.mark.parametrize("device,backend", backend_params("adam_step_"))
def test_signed_zeros_with_maximize(device, backend):
    """Every sign of zero through the step, maximize on and off: -(+0.0) must be -0.0 as in torch, so that
    beta1 * m + (1 - beta1) * (-g) keeps the reference's sign of zero in m, and from it in the param. Triton 3.6
    compiles unary minus as 0 - g (+0.0 for g = +0.0); the random bit-exact test met this only on the H200 run of
    2026-11-30 (a NaN-free zero gradient against a -0.0 or negative moment with beta1 = 0 is rare in random data)."""
    combos = list(itertools.product((0.0, -0.0), (0.0, -0.0, -1.5, 1.5), (0.0, -0.0)))  # (g, m, p)
    g, m, p = (torch.tensor([c[k] for c in combos], device=device) for k in range(3))
    for b1, maximize in itertools.product((0.0, 0.9), (True, False)):
        d = dict(p=[p.clone()], g=[g.clone()], m=[m.clone()], v=[torch.zeros_like(p)], x=[], w=[])
        sc = adam_scalars([torch.tensor(3.0, device=device)], 1e-3, b1, 0.999, 0.0)
        step_and_compare(d, sc, (b1, 0.999, 1e-8, 0.0, True, maximize), backend, f"b1={b1} maximize={maximize} ")
        # the data holds the case that failed: g = +0.0, m = -0.0, maximized: m = -0.0 * b1 + -0.0 * (1 - b1) = -0.0
        i = [tuple(math.copysign(1.0, x) for x in c) for c in combos].index((1.0, -1.0, 1.0))  # (+0, -0, +0)
        assert math.copysign(1.0, d["m"][0][i].item()) == (-1.0 if maximize else 1.0)


@pytest.mark.parametrize("device,backend", backend_params("adam_step_"))
@pytest.mark.parametrize("master,ams", [(False, False), (True, False), (True, True)],
                         ids=["depth4", "depth5", "depth6"])
def test_many_tensors_and_launch_splits(device, backend, master, ams):
    """More tensors than one CUDA launch holds (446 / 377 / 327 per launch at list depth 4 / 5 / 6: params, grads,
    moments, then masters, then max_exp_avg_sq) with mixed sizes."""
    gen = torch.Generator().manual_seed(7)
    n_t = 1000 if not (backend == "triton" and device == "cpu") else 120
    sizes = [(i * 53) % 3001 + 1 for i in range(n_t)]
    d = make_bucket(torch.bfloat16, "P", torch.float32, master, ams, sizes, "contig", device, gen)
    steps = to_device([torch.tensor(float(i % 7)) for i in range(n_t)], device)
    sc = adam_scalars(steps, 1e-3, 0.9, 0.999, 0.01)
    hp = (0.9, 0.999, 1e-8, 0.01, True, False)
    step_and_compare(d, sc, hp, backend)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("adam_step_") if p.values[1] == "triton"])
def test_triton_huge_bucket_raises_its_chunk(device, backend, monkeypatch):
    """The Triton kernel's program map holds 16 bytes a program, one program a 1024 elements: past MAX_PROGRAMS
    (~1e9 elements) each program covers twice, four times ... as many, in a loop over 1024-element blocks. Here the
    cap is made tiny: the launch gets CHUNK 2048 (and the next step, served from the cached table, the same), every
    element is stepped exactly as the reference does, and the program count fits the raised chunk."""
    from mixprec_ops.triton_kernels import adam as ta
    from mixprec_ops.triton_kernels import tables

    monkeypatch.setattr(ta, "MAX_PROGRAMS", 2)
    seen = []
    real = ta._adam_kernel
    monkeypatch.setattr(ta, "_adam_kernel", type("K", (), {"__getitem__": lambda self, grid: lambda *a, **k: (
        seen.append((grid[0], k["CHUNK"])), real[grid](*a, **k))[1]})())
    tables.clear_table_cache()
    gen = torch.Generator().manual_seed(11)
    sizes = [3000, 5, 1030]  # 4035 elements: > 2 x 1024, <= 2 x 2048
    d = make_bucket(torch.bfloat16, "P", torch.float32, True, False, sizes, "contig", device, gen)
    steps = [torch.tensor(3.0, device=device) for _ in sizes]
    sc = adam_scalars(steps, 1e-3, 0.9, 0.999, 0.01)
    hp = (0.9, 0.999, 1e-8, 0.01, True, False)
    step_and_compare(d, sc, hp, backend)
    step_and_compare(d, sc, hp, backend, "second step: ")
    assert seen == [(2 + 1 + 1, 2048)] * 2
    monkeypatch.setattr(ta, "MAX_PROGRAMS", 1 << 20)
    tables.clear_table_cache()
    seen.clear()
    step_and_compare(d, sc, hp, backend, "uncapped: ")
    assert seen == [(3 + 1 + 2, 1024)]
    tables.clear_table_cache()


@pytest.mark.parametrize("P", [torch.bfloat16, torch.float16])
def test_cpu_streamed_param_stores(P):
    """With masters, the C++ CPU kernel stores 16-bit params past the cache (streaming stores, a 64-byte line an
    iteration) in buckets of >= 2^18 elements (kStreamMin in csrc/cpu/adam.cpp; this bucket holds ~2^19), from
    64-byte aligned tiles only. Tensors here start 0 or 32 elements (64 bytes: streamed), 1 (misaligned) or 16 (32
    bytes) into their storage (ordinary stores), with sizes that end inside a vector step; the params start as
    0xFFFF (NaN) bytes: the kernel must write every element from the master without reading the param (the
    reference's NaNs sit where the masters hold NaN or overflow, ~2% of elements). Bit for bit against the
    reference; a small bucket of the same tensors' first elements (no streaming) must give the same bits."""
    backend = extension_backend("adam_step_", "cpu")
    gen = torch.Generator().manual_seed(13)
    sizes = [200_003, 1, 65_536 + 31, 131_072, 100_017, 70_001]

    def bucket(sizes):
        d = make_bucket(P, "P", torch.float32, True, False, sizes, "contig", "cpu", gen)
        for i, t in enumerate(d["p"]):
            off = (0, 1, 16, 32)[i % 4]
            store = torch.empty(t.numel() + off, dtype=P)
            store.view(torch.int16).fill_(-1)  # 0xFFFF: NaN in bf16 and fp16
            d["p"][i] = store[off:]
        return d

    hp = (0.9, 0.999, 1e-8, 0.01, True, False)
    d = bucket(sizes)
    assert sum(sizes) >= 2**18 and all(t.isnan().all() for t in d["p"])
    sc = adam_scalars([torch.tensor(float(s)) for s in (4, 1, 90, 2, 7, 3)], 1e-3, 0.9, 0.999, 0.01)
    small = {k: [t[:1000].clone() for t in v] for k, v in d.items()}  # 5,001 elements: ordinary stores
    step_and_compare(d, sc, hp, backend, "streamed bucket: ")
    step_and_compare(small, sc, hp, backend, "small bucket: ")
    for i, (a, b) in enumerate(zip(d["p"], small["p"], strict=True)):
        assert_bit_exact(a[:1000], b, f"p[{i}] streamed against cached")


def test_cuda_tensor_spanning_launches():
    """A tensor of more chunks than one launch's 2048 blocks (65536 elements each) between two small ones: its chunks
    continue in the next launch, which must still read the tensor's own row of the per-tensor scalars (meta.index;
    every tensor here has its own step count), then the last small tensor follows. Bit for bit against the reference
    on the same GPU, at depth 5 (masters) and 6 (amsgrad)."""
    backend = extension_backend("adam_step_", "cuda")
    big = 2049 * 65536 + 123
    sizes = [1000, big, 77]
    gen = torch.Generator(device="cuda").manual_seed(11)

    def r(n, dtype, positive=False):
        t = torch.randn(n, device="cuda", generator=gen)
        return (t.abs() * 1e-3 if positive else t).to(dtype)

    for ams in (False, True):
        d = {"p": [r(n, torch.bfloat16) for n in sizes], "g": [r(n, torch.bfloat16) for n in sizes],
             "m": [r(n, torch.float32) for n in sizes], "v": [r(n, torch.float32, True) for n in sizes],
             "x": [r(n, torch.float32, True) for n in sizes] if ams else []}
        d["w"] = [p.float() + r(p.numel(), torch.float32) * 1e-3 for p in d["p"]]
        steps = [torch.tensor(float(s), device="cuda") for s in (3, 250, 9)]
        sc = adam_scalars(steps, 1e-3, 0.9, 0.999, 0.01)
        hp = (0.9, 0.999, 1e-8, 0.01, True, False)
        step_and_compare(d, sc, hp, backend, f"amsgrad={ams} ")
        del d


@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + backend_params("adam_step_"))
def test_any_nonzero_found_inf_skips(device, backend):
    """found_inf skips the step when it is non-zero, NaN included (the module docstring; the reference's
    `found_inf != 0`), not only at GradScaler's 1.0; -0.0 is zero and steps."""
    gen = torch.Generator().manual_seed(5)
    for fi_val in (2.0, -1.0, float("nan"), 1e-45, -0.0):
        d = make_bucket(torch.bfloat16, "P", torch.float32, True, True, [5, 1031], "contig", device, gen)
        before = {k: [t.clone() for t in v] for k, v in d.items()}
        ref = {k: [t.clone() for t in v] for k, v in d.items()}
        sc = adam_scalars([torch.zeros((), device=device)] * 2, 1e-3, 0.9, 0.999, 0.1)
        hp = (0.9, 0.999, 1e-8, 0.1, True, False)
        fi = torch.tensor([fi_val], device=device)
        run(adam_step_, d, sc, hp, None, fi, None, backend=backend)
        run(adam_step_reference, ref, sc, hp, None, fi, None)
        for k in d:
            assert_lists_bit_exact(d[k], ref[k], f"found_inf={fi_val} {k}")
            if fi_val != 0:
                assert_lists_bit_exact(d[k], before[k], f"found_inf={fi_val} {k} written")
        assert fi_val != 0 or not torch.equal(d["w"][1], before["w"][1]), "found_inf=-0.0 must step"


@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + backend_params("adam_step_"))
@pytest.mark.parametrize("P,G,master,text", [
    (torch.float16, torch.bfloat16, False, "grads must have the params' dtype"),
    (torch.bfloat16, torch.float16, True, "grads must have the params' dtype"),
    (torch.float32, torch.bfloat16, False, "grads must have the params' dtype"),
    (torch.float32, torch.float32, True, "masters must be empty when params are float32"),
], ids=["f16-bf16grads", "bf16-f16grads-master", "f32-bf16grads", "f32-master"])
def test_every_backend_refuses_the_same_combinations(device, backend, P, G, master, text):
    """One dtype contract for all backends (the module docstring): the CUDA kernel instantiates only grads in the
    params' dtype or fp32 and masters for 16-bit params; the CPU, Triton and torch backends, which could compute
    the other combinations, refuse them too, with the same message, before writing anything."""
    gen = torch.Generator().manual_seed(11)
    d = make_bucket(P, G, torch.float32, master, False, [5, 33], "plain", device, gen)
    before = {k: [t.clone() for t in v] for k, v in d.items()}
    sc = adam_scalars([torch.zeros((), device=device)] * 2, 1e-3, 0.9, 0.999, 0.0)
    with pytest.raises(RuntimeError, match=text):
        run(adam_step_, d, sc, (0.9, 0.999, 1e-8, 0.0, True, False), None, None, None, backend=backend)
    for k in d:
        assert_lists_bit_exact(d[k], before[k], k)



def test_scalars_same_for_a_tensor_lr_and_its_host_value():
    """The optimizer reads a CPU lr tensor on the host when the params are on a GPU (no blocking copy): the
    scalars must be those of the tensor, bit for bit, for fp32 and fp64 lr tensors and every step count."""
    steps = torch.arange(0, 3000, 7, dtype=torch.float32)
    for dtype in (torch.float32, torch.float64):
        for v in (1e-3, 3e-4, 0.1 / 3, 7.7e-6, 1.0):
            lr = torch.tensor(v, dtype=dtype)
            want = adam_scalars(steps, lr, 0.9, 0.999, 0.1)
            got = adam_scalars(steps, lr.item(), 0.9, 0.999, 0.1)
            assert torch.equal(got, want), (dtype, v)


# ---------------------------------------------------------------------------------------------- mixprec::adam_scalars
SCALAR_BETAS = [(0.9, 0.999), (0.95, 0.98), (0.9, 0.9999), (0.5, 0.6), (0.0, 0.99)]


def _scalar_lrs(device):
    return [1e-3, 3e-4, torch.tensor(0.1 / 3, device=device), torch.tensor(7.7e-6, dtype=torch.float64, device=device)]


@pytest.mark.parametrize("device", DEVICES)
def test_scalars_op_same_bits_as_reference(device):
    """mixprec::adam_scalars (one kernel) gives adam_scalars_reference's fp32 bits (about 13 torch kernels) for
    every step count up to 2e6, several betas, float and tensor lr (fp32 and fp64). Exact, not a tolerance: both
    compute each fp64 op once, correctly rounded, except pow, whose implementations (glibc, ATen's Sleef vector path
    on the CPU, libdevice on a GPU) may differ in the last fp64 bit; such a difference is 2^-29 of an fp32 ulp and
    changes the final rounding only for values within that distance of a rounding boundary (none in this sweep;
    measured on the CPU: 0.6-1.6% of the fp64 pows differ from glibc's, no fp32 result does). Outputs are poisoned
    (the freed block the op's allocation reuses holds NaN bytes)."""
    extension_backend("adam_step_", device)
    from mixprec_ops import _ext

    assert _ext.has_kernel("adam_scalars", "CPU" if device == "cpu" else "CUDA")
    steps = torch.arange(0, 2_000_000, dtype=torch.float32, device=device)
    for b1, b2 in SCALAR_BETAS:
        for lr in _scalar_lrs(device):
            want = adam_scalars_reference(steps, lr, b1, b2, 0.1)
            poison_allocator(want.numel() * 4, device)
            tensor_lr = isinstance(lr, torch.Tensor)
            got = torch.ops.mixprec.adam_scalars(steps, lr if tensor_lr else None, 0.0 if tensor_lr else lr, b1, b2,
                                                 0.1)
            assert_bit_exact(got, want, f"betas {(b1, b2)} lr {lr}")


def _lrs_at_fp32_midpoints():
    """(beta1, lr) with t = 1, so that beta1^t is beta1 under every pow and 1 - beta1 is exact (beta1 has few
    bits): lr / (1 - beta1) lies within 6 fp64 ulps of a midpoint between two fp32 numbers, where how the fp64
    quotient is computed decides the fp32 rounding."""
    out = []
    for b1 in (0.25, 0.125, 0.0625, 0.4375):
        d = 1.0 - b1
        for k in range(1, 120):
            q = np.float32(1e-3 * k)
            lr = (float(q) + float(np.spacing(q)) / 2) * d
            for _ in range(7):
                out.append((b1, lr))
                lr = math.nextafter(lr, math.inf)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_scalars_op_divides_once(device):
    """step_size is ONE correctly rounded fp64 division, lr / (1 - beta1^t), then one rounding to fp32: checked
    where it matters, on quotients next to fp32 rounding midpoints (the random-looking sweep above almost never
    lands there: 2^-29 of an fp32 ulp). lr * (1 / d), an FMA or an fp32 division each round some of these the
    other way, which the test first shows (so it can fail), then requires the op's and the reference's bits to be
    Python's lr / d, for a float lr and an fp64 lr tensor. The first step only (t = 1: pow(beta1, 1) is beta1 in
    glibc, Sleef and libdevice alike, so d is the same everywhere)."""
    extension_backend("adam_step_", device)
    cases = _lrs_at_fp32_midpoints()
    want = [np.float32(lr / (1.0 - b1)) for b1, lr in cases]
    assert sum(np.float32(lr * (1.0 / (1.0 - b1))) != w for (b1, lr), w in zip(cases, want)) >= 20
    steps = torch.zeros(1, device=device)  # t = 1
    lr_ts = to_device([torch.tensor(lr, dtype=torch.float64) for _, lr in cases], device)
    got = []  # each case's three step sizes, read back at the end in one transfer
    for (b1, lr), lr_t in zip(cases, lr_ts, strict=True):
        got += [torch.ops.mixprec.adam_scalars(steps, None, lr, b1, 0.999, 0.0)[0, 0],
                torch.ops.mixprec.adam_scalars(steps, lr_t, 0.0, b1, 0.999, 0.0)[0, 0],
                adam_scalars_reference(steps, lr, b1, 0.999, 0.0)[0, 0]]
    got = torch.stack(got).view(-1, 3).tolist()
    for (b1, lr), w, g in zip(cases, want, got, strict=True):
        assert g == [float(w)] * 3, (b1, lr, g, w)  # op with a float lr, op with an fp64 lr tensor, reference


@pytest.mark.parametrize("device", DEVICES)
def test_scalars_op_runs_of_equal_counters(device):
    """The CPU kernel reuses the row of a counter equal to the one before it (a bucket's counters are mostly equal):
    runs of equal counters, a run broken by one other value, -0.0 after +0.0, NaN after NaN (never equal), inf, and
    a strided view whose neighbours in memory are not its neighbours, all with the reference's bits. Outputs are
    poisoned."""
    extension_backend("adam_step_", device)
    nan, inf = float("nan"), float("inf")
    vals = [7.0] * 5 + [8.0, 7.0, 7.0, 0.0, -0.0, -0.0, 0.0, nan, nan, 3.0, inf, inf, 1e6, 1e6, 2.0]
    steps = torch.tensor(vals, device=device)
    spread = torch.stack([steps, torch.arange(len(vals), dtype=torch.float32, device=device)], 1).flatten()
    for s in (steps, spread[::2], spread, steps.flip(0)):
        want = adam_scalars_reference(s, 1e-3, 0.9, 0.999, 0.01)
        poison_allocator(want.numel() * 4, device)
        assert_bit_exact(torch.ops.mixprec.adam_scalars(s, None, 1e-3, 0.9, 0.999, 0.01), want, str(s.tolist()))


@pytest.mark.parametrize("device", DEVICES)
def test_scalars_op_layouts_and_sizes(device):
    """Strided and 0-dim steps, no steps, a 2-D steps tensor (read flat), an lr view with a storage offset."""
    extension_backend("adam_step_", device)
    base = torch.tensor([0.0, 5.0, 1.0, 17.0, 2.0, 99999.0, 3.0], device=device)
    lr_buf = torch.tensor([9.0, 2e-3], device=device)
    for steps in (base[::2], base[3], base[:0], base[:6].reshape(2, 3), base[:6].reshape(3, 2).t()):
        want = adam_scalars_reference(steps, lr_buf[1], 0.9, 0.999, 0.01)
        got = torch.ops.mixprec.adam_scalars(steps, lr_buf[1], 0.0, 0.9, 0.999, 0.01)
        assert got.shape == (steps.numel(), 3)
        assert_bit_exact(got, want, f"steps {tuple(steps.shape)} {steps.stride()}")


@pytest.mark.parametrize(("args", "match"), [
    (lambda d: (torch.zeros(3, dtype=torch.float64, device=d), None, 1e-3), "steps must be a float32"),
    (lambda d: (torch.zeros(3, dtype=torch.int32, device=d), None, 1e-3), "steps must be a float32"),
    (lambda d: (torch.zeros(3, device=d), torch.tensor(1e-3, dtype=torch.bfloat16, device=d), 0.0),
     "lr must be a float32 or float64"),
    (lambda d: (torch.zeros(3, device=d), torch.full((2,), 1e-3, device=d), 0.0),
     r"lr must have exactly 1 element, got shape \[2\]"),  # the shape formatted by csrc/common.h's dims()
    (lambda d: (torch.zeros(3, device=d), torch.tensor(1e-3, device="meta"), 0.0), "lr must be on"),
])
@pytest.mark.parametrize("device", DEVICES)
def test_scalars_op_bad_input(device, args, match):
    extension_backend("adam_step_", device)
    steps, lr, lr_value = args(device)
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.mixprec.adam_scalars(steps, lr, lr_value, 0.9, 0.999, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_scalars_op_opcheck(device):
    extension_backend("adam_step_", device)
    steps = torch.tensor([0.0, 3.0, 41.0], device=device)
    for lr, lr_value in ((None, 1e-3), (torch.tensor(3e-4, device=device), 0.0),
                         (torch.tensor(3e-4, dtype=torch.float64, device=device), 0.0)):
        torch.library.opcheck(torch.ops.mixprec.adam_scalars.default, (steps, lr, lr_value, 0.9, 0.999, 0.01))


def test_scalars_wrapper_routes():
    """adam_scalars takes the op for float32 steps with a float lr or a float32/float64 lr tensor on the steps'
    device (one op dispatched, nothing else), and the reference for what the op refuses (a bf16 lr, float64 steps):
    same values either way."""
    extension_backend("adam_step_", "cpu")
    steps = torch.tensor([0.0, 3.0, 41.0])
    for lr in (1e-3, torch.tensor(1e-3), torch.tensor(1e-3, dtype=torch.float64)):
        with OpLog() as log:
            got = adam_scalars(steps, lr, 0.9, 0.999, 0.01)
        assert log.ops == ["mixprec.adam_scalars.default"], log.ops
        assert_bit_exact(got, adam_scalars_reference(steps, lr, 0.9, 0.999, 0.01))
    for s, lr, backend in ((steps, torch.tensor(1e-3, dtype=torch.bfloat16), None), (steps.double(), 1e-3, None),
                           (list(steps.unbind(0)), torch.tensor(1e-3, dtype=torch.bfloat16), None),
                           (steps, 1e-3, "torch")):  # the reference backend stays pure torch
        with OpLog() as log:
            got = adam_scalars(s, lr, 0.9, 0.999, 0.01, backend=backend)
        assert "mixprec.adam_scalars.default" not in log.ops
        assert_bit_exact(got, adam_scalars_reference(s, lr, 0.9, 0.999, 0.01))


def test_scalars_fake_checks_as_the_kernel():
    """Under FakeTensorMode (torch.compile's tracing) the op refuses what its kernels refuse, so that a compiled
    graph fails where eager does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    extension_backend("adam_step_", "cpu")
    with FakeTensorMode():
        steps = torch.zeros(3)
        assert torch.ops.mixprec.adam_scalars(steps, None, 1e-3, 0.9, 0.999, 0.0).shape == (3, 3)
        for st, lr, match in ((steps.double(), None, "steps must be a float32"),
                              (steps, torch.zeros((), dtype=torch.bfloat16), "lr must be a float32 or float64"),
                              (steps, torch.zeros(2), "lr must have exactly 1 element")):
            with pytest.raises(RuntimeError, match=match):
                torch.ops.mixprec.adam_scalars(st, lr, 0.0, 0.9, 0.999, 0.0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)")
def test_scalars_op_cpu_lr_with_cuda_steps_refused():
    """The CUDA kernel's own device check (a CPU lr with CUDA steps dispatches to it; the optimizer never sends
    that: it reads a CPU lr on the host)."""
    extension_backend("adam_step_", "cuda")
    with pytest.raises(RuntimeError, match="lr must be on cuda"):
        torch.ops.mixprec.adam_scalars(torch.zeros(3, device="cuda"), torch.tensor(1e-3), 0.0, 0.9, 0.999, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_extension_kernel_bumps_what_it_writes(device):
    """The C++ / CUDA adam_step_ moves the version counter of every tensor it writes (params, moments, max moments,
    masters) by one a call, as torch's in-place ops do (autograd's check of tensors saved for backward relies on it;
    csrc/common.h VersionBump), and not the grads'. A refused call moves none; in inference mode they move as
    torch's own in-place ops move a normal tensor's there. The bucket op (adam_step_bucket_) calls this kernel: its
    steps move the params too (test_adam.py, test_step_between_forward_and_backward_raises)."""
    backend = extension_backend("adam_step_", device)
    gen = torch.Generator().manual_seed(6)
    hp = (0.9, 0.999, 1e-8, 0.01, True, False)
    d = make_bucket(torch.bfloat16, "P", torch.float32, True, True, [5, 1031], "contig", device, gen)
    sc = adam_scalars([torch.tensor(1.0, device=device)] * 2, 1e-3, 0.9, 0.999, 0.01)

    def versions():
        return {k: [t._version for t in v] for k, v in d.items()}

    before = versions()
    run(adam_step_, d, sc, hp, None, None, None, backend=backend)
    after = versions()
    delta = {k: [a - b for a, b in zip(after[k], before[k], strict=True)] for k in d}
    assert delta == {"p": [1, 1], "g": [0, 0], "m": [1, 1], "v": [1, 1], "x": [1, 1], "w": [1, 1]}, delta

    bad = dict(d, g=[d["g"][0].to(torch.int32), d["g"][1]])  # refused: an integer grad
    with pytest.raises((RuntimeError, TypeError, ValueError), match="grads"):
        run(adam_step_, bad, sc, hp, None, None, None, backend=backend)
    assert versions() == after

    with torch.inference_mode():
        run(adam_step_, d, sc, hp, None, None, None, backend=backend)
    assert versions() == {k: [v + (k != "g") for v in after[k]] for k in d}


@pytest.mark.parametrize("device", DEVICES)
def test_extension_op_releases_every_argument(device):
    """The C++ / CUDA adam_step_ op holds its arguments through the call and drops them after taking the GIL, once
    (csrc/hold_args.h), where the lists' release would otherwise take it once for each tensor whose only other owner
    is its Python object (params and states: 4 a param with masters; bench/NOTES.md, "Twenty-first session"). Such
    tensors come back with their Python refcounts and attributes as they were, on success and on a refused call,
    from the main thread and another, and are freed when Python drops them: a reference dropped twice would free a
    live tensor, one kept would leak it."""
    import gc
    import sys
    import threading
    import weakref

    extension_backend("adam_step_", device)
    # (the refcounts below cannot tell the GIL acquisitions apart: the registration is what keeps them to one; the
    # dump's format is torch's internal one)
    kind = "CPU" if device == "cpu" else "CUDA"
    line = next(x for x in torch._C._dispatch_dump("mixprec::adam_step_").splitlines() if x.startswith(kind + ":"))
    assert line.rstrip().endswith("[ boxed ]"), line  # holding_args, not an unboxed kernel
    gen = torch.Generator().manual_seed(7)
    d = make_bucket(torch.bfloat16, "P", torch.float32, True, True, [5, 1031, 64] * 10, "contig", device, gen)
    mine = [t for k in "pmvxw" for t in d[k]]  # the written tensors, each held by its Python object alone
    for t in mine:
        t.tag = "mine"
    sc = adam_scalars([torch.tensor(1.0, device=device)] * 30, 1e-3, 0.9, 0.999, 0.01)
    args = ([d["p"], d["g"], d["m"], d["v"], d["x"], d["w"], sc, 0.9, 0.999, 1e-8, 0.01, True, False, None, None,
             None])
    before = [sys.getrefcount(t) for t in mine]
    orig = [t.clone() for t in mine]
    with torch.no_grad():
        torch.ops.mixprec.adam_step_(*args)
        th = threading.Thread(target=torch.ops.mixprec.adam_step_, args=args)
        th.start()
        th.join()
        bad = list(args)
        bad[1] = d["g"][:3] + [d["g"][3].to(torch.int32)] + d["g"][4:]
        with pytest.raises(RuntimeError, match=r"grads\[3\]"):
            torch.ops.mixprec.adam_step_(*bad)
    assert [sys.getrefcount(t) for t in mine] == before
    assert all(t.tag == "mine" for t in mine)
    assert all(not torch.equal(t, o) for t, o in zip(mine[-30:], orig[-30:], strict=True))  # (masters: stepped)
    refs = [weakref.ref(t) for t in mine]
    del mine, d, args, bad, th, t, orig
    gc.collect()
    assert all(r() is None for r in refs)
