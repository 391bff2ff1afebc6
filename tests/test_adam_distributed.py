"""mixprec_ops.optim.AdamW under DDP, FSDP2 (fully_shard) and ZeroRedundancyOptimizer, against torch.optim.AdamW.

Every scenario runs in 2 ranks spawned with torch.multiprocessing (gloo, CPU, tcp://127.0.0.1:<free port>). Each rank
trains a small MLP on its own half of every global batch, once with our AdamW and once with torch.optim.AdamW under
the same wrapper (fresh model, same seeds, same data), and saves what the test checks (full params, optimizer state
facts, losses) to a file under pytest's tmp dir; the test process compares. Spawning costs a few seconds per
scenario, so each scenario is spawned once per module (cached) and several tests read its results.

The workers use backend="cpu" (the C++ kernels) when they can serve adam_step_ and unscale_ (the clipping norm), else
"torch" (the reference); never the Triton interpreter (too slow here).

Tolerances: in fp32 mode our step differs from torch's only in rounding order (see tests/test_adam.py), and the
wrappers feed both optimizers bit-identical grads at step 1 (same params, same data, same collectives), so the final
full params must agree to 1e-6 relative, as in the single-process tests. The bf16 tolerance is justified where used.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mixprec_ops.optim  # noqa: F401  (registers adam_step_ with mixprec_ops.backends)
from mixprec_ops import backends
from mixprec_ops.optim import AdamW

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch is built without torch.distributed / gloo", allow_module_level=True)

pytestmark = pytest.mark.slow  # about 25-40 s on 2 cores: 7 spawned 2-rank scenarios

WORLD = 2
STEPS = 6
LOCAL_BATCH = 16
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
MAX_NORM = 0.05  # below the grad norms of this model and data (asserted), so clipping really happens
SPAWN_TIMEOUT_S = 120  # per scenario; a scenario takes about 10 s on 2 cores
COLLECTIVE_TIMEOUT_S = 60


def _pick_backend() -> str:
    cpu = torch.device("cpu")
    ok = all(backends.unavailable_reason(op, "cpu", cpu) is None for op in ("adam_step_", "unscale_"))
    return "cpu" if ok else "torch"


BACKEND = _pick_backend()


# ------------------------------------------------------------------------------------------------ model and data
def make_mlp(dtype=torch.float32) -> nn.Sequential:
    """The same init on every rank (FSDP2 shards what each rank built; it does not broadcast). The last layer has
    one output: under FSDP2 rank 1 holds empty (0-row) shards of its weight and bias."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(17, 33), nn.Tanh(), nn.Linear(33, 9), nn.Tanh(), nn.Linear(9, 1)).to(dtype)


def global_batches(dtype=torch.float32):
    """STEPS global batches of WORLD * LOCAL_BATCH rows; rank r trains on the r-th LOCAL_BATCH rows of each."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(17, 1, generator=g)
    out = []
    for _ in range(STEPS):
        x = torch.randn(WORLD * LOCAL_BATCH, 17, generator=g)
        out.append((x.to(dtype), (x @ w).sin().to(dtype)))
    return out


def local_batches(rank, dtype=torch.float32):
    sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return [(x[sl], y[sl]) for x, y in global_batches(dtype)]


def loss_fn(model, x, y):
    return nn.functional.mse_loss(model(x).float(), y.float())


def train(model, opt, batches, clip_params=None, grad_norms=None):
    """STEPS steps; clip_params: clip with torch.nn.utils.clip_grad_norm_ (the reference for our max_grad_norm)."""
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        loss.backward()
        if clip_params is not None:
            norm = torch.nn.utils.clip_grad_norm_(clip_params, MAX_NORM)
            if grad_norms is not None:
                grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        opt.step()
        if grad_norms is not None and clip_params is None:
            inner = getattr(opt, "optim", opt)  # ZeRO wraps the local optimizer
            grad_norms.append(float(inner.grad_norm))
        losses.append(loss.item())
    return losses


def full_params(model):
    """name -> full (unsharded) param on every rank; DTensors are gathered."""
    out = {}
    for n, p in model.named_parameters():
        p = p.detach()
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
    return out


def ours(params, backend, **kw):
    return AdamW(params, **{**HP, **kw}, backend=backend)


def theirs(params, **kw):
    return torch.optim.AdamW(params, **{**HP, **kw})


# --------------------------------------------------------------------------------------------------- scenarios
# Each returns a picklable dict (tensors allowed); every rank saves its own. out_dir: for checkpoints.
def scenario_ddp(rank, backend, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    configs = {
        "plain": (dict(), dict(), {}),
        "amsgrad_clip": (dict(amsgrad=True, max_grad_norm=MAX_NORM), dict(amsgrad=True), {}),
        "bucket_view": (dict(), dict(), dict(gradient_as_bucket_view=True)),  # grads are views into DDP's buckets
    }
    for name, (kw_ours, kw_torch, ddp_kw) in configs.items():
        clip = "max_grad_norm" in kw_ours
        res = {}
        for impl in ("ours", "torch"):
            model = make_mlp()
            ddp = DDP(model, **ddp_kw)
            opt = ours(ddp.parameters(), backend, **kw_ours) if impl == "ours" else theirs(ddp.parameters(), **kw_torch)
            norms = [] if clip else None
            losses = train(ddp, opt, local_batches(rank), clip_params=list(ddp.parameters()) if clip and impl == "torch"
                           else None, grad_norms=norms)
            res[impl] = dict(params=full_params(model), losses=losses, grad_norms=norms,
                             steps=[float(opt.state[p]["step"]) for p in model.parameters()])
        out[name] = res
    return out


def _state_facts(opt, model):
    """For each param: how its optimizer state is stored (the test asserts DTensor states shaped like the shard)."""
    from torch.distributed.tensor import DTensor

    facts = {}
    for n, p in model.named_parameters():
        st = opt.state[p]
        f = {"param_local_shape": tuple(p.to_local().shape), "param_placements": str(p.placements)}
        for k, v in st.items():
            if isinstance(v, DTensor):
                f[k] = dict(kind="DTensor", shape=tuple(v.shape), local_shape=tuple(v.to_local().shape),
                            placements=str(v.placements), same_mesh=v.device_mesh == p.device_mesh, dtype=v.dtype,
                            full=v.full_tensor().clone())
            else:
                f[k] = dict(kind=type(v).__name__, shape=tuple(v.shape), dtype=v.dtype, value=v.clone())
        facts[n] = f
    return facts


def _fsdp_model(mesh, dtype=torch.float32, mp_policy=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    model = make_mlp(dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def scenario_fsdp2(rank, backend, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh("cpu", (WORLD,))
    # mixed_precision: FSDP2's own mixed precision (fp32 sharded params, bf16 compute, fp32 grad reduction): the
    # optimizer sees fp32 DTensor params and grads, so it runs in fp32 mode, without masters
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = {}
    # float64_clip: a float64 model (its local shards stepped by torch's fused AdamW inside ours, their squares summed
    # apart from the fp32 pass's, over the mesh)
    for name, clip, policy, dtype in (("plain", False, None, torch.float32), ("clip", True, None, torch.float32),
                                      ("mixed_precision", False, mixed, torch.float32),
                                      ("float64_clip", True, None, torch.float64)):
        res = {}
        for impl in ("ours", "torch"):
            model = _fsdp_model(mesh, dtype, mp_policy=policy)
            kw = dict(max_grad_norm=MAX_NORM) if clip and impl == "ours" else {}
            opt = ours(model.parameters(), backend, **kw) if impl == "ours" else theirs(model.parameters())
            norms = [] if clip else None
            losses = train(model, opt, local_batches(rank, dtype), clip_params=list(model.parameters())
                           if clip and impl == "torch" else None, grad_norms=norms)
            res[impl] = dict(params=full_params(model), losses=losses, grad_norms=norms,
                             state=_state_facts(opt, model))
        out[name] = res
    return out


def scenario_zero(rank, backend, out_dir):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name, clip in (("plain", False), ("clip", True)):
        res = {}
        for impl in ("ours", "torch"):
            model = make_mlp()
            ddp = DDP(model)
            names = {p: n for n, p in model.named_parameters()}
            if impl == "ours":
                kw = dict(max_grad_norm=MAX_NORM, norm_across_ranks=True) if clip else {}
                opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=AdamW, **HP, **kw, backend=backend)
            else:
                opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.AdamW, **HP)
            norms = [] if clip else None
            losses = train(ddp, opt, local_batches(rank), clip_params=list(ddp.parameters()) if clip and impl == "torch"
                           else None, grad_norms=norms)
            local = opt.optim  # the rank's optimizer over its partition of the params
            r = dict(params=full_params(model), losses=losses, grad_norms=norms, local_class=type(local).__name__,
                     local_params=sorted(names[p] for g in local.param_groups for p in g["params"]),
                     local_states=sorted(names[p] for p in local.state))
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                sd = opt.state_dict()
                r["consolidated"] = dict(
                    n_states=len(sd["state"]),
                    steps=sorted(float(s["step"]) for s in sd["state"].values()),
                    group_keys=sorted(sd["param_groups"][0]),
                )
            res[impl] = r
        out[name] = res
    # A rank whose share of the params has no grads this step must still take part in the norm's all_reduce (or
    # the other rank waits forever): rank 1 drops the grads of its partition; both ranks must see rank 0's norm.
    model = make_mlp()
    ddp = DDP(model)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=AdamW, **HP, max_grad_norm=MAX_NORM,
                                  norm_across_ranks=True, backend=backend)
    x, y = local_batches(rank)[0]
    loss_fn(ddp, x, y).backward()
    local = [p for g in opt.optim.param_groups for p in g["params"]]
    if rank == 1:
        for p in local:
            p.grad = None
        opt.optim.found_inf = 0  # what torch.amp.GradScaler.step() sets when the optimizer has no grads: sum([])
    own = torch.stack([p.grad.double().square().sum() for p in local]).sum().sqrt().item() if rank == 0 else None
    opt.step()
    out["empty_rank"] = dict(norm=float(opt.optim.grad_norm), own=own, n_local=len(local))
    return out


def _count_steady(opt):
    """A list that records, at each step of opt, whether it was a steady-state step (optim/_steady.py)."""
    used, real = [], opt._steady_step
    opt._steady_step = lambda: (rec := real(), used.append(rec is not None))[0]
    return used


def _full_masters(opt, model):
    out = {}
    for n, p in model.named_parameters():
        m = opt.state[p]["master_param"]
        out[n] = (m.full_tensor() if hasattr(m, "full_tensor") else m).clone()
    return out


def scenario_bf16(rank, backend, out_dir, wrapper):
    """bf16 params with fp32 masters (master_weights="auto"), our AdamW, under DDP or FSDP2."""
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = make_mlp(torch.bfloat16)
        trained = DDP(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        model = trained = _fsdp_model(mesh, torch.bfloat16)
    opt = ours(trained.parameters(), backend, master_weights="auto")
    batches = local_batches(rank, torch.bfloat16)
    losses = train(trained, opt, batches)
    master_kinds, rne = {}, {}
    for n, p in model.named_parameters():
        m = opt.state[p]["master_param"]
        master_kinds[n] = (type(m).__name__, m.dtype, str(getattr(m, "placements", None)))
        loc_p = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
        loc_m = m.to_local() if hasattr(m, "to_local") else m
        rne[n] = torch.equal(loc_p.view(torch.int16), loc_m.to(torch.bfloat16).view(torch.int16))
    out = dict(params=full_params(model), masters=_full_masters(opt, model), master_kinds=master_kinds,
               param_is_rne_of_master=rne, losses=losses)
    if wrapper == "fsdp2":
        out["resume"] = {how: _fsdp2_resume(mesh, backend, batches, os.path.join(out_dir, f"ckpt_{how}"), how)
                         for how in ("dcp_sharded", "full_state_dict")}
    return out


def _fsdp2_resume(mesh, backend, batches, ckpt_dir, how):
    """Train half the steps, checkpoint model and optimizer with torch.distributed.checkpoint's state_dict API, load
    into a fresh model and optimizer, train the other half. how: "dcp_sharded" (the default options: DTensor
    shards, saved with dcp.save and read back with dcp.load) or "full_state_dict" (gathered full tensors, loaded with
    full_state_dict=True). Returns the final full params and masters, or the error (raised alike on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    half = len(batches) // 2
    try:
        model = _fsdp_model(mesh, torch.bfloat16)
        opt = ours(model.parameters(), backend, master_weights="auto")
        train(model, opt, batches[:half])
        fresh = _fsdp_model(mesh, torch.bfloat16)
        fresh_opt = ours(fresh.parameters(), backend, master_weights="auto")
        if how == "dcp_sharded":
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
            msd, osd = get_state_dict(fresh, fresh_opt)  # the fresh objects' layout, filled in place by dcp.load
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=ckpt_dir)
            set_state_dict(fresh, fresh_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:
            opts = StateDictOptions(full_state_dict=True)
            msd, osd = get_state_dict(model, opt, options=opts)
            set_state_dict(fresh, fresh_opt, model_state_dict=msd, optim_state_dict=osd, options=opts)
        del model, opt
        train(fresh, fresh_opt, batches[half:])
        return dict(params=full_params(fresh), masters=_full_masters(fresh_opt, fresh))
    except Exception as e:  # noqa: BLE001  (the test reports it)
        return dict(error=f"{type(e).__name__}: {e}")


def scenario_scaler_fsdp2(rank, backend, out_dir):
    """GradScaler (torch's, ours) over FSDP2's DTensor grads, with torch.optim.SGD and our AdamW (bf16 params,
    masters): at the second of three steps an inf appears in rank 1's shard only. Every rank must skip that step
    and back off the scale (torch's DTensor rule max-reduces found_inf over the mesh; ours raised "no sharding
    strategy" for its unscale_ op)."""
    from mixprec_ops.amp import GradScaler

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for opt_name, dtype in (("sgd", torch.float32), ("ours_bf16", torch.bfloat16)):
        for impl, cls in (("torch", torch.amp.GradScaler), ("ours", GradScaler)):
            model = _fsdp_model(mesh, dtype)
            opt = (torch.optim.SGD(model.parameters(), lr=0.1) if opt_name == "sgd"
                   else ours(model.parameters(), backend, master_weights="auto"))
            scaler = cls("cpu", init_scale=2.0**10, growth_interval=1)
            scales, snapshots = [], []
            for step, (x, y) in enumerate(local_batches(rank, dtype)[:3]):
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss_fn(model, x, y)).backward()
                if step == 1 and rank == 1:
                    model[0].weight.grad.to_local()[0, 0] = float("inf")  # rank 1's rows of the first weight
                scaler.step(opt)
                scaler.update()
                scales.append(scaler.get_scale())
                snapshots.append({n: p.detach().to_local().clone() for n, p in model.named_parameters()})
            out[(opt_name, impl)] = dict(scales=scales, snapshots=snapshots)
    return out


def scenario_dtensor_edges(rank, backend, out_dir):
    """DTensor cases the wrapper runs above did not reach (a distributed user trial found each silently wrong):
    - write: a bf16 FSDP2 param written between steps. DTensor in-place ops move the DTensor's version counter,
      not its local tensor's, so the write went unseen and the next step restored the stale master.
    - norm: max_grad_norm over FSDP2 grads. torch's get_total_norm works in the grads' dtype: fp16 shards' partial
      norms overflowed when squared (every step skipped), bf16 norms were 8-bit precise. Also HSDP (a 2-D mesh,
      replicated on one dim): the replicas' squares must be counted once.
    - tp: tensor parallelism, a replicated param whose grad arrives Partial (each rank holds a share of the sum):
      each rank stepped with its own share and the replicas drifted apart."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    # write
    model = _fsdp_model(mesh, torch.bfloat16)
    opt = ours(model.parameters(), backend, master_weights="auto")
    resyncs, resync = [], opt._resync
    opt._resync = lambda pairs: (resyncs.append(len(pairs)), resync(pairs))[1]
    used = _count_steady(opt)
    train(model, opt, local_batches(rank, torch.bfloat16)[:3])
    with torch.no_grad():
        model[0].weight.zero_()
        model[2].weight.copy_(torch.full_like(model[2].weight, 0.5))
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    train(model, opt, local_batches(rank, torch.bfloat16)[3:4])
    out["write"] = dict(resyncs=resyncs, steady=used, params=full_params(model), masters=_full_masters(opt, model))
    # steady: FSDP2 params take the steady-state step (the last planning reused: optim/_steady.py), against a twin
    # that plans every step in full: a write under no_grad at step 2 (a DTensor op: it moves the DTensor's version
    # counter only), a grad dropped at step 5 and back at step 6, clipping on (the norm across the shards)
    twins = {}
    batches = local_batches(rank, torch.bfloat16)
    import mixprec_ops.optim.adam as optim_adam
    from mixprec_ops.ops.adam import BUCKET_TAKES_GRADS

    bucket_op = optim_adam.adam_step_bucket_
    for impl in ("steady", "full"):
        model = _fsdp_model(mesh, torch.bfloat16)
        opt = ours(model.parameters(), backend, max_grad_norm=MAX_NORM)
        if impl == "full":
            opt._steady_step = lambda: None
        used = _count_steady(opt)
        calls = []  # the bucket op's launches (a DTensor bucket's: given the local grads)
        optim_adam.adam_step_bucket_ = lambda *a, calls=calls, **k: (calls.append(len(a[0])), bucket_op(*a, **k))[1]
        for step in range(8):
            x, y = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
            if step == 2:
                with torch.no_grad():
                    model[0].weight.mul_(0.5)
            if step == 5:
                model[2].bias.grad = None
            opt.step()
        optim_adam.adam_step_bucket_ = bucket_op
        twins[impl] = dict(steady=used, bucket_calls=calls, bucket_expected=backend == "cpu" and BUCKET_TAKES_GRADS,
                           params=full_params(model), masters=_full_masters(opt, model),
                           states={f"{n} {k}": v.full_tensor().clone() for n, p in model.named_parameters()
                                   for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_sq")},
                           steps=[float(opt.state[p]["step"]) for p in model.parameters()])
    out["steady"] = twins
    # steady_dtype: `p.data = p.data.float()` on a bf16 FSDP2 param changes the DTensor's dtype and keeps its local
    # tensor and spec; the full planning replans the param (its master is taken over), and the steady check must see it
    twins = {}
    for impl in ("steady", "full"):
        model = _fsdp_model(mesh, torch.bfloat16)
        opt = ours(model.parameters(), backend)
        if impl == "full":
            opt._steady_step = lambda: None
        used = _count_steady(opt)
        for step in range(4):  # (the last: FSDP2's next backward refuses a bf16 grad for the float32 param)
            x, y = batches[step]
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
            if step == 3:
                model[0].weight.data = model[0].weight.data.float()
            opt.step()
        twins[impl] = dict(steady=used, locals={n: p.detach().to_local().clone() for n, p in model.named_parameters()},
                           keys={n: sorted(opt.state[p]) for n, p in model.named_parameters()})
    out["steady_dtype"] = twins
    # norm
    norm = {}
    hsdp = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    for name, m, dtype, scale in (("fp16", mesh, torch.float16, 1000.0), ("bf16", mesh, torch.bfloat16, 1.0),
                                  ("hsdp_fp32", hsdp, torch.float32, 1.0)):
        model = _fsdp_model(m, dtype)
        opt = ours(model.parameters(), backend, max_grad_norm=1.0)
        x, y = local_batches(rank, dtype)[0]
        (loss_fn(model, x, y) * scale).backward()
        exact = sum(p.grad.full_tensor().double().square().sum() for p in model.parameters()).sqrt().item()
        opt.step()
        norm[name] = dict(got=float(opt.grad_norm), exact=exact,
                          steps=[float(opt.state[p]["step"]) for p in model.parameters()])
    out["norm"] = norm
    # tp
    torch.manual_seed(0)
    full = torch.randn(5, 3)
    tp = {}
    for impl in ("ours", "torch"):
        p = nn.Parameter(distribute_tensor(full.clone(), mesh, [Replicate()]))
        opt = ours([p], backend) if impl == "ours" else theirs([p])
        for step in range(3):
            share = torch.randn(5, 3, generator=torch.Generator().manual_seed(10 * step + rank))
            p.grad = DTensor.from_local(share, mesh, [Partial()], run_check=False)
            opt.step()
        tp[impl] = p.detach().to_local().clone()
    out["tp"] = tp
    # layouts: _StridedShard (FSDP2 over a tensor-parallel param; not a Shard subclass: its dim was taken for
    # replicated), and ranks holding different grads: a grad None on rank 1 only, then no grads at all on rank 1
    # (the collectives follow the params' layouts, so every rank issues the same ones)
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    lay = {}
    for name, placements in (("strided", [_StridedShard(0, split_factor=2)]), ("shard1", [Shard(1)])):
        g = torch.Generator().manual_seed(rank)
        p = nn.Parameter(DTensor.from_local(torch.randn(4, 3, generator=g), mesh, placements, run_check=False))
        p.grad = DTensor.from_local(torch.randn(4, 3, generator=g) * (10 if rank else 1), mesh, placements,
                                    run_check=False)
        q = nn.Parameter(DTensor.from_local(torch.randn(4, 3, generator=g), mesh, [Shard(0)], run_check=False))
        q.grad = DTensor.from_local(torch.randn(4, 3, generator=g), mesh, [Shard(0)], run_check=False)
        own = torch.stack([p.grad.to_local().double().square().sum(), q.grad.to_local().double().square().sum()])
        if name == "shard1" and rank == 1:
            p.grad = None
            own[0] = 0
        mine = own.clone()
        dist.all_reduce(own)
        o = ours([p, q], backend, max_grad_norm=1.0)
        o.step()
        lay[name] = dict(got=float(o.grad_norm), exact=own.sum().sqrt().item())
        # no grads at all on rank 1: rank 0's norm is its own grads' (rank 1 adds 0), and nobody hangs
        if name == "shard1":
            if rank == 1:
                q.grad = None
            o.step()
            lay["no_grads_on_rank_1"] = dict(got=None if rank == 1 else float(o.grad_norm),
                                             exact=(mine[0] + mine[1]).sqrt().item() if rank == 0 else None)
            # our GradScaler hands its inf check to the clipping step: a rank without grads takes the other
            # ranks' flag; when no rank holds a grad (a step on a no-sync micro-step) there is no flag, and
            # update() raises on every rank as torch's does (the scale grew silently before)
            from mixprec_ops.amp import GradScaler

            for who in ("rank0", "nobody"):
                p.grad = None
                q.grad = (DTensor.from_local(torch.randn(4, 3), mesh, [Shard(0)], run_check=False)
                          if who == "rank0" and rank == 0 else None)
                sc = GradScaler("cpu", init_scale=4.0, growth_interval=1)
                sc.scale(torch.ones(()))
                sc.step(ours([p, q], backend, max_grad_norm=1.0))
                try:
                    sc.update()
                    lay[f"scaler_{who}"] = sc.get_scale()
                except AssertionError as e:
                    lay[f"scaler_{who}"] = str(e)
    out["layouts"] = lay
    # a DTensor param with a plain grad (or the reverse) is named, not stepped with the wrong shapes
    p = nn.Parameter(DTensor.from_local(torch.randn(4, 3), mesh, [Shard(0)], run_check=False))
    p.grad = torch.randn(8, 3)
    try:
        ours([p], backend).step()
        out["mixed_grad"] = "stepped"
    except TypeError as e:
        out["mixed_grad"] = str(e)
    return out


def scenario_tp_linear(rank, backend, out_dir):
    """Converted bf16 layers under tensor parallelism (ColwiseParallel for a layer with a fused gelu, then
    RowwiseParallel), against torch's own modules (nn.Linear, nn.GELU, nn.Linear) under the same plan: a user
    trial found the converted layers raising NotImplementedError (mixprec.linear has no DTensor sharding rule).
    Both models train 3 steps with our AdamW (bf16 params, fp32 masters); per step the loss, and at the end the
    full weights and grads, are returned for comparison."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import mixprec_ops

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for kind in ("torch", "converted"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).to(torch.bfloat16)
        if kind == "converted":
            model = nn.Sequential(model[0], nn.Identity(), model[2])
            mixprec_ops.convert(model)
            model[0].activation = "gelu"
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        opt = ours(model.parameters(), backend)
        torch.manual_seed(1)  # the same data on every rank (tensor parallelism splits the layers, not the batch)
        losses = []
        for _ in range(3):
            x, y = torch.randn(6, 16).to(torch.bfloat16), torch.randn(6, 8)
            loss = (model(x).float() - y).pow(2).mean()
            loss.backward()
            grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        out[kind] = {"losses": losses, "grads": grads, "types": [type(m).__module__ for m in model],
                     "params": {n: p.full_tensor().clone() for n, p in model.named_parameters()}}
    # an fp32 bias of a bf16 layer (which torch's linear refuses): added to the rounded product in fp32
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(2)
    x, w, b = torch.randn(5, 16).to(torch.bfloat16), torch.randn(32, 16).to(torch.bfloat16), torch.randn(32)
    got = mixprec_ops.nn.functional.linear(distribute_tensor(x, mesh, [Replicate()]),
                                           distribute_tensor(w, mesh, [Shard(0)]),
                                           distribute_tensor(b, mesh, [Shard(0)]), "silu")
    out["fp32_bias"] = (got.full_tensor(),
                        torch.nn.functional.silu(torch.nn.functional.linear(x, w).float() + b).to(torch.bfloat16))
    # FSDP2's params are DTensors too, but its forward hands the layers plain unsharded params: the fused path runs
    from torch.distributed.fsdp import fully_shard

    from mixprec_ops.nn import functional as F

    calls = {"fused": 0, "dtensor": 0}
    fused, fallback = F._apply_linear, F._dtensor_linear
    F._apply_linear = lambda *a, **k: (calls.__setitem__("fused", calls["fused"] + 1), fused(*a, **k))[1]
    F._dtensor_linear = lambda *a, **k: (calls.__setitem__("dtensor", calls["dtensor"] + 1), fallback(*a, **k))[1]
    try:
        torch.manual_seed(0)
        model = mixprec_ops.convert(nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8)).to(torch.bfloat16))
        fully_shard(model, mesh=mesh)
        model(torch.randn(4, 16).to(torch.bfloat16)).float().sum().backward()
    finally:
        F._apply_linear, F._dtensor_linear = fused, fallback
    out["fsdp2_calls"] = calls
    return out


SCENARIOS = {
    "tp_linear": scenario_tp_linear,
    "scaler_fsdp2": scenario_scaler_fsdp2,
    "ddp": scenario_ddp,
    "fsdp2": scenario_fsdp2,
    "zero": scenario_zero,
    "bf16_ddp": lambda rank, backend, out_dir: scenario_bf16(rank, backend, out_dir, "ddp"),
    "bf16_fsdp2": lambda rank, backend, out_dir: scenario_bf16(rank, backend, out_dir, "fsdp2"),
    "dtensor_edges": scenario_dtensor_edges,
}


# ------------------------------------------------------------------------------------------------------ spawning
def _worker(rank, scenario, init_method, out_dir, backend):
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's device on the loopback, whatever the hostname resolves to
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = SCENARIOS[scenario](rank, backend, out_dir)
        torch.save(result, os.path.join(out_dir, f"{scenario}.rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without the interpreter's teardown, where a background thread of torch's distributed
    # stack once ended rank 0 in std::terminate ("terminate called without an active exception", SIGABRT) after a
    # complete ZeRO scenario (once in a full-suite run on 2026-11-29; not reproduced alone in 3 tries).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(scenario: str, out_dir: str) -> list[dict]:
    """Run SCENARIOS[scenario] on WORLD ranks; return each rank's result. Fails (after killing the workers) if they do
    not finish within SPAWN_TIMEOUT_S; retries with a new port if another process took the free port meanwhile."""
    for attempt in range(3):
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.start_processes(_worker, args=(scenario, init_method, out_dir, BACKEND), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    pytest.fail(f"scenario {scenario!r}: workers still running after {SPAWN_TIMEOUT_S} s (hang?)")
        except mp.ProcessRaisedException as e:
            if "address already in use" in str(e).lower() and attempt < 2:
                continue
            raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        break
    return [torch.load(os.path.join(out_dir, f"{scenario}.rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results(scenario) -> per-rank results; each scenario is spawned once per module. A scenario that failed
    (raised or hung) fails its other tests at once, with the first error, instead of being spawned again."""
    cache, errors = {}, {}

    def get(scenario):
        if scenario in errors:
            pytest.fail(f"scenario {scenario!r} failed in an earlier test: {errors[scenario]}")
        if scenario not in cache:
            try:
                cache[scenario] = spawn(scenario, str(tmp_path_factory.mktemp(scenario)))
            except BaseException as e:
                errors[scenario] = f"{type(e).__name__}: {str(e)[-2000:]}"
                raise
        return cache[scenario]

    return get


# ---------------------------------------------------------------------------------------------------- checking
def rel_diff(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def assert_close_rel(a: dict, b: dict, tol: float, what: str):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape, (what, n, a[n].shape, b[n].shape)
        d = rel_diff(a[n], b[n])
        assert d <= tol, f"{what} {n}: relative difference {d:.3g} > {tol}"


def assert_identical_across_ranks(per_rank: list[dict], what: str):
    for n, t in per_rank[0].items():
        for r in range(1, WORLD):
            assert torch.equal(t.view(torch.int32 if t.dtype == torch.float32 else torch.int16),
                               per_rank[r][n].view(torch.int32 if t.dtype == torch.float32 else torch.int16)), (
                f"{what} {n}: rank {r} differs from rank 0")


def assert_moved(final: dict, what: str):
    init = dict(make_mlp().named_parameters())
    for n, t in final.items():
        assert not torch.equal(t, init[n].detach().to(t.dtype)), f"{what} {n}: never updated"


# ----------------------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("config", ["plain", "amsgrad_clip", "bucket_view"])
def test_ddp_fp32_matches_torch(results, config):
    per_rank = [r[config] for r in results("ddp")]
    for rank, res in enumerate(per_rank):
        assert_close_rel(res["ours"]["params"], res["torch"]["params"], 1e-6, f"rank {rank} {config}")
        assert res["ours"]["steps"] == [float(STEPS)] * 6
        assert res["ours"]["losses"] == pytest.approx(res["torch"]["losses"], rel=1e-5)
    assert_identical_across_ranks([r["ours"]["params"] for r in per_rank], f"DDP {config}")
    assert_moved(per_rank[0]["ours"]["params"], f"DDP {config}")
    if config == "amsgrad_clip":
        ours_n, torch_n = per_rank[0]["ours"]["grad_norms"], per_rank[0]["torch"]["grad_norms"]
        assert ours_n == pytest.approx(torch_n, rel=1e-5)
        assert max(ours_n) > MAX_NORM, "clipping never engaged: lower MAX_NORM"
        # every rank computed the same (global) norm: DDP gave all ranks the same averaged grads
        assert per_rank[1]["ours"]["grad_norms"] == ours_n


# --------------------------------------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("config", ["plain", "clip", "mixed_precision", "float64_clip"])
def test_fsdp2_fp32_matches_torch(results, config):
    per_rank = [r[config] for r in results("fsdp2")]
    for rank, res in enumerate(per_rank):
        assert_close_rel(res["ours"]["params"], res["torch"]["params"], 1e-6, f"rank {rank} {config}")
        assert res["ours"]["losses"] == pytest.approx(res["torch"]["losses"], rel=1e-5)
    # full_tensor() gathered the same full params on both ranks
    assert_identical_across_ranks([r["ours"]["params"] for r in per_rank], f"FSDP2 {config}")
    assert_moved(per_rank[0]["ours"]["params"], f"FSDP2 {config}")
    if config == "float64_clip":  # stepped as float64 (torch's fused kernel on the local shards): float64 moments
        assert all(p.dtype == torch.float64 for p in per_rank[0]["ours"]["params"].values())
        for f in per_rank[0]["ours"]["state"].values():
            assert f["exp_avg"]["kind"] == "DTensor" and f["exp_avg"]["dtype"] == torch.float64
    if config in ("clip", "float64_clip"):
        ours_n, torch_n = per_rank[0]["ours"]["grad_norms"], per_rank[0]["torch"]["grad_norms"]
        assert ours_n == pytest.approx(torch_n, rel=1e-5)  # the global norm across shards, not the local one
        assert max(ours_n) > MAX_NORM, "clipping never engaged: lower MAX_NORM"
        assert per_rank[1]["ours"]["grad_norms"] == ours_n


def test_fsdp2_state_is_sharded_like_params(results):
    """Moments are DTensors with the param's placements and mesh, holding local shards of the param's local shape
    (rank 1's shards of the 1-output layer are empty); step counters are plain scalars; no masters for fp32; the
    gathered moments match torch's."""
    for rank, r in enumerate(results("fsdp2")):
        facts, ref = r["plain"]["ours"]["state"], r["plain"]["torch"]["state"]
        assert len(facts) == 6
        for n, f in facts.items():
            assert set(f) == {"param_local_shape", "param_placements", "step", "exp_avg", "exp_avg_sq"}, (n, set(f))
            for k in ("exp_avg", "exp_avg_sq"):
                s = f[k]
                assert s["kind"] == "DTensor", (rank, n, k, s["kind"])
                assert s["placements"] == f["param_placements"] and s["same_mesh"], (rank, n, k)
                assert s["local_shape"] == f["param_local_shape"], (rank, n, k)
                assert s["dtype"] == torch.float32
                assert ref[n][k]["kind"] == "DTensor"
                d = rel_diff(s["full"], ref[n][k]["full"])
                assert d <= 1e-5, f"rank {rank} {n} {k}: relative difference {d:.3g} vs torch"
            assert f["step"]["kind"] == "Tensor" and f["step"]["shape"] == () and float(f["step"]["value"]) == STEPS
        assert facts["4.weight"]["param_local_shape"] == ((1, 9) if rank == 0 else (0, 9))  # the empty shard is covered


# ---------------------------------------------------------------------------------------------------------- ZeRO
def test_zero_fp32_matches_torch(results):
    per_rank = [r["plain"] for r in results("zero")]
    for rank, res in enumerate(per_rank):
        assert_close_rel(res["ours"]["params"], res["torch"]["params"], 1e-6, f"rank {rank}")
        assert res["ours"]["losses"] == pytest.approx(res["torch"]["losses"], rel=1e-5)
        assert res["ours"]["local_class"] == "AdamW"
        # ZeRO partitions the params: each rank's AdamW holds state only for its own partition, the same as torch's
        assert res["ours"]["local_states"] == res["ours"]["local_params"] == res["torch"]["local_params"]
    parts = [set(r["ours"]["local_params"]) for r in per_rank]
    assert parts[0].isdisjoint(parts[1]) and len(parts[0] | parts[1]) == 6 and all(parts)
    # ZeRO broadcasts each partition's updated params: all ranks hold the same params
    assert_identical_across_ranks([r["ours"]["params"] for r in per_rank], "ZeRO")
    assert_moved(per_rank[0]["ours"]["params"], "ZeRO")
    # consolidate_state_dict gathers our local state_dicts (with our extra group keys) into one
    c, c_ref = per_rank[0]["ours"]["consolidated"], per_rank[0]["torch"]["consolidated"]
    assert c["n_states"] == c_ref["n_states"] == 6
    assert c["steps"] == [float(STEPS)] * 6
    assert {"master_weights", "state_dtype"} <= set(c["group_keys"])


def test_zero_max_grad_norm_matches_torch_clip(results):
    """max_grad_norm with norm_across_ranks=True under ZeroRedundancyOptimizer: each rank's AdamW holds only its
    partition of the params, and the partitions' sums of squares are all-reduced, so every rank clips with the
    global norm, as torch.nn.utils.clip_grad_norm_ over all params before ZeRO's torch.optim.AdamW does. (Without
    the all_reduce each rank would see the norm of its own partition, smaller than the global one: the test fails.)"""
    per_rank = [r["clip"] for r in results("zero")]
    glob = per_rank[0]["torch"]["grad_norms"]
    assert max(glob) > MAX_NORM  # clipping really happens
    for rank, res in enumerate(per_rank):
        assert res["ours"]["grad_norms"] == pytest.approx(glob, rel=1e-5), f"rank {rank}: not the global norm"
        assert_close_rel(res["ours"]["params"], res["torch"]["params"], 1e-6, f"rank {rank}")


def test_zero_rank_without_grads_joins_the_norm_all_reduce(results):
    """Rank 1 drops its partition's grads (and carries the found_inf = 0 that torch.amp.GradScaler sets then): its
    optimizer has nothing to step but must still join the all_reduce (else rank 0 hangs and the spawn times out);
    both ranks end with the norm of rank 0's grads alone."""
    r0, r1 = (r["empty_rank"] for r in results("zero"))
    assert r0["n_local"] > 0 and r1["n_local"] > 0
    assert r0["norm"] == pytest.approx(r0["own"], rel=1e-5) and r1["norm"] == pytest.approx(r0["own"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------- bf16
def single_process_bf16(emulate_reduction: bool):
    """The same training on one process, our AdamW, same backend. emulate_reduction=False: plain full-batch training
    (back-propagate the mean loss over all WORLD * LOCAL_BATCH rows). True: the wrapper's arithmetic replayed on one
    process: back-propagate each rank's half separately, then average the bf16 half-grads as the all-reduce /
    reduce-scatter does (each half divided by WORLD, an exact operation, then summed in fp32 and rounded to bf16)."""
    model = make_mlp(torch.bfloat16)
    params = list(model.parameters())
    opt = ours(params, BACKEND, master_weights="auto")
    losses = []
    for x, y in global_batches(torch.bfloat16):
        opt.zero_grad(set_to_none=True)
        if not emulate_reduction:
            loss = loss_fn(model, x, y)
            loss.backward()
            losses.append(loss.item())
            opt.step()
            continue
        halves, half_losses = [], []
        for r in range(WORLD):
            sl = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, x[sl], y[sl])
            loss.backward()
            halves.append([p.grad for p in params])
            half_losses.append(loss.item())
        for i, p in enumerate(params):
            p.grad = sum(h[i].float() / WORLD for h in halves).to(torch.bfloat16)
        losses.append(half_losses)
        opt.step()
    masters = {n: opt.state[p]["master_param"].clone() for n, p in model.named_parameters()}
    return dict(params=full_params(model), masters=masters, losses=losses)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_bf16_masters_match_single_process(results, wrapper):
    per_rank = results(f"bf16_{wrapper}")
    for rank, r in enumerate(per_rank):
        for n, (kind, dtype, placements) in r["master_kinds"].items():
            assert dtype == torch.float32, (rank, n, dtype)
            if wrapper == "fsdp2":
                assert kind == "DTensor" and placements == "(Shard(dim=0),)", (rank, n, kind, placements)
            else:
                assert kind == "Tensor", (rank, n, kind)
        # the bf16 param is the round-to-nearest-even of its fp32 master, on the rank's own shard
        assert all(r["param_is_rne_of_master"].values()), (rank, r["param_is_rne_of_master"])
        assert all(t.dtype == torch.bfloat16 for t in r["params"].values())
    # every rank applied the same update to the same (reduced) grads: bit for bit the same params and masters
    assert_identical_across_ranks([r["params"] for r in per_rank], f"bf16 {wrapper} params")
    assert_identical_across_ranks([r["masters"] for r in per_rank], f"bf16 {wrapper} masters")
    assert_moved(per_rank[0]["params"], f"bf16 {wrapper}")

    # Against the wrapper's arithmetic replayed on one process: the same bf16 grads, so bit for bit the same
    # masters, params and per-rank losses. (Should a torch version reduce bf16 grads in another way, e.g. in bf16
    # pairwise with a different rounding, this is the check that will say so: compare with the next one.)
    emu = single_process_bf16(emulate_reduction=True)
    for n, want in emu["masters"].items():
        got = per_rank[0]["masters"][n]
        assert torch.equal(got, want), f"bf16 {wrapper} {n}: master off the replay by {(got - want).abs().max()}"
        assert torch.equal(per_rank[0]["params"][n].view(torch.int16), emu["params"][n].view(torch.int16)), n
    assert [list(t) for t in zip(*(r["losses"] for r in per_rank), strict=True)] == emu["losses"]

    # Against one process on the full batch. The two runs see different bf16 grads: one process back-propagates the
    # mean over all rows in bf16, the wrapper back-propagates each rank's half and averages the halves' bf16 grads
    # (rounded once more to bf16). So grads differ by about one bf16 ulp (2**-8 relative), and an element whose
    # halves nearly cancel can change sign; a param that then rounds to another bf16 value changes the next
    # forward pass. Adam normalises by sqrt(v), so such differences move an update by a fraction of lr (up to 2 lr
    # at a sign flip), not by a fraction of the update. We therefore bound the masters' difference relative to the
    # total movement of the weights: over 15 data seeds this ratio was 0.2 % to 2.3 % (2.2 % for this data) and
    # the largest element difference 1.1 lr; the bounds below are 5 % and 2 lr. A real error (a missed or doubled
    # step, a wrong lr or bias correction) moves the weights by O(lr) per step: a deviation comparable to the
    # movement itself. (Unsynchronised ranks and stale masters are caught above, exactly.)
    sp = single_process_bf16(emulate_reduction=False)
    init = {n: p.detach().float() for n, p in make_mlp(torch.bfloat16).named_parameters()}
    mine = per_rank[0]["masters"]
    total_dev = sum((mine[n] - sp["masters"][n]).square().sum() for n in init).sqrt()
    total_move = sum((sp["masters"][n] - init[n]).square().sum() for n in init).sqrt()
    assert total_move > HP["lr"]  # the run did move the weights
    assert total_dev <= 0.05 * total_move, f"bf16 {wrapper}: |dW| = {total_dev:.3g}, |W - W0| = {total_move:.3g}"
    for n in init:
        dmax = (mine[n] - sp["masters"][n]).abs().max().item()
        assert dmax <= 2 * HP["lr"], f"bf16 {wrapper} {n}: max |dW| = {dmax:.3g} > 2 lr"
    # the loss of the global batch is the mean of the ranks' losses (equal halves); bf16 forward: 2 % relative
    glob = [sum(ls) / WORLD for ls in zip(*(r["losses"] for r in per_rank), strict=True)]
    assert glob == pytest.approx(sp["losses"], rel=2e-2)


# --------------------------------------------------------------------------------------- FSDP2 checkpoint / resume
@pytest.mark.parametrize("how", [
    "dcp_sharded",
    "full_state_dict",  # gathers the optimizer state: param groups must hold only serializable values
])
def test_fsdp2_bf16_checkpoint_resume(results, how):
    """Checkpoint after half the steps with torch.distributed.checkpoint.state_dict (DTensor masters and moments),
    resume in a fresh model and optimizer: bit for bit the uninterrupted run (same kernels, same grads)."""
    for rank, r in enumerate(results("bf16_fsdp2")):
        res = r["resume"][how]
        if "error" in res:
            pytest.fail(f"rank {rank}: {how} checkpoint/resume failed: {res['error']}")
        for k in ("params", "masters"):
            for n, want in r[k].items():
                got = res[k][n]
                assert torch.equal(got, want), f"rank {rank} {k} {n}: resumed run off by {(got - want).abs().max()}"


@pytest.mark.parametrize("opt_name", ["sgd", "ours_bf16"])
def test_grad_scaler_over_fsdp2_shards_skips_on_every_rank(results, opt_name):
    """An inf in one rank's shard skips the step on every rank, with our GradScaler as with torch's: the same scale
    history (growth, backoff at the inf step, growth), shards unchanged by the skipped step on both ranks, and the
    same shards as torch's scaler gives after every step (bit for bit: same grads, same optimizer)."""
    per_rank = results("scaler_fsdp2")
    for rank, res in enumerate(per_rank):
        mine, ref = res[(opt_name, "ours")], res[(opt_name, "torch")]
        assert ref["scales"] == [2.0**11, 2.0**10, 2.0**11], ref["scales"]  # the scenario really skipped a step
        assert mine["scales"] == ref["scales"], (rank, mine["scales"])
        for step, (a, b) in enumerate(zip(mine["snapshots"], ref["snapshots"])):
            for n in a:
                assert torch.equal(a[n], b[n]), f"rank {rank} step {step} {n}: differs from torch's scaler"
        for n, t in mine["snapshots"][1].items():
            assert torch.equal(t, mine["snapshots"][0][n]), f"rank {rank}: {n} changed in the skipped step"



# ------------------------------------------------------------------------------------------------ DTensor edges
def test_fsdp2_write_between_steps_reaches_the_masters(results):
    """A write to FSDP2 bf16 params under no_grad (zero_, copy_: DTensor ops) is kept by the next step (lr 0: the
    params and masters equal what was written, on every rank); the steps before it resynced nothing (FSDP2's own
    traffic does not look like a write): the first planned in full, the next two steady (the planning reused), and
    the write sent the fourth back to the full planning, which resynced the two written params."""
    for rank, r in enumerate(results("dtensor_edges")):
        w = r["write"]
        assert w["steady"] == [False, True, True, False], (rank, w["steady"])
        assert w["resyncs"][0] == 0 and w["resyncs"][1] >= 2 and len(w["resyncs"]) == 2, (rank, w["resyncs"])
        for name, value in (("0.weight", 0.0), ("2.weight", 0.5)):
            for k in ("params", "masters"):
                t = w[k][name]
                assert torch.equal(t.float(), torch.full_like(t.float(), value)), (rank, k, name, t.abs().max())


def test_fsdp2_steady_steps_equal_full_planning(results):
    """FSDP2 (DTensor) params take the steady-state step: the steps whose planning could be reused were (not the
    first; not the one after a write under no_grad, which the DTensor's own version counter shows; not a step whose
    params with grads changed, nor the next, whose record waits: the back-off), through the bucket op on the CPU
    backend (given the local grads), and every rank's params, masters,
    moments and step counts are bit-identical to a twin that planned every step in full (bf16 params with masters,
    clipping across the shards)."""
    for rank, r in enumerate(results("dtensor_edges")):
        steady, full = r["steady"]["steady"], r["steady"]["full"]
        assert steady["steady"] == [False, True, False, True, True, False, False, False], (rank, steady["steady"])
        assert not any(full["steady"])
        # the steady steps launched through the bucket op (CPU backend): one call a steady step (one bucket: every
        # param bf16 with a master), never in the twin
        if steady["bucket_expected"]:
            assert len(steady["bucket_calls"]) == sum(steady["steady"]), (rank, steady["bucket_calls"])
        assert not full["bucket_calls"]
        assert steady["steps"] == full["steps"] and sorted(set(steady["steps"])) == [7.0, 8.0], (rank, steady["steps"])
        for what in ("params", "masters", "states"):
            for n, t in steady[what].items():
                u = full[what][n]
                assert t.dtype == u.dtype and torch.equal(t.view(torch.int16 if t.dtype == torch.bfloat16
                                                                 else torch.int32),
                                                          u.view(torch.int16 if u.dtype == torch.bfloat16
                                                                 else torch.int32)), (rank, what, n)
        assert_moved({n: t.float() for n, t in steady["params"].items()}, f"rank {rank} steady")
        # a DTensor param's dtype changed by `p.data = ...` (its local tensor and spec kept): planned in full
        steady, full = r["steady_dtype"]["steady"], r["steady_dtype"]["full"]
        assert steady["steady"] == [False, True, True, False], (rank, steady["steady"])
        assert steady["keys"] == full["keys"] and "master_param" not in steady["keys"]["0.weight"], (rank, steady)
        for n, t in steady["locals"].items():
            u = full["locals"][n]
            assert t.dtype == u.dtype and torch.equal(t, u), (rank, "steady_dtype", n)


@pytest.mark.parametrize("case", ["fp16", "bf16", "hsdp_fp32"])
def test_fsdp2_clip_norm_is_the_fp32_norm_of_the_full_grads(results, case):
    """max_grad_norm's norm over FSDP2 shards equals the norm of the gathered grads computed in fp64, to fp32
    precision (the norm pass sums fp32 squares in fp64 partials; 1e-6 relative), on every rank, and the step is
    taken: with fp16 grads of a loss scaled by 1000 (torch's get_total_norm gave inf: fp16 partial norms squared)
    and bf16 grads (it gave an 8-bit norm, 1e-3 off). HSDP: replicas counted once (twice would be sqrt(2) off)."""
    for rank, r in enumerate(results("dtensor_edges")):
        n = r["norm"][case]
        assert math.isfinite(n["got"]) and n["exact"] > (256 if case == "fp16" else 0), (rank, n)
        assert abs(n["got"] - n["exact"]) <= 1e-6 * n["exact"], (rank, case, n)
        assert all(s == 1.0 for s in n["steps"]), (rank, case, n["steps"])


def test_tensor_parallel_partial_grads_keep_replicas_identical(results):
    """A replicated param with Partial grads (tensor parallelism) steps with the summed grad: both ranks hold the
    same bits, and the same values as torch.optim.AdamW (which sums them through DTensor's ops), to fp32 rounding
    order (1e-6 relative, as every fp32 comparison here)."""
    per_rank = results("dtensor_edges")
    assert_identical_across_ranks([{"p": r["tp"]["ours"]} for r in per_rank], "tp replicated param")
    assert_close_rel({"p": per_rank[0]["tp"]["ours"]}, {"p": per_rank[0]["tp"]["torch"]}, 1e-6, "tp vs torch")


def test_dtensor_norm_layouts_and_ranks_with_different_grads(results):
    """The clip norm sums over every mesh dim that is not replicated, _StridedShard included (it was taken for a
    replicated dim: 3.22 on one rank, 49.55 on the other, for 49.66); and a rank whose grads differ from the others'
    (one grad None, or none at all) still joins every collective, adding 0: no hang, the exact norm."""
    per_rank = results("dtensor_edges")
    for rank, r in enumerate(per_rank):
        for case in ("strided", "shard1"):
            n = r["layouts"][case]
            assert abs(n["got"] - n["exact"]) <= 1e-6 * n["exact"], (rank, case, n)
    n = per_rank[0]["layouts"]["no_grads_on_rank_1"]
    assert abs(n["got"] - n["exact"]) <= 1e-6 * n["exact"], n
    for r in per_rank:  # the scaler: rank 1 without grads takes rank 0's flag; with none anywhere update() raises
        assert r["layouts"]["scaler_rank0"] == 8.0, r["layouts"]
        assert "No inf checks were recorded" in r["layouts"]["scaler_nobody"], r["layouts"]


def test_a_dtensor_param_with_a_plain_grad_is_named(results):
    for r in results("dtensor_edges"):
        assert "the param is a DTensor but its grad is not" in r["mixed_grad"], r["mixed_grad"]


def test_tensor_parallel_converted_linear_runs_torch_modules_numerics(results):
    """Converted bf16 layers (one with a fused gelu) under ColwiseParallel / RowwiseParallel train as torch's
    nn.Linear + nn.GELU + nn.Linear under the same plan, bit for bit (losses, grads, params after 3 steps of our
    AdamW): with DTensor weights linear runs torch's linear and activation, which DTensor shards. Before, the first
    forward raised NotImplementedError (no sharding strategy for mixprec.linear)."""
    for rank, r in enumerate(results("tp_linear")):
        assert r["converted"]["types"][0] == "mixprec_ops.nn.linear", r["converted"]["types"]
        assert r["converted"]["losses"] == r["torch"]["losses"], (rank, r)
        for what in ("grads", "params"):
            for n, t in r["torch"][what].items():
                assert torch.equal(r["converted"][what][n], t), (rank, what, n)
        got, expected = r["fp32_bias"]
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected), rank
        assert r["fsdp2_calls"] == {"fused": 2, "dtensor": 0}, r["fsdp2_calls"]  # FSDP2: plain params, fused path
