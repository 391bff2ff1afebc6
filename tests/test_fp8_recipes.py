"""FP8 scaling recipes: scale = (fp8_max / 2**margin) / amax, old scale kept for amax 0 or non-finite, device
state, state_dict round trips."""

import pytest
import torch

from mixprec_ops.fp8 import CurrentScaling, DelayedScaling, compute_scale
from mixprec_ops.ops import cast_and_scale_reference


def test_compute_scale_rules():
    old = torch.tensor([3.0])
    assert compute_scale(torch.tensor([2.0]), old, 448.0).item() == 224.0
    assert compute_scale(torch.tensor([2.0]), old, 448.0, margin=1).item() == 112.0
    for bad in (0.0, float("inf"), float("nan"), 1e-45):  # 1e-45: 448/amax overflows fp32
        assert compute_scale(torch.tensor([bad]), old, 448.0).item() == 3.0, bad


def test_compute_scale_edge_values_as_specified():
    """The scale rule on every kind of amax, against its plain statement (new where amax > 0 and both amax and new
    are finite, else the old scale), bit for bit: 0, -0, negatives, subnormals, values whose scale overflows,
    +-inf, NaN, and ordinary ones, with and without a margin."""
    amax = torch.tensor([0.0, -0.0, -2.0, 1e-45, 1e-40, 1e-38, 1e-3, 1.0, 448.0, 3e38, float("inf"), float("-inf"),
                         float("nan")])
    old = torch.full_like(amax, 3.0)
    for margin in (0, 1, 4):
        new = ((448.0 / 2.0**margin) / amax.double()).float()  # the correctly rounded quotient
        want = torch.where((amax > 0) & torch.isfinite(amax) & torch.isfinite(new), new, old)
        assert torch.equal(compute_scale(amax, old, 448.0, margin), want), margin


@pytest.mark.parametrize("fp8_max", [448.0, 57344.0])
def test_compute_scale_is_the_correctly_rounded_quotient(fp8_max):
    """One fp32 division, correctly rounded (the fp64 quotient rounded once to fp32, what TE and torchao compute):
    float / tensor, the reciprocal times the constant, was 1 ulp off for ~27% of amaxes and up to 3 ulp from
    2^126 on, where the reciprocal is subnormal."""
    gen = torch.Generator().manual_seed(4)
    amax = torch.cat([torch.rand(20000, generator=gen) * 10.0 ** torch.randint(-30, 30, (20000,), generator=gen),
                      torch.rand(2000, generator=gen) * 2.0**127 + 2.0**126])
    want = (fp8_max / amax.double()).float()
    assert torch.equal(compute_scale(amax, torch.ones_like(amax), fp8_max)[want.isfinite()], want[want.isfinite()])
    assert not torch.equal((fp8_max / amax)[want.isfinite()], want[want.isfinite()])  # (the test can fail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_current_scaling_amax_is_max_abs_bit_for_bit(dtype):
    """CurrentScaling's amax (one min/max pass over x, no |x| copy) equals x.abs().amax() exactly, including
    negative extremes, -0, inf and NaN."""
    gen = torch.Generator().manual_seed(9)
    cases = [torch.randn(1001, generator=gen) * 50, -torch.rand(77, generator=gen) - 5, torch.tensor([-0.0, 0.0]),
             torch.tensor([0.0, -0.0]), torch.tensor([-0.0]),
             torch.tensor([1.0, float("-inf"), 2.0]), torch.tensor([1.0, float("nan"), -3.0])]
    for x in cases:
        x = x.to(dtype)
        r = CurrentScaling(torch.float8_e4m3fn)
        r.quantize(x)
        want = x.abs().amax().float().reshape(1)
        if want.isnan().all():
            assert r.amax.isnan().all()
        else:  # bits, not values: torch.equal has -0.0 == 0.0
            assert torch.equal(r.amax.view(torch.int32), want.view(torch.int32)), (r.amax, want)


def test_current_scaling_uses_the_tensors_own_amax():
    x = torch.randn(1000) * 7
    r = CurrentScaling(torch.float8_e4m3fn)
    y = r.quantize(x)
    amax = x.abs().max()
    scale = 448.0 / amax
    assert r.scale.item() == pytest.approx(scale.item(), rel=1e-7)
    assert torch.equal(y.float(), cast_and_scale_reference(x, torch.float8_e4m3fn, r.scale, 1.0, None, True).float())
    assert y.float().abs().max().item() == 448.0  # the largest |x| lands on fp8's max
    assert r.scale_inv.item() == pytest.approx(1 / r.scale.item())
    before = r.scale.clone()
    r.quantize(torch.zeros(10))  # all zeros: scale kept
    assert torch.equal(r.scale, before)


def test_delayed_scaling_history_and_update():
    r = DelayedScaling(torch.float8_e5m2, amax_history_len=4, margin=0)
    assert r.scale.item() == 1.0
    a = torch.randn(500) * 3
    b = torch.randn(300) * 5
    y = r.quantize(a)  # cast with the old scale (1.0) while recording amax in the same pass
    assert torch.equal(y.float(), cast_and_scale_reference(a, torch.float8_e5m2, None, 1.0, None, True).float())
    r.quantize(b)
    amax = max(a.abs().max().item(), b.abs().max().item())
    assert r.amax.item() == amax
    r.update()
    assert r.amax.item() == 0.0 and r.amax_history[0].item() == amax
    assert r.scale.item() == pytest.approx(57344.0 / amax, rel=1e-7)
    # A quieter step: the history's max still rules ("max" algorithm).
    r.quantize(torch.full((8,), 0.5))
    r.update()
    assert r.scale.item() == pytest.approx(57344.0 / amax, rel=1e-7)
    # A step with NaN: the scale is kept, and NaN does not enter the history.
    r.quantize(torch.tensor([1.0, float("nan")]))
    r.update()
    assert torch.isfinite(r.amax_history).all() and r.scale.item() == pytest.approx(57344.0 / amax, rel=1e-7)
    # After the history forgets the big amax, the scale follows the newer ones.
    for _ in range(4):
        r.quantize(torch.full((8,), 0.5))
        r.update()
    assert r.scale.item() == 57344.0 / 0.5


def test_most_recent_algorithm():
    r = DelayedScaling(amax_history_len=8, amax_compute_algo="most_recent")
    for v in (10.0, 2.0):
        r.quantize(torch.full((3,), v))
        r.update()
    assert r.scale.item() == 448.0 / 2.0


@pytest.mark.parametrize("cls", [CurrentScaling, DelayedScaling])
def test_state_dict_round_trip(cls):
    r = cls(torch.float8_e4m3fn)
    for _ in range(3):
        r.quantize(torch.randn(100) * 9)
        if cls is DelayedScaling:
            r.update()
    sd = r.state_dict()
    r2 = cls(torch.float8_e4m3fn)
    r2.load_state_dict(sd)
    for k, v in r.state_dict().items():
        if k != "config":
            assert torch.equal(v, r2.state_dict()[k]), k
    x = torch.randn(64)
    assert torch.equal(r.quantize(x).float(), r2.quantize(x).float())
    with pytest.raises(KeyError, match="missing"):
        r2.load_state_dict({})


def test_bad_arguments():
    with pytest.raises(TypeError, match="dtype must be torch.float8"):
        DelayedScaling(torch.float16)
    with pytest.raises(ValueError, match="amax_history_len"):
        DelayedScaling(amax_history_len=0)
    with pytest.raises(ValueError, match="amax_compute_algo"):
        DelayedScaling(amax_compute_algo="mean")
    for cls in (CurrentScaling, DelayedScaling):
        for margin in (-1, 2.5, True, "1"):
            with pytest.raises(ValueError, match="margin must be a non-negative int"):
                cls(margin=margin)
        assert cls(margin=3).margin == 3


def test_scale_inv_dequantizes_the_last_cast_after_update():
    """README order: quantize, update (the scale moves on), then dequantize with scale_inv: it must be 1 / the scale
    that cast used (it was 1 / the new scale: errors of 110 on values up to 205). Round trip within e4m3's
    relative step 2**-3 (values kept above fp8's subnormals)."""
    torch.manual_seed(0)
    r = DelayedScaling(torch.float8_e4m3fn, amax_history_len=4)
    x = (torch.rand(1000) + 0.5) * 200
    y = r.quantize(x)  # with the initial scale, 1
    r.update()  # the scale moves to 448 / amax
    assert r.scale_inv.item() == 1.0 and r.scale.item() != 1.0
    back = y.float() * r.scale_inv
    assert ((back - x).abs() / x).max().item() <= 2**-3


def test_load_state_dict_refuses_another_configuration():
    """A state saved by an e5m2 / margin 3 recipe loaded into an e4m3 / margin 0 one: ValueError naming what
    differs, nothing loaded (its scale would saturate most values). A state_dict saved without scale_inv loads
    with 1 / scale."""
    src = DelayedScaling(torch.float8_e5m2, margin=3, amax_history_len=8)
    src.quantize(torch.randn(50) * 30)
    src.update()
    dst = DelayedScaling(torch.float8_e4m3fn, amax_history_len=8)
    before = dst.state_dict()
    with pytest.raises(ValueError, match=r"configured otherwise \(dtype: 'torch.float8_e5m2' saved, "
                                         r"'torch.float8_e4m3fn' here, margin: 3 saved, 0 here\)"):
        dst.load_state_dict(src.state_dict())
    for k, v in dst.state_dict().items():
        assert k == "config" or torch.equal(v, before[k]), k
    # another kind of recipe: the keys only the saved one has are named too (the message used to be "()")
    with pytest.raises(ValueError, match=r"configured otherwise \(amax_history_len: 8 saved, None here, "
                                         r"amax_compute_algo: 'max' saved, None here\)"):
        CurrentScaling(torch.float8_e4m3fn).load_state_dict(
            DelayedScaling(torch.float8_e4m3fn, amax_history_len=8).state_dict())
    same = DelayedScaling(torch.float8_e5m2, margin=3, amax_history_len=8)
    sd = src.state_dict()
    del sd["scale_inv"]
    same.load_state_dict(sd)
    assert torch.equal(same.scale_inv, src.scale.reciprocal())


@pytest.mark.parametrize("cls", [CurrentScaling, DelayedScaling])
def test_rejected_input_leaves_the_recipe_unchanged(cls):
    """A float64 x, an x on another device or a bad backend name raise before any state moves (CurrentScaling had
    already replaced its amax and scale from the rejected x)."""
    r = cls(torch.float8_e4m3fn)
    r.quantize(torch.randn(20))
    before = r.state_dict()
    for x, kw, exc in ((torch.randn(20, dtype=torch.float64) * 50, {}, TypeError),
                       (torch.randn(20, device="meta"), {}, ValueError),
                       (torch.randn(20) * 50, {"backend": "fastest"}, ValueError)):
        with pytest.raises(exc):
            r.quantize(x, **kw)
        for k, v in r.state_dict().items():
            assert k == "config" or torch.equal(v, before[k]), (k, x.dtype, kw)


def test_scale_inv_is_a_snapshot():
    """scale_inv kept beside its fp8 tensor (say, for the backward) stays that cast's, whatever later casts do."""
    r = CurrentScaling(torch.float8_e4m3fn)
    q1 = r.quantize(torch.full((4,), 2.0))
    s1 = r.scale_inv
    r.quantize(torch.full((4,), 200.0))
    assert torch.equal(q1.float() * s1, torch.full((4,), 2.0))


@pytest.mark.parametrize("cls", [CurrentScaling, DelayedScaling])
def test_backend_that_cannot_serve_leaves_the_recipe_unchanged(cls):
    """A valid backend name that cannot serve x's device ("cuda" for a CPU x) is refused before any state moves."""
    r = cls(torch.float8_e4m3fn)
    r.quantize(torch.randn(20))
    before = r.state_dict()
    with pytest.raises(ValueError, match="unavailable"):
        r.quantize(torch.randn(20) * 50, backend="cuda")
    for k, v in r.state_dict().items():
        assert k == "config" or torch.equal(v, before[k]), k


def test_recipes_on_meta_tensors():
    """Shape propagation through a recipe built on "meta" (the amax overlap check must not compare meta storage)."""
    r = DelayedScaling(torch.float8_e4m3fn, device="meta")
    y = r.quantize(torch.empty(3, 5, device="meta"))
    assert y.shape == (3, 5) and y.dtype == torch.float8_e4m3fn and y.is_meta


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("cls", [CurrentScaling, DelayedScaling])
def test_recipes_compile_fullgraph(cls, compiler):
    """quantize traces whole under torch.compile (its backend check is the op's constant-marked choice, which Dynamo
    calls, not traces); the same fp8 values and state as eager. Inductor too, torch.compile's default (it failed on
    the cast without amax: see test_cast_and_scale.py's test_inductor_compiles_casts_without_amax)."""
    torch._dynamo.reset()
    x = torch.randn(64) * 20
    outs = []
    for compiled in (False, True):
        r = cls(torch.float8_e4m3fn)
        q = torch.compile(r.quantize, fullgraph=True, backend=compiler) if compiled else r.quantize
        y = q(x)
        outs.append((y.float(), r.scale.clone(), r.amax.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)



def _snapshot(rs):
    return [torch.cat([r.scale, r.amax, r.amax_history, r._scale_inv]).view(torch.int32).clone() for r in rs]


def test_update_all_is_each_update_bit_for_bit():
    """update_all(recipes) == r.update() for each recipe, bit for bit, over several steps: mixed dtypes, margins,
    history lengths and algorithms (so several groups, one of a single recipe), amaxes that are 0, inf, NaN,
    subnormal or huge (a scale that overflows keeps the old one), a recipe listed twice (updated once)."""
    from mixprec_ops.fp8 import update_all

    def make():
        rs = []
        for i in range(23):
            rs.append(DelayedScaling(torch.float8_e4m3fn if i % 3 else torch.float8_e5m2, margin=i % 2,
                                     amax_history_len=(4, 16)[i % 2],
                                     amax_compute_algo="most_recent" if i % 5 == 0 else "max"))
        rs.append(DelayedScaling(torch.float8_e5m2, margin=3, amax_history_len=7))  # a group of its own
        return rs

    ours, theirs = make(), make()
    gen = torch.Generator().manual_seed(11)
    specials = torch.tensor([0.0, float("inf"), float("nan"), 1e-44, 3e38, 1e-30])
    for step in range(9):
        for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            x = torch.randn(50, generator=gen) * (10.0 ** (k % 4))
            if (k + step) % 7 == 0:
                x[3] = specials[(k + step) % len(specials)]
            a.quantize(x)
            b.quantize(x)
        update_all(ours + ours[:3])
        for r in theirs:
            r.update()
        for k, (a, b) in enumerate(zip(_snapshot(ours), _snapshot(theirs), strict=True)):
            assert torch.equal(a, b), (step, k)
    assert any(r.scale.item() != 1.0 for r in ours)  # the scales moved


def test_update_all_refuses_other_recipes_before_touching_any():
    from mixprec_ops.fp8 import update_all

    d = DelayedScaling()
    d.quantize(torch.randn(10) * 5)
    before = _snapshot([d])
    with pytest.raises(TypeError, match=r"recipes\[1\] must be a mixprec_ops.fp8.DelayedScaling"):
        update_all([d, CurrentScaling()])
    assert torch.equal(_snapshot([d])[0], before[0])
    update_all([])  # nothing to do


@pytest.mark.parametrize("compiler", [None, "aot_eager", "inductor"])
def test_scale_changed_before_backward(compiler):
    """x's gradient uses the scale of its own cast, whatever the recipe does before backward runs: one
    CurrentScaling shared by two casts (a block applied twice: the second quantize rewrites the scale in place), and
    DelayedScaling.update() between forward and backward. Eager autograd used to raise a version-counter error
    naming no recipe, and a compiled graph silently used the later scale (the gradient off by the scales' ratio).
    Bit for bit against separate recipes / an update after backward."""
    torch._dynamo.reset()
    x0 = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    w = torch.arange(16.0).reshape(4, 4)

    def twice(r1, r2, x):
        y = r1.quantize(x).float() * r1.scale_inv
        z = r2.quantize(y * 100.0).float() * r2.scale_inv
        return (z * w).sum()

    def delayed(r, x, update_first):
        loss = (r.quantize(x).float() * w).sum()
        if update_first:
            r.update()
        return loss

    fn_twice = twice if compiler is None else torch.compile(twice, backend=compiler)
    grads = []
    for shared in (False, True):
        x = x0.clone().requires_grad_(True)
        r = CurrentScaling()
        fn_twice(r, r if shared else CurrentScaling(), x).backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and (grads[0] != 0).any()
    fn_delayed = delayed if compiler is None else torch.compile(delayed, backend=compiler)
    grads = []
    for update_first in (False, True):
        torch.manual_seed(0)
        r = DelayedScaling(amax_history_len=4, amax_compute_algo="most_recent")
        r.quantize(x0 * 7)  # a scale from 7 max|x0|, which the update() after the next cast changes
        r.update()
        before = r.scale.clone()
        x = x0.clone().requires_grad_(True)
        fn_delayed(r, x, update_first).backward()
        assert not update_first or not torch.equal(r.scale, before)
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and (grads[0] != 0).any()
