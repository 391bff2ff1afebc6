"""FLOP formulas of the GEMM ops for torch.utils.flop_counter (FlopCounterMode, and what builds on it: Lightning's
measure_flops, torch's own MFU tools). Without them the mode sees an opaque op and counts 0 for a fused linear's
forward (and for every product on the cuda and triton backends); with them the counts are torch's own: 2 * M * N * K
per product (bias, activation and the bias-gradient row sum are not counted, as for torch's addmm and linear).

torch.utils.flop_counter costs about 1.4 s to import, and FlopCounterMode copies the registry when it is created, so
the formulas cannot wait for the first counted call: they are registered when that module is imported (at once if
it already is), by an import hook. An op created later (the Triton ops, on first use) registers itself through
count_flops."""

from __future__ import annotations

import importlib.abc
import math
import sys

import torch

_MODULE = "torch.utils.flop_counter"
_formulas: dict = {}  # op name in torch.ops.mixprec -> formula, every one asked for (a reload registers them again)


def matmul_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """mixprec::matmul and its siblings: a (..., M, K) @ b (K, N)."""
    return math.prod(a_shape[:-1]) * b_shape[1] * 2 * a_shape[-1]


def linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """mixprec::linear: x (..., K) @ weight (N, K).T (the forward; its backward's products are counted as they run)."""
    return math.prod(x_shape[:-1]) * w_shape[0] * 2 * w_shape[1]


def _register(module) -> None:
    """Every formula whose op exists and is not in the module's registry yet (a user's own formula stays)."""
    registry = module.flop_registry
    for name, formula in list(_formulas.items()):
        if hasattr(torch.ops.mixprec, name):
            packet = getattr(torch.ops.mixprec, name)
            if packet not in registry:
                module.register_flop_formula(packet)(formula)


def count_flops(name: str, formula) -> None:
    """Have FlopCounterMode count torch.ops.mixprec.<name> with formula (shapes in, as torch's own formulas);
    a name whose op does not exist (the extension not loaded) is skipped."""
    _formulas[name] = formula
    module = sys.modules.get(_MODULE)
    if module is not None and not getattr(module.__spec__, "_initializing", False):  # (being imported: the hook)
        _register(module)


class _Hook(importlib.abc.MetaPathFinder):
    """Finds torch.utils.flop_counter through the other finders and has its loader register the formulas right
    after executing it (an import, or importlib.reload). Stays on sys.meta_path: a find_spec probe that never
    imports must not use it up; for any other name it returns None at once."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register(module)

        loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Called once by `import mixprec_ops`, after the ops it defines exist."""
    if not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
    count_flops("matmul", matmul_flops)
    count_flops("matmul_pre", matmul_flops)
    count_flops("matmul_rowsum", matmul_flops)
    count_flops("linear", linear_flops)
