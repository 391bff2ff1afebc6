"""Where a cuobjdump is: shared by tests/test_wheel.py (the wheel's GPU code) and tests/triton_aot.py (register use
of the compiled Triton kernels). A plain module, importable from pytest (tests/ is on sys.path) and from
triton_aot.py run as a script (its directory is sys.path[0])."""

import importlib.util
import os
import shutil


def find_cuobjdump() -> str | None:
    """The toolkit's (CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH), else the one Triton bundles next to its ptxas
    (found without importing triton), else None."""
    cands = [os.path.join(os.environ[v], "bin", "cuobjdump") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += ["/usr/local/cuda/bin/cuobjdump", shutil.which("cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        cands.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)
