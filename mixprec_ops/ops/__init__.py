"""The op layer: one module per op, each holding its reference, fake, Triton op registration and public function."""

from .adam import adam_step_, adam_step_reference
from .cast_and_scale import cast_and_scale, cast_and_scale_reference
from .matmul import matmul, matmul_reference
from .unscale import unscale_, unscale_reference

__all__ = ["adam_step_", "adam_step_reference", "cast_and_scale", "cast_and_scale_reference", "matmul",
           "matmul_reference", "unscale_", "unscale_reference"]
