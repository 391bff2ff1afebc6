"""Triton kernels of mixprec_ops, installed as the subpackage `mixprec_ops.triton_kernels`.

Each module holds @triton.jit kernels and a small launcher that takes torch tensors. The op layer
(mixprec_ops/ops/*.py) registers the launchers as torch ops through torch.library.triton_op.

INTERPRETED is True when Triton's interpreter was on (TRITON_INTERPRET=1) as these kernels were defined: then
they run on CPU tensors, which the tests use on machines without a GPU.
"""

import os

import triton  # noqa: F401  (fail here, not later, when triton is unusable)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
