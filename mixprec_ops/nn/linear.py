"""Linear: a torch.nn.Linear whose forward runs the fused matmul (optionally with an activation), and convert()."""

from __future__ import annotations

import importlib
import types
import warnings

import torch

from ..ops.matmul import ACTIVATIONS
from .functional import linear


# torch.fx.symbolic_trace traces into modules outside torch.nn: calls to linear become graph nodes (call_function)
# instead of being traced into, where its argument checks would meet Proxy objects.
torch.fx.wrap("linear")


def _check_activation(activation):
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


class Linear(torch.nn.Linear):
    """torch.nn.Linear (same constructor, parameters and state_dict keys) computing act(x @ weight.T + bias) with
    mixprec_ops.nn.functional.linear: fp32 accumulation, fused bias and activation. float32 modules fall back to
    torch's linear. torch.compile, torch.export and torch.jit.trace take it; torch.jit.script does not (the op
    layer is Python with keyword-only arguments). torch.fx.symbolic_trace records the fused linear as one
    call_function node. torch.ao quantization and torch.ao.pruning's sparsifiers match modules by exact type and
    leave this class alone: quantize or sparsify an unconverted model (or name the tensors to prune). Under tensor
    parallelism (DTensor weights) it runs torch's linear and activation (see linear).

    With an activation the layer is no longer a linear map, but it is still an nn.Linear to isinstance: tools that
    rebuild or fold a Linear from its weight and bias alone compute something else without a word.
    torch.nn.utils.fusion.fuse_linear_bn_eval folds the norm into the weight and keeps the activation, giving
    act(bn(Wx + b)) for bn(act(Wx + b)); torch.utils.mkldnn.to_mkldnn drops the activation. Use them on layers
    without one (convert()'s default)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, activation=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _check_activation(activation)
        self.activation = activation

    def forward(self, input):
        return linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


_CONV1D_CLASSES: dict[type, type] = {}
# nn.MultiheadAttention's out_proj: its weight and bias feed F.multi_head_attention_forward; its forward never runs
_NEVER_CALLED = (torch.nn.modules.linear.NonDynamicallyQuantizableLinear,)


def _is_hf_conv1d(m: torch.nn.Module) -> bool:
    """Hugging Face's Conv1D (transformers.pytorch_utils, used by GPT-2): y = x @ weight + bias, weight (nx, nf)."""
    cls = type(m)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
            and getattr(m, "nf", None) == m.weight.shape[1])


def _conv1d_forward(self, x):
    # weight is (in, out): weight.t() is the (out, in) view linear() takes; the kernel reads it in place (no copy).
    return linear(x, self.weight.t(), self.bias, self.activation)


def _conv1d_name(module: str) -> str:
    """The registered name of the converted subclass of `module`.Conv1D: dots become "__", so that __getattr__
    can read the module back."""
    return "Conv1D__" + module.replace(".", "__")


def _conv1d_class(base: type) -> type:
    """A subclass of Hugging Face's Conv1D whose forward is the fused linear (isinstance(m, base) still holds),
    registered in this module under _conv1d_name(base.__module__), so that instances pickle by reference; a process
    that has not converted one rebuilds the class on unpickling (__getattr__ below)."""
    if base not in _CONV1D_CLASSES:
        name = _conv1d_name(base.__module__)
        cls = type(name, (base,), {"forward": _conv1d_forward, "__module__": __name__, "__qualname__": name,
                                   "__doc__": f"{base.__module__}.Conv1D on mixprec_ops.nn.functional.linear."})
        globals()[name] = cls
        _CONV1D_CLASSES[base] = cls
    return _CONV1D_CLASSES[base]


def __getattr__(name: str):
    """Unpickling a converted Hugging Face Conv1D (torch.save(model) of a converted GPT-2) in a process that has not
    converted one yet: import the Conv1D the name encodes (a transformers module only) and build its subclass."""
    if name.startswith("Conv1D__"):
        module = name[len("Conv1D__"):].replace("__", ".")
        if module.startswith("transformers.") and _conv1d_name(module) == name:
            base = getattr(importlib.import_module(module), "Conv1D", None)
            if isinstance(base, type) and issubclass(base, torch.nn.Module):
                return _conv1d_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _swap_class(m: torch.nn.Module, new: type) -> bool:
    """m.__class__ = new, unless m has a forward of its own on the instance that would keep calling the old class's:
    accelerate's hooks (a device_map dispatch with offload, cpu_offload, add_hook_to_module) keep the class's
    forward bound as m._old_forward and call it from a wrapper set as m.forward; that bound method is re-bound to
    the new class's forward. Any other instance forward: False, m unchanged (the swap would do nothing, or run a
    forward that ignores the fused activation)."""
    old_cls = type(m)
    own = m.__dict__.get("forward")
    hooked = m.__dict__.get("_old_forward")
    if own is not None and not (isinstance(hooked, types.MethodType) and hooked.__self__ is m
                                and hooked.__func__ is old_cls.forward):
        return False
    m.__class__ = new
    if own is not None:
        m._old_forward = types.MethodType(new.forward, m)
    return True


def convert(model: torch.nn.Module, activation=None) -> torch.nn.Module:
    """Turn every torch.nn.Linear of `model` (the model itself included) into mixprec_ops.nn.Linear, in place, and
    return the model. The modules keep their Parameter objects (no copy: same weight, bias, device, dtype,
    requires_grad), hooks and state_dict keys. Only exact torch.nn.Linear instances are converted (subclasses may
    override forward). Hugging Face's Conv1D (GPT-2's attention and MLP projections: y = x @ weight + bias) is
    converted too, to a subclass of itself computing the same product with the fused kernel. `activation` is fused
    into every converted layer (default None: outputs unchanged).

    A layer that accelerate has hooked (a device_map dispatch with offload, cpu_offload) is converted under its hook;
    one whose forward was replaced on the instance otherwise is left, with the warning below.

    Other subclasses of torch.nn.Linear are left as they are, with one warning naming them: a layer with a
    parametrization (torch.nn.utils.parametrize, spectral_norm, parametrizations.weight_norm: convert before adding
    it), a LazyLinear not yet run (run the model once first), or a user subclass. nn.MultiheadAttention's
    out_proj (NonDynamicallyQuantizableLinear) is skipped silently: attention reads its weight, never its forward."""
    _check_activation(activation)
    skipped = []
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear:
            new = Linear
        elif _is_hf_conv1d(m):
            new = _conv1d_class(type(m))
        else:
            if isinstance(m, torch.nn.Linear) and not isinstance(m, (Linear, _NEVER_CALLED)):
                skipped.append(f"{name or '<model>'} ({type(m).__name__})")
            continue
        if not _swap_class(m, new):
            skipped.append(f"{name or '<model>'} (forward set on the instance)")
            continue
        m.activation = activation
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(f"mixprec_ops.nn.convert: left unconverted (not exactly torch.nn.Linear, or a forward set on "
                      f"the instance): {', '.join(skipped[:5])}{more}. Convert before adding parametrizations or "
                      "replacing forward; run a LazyLinear once first.", UserWarning, stacklevel=2)
    return model
