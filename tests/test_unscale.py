"""unscale_: every kernel backend against the pure-torch reference.

The unscaled tensors must match bit for bit (one fp32 product, one rounding into the tensor's dtype, as torch's
own `t.mul_(inv_scale)`). The norm is compared with an fp64 reference at rtol 1e-5: the kernels sum squares in fp32
within a block (<= 65536 terms, relative error bound ~ sqrt(n) * 2**-24 ~ 1.5e-5 worst case, ~1e-6 typical) and add
the block partials in fp64.
"""

import math

import pytest
import torch
from conftest import (
    CPU_ISAS,
    DEVICES,
    HAS_CUDA,
    assert_bit_exact,
    assert_lists_bit_exact,
    backend_params,
    extension_backend,
    outside,
    to_host,
)

import mixprec_ops
from mixprec_ops.ops import unscale_reference

OP = "unscale_"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_list(device, sizes=(0, 1, 7, 1023, 65537, 70001), gen_scale=1000.0):
    ts = []
    for i, n in enumerate(sizes):
        dt = DTYPES[i % 3]
        ts.append((torch.randn(n) * gen_scale + 0.5).to(dt).to(device))
    base = (torch.randn(130, 77) * gen_scale).to(device)
    ts += [base.t(), base.to(torch.bfloat16)[:, 1::3], base.to(torch.float16).flatten()[5:4000]]  # permuted, gaps,
    return ts                                                                                     # unaligned offset


def fp64_norm(ts, inv):
    return math.sqrt(sum(float((t.double() * inv).square().sum()) for t in ts))


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("return_norm", [False, True])
def test_matches_reference(device, backend, return_norm):
    ts = make_list(device)
    ref = [t.clone() for t in to_host(ts)]
    around = [outside(t) for t in ts]  # the gaps of the strided views and what lies beyond the slices
    inv = torch.tensor([1 / 1024.0 * 0.999], device=device)
    found = torch.zeros(1, device=device)
    found_ref = torch.zeros(1)
    expected_norm = fp64_norm(ts, inv.item())
    norm = mixprec_ops.unscale_(ts, inv, found, return_norm=return_norm, backend=backend)
    ref_norm = unscale_reference(ref, inv.cpu(), found_ref, return_norm)
    assert_lists_bit_exact(ts, ref, "tensor")
    assert sum(a.numel() for a in around) > 0
    assert_lists_bit_exact([outside(t) for t in ts], around, "outside the views of tensor")
    assert found.item() == 0.0 and found_ref.item() == 0.0
    if return_norm:
        assert norm.shape == () and norm.dtype == torch.float32 and norm.device == inv.device
        assert norm.item() == pytest.approx(expected_norm, rel=1e-5)
        assert ref_norm.item() == pytest.approx(expected_norm, rel=1e-6)
    else:
        assert norm is None


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inv", [0.5, 1.0], ids=["scale", "probe"])
def test_non_finite_sets_found_inf(device, backend, bad, dtype, inv):
    """inv = 1 is the read-only probe path (GradScaler's inf check, the optimizer's norm pass): the same flag and
    norm, values bit-unchanged. (That the probe writes nothing back is a speed property no value can show: x * 1
    has x's bits.)"""
    ts = make_list(device)
    victim = torch.randn(5000, device=device).to(dtype)
    victim[torch.randint(0, 5000, (1,)).item()] = bad
    ts.insert(3, victim)
    ref = [t.clone() for t in to_host(ts)]
    found = torch.zeros(1, device=device)
    norm = mixprec_ops.unscale_(ts, torch.tensor([inv], device=device), found, return_norm=True, backend=backend)
    assert found.item() == 1.0
    assert not math.isfinite(norm.item())
    unscale_reference(ref, torch.tensor([inv]), torch.zeros(1))
    assert_lists_bit_exact(ts, ref, "tensor")  # like torch: everything is still unscaled


@pytest.mark.parametrize("device,backend", backend_params(OP) + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_empty_list(device, backend):
    """No tensors, as torch's _amp_foreach_non_finite_check_and_unscale_ takes: nothing to do, found_inf untouched,
    the norm of nothing 0 (the Triton route once raised from torch's grouping of an empty list)."""
    inv, found = torch.full((1,), 0.5, device=device), torch.zeros(1, device=device)
    assert mixprec_ops.unscale_([], inv, found, backend=backend) is None
    norm = mixprec_ops.unscale_([], inv, found, return_norm=True, backend=backend)
    assert norm.shape == () and norm.item() == 0.0 and found.item() == 0.0


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_found_inf_is_only_ever_set(device, backend):
    found = torch.ones(1, device=device)
    mixprec_ops.unscale_([torch.randn(100, device=device)], torch.ones(1, device=device), found, backend=backend)
    assert found.item() == 1.0  # never cleared: one flag collects several calls
    # A value that is finite before unscaling but overflows after it counts as non-finite.
    found = torch.zeros(1, device=device)
    t = torch.tensor([60000.0], dtype=torch.float16, device=device)
    mixprec_ops.unscale_([t], torch.tensor([4.0], device=device), found, backend=backend)
    assert found.item() == 1.0 and t.isinf().all()


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_many_tensors_bounded_launches(device, backend):
    """3000 tensors, 1000 of each dtype: more than one launch's worth of metadata per dtype group on CUDA (982
    tensors per launch, csrc/cuda/multi_tensor.cuh), exercising the split across launches; every tensor must be
    processed exactly once."""
    sizes = [(i * 37) % 4099 + 1 for i in range(3000)]
    ts = [torch.randn(n, device=device).to(DTYPES[i % 3]) for i, n in enumerate(sizes)]
    ref = [t.clone() for t in to_host(ts)]
    inv = torch.tensor([0.37], device=device)
    found = torch.zeros(1, device=device)
    norm = mixprec_ops.unscale_(ts, inv, found, return_norm=True, backend=backend)
    unscale_reference(ref, inv.cpu(), torch.zeros(1))
    assert_lists_bit_exact(ts, ref, "tensor")
    assert norm.item() == pytest.approx(math.sqrt(sum(float(r.double().square().sum()) for r in ref)), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_amp_kernel(device):
    """Bit-identical to torch._amp_foreach_non_finite_check_and_unscale_ where torch's kernel accepts the dtype."""
    for dtype in (torch.float32, torch.float16):
        ts = [torch.randn(n, device=device).to(dtype) * 300 for n in (1, 513, 70001)]
        theirs = [t.clone() for t in ts]
        inv = torch.tensor([1 / 300.0], device=device)
        f1, f2 = torch.zeros(1, device=device), torch.zeros(1, device=device)
        mixprec_ops.unscale_(ts, inv, f1)
        torch._amp_foreach_non_finite_check_and_unscale_(theirs, f2, inv)
        assert_lists_bit_exact(ts, theirs, str(dtype))
        assert f1.item() == f2.item()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tensor_spanning_launches_cuda(backend):
    """One tensor of more chunks than one launch holds (2048 blocks x 65536): it continues in the next launch."""
    t = torch.randn(2049 * 65536 + 5, device="cuda", dtype=torch.float16)
    ref = t.float() * 0.5
    found = torch.zeros(1, device="cuda")
    norm = mixprec_ops.unscale_([t], torch.tensor([0.5], device="cuda"), found, return_norm=True, backend=backend)
    assert torch.equal(t, ref.half())
    assert norm.item() == pytest.approx(ref.double().norm().item(), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_extension_op(device):
    extension_backend(OP, device)
    ts = [torch.randn(n, device=device).to(d) for n, d in ((33, torch.float32), (70, torch.bfloat16))]
    for rn in (False, True):
        torch.library.opcheck(torch.ops.mixprec.unscale_.default,
                              ([t.clone() for t in ts], torch.tensor([0.5], device=device),
                               torch.zeros(1, device=device), rn))


@pytest.mark.parametrize("device", DEVICES)
def test_extension_op_releases_every_argument(device):
    """The C++ op keeps a reference to its arguments through the call and drops them after taking the GIL, once
    (csrc/hold_args.h). Tensors whose only owner is Python (fresh ones, not grads held by params) must come back with
    their Python refcounts as they were, on success and on a refused call, from the main thread and another, and be
    freed when Python drops them: a reference dropped twice would free a live tensor, one kept would leak it."""
    import gc
    import sys
    import threading
    import weakref

    extension_backend(OP, device)
    op = torch.ops.mixprec.unscale_.default
    ts = [torch.randn(n, device=device).to(DTYPES[i % 3]) for i, n in enumerate((5, 1, 300, 64, 7) * 40)]
    for t in ts:
        t.tag = "mine"  # kept on the Python object: a dead and re-made wrapper would not have it
    inv, found = torch.tensor([0.5], device=device), torch.zeros(1, device=device)
    before = [sys.getrefcount(t) for t in ts]
    orig = [t.clone() for t in ts]
    op(ts, inv, found, True)
    assert all(torch.equal(t, e * 0.5) for t, e in zip(ts, orig, strict=True))
    th = threading.Thread(target=op, args=(ts, torch.tensor([2.0], device=device), found, False))  # (a failure
    # here leaves the tensors at half their values: the bit-exact check below)
    th.start()
    th.join()
    with pytest.raises(RuntimeError, match=r"tensors\[3\] must be float32"):
        op(ts[:3] + [torch.zeros(3, dtype=torch.int32, device=device)] + ts[3:], inv, found, False)
    assert [sys.getrefcount(t) for t in ts] == before
    assert all(t.tag == "mine" for t in ts)
    for i, (t, e) in enumerate(zip(ts, orig, strict=True)):
        assert_bit_exact(t, e, f"tensor {i}")  # times 0.5, then 2.0 (both exact): written by both calls
    refs = [weakref.ref(t) for t in ts]
    del ts, t, th
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_norm_range_does_not_depend_on_the_tensor_size(device, backend):
    """Every kernel squares in fp32, whatever the size: a finite 1e20 gives an inf norm (found_inf stays 0: the
    values are finite) and 1e-25 adds nothing, for tensors shorter than one vector too (the CPU kernel squared
    its tail in fp64: exact below 8 elements, inf from 8 up)."""
    for n in (1, 5, 7, 8, 9, 33):
        for v, want in ((1e20, float("inf")), (1e-25, 0.0)):
            t = torch.full((n,), v, device=device)
            f = torch.zeros(1, device=device)
            norm = mixprec_ops.unscale_([t], torch.ones(1, device=device), f, return_norm=True, backend=backend)
            assert norm.item() == want and f.item() == 0, (n, v, norm.item())


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_partial_sums_combine_in_fp64(device, backend):
    """Squares are summed in fp32 within a block, the block partials in fp64 (the module docstring): two tensors
    whose squares are each finite in fp32 (1.96e38) but whose sum is not (3.92e38 > 3.4e38) give a finite norm."""
    ts = [torch.full((1,), 1.4e19, device=device), torch.full((1,), -1.4e19, device=device)]
    f = torch.zeros(1, device=device)
    norm = mixprec_ops.unscale_(ts, torch.ones(1, device=device), f, return_norm=True, backend=backend)
    assert norm.item() == pytest.approx(1.4e19 * math.sqrt(2), rel=1e-6) and f.item() == 0


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_lengths_and_paths(dtype, cpu_isa, monkeypatch):
    """The CPU kernel on each code path (AVX2; AVX-512 for 16-bit tensors, csrc/cpu/unscale_avx512.cpp) over lengths
    that end at every place of its loops (vectors of 8 and 16, 1024-element norm blocks, 16384-element work units,
    the scalar tail), as one call over many tensors: the written values and found_inf bit for bit against the
    reference, and the norm bit for bit against the AVX2 path (the AVX-512 path adds the squares in the AVX2 loop's
    order, so a machine's norm does not depend on its ISA) and within rtol 1e-5 of fp64 (the module docstring).
    An inf is placed, one place at a time, in a full vector, in the masked 8-lane step and in the scalar tail of a
    1037-element tensor (1037 = 64 x 16 + 8 + 5), with inv_scale 0.5 and 1 (the read-only path)."""
    backend = extension_backend(OP, "cpu")
    gen = torch.Generator().manual_seed(151)
    lengths = [*range(1, 41), 1023, 1024, 1025, 1031, 1037, 1040, 2047, 2049, 16383, 16384, 16385, 17415, 40000]
    base = [(torch.randn(n, generator=gen) * 300).to(dtype) for n in lengths]
    full = (torch.randn(257, 33, generator=gen) * 300).to(dtype)
    base.append(full[:, 1::2])  # gapped: the ATen route

    def copies():  # (clone() makes a gapped view contiguous: the last one is sliced from a copy of its matrix)
        return [t.clone() for t in base[:-1]] + [full.clone()[:, 1::2]]

    host = lengths.index(1037)
    cases = [(inv_v, None) for inv_v in (0.5, 1.0, 7.0)]
    cases += [(inv_v, pos) for inv_v in (0.5, 1.0) for pos in (500, 1027, 1035)]
    for inv_v, pos in cases:
        ts, ref, again = copies(), copies(), copies()
        assert not ts[-1].is_contiguous() and not again[-1].is_contiguous()
        if pos is not None:
            for t in (ts, ref, again):
                t[host][pos] = float("inf")
        gaps = outside(ts[-1])  # the gapped view's other columns: the ATen route must not write them
        inv = torch.tensor([inv_v])
        found, found_ref = torch.zeros(1), torch.zeros(1)
        norm = mixprec_ops.unscale_(ts, inv, found, return_norm=True, backend=backend)
        unscale_reference(ref, inv, found_ref)
        what = f"inv={inv_v} inf at {pos}"
        for i, (a, e) in enumerate(zip(ts, ref)):
            assert_bit_exact(a, e, f"{what}: tensor {i} (n={a.numel()})")
        assert_bit_exact(outside(ts[-1]), gaps, f"{what}: the gapped view's other columns")
        assert found.item() == found_ref.item() == float(pos is not None), (what, found.item(), found_ref.item())
        monkeypatch.setenv("MIXPREC_CPU_ISA", "avx2")
        norm_avx2 = mixprec_ops.unscale_(again, inv, torch.zeros(1), return_norm=True, backend=backend)
        if cpu_isa == "avx512":
            monkeypatch.delenv("MIXPREC_CPU_ISA")
        assert torch.equal(norm.view(torch.int32), norm_avx2.view(torch.int32)), (what, norm.item(), norm_avx2.item())
        if pos is None:
            assert norm.item() == pytest.approx(fp64_norm(base, inv_v), rel=1e-5)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dtype,x,below,at", [
    # x * below rounds to the dtype's largest finite value; x * at is the midpoint above it, a tie that rounds to
    # the even neighbour: inf. Both products are exact in fp32, so only the store's rounding decides.
    (torch.float16, 32768.0, 65519.0 / 32768, 65520.0 / 32768),
    (torch.bfloat16, 2.0**127, 2 - 2**-8 - 2**-22, 2 - 2**-8),
], ids=["float16", "bfloat16"])
def test_overflow_boundary_of_the_stored_dtype(device, backend, dtype, x, below, at):
    """A product counts as non-finite exactly when it rounds to inf in the tensor's dtype: just below the midpoint
    between the largest finite value and the next power of two it stays finite (no flag), at the midpoint it is inf
    (flag), for both signs. Placed in a kernel's vector body (elements 3 / 12 of 37) or its scalar tail (34 / 35:
    37 = 4 * 8 + 5), one place at a time, since either check alone would raise the flag."""
    big = torch.finfo(dtype).max
    for inv, overflows in ((below, False), (at, True)):
        for pos, sign in ((3, 1), (12, -1), (34, 1), (35, -1)):
            t = torch.ones(37, dtype=dtype, device=device)
            t[pos] = sign * x
            f = torch.zeros(1, device=device)
            mixprec_ops.unscale_([t], torch.tensor([inv], device=device), f, backend=backend)
            want = sign * (float("inf") if overflows else big)
            assert t[pos].item() == want and f.item() == float(overflows), (inv, pos, t[pos].item(), f.item())


@pytest.mark.parametrize("device,backend", [p for p in backend_params(OP) if p.values[1] == "triton"])
def test_triton_eager_route_bumps_versions_and_modes_see_the_op(device, backend):
    """Plain eager calls run the Triton op's body directly (the custom op's Python wrapper cost ~1 us a tensor);
    they must still bump every mutated tensor's version counter, as the op's wrapper does (autograd's check of
    tensors saved for backward relies on it), and give the op's results. Under a dispatch mode, or with a tensor
    that requires grad, the call goes through mixprec::unscale_triton_ as before."""
    from conftest import OpLog

    ts = make_list(device)
    ref = [t.clone() for t in ts]
    fi, fi_ref = torch.zeros(1, device=device), torch.zeros(1, device=device)
    inv = torch.tensor([0.25], device=device)
    before = [t._version for t in ts] + [fi._version]
    norm = mixprec_ops.unscale_(ts, inv, fi, return_norm=True, backend=backend)
    want = unscale_reference(ref, inv, fi_ref, return_norm=True)
    assert all(t._version > v for t, v in zip([*ts, fi], before, strict=True)), "a mutated tensor kept its version"
    for o, r in zip(ts, ref, strict=True):
        assert_bit_exact(o, r)
    assert torch.equal(fi, fi_ref)
    torch.testing.assert_close(norm, want, rtol=1e-5, atol=0)

    with OpLog() as log:
        mixprec_ops.unscale_(ts, inv, fi, backend=backend)
    assert "mixprec.unscale_triton_.default" in log.ops
    from mixprec_ops._checks import plain_eager

    g = torch.ones(3, device=device, requires_grad=True).clone()  # a non-leaf that requires grad
    assert plain_eager([[ts[0]]], [inv, fi]) and not plain_eager([[ts[0], g]], [inv, fi])
    with torch.no_grad():  # nothing for autograd to record
        assert plain_eager([[ts[0], g]], [inv, fi])
    seen = []
    torch.func.vmap(lambda x: seen.append(plain_eager([[x]], [inv, fi])) or x)(torch.zeros(2, 3, device=device))
    assert seen == [False]  # a torch.func transform's wrapped tensors are torch.Tensor too: the op must see them


@pytest.mark.parametrize("device,backend", [p for p in backend_params(OP) if p.values[1] == "triton"])
def test_triton_route_groups_the_list_once(device, backend, monkeypatch):
    """The public call's check groups the list by dtype (torch's C++ grouping); the Triton route launches by that
    grouping rather than making it again (~0.35 ms at 2,000 tensors), unless it worked on dense copies of
    non-dense tensors. Mixed dtypes, results bit for bit."""
    from mixprec_ops.ops import unscale as U

    calls = []
    real = U._group_by_device_and_dtype
    monkeypatch.setattr(U, "_group_by_device_and_dtype", lambda *a: (calls.append(1), real(*a))[1])
    for ts, want_calls in ((make_list(device, sizes=(3, 70, 1030))[:3], 1), (make_list(device, sizes=(5,)), 2)):
        ref = [t.clone() for t in ts]
        fi, fi_ref = torch.zeros(1, device=device), torch.zeros(1, device=device)
        inv = torch.tensor([0.375], device=device)
        calls.clear()
        mixprec_ops.unscale_(ts, inv, fi, backend=backend)
        unscale_reference(ref, inv, fi_ref)
        assert len(calls) == want_calls, calls
        for o, r in zip(ts, ref, strict=True):
            assert_bit_exact(o, r)
        assert torch.equal(fi, fi_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_extension_kernel_bumps_what_it_writes(device):
    """The C++ / CUDA unscale_ moves the version counter of every tensor it writes (each tensor of the list, in
    place, and found_inf) by one a call, as torch's in-place ops do (csrc/common.h VersionBump), and not inv_scale's;
    a refused call moves none; inference mode and inference tensors as torch. So a grad unscaled after autograd saved
    it fails its backward as with torch's ops."""
    backend = extension_backend(OP, device)
    ts = make_list(device)
    fi, inv = torch.zeros(1, device=device), torch.tensor([0.5], device=device)
    before = [t._version for t in ts] + [fi._version, inv._version]
    mixprec_ops.unscale_(ts, inv, fi, backend=backend)
    after = [t._version for t in ts] + [fi._version, inv._version]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1] * (len(ts) + 1) + [0]
    with pytest.raises((RuntimeError, TypeError, ValueError), match="found_inf"):
        torch.ops.mixprec.unscale_(ts, inv, torch.zeros(1, device=device, dtype=torch.float64), False)
    assert [t._version for t in ts] + [fi._version, inv._version] == after

    # in inference mode a normal tensor's counter moves too, once (the non-dense tensors' copy_ and found_inf's
    # fill_ inside the kernel do not move it again), as torch's own in-place ops
    ts[4][3] = float("inf")
    before = [t._version for t in ts] + [fi._version]
    with torch.inference_mode():
        mixprec_ops.unscale_(ts, inv, fi, backend=backend)
    assert fi.item() == 1.0
    assert [t._version for t in ts] + [fi._version] == [v + 1 for v in before]
    # an inference tensor outside inference mode is refused before anything is written, as torch refuses it
    with torch.inference_mode():
        frozen = torch.ones(5, device=device)
    with pytest.raises(RuntimeError, match="inference tensor"):
        torch.ops.mixprec.unscale_([frozen], inv, torch.zeros(1, device=device), False)
    assert torch.equal(frozen, torch.ones(5, device=device))

    w = torch.randn(3, 4, device=device, requires_grad=True)
    g = torch.randn(4, 3, device=device)  # a tensor autograd saves, then unscaled in place: its backward refuses
    y = (w @ g).sum()
    mixprec_ops.unscale_([g], inv, fi, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
