"""The op layer: one module per op, each holding its reference, fake, Triton op registration and public function."""

from .cast_and_scale import cast_and_scale, cast_and_scale_reference
from .unscale import unscale_, unscale_reference

__all__ = ["cast_and_scale", "cast_and_scale_reference", "unscale_", "unscale_reference"]
