"""mixprec_ops benchmark suite: `python -m bench [--quick] [--ops a,b] [--device cpu|cuda] [--out DIR] [--reps N]`.

Run from the repo root. `python -m` puts the repo root first on sys.path, where the SOURCE tree mixprec_ops/ would
shadow the INSTALLED package (the source tree has neither the compiled _C extension nor the
`mixprec_ops.triton_kernels` subpackage, which setup.py maps from top-level triton_kernels/). So before anything
imports mixprec_ops, move the repo-root entries to the end of sys.path: the installed package wins, and the source
tree stays only as a last resort (bench.machine warns when that is what got imported).
"""

import os
import sys

REPO_ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def _demote_repo_root() -> None:
    def is_root(p: str) -> bool:
        return os.path.realpath(p or os.getcwd()) == REPO_ROOT

    root_entries = [p for p in sys.path if is_root(p)]
    if root_entries:
        sys.path[:] = [p for p in sys.path if not is_root(p)] + root_entries


_demote_repo_root()
