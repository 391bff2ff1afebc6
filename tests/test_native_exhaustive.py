"""Exhaustive checks in native code, too slow to write in Python: tests/native/*.cpp, compiled against the installed
torch's headers and run here.

fp8_avx2_exhaustive.cpp: the CPU kernel's AVX2 fp8 rounding (csrc/cpu/fp8_convert_avx2.h) against c10's own
conversion (torch's cast) on all 2^32 fp32 inputs, plain and after the kernel's saturating clamp, e4m3fn (with the
installed torch's overflow rule) and e5m2: ~15 s on 2 cores. The Python tests check the same code through the op on
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


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


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
    assert ran.returncode == 0 and ran.stdout.count(": 0 mismatches") == 4, ran.stdout[-3000:] + ran.stderr[-2000:]
