"""Build mixprec_ops: the `mixprec_ops._C` extension (C++ CPU kernels always, CUDA kernels when a matching
toolkit is found) and the Python packages (triton_kernels/ is installed as `mixprec_ops.triton_kernels`).

Environment variables (all optional):
  MIXPREC_BUILD_CUDA=0        CPU-only build even when a CUDA toolkit is present.
  MIXPREC_CUDA_ARCHS          CUDA archs, ';'-separated, e.g. "8.0;9.0a;10.0+PTX" (the default).
  MIXPREC_CPU_FLAGS           extra C++ flags for the CPU kernels (default on x86-64: -mavx2 -mfma -mf16c).
  MAX_JOBS                    parallel compile jobs (default: sized from cores and RAM).
  CUDA_HOME                   the toolkit root (default: derived from the real nvcc, see below).
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0a;10.0+PTX"


def log(msg):
    print(f"[mixprec_ops setup] {msg}", file=sys.stderr)


def _toolkit_ok(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and bool(
        glob.glob(os.path.join(root, "lib64", "libcudart.so*"))
        + glob.glob(os.path.join(root, "targets", "*", "lib", "libcudart.so*"))
    )


def find_cuda_home():
    """The CUDA toolkit root, or None. /usr/local/bin/nvcc on these machines is a wrapper script, so torch's own
    guess (dirname of the nvcc on PATH) gives /usr/local, which has no libcudart: check each candidate for a real
    toolkit instead of trusting the first one."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script: `exec /path/to/cuda/bin/nvcc "$@"`
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            m = re.search(r"(/\S+)/bin/nvcc", head)
            if m:
                candidates.append(m.group(1))
        except OSError:
            pass
    for c in candidates:
        if _toolkit_ok(c):
            return os.path.realpath(c)
    return None


def nvcc_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def max_jobs():
    if os.environ.get("MAX_JOBS"):
        return os.environ["MAX_JOBS"]
    cores = os.cpu_count() or 1
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram_gb = 8
    return str(max(1, min(cores, int(ram_gb // 3))))  # nvcc on torch headers peaks near 2-3 GB per job


def cuda_gencode_flags(archs):
    flags = []
    for a in [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]:
        ptx = a.endswith("+PTX")
        a = a[: -len("+PTX")] if ptx else a
        num = a.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def decide_cuda():
    """(use_cuda, reason). Never fails: no usable toolkit means a CPU-only build with a clear message."""
    if os.environ.get("MIXPREC_BUILD_CUDA", "1") == "0":
        return False, "MIXPREC_BUILD_CUDA=0"
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    ver = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if ver is None or ver[0] != torch_major:
        return False, f"nvcc {ver} at {cuda_home} does not match torch's CUDA {torch.version.cuda}"
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    return True, f"CUDA {ver[0]}.{ver[1]} at {cuda_home}"


def write_build_info(use_cuda, archs):
    import torch

    with open(os.path.join(HERE, "mixprec_ops", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {use_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {archs if use_cuda else None!r}\n")


def extensions():
    use_cuda, why = decide_cuda()
    archs = os.environ.get("MIXPREC_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    log(f"CUDA kernels: {'yes, archs ' + archs if use_cuda else 'no'} ({why})")
    os.environ["MAX_JOBS"] = max_jobs()
    log(f"parallel jobs: {os.environ['MAX_JOBS']}")
    write_build_info(use_cuda, archs)

    from torch.utils.cpp_extension import CppExtension, CUDAExtension  # after CUDA_HOME is set

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cpu_flags = os.environ.get("MIXPREC_CPU_FLAGS")
    if cpu_flags is None:
        cpu_flags = "-mavx2 -mfma -mf16c" if platform.machine() in ("x86_64", "AMD64") else ""
    cxx = ["-O3", "-ffp-contract=off"] + cpu_flags.split()  # no implicit FMA: kernels match the references bit for bit
    if "-mavx2" in cpu_flags:
        cxx += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]  # at::vec uses AVX2 intrinsics, not its generic path
    kw = dict(extra_compile_args={"cxx": cxx}, py_limited_api=True)
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kw["extra_compile_args"]["cxx"].append("-DMIXPREC_WITH_CUDA")
        kw["extra_compile_args"]["nvcc"] = [
            "-O3", "-DMIXPREC_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo",
        ] + cuda_gencode_flags(archs)
        return [CUDAExtension("mixprec_ops._C", sources, **kw)]
    return [CppExtension("mixprec_ops._C", sources, **kw)]


def main():
    ext_modules = extensions()  # first: it sets CUDA_HOME, which torch.utils.cpp_extension reads on import
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=["mixprec_ops", "mixprec_ops.ops", "mixprec_ops.amp", "mixprec_ops.optim", "mixprec_ops.triton_kernels"],
        package_dir={"mixprec_ops.triton_kernels": "triton_kernels"},
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )


if __name__ == "__main__":
    main()
