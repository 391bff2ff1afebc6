"""Automatic mixed precision helpers: a GradScaler that unscales fp32/fp16/bf16 grads in one fused pass."""

from .grad_scaler import GradScaler

__all__ = ["GradScaler"]
