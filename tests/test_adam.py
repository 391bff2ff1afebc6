"""mixprec_ops.optim.Adam / AdamW against torch.optim and against the reference backend.

Tolerances: in fp32 mode our step and torch's differ only in rounding order (torch uses lerp/addcmul/addcdiv, we
use one IEEE op per step of the documented formula), so after 100 steps params agree to 1e-6 relative to their
magnitude. Across our own backends the math is the same sequence of IEEE fp32 operations without FMA, so on CPU
(C++ kernel, Triton interpreter) every tensor must match the reference bit for bit; on a GPU too (same scalars,
IEEE div/sqrt, no contraction).
"""

import copy
import io
import json
import math
import subprocess
import sys

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
    run_fresh_process,
    to_device,
)

import mixprec_ops
from mixprec_ops.amp import GradScaler
from mixprec_ops.optim import Adam, AdamW

OP = "adam_step_"


def mlp(dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.Tanh(), torch.nn.Linear(33, 9)).to(device, dtype)


def data(n, device="cpu", dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(17, 9, generator=g)
    xs, ys = [], []
    for _ in range(n):
        x = torch.randn(32, 17, generator=g)
        xs.append(x.to(dtype))
        ys.append((x @ w).tanh().to(dtype))
    return list(zip(to_device(xs, device), to_device(ys, device), strict=True))  # (one transfer: see to_device)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x.to(model[0].weight.dtype)).float(), y.float())


def rel_diff(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run_steps(model, opt, batches, sched=None, scaler=None):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if sched is not None:
            sched.step()


def two_groups(model, **hp):
    return [{"params": model[0].parameters(), **hp}, {"params": model[2].parameters(), "lr": 3e-3, "betas": (0.8, 0.99)}]


GRID = [
    dict(amsgrad=False, maximize=False, weight_decay=0.0),
    dict(amsgrad=True, maximize=False, weight_decay=0.1),
    dict(amsgrad=False, maximize=True, weight_decay=0.05),
    dict(amsgrad=True, maximize=True, weight_decay=0.0),
]


def backend_ids():
    return [pytest.param("cpu", "torch", id="cpu-torch")] + backend_params(OP)


@pytest.mark.parametrize("device,backend", backend_ids())
@pytest.mark.parametrize("cls,torch_cls", [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("opts", GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fp32_matches_torch_100_steps(device, backend, cls, torch_cls, opts):
    steps = 100 if backend != "triton" or device != "cuda" else 100
    if backend == "triton" and device == "cpu":
        steps = 30  # the interpreter is slow; 30 steps still cross lr changes and bias-correction decay
    batches = data(steps, device)
    ours_m, ref_m = mlp(device=device), mlp(device=device)
    ours = cls(two_groups(ours_m, lr=1e-2), **opts, backend=backend)
    ref = torch_cls(two_groups(ref_m, lr=1e-2), **opts)
    s1 = torch.optim.lr_scheduler.LambdaLR(ours, lambda k: 1.0 / (1 + 0.05 * k))
    s2 = torch.optim.lr_scheduler.LambdaLR(ref, lambda k: 1.0 / (1 + 0.05 * k))
    run_steps(ours_m, ours, batches, s1)
    run_steps(ref_m, ref, batches, s2)
    for (n, a), b in zip(ours_m.named_parameters(), ref_m.parameters()):
        assert rel_diff(a, b) <= 1e-6, f"{n}: {rel_diff(a, b)}"
        sa, sb = ours.state[a], ref.state[b]
        assert sa["step"].item() == sb["step"].item() == steps
        for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if opts["amsgrad"] else ()):
            assert rel_diff(sa[k], sb[k]) <= 1e-5, f"{n} {k}: {rel_diff(sa[k], sb[k])}"
        assert "master_param" not in sa  # fp32 params need no master


def clone_setup(dtype, device, seed=0, mixed=False):
    model = mlp(dtype, device, seed)
    if mixed:  # one group holding fp32, fp16 and bf16 params
        model[2].bias.data = model[2].bias.data.float()
        model[0].bias.data = model[0].bias.data.half()
    return model


def grads_for(model, device, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(device, p.dtype)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "mixed"], ids=str)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", [dict(amsgrad=True, weight_decay=0.1), dict(maximize=True, weight_decay=0.0)],
                         ids=["amsgrad-wd", "maximize"])
def test_backends_bit_identical_to_reference(device, backend, dtype, state_dtype, opts):
    """Masters on, several steps with fresh grads (fp32 grads for some params), grad_scale and the clipping pass:
    every tensor of the state equals the reference backend's bit for bit. max_grad_norm is set high so that the
    clip coefficient is exactly 1: each backend sums the norm in its own order (a different last bit), which would
    otherwise change the update (clipping with a coefficient < 1 is bit-checked in test_adam_kernels.py)."""
    mixed = dtype == "mixed"
    dt = torch.bfloat16 if mixed else dtype
    models = [clone_setup(dt, device, mixed=mixed) for _ in range(2)]
    opts_all = dict(lr=3e-3, state_dtype=state_dtype, max_grad_norm=1e6, **opts)
    opts_ = [AdamW(models[0].parameters(), backend=backend, **opts_all),
             AdamW(models[1].parameters(), backend="torch", **opts_all)]
    for step in range(4):
        for m, o in zip(models, opts_):
            grads_for(m, device, seed=step)
            if step == 2 and hasattr(torch.Tensor, "grad_dtype"):  # fp32 grads for low-precision params
                for p in m.parameters():  # (torch >= 2.10 allows them once grad_dtype is lifted)
                    g = p.grad.float()
                    p.grad = None
                    p.grad_dtype = None
                    p.grad = g
            o.grad_scale = torch.tensor([4.0], device=device)
            for p in m.parameters():
                p.grad.copy_(p.grad.float() * 4.0)
            o.step()
            del o.grad_scale
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert_bit_exact(a, b, n)
        sa, sb = opts_[0].state[a], opts_[1].state[b]
        assert set(sa) == set(sb)
        for k in sa:
            assert_bit_exact(sa[k], sb[k], f"{n} {k}")
    assert opts_[0].grad_norm.item() == pytest.approx(opts_[1].grad_norm.item(), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_masters_track_fp32_training(device):
    """A bf16 model with fp32 masters stays close to fp32 training; without masters, small updates round away.
    200 steps at lr 1e-4: an update of ~1e-4 is below half a bf16 ulp for weights above ~0.03."""
    batches = data(200, device, seed=5)
    ref_m = mlp(device=device)
    ref_o = torch.optim.AdamW(ref_m.parameters(), lr=1e-4)
    run_steps(ref_m, ref_o, batches)
    dists = {}
    for masters in (True, False):
        m = mlp(torch.bfloat16, device)
        o = AdamW(m.parameters(), lr=1e-4, master_weights=masters)
        run_steps(m, o, batches)
        dists[masters] = math.sqrt(sum(((a.double() - b.double()) ** 2).sum().item()
                                       for a, b in zip(m.parameters(), ref_m.parameters())))
    init_move = math.sqrt(sum(((a.double() - b.double()) ** 2).sum().item()
                              for a, b in zip(mlp(device=device).parameters(), ref_m.parameters())))
    assert dists[True] < 0.15 * init_move, dists  # masters: tracks the fp32 trajectory
    assert dists[False] > 3 * dists[True], dists  # no masters: measurably off


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scaler_cls", [GradScaler, torch.amp.GradScaler], ids=["ours", "torch"])
def test_amp_inf_skips_step_bit_unchanged(device, scaler_cls):
    model = mlp(torch.float16, device)
    opt = AdamW(model.parameters(), lr=1e-3, max_grad_norm=None)
    scaler = scaler_cls(device, init_scale=2.0**8, growth_interval=1000)
    batches = data(6, device, torch.float16)
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if i == 3:
            model[0].weight.grad[1, 2] = float("inf")
        before = {k: v.clone() for p in model.parameters() for k, v in [(id(p), p)]}
        state_before = {(id(p), k): v.clone() for p in model.parameters() for k, v in opt.state[p].items()}
        scaler.step(opt)
        scaler.update()
        changed = any(not torch.equal(before[id(p)], p) for p in model.parameters())
        if i == 3:
            assert not changed
            for p in model.parameters():
                for k, v in opt.state[p].items():
                    assert torch.equal(v, state_before[(id(p), k)]), f"{k} changed on a skipped step"
            assert scaler.get_scale() == 2.0**7
        else:
            assert changed
    assert all(opt.state[p]["step"].item() == 5 for p in model.parameters())


def test_params_without_grad_are_skipped():
    model = mlp()
    opt = Adam(model.parameters(), lr=1e-2)
    x, y = data(1)[0]
    loss_fn(model, x, y).backward()
    model[2].bias.grad = None
    frozen = model[2].bias.detach().clone()
    opt.step()
    assert torch.equal(model[2].bias, frozen) and model[2].bias not in opt.state
    assert opt.state[model[0].weight]["step"].item() == 1


def test_clipping_matches_clip_grad_norm_then_step():
    batches = data(20)
    a, b = mlp(), mlp()
    oa = AdamW(a.parameters(), lr=1e-2, max_grad_norm=0.05)
    ob = AdamW(b.parameters(), lr=1e-2)
    for x, y in batches:
        oa.zero_grad()
        ob.zero_grad()
        loss_fn(a, x, y).backward()
        loss_fn(b, x, y).backward()
        total = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
        oa.step()
        ob.step()
        assert oa.grad_norm.item() == pytest.approx(total.item(), rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert rel_diff(p, q) <= 1e-5


def test_clipping_skips_non_finite_step():
    model = mlp()
    opt = AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    x, y = data(1)[0]
    loss_fn(model, x, y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(opt.state[p]["step"].item() == 0 for p in model.parameters())
    assert math.isnan(opt.grad_norm.item())


@pytest.mark.parametrize("sched", ["onecycle", "cosine"])
def test_schedulers_match_torch(sched):
    batches = data(40)
    a, b = mlp(), mlp()
    oa, ob = AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)

    def make(o):
        if sched == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=2e-2, total_steps=40, cycle_momentum=True)
        return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40)

    run_steps(a, oa, batches, make(oa))
    run_steps(b, ob, batches, make(ob))
    assert oa.param_groups[0]["betas"] == ob.param_groups[0]["betas"]
    for p, q in zip(a.parameters(), b.parameters()):
        assert rel_diff(p, q) <= 1e-6


def test_hooks_zero_grad_and_add_param_group():
    model = mlp()
    opt = Adam(model[0].parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.add_param_group({"params": model[2].parameters(), "lr": 1e-3})
    assert opt.param_groups[1]["master_weights"] == "auto" and opt.param_groups[1]["betas"] == (0.9, 0.999)
    x, y = data(1)[0]
    loss_fn(model, x, y).backward()
    opt.step()
    assert calls == ["pre", "post"]
    assert len(opt.state) == 4
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resume_is_bit_identical(state_dtype):
    batches = data(20)
    full_m = mlp(torch.bfloat16)
    full_o = AdamW(full_m.parameters(), lr=3e-3, amsgrad=True, state_dtype=state_dtype)
    run_steps(full_m, full_o, batches)

    m = mlp(torch.bfloat16)
    o = AdamW(m.parameters(), lr=3e-3, amsgrad=True, state_dtype=state_dtype)
    run_steps(m, o, batches[:8])
    ckpt = save_load({"model": m.state_dict(), "opt": o.state_dict()})
    m2 = mlp(torch.bfloat16, seed=9)
    m2.load_state_dict(ckpt["model"])
    o2 = AdamW(m2.parameters(), lr=3e-3, amsgrad=True, state_dtype=state_dtype)
    o2.load_state_dict(ckpt["opt"])
    st = o2.state[m2[0].weight]
    assert st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == state_dtype
    run_steps(m2, o2, batches[8:])
    for p, q in zip(m2.parameters(), full_m.parameters()):
        assert torch.equal(p, q)
        for k in o2.state[p]:
            assert torch.equal(o2.state[p][k], full_o.state[q][k]), k


def test_torch_state_dict_loads_into_ours_and_back():
    batches = data(10)
    # torch -> ours (bf16 model: torch keeps bf16 moments; ours upcasts them and takes masters from the params)
    tm = mlp(torch.bfloat16)
    to = torch.optim.AdamW(tm.parameters(), lr=1e-3)
    run_steps(tm, to, batches[:5])
    om = mlp(torch.bfloat16)
    om.load_state_dict(tm.state_dict())
    oo = AdamW(om.parameters(), lr=1e-3)
    oo.load_state_dict(save_load(to.state_dict()))
    st = oo.state[om[0].weight]
    assert st["exp_avg"].dtype == torch.float32 and "master_param" not in st
    assert torch.equal(st["exp_avg"], to.state[tm[0].weight]["exp_avg"].float())
    run_steps(om, oo, batches[5:])
    assert torch.equal(oo.state[om[0].weight]["step"], torch.tensor(10.0))
    assert oo.state[om[0].weight]["master_param"].dtype == torch.float32
    # ours -> torch (fp32 model): continues like ours would
    a, b = mlp(), mlp()
    oa = AdamW(a.parameters(), lr=1e-3)
    run_steps(a, oa, batches[:5])
    b.load_state_dict(a.state_dict())
    ob = torch.optim.AdamW(b.parameters(), lr=1e-3)
    ob.load_state_dict(save_load(oa.state_dict()))
    run_steps(a, oa, batches[5:])
    run_steps(b, ob, batches[5:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert rel_diff(p, q) <= 1e-6


def test_fp32_state_never_downcast_on_load():
    m = mlp(torch.bfloat16)
    o = AdamW(m.parameters(), lr=1e-3)
    run_steps(m, o, data(3))
    sd = o.state_dict()
    o2 = AdamW(m.parameters(), lr=1e-3)
    o2.load_state_dict(sd)
    for p in m.parameters():
        for k in ("exp_avg", "exp_avg_sq", "master_param", "step"):
            assert o2.state[p][k].dtype == torch.float32
            assert torch.equal(o2.state[p][k], o.state[p][k])
            assert o2.state[p][k].data_ptr() != o.state[p][k].data_ptr()  # a copy, not an alias


BAD_CTOR = [
    (dict(lr=-1.0), ValueError, "Invalid learning rate"),
    (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1"),
    (dict(eps=-1e-8), ValueError, "Invalid epsilon"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay"),
    (dict(master_weights="yes"), ValueError, "master_weights must be"),
    (dict(state_dtype=torch.float16), ValueError, "state_dtype must be"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be"),
    (dict(differentiable=True), ValueError, "differentiable=True is not supported"),
    (dict(differentiable=True, fused=True), RuntimeError, "`fused` does not support `differentiable`"),  # torch's
    # eps and weight_decay as tensors (which torch takes): refused here, not at the first step
    (dict(eps=torch.tensor(1e-8)), TypeError, "param group 0: eps must be a float"),
    (dict(weight_decay=torch.tensor(0.1)), TypeError, "param group 0: weight_decay must be a float"),
    (dict(max_grad_norm=1.0, norm_across_ranks="world"), TypeError, "norm_across_ranks must be False, True or"),
    (dict(norm_across_ranks=True), ValueError, "set max_grad_norm too"),
    # (the tests run without an initialised process group; the distributed tests use it under ZeRO)
    (dict(max_grad_norm=1.0, norm_across_ranks=True), RuntimeError, "needs torch.distributed initialized"),
    # torch.optim.Adam's own checks, which ours skipped: a negative tensor lr, betas of mixed types or not a pair
    (dict(lr=torch.tensor(-1.0)), ValueError, "Invalid learning rate"),
    (dict(betas=(0, 0.99)), ValueError, "betas must be either both floats or both Tensors"),
    (dict(betas=(0.9, 0.99, 0.5)), ValueError, "betas must be a pair"),
    (dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
    # ours: a backend name is checked at construction, not at the first step (after a forward and backward)
    (dict(backend="gpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("kw,exc,text", BAD_CTOR, ids=[c[2] for c in BAD_CTOR])
def test_bad_constructor_arguments(kw, exc, text):
    with pytest.raises(exc, match=text):
        AdamW(mlp().parameters(), **kw)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_unsupported_param_dtypes(dtype):
    p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    with pytest.raises(TypeError, match="supports float32, float16, bfloat16 and float64 params"):
        Adam([p])


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.float64], ids=str)
def test_frozen_params_of_other_dtypes_are_skipped_like_torch(dtype):
    """model.parameters() may hold frozen params of any dtype (a float64 table, an integer buffer made a
    Parameter): torch accepts and skips them, and so do we; one that later gets a grad is refused at the step,
    naming it, before anything changes (float64 excepted: stepped then, as by torch; test_adam_float64.py)."""
    model = mlp(torch.bfloat16)
    frozen = torch.nn.Parameter(torch.zeros(3, dtype=dtype), requires_grad=False)
    opt = AdamW([*model.parameters(), frozen], lr=1e-2)
    run_steps(model, opt, data(2, dtype=torch.bfloat16))
    assert frozen not in opt.state and torch.equal(frozen, torch.zeros(3, dtype=dtype))
    if dtype is torch.int64:
        return  # (an integer tensor cannot have a grad)

    def spoil():
        frozen.requires_grad_(True)
        frozen.grad = torch.ones_like(frozen)

    if dtype is torch.float64:
        spoil()
        opt.step()
        assert opt.state[frozen]["exp_avg"].dtype == torch.float64 and not torch.equal(frozen, torch.zeros(3))
        return
    _refused_step_changes_nothing(model, opt, spoil, TypeError, rf"param 4 of param group 0 is {dtype}: "
                                  "mixprec_ops.optim supports float32")


def _set_bad_grad(kind, p):
    """torch's .grad setter refuses wrong dtypes/devices/shapes; what can still reach an optimizer: sparse grads,
    and other float dtypes once the param's grad_dtype check is lifted (torch >= 2.10: p.grad_dtype = None)."""
    if kind == "sparse":
        p.grad = torch.zeros_like(p).to_sparse()
    elif kind == "float64":
        if not hasattr(p, "grad_dtype"):
            pytest.skip("this torch has no Tensor.grad_dtype")
        p.grad_dtype = None
        p.grad = torch.zeros(p.shape, dtype=torch.float64)


def _refused_step_changes_nothing(model, opt, spoil, exc, text):
    """Two good steps, grads for a third, then spoil() (a bad grad, a bad hyperparameter): the step must raise
    (exc matching text) and leave every param and every state tensor (step counts included) bit-unchanged."""
    run_steps(model, opt, data(2, dtype=torch.bfloat16))
    x, y = data(1, dtype=torch.bfloat16, seed=3)[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    spoil()
    with pytest.raises(exc, match=text):
        opt.step()
    for a, b in zip(params_before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(v, state_before[(i, k)]), k


@pytest.mark.parametrize("kind,exc,text", [("sparse", RuntimeError, "does not support sparse"),
                                           ("float64", TypeError, "grad dtype must be")])
def test_bad_grads_leave_everything_unchanged(kind, exc, text):
    model = mlp(torch.bfloat16)
    opt = AdamW(model.parameters(), lr=1e-2)
    # the last param: the others were validated first and must stay put
    _refused_step_changes_nothing(model, opt, lambda: _set_bad_grad(kind, model[2].weight), exc, text)


@pytest.mark.parametrize("key,value,text", [
    ("eps", None, "param group 1: eps must be a float"),
    ("lr", "0.001", "param group 1: lr must be a float or a 1-element float tensor"),  # a YAML config's string
    ("lr", torch.tensor([1e-3, 1e-3]), "param group 1: lr must be a float or a 1-element"),
    ("weight_decay", True, "param group 1: weight_decay must be a float"),
    ("betas", (0.9,), "param group 1: betas must be a pair"),
])
def test_bad_hyperparameters_set_later_leave_everything_unchanged(key, value, text):
    """A hyperparameter set on a group after construction (a scheduler, a config loader) with an unusable type:
    the step refuses it naming the group and the key, before any group is updated (group 0, valid, is untouched:
    params, states, step counts)."""
    model = mlp(torch.bfloat16)
    opt = AdamW([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}], lr=1e-2)
    _refused_step_changes_nothing(model, opt, lambda: opt.param_groups[1].__setitem__(key, value), TypeError, text)


def test_bad_tensor_lr():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        AdamW(mlp().parameters(), lr=torch.tensor([1e-3, 1e-3]))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_cuda_graph_capture_and_replay(backend):
    """capturable=True: the whole step, with GradScaler-style grad_scale / found_inf device tensors and fused
    clipping, is captured and replayed; replays match the same steps run eagerly on a twin model bit for bit, and a
    replay with found_inf set changes nothing (params, masters, moments, step counters). The reference backend
    ("torch") must be capturable too (no host-to-device copies of Python scalars)."""
    dev = "cuda"
    models = [mlp(torch.bfloat16, dev) for _ in range(2)]
    opts = [AdamW(m.parameters(), lr=torch.tensor(1e-3, device=dev), capturable=True, backend=backend,
                  max_grad_norm=1.0) for m in models]
    grads = [torch.randn_like(p) * 1024 for p in models[0].parameters()]  # "scaled" by grad_scale = 1024
    for m in models:  # the same static grads for both (the graph reads these tensors on every replay)
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
    for o in opts:
        o.grad_scale = torch.full((), 1024.0, device=dev)
        o.found_inf = torch.zeros(1, device=dev)
    for o in opts:  # warm-up (state init, compilation, table caches)
        o.step()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opts[0].step()  # one more warm step on the side stream before capture
        opts[1].step()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        opts[0].step()

    def snapshot(m, o):
        return [t.clone() for p in m.parameters() for t in (p, *o.state[p].values())]

    for i in range(4):
        skip = i == 2
        for o in opts:
            o.found_inf.fill_(1.0 if skip else 0.0)
        before = snapshot(models[0], opts[0])
        graph.replay()
        opts[1].step()
        torch.cuda.synchronize()
        if skip:
            assert all(torch.equal(x, y) for x, y in zip(before, snapshot(models[0], opts[0]))), "skipped replay"
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
        for k, v in opts[0].state[p].items():
            assert torch.equal(v, opts[1].state[q][k]), k
        assert opts[0].state[p]["step"].item() == opts[1].state[q]["step"].item() == 5  # 2 warm + 3 of 4 replays


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("lr_device", ["cuda", "cpu"])
def test_step_adds_no_host_sync(backend, lr_device):
    """A steady-state step (tensor lr, grad_scale / found_inf on the device, fused clipping, bf16 params with
    masters next to an fp32 one) never synchronizes with the host: torch's sync debug mode turns any sync into an
    error. A CPU lr tensor (torch's recipe for compiled optimizers: lr=torch.tensor(0.01)) is read on the host, as
    torch's fused Adam does, not copied to the device (a blocking copy: one stream sync per bucket per step)."""
    model = mlp(torch.bfloat16, "cuda")
    model[0].float()
    opt = AdamW(model.parameters(), lr=torch.tensor(1e-3, device=lr_device), backend=backend, max_grad_norm=1.0)
    opt.grad_scale = torch.full((), 8.0, device="cuda")
    opt.found_inf = torch.zeros(1, device="cuda")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # warm-up: state creation, compilation, tables
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_pickle_and_state_replacement_keep_working():
    """The optimizer survives copy.deepcopy/pickle (our extra attributes included), and a state replaced by
    load_state_dict is picked up by the next step (the per-param step plans are rebuilt)."""
    import copy

    m = mlp(torch.bfloat16)
    o = AdamW(m.parameters(), lr=1e-3, max_grad_norm=2.0, backend="torch")
    run_steps(m, o, data(2))
    o2 = copy.deepcopy(o)
    assert o2.max_grad_norm == 2.0 and o2.backend == "torch"
    sd = copy.deepcopy(o.state_dict())  # state_dict() holds references to the live state tensors
    run_steps(m, o, data(1, seed=4))
    o.load_state_dict(sd)  # back to step 2: new state dicts, new tensors
    assert all(o.state[p]["step"].item() == 2 for p in m.parameters())
    run_steps(m, o, data(1, seed=4))
    assert all(o.state[p]["step"].item() == 3 for p in m.parameters())


def test_plans_follow_group_option_and_state_changes():
    """Per-param step plans are cached between steps; changing a group's options (amsgrad on), replacing a state
    entry's dict, or a 1-element (not 0-dim) step tensor put in by hand must all be picked up by the next step."""
    m = mlp(torch.bfloat16)
    o = AdamW(m.parameters(), lr=1e-3, backend="torch")
    run_steps(m, o, data(2))
    p0 = next(m.parameters())
    assert "max_exp_avg_sq" not in o.state[p0]
    o.param_groups[0]["amsgrad"] = True
    run_steps(m, o, data(1, seed=4))
    assert all("max_exp_avg_sq" in o.state[p] and o.state[p]["max_exp_avg_sq"].abs().sum() > 0 for p in m.parameters())
    o.state[p0] = {k: (v.clone().reshape(1) if k == "step" else v.clone()) for k, v in o.state[p0].items()}
    before = o.state[p0]["master_param"].clone()
    run_steps(m, o, data(1, seed=5))
    assert o.state[p0]["step"].shape == () and o.state[p0]["step"].item() == 4
    assert not torch.equal(o.state[p0]["master_param"], before)
    assert all(o.state[p]["step"].item() == 4 for p in m.parameters())


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "torch", id="cpu-torch")] + backend_params(OP))
def test_state_tensors_replaced_by_hand_are_used(device, backend):
    """A state tensor replaced in its dict (st["exp_avg"] = t: same dict, same keys, so neither the dict nor its
    size changes) must be the one the next step reads and writes: moments against torch.optim.AdamW treated the
    same way (1e-6), and a master replaced by hand must drive the bf16 param."""
    ours_m, ref_m = mlp(device=device), mlp(device=device)
    ours, ref = AdamW(ours_m.parameters(), lr=1e-2, backend=backend), torch.optim.AdamW(ref_m.parameters(), lr=1e-2)
    batches = data(6, device)
    run_steps(ours_m, ours, batches[:3])
    run_steps(ref_m, ref, batches[:3])
    for o, mod in ((ours, ours_m), (ref, ref_m)):
        st = o.state[mod[0].weight]
        st["exp_avg"] = torch.full_like(st["exp_avg"], 1e-3)
        st["exp_avg_sq"] = st["exp_avg_sq"] * 4.0
    run_steps(ours_m, ours, batches[3:])
    run_steps(ref_m, ref, batches[3:])
    for p, q in zip(ours_m.parameters(), ref_m.parameters()):
        assert rel_diff(p.detach(), q.detach()) <= 1e-6
        for k in ("exp_avg", "exp_avg_sq"):
            assert rel_diff(ours.state[p][k], ref.state[q][k]) <= 1e-6, k

    m = mlp(torch.bfloat16, device=device)
    o = AdamW(m.parameters(), lr=1e-3, backend=backend)
    run_steps(m, o, data(2, device))
    w = m[0].weight
    new_master = torch.full_like(o.state[w]["master_param"], 0.5)
    o.state[w]["master_param"] = new_master
    run_steps(m, o, data(1, device, seed=7))
    assert o.state[w]["master_param"] is new_master
    assert not torch.equal(new_master, torch.full_like(new_master, 0.5)), "the step did not update the new master"
    assert (new_master - 0.5).abs().max() < 2e-3 and (w.float() - new_master).abs().max() < 4e-3  # one step away


def test_param_data_replaced_with_another_dtype_is_replanned():
    """p.data = p.data.bfloat16() after a step (same Parameter object, same state dict) must be noticed: the bf16
    param gets its fp32 master at the next step, as a fresh optimizer would give it."""
    m = mlp()
    o = AdamW(m.parameters(), lr=1e-3, backend="torch")
    run_steps(m, o, data(1))
    w = m[0].weight
    assert "master_param" not in o.state[w]
    m.to(torch.bfloat16)  # nn.Module.to assigns p.data for each param
    run_steps(m, o, data(1, seed=3))
    assert w.dtype == torch.bfloat16 and o.state[w]["master_param"].dtype == torch.float32


_DTENSOR_SWAP = r"""
import json, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard
import mixprec_ops.optim.adam as A
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
replans = [0]
init_state = A.Adam._init_state
def counted(self, group, p):
    replans[0] += 1
    return init_state(self, group, p)
A.Adam._init_state = counted
def param():
    return torch.nn.Parameter(distribute_tensor(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), mesh,
                                                [Shard(0)]))
ours_w, ref_w = param(), param()
ours, ref = A.AdamW([ours_w], lr=1e-2, backend=sys.argv[1]), torch.optim.AdamW([ref_w], lr=1e-2)
for s in range(6):
    for w in (ours_w, ref_w):
        w.grad = distribute_tensor(torch.randn(8, 5, generator=torch.Generator().manual_seed(s)), mesh, [Shard(0)])
        if s == 3:  # what FSDP2's reset_sharded_param does: a new local tensor behind the same DTensor
            w._local_tensor = w._local_tensor.clone()
    ours.step()
    ref.step()
diff = (ours_w.full_tensor() - ref_w.full_tensor()).abs().max().item()
dist.destroy_process_group()
print("RESULT " + json.dumps({"diff": diff, "replans": replans[0]}))
"""


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch without torch.distributed / gloo")
def test_dtensor_local_tensor_swapped_is_followed(tmp_path):
    """A DTensor param (FSDP2) whose local tensor is replaced behind it (FSDP2's reset_sharded_param) must be
    replanned, so that the step updates the new local tensor: against torch.optim.AdamW on the same DTensors.
    And a Parameter(DTensor), whose to_local() returns a new view each call in torch 2.14, must NOT be replanned
    every step (one plan at the first step, one after the swap). One rank (gloo, in a subprocess: no process group
    is left in the test process)."""
    backend = "cpu" if mixprec_ops.backends.unavailable_reason(OP, "cpu", torch.device("cpu")) is None else "torch"
    r = subprocess.run([sys.executable, "-P", "-c", _DTENSOR_SWAP, backend], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert res["diff"] <= 1e-6, res  # fp32: rounding order only (see test_fp32_matches_torch_100_steps)
    assert res["replans"] == 2, res


def test_error_while_planning_a_later_group_changes_nothing():
    """State is created for every group before any group is updated: a failure there (here a state_dtype edited
    into the second group) leaves the first group's params and states as they were."""
    m = mlp(torch.bfloat16)
    o = AdamW([{"params": m[0].parameters()}, {"params": m[2].parameters()}], lr=1e-3, backend="torch")
    run_steps(m, o, data(1))
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    o.param_groups[1]["state_dtype"] = "float16"
    o.state[m[2].weight] = {}  # so that group 1 must create state at the next step
    before = {id(p): (p.clone(), {k: v.clone() for k, v in o.state[p].items()}) for p in m[0].parameters()}
    with pytest.raises(ValueError, match="state_dtype"):
        o.step()
    for p in m[0].parameters():
        assert_bit_exact(p, before[id(p)][0])
        for k, v in before[id(p)][1].items():
            assert_bit_exact(o.state[p][k], v)


def test_step_counters_live_in_one_buffer_per_bucket():
    """The step counters of a bucket are 0-dim views of one buffer (one add_ per bucket instead of a _foreach_add_
    over every param). Params that lack a grad on some steps (the bucket changes from step to step), a step
    counter replaced by hand, and a save/load cycle must all count exactly as torch.optim.AdamW does; the fp32
    params must agree with torch's to 1e-6 (rounding order only, as in the 100-step grid test)."""
    ours, ref = mlp(), mlp()
    o = AdamW(ours.parameters(), lr=1e-2)
    t = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(3)
    n = len(list(ours.parameters()))
    # Which params get a grad at each step: all; all but the last; all but the one before (as many params as the
    # step before, not the same ones); the first half; the second half; all.
    half = [True] * (n // 2) + [False] * (n - n // 2)
    masks = [[True] * n, [True] * (n - 1) + [False], [True] * (n - 2) + [False, True], half, half[::-1], [True] * n]
    for s, mask in enumerate(masks):
        for pa, pb, has in zip(ours.parameters(), ref.parameters(), mask):
            grad = torch.randn(pa.shape, generator=g) if has else None
            pa.grad, pb.grad = grad, None if grad is None else grad.clone()
        o.step()
        t.step()
        if s == 0:  # one bucket (all fp32): all counters share one storage, in param order
            steps = [o.state[p]["step"] for p in ours.parameters()]
            assert len({x.untyped_storage().data_ptr() for x in steps}) == 1
            assert [x.storage_offset() for x in steps] == list(range(n))
        if s == 3:  # a counter put in by hand (same dict, same keys) is what the next step counts from
            p0, q0 = next(ours.parameters()), next(ref.parameters())
            o.state[p0]["step"] = torch.tensor(10.0)
            t.state[q0]["step"] = torch.tensor(10.0)
    for pa, pb in zip(ours.parameters(), ref.parameters()):
        assert o.state[pa]["step"].item() == t.state[pb]["step"].item()
        assert rel_diff(pa.detach(), pb.detach()) <= 1e-6
    assert [o.state[p]["step"].item() for p in ours.parameters()] == [11.0, 5.0, 4.0, 4.0]
    # A saved state (views and all) loads into a fresh optimizer and continues as the original does.
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    buf.seek(0)
    twin = mlp()
    twin.load_state_dict(ours.state_dict())
    o2 = AdamW(twin.parameters(), lr=1e-2)
    o2.load_state_dict(torch.load(buf, weights_only=True))
    for pa, pb in zip(ours.parameters(), twin.parameters()):
        pa.grad = torch.randn(pa.shape, generator=g)
        pb.grad = pa.grad.clone()
    o.step()
    o2.step()
    for pa, pb in zip(ours.parameters(), twin.parameters()):
        assert_bit_exact(pb, pa)
        assert o.state[pa]["step"].item() == o2.state[pb]["step"].item()


def test_state_is_never_created_during_cuda_graph_capture(monkeypatch):
    """State created inside a capture would be re-created (zeroed, the master re-copied from the 16-bit param) on every
    replay: a step that would create state while capturing raises, leaving everything as it was; after a step
    outside the capture the same step goes through. Capture is simulated on the CPU (Adam._capturing forced True):
    the first step, and masters after loading torch.optim.AdamW's state (which has none)."""
    m = mlp(torch.bfloat16)
    o = AdamW(m.parameters(), lr=1e-3)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    before = [p.clone() for p in m.parameters()]
    with monkeypatch.context() as mp:
        mp.setattr(Adam, "_capturing", staticmethod(lambda device: True))
        with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
            o.step()
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before)) and not any(o.state.values())
    o.step()
    torch_opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    torch_opt.step()
    o.load_state_dict(torch_opt.state_dict())  # moments and steps, no masters
    with monkeypatch.context() as mp:
        mp.setattr(Adam, "_capturing", staticmethod(lambda device: True))
        with pytest.raises(RuntimeError, match=r"\['master_param'\]"):
            o.step()
    o.step()
    with monkeypatch.context() as mp:
        mp.setattr(Adam, "_capturing", staticmethod(lambda device: True))
        o.step()  # everything exists now: capturable


def test_step_buffer_is_not_rebuilt_during_cuda_graph_capture(monkeypatch):
    """Inside a CUDA graph capture the step buffer is never rebuilt (the copy into a new buffer would be recorded and
    every replay would copy the old counters in again): a bucket whose buffer is stale (here after load_state_dict)
    counts its params' own step tensors in place. Capture is simulated on the CPU: Adam._capturing forced True. The
    params must match a twin optimizer's that is not "capturing", bit for bit."""
    models = [mlp(torch.bfloat16) for _ in range(2)]
    opts = [AdamW(m.parameters(), lr=1e-3) for m in models]
    for m, o in zip(models, opts):
        run_steps(m, o, data(2))
        o.load_state_dict(o.state_dict())  # fresh state tensors: the next step finds the buffer stale
    before = {p: opts[0].state[p]["step"] for p in models[0].parameters()}
    with monkeypatch.context() as mp:
        mp.setattr(Adam, "_capturing", staticmethod(lambda device: True))
        run_steps(models[0], opts[0], data(1, seed=4))
    run_steps(models[1], opts[1], data(1, seed=4))
    assert all(opts[0].state[p]["step"] is before[p] and before[p].item() == 3 for p in models[0].parameters())
    run_steps(models[0], opts[0], data(1, seed=5))  # not capturing: the buffer is rebuilt now
    run_steps(models[1], opts[1], data(1, seed=5))
    steps = [opts[0].state[p]["step"] for p in models[0].parameters()]
    assert all(x.item() == 4 for x in steps) and len({x.untyped_storage().data_ptr() for x in steps}) == 1
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert_bit_exact(p, q)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)"))])
def test_params_the_kernels_cannot_walk(device, monkeypatch):
    """The kernels walk a param, its grad and its states element by element in one order, which needs the same
    strides. A non-dense param (every other column of a bigger tensor: its states are created contiguous) is
    stepped per tensor by the reference instead, next to dense params that still take the fused kernel; a
    transposed param whose grad arrives contiguous takes the kernel with its grad copied into its layout (it went
    to the reference too, at ~72 bytes of temporaries per element); all agree with torch.optim.AdamW (fp32, 1e-6)
    over a few steps."""
    import mixprec_ops.optim.adam as adam_mod

    torch.manual_seed(3)
    base = torch.randn(6, 10, device=device)
    ours = [torch.nn.Parameter(torch.randn(5, 3, device=device)),  # dense
            torch.nn.Parameter(base[:, ::2]),  # not dense
            torch.nn.Parameter(torch.randn(4, 7, device=device).t()),  # dense, but its grads come contiguous
            torch.nn.Parameter(torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last))]
    assert not ours[1].is_contiguous() and not ours[2].is_contiguous() and not ours[3].is_contiguous()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o = AdamW(ours, lr=1e-2, weight_decay=0.1)
    t = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    served = []
    real = adam_mod.adam_step_
    monkeypatch.setattr(adam_mod, "adam_step_", lambda *a, backend=None, **k: (
        served.append((len(a[0]), backend)), real(*a, backend=backend, **k))[1])
    for _ in range(4):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, device=device)
            p.grad, q.grad = g.clone(), g.clone()  # contiguous grads, whatever the param's strides
        o.step()
        t.step()
    for p, q in zip(ours, theirs):
        assert rel_diff(p.detach(), q.detach()) <= 1e-6
    # the dense, transposed and channels_last params in the bucket's kernel (the backend auto picks, resolved by the
    # optimizer), the non-dense one per tensor
    assert served[0][0] == 3 and served[0][1] != "torch" and served[1] == (1, "torch"), served[:3]
    assert served[2][0] == 3, served[:3]  # (the next step's bucket)


_COMPILE_FIRST_STEP = r"""
import json, sys, warnings
import torch
import mixprec_ops
from mixprec_ops.optim import AdamW

dev, bk = sys.argv[1], sys.argv[2]


def make():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(37, 5, dtype=torch.bfloat16, device=dev)) for _ in range(3)]
    return ps, AdamW(ps, lr=1e-2, weight_decay=0.1, master_weights=True, backend=bk)


def train_step(ps, opt):
    inv = torch.full((), 0.5, device=dev)
    found_inf = torch.zeros(1, device=dev)
    mixprec_ops.unscale_([p.grad for p in ps], inv, found_inf, backend=bk)
    opt.step()


eager_ps, eager_opt = make()
comp_ps, comp_opt = make()
compiled = torch.compile(train_step, backend="aot_eager")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        grads = [torch.randn_like(p) for p in eager_ps]
        for p, q, g in zip(eager_ps, comp_ps, grads):
            p.grad, q.grad = g.clone(), g.clone()
        train_step(eager_ps, eager_opt)
        compiled(comp_ps, comp_opt)  # the first call: the first unscale_ and adam_step_ of this process, traced
dynamo = [str(w.message)[:200] for w in caught if "Dynamo" in str(w.message)]
equal = all(torch.equal(p, q) for p, q in zip(eager_ps, comp_ps)) and all(
    torch.equal(eager_opt.state[p][k], comp_opt.state[q][k])
    for p, q in zip(eager_ps, comp_ps) for k in ("step", "exp_avg", "exp_avg_sq", "master_param"))
print("RESULT " + json.dumps({"equal": equal, "dynamo_warnings": dynamo}))
"""


@pytest.mark.parametrize("device,backend", backend_ids())
def test_compiled_step_first_call(device, backend, tmp_path):
    """torch.compile of a training step (unscale_ then optimizer.step()) whose calls are the first of the process:
    the backend choice is called by Dynamo, not traced (backends.selector), so that a Triton op's registration on
    first use happens outside the trace, and Dynamo has nothing to warn about (it warned of tracing through the
    lru_cache of the extension's availability, and of Triton's getenv). Params, masters and moments bit-equal to
    the eager step's after three steps (same kernels, same order). A fresh process: other tests register the ops
    earlier in this one."""
    res = run_fresh_process(_COMPILE_FIRST_STEP, device, backend, cwd=tmp_path)
    assert res["equal"], res
    assert res["dynamo_warnings"] == [], res


class _ResyncSpy:
    """Counts the params whose masters Adam._resync was asked to bring in line with their params."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = Adam._resync

        def spy(opt, pairs):
            self.count += len(pairs)
            return real(opt, pairs)

        monkeypatch.setattr(Adam, "_resync", spy)


def _write_clamp(m):
    with torch.no_grad():
        for p in m.parameters():
            p.clamp_(-0.01, 0.01)


def _write_load(m):
    m.load_state_dict({k: torch.full_like(v, 0.5) for k, v in m.state_dict().items()})


def _write_data(m):
    for p in m.parameters():
        p.data = torch.full_like(p, 0.5)


def _write_init(m):
    for p in m.parameters():
        torch.nn.init.zeros_(p)


@pytest.mark.parametrize("device,backend", backend_ids())
@pytest.mark.parametrize("write", [_write_clamp, _write_load, _write_data, _write_init],
                         ids=["clamp_", "load_state_dict", "data=", "init.zeros_"])
def test_writes_to_16bit_params_outside_the_optimizer_are_kept(device, backend, write, monkeypatch):
    """A master-weight step rebuilds each bf16 param from its fp32 master: a write to the param between steps
    (weight clipping, a model's load_state_dict, p.data = t, re-init) was silently undone by the next step. Now the
    masters follow such writes (the param's version counter and data pointer, per element): after one more step
    with zero grads the params are what torch.optim.AdamW (no masters) leaves, within a bf16 rounding. Steady
    steps resync nothing (the version count each backend's step adds is right)."""
    spy = _ResyncSpy(monkeypatch)
    results = []
    for cls, kw in ((torch.optim.AdamW, {}), (AdamW, dict(backend=backend))):
        torch.manual_seed(0)
        m = torch.nn.Linear(16, 16).to(device, torch.bfloat16)
        o = cls(m.parameters(), lr=1e-3, **kw)
        for _ in range(3):
            for p in m.parameters():
                p.grad = torch.randn_like(p) * 0.01
            o.step()
        if cls is AdamW:
            assert spy.count == 0, "steady steps resynced masters"
        write(m)
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        o.step()
        results.append([p.detach().float().cpu() for p in m.parameters()])
    for theirs, ours in zip(*results):
        # a few bf16 ulps apart (torch rounds every update to bf16, ours keeps fp32 masters); undone writes were
        # off by the write (0.25 vs 0.01 after clamp_)
        assert (ours - theirs).abs().max() <= 2**-6 * theirs.abs().max() + 1e-6, (ours, theirs)
    assert spy.count == 2  # weight and bias, once


def test_resync_is_per_element_and_keeps_untouched_master_bits():
    """Only elements whose param no longer holds the master's rounding take the param's value; the rest keep their
    fp32 bits (a swap to other weights and back changes nothing). lr=0: the step itself moves nothing."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(8, 8).bfloat16())
    o = AdamW([p], lr=0.0, weight_decay=0.0)
    p.grad = torch.randn_like(p)
    o.step()
    master = o.state[p]["master_param"]
    master.copy_(p.detach().float() * (1 + 2**-12))  # low bits the bf16 param cannot show (half an ulp: 2**-9)
    assert torch.equal(master.to(p.dtype), p.detach())
    before = master.clone()
    with torch.no_grad():
        p[2, 3] = 7.0
        saved = p.detach().clone()
        p.copy_(torch.zeros_like(p))
        p.copy_(saved)  # swapped away and back: version moved, values are the masters' roundings again
    o.step()
    expect = before.clone()
    expect[2, 3] = 7.0
    assert torch.equal(master, expect)


def test_load_state_dict_hooks_see_and_change_the_state():
    """torch's load_state_dict contract: pre-hooks get the state_dict with its state (and may return a new one,
    e.g. reordering param groups), post-hooks see the loaded state and may change it (ours used to call torch's
    loader with an empty state and fill it in after the hooks)."""
    a, b = mlp(torch.bfloat16), mlp(torch.bfloat16)
    oa = AdamW(a.parameters(), lr=1e-3)
    run_steps(a, oa, data(2))
    ob = AdamW(b.parameters(), lr=1e-3)
    seen = {}

    def pre(opt, sd):
        seen["pre"] = len(sd["state"])
        sd = dict(sd)
        sd["param_groups"] = [dict(g, lr=5e-4) for g in sd["param_groups"]]
        return sd

    def post(opt):
        seen["post"] = len(opt.state)
        opt.state[next(iter(b.parameters()))]["exp_avg"].fill_(1.0)

    ob.register_load_state_dict_pre_hook(pre)
    ob.register_load_state_dict_post_hook(post)
    ob.load_state_dict(oa.state_dict())
    n = len(list(b.parameters()))
    assert seen == {"pre": n, "post": n}
    assert ob.param_groups[0]["lr"] == 5e-4
    assert (ob.state[next(iter(b.parameters()))]["exp_avg"] == 1.0).all()


def test_older_and_other_state_dicts_load():
    """As torch's Adam/AdamW: group keys missing from an older state_dict get torch's defaults, an int step becomes
    a tensor, an Adam state_dict loaded into AdamW decays decoupled; a bf16 run's state loaded for fp32 params
    drops the masters (an fp32 param is its own; they made every step raise). A torch state_dict leaves each
    group's master_weights and state_dtype as they were."""
    m = mlp()
    o = Adam(m.parameters(), lr=1e-3)
    run_steps(m, o, data(2))
    sd = o.state_dict()
    for g in sd["param_groups"]:
        for k in ("amsgrad", "decoupled_weight_decay", "master_weights", "state_dtype"):
            g.pop(k)
    for st in sd["state"].values():
        st["step"] = int(st["step"])
    o2 = AdamW(m.parameters(), lr=1e-3)
    o2.load_state_dict(sd)
    g = o2.param_groups[0]
    assert g["amsgrad"] is False and g["decoupled_weight_decay"] is True
    assert all(torch.is_tensor(st["step"]) and st["step"].item() == 2 for st in o2.state.values())
    run_steps(m, o2, data(1))
    # bf16 -> fp32
    mb = mlp(torch.bfloat16)
    ob = AdamW(mb.parameters(), lr=1e-3)
    run_steps(mb, ob, data(2))
    mf = mlp()
    of = AdamW(mf.parameters(), lr=1e-3)
    of.load_state_dict(ob.state_dict())
    run_steps(mf, of, data(1))
    assert all("master_param" not in st for st in of.state.values())  # taken over (see the test below)
    # torch's state_dict: the groups' own options stay
    ours = AdamW(mlp(torch.bfloat16).parameters(), lr=1e-3, master_weights=False, state_dtype=torch.bfloat16)
    ours.load_state_dict(torch.optim.AdamW(mlp(torch.bfloat16).parameters()).state_dict())
    assert ours.param_groups[0]["master_weights"] is False and ours.param_groups[0]["state_dtype"] == "bfloat16"


@pytest.mark.parametrize("run", [torch.bfloat16, torch.float16], ids=["bf16_run", "fp16_run"])
@pytest.mark.parametrize("device,backend", backend_ids())
def test_a_change_of_the_model_dtype_keeps_the_masters(device, backend, run):
    """A 16-bit run's fp32 masters hold bits its params cannot show. A change of the model's dtype is not a write
    to the params, so those bits must survive it (found by a user trial: the resync took the rounded params as
    writes): model.half() of a bf16 model (model.bfloat16() of an fp16 one), the checkpoint loaded into a model of
    the other 16-bit dtype (fresh optimizer), and the checkpoint loaded into an fp32 model or model.float(), where
    each param takes over its master's value and the run continues exactly as the uninterrupted master-weight run.
    A param written after the load keeps the write."""
    other = torch.float16 if run == torch.bfloat16 else torch.bfloat16
    shapes = [(8, 7), (13,)]

    def bf16_run():
        torch.manual_seed(3)
        ps = [torch.nn.Parameter(torch.randn(*sh).to(device, run)) for sh in shapes]
        o = AdamW(ps, lr=3e-3, backend=backend)
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(device, run)
            o.step()
        return ps, o

    def one_step(ps, o, lr, seed=11):
        for grp in o.param_groups:
            grp["lr"] = lr
        g = torch.Generator().manual_seed(seed)
        for p in ps:  # the same grad values for every dtype of the params (bf16 values, exact in fp16 and fp32)
            p.grad = torch.randn(p.shape, generator=g).bfloat16().float().to(device, p.dtype)
        o.step()

    ps, o = bf16_run()
    saved = copy.deepcopy(o.state_dict())
    masters = [o.state[p]["master_param"].clone() for p in ps]
    assert all(not torch.equal(m.to(run).float(), m) for m in masters)  # bits the 16-bit params do not show
    # the uninterrupted run's next step (lr > 0), the oracle of the fp32 continuation
    one_step(ps, o, 3e-3)
    next_masters = [o.state[p]["master_param"].clone() for p in ps]

    # model.half() (or .bfloat16()) with the same optimizer, and the checkpoint in a model of the other 16-bit dtype
    # with a fresh optimizer: lr=0 moves nothing
    ps, o = bf16_run()
    for p in ps:
        p.data = p.data.to(other)
    one_step(ps, o, 0.0)
    for p, m in zip(ps, masters, strict=True):
        assert torch.equal(o.state[p]["master_param"], m) and torch.equal(p.detach(), m.to(other))
    ps = [torch.nn.Parameter(torch.randn(*sh).to(device, other)) for sh in shapes]
    with torch.no_grad():
        for p, m in zip(ps, masters, strict=True):
            p.copy_(m.to(run))  # a model's load_state_dict of the 16-bit checkpoint
    o = AdamW(ps, backend=backend)
    o.load_state_dict(saved)
    one_step(ps, o, 0.0)
    for p, m in zip(ps, masters, strict=True):
        assert torch.equal(o.state[p]["master_param"], m)

    # the checkpoint in an fp32 model (fresh optimizer), and model.float() (same optimizer): the params take over
    # the masters, and one step later equal the uninterrupted run's masters, bit for bit
    for how in ("checkpoint", "float()"):
        if how == "checkpoint":
            fp32 = [torch.nn.Parameter(torch.randn(*sh, device=device)) for sh in shapes]
            with torch.no_grad():
                for p, m in zip(fp32, masters, strict=True):
                    p.copy_(m.to(run))
            o32 = AdamW(fp32, backend=backend)
            o32.load_state_dict(saved)
        else:
            fp32, o32 = bf16_run()
            for p in fp32:
                p.data = p.data.float()
        one_step(fp32, o32, 3e-3)
        for p, m in zip(fp32, next_masters, strict=True):
            assert "master_param" not in o32.state[p]
            assert torch.equal(p.detach(), m), how
    # a param written after the load keeps the write (only elements holding the master's rounding take it over)
    fp32 = [torch.nn.Parameter(torch.randn(*sh, device=device)) for sh in shapes]
    with torch.no_grad():
        fp32[0].copy_(masters[0].to(run))
        fp32[1].copy_(masters[1].to(run))
        fp32[1][4] = 0.125  # re-initialised after loading
    o32 = AdamW(fp32, backend=backend)
    o32.load_state_dict(saved)
    one_step(fp32, o32, 0.0)
    assert torch.equal(fp32[0].detach(), masters[0])
    expect = masters[1].clone()
    expect[4] = 0.125
    assert torch.equal(fp32[1].detach(), expect)
    # a master of another shape is refused by load_state_dict before anything moves
    p = torch.nn.Parameter(torch.randn(4, 5, device=device))
    o32 = AdamW([p], backend=backend)
    bad = copy.deepcopy(saved)
    bad["state"] = {0: {**saved["state"][0], "master_param": torch.zeros(5, 4, device=device)}}
    bad["param_groups"][0]["params"] = [0]
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"state\['master_param'\] of a \(4, 5\) param has shape \(5, 4\)"):
        o32.load_state_dict(bad)
    assert torch.equal(p.detach(), before) and not o32.state


def test_writes_near_the_master_are_kept_when_the_dtype_did_not_change():
    """The other-format rounding counts as unwritten only after a load or a dtype change (a reviewer found it
    applied always): an fp16 param clamped to 1.0 whose master is 1.0015 (bf16 rounds 1.0015 to 1.0), and a bf16
    element zeroed whose master is 2e-8 (fp16 flushes it to 0), are writes and must reach the masters."""
    for dtype, value, write in ((torch.float16, 1.0015, lambda p: p.clamp_(max=1.0)),
                                (torch.bfloat16, 2e-8, lambda p: p.zero_())):
        p = torch.nn.Parameter(torch.full((4,), value).to(dtype))
        o = AdamW([p], lr=0.0, weight_decay=0.0)
        p.grad = torch.ones_like(p)
        o.step()
        o.state[p]["master_param"].fill_(value)
        with torch.no_grad():
            write(p)
        written = p.detach().clone()
        assert not torch.equal(written, torch.full((4,), value).to(dtype))
        p.grad = torch.ones_like(p)
        o.step()
        assert torch.equal(p.detach(), written), dtype
        assert torch.equal(o.state[p]["master_param"], written.float()), dtype


def test_model_float_under_a_compiled_step_asks_for_resync_masters():
    """model.float() after 16-bit steps: the fp32 param takes over its master at the next eager step; a compiled
    step cannot (Inductor drops the 16-bit round trips the takeover compares with: 4e-3 off, found by a reviewer),
    so it raises, naming resync_masters(); after that call the compiled step runs and the param holds the master."""
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(6, 5).bfloat16())
    o = AdamW([p], lr=1e-2, backend="cpu" if not mixprec_ops.backends.unavailable_reason(
        "adam_step_", "cpu", torch.device("cpu")) else "torch")
    p.grad = torch.randn(6, 5).bfloat16()
    o.step()
    master = o.state[p]["master_param"].clone()
    p.data = p.data.float()
    step = torch.compile(o.step, fullgraph=True, backend="aot_eager")
    p.grad = torch.zeros(6, 5)
    with pytest.raises(Exception, match="resync_masters"):
        step()
    assert "master_param" in o.state[p] and float(o.state[p]["step"]) == 1
    o.resync_masters()
    assert torch.equal(p.detach(), master) and "master_param" not in o.state[p]
    step()
    assert float(o.state[p]["step"]) == 2


def test_group_options_and_duplicates_are_checked_when_added():
    """A group's master_weights / state_dtype are checked (and state_dtype stored by name) when the group is added,
    not at its first step; a param twice in one group is refused (torch warns; one fused launch would update it
    twice, racing); a state of another shape (same numel) is refused before anything is updated."""
    m = mlp()
    o = AdamW(m[0].parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="state_dtype must be"):
        o.add_param_group({"params": m[2].parameters(), "state_dtype": torch.float16})
    with pytest.raises(ValueError, match="master_weights must be"):
        o.add_param_group({"params": m[2].parameters(), "master_weights": "yes"})
    with pytest.raises(ValueError, match="param 1 of param group 1 appears twice"):
        o.add_param_group({"params": [m[2].weight, m[2].weight]})
    with pytest.raises(ValueError, match="param 2 of param group 0 appears twice"):  # tied weights, by module
        AdamW([m[0].weight, m[0].bias, m[0].weight])
    o.add_param_group({"params": m[2].parameters(), "state_dtype": torch.bfloat16})
    assert len(o.param_groups) == 2 and o.param_groups[1]["state_dtype"] == "bfloat16"
    p = torch.nn.Parameter(torch.randn(4, 5))
    q = AdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    q.step()
    q.state[p]["exp_avg"] = torch.zeros(5, 4)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] of a \(4, 5\) param has shape \(5, 4\)"):
        q.step()
    assert torch.equal(p.detach(), before) and q.state[p]["step"].item() == 1



@pytest.mark.parametrize("device,backend", backend_ids())
def test_steady_steps_resync_nothing_for_fallback_and_view_params(device, backend, monkeypatch):
    """No spurious master resync: a bf16 param with gaps (its rows every other column of a buffer: stepped by the
    reference, which moves the version counter), a transposed one whose grads come contiguous (copied into its
    layout for the kernel) and params that are views of one buffer (one shared counter, moved once per param by
    every backend) — the versions are read after the step, not predicted."""
    import mixprec_ops.optim.adam as adam_mod

    spy = _ResyncSpy(monkeypatch)
    served = []
    real = adam_mod.adam_step_
    monkeypatch.setattr(adam_mod, "adam_step_", lambda *a, backend=None, **k: (
        served.append((len(a[0]), backend)), real(*a, backend=backend, **k))[1])
    flat = torch.randn(3 * 24).to(torch.bfloat16).to(device)
    views = [torch.nn.Parameter(flat[i * 24:(i + 1) * 24].view(4, 6)) for i in range(3)]
    transposed = torch.nn.Parameter(torch.randn(5, 7).to(torch.bfloat16).to(device).t())
    gapped = torch.nn.Parameter(torch.randn(5, 14).to(torch.bfloat16).to(device)[:, ::2])
    ps = views + [transposed, gapped]
    o = AdamW(ps, lr=1e-3, backend=backend)
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn(p.shape, dtype=p.dtype, device=device)  # contiguous, whatever p's strides
        o.step()
    assert spy.count == 0
    # every step: the four walkable params in one launch, the gapped one by the reference (a step with a fallback
    # param is planned in full each time, never recorded)
    assert served == [(4, served[0][1]), (1, "torch")] * 4 and (backend == "torch") == (served[0][1] == "torch"), served


@pytest.mark.parametrize("backend,compiler", [("torch", "aot_eager"), ("cpu", "inductor")])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_compiled_step_fullgraph(max_grad_norm, backend, compiler):
    """torch.compile(opt.step, fullgraph=True) traces (the version checks of the master resync, which branch on a
    counter tracing cannot see, are skipped while compiling), with clipping too (torch 2.11's Dynamo refused
    bool() of a list and an attribute set on the optimizer); the same params and masters as eager. Also with
    Inductor, torch.compile's default, around the fused C++ step (an opaque op, so bit-equal too)."""
    if mixprec_ops.backends.unavailable_reason("adam_step_", backend, torch.device("cpu")):
        pytest.skip(f"no {backend} backend here")
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(9, 5).bfloat16()) for _ in range(2)]
        o = AdamW(ps, lr=1e-2, backend=backend, max_grad_norm=max_grad_norm)
        step = torch.compile(o.step, fullgraph=True, backend=compiler) if compiled else o.step
        torch.manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            step()
        results.append([t.clone() for p in ps for t in (p.detach(), o.state[p]["master_param"])])
        if max_grad_norm is not None:
            results[-1].append(o.grad_norm.clone())
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_resync_masters_takes_writes_between_compiled_steps(compiler):
    """A compiled step cannot watch version counters (found by a user trial: a model's load_state_dict between
    compiled steps was undone by the next step, params rebuilt from the stale masters). resync_masters(), called
    eagerly after the write, takes it: the compiled run then equals the eager run, which sees the write by itself
    (bit for bit; the C++ step is an opaque op under Inductor too). It also lets an fp32 param take over a loaded
    master, and returns at once for params without masters."""
    if mixprec_ops.backends.unavailable_reason("adam_step_", "cpu", torch.device("cpu")):
        pytest.skip("no cpu backend here")
    results = {}
    for mode in ("eager", "compiled", "compiled_without_resync"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(9, 5).bfloat16()), torch.nn.Parameter(torch.randn(7))]
        o = AdamW(ps, lr=1e-2, backend="cpu")
        step = o.step if mode == "eager" else torch.compile(o.step, fullgraph=True, backend=compiler)

        def grads(seed):
            g = torch.Generator().manual_seed(seed)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)

        for i in range(2):
            grads(i)
            step()
        with torch.no_grad():
            ps[0][1:4].fill_(0.5)  # a partial write: the other rows keep their masters' fp32 bits
        if mode == "compiled":
            o.resync_masters()  # eager, outside no_grad: the masters must stay leaves outside autograd
            assert not o.state[ps[0]]["master_param"].requires_grad
            copy.deepcopy(o.state_dict())
        grads(7)
        step()
        results[mode] = [ps[0].detach().clone(), o.state[ps[0]]["master_param"].clone(), ps[1].detach().clone()]
    for a, b in zip(results["eager"], results["compiled"], strict=True):
        assert torch.equal(a, b)
    # without the call the write is lost (the limitation the method exists for; if a torch release ever traces
    # version counters, this says so)
    written = results["eager"][0][1:4].float()
    assert (written - 0.5).abs().max() < 0.05
    assert (results["compiled_without_resync"][0][1:4].float() - 0.5).abs().max() > 0.1
    # an fp32 param takes over a master loaded for it; nothing to do for a state without masters
    q = torch.nn.Parameter(torch.zeros(3))
    oq = AdamW([q])
    oq.state[q]["master_param"] = torch.tensor([1e-3, 2.0, 3.0])
    with torch.no_grad():
        q.copy_(oq.state[q]["master_param"].bfloat16().float())
        q[2] = -1.0  # written after the load: kept
    bad = torch.nn.Parameter(torch.zeros(4, 5))
    oq.add_param_group({"params": [bad]})
    oq.state[bad]["master_param"] = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"of a \(4, 5\) param has shape \(5, 4\)"):
        oq.resync_masters()  # every shape checked before anything changes
    assert "master_param" in oq.state[q] and q[0].item() != 1e-3
    del oq.state[bad]["master_param"]
    oq.resync_masters()
    assert torch.equal(q.detach(), torch.tensor([1e-3, 2.0, -1.0])) and "master_param" not in oq.state[q]
    assert not q.grad_fn and q.is_leaf
    oq.resync_masters()


def test_write_seen_during_capture_raises(monkeypatch):
    """A param written since the last step, met inside a CUDA graph capture: its master cannot take the write there
    (it would be recorded and replayed every step), and skipping it let replays overwrite the write. Raises before
    anything is updated. (The capture is simulated: Adam._capturing is what the step asks.)"""
    p = torch.nn.Parameter(torch.randn(4, 4).bfloat16())
    o = AdamW([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    o.step()
    with torch.no_grad():
        p.fill_(0.5)
    master = o.state[p]["master_param"].clone()
    monkeypatch.setattr(Adam, "_capturing", staticmethod(lambda device: True))
    with pytest.raises(RuntimeError, match="cannot be recorded in a CUDA graph capture"):
        o.step()
    assert torch.equal(o.state[p]["master_param"], master) and (p.detach() == 0.5).all()


def test_fallback_warning_from_a_step_names_the_callers_line(monkeypatch):
    """The backend fallback warning names the line that called opt.step(), not torch's no_grad wrapper."""
    import warnings

    from mixprec_ops import backends

    real = backends.unavailable_reason
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda op, b, d: "pretend missing" if b == "cpu" else real(op, b, d))
    monkeypatch.setattr(backends, "_warned", set())
    p = torch.nn.Parameter(torch.randn(3))
    o = AdamW([p])
    p.grad = torch.randn(3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o.step()
    mine = [x for x in w if "using backend" in str(x.message)]
    assert mine and all(x.filename == __file__ for x in mine), [(x.filename, str(x.message)) for x in w]


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_step_dispatches_few_ops(max_grad_norm):
    """The host cost of a step is mostly its small ops (each a kernel launch on a GPU): a one-bucket step dispatches
    exactly the scalars, the fused step and the counters' add; clipping adds its one read pass (unscale_ with the
    norm) and a handful of 1-element ops, not one per param or per grad. Pins the counts measured when they were cut
    (bench/NOTES.md, "The step's scalars"): a regression that adds per-step or per-param ops fails here."""
    extension_backend("adam_step_", "cpu")  # the C++ ops (the reference backend is many ops by design)
    ps = [torch.nn.Parameter(torch.randn(7, 3).bfloat16()) for _ in range(40)]
    o = AdamW(ps, lr=1e-3, max_grad_norm=max_grad_norm)
    for _ in range(2):  # state made and step buffer formed: the steady state
        for p in ps:
            p.grad = torch.randn_like(p)
        o.step()
    with OpLog() as log:
        o.step()
    # the steady step's metadata sweep (with an extension that has it): host-only (its signature is a CPU tensor,
    # compared on the CPU), no launches
    from mixprec_ops.optim._steady import _SIGNATURE

    if _SIGNATURE is not None:
        assert log.ops[:2] == ["mixprec.param_grad_signature.default", "aten.equal.default"], log.ops
        log.ops = log.ops[2:]
    fused = ["mixprec.adam_scalars.default", "mixprec.adam_step_.default", "aten.add_.Tensor"]
    if max_grad_norm is None:
        assert log.ops == fused, log.ops
    else:
        assert log.ops.count("mixprec.unscale_.default") == 1, log.ops
        assert [op for op in log.ops if op.startswith("mixprec.")][-2:] == fused[:2], log.ops
        assert len(log.ops) <= 17, log.ops


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("grads", ["many_moderate", "one_huge"])
def test_clipping_norm_overflow_skips_on_every_backend(backend, grads):
    """The documented rule (the class docstring): squares are summed in fp32, so a norm whose fp32 sum of squares
    overflows is inf and skips the step, on every backend, although each element's square is finite (100 grads of
    1e19: 1e40 in all; torch's clip_grad_norm_ gives inf there too) or the norm pass sums in fp64 (the reference
    squares each element in fp64, so one 1e20 gives a finite 1e20 there; torch's vector_norm of one element does
    not overflow either). The one-device fast path of the norm once stepped with a norm of 1e20 in those cases."""
    if backend == "cpu":
        extension_backend(OP, "cpu")
    n = 100 if grads == "many_moderate" else 1
    v = 1e19 if grads == "many_moderate" else 1e20
    ps = [torch.nn.Parameter(torch.ones(1)) for _ in range(n)]
    for p in ps:
        p.grad = torch.full((1,), v)
    if grads == "many_moderate":
        assert torch.isinf(torch.nn.utils.get_total_norm([p.grad for p in ps]))
    o = AdamW(ps, lr=0.1, max_grad_norm=1.0, backend=backend)
    o.step()
    assert all(torch.equal(p.detach(), torch.ones(1)) for p in ps)
    assert torch.isinf(o.grad_norm)
    assert not o.state or all(float(st["step"]) == 0 for st in o.state.values())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_clipping_norm_overflow_boundary(backend):
    """The rule's boundary: fl(n * n) overflows fp32 exactly from n = 2^64 on. A norm of 2^64 skips the step; the
    float below it is finite and clips (coefficient 1 / n), with that norm reported."""
    if backend == "cpu":
        extension_backend(OP, "cpu")
    below = torch.nextafter(torch.tensor(2.0**64), torch.tensor(0.0)).item()  # the fp32 below 2^64
    for v, skips in ((2.0**64, True), (below, False)):
        p = torch.nn.Parameter(torch.ones(1))
        p.grad = torch.full((1,), v)
        o = AdamW([p], lr=0.1, max_grad_norm=1.0, backend=backend)
        o.step()
        assert torch.equal(p.detach(), torch.ones(1)) == skips, v
        assert (torch.isinf(o.grad_norm).item() if skips else o.grad_norm.item() == v), (v, o.grad_norm)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("path", ["one_device", "general"])
def test_clipping_rule_applies_to_the_unscaled_norm(backend, path, monkeypatch):
    """Under a GradScaler the grads arrive scaled. The 2^64 rule (torch's fp32 sum of squares overflows) is about
    the unscaled norm: grads whose scaled norm passes 2^64 but whose unscaled one is small must step, clipped (they
    skipped, and torch's GradScaler, which does not see this optimizer's skips, then never backed off: a user trial
    saw 0 of 25 steps taken). Eight elements of 1.5e19 (each square finite in fp32, their sum not) under a scale of
    2^60: unscaled norm 8^0.5 * 1.5e19 / 2^60 ~ 36.8. "general": the multi-part path (fp64 sums of the parts)."""
    if backend == "cpu":
        extension_backend(OP, "cpu")
    if path == "general":  # the path for several devices, DTensors or ranks, taken here with one CPU part
        monkeypatch.setattr(AdamW, "norm_across_ranks", True, raising=False)
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: None)
        monkeypatch.setattr(AdamW, "_collective_device", lambda self: torch.device("cpu"))
    p = torch.nn.Parameter(torch.ones(8))
    p.grad = torch.full((8,), 1.5e19)
    o = AdamW([p], lr=0.1, max_grad_norm=1.0, backend=backend)
    if path == "general":
        o.norm_across_ranks = True
    o.grad_scale = torch.full((), 2.0**60)
    o.found_inf = torch.zeros(1)
    o.step()
    want = (8 ** 0.5 * 1.5e19) / 2.0**60
    assert abs(o.grad_norm.item() - want) <= 1e-6 * want, o.grad_norm
    assert float(o.state[p]["step"]) == 1 and not torch.equal(p.detach(), torch.ones(8))
    # and an unscaled norm of 2^64 still skips (the rule's boundary, now after the division)
    p2 = torch.nn.Parameter(torch.ones(1))
    p2.grad = torch.full((1,), 2.0**64 * 4)
    o2 = AdamW([p2], lr=0.1, max_grad_norm=1.0, backend=backend)
    if path == "general":
        o2.norm_across_ranks = True
    o2.grad_scale, o2.found_inf = torch.full((), 4.0), torch.zeros(1)
    o2.step()
    assert torch.isinf(o2.grad_norm) and torch.equal(p2.detach(), torch.ones(1))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_clip_coefficient_is_clip_grad_norms(backend):
    """The clipping coefficient is torch.nn.utils.clip_grad_norm_'s, max_norm / (norm + 1e-6) and at most 1, shown
    where its 1e-6 matters: grads whose norm is ~1e-4 (the 1e-6 is 1% of it) and Adam's eps = 1, which makes the
    first update proportional to the clipped grad instead of its sign. Against clip_grad_norm_ then torch's AdamW,
    on the parameter change; clipping active (max_norm below the norm) and not."""
    if backend == "cpu":
        extension_backend(OP, "cpu")
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=gen) * 2e-5 for n in (7, 33, 130)]
    norm = torch.linalg.vector_norm(torch.cat(grads)).item()
    for max_norm in (norm / 10, norm * 2):
        ours = [torch.nn.Parameter(torch.zeros(g.numel())) for g in grads]  # zeros: the change is exact
        theirs = [torch.nn.Parameter(torch.zeros(g.numel())) for g in grads]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        o = AdamW(ours, lr=1e-2, eps=1.0, weight_decay=0.0, max_grad_norm=max_norm, backend=backend)
        t = torch.optim.AdamW(theirs, lr=1e-2, eps=1.0, weight_decay=0.0)
        total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        o.step()
        t.step()
        assert o.grad_norm.item() == pytest.approx(total.item(), rel=1e-6)
        for a, b in zip(ours, theirs):
            assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4, (max_norm, a[:3], b[:3])


def test_fresh_optimizer_loading_masters_takes_later_param_writes():
    """An optimizer that loads a state_dict with masters has no record of the params' versions: its first step
    checks every master against its param, so a write made after the load (a head re-initialised, other weights
    loaded into the model) wins over the loaded master, element by element, as it does between steps. Before, the
    first step wrote the checkpoint's masters back over it. A plain resume (the model loaded from the same
    checkpoint) is unchanged bit for bit (test_resume_is_bit_exact and friends)."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).bfloat16()

    def loss(m):
        torch.manual_seed(5)
        return m(torch.randn(16, 8, dtype=torch.bfloat16)).float().square().mean()

    m = make()
    o = AdamW(m.parameters(), lr=1e-3)
    for _ in range(3):
        o.zero_grad()
        loss(m).backward()
        o.step()
    buf = io.BytesIO()
    torch.save({"opt": o.state_dict(), "model": m.state_dict()}, buf)
    o.zero_grad()
    loss(m).backward()
    o.step()  # the uninterrupted run's next step
    want = [(p.detach().clone(), o.state[p]["master_param"].clone()) for p in m.parameters()]
    for order in ("model first", "optimizer first"):
        buf.seek(0)
        ck = torch.load(buf)
        m2 = make()
        o2 = AdamW(m2.parameters(), lr=1e-3)
        if order == "model first":
            m2.load_state_dict(ck["model"])
            o2.load_state_dict(ck["opt"])
        else:
            o2.load_state_dict(ck["opt"])
            m2.load_state_dict(ck["model"])
        with torch.no_grad():
            m2[1].weight.zero_()
            m2[0].weight[0].fill_(0.5)
        o2.zero_grad()
        loss(m2).backward()
        o2.step()
        assert m2[1].weight.abs().max() <= 2e-3, order  # one step of lr 1e-3 away from the zeros
        assert (m2[0].weight[0].float() - 0.5).abs().max() <= 2e-3, order
    # a plain resume, nothing written after the load: the uninterrupted run's next step, params and masters
    buf.seek(0)
    ck = torch.load(buf)
    m3 = make()
    m3.load_state_dict(ck["model"])
    o3 = AdamW(m3.parameters(), lr=1e-3)
    o3.load_state_dict(ck["opt"])
    o3.zero_grad()
    loss(m3).backward()
    o3.step()
    for (p, master), q in zip(want, m3.parameters(), strict=True):
        assert torch.equal(q, p) and torch.equal(o3.state[q]["master_param"], master)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_scalers_found_inf_skips_a_clipped_step_with_finite_grads(backend):
    """torch.amp.GradScaler.step hands the optimizer grad_scale and found_inf (optimizer attributes): a set
    found_inf skips the step even when the grads this optimizer reads are finite (the inf was found elsewhere: a
    shard on another rank, grads unscaled earlier), with clipping on too, whose norm pass makes a flag of its own."""
    if backend == "cpu":
        extension_backend(OP, "cpu")
    for clip in (None, 1.0):
        p = torch.nn.Parameter(torch.randn(37))
        p.grad = torch.randn(37)
        before = p.detach().clone()
        o = AdamW([p], lr=0.1, max_grad_norm=clip, backend=backend)
        o.grad_scale = torch.full((), 2.0)
        o.found_inf = torch.ones(())
        o.step()
        assert torch.equal(p.detach(), before), clip
        assert not o.state or float(o.state[p]["step"]) == 0
        o.found_inf = torch.zeros(())
        o.step()
        assert not torch.equal(p.detach(), before) and float(o.state[p]["step"]) == 1


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_grads_of_any_float_dtype(backend):
    """Grads may be any of float32, float16, bfloat16 whatever the param's dtype (an FSDP reduce dtype, a grad hook
    that casts): a grad that is neither the param's dtype nor float32 (which the kernels take as is) is widened to
    float32 first, exactly, so the step equals the one with that float32 grad, bit for bit."""
    if backend == "cpu":
        extension_backend(OP, "cpu")
    dts = (torch.float32, torch.float16, torch.bfloat16)
    for pdt in dts:
        for gdt in dts:
            gen = torch.Generator().manual_seed(11)
            w0 = torch.randn(37, generator=gen).to(pdt)
            g = torch.randn(37, generator=gen).to(gdt)
            a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
            if not hasattr(a, "grad_dtype"):
                pytest.skip("this torch has no Tensor.grad_dtype")
            a.grad_dtype = b.grad_dtype = None  # torch's .grad setter accepts other dtypes only then
            a.grad, b.grad = g.clone(), g.float()
            oa, ob = AdamW([a], lr=0.1, backend=backend), AdamW([b], lr=0.1, backend=backend)
            for _ in range(2):
                oa.step()
                ob.step()
            assert_bit_exact(a.detach(), b.detach(), f"param {pdt}, grad {gdt}")
            assert_bit_exact(oa.state[a]["exp_avg_sq"], ob.state[b]["exp_avg_sq"], f"param {pdt}, grad {gdt}")


def test_strided_grad_of_a_contiguous_param_takes_the_fused_kernel():
    """A grad the kernels cannot walk with its param (a transposed view: what a matmul's backward can hand over)
    is made contiguous and joins its bucket's fused step; it used to be worth a per-param reference step instead.
    Checked by which ops run (the same bits either way: the reference is the kernels' definition)."""
    extension_backend(OP, "cpu")
    w = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.bfloat16))
    w.grad = torch.randn(5, 6, dtype=torch.bfloat16).t()
    o = AdamW([w], lr=0.1, backend="cpu")
    with OpLog() as log:
        o.step()
    assert log.ops.count("mixprec.adam_step_.default") == 1, log.ops
    assert "aten.sqrt.default" not in log.ops, log.ops  # the reference's square root: no per-param fallback


def test_state_freed_while_another_param_gets_its_first_is_freed_too():
    """Progressive unfreezing: layer A frozen and its state deleted while layer B, frozen until now, gets its first
    state in the same step. The number of params and of states is unchanged, and A's state must still be freed."""
    import gc
    import weakref

    model = mlp(torch.bfloat16)
    a, b = model[0], model[2]
    b.requires_grad_(False)
    opt = AdamW(model.parameters(), lr=1e-2)
    run_steps(model, opt, data(1, dtype=torch.bfloat16))
    assert len(opt.state) == 2
    refs = [weakref.ref(t) for p in a.parameters() for t in opt.state[p].values()]
    a.requires_grad_(False)
    for p in a.parameters():
        del opt.state[p]
    b.requires_grad_(True)
    run_steps(model, opt, data(1, dtype=torch.bfloat16, seed=4))
    assert len(opt.state) == 2 and all(p in opt.state for p in b.parameters())
    gc.collect()
    assert all(r() is None for r in refs), "state tensors still alive"


@pytest.mark.parametrize("how", ["del_state", "drop_param"])
def test_dropped_state_is_freed_at_the_next_step(how):
    """Freeing a frozen layer's state (del opt.state[p]) or dropping a param and its state from the optimizer
    (model surgery) frees the tensors, as with torch.optim.AdamW: the optimizer's per-param plans held the param,
    its state dict and its state tensors, and were dropped only when 64 more plans than params had piled up. They
    are forgotten at the next step (torch frees at once: its optimizer keeps nothing else)."""
    import gc
    import weakref

    model = mlp(torch.bfloat16)
    opt = AdamW(model.parameters(), lr=1e-2)
    run_steps(model, opt, data(1, dtype=torch.bfloat16))
    frozen = model[0].weight
    refs = [weakref.ref(t) for t in opt.state[frozen].values()]
    frozen.requires_grad_(False)
    if how == "del_state":
        del opt.state[frozen]
    else:
        opt.param_groups[0]["params"].remove(frozen)
        del opt.state[frozen]
    frozen_ref = weakref.ref(frozen)
    del frozen
    run_steps(model, opt, data(1, dtype=torch.bfloat16, seed=4))
    if how == "drop_param":
        model[0].weight = None  # the model's reference too
    gc.collect()
    assert all(r() is None for r in refs), "state tensors still alive"
    if how == "drop_param":
        assert frozen_ref() is None, "param still alive"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_write_after_many_params_left_the_groups_is_kept(backend):
    """More than 64 params leave the groups (their states kept, as torch's optimizers keep them): every plan whose
    state is kept keeps its version counter. A write to an fp16 param before the next step must win over its master
    even where the written value equals the master's rounding through bf16, for a param that stayed and for one that
    left and came back; with every plan cleared (as once), the master counted as loaded, that value was taken for the
    other format's rounding, and the step undid the write."""
    if backend == "cpu":
        extension_backend(OP, "cpu")
    g = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(64, generator=g).half()) for _ in range(100)]
    opt = AdamW(ps, lr=1e-3, backend=backend)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(64, generator=g).half()
        opt.step()
    opt.param_groups[0]["params"] = ps[:30]  # 70 leave
    for p in ps[:30]:
        p.grad = torch.randn(64, generator=g).half()
    opt.step()  # (after it, the plans of the 70 are forgotten)
    master = opt.state[ps[0]]["master_param"]
    write = master.to(torch.bfloat16).to(torch.float16)
    moved = write != master.to(torch.float16)
    assert moved.any()  # the case: the write differs from the master's own rounding there
    with torch.no_grad():
        ps[0].copy_(write)
    opt.param_groups[0].update(lr=0.0, weight_decay=0.0)  # a step that changes nothing but the master's resync
    for p in ps[:30]:
        p.grad = torch.randn(64, generator=g).half()
    opt.step()
    assert torch.equal(ps[0].detach(), write)
    # the master took the write where it moved the param (elsewhere it keeps its fp32 bits: _resync's rule)
    assert torch.equal(opt.state[ps[0]]["master_param"][moved], write.float()[moved])
    # and for a param that left with the 70 and comes back: its plan stayed with its state
    opt.param_groups[0]["params"] = ps
    back = ps[50]
    master = opt.state[back]["master_param"]
    write = master.to(torch.bfloat16).to(torch.float16)
    moved = write != master.to(torch.float16)
    assert moved.any()
    with torch.no_grad():
        back.copy_(write)
    for p in ps:
        p.grad = torch.randn(64, generator=g).half()
    opt.step()
    assert torch.equal(back.detach(), write)


def test_state_dict_step_counters_pickle_alone():
    """The live step counters are views of one buffer per bucket; state_dict() hands out counters of their own, so
    that pickling it (all_gather_object, broadcast_object_list) grows linearly with the params (each view pickled
    its whole buffer: quadratic), and the live state keeps its views and values."""
    import pickle

    def pickled_size(n):
        ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]
        opt = AdamW(ps, lr=1e-3)
        for p in ps:
            p.grad = torch.randn(3)
        opt.step()
        sd = opt.state_dict()
        for i, p in enumerate(ps):
            assert opt.state[p]["step"]._base is not None  # still the bucket's buffer
            assert sd["state"][i]["step"]._base is None and torch.equal(sd["state"][i]["step"], opt.state[p]["step"])
            assert sd["state"][i]["exp_avg"] is opt.state[p]["exp_avg"]  # the rest as torch's: the live tensors
        return len(pickle.dumps(sd))

    small, large = pickled_size(100), pickled_size(800)
    assert large < 10 * small, (small, large)  # linear: ~8x (quadratic was ~64x)


def _swap_param(m, o):
    new = torch.nn.Parameter(torch.randn(9, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16))
    new.grad = torch.randn(9, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    o.param_groups[1]["params"][1] = new


def _add_group(m, o):
    new = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16))
    new.grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    o.add_param_group({"params": [new], "lr": 5e-3})


def _state_of(o, m):
    return o.state[m[0].weight]


def _move_param(m, o):  # the flattened order of the params stays the same; the group (lr, betas) changes
    o.param_groups[0]["params"].append(o.param_groups[1]["params"].pop(0))


def _grad_fp32(m, o):
    w = m[0].weight
    g = w.grad.float()
    w.grad = None
    w.grad_dtype = None  # (torch >= 2.10 takes an fp32 grad for a bf16 param once grad_dtype is lifted)
    w.grad = g


def _write_then_resync(m, o):
    with torch.no_grad():
        m[0].weight.mul_(0.5)
    o.resync_masters()


# What may change between two steps, done to both optimizers of test_steady_step_equals_full_planning (a function of
# the model and the optimizer, run after the grads are set): whether the record of the last step may serve the next
# one (only for changes the planning does not rest on: the hyperparameters, read at every step, and the grads'
# values), and whether the change is made at every step from then on (the grads) or once.
STEADY_CHANGES = {
    "nothing": (lambda m, o: None, True, False),
    "lr_and_betas": (lambda m, o: o.param_groups[0].update(lr=0.05, betas=(0.5, 0.9)), True, False),
    "grad_values_in_place": (lambda m, o: m[0].weight.grad.mul_(3.0), True, True),
    "grad_dropped": (lambda m, o: setattr(m[2].bias, "grad", None), False, True),
    "grad_appears": (lambda m, o: setattr(m[0].bias, "grad", torch.full_like(m[0].bias, 0.25)), False, True),
    "grad_strided": (lambda m, o: setattr(m[0].weight, "grad", m[0].weight.grad.t().contiguous().t()), False, True),
    "grad_fp32": (_grad_fp32, False, True),
    "state_tensor_replaced": (lambda m, o: _state_of(o, m).update(exp_avg=_state_of(o, m)["exp_avg"] * 0.5), False,
                              False),
    "step_counter_replaced": (lambda m, o: _state_of(o, m).update(step=_state_of(o, m)["step"].clone() + 5), False,
                              False),
    "master_replaced": (lambda m, o: _state_of(o, m).update(master_param=_state_of(o, m)["master_param"] * 1.5),
                        False, False),
    "state_dict_replaced": (lambda m, o: o.state.__setitem__(m[0].weight, dict(_state_of(o, m))), False, False),
    "state_key_added": (lambda m, o: _state_of(o, m).update(note=torch.zeros(())), False, False),
    "state_deleted": (lambda m, o: o.state.pop(m[0].weight), False, False),
    "param_written": (lambda m, o: m[0].weight.detach().mul_(0.5), False, False),
    "param_written_then_resynced": (_write_then_resync, False, False),
    "param_data_replaced": (lambda m, o: setattr(m[0].weight, "data", m[0].weight.data * 2), False, False),
    "param_dtype_changed": (lambda m, o: setattr(m[2].bias, "data", m[2].bias.data.bfloat16()), False, False),
    "param_swapped": (_swap_param, False, False),
    "group_added": (_add_group, False, False),
    "param_moved_to_the_previous_group": (_move_param, False, False),
    "amsgrad_on": (lambda m, o: o.param_groups[0].update(amsgrad=True), False, False),
    "masters_off": (lambda m, o: o.param_groups[1].update(master_weights=False), False, False),
    "backend_changed": (lambda m, o: setattr(o, "backend", "auto" if o.backend == "torch" else "torch"), False,
                        False),
    "state_loaded": (lambda m, o: o.load_state_dict(copy.deepcopy(o.state_dict())), False, False),
}


@pytest.mark.parametrize("sweep", ["bucket", "signature", "python"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("change", list(STEADY_CHANGES))
def test_steady_step_equals_full_planning(change, backend, sweep, monkeypatch):
    """A step after one that planned in full reuses that planning (optim/_steady.py) when nothing it rests on changed.
    Against a twin optimizer that plans every step in full, each change between two steps (grads, state, params,
    groups, options, writes to the params) gives the same bits in every param and state tensor, and the record is
    used exactly when it may be: for a change of the hyperparameters or of grad values, not for the rest. The
    metadata sweep three ways: the C++ bucket's own check (mixprec::adam_bucket_unchanged, from the record's second
    use on), the extension's mixprec::param_grad_signature (no bucket), and the Python sweeps (neither)."""
    import mixprec_ops.optim._steady as steady
    from mixprec_ops.ops import adam as ops_adam

    if backend == "cpu":
        extension_backend(OP, "cpu")
    if sweep != "bucket":
        monkeypatch.setattr(steady, "bucket_usable", lambda: False)
    elif not ops_adam._HAS_BUCKET:
        pytest.skip("the extension lacks mixprec::AdamBucket")
    if sweep == "python":
        monkeypatch.setattr(steady, "_SIGNATURE", None)
    elif steady._SIGNATURE is None:
        pytest.skip("the extension lacks mixprec::param_grad_signature")
    checked = []  # the bucket's checks (sweep "bucket")
    real_check = steady.bucket_unchanged
    monkeypatch.setattr(steady, "bucket_unchanged", lambda ps, b: checked.append(real_check(ps, b)) or checked[-1])
    fn, reusable, every_step = STEADY_CHANGES[change]
    if change == "grad_fp32" and not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("an fp32 grad for a bf16 param needs torch >= 2.10 (grad_dtype)")
    models = [clone_setup(torch.bfloat16, "cpu", mixed=True) for _ in range(2)]
    # (clipping on: the norm pass must sum the grads in the same order either way)
    opts = [AdamW(two_groups(m, weight_decay=0.1), lr=1e-2, max_grad_norm=0.5, backend=backend) for m in models]
    monkeypatch.setattr(opts[1], "_steady_step", lambda: None)  # the twin: full planning at every step
    used = []
    real = opts[0]._steady_step
    monkeypatch.setattr(opts[0], "_steady_step", lambda: used.append(real()) or used[-1])
    for step in range(8):
        for m, o in zip(models, opts):
            grads_for(m, "cpu", seed=step)
            if not (change == "grad_appears" and step >= 3):
                m[0].bias.grad = None  # a param without grads: its grad appearing is a change
            if step == 3 or every_step and step > 3:
                fn(m, o)
            o.step()
    taken = [u is not None for u in used]
    if sweep == "bucket":  # (the record is made at step 0 and first used at step 1; the bucket checks from step 2;
        # a change may be seen before it: test_param_grad_signature_sees_every_metadata_change checks it alone)
        assert checked and checked[0], checked
    else:
        assert not checked
    # Step 4 reuses the planning of step 3, except where that planning copied a strided grad (not recorded) or where
    # the grads change dtype at step 4 (made in the param's dtype, which changed at step 3; the record of step 3 then
    # went unused, so step 4 does not record: the back-off); the last step is served again.
    later = change != "grad_strided"
    assert taken[:5] == [False, True, True, reusable, later and change != "param_dtype_changed"], taken
    assert taken[-1] == later, taken
    a_params = list(models[0].parameters()) + [p for g in opts[0].param_groups for p in g["params"]]
    b_params = list(models[1].parameters()) + [p for g in opts[1].param_groups for p in g["params"]]
    for i, (a, b) in enumerate(zip(a_params, b_params)):
        assert_bit_exact(a.detach(), b.detach(), f"param {i}")
        sa, sb = opts[0].state.get(a, {}), opts[1].state.get(b, {})
        assert set(sa) == set(sb), (i, set(sa), set(sb))
        for k in sa:
            assert_bit_exact(sa[k], sb[k], f"param {i} {k}")


@pytest.mark.parametrize("lr", ["float", "float32", "float64", "bfloat16"])
def test_steady_bucket_steps_equal_full_planning_under_a_scaler(lr, monkeypatch):
    """The steady step's bucket launch (scalars, step and count in one op) against a twin that plans every step in
    full: a grad scaler's grad_scale and found_inf (two skipped steps, which must not count), clipping, two groups
    and three dtype buckets, lr a float or a tensor (a bfloat16 lr is not one the scalars op takes: those launches
    take the lists, the grads read from the params). Same bits in every param, state tensor and step counter."""
    from mixprec_ops.ops import adam as ops_adam

    extension_backend(OP, "cpu")
    if not ops_adam._HAS_BUCKET:
        pytest.skip("the extension lacks mixprec::AdamBucket")
    models = [clone_setup(torch.bfloat16, "cpu", mixed=True) for _ in range(2)]
    value = {"float": 1e-2, "float32": torch.tensor(1e-2), "float64": torch.tensor(1e-2, dtype=torch.float64),
             "bfloat16": torch.tensor(1e-2, dtype=torch.bfloat16)}[lr]
    opts = [AdamW([{"params": m[0].parameters(), "weight_decay": 0.1},
                   {"params": m[2].parameters(), "betas": (0.8, 0.99)}],
                  lr=copy.deepcopy(value), max_grad_norm=0.5, backend="cpu") for m in models]  # (lr: both groups)
    monkeypatch.setattr(opts[1], "_steady_step", lambda: None)  # the twin: full planning at every step
    launches = []
    real = ops_adam._BUCKET_OP
    monkeypatch.setattr(ops_adam, "_BUCKET_OP", lambda *a: launches.append(a[2]) or real(*a))
    for step in range(7):
        for m, o in zip(models, opts):
            grads_for(m, "cpu", seed=step)
            for p in m.parameters():
                p.grad.mul_(64.0)
            o.grad_scale = torch.full((1,), 64.0)
            o.found_inf = torch.full((1,), 1.0 if step in (3, 5) else 0.0)
            o.step()
    rec = opts[0]._steady
    assert rec["used"] and all(b.bucket is not None for _, _, bs, _ in rec["per_group"] for b in bs)
    assert len([b for _, _, bs, _ in rec["per_group"] for b in bs]) >= 3
    assert (len(launches) > 0) == (lr != "bfloat16"), len(launches)  # (steps 2-6 launched through the buckets)
    pa, pb = (list(m.parameters()) for m in models)
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert_bit_exact(a.detach(), b.detach(), f"param {i}")
        sa, sb = opts[0].state[a], opts[1].state[b]
        assert set(sa) == set(sb) and sa["step"].item() == 5.0, (i, set(sa), set(sb))
        for k in sa:
            assert_bit_exact(sa[k], sb[k], f"param {i} {k}")


def test_grad_kinds_sends_every_other_grad_to_the_python_checks(monkeypatch):
    """mixprec::grad_kinds (the full planning's grad checks in one C++ sweep, Adam._collect): 0 for no grad, 1 only for
    a dense float32/float16/bfloat16 grad of the param's shape on its device (a plain tensor or nn.Parameter, fp32
    for a 16-bit param included), 2 for everything the Python checks must read: a sparse, integer, float64,
    other-shape or (with a GPU) other-device grad, a dispatch subclass (DTensor's kind) as grad or param. _collect
    gives the same groups and params with the sweep as without it, and the same errors."""
    from torch.testing._internal.two_tensor import TwoTensor

    import mixprec_ops.optim.adam as adam_mod

    if adam_mod._GRAD_KINDS is None:
        pytest.skip("the extension lacks mixprec::grad_kinds")

    def param(grad, p=None):
        p = torch.nn.Parameter(torch.randn(3, 4).to(torch.bfloat16)) if p is None else p
        if grad is not None:
            try:
                p.grad = grad
            except RuntimeError:  # (through .data: the setter refuses other dtypes, shapes, devices)
                p.grad = torch.zeros_like(p)
                p.grad.data = grad
        return p

    cases = {
        "no grad": (param(None), 0),
        "bf16": (param(torch.randn(3, 4).to(torch.bfloat16)), 1),
        "fp32 for bf16": (param(torch.randn(3, 4)), 1),
        "fp16": (param(torch.randn(3, 4).half()), 1),
        "transposed grad": (param(torch.randn(4, 3).to(torch.bfloat16).t()), 1),  # (planning copies it)
        "sparse": (param(torch.randn(3, 4).to(torch.bfloat16).to_sparse()), 2),
        "int": (param(torch.ones(3, 4, dtype=torch.int32)), 2),
        "float64": (param(torch.randn(3, 4, dtype=torch.float64)), 2),
        "fp8": (param(torch.randn(3, 4).to(torch.float8_e4m3fn)), 2),
        "complex": (param(torch.randn(3, 4, dtype=torch.complex64)), 2),
        "shape": (param(torch.randn(12).to(torch.bfloat16)), 2),
        "subclass grad": (param(TwoTensor(torch.randn(3, 4), torch.randn(3, 4)).to(torch.bfloat16)), 2),
        "subclass param": (param(torch.randn(3, 4), torch.nn.Parameter(TwoTensor(torch.randn(3, 4),
                                                                                     torch.randn(3, 4)))), 2),
    }
    if HAS_CUDA:  # (torch refuses a grad on another device than a CPU param's, even through .data, without one)
        cases["other device"] = (param(torch.randn(3, 4, device="cuda").to(torch.bfloat16)), 2)
    # (a subclass param's own dispatch would receive the op: _collect never passes one; its grad kind is 2 anyway)
    plain = [k for k in cases if k != "subclass param"]
    kinds = adam_mod._GRAD_KINDS([cases[k][0] for k in plain]).tolist()
    assert dict(zip(plain, kinds, strict=True)) == {k: cases[k][1] for k in plain}
    calls = []

    def collected(groups, sweep):
        monkeypatch.setattr(adam_mod, "_GRAD_KINDS", (lambda ps: calls.append(ps) or real(ps)) if sweep else None)
        opt = AdamW(groups, lr=1e-3)
        try:
            return [(id(g), [id(p) for p in ps]) for g, ps in opt._collect()]
        except Exception as e:  # noqa: BLE001  (the same error either way)
            return (type(e), str(e))

    real = adam_mod._GRAD_KINDS
    good = [k for k, (_, want) in cases.items() if want < 2]
    for bad in [None] + [k for k in cases if k not in good]:
        names = good + ([bad] if bad else [])
        groups = [{"params": [cases[k][0] for k in names[:3]]}, {"params": [cases[k][0] for k in names[3:]]}]
        with_sweep, without = collected(groups, True), collected(groups, False)
        assert with_sweep == without, bad
        assert (bad is None or bad in ("subclass grad", "subclass param")) == isinstance(with_sweep, list), bad
    assert calls and not any(id(cases["subclass param"][0]) in map(id, ps) for ps in calls)


def test_grad_reading_ops_from_threads():
    """The extension's ops that read params' grads (grad_kinds, param_grad_signature, adam_bucket_unchanged,
    adam_step_bucket_) take the GIL for that sweep (csrc/hold_args.h, GradReadLock: torch.ops releases it around the
    call, and Python replaces grads under it). Called from two threads at once while the main thread runs Python
    bytecode, they finish (no deadlock with torch.ops' own release and re-acquire) and give each thread its answer."""
    import threading

    from mixprec_ops import _ext

    if not all(_ext.has_kernel(op, "CompositeExplicitAutograd") for op in ("grad_kinds", "adam_bucket_unchanged")):
        pytest.skip("the extension lacks the grad-reading ops")
    n = 300
    params = [torch.zeros(2) for _ in range(n)]
    for i, p in enumerate(params):
        p.grad = torch.full((2,), float(i))
    bucket = torch.classes.mixprec.AdamBucket(params, [torch.zeros(2) for _ in params],
                                              [torch.zeros(2) for _ in params], [], [])
    results, errors = {}, []

    def run(name):
        try:
            steps = torch.zeros(n)
            for _ in range(30):
                kinds = torch.ops.mixprec.grad_kinds(params).tolist()
                grads, _ = torch.ops.mixprec.param_grad_signature(params)
                same = torch.ops.mixprec.adam_bucket_unchanged(params, bucket)
            torch.ops.mixprec.adam_step_bucket_(params[:1], torch.classes.mixprec.AdamBucket(
                params[:1], [torch.zeros(2)], [torch.zeros(2)], [], []), steps[:1], None, 0.0, 0.9, 0.999, 1e-8, 0.0,
                False, False, None, None, None, [])
            results[name] = (kinds, [g is p.grad for g, p in zip(grads, params, strict=True)], same, steps[0].item())
        except BaseException as e:  # (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    spun = 0
    while any(t.is_alive() for t in threads) and spun < 10**7:  # Python bytecode on the main thread meanwhile
        spun += 1
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a grad-reading op did not return (deadlock?)"
    assert not errors, errors
    for name in ("a", "b"):
        kinds, same_grads, same, step = results[name]
        assert kinds == [1] * n and all(same_grads) and same is True and step == 1.0, name


def test_param_grad_signature_sees_every_metadata_change():
    """mixprec::param_grad_signature (the steady step's C++ metadata sweep): the grads come back only when every
    param has one, and the signature changes with each piece of metadata the recorded launch lists rest on, including
    the changes that keep the data pointer (a reshaped or transposed view assigned to p.data). The AdamBucket's own
    check (mixprec::adam_bucket_unchanged, the same signature kept in C++) turns false on each of them."""
    import mixprec_ops.optim._steady as steady
    from mixprec_ops.ops import adam as ops_adam

    if steady._SIGNATURE is None or not ops_adam._HAS_BUCKET:
        pytest.skip("the extension lacks mixprec::param_grad_signature or the AdamBucket")

    def bucket_of(ps):
        return ops_adam.new_bucket(ps, [torch.zeros_like(p, dtype=torch.float32) for p in ps],
                                   [torch.zeros_like(p, dtype=torch.float32) for p in ps], [], [])
    from torch.testing._internal.two_tensor import TwoTensor

    def fresh():
        ps = [torch.nn.Parameter(torch.randn(3, 4).to(torch.bfloat16)), torch.nn.Parameter(torch.randn(5))]
        for p in ps:
            p.grad = torch.randn(p.shape).to(p.dtype)
        return ps

    ps = fresh()
    grads, base = steady._SIGNATURE(ps)
    assert len(grads) == 2 and all(g is p.grad for g, p in zip(grads, ps))
    grads, again = steady._SIGNATURE(ps)
    assert torch.equal(base, again)
    for p in ps:  # new grad tensors with the same metadata: the same signature
        p.grad = torch.randn(p.shape).to(p.dtype)
    assert torch.equal(steady._SIGNATURE(ps)[1], base)

    def grad_dtype(ps):  # (through .data: the grad setter refuses another dtype)
        ps[1].grad.data = ps[1].grad.data.half()

    w, b = 0, 1
    edits = {
        "param reshaped, same pointer": lambda ps: setattr(ps[w], "data", ps[w].data.view(2, 6)),
        "param transposed, same pointer": lambda ps: setattr(ps[w], "data", ps[w].data.t()),
        "param dtype": lambda ps: setattr(ps[b], "data", ps[b].data.to(torch.bfloat16)),
        "param storage": lambda ps: setattr(ps[b], "data", ps[b].data.clone()),
        "grad dtype": grad_dtype,
        "grad shape": lambda ps: setattr(ps[b].grad, "data", torch.randn(6)),
        "grad strided": lambda ps: setattr(ps[w], "grad", ps[w].grad.t().contiguous().t()),
        "grad sparse": lambda ps: setattr(ps[b], "grad", ps[b].grad.to_sparse()),
        "grad a dispatch subclass": lambda ps: setattr(ps[b], "grad", TwoTensor(ps[b].grad, ps[b].grad.clone())),
    }
    for name, edit in edits.items():
        ps = fresh()
        _, before = steady._SIGNATURE(ps)
        bucket = bucket_of(ps)
        assert ops_adam.bucket_unchanged(ps, bucket), name
        edit(ps)
        grads, after = steady._SIGNATURE(ps)
        assert not torch.equal(after, before), name
        assert not ops_adam.bucket_unchanged(ps, bucket), name
    ps = fresh()
    bucket = bucket_of(ps)
    ps[b].grad = None
    grads, after = steady._SIGNATURE(ps)
    assert grads == [] and not torch.equal(after, base)
    assert not ops_adam.bucket_unchanged(ps, bucket)
    with pytest.raises(RuntimeError, match="every param must have a grad"):
        bucket_of(ps)
    ps = fresh()
    assert not ops_adam.bucket_unchanged(ps[:1], bucket_of(ps))  # fewer params


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_steady_record_goes_with_the_plans(backend):
    """More than 64 params leaving the groups clears the per-param plans; the steady record rests on them and must go
    too. It used to keep serving, and the write to an fp16 param two steps later was then resynced as if its master
    had just been loaded (the rounding through bf16 counted as unwritten): the clamp was undone. The same run planned
    in full at every step is the reference."""
    if backend == "cpu":
        extension_backend(OP, "cpu")

    def run(steady):
        w = torch.nn.Parameter(torch.tensor([1.001, 1.002, 0.5, 1.0009765625], dtype=torch.float16))
        extra = [torch.nn.Parameter(torch.zeros(2)) for _ in range(70)]
        opt = AdamW([{"params": [w]}, {"params": extra}], lr=0.0, weight_decay=0.0, backend=backend)
        if not steady:
            opt._steady_step = lambda: None
        for s in range(6):
            w.grad = torch.full_like(w, 0.1)
            for e in extra:
                e.grad = torch.ones_like(e)
            if s == 2:
                opt.param_groups.pop()
                for e in extra:
                    del opt.state[e]
            if s == 4:
                with torch.no_grad():
                    w.clamp_(max=1.0)
            opt.step()
        return w.detach(), opt.state[w]["master_param"]

    (w, master), (w_ref, master_ref) = run(True), run(False)
    assert w_ref.tolist() == [1.0, 1.0, 0.5, 1.0]  # the write kept
    assert_bit_exact(w, w_ref, "param")
    assert_bit_exact(master, master_ref, "master")


def test_steady_record_keeps_no_dropped_param_alive():
    """The steady record holds what the plans hold and nothing more: a frozen param (no grad, no state, no plan)
    dropped from the optimizer is freed at once, as with torch.optim.AdamW, not at the next step."""
    import gc
    import weakref

    w = torch.nn.Parameter(torch.randn(8, 8).to(torch.bfloat16))
    frozen = torch.nn.Parameter(torch.randn(100, 16).to(torch.bfloat16), requires_grad=False)
    opt = AdamW([{"params": [w]}, {"params": [frozen]}], lr=1e-3)
    for _ in range(3):
        w.grad = torch.ones_like(w)
        opt.step()
    assert opt._steady is not None
    ref = weakref.ref(frozen)
    opt.param_groups.pop()
    del frozen
    gc.collect()
    assert ref() is None, "the dropped frozen param is still alive"
    w.grad = torch.ones_like(w)
    opt.step()  # and the optimizer goes on


@pytest.mark.parametrize("device", DEVICES)
def test_adam_bucket_steps_its_own_lists(device):
    """ops.adam.adam_step_bucket_ (the optimizer's steady step): the state lists held on the C++ side give the bits of
    adam_scalars + adam_step_ + the counters' add_ with the lists (grads read from the params; lr a float, a float32
    or a float64 tensor; clipping, grad scale and a found_inf that skips: then the counters do not move either); the
    bucket's own state tensors are what it steps, with the params' grads or the grads given (a bucket made from no
    params); the counters' version moves once a call; a refused call (grad mode
    with params that require grad, a param without a grad, a bad found_inf, counters of the wrong shape) leaves the
    counters as they were, and the params and the bucket's states too, values and versions: counters that share
    memory (expanded, overlapping) or carry the negative bit, and a negative-bit param, are refused before the step
    (the count at its end refused them after it, with everything stepped, found by a fuzz run). bucket_unchanged: true
    for new grads of the same kind, false when a grad is gone."""
    from mixprec_ops.ops import adam as ops_adam

    backend = extension_backend(OP, device)
    if not ops_adam._HAS_BUCKET:
        pytest.skip("the extension lacks mixprec::AdamBucket")
    gen = torch.Generator().manual_seed(5)

    def tensors():
        g = torch.Generator().manual_seed(5)
        shapes = [(7, 3), (129,), (1,), (4, 33)]
        ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, torch.bfloat16)) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(device, torch.bfloat16)
        ms = [torch.randn(s, generator=g).to(device) * 0.1 for s in shapes]
        vs = [torch.rand(s, generator=g).to(device) * 0.01 for s in shapes]
        return ps, ms, vs, [p.detach().float() + 1e-3 for p in ps]

    a, b = tensors(), tensors()
    bucket = ops_adam.new_bucket(a[0], a[1], a[2], [], a[3])
    assert ops_adam.bucket_unchanged(a[0], bucket)
    steps_a = torch.rand(4, generator=gen).mul(10).floor().to(device)
    steps_b, start = steps_a.clone(), steps_a.clone()
    hp = (0.9, 0.999, 1e-8, 0.1, True, False)

    def by_lists(lr, grad_scale=None, found_inf=None, clip=None, grads=None):
        scalars = ops_adam.adam_scalars(steps_b, lr, 0.9, 0.999, 0.1, backend=backend)
        ops_adam.adam_step_(b[0], [p.grad for p in b[0]] if grads is None else grads, b[1], b[2], [], b[3], scalars,
                            *hp, grad_scale, found_inf, clip, backend=backend)
        steps_b.add_(1.0 if found_inf is None else (found_inf.reshape(()) == 0).float())

    def compare(what):
        for x, y in zip(a, b):
            for i, (s, t) in enumerate(zip(x, y)):
                assert_bit_exact(s.detach(), t.detach(), f"{what}: tensor {i}")
        assert_bit_exact(steps_a, steps_b, f"{what}: counters")

    lrs = [1e-2, torch.tensor(3e-3, device=device), torch.tensor([2e-3], device=device, dtype=torch.float64)]
    extras = [(), (torch.tensor([4.0], device=device), torch.zeros(1, device=device),
                   torch.tensor([0.5], device=device)), (None, torch.ones(1, device=device), None)]
    with torch.no_grad():
        for lr in lrs:
            for extra in extras:
                version = steps_a._version
                ops_adam.adam_step_bucket_(a[0], bucket, steps_a, lr, *hp, *extra)
                assert steps_a._version == version + 1
                by_lists(lr, *extra)
                compare(f"lr {lr!r}, {len(extra)} extras")
    counted_steps = 6  # (3 skipped)
    if ops_adam.BUCKET_TAKES_GRADS:
        # the grads given (a DTensor param's local shard has no .grad to read): a bucket made from no params over the
        # same state lists, and grads that are not the params' own
        given = [torch.randn(p.shape, generator=gen).to(device, torch.bfloat16) for p in a[0]]
        no_params = ops_adam.new_bucket([], a[1], a[2], [], a[3])
        with torch.no_grad():
            ops_adam.adam_step_bucket_(a[0], no_params, steps_a, 1e-2, *hp, grads=given)
            by_lists(1e-2, grads=[g.clone() for g in given])
        compare("the grads given")
        counted_steps += 1
    assert_bit_exact(steps_a, start + counted_steps, "the counters")
    other = tensors()
    before = [[t.detach().clone() for t in lst] for lst in other[1:]]
    with torch.no_grad():
        ops_adam.adam_step_bucket_(a[0], bucket, steps_a, 1e-2, *hp)
    assert not all(torch.equal(s, t) for s, t in zip(b[1], a[1])), "the bucket's exp_avgs not stepped"
    for lst0, lst1 in zip(before, other[1:]):  # lists made beside the bucket: untouched
        for s, t in zip(lst0, lst1):
            assert_bit_exact(t, s, "a state list beside the bucket")
    counted, version = steps_a.clone(), steps_a._version

    def refused(match, *args, grad_mode=False):
        if ops_adam.BUCKET_TAKES_GRADS and len(args) == 14:
            args = (*args, [])  # (grads: none given, the params' own are read)
        held = [t.detach() for lst in a for t in lst]  # the params and the bucket's own states (and masters)
        snap, versions = [t.clone() for t in held], [t._version for t in held]
        steps = args[2]
        steps_snap, steps_version = steps.resolve_neg().clone(), steps._version
        with torch.set_grad_enabled(grad_mode), pytest.raises((RuntimeError, ValueError), match=match):
            torch.ops.mixprec.adam_step_bucket_(*args)
        assert_bit_exact(steps_a, counted, "the counters after a refused call")
        assert steps_a._version == version
        assert_bit_exact(steps.resolve_neg(), steps_snap, "the given counters after a refused call")
        assert steps._version == steps_version
        assert_lists_bit_exact(held, snap, "the params and states after a refused call")
        assert [t._version for t in held] == versions

    refused("requires grad", a[0], bucket, steps_a, None, 1e-2, *hp, None, None, None, grad_mode=True)
    refused("found_inf", a[0], bucket, steps_a, None, 1e-2, *hp, None, torch.zeros(2, device=device), None)
    refused("steps must be a 1-D tensor of one counter a param", a[0], bucket, steps_a[:3], None, 1e-2, *hp, None,
            None, None)
    refused("lr must be a float32 or float64 tensor", a[0], bucket, steps_a, torch.tensor(1e-2, device=device,
            dtype=torch.bfloat16), 0.0, *hp, None, None, None)  # (adam_scalars' own check)
    if ops_adam.BUCKET_TAKES_GRADS:
        refused("grads must be empty", a[0], bucket, steps_a, None, 1e-2, *hp, None, None, None,
                [p.grad for p in a[0][:3]])
        refused(r"grads\[0\] must have params\[0\]'s shape", a[0], bucket, steps_a, None, 1e-2, *hp, None, None,
                None, [p.grad.reshape(-1) for p in a[0]])  # (the same elements, another shape)
        refused("grads must have the params' dtype", a[0], bucket, steps_a, None, 1e-2, *hp, None, None, None,
                [p.grad.half() for p in a[0]])  # (adam_step_'s own checks, before anything is written)
    refused("steps must be contiguous", a[0], bucket, steps_a[:1].expand(4), None, 1e-2, *hp, None, None, None)
    refused("steps must be contiguous", a[0], bucket, steps_a.repeat(2)[::2], None, 1e-2, *hp, None, None, None)
    refused("steps must not be a negative-bit view", a[0], bucket, torch._neg_view(steps_a.clone()), None, 1e-2, *hp,
            None, None, None)
    neg = torch._neg_view(a[0][1].detach())
    neg.grad = a[0][1].grad.clone()
    refused(r"params\[1\] must not be a negative-bit view", [a[0][0], neg, *a[0][2:]], bucket, steps_a, None, 1e-2,
            *hp, None, None, None)
    for p in a[0]:  # new grads of the same kind: the same signature
        p.grad = torch.randn_like(p)
    assert ops_adam.bucket_unchanged(a[0], bucket)
    a[0][2].grad = None
    assert not ops_adam.bucket_unchanged(a[0], bucket)
    refused(r"params\[2\] has no grad", a[0], bucket, steps_a, None, 1e-2, *hp, None, None, None)


@pytest.mark.parametrize("found_inf", [False, True])
def test_steady_step_is_two_op_calls_a_bucket(found_inf):
    """In plain eager execution a steady step calls two ops a bucket from Python: the bucket's metadata check and its
    launch, which runs the scalars, the step and the counters' add (+ (found_inf == 0) under a scaler) inside
    (bench/NOTES.md, "Twenty-first session"). torch's profiler sees every op the dispatcher runs, nested ones too,
    without a dispatch mode (which would turn the bucket off). Two buckets here: bf16 params with masters, fp32."""
    from mixprec_ops.ops import adam as ops_adam

    extension_backend(OP, "cpu")
    if not ops_adam._HAS_BUCKET:
        pytest.skip("the extension lacks mixprec::AdamBucket")
    ps = [torch.nn.Parameter(torch.randn(5, 3).to(dt)) for dt in (torch.bfloat16, torch.float32) for _ in range(3)]
    opt = AdamW(ps, lr=1e-3, backend="cpu")
    extra = {"found_inf": torch.zeros(1)} if found_inf else {}

    def grads():
        for p in ps:
            p.grad = torch.randn_like(p)
        for k, v in extra.items():  # (as torch.amp.GradScaler.step hands them over)
            setattr(opt, k, v)

    for _ in range(3):  # recorded, first used (the buckets made), then the buckets serve
        grads()
        opt.step()
    grads()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    events = [e for e in prof.events() if "::" in e.name]
    top = [e.name for e in events if e.cpu_parent is None or "::" not in e.cpu_parent.name]
    assert top == ["mixprec::adam_bucket_unchanged"] * 2 + ["mixprec::adam_step_bucket_"] * 2, top
    for launch in (e for e in events if e.name == "mixprec::adam_step_bucket_"):
        inside = {e.name for e in events if e.cpu_parent is launch}
        # (adam_step_'s kernels, registered unboxed for C++ callers as _adam_step_unboxed_: csrc/schemas.cpp)
        assert {"mixprec::adam_scalars", "mixprec::_adam_step_unboxed_", "aten::add_"} <= inside, inside
        assert ("aten::eq" in inside) == found_inf, inside


def test_steady_bucket_call_skips_the_packets_argument_walk(monkeypatch):
    """The steady step's bucket op is called past its torch.ops packet: the packet of an op taking a script object
    first walks every argument, list items included, for a FakeScriptObject (0.5-1 ms a step at 2,000 params on the
    CI CPU, bench/NOTES.md). Counts that walk during steady steps that use the bucket: none. (Calling the packet
    fails here: its walk runs once a step.)"""
    import torch._ops as torch_ops

    from mixprec_ops.ops import adam as ops_adam

    extension_backend(OP, "cpu")
    if not ops_adam._HAS_BUCKET:
        pytest.skip("the extension lacks mixprec::AdamBucket")
    if not hasattr(torch_ops, "_must_dispatch_in_python"):
        pytest.skip("this torch's packets do not walk their arguments")
    ps = [torch.nn.Parameter(torch.randn(6).to(torch.bfloat16)) for _ in range(5)]
    walks = []  # walks over our params (torch's record_function, around every optimizer step, walks its own args)
    real = torch_ops._must_dispatch_in_python

    def counted(args, kwargs):
        walks.extend(a for a in args if isinstance(a, list) and any(x is ps[0] for x in a))
        return real(args, kwargs)

    monkeypatch.setattr(torch_ops, "_must_dispatch_in_python", counted)
    opt = AdamW(ps, lr=1e-3, backend="cpu")
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn(6).to(torch.bfloat16)
        opt.step()
    buckets = [b.bucket for _, _, bs, _ in opt._steady["per_group"] for b in bs]
    assert buckets and all(b is not None for b in buckets)  # the steps took the bucket
    assert walks == []


def test_steady_bucket_call_skips_the_torch_function_lookups(monkeypatch):
    """The bucket's ops (its check and its launch) are called with the subclasses' torch function handling off:
    otherwise torch looks up
    __torch_function__ on the bucket (a torch.ScriptObject), where the failed lookup throws a C++ exception and formats
    a Python AttributeError, ~15 us a call (bench/NOTES.md, "A failed attribute lookup a step"). Params of a subclass
    with a __torch_function__ of its own therefore get no bucket: their steady steps take the lists' op, which their
    __torch_function__ sees, and they step bit for bit as plain params do."""
    from mixprec_ops.ops import adam as ops_adam

    extension_backend(OP, "cpu")
    if not ops_adam._HAS_BUCKET:
        pytest.skip("the extension lacks mixprec::AdamBucket")
    seen = []

    class Logged(torch.nn.Parameter):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    enabled = {}  # torch function handling at each call of the bucket's two ops
    for name in ("_BUCKET_OP", "_UNCHANGED_OP"):
        def logged(*a, real=getattr(ops_adam, name), name=name):
            enabled.setdefault(name, []).append(torch._C._is_torch_function_enabled())
            return real(*a)

        monkeypatch.setattr(ops_adam, name, logged)
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=g).to(torch.bfloat16) for n in (6, 11)]
    grads = [[torch.randn(t.shape, generator=g).to(torch.bfloat16) for t in init] for _ in range(4)]
    runs = {}
    for kind in ("plain", "logged"):
        ps = [torch.nn.Parameter(t.clone()) if kind == "plain" else Logged(t.clone()) for t in init]
        opt = AdamW(ps, lr=1e-2, backend="cpu")
        for i, gs in enumerate(grads):
            for p, gr in zip(ps, gs, strict=True):
                p.grad = gr.clone()
            if i == len(grads) - 1:
                seen.clear()
            opt.step()
        buckets = [b for _, _, bs, _ in opt._steady["per_group"] for b in bs]
        assert buckets and opt._steady["used"]  # the last steps came from the record
        runs[kind] = (ps, opt, [b.bucket for b in buckets])
    plain_buckets, logged_buckets = runs["plain"][2], runs["logged"][2]
    assert all(b is not None for b in plain_buckets) and all(b is None for b in logged_buckets)
    # the plain params' steps: the bucket's check and launch, handling off
    assert set(enabled) == {"_BUCKET_OP", "_UNCHANGED_OP"} and not any(sum(enabled.values(), [])), enabled
    assert any("adam_step_" in f for f in seen), seen  # the subclass saw its step op (the last, steady step)
    for (p, q) in zip(runs["plain"][0], runs["logged"][0], strict=True):
        assert_bit_exact(q.detach(), p.detach(), "param")
        for k, v in runs["plain"][1].state[p].items():
            assert_bit_exact(runs["logged"][1].state[q][k], v, k)
    # A plain param made a subclass after the record (same id, data and version): its steps are seen from the next
    ps, opt, _ = runs["plain"]
    ps[0].__class__ = Logged
    for _ in range(2):
        seen.clear()
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        opt.step()
        assert any("adam_step_" in f for f in seen), seen


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_steady_steps_read_versions_before_and_after_each_launch(backend, monkeypatch):
    """A steady step checks the params' version counters before its launch, and reads them again after it (what
    the launch left is what the next step compares with: every backend's launch moves them, as torch's in-place ops
    do)."""
    import mixprec_ops.optim._steady as steady

    if backend == "cpu":
        extension_backend(OP, "cpu")
    reads = []
    monkeypatch.setattr(steady, "_version", lambda t: reads.append(t) or t._version)
    ps = [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in (5, 9, 3)]
    opt = AdamW(ps, lr=1e-3, backend=backend)
    per_step = []
    for _ in range(5):
        for p in ps:
            p.grad = torch.randn_like(p)
        reads.clear()
        opt.step()
        per_step.append(len(reads))
    # step 0 plans in full (no sweep); then each step checks before and reads after
    assert per_step == [0, 6, 6, 6, 6], per_step
    # a write between steps is seen: the master takes it (lr 0: the step then writes the param back from its master
    # unchanged, so a master that missed the write would undo it)
    ps[1].detach().mul_(2.0)
    written = ps[1].detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(ps[1].detach(), written)
    assert torch.equal(opt.state[ps[1]]["master_param"].to(torch.bfloat16), written)


def test_steady_records_back_off_while_unused(monkeypatch):
    """A record that no step uses (the params with grads differ every step, as with experts a router skipped) costs
    about a third of a full planning: the next records wait 1, 2, 4, ... fully planned steps, and once the grads
    settle the record serves again."""
    ps = [torch.nn.Parameter(torch.randn(5).to(torch.bfloat16)) for _ in range(4)]
    opt = AdamW(ps, lr=1e-3, backend="torch")
    made = []
    real = opt._remember_steady
    monkeypatch.setattr(opt, "_remember_steady", lambda planned: (real(planned), made.append(opt._steady is not None)))
    for step in range(40):  # one of the four params without a grad, a different one every step
        for i, p in enumerate(ps):
            p.grad = None if i == step % 4 else torch.randn(5).to(torch.bfloat16)
        opt.step()
    assert len(made) == 40 and sum(made) <= 7, made  # recorded at steps 0, 2, 5, 10, 19, 36 (waits 1, 2, 4, 8, 16)
    used = []
    real_step = opt._steady_step
    monkeypatch.setattr(opt, "_steady_step", lambda: used.append(real_step()) or used[-1])
    for _ in range(70):  # settled: every param has a grad
        for p in ps:
            p.grad = torch.randn(5).to(torch.bfloat16)
        opt.step()
    # served again after at most the last wait (16) and one step to record
    assert all(u is not None for u in used[18:]), [u is not None for u in used]


def test_steady_record_survives_a_step_without_grads():
    """A step with no grads at all (step(); zero_grad(); step(), as in some accumulation loops) keeps the record for
    the next step with grads; it used to drop it, and the back-off then kept the loop on the full planning."""
    ps = [torch.nn.Parameter(torch.randn(5).to(torch.bfloat16)) for _ in range(3)]
    opt = AdamW(ps, lr=1e-3, backend="torch")
    used = []
    real = opt._steady_step
    opt._steady_step = lambda: used.append(real()) or used[-1]
    for _ in range(6):
        for p in ps:
            p.grad = torch.randn(5).to(torch.bfloat16)
        opt.step()
        opt.zero_grad()
        opt.step()
    assert [u is not None for u in used[::2]] == [False] + [True] * 5, [u is not None for u in used]


def test_steady_record_lets_params_be_swapped_and_collected():
    """The record holds no C++ reference to a param: torch.utils.swap_tensors (module conversions under
    torch.__future__.set_swap_module_params_on_conversion, load_state_dict(assign=...)) wants the param's only
    reference, and Python's garbage collector skips a tensor referenced from C++, so a cycle through a param (here
    p.owner = opt) would never be freed."""
    import gc
    import weakref

    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    opt = AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt._steady is not None
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float16)  # swaps each param's contents (refused while anything else references them)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    assert model.weight.dtype == torch.float16

    p = torch.nn.Parameter(torch.randn(1000).to(torch.bfloat16))
    opt = AdamW([p], lr=1e-3)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert opt._steady is not None
    p.owner = opt  # a cycle: opt -> its state and record -> p -> opt
    refs = [weakref.ref(p), weakref.ref(opt)]
    del p, opt
    gc.collect()
    assert all(r() is None for r in refs), "the cycle through the param was not collected"


def test_steady_steps_release_the_params_they_pass():
    """The steady step passes its params to C++ ops (mixprec::param_grad_signature at the record's first use, then
    mixprec::adam_bucket_unchanged; mixprec::adam_step_bucket_), which hold them through the call and drop them after
    taking the GIL, once (csrc/hold_args.h). Params whose only owner is Python keep their refcounts step after step (a
    reference kept would leak them and block torch.utils.swap_tensors; one dropped twice would free a live param),
    from the main thread and another."""
    import sys
    import threading

    ps = [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in (3, 64, 1000) * 10]
    opt = AdamW(ps, lr=0.1)  # (steps that move every bf16 param)

    def steps(k):
        for _ in range(k):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()

    steps(3)
    assert opt._steady is not None and opt._steady["used"]
    before = [sys.getrefcount(p) for p in ps]
    w = [p.detach().clone() for p in ps]
    steps(2)
    errors = []

    def in_thread():
        try:
            steps(2)
        except Exception as e:  # (a thread's exception would only be printed)
            errors.append(e)

    th = threading.Thread(target=in_thread)
    th.start()
    th.join()
    assert not errors and opt._steady["used"]
    assert [sys.getrefcount(p) for p in ps] == before
    assert all(not torch.equal(p, v) for p, v in zip(ps, w, strict=True))  # (the steps ran)


@pytest.mark.parametrize("device,backend", backend_params(OP) + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_step_between_forward_and_backward_raises(device, backend):
    """As with torch.optim (checked first, the same setup): a step that writes a param autograd saved for backward
    makes that backward raise "modified by an inplace operation", not compute grads from the stepped weights.
    Every backend moves the versions of what it writes (the C++ / CUDA kernels: csrc/common.h VersionBump), the
    steady-state steps too (the bucket op: the later steps here)."""

    def steps(make_opt):
        torch.manual_seed(3)
        lin = torch.nn.Linear(8, 4, device=device).to(torch.bfloat16)
        opt = make_opt(lin.parameters())
        x = torch.randn(3, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(4):
            y = lin(x).float().square().sum()
            for p in lin.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.backward()
        return opt

    steps(lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    opt = steps(lambda ps: AdamW(ps, lr=1e-3, backend=backend))
    if backend != "torch":  # (the reference's steps are planned in full)
        assert opt._steady is not None and opt._steady["used"], "no steady step ran"
