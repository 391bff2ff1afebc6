"""Linear: a torch.nn.Linear whose forward runs the fused matmul (optionally with an activation), and convert()."""

from __future__ import annotations

import torch

from ..ops.matmul import ACTIVATIONS
from .functional import linear


def _check_activation(activation):
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


class Linear(torch.nn.Linear):
    """torch.nn.Linear (same constructor, parameters and state_dict keys) computing act(x @ weight.T + bias) with
    mixprec_ops.nn.functional.linear: fp32 accumulation, fused bias and activation. float32 modules fall back to
    torch's linear."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, activation=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _check_activation(activation)
        self.activation = activation

    def forward(self, input):
        return linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


def convert(model: torch.nn.Module, activation=None) -> torch.nn.Module:
    """Turn every torch.nn.Linear of `model` (the model itself included) into mixprec_ops.nn.Linear, in place, and
    return the model. The modules keep their Parameter objects (no copy: same weight, bias, device, dtype,
    requires_grad), hooks and state_dict keys. Only exact torch.nn.Linear instances are converted (subclasses may
    override forward). `activation` is fused into every converted layer (default None: outputs unchanged)."""
    _check_activation(activation)
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = Linear
            m.activation = activation
    return model
