"""Build mixprec_ops: the `mixprec_ops._C` extension (C++ CPU kernels always, CUDA kernels when a matching
toolkit is found) and the Python packages (triton_kernels/ is installed as `mixprec_ops.triton_kernels`).

Environment variables (all optional):
  MIXPREC_BUILD_CUDA=0        CPU-only build even when a CUDA toolkit is present (also false, no, off).
  MIXPREC_CUDA_ARCHS          CUDA archs, ';'-separated, e.g. "8.0;9.0a;10.0+PTX" (the default).
  MIXPREC_CPU_FLAGS           the CPU kernels' ISA flags, replacing the default (on x86-64: -mavx2 -mfma -mf16c).
  MAX_JOBS                    parallel compile jobs (default: sized from cores and RAM).
  CUDA_HOME                   the toolkit root (default: derived from the real nvcc, see below).
  MIXPREC_DIST_WHEEL=1        a wheel for distribution (`make wheel`): pins torch==<the torch built against>, tags
                              the platform manylinux_X_Y and states torch/CUDA/archs in the summary; see DistWheel.
                              Without it (`pip install .`, a plain `pip wheel .`) the requirement is torch>=2.11.
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
DESCRIPTION = ("Fused Triton and CUDA kernels for mixed-precision training: cast-and-scale with amax, grad unscaling, "
               "fused Adam/AdamW with fp32 masters.")
SOURCE_TORCH_REQUIREMENT = "torch>=2.11"  # a source build compiles against whatever torch is installed
DIST_WHEEL = os.environ.get("MIXPREC_DIST_WHEEL", "0") == "1"
# torch's own wheels are manylinux_2_28 (since torch 2.6): a lower tag on ours would buy nothing.
MANYLINUX_FLOOR = (2, 28)


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
    flag = os.environ.get("MIXPREC_BUILD_CUDA", "1").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False, f"MIXPREC_BUILD_CUDA={os.environ['MIXPREC_BUILD_CUDA']}"
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


CUBLASLT_HEADERS = ("cublasLt.h", "cublas_v2.h", "cusparse.h", "cusolverDn.h")  # ATen/cuda/CUDAContextLight.h's


def _cublaslt_lib(libdir):
    """The linker flag for libcublasLt in `libdir`, or None. The CUDA torch wheels ship only the versioned file
    (libcublasLt.so.13), which `-lcublasLt` does not find: `-l:<file>` names it. Either way the extension's NEEDED
    entry is the library's soname (libcublasLt.so.13), which torch itself has loaded by the time the extension is
    imported (libtorch_cuda needs it), so no rpath is required."""
    if os.path.isfile(os.path.join(libdir, "libcublasLt.so")):
        return "-lcublasLt"
    versioned = sorted(glob.glob(os.path.join(libdir, "libcublasLt.so.[0-9]*")), key=len)
    return f"-l:{os.path.basename(versioned[0])}" if versioned else None


def find_cublaslt(cuda_home, cuda_major):
    """(nvcc flags, link flags, where) for the cuBLASLt matmul (csrc/cuda/matmul_cublaslt.cu), or None.

    The toolkit first (the GPU machine's full toolkit has everything); else the headers and library that the CUDA
    torch wheel installs (site-packages/nvidia/cu13/{include,lib}, or nvidia/cublas/... in older wheel layouts),
    whose include dir is added with -isystem, i.e. searched after the toolkit's -I dir: it only supplies the headers
    the toolkit lacks (cublasLt.h, cusparse.h, ...), never shadows the toolkit's own."""
    tk_inc = os.path.join(cuda_home, "include")
    tk_libs = [os.path.join(cuda_home, "lib64")] + glob.glob(os.path.join(cuda_home, "targets", "*", "lib"))
    if all(os.path.isfile(os.path.join(tk_inc, h)) for h in CUBLASLT_HEADERS):
        for d in tk_libs:
            flag = _cublaslt_lib(d)
            if flag:
                return [], [f"-L{d}", flag], f"toolkit {cuda_home}"
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    bases = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for base in bases:
        for sub in (f"cu{cuda_major}", "cublas"):
            inc, lib = os.path.join(base, sub, "include"), os.path.join(base, sub, "lib")
            if not os.path.isfile(os.path.join(inc, "cublasLt.h")):
                continue
            if not all(os.path.isfile(os.path.join(d, h)) for h in CUBLASLT_HEADERS for d in
                       [inc if os.path.isfile(os.path.join(inc, h)) else tk_inc]):
                continue  # some header CUDAContextLight.h needs is in neither place
            for d in [lib] + tk_libs:
                flag = _cublaslt_lib(d)
                if flag:
                    return ["-isystem", inc], [f"-L{d}", flag], f"headers {inc}, library {d}"
    return None


def linking_cxx():
    """The C++ compiler that links the extension, as a command list: $CXX, else Python's configured CXX (for a C++
    extension setuptools swaps the link command's program for this one)."""
    import shlex
    import sysconfig

    return shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")


def loaded_libstdcxx(maps="/proc/self/maps"):
    """The path of the libstdc++.so.6 this process has loaded (torch's), or None."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


def stdcxx_link_args(cxx=None, maps="/proc/self/maps"):
    """Link arguments that make the extension use the shared libstdc++, the one torch uses.

    A compiler whose search path holds only libstdc++.a links it into the .so (the GPU image's /opt/gcc/bin/g++,
    2026-11-30: our _C.abi3.so then needed no libstdc++.so.6 and defined its own std::locale). Two libstdc++ in one
    process: our copy's num_put facet was never set up, and the first error message that formatted an integer
    (TORCH_CHECK(..., "params[", i, "] has no grad")) crashed the process with SIGSEGV inside
    std::ostream::_M_insert<long>; messages of strings and dtypes did not. If the compiler cannot name a shared
    libstdc++.so, the one this process has loaded is passed by path: the linker then binds every std:: symbol to it
    before the compiler's trailing -lstdc++ reaches the archive, and the .so needs libstdc++.so.6 like torch."""
    if platform.system() != "Linux":
        return []
    cxx = linking_cxx() if cxx is None else cxx
    try:
        found = subprocess.run([*cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        log(f"libstdc++: could not ask {' '.join(cxx)} for its libstdc++.so ({e}); linking as it does")
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []
    lib = loaded_libstdcxx(maps)
    if lib is None:
        log(f"WARNING: {' '.join(cxx)} finds no shared libstdc++.so and this process has none loaded: the extension "
            "may carry a static libstdc++, whose error messages with numbers crash the process; set CXX to a "
            "compiler with a shared libstdc++ (e.g. CXX=/usr/bin/g++)")
        return []
    log(f"libstdc++: {' '.join(cxx)} has no shared libstdc++.so (it would link libstdc++.a into the extension); "
        f"linking {lib}, the one torch uses")
    return [lib]


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
    if use_cuda and not archs.strip(";, "):  # no -gencode flags: torch would pick archs the build info never names
        raise SystemExit("setup.py: MIXPREC_CUDA_ARCHS is empty; unset it for the default "
                         f"({DEFAULT_CUDA_ARCHS}) or list archs, e.g. 9.0a")
    log(f"CUDA kernels: {'yes, archs ' + archs if use_cuda else 'no'} ({why})")
    os.environ["MAX_JOBS"] = max_jobs()
    log(f"parallel jobs: {os.environ['MAX_JOBS']}")
    write_build_info(use_cuda, archs)

    from torch.utils.cpp_extension import CppExtension, CUDAExtension  # after CUDA_HOME is set

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cpu_flags = os.environ.get("MIXPREC_CPU_FLAGS")
    if cpu_flags is None:
        cpu_flags = "-mavx2 -mfma -mf16c" if platform.machine() in ("x86_64", "AMD64") else ""
    # -fopenmp: at::parallel_for is a header template around `#pragma omp parallel`; without the flag every CPU kernel
    # runs on one thread (torch's own libgomp is the runtime that gets linked, no second one).
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp"] + cpu_flags.split()  # no implicit FMA: kernels match the references bit for bit
    if "-mavx2" in cpu_flags:
        cxx += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]  # at::vec uses AVX2 intrinsics, not its generic path
    # Headers as dependencies: setuptools only compares sources with the .so, so a header-only edit would ship stale.
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    kw = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp", *stdcxx_link_args()], depends=headers,
              py_limited_api=True)
    if use_cuda:
        import torch

        cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        lt = find_cublaslt(os.environ["CUDA_HOME"], int(torch.version.cuda.split(".")[0]))
        if lt is None:
            cu_sources = [f for f in cu_sources if not f.endswith("matmul_cublaslt.cu")]
            log("cuBLASLt: not found (no cublasLt.h + libcublasLt in the toolkit or the nvidia wheels): the CUDA "
                "matmul is left out (matmul is served by Triton on CUDA tensors)")
            lt_nvcc, lt_link = [], []
        else:
            lt_nvcc, lt_link, where = lt
            log(f"cuBLASLt: {where} (link {' '.join(lt_link)})")
        sources += cu_sources
        kw["extra_compile_args"]["cxx"].append("-DMIXPREC_WITH_CUDA")
        kw["extra_compile_args"]["nvcc"] = [
            "-O3", "-DMIXPREC_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo",
        ] + lt_nvcc + cuda_gencode_flags(archs)
        kw["extra_link_args"] = kw["extra_link_args"] + lt_link
        return [CUDAExtension("mixprec_ops._C", sources, **kw)]
    return [CppExtension("mixprec_ops._C", sources, **kw)]


# ---- wheels for distribution (`make wheel`, MIXPREC_DIST_WHEEL=1) --------------------------------------------------
#
# Platform tag. A torch extension links libtorch_cpu.so, libc10.so (and libc10_cuda.so, libcudart.so.13 with CUDA;
# libgomp.so.1 for -fopenmp), which the torch wheel (torch/lib, and its nvidia-* dependencies) provides at run
# time. `auditwheel repair` is not applicable:
# those libraries are outside every manylinux policy, so it would either refuse or graft private copies of libtorch
# into our wheel (hundreds of MB, and a second libtorch in the process next to torch's own, which breaks the
# dispatcher). So the wheel is tagged here, doing for glibc what auditwheel's check would: the tag is
# manylinux_X_Y with X.Y the newest GLIBC_* symbol version the built .so needs (read from its .dynstr), and at least
# 2.28, torch's own tag. Built on glibc 2.36 with GCC 12 that is 2.32 (libstdc++'s headers reference
# __libc_single_threaded, GLIBC_2.32), so the honest tag is manylinux_2_32, not 2_28: on a glibc-2.28 system
# (RHEL 8) pip then refuses the wheel instead of installing one whose extension fails to load. A build inside a
# manylinux_2_28 image (older glibc) gets manylinux_2_28. libstdc++: the .so needs what GCC's own runtime provides
# (GLIBCXX_3.4.21 here); torch needs a libstdc++ at least as new itself, so it is not checked separately.
#
# Metadata. The compiled extension is tied to the exact torch release it was built against (C++ ABI), so the wheel
# requires torch==<that release> (without the +cuXXX local part: pip matches torch==2.14.1 against 2.14.1+cu130),
# and its summary names torch, the CUDA version and the GPU archs. A source install keeps torch>=2.11: it is
# compiled against the torch already installed, and a later torch upgrade is caught at import (mixprec_ops/_ext.py
# warns and leaves the extension unloaded) rather than blocked by pip.


def _elf_section(data, name):
    """The bytes of ELF64 little-endian section `name`, or None."""
    import struct

    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = secs[shstrndx][4]
    for sh_name, _t, _f, _a, off, size, *_ in secs:
        o = strtab_off + sh_name
        if data[o:data.index(b"\0", o)].decode() == name:
            return data[off:off + size]
    return None


def elf_needed(path):
    """The DT_NEEDED names of the ELF64 little-endian shared object `path` (the libraries it asks the loader for)."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    dynamic, dynstr = _elf_section(data, ".dynamic"), _elf_section(data, ".dynstr")
    names = []
    for off in range(0, len(dynamic or b"") - 15, 16):
        tag, val = struct.unpack_from("<qQ", dynamic, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            names.append(dynstr[val:dynstr.index(b"\0", val)].decode())
    return names


def elf_defined_dynamic(path):
    """The names of the symbols `path` defines and exports (.dynsym entries with a section index)."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    dynsym, dynstr = _elf_section(data, ".dynsym") or b"", _elf_section(data, ".dynstr") or b""
    out = []
    for off in range(24, len(dynsym) - 23, 24):  # Elf64_Sym: name u32, info u8, other u8, shndx u16, value, size
        name, _info, _other, shndx = struct.unpack_from("<IBBH", dynsym, off)
        if shndx != 0 and name:
            out.append(dynstr[name:dynstr.index(b"\0", name)].decode())
    return out


def libstdcxx_problem(path):
    """None if the extension at `path` uses the shared libstdc++ only; else what is wrong. A static copy, whole or in
    part (symbols a too-old shared one lacks, taken from libstdc++.a by the compiler's trailing -lstdc++), shows as
    the C++ runtime's own symbols defined in the extension: the locale and iostream machinery that crashed there."""
    if "libstdc++.so.6" not in elf_needed(path):
        return f"{path} does not need libstdc++.so.6: a static libstdc++ was linked in"
    own = [n for n in elf_defined_dynamic(path) if n.startswith(("_ZNSt6locale", "_ZNKSt6locale", "_ZNSt8ios_base"))]
    if own:
        return f"{path} defines {len(own)} of the C++ runtime's symbols itself (e.g. {own[0]}): part of libstdc++.a"
    return None


def glibc_needed(path):
    """The newest GLIBC_X.Y symbol version the shared object `path` references, as (X, Y), or None."""
    with open(path, "rb") as f:
        dynstr = _elf_section(f.read(), ".dynstr") or b""
    found = [(int(a), int(b)) for a, b in re.findall(rb"(?<![A-Za-z0-9_])GLIBC_(\d+)\.(\d+)", dynstr)]
    return max(found) if found else None


def build_summary():
    """The one-line summary: the description, plus what a distribution wheel was built for."""
    if not DIST_WHEEL:
        return DESCRIPTION
    import runpy

    bi = runpy.run_path(os.path.join(HERE, "mixprec_ops", "_build_info.py"))  # written by extensions()
    torch_v = bi["TORCH_VERSION"].split("+")[0]
    if bi["WITH_CUDA"]:
        sass, ptx = [], []
        for a in [a.strip() for a in bi["CUDA_ARCHS"].replace(",", ";").split(";") if a.strip()]:
            num = a.removesuffix("+PTX").replace(".", "")
            sass.append(f"sm_{num}")
            if a.endswith("+PTX"):
                ptx.append(f"compute_{num}")
        gpu = f"CUDA {bi['TORCH_CUDA']}, GPU code {', '.join(sass)}" + (f" + PTX {', '.join(ptx)}" if ptx else "")
    else:
        gpu = "CPU kernels only (built without CUDA)"
    return f"{DESCRIPTION} This wheel: torch {torch_v} only ({gpu}); see README 'Building and support matrix'."


def torch_requirement():
    if not DIST_WHEEL:
        return SOURCE_TORCH_REQUIREMENT
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


try:
    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel  # setuptools >= 70.1
except ImportError:  # older setuptools: the `wheel` package's
    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel


class DistWheel(_bdist_wheel):
    """bdist_wheel that, for a distribution wheel, replaces the linux_<arch> platform tag by manylinux_X_Y_<arch>
    (see above). get_tag() runs after the build, so the built extension can be inspected."""

    def get_tag(self):
        impl, abi, plat = super().get_tag()
        if not (DIST_WHEEL and plat.startswith("linux_")):
            return impl, abi, plat
        needed = [v for v in (glibc_needed(p) for p in self._built_extensions()) if v]
        major, minor = max([MANYLINUX_FLOOR] + needed)
        tag = f"manylinux_{major}_{minor}_{plat[len('linux_'):]}"
        if tag != getattr(self, "_mixprec_logged_tag", None):
            self._mixprec_logged_tag = tag
            newest = ".".join(map(str, max(needed))) if needed else "none"
            log(f"platform tag {tag} (newest GLIBC symbol version the extension needs: {newest}; "
                f"floor {'.'.join(map(str, MANYLINUX_FLOOR))})")
        return impl, abi, tag

    def _built_extensions(self):
        build_ext = self.get_finalized_command("build_ext")
        paths = [build_ext.get_ext_fullpath(e.name) for e in build_ext.extensions]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise RuntimeError(f"cannot tag the wheel: built extension(s) not found: {missing}")
        return paths


def main():
    ext_modules = extensions()  # first: it sets CUDA_HOME, which torch.utils.cpp_extension reads on import
    from torch.utils.cpp_extension import BuildExtension

    if DIST_WHEEL:
        log(f"distribution wheel: requires {torch_requirement()}")
    setup(
        description=build_summary(),
        install_requires=[torch_requirement()],
        packages=["mixprec_ops", "mixprec_ops.ops", "mixprec_ops.amp", "mixprec_ops.optim", "mixprec_ops.triton_kernels", "mixprec_ops.nn"],
        package_dir={"mixprec_ops.triton_kernels": "triton_kernels"},
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "bdist_wheel": DistWheel},
        # torch compiles limited-API extensions for CPython 3.10 and up (-DPy_LIMITED_API=0x030A0000)
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()
