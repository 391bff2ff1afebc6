"""Adam and AdamW with fp32 master weights, fused AMP unscaling, fused global-norm clipping: drop-ins for
torch.optim.Adam / torch.optim.AdamW. The step is mixprec_ops.ops.adam.adam_step_ (one fused pass per bucket of
tensors sharing dtypes and device); see that module for the exact element-wise math."""

from __future__ import annotations

import copy
import numbers
from collections import defaultdict
from itertools import compress

import torch

from .. import _checks, _ext, backends
from .._checks import FLOAT_SOURCES
from .._dtensor import DTensor, any_dtensor
from .._dtensor import local as _local
from ..ops.adam import BUCKET_TAKES_GRADS, adam_scalars, adam_step_, adam_step_bucket_
from ..ops.adam import _select as _select_backend
from ._grad_norm import GradNormMixin
from ._masters import MasterSyncMixin, _versions, check_state_shape
from ._steady import WIDE as _WIDE
from ._steady import SteadyStepMixin

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# mixprec::grad_kinds (the full planning's grad checks in one C++ sweep, _collect), or None: the Python checks
_GRAD_KINDS = (torch.ops.mixprec.grad_kinds.default
               if _ext.has_kernel("grad_kinds", "CompositeExplicitAutograd") else None)
# Param groups hold state_dtype by name: torch.distributed.checkpoint's state-dict helpers reject torch.dtype values.
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Params the optimizer steps: the kernels' dtypes, and float64, which torch's own fused Adam steps (_step_wide)
_PARAM_DTYPES = (*FLOAT_SOURCES, torch.float64)
_MASTERED = (torch.float16, torch.bfloat16)  # the dtypes master_weights gives an fp32 master (not float32, float64)


def _check_group_options(master_weights, state_dtype) -> None:
    """The options this class adds to a param group (constructor defaults, add_param_group, loaded groups)."""
    if master_weights not in ("auto", True, False) or isinstance(master_weights, (int, float)) and \
            not isinstance(master_weights, bool):
        raise ValueError(f"master_weights must be 'auto', True or False, got {master_weights!r}")
    _state_dtype_name(state_dtype)


def _state_dtype_name(v) -> str:
    """'float32' / 'bfloat16' from a torch.dtype or its name; ValueError otherwise."""
    name = str(v).replace("torch.", "") if isinstance(v, (torch.dtype, str)) else None
    if name not in _STATE_DTYPES:
        raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {v}")
    return name


def _dist_ok() -> bool:
    return torch.distributed.is_available()


def _dense_like(t, ref) -> bool:
    """t can be walked in step with ref (same strides, no gaps or overlaps). Contiguous pairs, the common case,
    answer from cached flags; the op call (~ microseconds each, thousands per step) only runs for the others."""
    if t.is_contiguous() and ref.is_contiguous():
        return True
    return t.stride() == ref.stride() and torch.ops.aten.is_non_overlapping_and_dense(ref)


class Adam(MasterSyncMixin, GradNormMixin, SteadyStepMixin, torch.optim.Optimizer):
    """Adam with fp32 master weights for fp16/bf16 params, computed by fused kernels (CUDA, Triton, C++ CPU).

    Same constructor arguments and defaults as torch.optim.Adam, plus:

    Args:
        master_weights: "auto" (default): an fp32 master copy for every fp16/bf16 param, none for fp32 (or float64)
            params; True / False force it on / off for low-precision params. The update is computed in fp32 on the
            master and written back to the param with round-to-nearest-even in the same kernel. Saved in state_dict as
            ``master_param``. A write to the param between steps (in place under torch.no_grad(), nn.init, a model's
            load_state_dict, ``p.data = t``) reaches its master at the next step, element by element, so it is not
            undone; so does one made after this optimizer loaded a state_dict with masters (its first step checks each
            loaded master against its param: elements the param still holds the rounding of keep their fp32 bits). A
            change of the model's dtype is not a write: after model.half() of a bf16 model the masters stay (the param
            holds their rounding through bf16), and after model.float() (at the next step) or when a 16-bit run's
            checkpoint is loaded into an fp32 model (in load_state_dict, the model loaded first) each fp32 param takes
            over its master's value, so training continues from the masters (float64 params alike, after
            model.double()). In-place ops on ``p.data`` itself are not seen (``p.data`` has its own version counter):
            write under torch.no_grad() instead. A compiled step (torch.compile(opt.step), or a whole compiled training
            step) cannot watch version counters: after writing params between compiled steps, or loading a state_dict,
            call ``resync_masters()`` eagerly.
        state_dtype: dtype of exp_avg / exp_avg_sq / max_exp_avg_sq: torch.float32 (default) or torch.bfloat16
            (halves the moments' memory; stored with round-to-nearest-even). Kept in param groups by name
            ("float32" / "bfloat16"), which torch.distributed.checkpoint can serialize. float64 params keep float64
            moments whatever it says (see below).
        max_grad_norm: None (default) or a positive float: clip the global L2 norm of all grads (after AMP
            unscaling) to this value inside the step, like torch.nn.utils.clip_grad_norm_ (coef = max_norm /
            (norm + 1e-6), at most 1). The norm comes from one read-only pass that also detects inf/NaN; a
            non-finite norm skips the step (nothing changes). The norm of the last step is ``self.grad_norm``.
            It is the norm of the unscaled grads, inf (step skipped) from 2^64 on, where torch's clip_grad_norm_
            overflows its fp32 sum of squares; a still-scaled grad element beyond ~1.8e19 (whose fp32 square
            overflows in the pass) makes it inf too. torch.amp.GradScaler does not see this optimizer's skips (it
            backs off on its own found_inf only), so a loss scale that keeps scaled grads past that skips every
            step with it; mixprec_ops.amp.GradScaler takes the optimizer's flag and backs off.
            The norm covers this optimizer's params: under FSDP2 or tensor parallelism (DTensor grads) it is the
            global norm (each rank's shards in the same fp32 pass, then summed over the mesh dims they are sharded
            on; a grad laid out otherwise than its param, e.g. Partial, is first laid out like the param); under
            torch.distributed.optim.ZeroRedundancyOptimizer each rank's optimizer holds only its share of the
            params, so pass norm_across_ranks=True there.
        norm_across_ranks: False (default), True, or a torch.distributed ProcessGroup: this optimizer holds only
            this rank's share of the params (ZeroRedundancyOptimizer(params, optimizer_class=AdamW,
            max_grad_norm=..., norm_across_ranks=True)), so the sum of squares and the inf/NaN flag of the norm
            pass are all-reduced over the default process group (True) or the given one: every rank clips with
            the global norm and every rank skips a step that any rank found non-finite. One all_reduce of two
            floats per step, issued on every rank even when it holds no grads. Only with max_grad_norm. Not needed
            under FSDP2 (its DTensor grads already give the global norm). Not supported with
            ZeroRedundancyOptimizer(overlap_with_ddp=True), whose per-bucket steps run on one rank each. ZeRO copies
            its keyword arguments into its own param groups, and a ProcessGroup cannot be pickled: for ZeRO over a
            subgroup (and a savable ZeRO state_dict) construct with True, then set ``zero.optim.norm_across_ranks =
            group`` (the attribute is what the step reads).
        backend: "auto" (default, or MIXPREC_BACKEND), "cuda", "triton", "cpu" or "torch".

    Arguments kept for compatibility with torch.optim.Adam: ``foreach`` and ``fused`` are accepted and ignored
    (every step is fused here); ``capturable`` is accepted: steps, lr (when a tensor), grad scale and found_inf
    are always read on the device, so a step never syncs with the host and can be captured in a CUDA graph
    after a warm-up step; ``differentiable=True`` is not supported (raises). Unlike torch.optim.Adam: a param
    listed twice in one group raises (torch warns; one fused launch would update it twice), lr may be a float or a
    1-element tensor but eps and weight_decay must be real numbers, not tensors (checked at construction and at
    each step), and params other than float32/float16/bfloat16/float64 are accepted only while they do not require
    grad (a frozen integer or complex tensor is skipped, as torch skips it; one that gets a grad raises at the step).

    float64 params (a float64 layer or scalar beside the 16-bit model) are stepped in float64 by torch's own fused
    Adam / AdamW (torch._fused_adam_ / _fused_adamw_, one call per device), bit-identical to
    torch.optim.Adam(W)(fused=True): float64 moments, no master, with this step's grad scale, skip flag and
    clipping coefficient (their grads join the clipping norm), also when their tensors are laid out apart (then
    through contiguous copies: torch's fused kernels walk memory in order). Under torch.compile their launch runs
    eagerly: a graph break, which fullgraph=True refuses.

    With torch.amp.GradScaler or mixprec_ops.amp.GradScaler (``_step_supports_amp_scaling``) grads are divided
    by the scale inside the kernel and a step with inf/NaN grads is skipped on the device: params, masters,
    moments and step counters stay bit-unchanged. The grads are only read: after scaler.step(opt) they still hold
    the scaled values (torch's fused Adam writes the unscaled grads back, its for-each Adam steps after the scaler
    unscaled them in place); to log or reuse unscaled grads, call scaler.unscale_(opt) before the step (fp32 and
    bf16 grads; torch's rule refuses fp16 ones there) or read ``grad_norm``. Params may be float32, float16 and
    bfloat16 (and float64, above), mixed in one group; grads may be any of those three dtypes (a grad whose dtype is
    neither its param's nor float32 is widened to float32 for the step: a temporary of 4 bytes per element, held
    until its bucket's launch; a float64 param's grad is float64, or widened to it).
    """

    _step_supports_amp_scaling = True
    _has_dtensor_params = False  # any DTensor param (FSDP2, TP): kept by add_param_group and __setstate__

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, master_weights="auto", state_dtype=torch.float32, max_grad_norm=None,
                 norm_across_ranks=False, backend=None):
        # torch.optim.Adam's checks, in its order and words
        if isinstance(lr, torch.Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {len(betas)} values")
        for i in (0, 1):
            if not 0.0 <= betas[i] < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not all(isinstance(b, float) for b in betas) and not all(isinstance(b, torch.Tensor) for b in betas):
            raise ValueError("betas must be either both floats or both Tensors")
        for i in (0, 1):
            if isinstance(betas[i], torch.Tensor):
                if not capturable and foreach:
                    raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
                if betas[i].numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        _check_group_options(master_weights, state_dtype)
        state_dtype = _state_dtype_name(state_dtype)
        if max_grad_norm is not None and not float(max_grad_norm) > 0:
            raise ValueError(f"max_grad_norm must be None or > 0, got {max_grad_norm}")
        if norm_across_ranks is not False:
            if norm_across_ranks is not True and not (_dist_ok() and isinstance(norm_across_ranks,
                                                                               torch.distributed.ProcessGroup)):
                raise TypeError(f"norm_across_ranks must be False, True or a torch.distributed ProcessGroup, got "
                                f"{type(norm_across_ranks).__name__}")
            if max_grad_norm is None:
                raise ValueError("norm_across_ranks applies to max_grad_norm's norm: set max_grad_norm too")
            if not (_dist_ok() and torch.distributed.is_initialized()):
                raise RuntimeError("norm_across_ranks needs torch.distributed initialized (init_process_group)")
        if differentiable:
            if fused:  # torch's check, in its words (it is checked before the one below there too)
                raise RuntimeError("`fused` does not support `differentiable`")
            raise ValueError("differentiable=True is not supported: the step runs in fused kernels without autograd")
        backends.requested(backend)  # a bad name fails here, not at the first step after a forward and backward
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=False,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay, master_weights=master_weights,
                        state_dtype=state_dtype)
        super().__init__(params, defaults)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.norm_across_ranks = norm_across_ranks
        self.backend = backend
        self._last = {"grad_norm": None}  # see grad_norm
        self._plans = {}  # id(param) -> per-param step plan (see _bucket_group)
        self._plan_sizes = (0, 0)  # (params in the groups, len(state)) after the last step (_forget_dropped_plans)
        self._steady_reset()  # the last step's planning, for the next to reuse (see _steady.py)
        self._ones = {}  # device -> 1-element fp32 1.0 (see _one)

    @property
    def grad_norm(self):
        """The global L2 norm of the grads (unscaled) at the last step with max_grad_norm (a 0-dim device tensor),
        else None. Kept in a dict, which a compiled step may update (torch 2.11's Dynamo refuses to set an
        attribute on the optimizer)."""
        return self._last["grad_norm"]

    @grad_norm.setter
    def grad_norm(self, value):
        self._last["grad_norm"] = value

    _EXTRA_ATTRS = ("max_grad_norm", "backend", "norm_across_ranks")

    def __getstate__(self):  # torch's keeps defaults, state and param_groups only
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._EXTRA_ATTRS}}

    # Group keys an older (or another class's) state_dict may lack, filled as torch.optim.Adam's __setstate__ does
    _GROUP_FALLBACKS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                            decoupled_weight_decay=False, fused=None)

    def __setstate__(self, state):
        super().__setstate__(state)
        for k in self._EXTRA_ATTRS:
            self.__dict__.setdefault(k, False if k == "norm_across_ranks" else None)
        self._last = {"grad_norm": None}
        self._plans = {}
        self._plan_sizes = (0, 0)
        self._steady_reset()
        self._ones = {}
        self._has_dtensor_params = any_dtensor(p for group in self.param_groups for p in group["params"])
        for group in self.param_groups:
            for k, v in self._GROUP_FALLBACKS.items():
                group.setdefault(k, v)
            group.setdefault("master_weights", self.defaults.get("master_weights", "auto"))
            group["state_dtype"] = _state_dtype_name(group.get("state_dtype", self.defaults.get("state_dtype",
                                                                                                  "float32")))
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):  # an int step (torch before 1.12)
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32, device=p.device)

    @torch._disable_dynamo
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1}"
        try:
            seen = set()
            for i, p in enumerate(group["params"]):
                if p.dtype not in _PARAM_DTYPES and p.requires_grad:  # a frozen one is skipped, as by torch's
                    raise TypeError(f"param {i} of {where} is {p.dtype}: mixprec_ops.optim supports float32, "
                                    "float16, bfloat16 and float64 params")
                if id(p) in seen:  # torch only warns; one fused launch would update it twice, racing
                    raise ValueError(f"param {i} of {where} appears twice in it (a tied weight collected once per "
                                     "module?); list each param once, as model.parameters() does")
                seen.add(id(p))
            _check_group_options(group["master_weights"], group["state_dtype"])
            self._check_hyperparameters(group)  # here, not only at the first step after a forward and backward
            self._has_dtensor_params = self._has_dtensor_params or any_dtensor(group["params"])
            group["state_dtype"] = _state_dtype_name(group["state_dtype"])
        except Exception:
            self.param_groups.pop()
            raise

    @torch._disable_dynamo
    def state_dict(self):
        """torch.optim.Optimizer.state_dict, with each step counter a tensor of its own: the live counters are views
        of one buffer per bucket (_step_buffer), and a view pickles its whole buffer (pickle.dumps of the
        state_dict, which all_gather_object and broadcast_object_list use, grew with the square of the number of
        params: 67.6 MB for 4,000 params, 3.6 MB with torch's AdamW; torch.save of one param's state wrote every
        counter). The live state is not changed; the counters handed out are copies taken at this call, where the
        other state tensors are the live ones (as torch's): save a state_dict when it is taken."""
        sd = super().state_dict()
        state = sd["state"]
        for k, st in state.items():
            step = st.get("step")
            if isinstance(step, torch.Tensor) and step._base is not None:
                state[k] = {**st, "step": step.clone()}  # (a new dict: st is the live state's)
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict):
        """Load a state_dict of this class or of torch.optim.Adam/AdamW, as torch's Optimizer.load_state_dict does
        (its pre-hooks first, the same checks, state not tied to a param kept, its post-hooks last), except for its
        dtype policy, which casts floating state to the param's dtype: here moments keep the group's state_dtype,
        masters stay fp32 and step counters are fp32 on the param's device. A torch state_dict's groups lack
        master_weights and state_dtype: each group keeps its current ones. Masters missing (torch's state) are made
        from the params at the next step. Masters of float32 params (a 16-bit run resumed in fp32) are taken over by
        their params here: elements that still hold a master's bf16/fp16 rounding continue from its fp32 value (so
        load the model's weights first, as torch.distributed.checkpoint does); then the masters are dropped."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        groups = self.param_groups
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(sg["params"]) for g, sg in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's "
                             "group")
        for g, sg in zip(groups, saved_groups):
            sg.setdefault("master_weights", g["master_weights"])
            sg.setdefault("state_dtype", g["state_dtype"])
            _check_group_options(sg["master_weights"], sg["state_dtype"])
            sg["state_dtype"] = _state_dtype_name(sg["state_dtype"])
        id_map, group_of = {}, {}
        for g, sg in zip(groups, saved_groups):
            for pid, p in zip(sg["params"], g["params"]):
                id_map[pid], group_of[pid] = p, sg
        state = defaultdict(dict)
        for k, v in state_dict["state"].items():
            state[id_map[k] if k in id_map else k] = self._loaded_state(id_map[k], group_of[k], v) if k in id_map \
                else v
        # a 16-bit run's masters loaded for fp32 params: taken over now (the model's weights loaded first, as
        # torch.distributed.checkpoint and Hugging Face load them), every shape checked before any is
        adopt = [(p, st) for p, st in state.items() if isinstance(p, torch.Tensor)
                 and p.dtype in (torch.float32, torch.float64)
                 and isinstance(st, dict) and "master_param" in st]
        for p, st in adopt:
            check_state_shape("master_param", _local(p), _local(st["master_param"]))
        for p, st in adopt:
            self._adopt_master(p, st)
        for g, sg in zip(groups, saved_groups):
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
        self.__setstate__({"state": state, "param_groups": saved_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @staticmethod
    def _loaded_state(p, group, saved):
        """One param's loaded state, copied (never aliasing the caller's tensors) to the dtypes this class keeps."""
        if not isinstance(saved, dict):
            return saved
        new = {}
        for k, v in saved.items():
            if not isinstance(v, torch.Tensor):
                new[k] = v
            elif k == "step":
                new[k] = v.to(device=p.device, dtype=torch.float32, copy=True).reshape(())
            elif k == "master_param":  # (an fp32 param's is taken over by it in load_state_dict: _adopt_master)
                new[k] = v.to(device=p.device, dtype=torch.float32, copy=True)
            elif k in _STATE_KEYS:  # (a float64 param's moments are float64, as torch's: _init_state)
                new[k] = v.to(device=p.device, copy=True, dtype=torch.float64 if p.dtype == torch.float64
                              else _STATE_DTYPES[group["state_dtype"]])
            else:
                new[k] = v.to(device=p.device, copy=True)
        return new

    # ----------------------------------------------------------------------------------------------- state
    def _wants_master(self, group, p) -> bool:
        mw = group["master_weights"]
        return p.dtype in _MASTERED and (mw is True or mw == "auto")

    def _init_state(self, group, p):
        """Create whatever state p lacks (all of it on the first step; a master after loading torch's state)."""
        state = self.state[p]
        if p.dtype in (torch.float32, torch.float64) and "master_param" in state:  # p is the master now
            # (model.float() or model.double() after 16-bit steps)
            if torch.compiler.is_compiling():  # Inductor drops the 16-bit round trips _adopt_master compares with
                raise RuntimeError(
                    f"mixprec_ops.optim: a {str(p.dtype)[6:]} param still has the fp32 master of its 16-bit past "
                    "(model.float() after 16-bit steps); call opt.resync_masters() eagerly before compiling the step")
            self._adopt_master(p, state)
        wanted = ("step", *_STATE_KEYS[:3 if group["amsgrad"] else 2],
                  *(("master_param",) if self._wants_master(group, p) else ()))
        missing = [k for k in wanted if k not in state]
        # a float64 param's moments are float64 (_step_wide), the others' never are: a param whose dtype crossed that
        # line (model.double() after steps, or back) has its moments converted (values kept)
        wide = p.dtype == torch.float64
        sd = torch.float64 if wide else _STATE_DTYPES[_state_dtype_name(group["state_dtype"])]
        retyped = [k for k in _STATE_KEYS if isinstance(state.get(k), torch.Tensor)
                   and (state[k].dtype == torch.float64) != wide]
        if (missing or retyped) and self._capturing(p.device):  # the graph would record it and redo it every replay
            raise RuntimeError(
                f"mixprec_ops.optim: state {missing or retyped} of a {tuple(p.shape)} param would be created inside a "
                "CUDA graph capture, where every replay would reset it; run one step outside the capture first (after "
                "a param's first grad, load_state_dict of a torch state_dict or turning amsgrad on)")
        for k in retyped:
            state[k] = state[k].to(sd)
        for k in missing:
            if k == "step":
                state[k] = torch.zeros((), dtype=torch.float32, device=p.device)
            elif k == "master_param":
                state[k] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
            else:  # the moments
                state[k] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------------------------------------ step
    def _collect(self):
        """Validate every param with a grad before anything is touched; return [(group, [params])]. A group whose
        grads mixprec::grad_kinds finds plain (the extension's one C++ sweep, in plain eager execution) skips the
        Python checks below (~1 us a param); any other grad sends its group through them (they raise, or handle
        DTensor). Only for groups of torch.Tensor / nn.Parameter params: a subclass's __torch_dispatch__ (DTensor,
        a quantized weight's) would otherwise receive the op."""
        out = []
        sweep = _GRAD_KINDS is not None and not self._has_dtensor_params and _checks.eager_untransformed()
        for gi, group in enumerate(self.param_groups):
            if sweep and set(map(type, group["params"])) <= _checks.PLAIN:
                kinds = _GRAD_KINDS(group["params"]).tolist()
                if 2 not in kinds:
                    ps = list(compress(group["params"], kinds))
                    if ps:
                        out.append((group, ps))
                    continue
            ps = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or not (g.dtype in FLOAT_SOURCES or g.dtype == p.dtype == torch.float64) \
                        or g.device != p.device or g.shape != p.shape:
                    self._bad_grad(f"param {i} of param group {gi}", p, g)
                if (self._has_dtensor_params or type(g) is not torch.Tensor) and DTensor is not None \
                        and (isinstance(g, DTensor) or isinstance(p, DTensor)):
                    if not (isinstance(g, DTensor) and isinstance(p, DTensor)):
                        raise TypeError(f"param {i} of param group {gi}: the param is "
                                        f"{'a' if isinstance(p, DTensor) else 'not a'} DTensor but its grad is "
                                        f"{'one' if isinstance(g, DTensor) else 'not'}")
                    if g.placements != p.placements:
                        # Tensor parallelism: a replicated param's grad can arrive Partial (a LayerNorm weight under
                        # SequenceParallel: each rank holds its own share of a sum). Laid out like the param, as
                        # torch's DTensor ops do implicitly, or each rank steps with its own share and the replicas
                        # drift apart.
                        p.grad = p.grad.redistribute(p.device_mesh, p.placements)
                ps.append(p)
            if ps:
                out.append((group, ps))
        return out

    def _forget_dropped_plans(self):
        """After a step: forget the plans of params whose state is gone (deleted to free a frozen layer's memory,
        or the param dropped from the groups with its state), which would keep the param and its state tensors
        alive. Looked at only when the number of params or of states has changed since the last step. Eager steps
        only (torch 2.11's Dynamo refuses to set attributes on the optimizer; a compiled step keeps the plans)."""
        n = sum(len(g["params"]) for g in self.param_groups)
        sizes = (n, len(self.state))
        # (a plan without a state: one deleted while another param got its first state in the same step)
        if sizes != self._plan_sizes or len(self._plans) > sizes[1]:
            # Params dropped from the groups (or swapped), states deleted: the plans of the params whose states are
            # gone go. A plan whose state is kept stays, holding nothing the state does not, so that its version
            # counter does too: a plan made anew counts its master as loaded, and a write to an fp16 param that
            # equals the master's rounding through bf16 would be taken for that rounding and undone (it was, when
            # more than 64 params left at once and every plan was cleared; the params that come back included).
            if (len(self._plans) > n + 64 or sizes[0] < self._plan_sizes[0] or sizes[1] < self._plan_sizes[1]
                    or len(self._plans) > sizes[1]):
                self._forget_steady()
                state = self.state
                self._plans = {k: v for k, v in self._plans.items() if state.get(v[self._P]) is v[self._ST]}
            self._plan_sizes = sizes

    def _check_hyperparameters(self, group):
        """The group's lr, betas, eps and weight_decay have types the step can use (they may have been set after
        construction: a scheduler, a config loader's strings): checked for every group before any is updated, with
        a message naming the group and the key."""
        def bad(key, v, want):
            gi = next(i for i, g in enumerate(self.param_groups) if g is group)
            raise TypeError(f"param group {gi}: {key} must be {want}, got {v!r}")

        def real(v):
            return type(v) is float or isinstance(v, numbers.Real) and not isinstance(v, bool)

        lr = group["lr"]
        if not (real(lr) or isinstance(lr, torch.Tensor) and lr.numel() == 1 and lr.is_floating_point()):
            bad("lr", lr, "a float or a 1-element float tensor")
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
                real(b) or isinstance(b, torch.Tensor) and b.numel() == 1 for b in betas)):
            bad("betas", betas, "a pair of floats (or of 1-element tensors)")
        for key in ("eps", "weight_decay"):
            if not real(group[key]):
                bad(key, group[key], "a float")

    @staticmethod
    def _bad_grad(where, p, g):
        if p.dtype not in _PARAM_DTYPES:  # accepted while frozen (add_param_group); now it has a grad
            raise TypeError(f"{where} is {p.dtype}: mixprec_ops.optim supports float32, float16, bfloat16 and "
                            "float64 params")
        if g.is_sparse:
            raise RuntimeError(f"{where}: Adam does not support sparse gradients")
        if g.dtype not in FLOAT_SOURCES and not g.dtype == p.dtype == torch.float64:
            raise TypeError(f"{where}: grad dtype must be float32, float16 or bfloat16 (or float64, for a float64 "
                            f"param), got {g.dtype}")
        if g.device != p.device:
            raise ValueError(f"{where}: grad is on {g.device} but the param is on {p.device}")
        raise ValueError(f"{where}: grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")

    def _mixprec_flags_inf_itself(self) -> bool:
        """True when step() reads every grad before updating anything and flags inf/NaN in that pass (the clipping
        norm pass), and no step pre-hook (this optimizer's or a global one) runs between a scaler's check and that
        pass (a hook may change the grads): mixprec_ops.amp.GradScaler then skips its own read-only check pass and
        takes this flag. Not while compiling (a compiled region holding scaler.step: the scaler's own check is
        traced as usual), nor when this optimizer's step was replaced on the instance (opt.step =
        torch.compile(opt.step): a compiled step cannot take the flag over), an LR scheduler's wrapper excepted."""
        from torch.optim.optimizer import _global_optimizer_pre_hooks

        return (self.max_grad_norm is not None and not self._optimizer_step_pre_hooks
                and not _global_optimizer_pre_hooks and self._step_is_ours()
                and not torch.compiler.is_compiling())

    def _step_is_ours(self) -> bool:
        """opt.step is this class's step: not replaced on the instance, or replaced only by an LR scheduler's
        wrapper (every torch.optim.lr_scheduler wraps opt.step to note that it was called, then calls the class's
        step; a compiled step wrapped around that wrapper is not ours: its __wrapped__ is the wrapper)."""
        s = self.__dict__.get("step")
        return s is None or (getattr(s, "_wrapped_by_lr_sched", False)
                             and getattr(s, "__wrapped__", None) is type(self).step)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (see the class docstring). Returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # mixprec_ops.amp.GradScaler hands over its inf/NaN check (one read of the grads) when clipping reads them
        # anyway: (its found-inf dict, its device), which this step's norm pass fills (_mixprec_flags_inf_itself)
        # (Never handed over while compiling: see _mixprec_flags_inf_itself; Dynamo cannot trace the pop.)
        found_out = None if torch.compiler.is_compiling() else self.__dict__.pop("_mixprec_found_inf_out", None)
        grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler.step()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, torch.Tensor):
            found_inf = None  # torch.amp.GradScaler sets sum([]) == 0 when this optimizer's params have no grads
        eager = not torch.compiler.is_compiling()
        steady = self._steady_step()  # the last step's planning, when nothing it rests on has changed
        if steady is not None:
            collected = [(group, ps) for group, ps, _ in steady]
        else:
            collected = self._collect()
            if eager and collected:  # (a step without grads keeps the record for the next step with them)
                self._forget_steady()
        if not collected:
            if self.max_grad_norm is not None and (self.norm_across_ranks is not False or self._has_dtensor_params):
                _, found = self._grad_stats([], grad_scale, found_inf)  # the other ranks wait for this rank's share
                # what the other ranks found: every rank's scaler backs off alike; when no rank held a grad (a
                # step on a no-sync micro-step) no flag, and the scaler's update() raises as torch's does (a host
                # read, on this path only)
                if found_out is not None and self._last["grads_anywhere"].item() > 0:
                    found_out[0][found_out[1]] = found.reshape(()).to(found_out[1])
            return loss
        # Every group is planned (missing state created, buckets formed) before any group is updated: an error
        # there (out of memory for new state, say) leaves all params and states as they were.
        for group, _ in collected:
            self._check_hyperparameters(group)
        if steady is None:
            planned = [(group, *self._bucket_group(group, ps)) for group, ps in collected]
            runs = [(group, self._units(buckets, fallback, group["amsgrad"])) for group, buckets, fallback in planned]
        else:
            runs = [(group, units) for group, _, units in steady]
        clip = None
        if self.max_grad_norm is not None:
            # (float64 grads, whose squares the norm pass does not take, come with float64 params' launches)
            wide = any(u[2] == _WIDE for _, units in runs for u in units)
            clip, found_inf = self._grad_stats(collected, grad_scale, found_inf,
                                               by_device=None if steady is None else self._steady_grads(collected),
                                               wide=wide)
            if found_out is not None:
                found_out[0][found_out[1]] = found_inf.reshape(()).to(found_out[1])
        for group, units in runs:
            self._run_group(group, units, grad_scale, found_inf, clip)
        if eager:
            if steady is None:
                self._note_versions(planned)
                self._remember_steady(planned)
            else:
                self._steady_noted()
            self._forget_dropped_plans()
        return loss

    # A param's plan: what does not change between steps, computed once and reused while it holds (see
    # _bucket_group). A list: the step-buffer fields are updated in place when a bucket's counters are regrouped.
    (_ST, _LEN, _P, _OPTS, _LP, _STATES, _MASTER, _STEP, _WALK, _KEY, _PDTYPE, _PLAIN, _CONTIG, _BUF, _IDX,
     _HELD, _SHARD, _VER, _PTR) = range(19)

    def _bucket_group(self, group, ps):
        """(buckets, fallback) of one group's params with grads. buckets: {(device, param dtype, state dtype, master
        or not, grad dtype): (entries, step buffer)}; fallback: entries whose layouts the kernels cannot walk (rare;
        the reference serves them). An entry: (local param, grad, states, master, plan)."""
        amsgrad = group["amsgrad"]
        buckets = defaultdict(list)
        fallback = []
        resync = []
        watch = not torch.compiler.is_compiling()  # the version checks would not trace (data-dependent)
        n_states = 3 if amsgrad else 2
        plans, state = self._plans, self.state
        options = (amsgrad, group["master_weights"], group["state_dtype"], self.backend)
        for p in ps:
            st = state[p]
            # The plan (local param, states, master, step counter, whether their layouts walk together) is reused
            # while the param (and its dtype and layout: p.data = x can change them), its state dict
            # (load_state_dict replaces it), the dict's size, its tensors (one replaced by hand:
            # st["exp_avg"] = t), the group's state options and, for a DTensor, its local tensor
            # (FSDP2 may swap it; compared as DTensor._local_tensor because to_local() on a Parameter(DTensor)
            # returns a new view each call) stay the same. Missing state (the first step, a master after loading
            # torch's state, amsgrad turned on) is created when (re)planning. Grads are new tensors every step.
            # A plain dict by id(p): the plan holds p, so the id is not reused.
            plan = plans.get(id(p))
            stale = (plan is None or plan[0] is not st or plan[1] != len(st) or plan[2] is not p
                     or plan[3] != options or plan[7] is not st.get("step") or p.dtype is not plan[10]
                     or (plan[11] and p.is_contiguous() is not plan[12])
                     or (not plan[11] and getattr(p, "_local_tensor", None) is not plan[16]))
            if not stale:
                for k, v in plan[15]:
                    if st.get(k) is not v:
                        stale = True
                        break
            cross = False  # may the param hold the master's rounding through the other 16-bit format? (_resync)
            if stale:
                old = plan
                # A master that exists before this param's first plan here (loaded by load_state_dict, or kept by a
                # copy of the optimizer) has no version to compare with: the param may have been written since it
                # was saved (model weights loaded from elsewhere, a head re-initialised), so the first step checks
                # it against the param (_VER = -1, a version no tensor has; an unchanged param costs one pass).
                unknown = old is None and "master_param" in st and p.dtype in _MASTERED
                cross = unknown or (old is not None and old[10] is not p.dtype)  # loaded, or the dtype changed
                self._init_state(group, p)
                st = state[p]
                if st["step"].dim() != 0:  # a 1-element step from elsewhere: 0-dim, as torch keeps it
                    st["step"] = st["step"].reshape(())
                lp = _local(p)
                states = [_local(st[k]) for k in _STATE_KEYS[:n_states]]
                master = _local(st["master_param"]) if "master_param" in st else None
                for k, t in zip((*_STATE_KEYS[:n_states], "master_param"), (*states, master)):
                    if t is not None:
                        check_state_shape(k, lp, t)
                walk = all(_dense_like(x, lp) for x in states) and (master is None or _dense_like(master, lp))
                held = tuple((k, st[k]) for k in (*_STATE_KEYS[:n_states], "master_param") if k in st)
                plan = [st, len(st), p, options, lp, states, master, st["step"], walk,
                        (lp.device, lp.dtype, states[0].dtype, master is not None), lp.dtype, lp is p,
                        lp.is_contiguous(), None, -1, held, getattr(p, "_local_tensor", None),
                        # the param's version counter and data pointer after our last step, kept across
                        # replanning: see _resync
                        -1 if unknown else None if old is None else old[self._VER],
                        None if old is None else old[self._PTR]]
                plans[id(p)] = plan
            lp, states, master, _, walk, pkey, pdtype, plain, contig = plan[4:13]
            if master is not None and watch:  # written outside the optimizer since our last step? (see _resync)
                ptr = lp.data_ptr()
                if plan[17] is not None and ((lp._version if plain else _versions(plan)) != plan[17]
                                             or ptr != plan[18]):
                    # (a loaded master met first inside a CUDA graph capture is trusted: no check can be recorded)
                    if not (plan[17] == -1 and self._capturing(lp.device)):
                        resync.append((lp, master, cross or plan[17] == -1))
                plan[18] = ptr
            g = p.grad if plain else _local(p.grad)
            gdtype = g.dtype
            if gdtype is not pdtype and (gdtype is not torch.float32 or pdtype is torch.float64):
                g = g.to(torch.float64 if pdtype is torch.float64 else torch.float32)
                gdtype = g.dtype
            if not (contig and g.is_contiguous()) and not _dense_like(g, lp):
                if contig:
                    g = g.contiguous()
                elif torch.ops.aten.is_non_overlapping_and_dense(lp) and not self._capturing(lp.device):
                    # a transposed or channels_last param: its grad copied into its layout for the kernel, not the
                    # reference's per-param step (except in a CUDA graph capture: the Triton kernels' tables need
                    # the very tensors of the warm-up step, which a new copy is not)
                    g = torch.empty_like(lp, dtype=g.dtype).copy_(g)
                walk = walk and _dense_like(g, lp)
            entry = (lp, g, states, master, plan)
            if not walk or pdtype is torch.float64:  # (float64: torch's fused Adam, _step_wide)
                fallback.append(entry)
                continue
            buckets[(pkey, gdtype)].append(entry)
        self._resync(resync)
        return {k: (entries, self._step_buffer(entries)) for k, entries in buckets.items()}, fallback

    def _step_buffer(self, entries):
        """The bucket's step counters as one 1-D fp32 tensor whose elements ARE the params' state["step"] tensors
        (0-dim views of it, in bucket order), so that the scalars read it directly and one add_ counts the step
        for the whole bucket (instead of a stack and a _foreach_add_ over thousands of 0-dim tensors: ~1.8 us per
        param on a CPU). Reused while the bucket holds the same params in the same order; otherwise (first step,
        params without grads this step, loaded state) the counters are copied into a new buffer and each
        state["step"] becomes a view of it: same values, so nothing observable changes but the tensor identity."""
        buf = entries[0][4][self._BUF]
        if (buf is not None and buf.numel() == len(entries)
                and all(e[4][self._BUF] is buf and e[4][self._IDX] == i for i, e in enumerate(entries))):
            return buf
        if self._capturing(entries[0][0].device):
            # Regrouping inside a CUDA graph capture would record the copy into the new buffer, and each replay
            # would copy the old counters in again (they never advance). Count this bucket per param instead.
            return None
        dev = entries[0][0].device
        buf = torch.stack([e[4][self._STEP].to(dev, torch.float32) for e in entries])
        for i, (e, view) in enumerate(zip(entries, buf.unbind(0))):
            plan = e[4]
            plan[self._ST]["step"] = plan[self._STEP] = view
            plan[self._BUF], plan[self._IDX] = buf, i
        return buf

    @staticmethod
    def _capturing(device) -> bool:
        return device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _units(self, buckets, fallback, amsgrad):
        """The launches of one planned group: [(lists, steps, backend, bucket)]. lists: (params, grads, exp_avgs,
        exp_avg_sqs, max_exp_avg_sqs, masters), as adam_step_ takes them; steps: the bucket's step buffer (a tensor),
        or the per-param counters (a list: fallback entries, a bucket met during capture); bucket: the state lists
        held on the C++ side (a steady step's, see _steady.py: then the grads may be None), else None."""
        units = [(self._lists(entries, amsgrad), buf if buf is not None else [e[4][self._STEP] for e in entries],
                  self.backend, None) for entries, buf in buckets.values()]
        wide = defaultdict(list)  # float64 params: one torch fused launch per device (_step_wide)
        for e in fallback:
            if e[0].dtype is torch.float64:
                wide[e[0].device].append(e)
            else:
                units.append((self._lists([e], amsgrad), [e[4][self._STEP]], "torch", None))
        units += [(self._lists(es, amsgrad), [e[4][self._STEP] for e in es], _WIDE, None) for es in wide.values()]
        return units

    @staticmethod
    def _lists(entries, amsgrad):
        return ([e[0] for e in entries], [e[1] for e in entries], [e[2][0] for e in entries],
                [e[2][1] for e in entries], [e[2][2] for e in entries] if amsgrad else [],
                [e[3] for e in entries] if entries[0][3] is not None else [])

    def _run_group(self, group, units, grad_scale, found_inf, clip):
        beta1, beta2 = (float(b) for b in group["betas"])
        decoupled = group["decoupled_weight_decay"]
        counted = {}  # device -> 1.0, or 0.0 when found_inf says this step is skipped (a skipped step does not count)

        def count(dev):
            if dev not in counted:
                counted[dev] = 1.0 if found_inf is None else (found_inf.to(dev).reshape(()) == 0).float()
            return counted[dev]

        for lists, steps, backend, bucket in units:
            if backend == _WIDE:
                self._step_wide(group, lists, steps, beta1, beta2, decoupled, grad_scale, found_inf, clip, count)
                continue
            if self._launch(group, lists, steps, beta1, beta2, decoupled, grad_scale, found_inf, clip, backend,
                            bucket):
                continue  # (the bucket op counted the step)
            if isinstance(steps, torch.Tensor):  # the step buffer: one add for the bucket
                steps.add_(count(steps.device))
            else:
                torch._foreach_add_(steps, count(steps[0].device))

    def _launch(self, group, lists, steps, beta1, beta2, decoupled, grad_scale, found_inf, clip, backend, bucket):
        """One unit's launch (_units). Returns True when it counted the step too (the bucket op), else the caller
        counts it. lists[1] (the grads) is None when a steady step's bucket checked them (_steady.py): read from the
        params here if the bucket cannot take the launch after all."""
        params = lists[0]
        dev = params[0].device
        backend = _select_backend(dev, backend)  # once, for the scalars and the step
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device.type == "cpu" and dev.type != "cpu" and not (torch.compiler.is_compiling()
                                                                     or self._capturing(dev)):
                # read on the host, as torch's fused Adam does with a CPU lr: a copy to the device would be a
                # blocking one (a stream sync per bucket per step). Same fp64 value as lr.double() (bit-identical
                # scalars). Compiled or captured, the copy stays: a host read would fix lr in the graph.
                lr = lr.item()
            else:
                lr = lr.to(dev)
        on = lambda t: t if t is None or t.device == dev else t.to(dev)  # noqa: E731  (no op when it is there)
        if (bucket is not None and backend in ("cpu", "cuda") and isinstance(steps, torch.Tensor)
                and (not isinstance(lr, torch.Tensor) or lr.dtype in (torch.float32, torch.float64))):
            # the steady step's bucket (given only when ops.adam.bucket_usable() held): scalars, step and count in
            # one op call
            # (the grads when the steady step's checks read them: a DTensor bucket's local shards, which the op cannot
            # read from its params; plain params' own, as the op would read them)
            grads = lists[1] if BUCKET_TAKES_GRADS else None
            adam_step_bucket_(params, bucket, steps, lr, beta1, beta2, group["eps"], group["weight_decay"], decoupled,
                              group["maximize"], on(grad_scale), on(found_inf), on(clip), grads)
            return True
        grads = lists[1] if lists[1] is not None else [p.grad for p in params]
        scalars = adam_scalars(steps, lr, beta1, beta2, group["weight_decay"], backend=backend)
        adam_step_(params, grads, *lists[2:], scalars, beta1, beta2, group["eps"], group["weight_decay"], decoupled,
                   group["maximize"], on(grad_scale), on(found_inf), on(clip), backend=backend)
        return False

    @torch._disable_dynamo  # Dynamo cannot functionalize torch's fused kernels on params it holds: a graph break
    def _step_wide(self, group, lists, steps, beta1, beta2, decoupled, grad_scale, found_inf, clip, count):
        """float64 params (one device's): torch's own fused Adam / AdamW, in float64 as torch.optim.Adam(W)(fused=True)
        steps them (moments float64, no master; bit-identical to it), with this step's grad scale, skip flag and
        clipping coefficient. As torch's, the counters are advanced before the kernel, which reads them (by 0 on a
        skipped step, which the kernel then leaves alone)."""
        amsgrad = group["amsgrad"]
        kept = [lists[0], lists[2], lists[3], *([lists[4]] if amsgrad else [])]  # what the kernel writes
        cols = [lists[0], lists[1], *kept[1:]]
        # torch's fused kernels walk a tensor's elements in memory order, whatever its strides: a param whose tensors
        # are not all laid out alike and densely (a strided slice, a layout changed after its moments were made, a
        # checkpoint's) steps through contiguous copies, written back after (torch's own fused Adam would not)
        odd = [i for i, p in enumerate(lists[0]) if not all(_dense_like(c[i], p) for c in cols)]
        if odd:
            cols = [list(c) for c in cols]
            for i in odd:
                for c in cols:
                    c[i] = c[i].contiguous()
        params, grads, exp_avgs, exp_avg_sqs, *maxes = cols
        dev = params[0].device
        torch._foreach_add_(steps, count(dev))
        # The grads are only read (the class docstring): the clipped ones are temporaries (float64, like the grads),
        # and with a grad scale, which torch's kernel divides out and writes back into the grads, so are the others
        if clip is not None:
            grads = torch._foreach_mul(grads, clip.to(dev, torch.float64).reshape(()))
        elif grad_scale is not None:
            grads = [g.clone() for g in grads]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):  # as _launch: a CPU lr is read on the host for a CUDA step (torch's rule)
            if lr.device.type == "cpu" and dev.type != "cpu" and not self._capturing(dev):
                lr = lr.item()
            else:  # (torch's CUDA kernel reads a tensor lr as fp32; its CPU kernel as a double)
                lr = lr.to(dev, torch.float32 if dev.type != "cpu" else lr.dtype)
        # torch's kernel skips a step on found_inf == 1 exactly; a scaler's flag is a sum over its devices (2 when
        # two found inf), which the counters (count) read as a skip
        skip = None if found_inf is None else (found_inf.to(dev).reshape(1) != 0).float()
        (torch._fused_adamw_ if decoupled else torch._fused_adam_)(
            params, grads, exp_avgs, exp_avg_sqs, maxes[0] if amsgrad else [], steps, lr=lr, beta1=beta1,
            beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=amsgrad,
            maximize=group["maximize"], grad_scale=None if grad_scale is None else grad_scale.to(dev), found_inf=skip)
        for i in odd:
            for orig, c in zip(kept, [params, *cols[2:]], strict=True):
                if orig[i] is not c[i]:
                    orig[i].copy_(c[i])


class AdamW(Adam):
    """AdamW (decoupled weight decay) with fp32 master weights: torch.optim.AdamW's arguments and defaults
    (weight_decay=1e-2) plus master_weights, state_dtype, max_grad_norm, norm_across_ranks and backend; see Adam."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights="auto", state_dtype=torch.float32, max_grad_norm=None, norm_across_ranks=False,
                 backend=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights, state_dtype=state_dtype,
                         max_grad_norm=max_grad_norm, norm_across_ranks=norm_across_ranks, backend=backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim.AdamW: an Adam state_dict loaded here decays decoupled
            group["decoupled_weight_decay"] = True
