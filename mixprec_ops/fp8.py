"""FP8 scaling recipes on top of cast_and_scale.

scale = (fp8_max / 2**margin) / amax; the previous scale is kept when amax is 0 or non-finite (or the new scale
would overflow). All state lives in device tensors, so no step reads anything back to the host, and each class's
state_dict round-trips through load_state_dict. Quantized values are x * scale; dequantize with `scale_inv`, 1 / the
scale of the last cast (what torch._scaled_mm expects), which stays right after update() moves the scale on.

  CurrentScaling: the scale comes from the tensor being cast (an amax pass, then the cast pass).
  DelayedScaling: the scale comes from a history of earlier amaxes; the cast records the new amax in the same
                  pass (TransformerEngine's recipe: E4M3 forward, E5M2 backward, history up to 1024).
  update_all(recipes): DelayedScaling.update() of many recipes in a fixed number of kernels (one model's
                  per-layer recipes, once per step), bit for bit what updating them one by one does.

Where this differs from TransformerEngine's DelayedScaling: a non-finite amax (an inf or NaN tensor) enters the
history as 0, so the scale recovers at the next finite step (TE keeps the inf, which holds the scale for the
history's length); a scale that would overflow keeps the previous one (TE clamps it to the fp32 maximum), which for
CurrentScaling means that a tensor whose amax is below fp8_max / 3.4e38 is cast with the previous scale; the scale
is one correctly rounded fp32 division, as TE's and torchao's. DelayedScaling's first cast, before any update(),
uses scale 1 (as TE; torchao's old delayed scaling took that tensor's own amax): a tensor far from fp8's range
saturates or flushes to zero at that first step (run a calibration step, or update() after recording an amax with
a first quantize whose output is discarded). A recipe is not an nn.Module: model.to() and model.state_dict() do
not reach it. Save recipe.state_dict() beside the model's, and to move a recipe build one on the new device and
load_state_dict (it copies across devices). Saturated fp8 gradient casts (E5M2 backward) clamp inf gradients to
the largest finite value: an overflow there does not reach GradScaler's inf check; the recipe's amax records it
(inf, entered as 0 by update()).
"""

from __future__ import annotations

import numbers

import torch

from . import _checks
from .ops.cast_and_scale import _select, cast_and_scale

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def compute_scale(amax: torch.Tensor, scale: torch.Tensor, fp8_max: float, margin: int = 0) -> torch.Tensor:
    """(fp8_max / 2**margin) / amax where that is finite and amax > 0, else the old `scale`. No host sync."""
    # one correctly rounded fp32 division (float / tensor would be amax's reciprocal times the constant: two
    # roundings, 1 ulp off for ~27% of amaxes, up to 3 ulp where the reciprocal is subnormal, amax >= 2^126)
    new = torch.full_like(amax, fp8_max / 2.0**margin).div_(amax)
    # amax in (0, inf) excludes 0, negatives, inf and NaN; then new is positive, and finite unless it overflowed.
    # (The same test as isfinite(amax) & isfinite(new) & (amax > 0), in 5 small kernels instead of 12.)
    ok = (amax > 0) & (amax < float("inf")) & (new < float("inf"))
    return torch.where(ok, new, scale)


def _check_dtype(dtype):
    if dtype not in FP8_DTYPES:
        raise TypeError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")


def _check_margin(margin) -> int:
    """margin: a non-negative int (a power-of-two headroom below fp8's max, as TransformerEngine's). int() used to
    truncate 2.5 to 2 and take -1, a scale that saturates the largest values on purpose."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Integral) or margin < 0:
        raise ValueError(f"margin must be a non-negative int, got {margin!r}")
    return int(margin)


class _Recipe:
    _state_keys: tuple[str, ...] = ()

    def _init_state(self, device):
        self.scale = torch.ones(1, dtype=torch.float32, device=device)
        self.amax = torch.zeros(1, dtype=torch.float32, device=device)
        self._scale_inv = torch.ones(1, dtype=torch.float32, device=device)  # 1 / the scale of the last cast

    def _check_input(self, x, backend):
        """Before any state changes: a rejected call leaves the recipe as it was."""
        _checks.float_tensor(x, "x")
        if x.device != self.scale.device:
            raise ValueError(f"x must be on the recipe's device {self.scale.device}, got {x.device}")
        _select(x.device, backend)  # a backend that cannot serve x raises here too (called, not traced, by Dynamo)

    def _cast(self, x, amax, backend):
        torch.reciprocal(self.scale, out=self._scale_inv)  # what dequantizes this cast, whatever update() does next
        return cast_and_scale(x, self.dtype, self.scale, amax=amax, saturate=True, backend=backend)

    def state_dict(self) -> dict:
        return ({k: getattr(self, k).clone() for k in self._state_keys} | {"scale_inv": self._scale_inv.clone()}
                | {"config": self._config()})

    def load_state_dict(self, state: dict) -> None:
        """Restore the state of a recipe with the same configuration (dtype, margin, history length, algorithm:
        ValueError naming the differences otherwise, since the scales of one would saturate or waste the range of
        the other). A state_dict without "scale_inv" (saved before it was kept) dequantizes with 1 / scale."""
        missing = [k for k in self._state_keys if k not in state]
        if missing:
            raise KeyError(f"state_dict is missing {missing}")
        theirs, ours = state.get("config"), self._config()
        if theirs is not None and theirs != ours:
            diff = ", ".join(f"{k}: {theirs.get(k)!r} saved, {ours.get(k)!r} here"
                             for k in dict.fromkeys([*ours, *theirs]) if theirs.get(k) != ours.get(k))
            raise ValueError(f"state_dict comes from a recipe configured otherwise ({diff})")
        for k in self._state_keys:
            cur = getattr(self, k)
            if state[k].shape != cur.shape:
                raise ValueError(f"state_dict[{k!r}] has shape {tuple(state[k].shape)}, expected {tuple(cur.shape)}")
        for k in self._state_keys:
            getattr(self, k).copy_(state[k])
        self._scale_inv.copy_(state["scale_inv"] if "scale_inv" in state else self.scale.reciprocal())

    @property
    def scale_inv(self) -> torch.Tensor:
        """1 / the scale of the last cast: what dequantizes the last quantize()'s output (torch._scaled_mm's scale
        argument), also after update() has moved the scale on. A copy (one tiny device op): kept beside its fp8
        tensor (say, for the backward), it stays right whatever later casts do."""
        return self._scale_inv.clone()


class CurrentScaling(_Recipe):
    """Cast with a scale computed from the tensor itself: scale = (fp8_max / 2**margin) / max|x|."""

    _state_keys = ("scale", "amax")

    def __init__(self, dtype=torch.float8_e4m3fn, margin: int = 0, device=None):
        _check_dtype(dtype)
        self.dtype, self.margin = dtype, _check_margin(margin)
        self.fp8_max = torch.finfo(dtype).max
        self._init_state(device)

    def _config(self):
        return {"dtype": str(self.dtype), "margin": self.margin}

    def quantize(self, x: torch.Tensor, *, backend=None) -> torch.Tensor:
        """Return fp8 x * scale with scale from max|x| (kept from before when x is all zeros or non-finite)."""
        self._check_input(x, backend)
        if x.numel():
            # max|x| as max(-min(x), max(x)): one read of x, no |x| copy (bit-identical; NaN propagates)
            lo, hi = torch.aminmax(x.detach())
            self.amax.copy_(torch.maximum(hi, -lo).abs().float().reshape(1))  # abs: +0 for an all-zero x, as |x|
        else:
            self.amax.zero_()
        self.scale.copy_(compute_scale(self.amax, self.scale, self.fp8_max, self.margin))
        return self._cast(x, None, backend)


class DelayedScaling(_Recipe):
    """Cast with a scale from the amax history; each cast records max|x| in the same pass; update() rolls the
    history and recomputes the scale (call it once per step, like TransformerEngine's recipe).

    amax_compute_algo: "max" (the history's maximum) or "most_recent".
    """

    _state_keys = ("scale", "amax", "amax_history")

    def __init__(self, dtype=torch.float8_e4m3fn, margin: int = 0, amax_history_len: int = 1024,
                 amax_compute_algo: str = "max", device=None):
        _check_dtype(dtype)
        if amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"amax_compute_algo must be 'max' or 'most_recent', got {amax_compute_algo!r}")
        if not 1 <= int(amax_history_len) <= 1024:
            raise ValueError(f"amax_history_len must be in [1, 1024], got {amax_history_len}")
        self.dtype, self.margin, self.algo = dtype, _check_margin(margin), amax_compute_algo
        self.fp8_max = torch.finfo(dtype).max
        self._init_state(device)  # self.amax: this step's running amax
        self.amax_history = torch.zeros(int(amax_history_len), dtype=torch.float32, device=device)

    def _config(self):
        return {"dtype": str(self.dtype), "margin": self.margin, "amax_history_len": self.amax_history.numel(),
                "amax_compute_algo": self.algo}

    def quantize(self, x: torch.Tensor, *, backend=None) -> torch.Tensor:
        """Return fp8 x * scale with the current (delayed) scale; max|x| is folded into self.amax."""
        self._check_input(x, backend)
        return self._cast(x, self.amax, backend)

    def update(self) -> None:
        """Push this step's amax into the history, recompute the scale from it, and reset the running amax.

        A non-finite amax (x held inf/NaN) is recorded as 0, i.e. ignored: recorded as is, it would pin the
        history's max, and so the scale, for the history's whole length."""
        self.amax_history.copy_(torch.roll(self.amax_history, 1))
        self.amax_history[:1].copy_(self.amax.nan_to_num(0.0, 0.0, 0.0))  # NaN, inf, -inf -> 0
        ref = self.amax_history.amax().reshape(1) if self.algo == "max" else self.amax_history[:1]
        self.scale.copy_(compute_scale(ref, self.scale, self.fp8_max, self.margin))
        self.amax.zero_()


def update_all(recipes) -> None:
    """Call DelayedScaling.update() on every recipe of `recipes`, in a fixed number of small kernels instead of ~17
    per recipe: a model with a recipe per tensor per layer has hundreds, and one by one their updates cost more
    host time (a launch each) than the step's real work. The results are those of the recipes' own update(), bit
    for bit: the histories roll, the new amax goes in (non-finite as 0), the scale is recomputed and the running
    amax reset. Recipes are updated together per (device, history length, algorithm, dtype, margin); no host sync.
    A recipe given twice is updated once, as in a loop over a set; anything but a DelayedScaling raises TypeError
    before anything changes."""
    recipes = list(recipes)
    for i, r in enumerate(recipes):
        if not isinstance(r, DelayedScaling):
            raise TypeError(f"recipes[{i}] must be a mixprec_ops.fp8.DelayedScaling, got {type(r).__name__}")
    groups: dict[tuple, list[DelayedScaling]] = {}
    seen = set()
    for r in recipes:
        if id(r) not in seen:
            seen.add(id(r))
            key = (r.amax_history.device, r.amax_history.numel(), r.algo, r.fp8_max, r.margin)
            groups.setdefault(key, []).append(r)
    for (_, _, algo, fp8_max, margin), rs in groups.items():
        if len(rs) == 1:
            rs[0].update()
            continue
        hist = torch.stack([r.amax_history for r in rs])  # (n, history)
        amax = torch.stack([r.amax for r in rs])  # (n, 1)
        scale = torch.stack([r.scale for r in rs])  # (n, 1)
        # update(): roll by one, then the newest (non-finite -> 0) in front
        hist = torch.cat([amax.nan_to_num(0.0, 0.0, 0.0), hist[:, :-1]], dim=1)
        ref = hist.amax(dim=1, keepdim=True) if algo == "max" else hist[:, :1]
        scale = compute_scale(ref, scale, fp8_max, margin)
        torch._foreach_copy_([r.amax_history for r in rs], list(hist.unbind(0)))
        torch._foreach_copy_([r.scale for r in rs], list(scale.unbind(0)))
        torch._foreach_zero_([r.amax for r in rs])
