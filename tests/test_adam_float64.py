"""float64 params in mixprec_ops.optim.Adam / AdamW. They are stepped by torch's own fused Adam in float64 (moments
float64, no master), so the oracle is torch.optim.Adam(W)(fused=True), bit for bit, and torch's single-tensor Adam
(plain float64 torch ops) within float64 rounding. They may share groups with 16-bit and fp32 params, whose steps
must stay bit-identical to the same optimizer without them; AMP skips, the grad scale and the clipping norm cover
them too."""

import copy

import pytest
import torch
from conftest import DEVICES

from mixprec_ops.amp import GradScaler
from mixprec_ops.optim import Adam, AdamW

PAIRS = [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)]
OPTS = [dict(), dict(amsgrad=True, weight_decay=0.1), dict(maximize=True, weight_decay=0.0), dict(lr="tensor")]


def _opts(opts, device):
    # (float64: torch's single-tensor Adam computes with the lr tensor in its dtype)
    if opts.get("lr") != "tensor":
        return opts
    return {**opts, "lr": torch.tensor(3e-3, device=device, dtype=torch.float64)}


def _f64(shape, device, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # a transposed param (and grads laid out like it): the kernels walk any dense layout
        return torch.randn(shape[::-1], generator=g, dtype=torch.float64).to(device).t().requires_grad_()
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()


def _twins(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


def _grads(ps, seed, scale=1.0):
    """Fresh random grads (never zeros) in each param's dtype and layout."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in ps:
        v = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
        out.append(torch.empty_like(p).copy_(v))
    return out


def _assert_same(a, b, opt_a, opt_b, what):
    assert torch.equal(a, b), f"{what}: {(a.double() - b.double()).abs().max().item()}"
    sa, sb = opt_a.state[a], opt_b.state[b]
    for k in sb:
        assert torch.equal(sa[k], sb[k]), f"{what} {k}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls,torch_cls", PAIRS, ids=["Adam", "AdamW"])
@pytest.mark.parametrize("opts", OPTS, ids=["default", "amsgrad-wd", "maximize", "lr-tensor"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_float64_params_step_as_torch_fused(device, cls, torch_cls, opts, transposed):
    """A group holding float64, bf16 and fp32 params, 8 steps under an LR scheduler: the float64 params and their
    state bit-identical to torch's fused Adam(W) on twins (float64 moments, no master, the step counted as torch
    counts it), and within float64 rounding of torch's single-tensor Adam; the other params bit-identical to this
    optimizer without the float64 params."""
    wide = [_f64((7, 5), device, transposed, 1), _f64((11,), device, False, 2)]
    rest = [torch.randn(6, 4, device=device).bfloat16().requires_grad_(),
            torch.randn(3, device=device).requires_grad_()]
    ours = cls([*wide, *rest], **_opts(opts, device), state_dtype=torch.bfloat16)
    fused_w, single_w, alone_r = _twins(wide), _twins(wide), _twins(rest)
    fused = torch_cls(fused_w, **_opts(opts, device), fused=True)
    single = torch_cls(single_w, **_opts(opts, device), foreach=False)
    alone = cls(alone_r, **_opts(opts, device), state_dtype=torch.bfloat16)
    opts_all = (ours, fused, single, alone)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + 0.3 * k)) for o in opts_all]
    for step in range(8):
        gw, gr = _grads(wide, 10 + step), _grads(rest, 20 + step)
        for ps, gs in ((wide, gw), (fused_w, gw), (single_w, gw), (rest, gr), (alone_r, gr)):
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
        for o in opts_all:
            o.step()
        for s in scheds:
            s.step()
    for i, (a, b, c) in enumerate(zip(wide, fused_w, single_w, strict=True)):
        _assert_same(a, b, ours, fused, f"float64 param {i}")
        st = ours.state[a]
        assert "master_param" not in st and st["exp_avg"].dtype == torch.float64 and st["step"].item() == 8
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)  # torch's plain float64 ops: rounding apart
    for i, (a, b) in enumerate(zip(rest, alone_r, strict=True)):
        _assert_same(a, b, ours, alone, f"param {i} beside them")
    # the later steps reused the planning (_steady.py), which records no non-contiguous param
    assert (ours._steady is not None and ours._steady["used"]) is not transposed
    assert ours.state[rest[0]]["exp_avg"].dtype == torch.bfloat16 and "master_param" in ours.state[rest[0]]


@pytest.mark.parametrize("device", DEVICES)
def test_float64_params_in_the_steady_step(device):
    """The steady-state step (a recorded planning reused while nothing it rests on changes) records float64 params
    as a launch of their own: a float64 grad missing for some steps (the param skipped, its counter unmoved), a
    moment replaced by hand and the param written between steps each drop the record or are seen by it; after each,
    the float64 param is still bit-identical to torch's fused AdamW given the same grads, and the record serves
    again."""
    wide = _f64((9, 4), device, False, 11)
    narrow = torch.randn(12, device=device).bfloat16().requires_grad_()
    ours = AdamW([narrow, wide], lr=1e-2)
    (twin,) = _twins([wide])
    ref = torch.optim.AdamW([twin], lr=1e-2, fused=True)
    used = []
    for step in range(14):
        skip = step in (5, 6)
        g = None if skip else _grads([wide], 120 + step)[0]
        wide.grad, twin.grad = g, (None if g is None else g.clone())
        narrow.grad = _grads([narrow], 140 + step)[0]
        if step == 9:  # a moment replaced by hand: the record must step the new tensor
            for o, p in ((ours, wide), (ref, twin)):
                o.state[p]["exp_avg"] = o.state[p]["exp_avg"] * 0.5
        if step == 11:  # the param written between steps
            with torch.no_grad():
                wide.add_(1.0)
                twin.add_(1.0)
        ours.step()
        ref.step()
        used.append(ours._steady is not None and ours._steady["used"])
        _assert_same(wide, twin, ours, ref, f"step {step}")
    assert ours.state[wide]["step"].item() == 12 and ours.state[narrow]["step"].item() == 14
    assert used[3] and used[-1], used  # served before the changes and again after them


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scaler_cls", [GradScaler, torch.amp.GradScaler], ids=["ours", "torch"])
@pytest.mark.parametrize("bad", ["float64", "bf16"])
@pytest.mark.parametrize("max_grad_norm", [None, 1e9], ids=["no-clip", "clip"])
def test_float64_params_under_grad_scaler(device, scaler_cls, bad, max_grad_norm):
    """Scaled grads: the float64 params take the scale in torch's kernel, as torch's fused AdamW does under the same
    scaler (bit-identical); a step with an inf grad (in a float64 grad, or in a bf16 one of the same group) is
    skipped for every param: params, moments and step counters bit-unchanged, and both scalers back off alike.
    With max_grad_norm (a coefficient of exactly 1 here) our scaler leaves the inf check to the step's norm pass,
    which must find an inf among the float64 grads too."""
    wide = [_f64((5, 3), device, False, 3)]
    narrow = [torch.randn(9, device=device).bfloat16().requires_grad_()]
    ours = AdamW([*wide, *narrow], lr=1e-2, max_grad_norm=max_grad_norm)
    twin = _twins(wide)
    ref = torch.optim.AdamW(twin, lr=1e-2, fused=True)
    s_ours = scaler_cls(device, init_scale=2.0**10, growth_interval=1000)
    s_ref = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=1000)
    for step in range(4):
        s_ours.scale(torch.ones((), device=device))  # (creates the scales, as the first scale(loss) does)
        s_ref.scale(torch.ones((), device=device))
        gw, gn = _grads(wide, 30 + step, 2.0**10), _grads(narrow, 40 + step, 2.0**10)
        for p, g in zip(twin, gw, strict=True):
            p.grad = g.clone()
        if step == 2:  # (torch's AdamW holds the float64 twin only: its grad gets the inf either way)
            (gw if bad == "float64" else gn)[0][1] = float("inf")
            twin[0].grad[1] = float("inf")
        for p, g in zip(wide, gw, strict=True):
            p.grad = g.clone()
        narrow[0].grad = gn[0]
        before = [t.clone() for p in (*wide, *narrow) for t in (p, *ours.state[p].values())]
        s_ours.step(ours)
        s_ref.step(ref)
        # the grads are only read (the class docstring), the float64 ones too: torch's kernel, which writes the
        # unscaled grads back, is given copies
        assert torch.equal(wide[0].grad, gw[0]) and torch.equal(narrow[0].grad, gn[0])
        s_ours.update()
        s_ref.update()
        after = [t for p in (*wide, *narrow) for t in (p, *ours.state[p].values())]
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "a skipped step changed"
        else:
            assert not torch.equal(before[0], after[0])
        assert s_ours.get_scale() == s_ref.get_scale() == 2.0 ** (10 if step < 2 else 9)
        _assert_same(wide[0], twin[0], ours, ref, f"step {step}")
    assert ours.state[wide[0]]["step"].item() == ours.state[narrow[0]]["step"].item() == 3


@pytest.mark.parametrize("device", DEVICES)
def test_float64_grads_join_the_clipping_norm(device):
    """max_grad_norm: the global norm counts the float64 grads (float64 squares) with the others; the float64 params
    step with their grads times this step's coefficient, as torch's fused AdamW does on grads clipped beforehand;
    an inf in a float64 grad skips the step through the norm pass's flag."""
    wide = [_f64((4, 6), device, False, 5)]
    narrow = [torch.randn(13, device=device).bfloat16().requires_grad_()]
    ours = AdamW([*wide, *narrow], lr=1e-2, max_grad_norm=0.5)
    twin = _twins(wide)
    ref = torch.optim.AdamW(twin, lr=1e-2, fused=True)
    for step in range(3):
        gw, gn = _grads(wide, 50 + step, 3.0), _grads(narrow, 60 + step, 3.0)
        wide[0].grad, narrow[0].grad = gw[0].clone(), gn[0]
        ours.step()
        norm = torch.cat([gw[0].flatten(), gn[0].double()]).norm()
        torch.testing.assert_close(ours.grad_norm.double(), norm, rtol=2e-7, atol=0)  # an fp32 norm
        coef = torch.clamp(0.5 / (ours.grad_norm + 1e-6), max=1.0)  # (the step's own fp32 coefficient)
        assert coef.item() < 0.2  # clipping is on
        twin[0].grad = gw[0] * coef.double()
        ref.step()
        _assert_same(wide[0], twin[0], ours, ref, f"step {step}")
    # float64 grads past fp32's overflow rule (a norm of 2^64 or more counts as inf: the pass's fp32 squares
    # overflow) are not under it: summed in float64, they clip
    wide[0].grad, narrow[0].grad = _grads(wide, 65, 1e20)[0], _grads(narrow, 66)[0]
    twin[0].grad = wide[0].grad.clone()
    ours.step()
    assert 1e20 < ours.grad_norm.item() < 1e22
    twin[0].grad = twin[0].grad * torch.clamp(0.5 / (ours.grad_norm + 1e-6), max=1.0).double()
    ref.step()
    _assert_same(wide[0], twin[0], ours, ref, "huge float64 grads")
    before = [t.clone() for p in (*wide, *narrow) for t in (p, *ours.state[p].values())]
    wide[0].grad = _grads(wide, 70)[0]
    wide[0].grad[2, 3] = float("nan")
    ours.step()
    after = [t for p in (*wide, *narrow) for t in (p, *ours.state[p].values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert ours.grad_norm.isnan()


@pytest.mark.parametrize("device", DEVICES)
def test_float64_state_dict_round_trips_with_torch(device):
    """Ours -> torch.optim.AdamW and torch's -> ours, then 3 more steps on each side: bit-identical (the float64
    moments are loaded as float64, not cast to the group's state_dtype)."""
    a, b = _f64((6, 2), device, False, 7), _f64((6, 2), device, False, 7)
    ours = AdamW([a], lr=1e-2, state_dtype=torch.bfloat16)
    ref = torch.optim.AdamW([b], lr=1e-2, fused=True)
    for step in range(3):
        a.grad, b.grad = _grads([a], 80 + step)[0], _grads([b], 80 + step)[0]
        ours.step()
        ref.step()
    to_torch = torch.optim.AdamW([a2 := a.detach().clone().requires_grad_()], lr=1e-2, fused=True)
    to_torch.load_state_dict(copy.deepcopy(ours.state_dict()))  # (torch's load keeps tensors it need not cast)
    to_ours = AdamW([b2 := b.detach().clone().requires_grad_()], lr=1e-2, state_dtype=torch.bfloat16)
    to_ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert to_ours.state[b2]["exp_avg"].dtype == torch.float64
    for step in range(3):
        g = _grads([a], 90 + step)[0]
        for p in (a, b, a2, b2):
            p.grad = g.clone()
        for o in (ours, ref, to_torch, to_ours):
            o.step()
    _assert_same(a, b, ours, ref, "uninterrupted")
    _assert_same(a2, b, to_torch, ref, "ours loaded into torch's")
    _assert_same(b2, b, to_ours, ref, "torch's loaded into ours")


def test_master_of_a_param_made_float64_is_taken_over():
    """model.double() after bf16 steps: as for model.float(), the param takes its master's fp32 values (elements
    that still hold the master's rounding), the master goes, and the param steps in float64 from there."""
    p = torch.randn(40).bfloat16().requires_grad_()
    opt = AdamW([p], lr=1e-2)
    for step in range(3):
        p.grad = _grads([p], 100 + step)[0]
        opt.step()
    master = opt.state[p]["master_param"].clone()
    assert not torch.equal(master, p.float())  # the master holds more than the bf16 param
    p.data = p.data.double()
    opt.resync_masters()
    assert torch.equal(p, master.double()) and "master_param" not in opt.state[p]
    p.grad = _grads([p], 110)[0]
    opt.step()
    assert p.dtype == torch.float64 and not torch.equal(p, master.double())


def test_float64_param_dtype_errors():
    """Other dtypes stay refused: a complex param that requires grad at construction; a float64 grad of a float32
    param (torch >= 2.10 lets p.grad_dtype = None admit it) at the step, naming the param."""
    with pytest.raises(TypeError, match="supports float32, float16, bfloat16 and float64 params"):
        AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    p = torch.nn.Parameter(torch.randn(3))
    if not hasattr(p, "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype")
    opt = AdamW([p])
    p.grad_dtype = None
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"param 0 of param group 0: grad dtype must be float32, float16 or bfloat16 "
                                        r"\(or float64, for a float64 param\), got torch.float64"):
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
def test_float64_params_of_any_layout(device):
    """torch's fused kernels walk memory in order, whatever the strides: a float64 param that is a strided slice of
    a larger tensor, and one whose layout changes after its moments were made (channels_last after two steps), step
    through contiguous copies. Against torch's single-tensor AdamW (plain float64 ops, any layout) within float64
    rounding, and nothing outside the slice is written."""
    g = torch.Generator().manual_seed(13)
    storage = torch.randn(6, 10, generator=g, dtype=torch.float64).to(device)
    outside_before = storage[:, 1::2].clone()
    sliced = storage[:, ::2].requires_grad_()  # a view with gaps: not dense
    conv = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    ref_sliced, ref_conv = _twins([sliced, conv])
    ours = AdamW([sliced, conv], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([ref_sliced, ref_conv], lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(5):
        if step == 2:
            with torch.no_grad():  # the layout changes; the moments keep theirs
                conv.data = conv.data.to(memory_format=torch.channels_last)
        for p, r in ((sliced, ref_sliced), (conv, ref_conv)):
            p.grad = torch.empty_like(p).copy_(_grads([r], 150 + step)[0])
            r.grad = p.grad.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(sliced, ref_sliced, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(conv, ref_conv, rtol=1e-12, atol=1e-14)
    assert torch.equal(storage[:, 1::2], outside_before)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_skip_on_a_flag_above_one(device):
    """torch.amp.GradScaler hands a fused optimizer the sum of its devices' flags (2 when two devices found inf);
    torch's fused kernel skips only on exactly 1. The float64 params must skip on any non-zero flag, as the others
    do, and their counters must not move."""
    wide = _f64((5,), device, False, 17)
    narrow = torch.randn(7, device=device).bfloat16().requires_grad_()
    opt = AdamW([wide, narrow], lr=1e-2)
    wide.grad, narrow.grad = _grads([wide], 160)[0], _grads([narrow], 161)[0]
    opt.step()
    before = [t.clone() for p in (wide, narrow) for t in (p, *opt.state[p].values())]
    opt.grad_scale = torch.ones((), device=device)  # as GradScaler.step sets them
    opt.found_inf = torch.full((), 2.0, device=device)
    opt.step()
    after = [t for p in (wide, narrow) for t in (p, *opt.state[p].values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_float64_param_in_a_compiled_step():
    """torch.compile(opt.step): the float64 launch runs eagerly (a graph break: Dynamo cannot functionalize torch's
    fused kernels on the params it holds); three compiled steps bit-identical to eager ones."""
    torch._dynamo.reset()
    wide = [_f64((3, 4), "cpu", False, 19), torch.randn(6).bfloat16().requires_grad_()]
    twin = _twins(wide)
    compiled, eager = AdamW(wide, lr=1e-2, max_grad_norm=0.5), AdamW(twin, lr=1e-2, max_grad_norm=0.5)
    step = torch.compile(compiled.step, backend="aot_eager")
    for k in range(3):
        for ps in (wide, twin):
            for p, g in zip(ps, _grads(ps, 170 + k, 3.0), strict=True):
                p.grad = g
        step()
        eager.step()
    for a, b in zip(wide, twin, strict=True):
        _assert_same(a, b, compiled, eager, "compiled")


def test_moments_follow_a_param_across_float64():
    """A bf16 param made float64 by `p.data = ...` (no resync call): at the next step it takes over its master, its
    fp32 moments become float64 (values kept) and it steps as torch's fused AdamW from that state; made bf16 again,
    its moments go back to the group's state_dtype and it gets a master again."""
    p = torch.randn(30).bfloat16().requires_grad_()
    opt = AdamW([p], lr=1e-2)
    for step in range(3):
        p.grad = _grads([p], 180 + step)[0]
        opt.step()
    st = opt.state[p]
    master, saved = st["master_param"].clone(), {k: v.clone() for k, v in st.items() if k != "master_param"}
    p.data = p.data.double()
    g = _grads([p], 190)[0]
    p.grad = g.clone()
    opt.step()
    assert "master_param" not in st and st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float64
    q = master.double().requires_grad_()
    ref = torch.optim.AdamW([q], lr=1e-2, fused=True)
    ref.load_state_dict({"state": {0: {k: v.double() if k != "step" else v for k, v in saved.items()}},
                         "param_groups": [{**ref.state_dict()["param_groups"][0]}]})
    q.grad = g.clone()
    ref.step()
    _assert_same(p, q, opt, ref, "after the switch")
    p.data = p.data.bfloat16()
    p.grad = _grads([p], 191)[0]
    opt.step()
    assert st["exp_avg"].dtype == torch.float32 and st["master_param"].dtype == torch.float32
    assert st["step"].item() == 5 and torch.isfinite(p).all()
