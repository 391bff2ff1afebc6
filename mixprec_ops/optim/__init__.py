"""Optimizers: drop-ins for torch.optim.Adam / AdamW with fp32 master weights and fused AMP + clipping."""

from .adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
