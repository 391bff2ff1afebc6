"""mixprec_ops.amp.GradScaler: a drop-in for torch.amp.GradScaler that also unscales bf16 grads."""

import pytest
import torch
from conftest import DEVICES

from mixprec_ops.amp import GradScaler


def make_model(device, dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.GELU(), torch.nn.Linear(31, 5)).to(device, dtype)


def batches(n, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 13, generator=g).to(device, dtype), torch.randn(16, 5, generator=g).to(device, dtype))
            for _ in range(n)]


def train(scaler, device, inject_at, steps=12, autocast_dtype=torch.float16, param_dtype=torch.float32,
          make_opt=lambda params: torch.optim.SGD(params, lr=0.05), unscale_first=False):
    model = make_model(device, param_dtype)
    opt = make_opt(model.parameters())
    history = []
    for i, (x, y) in enumerate(batches(steps, device, param_dtype)):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=param_dtype == torch.float32):
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        scaler.scale(loss).backward()
        if i in inject_at:
            model[0].weight.grad[3, 4] = float("inf") if i % 2 else float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        skipped = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        history.append((scaler.get_scale(), skipped, [p.detach().clone() for p in model.parameters()]))
    return history


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_loop_matches_torch_grad_scaler(device):
    """Injected inf/NaN grads skip exactly those steps and back off; everything else, including growth after
    growth_interval good steps, matches torch.amp.GradScaler bit for bit."""
    kw = dict(init_scale=2.0**10, growth_interval=3)
    ours = train(GradScaler(device, **kw), device, inject_at={2, 7})
    theirs = train(torch.amp.GradScaler(device, **kw), device, inject_at={2, 7})
    for i, ((s1, k1, p1), (s2, k2, p2)) in enumerate(zip(ours, theirs)):
        assert s1 == s2, f"step {i}: scale {s1} vs torch {s2}"
        assert k1 == k2 == (i in {2, 7}), f"step {i}: skipped {k1} vs torch {k2}"
        assert all(torch.equal(a, b) for a, b in zip(p1, p2)), f"step {i}: params differ from torch's"
    scales = [s for s, _, _ in ours]
    assert scales[2] == 2.0**9 and scales[5] == 2.0**10  # backoff at the bad step, growth 3 good steps later


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_grads_work(device):
    """bf16 params and grads (torch's own unscale kernel rejects bf16 on some devices): same skip/backoff."""
    hist = train(GradScaler(device, init_scale=2.0**8, growth_interval=100), device, inject_at={4}, steps=8,
                 param_dtype=torch.bfloat16)
    assert [k for _, k, _ in hist] == [i == 4 for i in range(8)]
    assert hist[4][0] == 2.0**7
    assert all(p.dtype == torch.bfloat16 for p in hist[-1][2])


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_interchangeable_with_torch(device):
    ours = GradScaler(device, init_scale=1024.0, growth_interval=7)
    theirs = torch.amp.GradScaler(device)
    train(ours, device, inject_at={1}, steps=3)
    sd = ours.state_dict()
    assert set(sd) == set(torch.amp.GradScaler(device).state_dict())
    theirs.load_state_dict(sd)
    assert theirs.get_scale() == ours.get_scale() == 512.0
    back = GradScaler(device)
    back.load_state_dict(theirs.state_dict())
    assert back.state_dict() == theirs.state_dict()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in bench/gpu_check)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unscale_adds_no_host_sync(backend):
    model = make_model("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cuda", backend=backend)
    loss = model(torch.randn(8, 13, device="cuda")).square().mean()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # warm-up: lazy inits and kernel compilation may sync
    opt.zero_grad()
    loss = model(torch.randn(8, 13, device="cuda")).square().mean()
    scaler.scale(loss).backward()
    scaler._per_optimizer_states.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scaler.unscale_(opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bad_backend_name_fails_at_construction(monkeypatch):
    """A misspelt backend is refused by the constructor, not at the first step after a whole forward/backward."""
    with pytest.raises(ValueError, match="backend must be one of"):
        GradScaler("cpu", backend="cuBLAS")
    monkeypatch.setenv("MIXPREC_BACKEND", "fast")
    with pytest.raises(ValueError, match="MIXPREC_BACKEND must be one of"):
        GradScaler("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for a machine without CUDA")
def test_constructor_warning_points_at_the_caller():
    """torch's "CUDA is not available. Disabling." names the line that built the scaler, with ours as with
    torch's (warning filters keyed on module or line, and the once-per-location default, depend on it)."""
    with pytest.warns(UserWarning, match="CUDA is not available") as rec:
        GradScaler("cuda")
    assert rec[0].filename == __file__, rec[0].filename


def test_overflow_after_unscaling_skips_the_step():
    """With a scale below 1, a finite grad can overflow when unscaled: ours checks the unscaled values (as stored)
    and skips the step and backs off (torch's kernel checks the input and steps with an inf; the documented
    difference). The params stay bit-unchanged."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = GradScaler("cpu", init_scale=0.5)
    scaler.scale(torch.ones(()))  # creates the scale tensor, as scaling the loss does
    p.grad = torch.tensor([3e38, 1.0])  # 3e38 / 0.5 overflows fp32
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(2)) and scaler.get_scale() == 0.25


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_then_step"])
@pytest.mark.parametrize("scheduler", [False, True], ids=["", "lr_scheduler"])
def test_clipping_optimizer_takes_over_the_inf_check(device, unscale_first, scheduler, monkeypatch):
    """mixprec_ops AdamW with max_grad_norm reads every grad in its norm pass and flags inf/NaN there: our scaler
    hands it the check instead of running its own read-only pass (one read of the grads per step fewer; the
    scaler's unscale_ calls are counted), and steps, skips and backs off exactly as torch.amp.GradScaler around the
    same optimizer, bit for bit. After an explicit scaler.unscale_(opt) the scaler's own pass runs, as before. An
    LR scheduler (which wraps opt.step on the instance) does not stop the handover."""
    from mixprec_ops.amp import grad_scaler as gs
    from mixprec_ops.optim import AdamW

    calls = []  # the scaler's unscale passes, by either route (the per-param loop's, the swept grads')
    def counted(real):
        return lambda *a, **k: calls.append(1) or real(*a, **k)

    for name in ("unscale_", "unscale_checked_"):
        monkeypatch.setattr(gs, name, counted(getattr(gs, name)))
    schedulers = []

    def make_opt(params):
        o = AdamW(params, lr=1e-2, max_grad_norm=0.5)
        if scheduler:
            schedulers.append(torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
            assert "step" in o.__dict__  # the scheduler's wrapper
        return o

    kw = dict(init_scale=2.0**10, growth_interval=3)
    run = dict(inject_at={2, 7}, steps=10, make_opt=make_opt, unscale_first=unscale_first)
    ours = train(GradScaler(device, **kw), device, **run)
    assert len(calls) == (10 if unscale_first else 0)
    theirs = train(torch.amp.GradScaler(device, **kw), device, **run)
    for i, ((s1, k1, p1), (s2, k2, p2)) in enumerate(zip(ours, theirs, strict=True)):
        assert s1 == s2, f"step {i}: scale {s1} vs torch {s2}"
        assert k1 == k2 == (i in {2, 7}), f"step {i}: skipped {k1} vs torch {k2}"
        assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True)), f"step {i}: params differ"


def test_clipping_optimizer_norm_overflow_backs_off():
    """Finite grads whose squared norm overflows fp32 make the clipping optimizer skip its step; with the check
    handed over, the scaler learns of it and backs off (torch's scaler, whose own check sees only finite values,
    would keep the scale, and every later step would skip again)."""
    from mixprec_ops.optim import AdamW

    p = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([p], lr=0.1, max_grad_norm=1.0)
    scaler = GradScaler("cpu", init_scale=2.0**4)
    scaler.scale(torch.ones(()))
    p.grad = torch.full((4,), 3e19)  # each square overflows fp32; every element is finite
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(4)) and scaler.get_scale() == 2.0**3
    assert not hasattr(opt, "_mixprec_found_inf_out")


@pytest.mark.parametrize("scaler_cls", [GradScaler, torch.amp.GradScaler], ids=["ours", "torch"])
def test_clipping_optimizer_with_a_step_pre_hook_keeps_the_scalers_check(scaler_cls):
    """A step pre-hook runs after the scaler's check and before the optimizer's norm pass, and may change the grads
    (here it zeroes the NaN): the check is then not handed over, so the scaler sees the NaN the loss produced and
    skips and backs off, as torch's scaler does."""
    from mixprec_ops.optim import AdamW

    p = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([p], lr=0.1, max_grad_norm=1.0)

    def zero_nans(optimizer, args, kwargs):
        p.grad.nan_to_num_(0.0)

    opt.register_step_pre_hook(zero_nans)
    scaler = scaler_cls("cpu", init_scale=2.0**4)
    scaler.scale(torch.ones(()))
    p.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**3


@pytest.mark.parametrize("scaler_cls", [GradScaler, torch.amp.GradScaler], ids=["ours", "torch"])
def test_clipping_optimizer_without_grads_records_no_check(scaler_cls):
    """An optimizer with no grads this iteration records no inf check: update() raises as torch's does (a step
    that checked nothing must not count as a good step towards growing the scale)."""
    from mixprec_ops.optim import AdamW

    p = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([p], lr=0.1, max_grad_norm=1.0)
    scaler = scaler_cls("cpu", init_scale=2.0**4, growth_interval=1)
    scaler.scale(torch.ones(()))
    scaler.step(opt)
    with pytest.raises(AssertionError, match="No inf checks were recorded"):
        scaler.update()
    assert torch.equal(p.detach(), torch.ones(4))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_clipping_optimizer_with_a_compiled_step_keeps_the_scalers_check(compiler):
    """opt.step replaced by its compiled self (the step cannot take the check over from inside a graph): the
    scaler keeps its own check, and skips and backs off on an inf grad as torch's scaler does. Inductor too."""
    from mixprec_ops.optim import AdamW

    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([p], lr=0.1, max_grad_norm=1.0)
    opt.step = torch.compile(opt.step, backend=compiler)
    scaler = GradScaler("cpu", init_scale=2.0**4)
    for grad, want_scale in (([1.0, 2.0, 3.0, 4.0], 2.0**4), ([1.0, float("inf"), 1.0, 1.0], 2.0**3)):
        before = p.detach().clone()
        scaler.scale(torch.ones(()))
        p.grad = torch.tensor(grad)
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == want_scale
        assert torch.equal(p.detach(), before) == (want_scale != 2.0**4)
    assert not hasattr(opt, "_mixprec_found_inf_out")


@pytest.mark.parametrize("scaler_cls", [GradScaler, torch.amp.GradScaler], ids=["ours", "torch"])
def test_handed_over_check_that_the_step_never_took_runs_after_it(scaler_cls):
    """A subclass whose step() reaches AdamW.step only every other call: on the call that does not, nobody filled
    the handed-over flag; the scaler then checks the grads itself after the step, and backs off on the inf as
    torch's scaler does (update() used to raise "No inf checks were recorded"). Nothing is left on the optimizer."""
    from mixprec_ops.optim import AdamW

    class EveryOther(AdamW):
        calls = 0

        def step(self, closure=None):
            self.calls += 1
            return super().step(closure) if self.calls % 2 == 0 else None

    p = torch.nn.Parameter(torch.ones(4))
    opt = EveryOther([p], lr=0.1, max_grad_norm=1.0)
    scaler = scaler_cls("cpu", init_scale=2.0**4)
    scales = []
    for grad in ([1.0, float("inf"), 1.0, 1.0], [1.0, float("inf"), 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]):
        scaler.scale(torch.ones(()))
        p.grad = torch.tensor(grad)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales == [2.0**3, 2.0**2, 2.0**2]
    assert not hasattr(opt, "_mixprec_found_inf_out")


@pytest.mark.parametrize("opt_cls", ["mixprec", "sgd"])
def test_disabled_scaler_steps_like_torch(opt_cls):
    """GradScaler(enabled=False) (AMP off by a flag, or CUDA missing): step() just steps, as torch's does (torch
    keeps no per-optimizer states then, which the step's hand-over check must not read)."""
    from mixprec_ops.optim import AdamW

    out = {}
    for name, cls in (("ours", GradScaler), ("torch", torch.amp.GradScaler)):
        p = torch.nn.Parameter(torch.ones(3))
        opt = AdamW([p], lr=0.1, max_grad_norm=1.0) if opt_cls == "mixprec" else torch.optim.SGD([p], lr=0.1)
        scaler = cls("cpu", enabled=False)
        p.grad = torch.ones(3)
        scaler.step(opt)
        scaler.update()
        out[name] = p.detach().clone()
    assert torch.equal(out["ours"], out["torch"]) and not torch.equal(out["ours"], torch.ones(3))


@pytest.mark.parametrize("scaler_cls", [GradScaler, torch.amp.GradScaler], ids=["ours", "torch"])
def test_compiled_loop_with_two_optimizers_backs_off_like_torch(scaler_cls):
    """torch.compile of a whole training step (scale, backward, scaler.step of two AdamWs, update): Dynamo runs
    the scaler's hand-over decision eagerly but compiles the clipping optimizer's step, which therefore never took
    the flag; the scale stayed at its start while every step skipped (a stalled run, no error). The scaler now
    checks the grads after such a step: the scale backs off on every overflow, as torch's."""
    from mixprec_ops.optim import AdamW

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opts = [AdamW(m[0].parameters(), lr=1e-2), AdamW(m[1].parameters(), lr=1e-2, max_grad_norm=1.0)]
    scaler = scaler_cls("cpu", init_scale=1024.0)

    @torch.compile(backend="eager")
    def train(x):
        for o in opts:
            o.zero_grad()
        scaler.scale(m(x).pow(2).sum()).backward()
        m[1].weight.grad[0, 0] = float("inf")
        for o in opts:
            scaler.step(o)
        scaler.update()

    scales = []
    for _ in range(3):
        train(torch.randn(2, 4))
        scales.append(scaler.get_scale())
    assert scales == [512.0, 256.0, 128.0]
    assert not any(hasattr(o, "_mixprec_found_inf_out") for o in opts)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_grads_go_through_torchs_kernel(device):
    """Grads of a dtype our kernel does not take (float64, with any optimizer: torch's SGD here) are unscaled by
    torch's own kernel in the same unscale_, and their inf/NaN count: the same grads and flags as torch's scaler."""
    grads = [torch.randn(n, dtype=dt, device=device) * 512 for n, dt in ((5, torch.float64), (9, torch.float32))]
    for bad in (None, float("inf")):
        found = {}
        for name, cls in (("ours", GradScaler), ("torch", torch.amp.GradScaler)):
            ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            if bad is not None:
                ps[0].grad[3] = bad
            opt = torch.optim.SGD(ps, lr=0.1)
            s = cls(device, init_scale=512.0)
            s.scale(torch.ones((), device=device))  # (initialises the scale, as a scaled loss does)
            s.unscale_(opt)
            found[name] = ([p.grad.clone() for p in ps], sum(v.item() for v in s._found_inf_per_device(opt).values()))
        (ga, fa), (gb, fb) = found["ours"], found["torch"]
        assert fa == fb == (0.0 if bad is None else 1.0)
        for a, b in zip(ga, gb):
            assert torch.equal(a, b), (a, b)


def test_fp16_sparse_grads_are_coalesced_before_the_check():
    """With allow_fp16 (torch's sharded scalers pass it), a sparse fp16 grad is coalesced first, as torch does:
    duplicate indices summed in fp16 can overflow (40000 + 40000), and that inf must be found; unscaled one by one
    the duplicates are finite. Same grads and flag as torch.amp.GradScaler._unscale_grads_."""
    out = {}
    for name, cls in (("ours", GradScaler), ("torch", torch.amp.GradScaler)):
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
        p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2]]), torch.tensor([4e4, 4e4, 8.0]).half(), (3,))
        s = cls("cpu")
        found = torch.zeros(1)
        per_dev = s._unscale_grads_(torch.optim.SGD([p], lr=0.1), torch.full((1,), 1 / 512), found, True)
        out[name] = (p.grad.to_dense(), sum(v.item() for v in per_dev.values()))
    assert out["ours"][1] == out["torch"][1] == 1.0
    assert torch.equal(out["ours"][0], out["torch"][0]), out


def _grads_for_routes(device):
    """Grads of every dtype the kernels take, odd shapes, a transposed (non-contiguous) one and a strided slice, with
    values that overflow fp16 when unscaled by inv_scale = 4 (60000 * 4) and an inf in a bf16 grad: fresh random data,
    scaled like real scaled grads."""
    g = torch.Generator().manual_seed(11)
    specs = [((7, 3), torch.float32), ((129,), torch.bfloat16), ((1,), torch.float16), ((5, 9), torch.float32),
             ((33,), torch.bfloat16), ((4, 6), torch.float16)]
    out = [(torch.randn(s, generator=g) * 300).to(device, dt) for s, dt in specs]
    out[3] = out[3].t()  # non-contiguous, still dense
    out[4] = (torch.randn(66, generator=g) * 300).to(device, torch.bfloat16)[::2]  # a strided slice
    return out


def _spy(seen, name, real):
    """A stand-in that notes `name` in `seen`, then calls `real` (None: returns None)."""
    def spy(*args):
        seen.append(name)
        return None if real is None else real(*args)

    return spy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["finite", "inf_in_bf16", "fp16_overflows"])
def test_plain_grads_take_the_swept_route_with_the_loops_results(device, case, monkeypatch):
    """Plain strided float32/float16/bfloat16 grads are found by whole-list sweeps (_plain_grads_by_device) and
    unscaled past unscale_'s list checks, instead of GradScaler's per-param loop (~3x less host time at 2,000 params
    on the CI CPU; bench/NOTES.md). Same grads, bit for bit, and the same flag as the loop gives (the loop forced
    by making the sweeps decline), with both routes seen to run; the expected values from fp32 products rounded
    once (the kernels' rule)."""
    import mixprec_ops.amp.grad_scaler as gs

    inv_value = 4.0 if case == "fp16_overflows" else 1 / 512
    results = {}
    real_sweep, real_loop = gs._plain_grads_by_device, GradScaler._unscale
    for route in ("swept", "loop"):
        grads = _grads_for_routes(device)
        if case == "inf_in_bf16":
            grads[1][77] = float("inf")
        if case == "fp16_overflows":
            grads[2].fill_(6e4)
        expected = [(x.float() * inv_value).to(x.dtype) for x in grads]
        ps = [torch.nn.Parameter(torch.zeros(x.shape, dtype=x.dtype, device=device)) for x in grads]
        for p, x in zip(ps, grads, strict=True):
            p.grad = x
        opt = torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1)
        seen = []
        monkeypatch.setattr(gs, "_plain_grads_by_device", _spy(seen, "swept" if route == "swept" else "declined",
                                                               real_sweep if route == "swept" else None))
        monkeypatch.setattr(GradScaler, "_unscale", _spy(seen, "loop", real_loop))
        s = GradScaler(device)
        found = torch.zeros((), device=device)
        per_dev = s._unscale_grads_(opt, torch.full((), inv_value, device=device), found, True)
        assert seen == (["swept"] if route == "swept" else ["declined", "loop"]), seen
        flag = sum(v.item() for v in per_dev.values())
        assert flag == (0.0 if case == "finite" else 1.0)
        for i, (p, e) in enumerate(zip(ps, expected, strict=True)):
            assert p.grad.dtype == e.dtype and torch.equal(p.grad, e), (route, i)
        results[route] = ([p.grad.clone() for p in ps], flag)
    assert results["swept"][1] == results["loop"][1]


def test_fp16_grads_without_allow_fp16_raise_before_anything_is_unscaled():
    """torch's error for fp16 grads when allow_fp16 is off (scaler.unscale_ of fp16 params), raised before any grad
    is unscaled, the fp32 grad listed first included."""
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    a.grad, b.grad = torch.full((3,), 8.0), torch.full((3,), 8.0, dtype=torch.float16)
    s = GradScaler("cpu")
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        s._unscale_grads_(torch.optim.SGD([a, b], lr=0.1), torch.full((), 0.5), torch.zeros(()), False)
    assert torch.equal(a.grad, torch.full((3,), 8.0)) and torch.equal(b.grad, torch.full((3,), 8.0).half())


def test_swept_grads_are_grouped_by_device_in_param_order():
    """The sweeps' grouping when grads lie on several devices (one unscale_ call a device, every dtype in it); meta
    tensors stand in for a second device here. Declines (None) what the per-param loop must handle: a sparse grad,
    a float64 grad, a tensor subclass, no grads at all."""
    from mixprec_ops.amp.grad_scaler import _plain_grads_by_device

    devs = ["cpu", "meta", "cpu", "meta", "cpu"]
    dts = [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32, torch.float16]
    ps = [torch.nn.Parameter(torch.zeros(3, dtype=dt, device=d)) for d, dt in zip(devs, dts, strict=True)]
    for p in ps:
        p.grad = torch.ones_like(p)
    ps.append(torch.nn.Parameter(torch.zeros(2)))  # no grad: left out
    out = _plain_grads_by_device(torch.optim.SGD(ps, lr=0.1), True)
    assert set(out) == {torch.device("cpu"), torch.device("meta")}
    for dev, idx in (("cpu", [0, 2, 4]), ("meta", [1, 3])):
        got = out[torch.device(dev)]
        assert sorted(map(id, got)) == sorted(id(ps[i].grad) for i in idx)
    one = _plain_grads_by_device(torch.optim.SGD(ps[::2], lr=0.1), True)  # one device: the grads in param order
    cpu = torch.device("cpu")
    assert list(one) == [cpu] and len(one[cpu]) == 3
    assert all(a is b for a, b in zip(one[cpu], [ps[0].grad, ps[2].grad, ps[4].grad], strict=True))

    def declined(grad):
        p = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype))
        p.grad = grad
        return _plain_grads_by_device(torch.optim.SGD([ps[0], p], lr=0.1), True) is None

    class Sub(torch.Tensor):
        pass

    assert declined(torch.ones(3).to_sparse())
    assert declined(torch.ones(3, dtype=torch.float64))
    assert declined(torch.ones(3).as_subclass(Sub))
    assert _plain_grads_by_device(torch.optim.SGD([ps[-1]], lr=0.1), True) is None
