"""mixprec_ops: fused Triton and CUDA kernels for mixed-precision training.

Ops (see each docstring): cast_and_scale, unscale_, matmul (fused bias + activation epilogue); nn.Linear and
convert(model) swap torch.nn.Linear for it. FP8 scaling recipes: mixprec_ops.fp8. A GradScaler that handles bf16
grads: mixprec_ops.amp.GradScaler. Adam/AdamW with fp32 master weights: mixprec_ops.optim. Which backend serves
what: mixprec_ops.backends.report().
"""

from . import _ext, _flops, backends  # noqa: F401  (_ext loads the compiled kernels, or records why it could not)
from . import nn  # noqa: F401  (light: Linear, functional.linear, convert; Triton loads on first use)
from .nn import convert
from .ops import cast_and_scale, matmul, unscale_

_flops.install()  # FlopCounterMode counts the GEMM ops (registered when torch.utils.flop_counter is imported)

__version__ = "0.1.0"
__all__ = ["cast_and_scale", "unscale_", "matmul", "convert", "backends", "amp", "fp8", "optim", "nn"]


def __getattr__(name):  # lazy submodules: keep `import mixprec_ops` light
    if name in ("amp", "fp8", "optim"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mixprec_ops' has no attribute {name!r}")
