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
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="ELF shared objects and /proc/self/maps: Linux")


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions (run as a module, not as `setup.py ...`: main() is not called)."""
    if not (REPO / "setup.py").is_file():
        pytest.skip(f"no setup.py at {REPO} (not a source checkout)")
    return runpy.run_path(str(REPO / "setup.py"), run_name="mixprec_setup")


def test_extension_uses_the_shared_libstdcxx_only(setup_py):
    """The loaded extension names libstdc++.so.6 among its needed libraries (the one C++ runtime torch uses too; a
    static copy leaves it out, as on the H200 machine) and defines none of the runtime's locale or iostream symbols
    itself (a partial static copy: what a too-old shared libstdc++ lacks, taken from libstdc++.a)."""
    from mixprec_ops import _ext  # (importing mixprec_ops loads the extension, where built)

    if _ext.LOAD_ERROR is not None:
        pytest.skip(f"extension not loaded: {_ext.LOAD_ERROR}")
    path = sys.modules["mixprec_ops._C"].__file__
    assert "libstdc++.so.6" in setup_py["elf_needed"](path)
    problem = setup_py["libstdcxx_problem"](path)
    assert problem is None, f"{problem} (see this file's docstring; rebuild with CXX set to a compiler that has a " \
        "shared libstdc++)"


def test_libstdcxx_problem_names_static_copies(setup_py, tmp_path, monkeypatch):
    """libstdcxx_problem on stand-ins: not needing libstdc++.so.6, and defining the runtime's symbols, are each
    reported; the real extension's lists pass (test above)."""
    so = tmp_path / "x.so"
    so.write_bytes(b"")
    g = setup_py["libstdcxx_problem"].__globals__
    monkeypatch.setitem(g, "elf_needed", lambda p: ["libc.so.6"])
    monkeypatch.setitem(g, "elf_defined_dynamic", lambda p: [])
    assert "does not need libstdc++.so.6" in setup_py["libstdcxx_problem"](str(so))
    monkeypatch.setitem(g, "elf_needed", lambda p: ["libstdc++.so.6"])
    monkeypatch.setitem(g, "elf_defined_dynamic", lambda p: ["_ZN7mixprec3fooEv", "_ZNSt8ios_base4InitC1Ev"])
    assert "_ZNSt8ios_base4InitC1Ev" in setup_py["libstdcxx_problem"](str(so))
    monkeypatch.setitem(g, "elf_defined_dynamic", lambda p: ["_ZN7mixprec3fooEv"])
    assert setup_py["libstdcxx_problem"](str(so)) is None


def _fake_compiler(tmp_path, answer: str) -> list[str]:
    script = tmp_path / "fake-g++"
    script.write_text(f"echo '{answer}'\n")
    return ["/bin/sh", str(script)]  # (through sh: a noexec tmp still runs it)


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


def test_the_linking_compiler_gets_what_it_lacks(setup_py):
    """With the compiler this build uses: nothing added when it names a shared libstdc++.so, the loaded one's path
    when it does not (the GPU image's case)."""
    import subprocess

    import torch  # noqa: F401

    cxx = setup_py["linking_cxx"]()
    try:
        found = subprocess.run([*cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except OSError:
        pytest.skip(f"no {cxx[0]} here")
    has_shared = os.path.isabs(found) and os.path.exists(found)
    assert setup_py["stdcxx_link_args"]() == ([] if has_shared else [setup_py["loaded_libstdcxx"]()])
