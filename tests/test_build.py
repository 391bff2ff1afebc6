"""The built extension's link to the C++ runtime, and setup.py's guard for it.

On the H200 machine of 2026-11-30 the compiler (CXX=/opt/gcc/bin/g++, a wrapper whose search path holds only
libstdc++.a) linked a static libstdc++ into mixprec_ops/_C.abi3.so. The process then had two C++ runtimes, and every
error message of ours that formatted an integer crashed it (SIGSEGV in std::ostream::_M_insert<long>, our copy's
num_put facet never set up): three sessions of GPU test runs lost workers to it. Rebuilt on the CPU machine through
a compiler wrapper that links libstdc++ statically the same way, the messages stopped at the first integer instead
("params[" for "params[2] has no grad"). setup.py now links the libstdc++.so.6 that torch uses whenever the compiler
has no shared one (stdcxx_link_args); with the same wrapper the extension then needs libstdc++.so.6 and the
messages are whole.
"""

from __future__ import annotations

import os
import platform
import runpy
import struct
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DT_NEEDED = 1

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="ELF shared objects and /proc/self/maps: Linux")


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions (run as a module, not as `setup.py ...`: main() is not called)."""
    if not (REPO / "setup.py").is_file():
        pytest.skip(f"no setup.py at {REPO} (not a source checkout)")
    return runpy.run_path(str(REPO / "setup.py"), run_name="mixprec_setup")


def _needed(path: str, elf_section) -> list[str]:
    """The DT_NEEDED names of the ELF64 little-endian shared object at `path`."""
    with open(path, "rb") as f:
        data = f.read()
    dynamic, dynstr = elf_section(data, ".dynamic"), elf_section(data, ".dynstr")
    assert dynamic is not None and dynstr is not None, f"{path}: no .dynamic / .dynstr section"
    names = []
    for off in range(0, len(dynamic) - 15, 16):
        tag, val = struct.unpack_from("<qQ", dynamic, off)
        if tag == 0:  # DT_NULL
            break
        if tag == DT_NEEDED:
            names.append(dynstr[val:dynstr.index(b"\0", val)].decode())
    return names


def test_extension_needs_the_shared_libstdcxx(setup_py):
    """The loaded extension names libstdc++.so.6 among its needed libraries: the one C++ runtime torch uses too (a
    static copy leaves it out, as on the H200 machine)."""
    from mixprec_ops import _ext  # (importing mixprec_ops loads the extension, where built)

    if _ext.LOAD_ERROR is not None:
        pytest.skip(f"extension not loaded: {_ext.LOAD_ERROR}")
    path = sys.modules["mixprec_ops._C"].__file__
    needed = _needed(path, setup_py["_elf_section"])
    assert "libstdc++.so.6" in needed, (
        f"{path} needs {needed}, not libstdc++.so.6: it was linked with a static libstdc++ (see this file's docstring; "
        "rebuild with CXX set to a compiler that has a shared libstdc++)")


def _fake_compiler(tmp_path, answer: str) -> list[str]:
    script = tmp_path / "fake-g++"
    script.write_text(f"#!/bin/sh\necho '{answer}'\n")
    script.chmod(0o755)
    return [str(script)]


def test_setup_links_torchs_libstdcxx_when_the_compiler_has_only_a_static_one(setup_py, tmp_path, capsys):
    """A compiler that cannot name a shared libstdc++.so (its -print-file-name echoes the bare name, as the GPU image's
    /opt/gcc wrapper does) gets the libstdc++.so.6 this process has loaded passed by path; one that names an existing
    file gets nothing added; a compiler that cannot be run gets nothing added and a note."""
    import torch  # noqa: F401  (loads libstdc++.so.6, as setup.py's import of torch.utils.cpp_extension does)

    loaded = setup_py["loaded_libstdcxx"]()
    assert loaded is not None and os.path.basename(loaded).startswith("libstdc++.so")
    assert setup_py["stdcxx_link_args"](_fake_compiler(tmp_path, "libstdc++.so")) == [loaded]
    assert "linking " + loaded in capsys.readouterr().err
    real = tmp_path / "libstdc++.so"
    real.write_bytes(b"")
    assert setup_py["stdcxx_link_args"](_fake_compiler(tmp_path, str(real))) == []
    assert setup_py["stdcxx_link_args"]([str(tmp_path / "no-such-compiler")]) == []
    assert "could not ask" in capsys.readouterr().err


def test_loaded_libstdcxx_reads_the_maps(setup_py, tmp_path):
    """The path comes from the mapping lines (the last field, spaces in it kept); none mapped: None."""
    lib = tmp_path / "dir with space" / "libstdc++.so.6.0.33"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r--p 00000000 08:01 1 /usr/lib/libc.so.6\n"
                    f"7f02-7f03 r-xp 00001000 08:01 2 {lib}\n7f04-7f05 rw-p 00000000 00:00 0\n")
    assert setup_py["loaded_libstdcxx"](str(maps)) == str(lib)
    maps.write_text("7f00-7f01 r--p 00000000 08:01 1 /usr/lib/libc.so.6\n")
    assert setup_py["loaded_libstdcxx"](str(maps)) is None
    assert setup_py["loaded_libstdcxx"](str(tmp_path / "missing")) is None


def test_system_compiler_needs_no_help(setup_py):
    """Here (CI, this machine) the compiler has a shared libstdc++: nothing is added to the link."""
    cxx = setup_py["linking_cxx"]()
    if not any(os.access(os.path.join(d, cxx[0]), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep)) \
            and not os.access(cxx[0], os.X_OK):
        pytest.skip(f"no {cxx[0]} here")
    assert setup_py["stdcxx_link_args"]() == []

