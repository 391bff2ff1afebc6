"""The distribution wheel (`make wheel`): built from the repo root exactly as the Makefile does (MIXPREC_DIST_WHEEL=1
pip wheel --no-build-isolation --no-deps), then checked as a user gets it:

1. its size, and its tags (cp310-abi3, manylinux_X_Y no lower than the glibc the extension needs);
2. the GPU code in the extension: SASS for every arch of the build's list, PTX for the +PTX ones (CUDA builds only);
3. its metadata: torch==<the torch it was built against>, Requires-Python, torch/CUDA/archs in the summary (and a
   source install still only asks for torch>=2.11);
4. installed into a fresh directory with no source tree on the path, the extension loads and the CPU kernels
   (cast_and_scale, unscale_, one AdamW step) match the references;
5. the same install made to look built for another torch: import works, one warning names both versions, the
   extension stays unloaded, backends.report() says why, and the reference (and Triton, if usable) still serve.

The build is in-tree (build/), so after `make install` ninja's objects are reused and the build takes seconds; it
serializes with other builds on /tmp/mixprec_build.lock (the lock `flock` takes). Skipped only when the build
toolchain is missing; a CPU-only build (no CUDA toolkit) skips check 2 alone.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import time
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch
from cuobjdump import find_cuobjdump

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LOCK = "/tmp/mixprec_build.lock"
MAX_WHEEL_MB = 150
MANYLINUX_FLOOR = (2, 28)  # torch's own wheels' tag; setup.py never tags lower
BUILD_TIMEOUT_S = 3600  # a cold CUDA build on 2 cores takes ~10 minutes (plus waiting for the lock)


# ---- helpers ------------------------------------------------------------------------------------------------------


def _say(request, msg: str) -> None:
    """One line on the terminal even under output capture (the figures this test exists to report)."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None:
        return
    if capman is not None:
        with capman.global_and_fixture_disabled():
            tr.write_line(f"[test_wheel] {msg}")
    else:
        tr.write_line(f"[test_wheel] {msg}")


def _build_env(**extra) -> dict:
    """The caller's environment, PATH included: the build must find the same ninja as `make install` did (there
    may be two, the system's and the venv's pip one, whose .ninja_log formats differ: switching between them
    rebuilds every object)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def _missing_toolchain() -> str | None:
    """Why the wheel cannot be built here, or None. Only a missing toolchain skips; a failing build fails."""
    if not (REPO / "setup.py").is_file():
        return f"no setup.py at {REPO} (not a source checkout)"
    for mod in ("pip", "setuptools"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed in {sys.executable}'s environment"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; set CXX)"
    if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "Python headers (Python.h) are missing"
    return None


class _BuildLock:
    """flock(2) on the shared lock file: the same lock `flock /tmp/mixprec_build.lock ...` takes."""

    def __enter__(self):
        self.f = open(LOCK, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _run(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n"
                             f"--- stderr\n{r.stderr[-6000:]}")
    return r


def _elf_section(data: bytes, name: str) -> bytes | None:
    """The bytes of section `name` of an ELF64 little-endian file, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise AssertionError("not an ELF64 little-endian file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]
    for sh_name, _type, _flags, _addr, off, size, *_ in secs:
        o = strtab + sh_name
        if data[o:data.index(b"\0", o)].decode() == name:
            return data[off:off + size]
    return None


def _glibc_needed(data: bytes) -> tuple[int, int] | None:
    dynstr = _elf_section(data, ".dynstr") or b""
    found = [(int(a), int(b)) for a, b in re.findall(rb"(?<![A-Za-z0-9_])GLIBC_(\d+)\.(\d+)", dynstr)]
    return max(found) if found else None


_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_PTX, _FATBIN_ELF = 1, 2
_ARCH_SPECIFIC, _FAMILY_SPECIFIC = 0x100000, 0x200000  # entry flags: sm_XXa, sm_XXf


def _fatbin_contents(data: bytes) -> list[dict[str, set[str]]]:
    """Per fatbin container in the .nv_fatbin section (one per compiled .cu): {"sass": {...}, "ptx": {...}} with
    names like "sm_90a". Fallback for when cuobjdump is not installed; checked against it when it is.

    Container: u32 magic 0xBA55ED50, u16 version, u16 header size, u64 payload size. Entry: u16 kind (1 PTX,
    2 ELF), u16 version, u32 header size, u64 padded payload size, ..., u32 SM (e.g. 90) at 28, u64 flags at 40
    (0x100000: 'a', 0x200000: 'f'); the payload (possibly compressed) follows the entry header."""
    fb = _elf_section(data, ".nv_fatbin")
    if fb is None:
        return []
    out, p = [], 0
    while p + 16 <= len(fb):
        magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", fb, p)
        if magic != _FATBIN_MAGIC:
            p += 8  # containers are 8-byte aligned
            continue
        cont, q, end = {"sass": set(), "ptx": set()}, p + hsize, p + hsize + fsize
        while q + 48 <= end:
            kind, _ev, ehsize, padded = struct.unpack_from("<HHIQ", fb, q)
            sm, = struct.unpack_from("<I", fb, q + 28)
            flags, = struct.unpack_from("<Q", fb, q + 40)
            suffix = "a" if flags & _ARCH_SPECIFIC else "f" if flags & _FAMILY_SPECIFIC else ""
            if kind in (_FATBIN_PTX, _FATBIN_ELF):
                cont["ptx" if kind == _FATBIN_PTX else "sass"].add(f"sm_{sm}{suffix}")
            if ehsize == 0:
                break
            q += ehsize + padded
        out.append(cont)
        p = end
    return out


def _expected_gpu_code(cuda_archs: str) -> tuple[set[str], set[str]]:
    """(SASS, PTX) arch names for a MIXPREC_CUDA_ARCHS string, as setup.py's -gencode flags produce them."""
    sass, ptx = set(), set()
    for a in [a.strip() for a in cuda_archs.replace(",", ";").split(";") if a.strip()]:
        with_ptx = a.endswith("+PTX")
        name = "sm_" + a.removesuffix("+PTX").replace(".", "")
        sass.add(name)
        if with_ptx:
            ptx.add(name)
    return sass, ptx


def _py_isolated() -> list[str]:
    """The venv's python, ignoring the user site and (3.11+, -P) not putting the cwd first on sys.path; the cwd
    is an empty temp directory anyway."""
    return [sys.executable, "-s"] + (["-P"] if sys.version_info >= (3, 11) else [])


# ---- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, request):
    """Build the distribution wheel into a temp dir; returns (path, facts)."""
    why = _missing_toolchain()
    if why:
        pytest.skip(f"cannot build the wheel: {why}")
    out = tmp_path_factory.mktemp("wheelhouse")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
           "--disable-pip-version-check", "-w", str(out), "."]
    with _BuildLock():
        t0 = time.monotonic()
        _run(cmd, BUILD_TIMEOUT_S, cwd=REPO, env=_build_env(MIXPREC_DIST_WHEEL="1"))
        secs = time.monotonic() - t0
    wheels = list(out.glob("mixprec_ops-*.whl"))
    assert len(wheels) == 1, wheels
    w = wheels[0]
    _say(request, f"built {w.name} in {secs:.1f} s; {w.stat().st_size / 2**20:.1f} MiB")
    return w


@pytest.fixture(scope="module")
def wheel_files(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        so = [n for n in names if re.fullmatch(r"mixprec_ops/_C\..*so", n)]
        assert len(so) == 1, f"expected one compiled extension in the wheel, found {so} in {names}"
        build_info = {}
        exec(z.read("mixprec_ops/_build_info.py").decode(), build_info)
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        return {
            "names": names,
            "so_name": so[0],
            "so": z.read(so[0]),
            "build_info": {k: v for k, v in build_info.items() if k.isupper()},
            "metadata": Parser().parsestr(z.read(f"{dist_info}/METADATA").decode()),
            "wheel_meta": Parser().parsestr(z.read(f"{dist_info}/WHEEL").decode()),
        }


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory):
    """The wheel installed with pip into a fresh directory (not the venv)."""
    target = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
          "--target", str(target), str(wheel)], 300, env=_build_env())
    return target


# ---- 1. size and tags ---------------------------------------------------------------------------------------------


def test_wheel_size_and_tags(wheel, wheel_files, request):
    size_mb = wheel.stat().st_size / 2**20
    so_mb = len(wheel_files["so"]) / 2**20
    fatbin = _elf_section(wheel_files["so"], ".nv_fatbin")
    _say(request, f"wheel {size_mb:.1f} MiB; {wheel_files['so_name']} {so_mb:.1f} MiB uncompressed"
                  + (f", of which GPU code (.nv_fatbin) {len(fatbin) / 2**20:.1f} MiB" if fatbin else ""))
    assert size_mb < MAX_WHEEL_MB, f"wheel is {size_mb:.1f} MiB (bound {MAX_WHEEL_MB})"
    assert wheel_files["so_name"].endswith(".abi3.so"), wheel_files["so_name"]
    # No sources, tests or benchmarks in the wheel: the package and its Triton kernels only.
    stray = [n for n in wheel_files["names"] if not n.startswith(("mixprec_ops/", "mixprec_ops-"))]
    assert not stray, stray
    assert any(n.startswith("mixprec_ops/triton_kernels/") for n in wheel_files["names"])

    tags = wheel_files["wheel_meta"].get_all("Tag")
    assert len(tags) == 1, tags
    m = re.fullmatch(r"cp310-abi3-manylinux_(\d+)_(\d+)_(\w+)", tags[0])
    assert m, f"expected cp310-abi3-manylinux_X_Y_<arch>, got {tags[0]}"
    tag_glibc, arch = (int(m.group(1)), int(m.group(2))), m.group(3)
    assert arch == platform.machine(), (arch, platform.machine())
    needed = _glibc_needed(wheel_files["so"])
    _say(request, f"tag {tags[0]}; the extension needs glibc {'.'.join(map(str, needed)) if needed else '-'}")
    assert tag_glibc >= MANYLINUX_FLOOR, tags[0]
    assert needed is None or tag_glibc >= needed, f"tag {tags[0]} claims less than the GLIBC_{needed} the .so needs"
    assert wheel.name.endswith(f"-{tags[0]}.whl"), (wheel.name, tags)


# ---- 2. GPU code --------------------------------------------------------------------------------------------------


def test_wheel_gpu_code(wheel_files, tmp_path, request):
    bi = wheel_files["build_info"]
    if not bi.get("WITH_CUDA"):
        pytest.skip(f"the wheel was built without CUDA kernels ({bi}): no GPU code to check")
    sass, ptx = _expected_gpu_code(bi["CUDA_ARCHS"])
    conts = _fatbin_contents(wheel_files["so"])
    assert conts, "a CUDA build but the extension has no .nv_fatbin section"
    for i, c in enumerate(conts):  # every compiled .cu carries every arch, and nothing else (a stale object would)
        assert c == {"sass": sass, "ptx": ptx}, f"fatbin container {i}: {c}, expected SASS {sass} and PTX {ptx}"
    found = f"{len(conts)} objects, each SASS {sorted(sass)} + PTX {sorted(ptx)}"

    tool = find_cuobjdump()
    if tool is None:
        _say(request, f"GPU code (ELF .nv_fatbin parser; no cuobjdump found): {found}")
        return
    so = tmp_path / "ext.so"
    so.write_bytes(wheel_files["so"])
    per_obj: dict[str, dict[str, set[str]]] = {}
    for flag, kind, ext in (("--list-elf", "sass", "cubin"), ("--list-ptx", "ptx", "ptx")):
        out = _run([tool, flag, str(so)], 120).stdout
        for obj, arch in re.findall(rf"(?:ELF|PTX) file\s+\d+:\s+(\S+?)\.(sm_\w+)\.{ext}", out):
            per_obj.setdefault(obj, {"sass": set(), "ptx": set()})[kind].add(arch)
    # cuobjdump names a family-specific cubin (sm_100f) without its 'f', and older ones (Triton 3.6 ships CUDA 12.8's)
    # an arch-specific one (sm_90a) without its 'a'; the ELF parser above has already checked the exact names
    strip_f = lambda s: {re.sub(r"(sm_\d+)[af]$", r"\1", a) for a in s}  # noqa: E731
    assert len(per_obj) == len(conts), (per_obj, conts)
    for obj, c in per_obj.items():
        assert strip_f(c["sass"]) == strip_f(sass) and c["ptx"] == ptx, f"cuobjdump on {obj}: {c}"
    _say(request, f"GPU code ({tool} and the .nv_fatbin parser agree): {found} ({', '.join(sorted(per_obj))})")


# ---- 3. metadata --------------------------------------------------------------------------------------------------


def test_wheel_metadata(wheel_files, tmp_path, request):
    md, bi = wheel_files["metadata"], wheel_files["build_info"]
    torch_built = bi["TORCH_VERSION"].split("+")[0]
    assert torch_built == torch.__version__.split("+")[0], (bi, torch.__version__)
    reqs = md.get_all("Requires-Dist") or []
    torch_reqs = [r for r in reqs if re.match(r"torch\b", r) and "extra ==" not in r]
    assert torch_reqs == [f"torch=={torch_built}"], reqs
    assert md["Requires-Python"] == ">=3.10", md["Requires-Python"]
    summary = md["Summary"]
    assert f"torch {torch_built}" in summary, summary
    if bi["WITH_CUDA"]:
        sass, ptx = _expected_gpu_code(bi["CUDA_ARCHS"])
        assert f"CUDA {bi['TORCH_CUDA']}" in summary, summary
        for a in sass:
            assert a in summary, (a, summary)
        for a in ptx:
            assert a.replace("sm_", "compute_") in summary, (a, summary)
    _say(request, f"Requires-Dist {torch_reqs[0]}; Summary: ...{summary[summary.index('This wheel'):]}")

    # Only the distribution wheel pins: the metadata of a source install (`pip install .`) asks for torch>=2.11.
    env = _build_env()
    env.pop("MIXPREC_DIST_WHEEL", None)
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    with _BuildLock():  # runs setup.py, which rewrites mixprec_ops/_build_info.py
        r = _run([sys.executable, "-c", code, str(tmp_path)], 300, cwd=REPO, env=env)
    src_md = Parser().parsestr((tmp_path / r.stdout.strip().splitlines()[-1] / "METADATA").read_text())
    src_torch = [x for x in src_md.get_all("Requires-Dist") or [] if re.match(r"torch\b", x)]
    assert src_torch == ["torch>=2.11"], src_torch
    assert "This wheel" not in src_md["Summary"], src_md["Summary"]


# ---- 4 and 5. the installed wheel ---------------------------------------------------------------------------------

_CHECK = r'''
import json, os, sys, warnings
site, mode = sys.argv[1], sys.argv[2]
import torch
caught = []
warnings.simplefilter("always")
_show = warnings.showwarning
warnings.showwarning = lambda m, *a, **k: caught.append(str(m))
import mixprec_ops
from mixprec_ops import _ext, backends
from mixprec_ops.ops import cast_and_scale_reference, unscale_reference
from mixprec_ops.optim import AdamW

def under_site(path):
    return os.path.realpath(path).startswith(os.path.realpath(site) + os.sep)

assert under_site(mixprec_ops.__file__), f"imported {mixprec_ops.__file__}, not the wheel in {site}"
assert not any(os.path.realpath(p) == os.path.realpath(os.environ["MIXPREC_REPO"]) for p in sys.path if p), sys.path

def bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])

def same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    nan = a.float().isnan()
    assert torch.equal(nan, b.float().isnan()), f"{what}: NaN positions differ"
    assert torch.equal(bits(a)[~nan], bits(b)[~nan]), f"{what}: values differ"

def run_ops(backend):
    """cast_and_scale, unscale_ and one AdamW step on `backend`, each against the torch reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * 300
    x[7] = float("inf")
    for dt in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
        scale = torch.tensor([0.75])
        a, ar = torch.zeros(1), torch.zeros(1)
        y = mixprec_ops.cast_and_scale(x, dt, scale, amax=a, backend=backend)
        same(y, cast_and_scale_reference(x, dt, scale, amax=ar), f"cast_and_scale {dt}")
        same(a, ar, f"cast_and_scale amax {dt}")
    ts = [torch.randn(n, generator=g).to(dt) * 64 for n, dt in ((3001, torch.bfloat16), (1025, torch.float16),
                                                                 (77, torch.float32))]
    for poison in (False, True):
        if poison:
            ts[1][5] = float("nan")
        a, r = [t.clone() for t in ts], [t.clone() for t in ts]
        inv = torch.tensor([0.125])
        f, fr = torch.zeros(1), torch.zeros(1)
        n = mixprec_ops.unscale_(a, inv, f, return_norm=True, backend=backend)
        nr = unscale_reference(r, inv, fr, return_norm=True)
        for i, (u, v) in enumerate(zip(a, r)):
            same(u, v, f"unscale_ tensor {i}")
        same(f, fr, "unscale_ found_inf")
        assert f.item() == float(poison), f
        if not poison:
            assert torch.allclose(n, nr, rtol=1e-5), (n, nr)
    params = [[(torch.randn(33, 17, generator=torch.Generator().manual_seed(i)) * 0.1).to(dt).requires_grad_()
               for i, dt in enumerate((torch.bfloat16, torch.float16, torch.float32))] for _ in range(2)]
    opts = [AdamW(params[0], lr=1e-2, weight_decay=0.1, backend=backend),
            AdamW(params[1], lr=1e-2, weight_decay=0.1, backend="torch")]
    for ps in params:
        for i, p in enumerate(ps):
            p.grad = (torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)) * 0.01).to(p.dtype)
    for o in opts:
        o.step()
    for i, (p, q) in enumerate(zip(*params)):
        assert not torch.equal(p.detach().float(), (torch.randn(33, 17, generator=torch.Generator().manual_seed(i))
                                                    * 0.1).to(p.dtype).float()), "AdamW step changed nothing"
        same(p.detach(), q.detach(), f"AdamW param {i}")
        sa, sb = opts[0].state[p], opts[1].state[q]
        assert set(sa) == set(sb), (set(sa), set(sb))
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                same(sa[k], sb[k], f"AdamW param {i} state {k}")

ext_warnings = [m for m in caught if "C++/CUDA kernels unavailable" in m]
res = {"torch": torch.__version__, "loaded": _ext.LOADED, "load_error": _ext.LOAD_ERROR, "ext_warnings": ext_warnings}
if mode == "ok":
    assert _ext.LOADED, f"extension not loaded: {_ext.LOAD_ERROR}"
    assert not ext_warnings, ext_warnings
    assert under_site(sys.modules["mixprec_ops._C"].__file__), sys.modules["mixprec_ops._C"].__file__
    import importlib.util
    tk = importlib.util.find_spec("mixprec_ops.triton_kernels")  # located without importing triton
    assert tk is not None and under_site(tk.origin), tk
    for op in ("cast_and_scale", "unscale_", "adam_step_"):
        assert backends.unavailable_reason(op, "cpu", torch.device("cpu")) is None, op
    run_ops("cpu")
    res["served"] = "cpu"
else:
    built = _ext.BUILD_INFO["TORCH_VERSION"]
    assert built == "2.99.0", _ext.BUILD_INFO
    assert not _ext.LOADED and "mixprec_ops._C" not in sys.modules, "the mismatched extension was loaded"
    assert len(ext_warnings) == 1, caught
    assert built in ext_warnings[0] and torch.__version__ in ext_warnings[0], ext_warnings
    rep = backends.report()
    assert rep["extension"].startswith("unavailable") and built in rep["extension"], rep["extension"]
    assert torch.__version__ in rep["extension"], rep["extension"]
    cpu = rep["ops"]["cast_and_scale"]["cpu"]
    assert built in cpu["cpu"] and cpu["torch"] == "ok", cpu
    try:
        mixprec_ops.cast_and_scale(torch.ones(4), torch.bfloat16, backend="cpu")
        raise AssertionError("backend='cpu' served without the extension")
    except ValueError as e:
        assert built in str(e), e
    run_ops("torch")
    y = mixprec_ops.cast_and_scale(torch.ones(4) * 3, torch.bfloat16)  # "auto": falls back to the reference
    assert y.tolist() == [3.0] * 4, y
    served = ["torch"]
    # the Triton interpreter (TRITON_INTERPRET=1): no compiled extension involved (and not every interpreter can run
    # every kernel: mixprec_ops.triton_kernels.interpreter_problem)
    if all(rep["ops"][op]["cpu"]["triton"] == "ok" for op in ("cast_and_scale", "unscale_", "adam_step_")):
        run_ops("triton")
        served.append("triton")
    import mixprec_ops as again  # noqa: F401  (cached: no second warning)
    assert len([m for m in caught if "C++/CUDA kernels unavailable" in m]) == 1, caught
    res["served"] = "+".join(served)
    res["report_extension"] = rep["extension"]
print("RESULT " + json.dumps(res))
'''


def _check_installed(site_dir: Path, mode: str, tmp_path: Path) -> dict:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site_dir), PYTHONNOUSERSITE="1", MIXPREC_REPO=str(REPO))
    env.pop("MIXPREC_BACKEND", None)
    r = _run(_py_isolated() + ["-c", _CHECK, str(site_dir), mode], 600, cwd=cwd, env=env)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, r.stdout
    return json.loads(line[-1][len("RESULT "):])


def test_installed_wheel_runs_cpu_kernels(site, tmp_path, request):
    res = _check_installed(site, "ok", tmp_path)
    assert res["loaded"] and res["served"] == "cpu", res
    _say(request, f"installed wheel: extension loaded under torch {res['torch']}; CPU kernels match the references")


def test_installed_wheel_torch_mismatch(site, tmp_path, request):
    """A wheel built for another torch (simulated by editing the installed _build_info.py): no crash, no undefined
    symbol, one warning naming both versions, the reason in backends.report(), the reference (and Triton) serve."""
    other = tmp_path / "site"
    shutil.copytree(site, other)
    bi = other / "mixprec_ops" / "_build_info.py"
    text, n = re.subn(r"(?m)^TORCH_VERSION = .*$", "TORCH_VERSION = '2.99.0'", bi.read_text())
    assert n == 1, text
    bi.write_text(text)
    shutil.rmtree(other / "mixprec_ops" / "__pycache__", ignore_errors=True)
    res = _check_installed(other, "mismatch", tmp_path)
    assert not res["loaded"] and "2.99.0" in res["load_error"], res
    if os.environ.get("TRITON_INTERPRET") == "1":  # CI: the interpreter serves every op there (Triton >= 3.7)
        from importlib.metadata import version

        if tuple(int(v) for v in version("triton").split(".")[:2]) >= (3, 7):
            assert res["served"] == "torch+triton", res
    _say(request, f"torch mismatch: served by {res['served']}; warning: {res['ext_warnings'][0]}")
