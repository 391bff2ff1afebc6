"""Exhaustive checks in native code, too slow to write in Python: tests/native/*.cpp, compiled against the installed
torch's headers and run here.

fp8_avx2_exhaustive.cpp: the CPU kernel's AVX2 fp8 rounding (csrc/cpu/fp8_convert_avx2.h) and, where the CPU has
AVX-512, its AVX-512 rounding (fp8_convert_avx512.h) against c10's own conversion (torch's cast) on all 2^32 fp32
inputs, plain and after the kernel's saturating clamp, e4m3fn (with the installed torch's overflow rule) and e5m2:
~15 s an ISA on 2 cores. The Python tests check the same code through the op on
the rounding boundaries (test_cast_and_scale.py::test_fp8_probes_on_the_cpu_kernel); this one leaves no input out.
"""

import os
import platform
import shutil
import subprocess

import pytest
from torch.utils.cpp_extension import include_paths

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _has_avx2() -> bool:
    return "avx2" in _cpu_flags()


def _has_avx512() -> bool:  # what csrc/cpu/cast_and_scale_avx512.cpp needs (and the native check tests)
    return {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not _has_avx2(),
                    reason="the AVX2 code path needs an x86-64 CPU with AVX2")
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the native check")
def test_fp8_avx2_rounding_equals_c10_on_every_fp32_input(tmp_path):
    exe = tmp_path / "fp8_avx2_exhaustive"
    cmd = ["g++", "-O2", "-mavx2", "-mfma", "-fopenmp", "-std=c++17", *(f"-I{p}" for p in include_paths()),
           f"-I{ROOT}/csrc", os.path.join(ROOT, "tests", "native", "fp8_avx2_exhaustive.cpp"), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    # 4 cases an ISA; on a CPU with AVX-512 the kernel's AVX-512 rounding is checked too (8 lines in all).
    want = 8 if _has_avx512() else 4
    assert ran.returncode == 0 and ran.stdout.count(": 0 mismatches") == want, ran.stdout[-3000:] + ran.stderr[-2000:]
