"""Modules built on the mixprec_ops op layer: Linear (a torch.nn.Linear drop-in on the fused matmul) and convert()."""

from . import functional
from .linear import Linear, convert

__all__ = ["Linear", "convert", "functional"]
