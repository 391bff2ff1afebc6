"""Backend selection: explicit requests, MIXPREC_BACKEND, "auto" fallback with one warning, report(), and an
import that survives a missing extension or Triton."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import DEVICES

import mixprec_ops
from mixprec_ops import backends

CPU = torch.device("cpu")


def test_report_lists_every_op_and_backend():
    r = backends.report()
    assert set(r["ops"]) >= {"cast_and_scale", "unscale_"}
    for op in r["ops"].values():
        for entry in op.values():  # every device type, CUDA's too when no GPU is visible
            assert set(entry) == {"cuda", "triton", "cpu", "torch", "auto"}, entry
        assert op["cpu"]["torch"] == "ok"
        assert "cuda tensors only" in op["cpu"]["cuda"] or "no 'cuda' implementation" in op["cpu"]["cuda"]
        assert op["cpu"]["auto"] in ("cpu", "torch")
    assert r["torch"] == torch.__version__
    assert "extension" in r


def test_explicit_unavailable_backend_raises_with_reason():
    with pytest.raises(ValueError, match="backend 'cuda' is unavailable: backend 'cuda' serves cuda tensors only"):
        backends.select("cast_and_scale", CPU, "cuda")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MIXPREC_BACKEND", "torch")
    assert backends.select("cast_and_scale", CPU) == "torch"
    assert backends.select("cast_and_scale", CPU, "auto") in ("cpu", "torch")  # the argument wins
    monkeypatch.setenv("MIXPREC_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unavailable"):
        mixprec_ops.cast_and_scale(torch.randn(3), torch.float16)


def test_auto_falls_back_with_one_warning(monkeypatch):
    real = backends.unavailable_reason

    def fake(op, b, device):
        return "pretend the C++ kernels are missing" if b == "cpu" else real(op, b, device)

    monkeypatch.setattr(backends, "unavailable_reason", fake)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="using backend 'torch' because 'cpu': pretend"):
        assert backends.select("cast_and_scale", CPU) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second fallback for the same op and device type is silent
        assert backends.select("cast_and_scale", CPU) == "torch"
        y = mixprec_ops.cast_and_scale(torch.randn(4), torch.bfloat16)
    assert y.dtype == torch.bfloat16


def test_auto_prefers_cpp_on_cpu():
    if backends.unavailable_reason("cast_and_scale", "cpu", CPU) is None:
        assert backends.select("cast_and_scale", CPU, "auto") == "cpu"


def run_python(code: str, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(__file__), timeout=300)


def test_import_survives_missing_extension():
    """With mixprec_ops._C unloadable, import works, warns once with the reason, and every op still runs
    (through the reference); an explicit request for the C++ backend says why it cannot."""
    code = """
        import sys, warnings
        sys.modules["mixprec_ops._C"] = None   # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import mixprec_ops, torch
        msgs = [str(x.message) for x in w if "mixprec_ops" in str(x.message)]
        assert len(msgs) == 1 and "C++/CUDA kernels unavailable" in msgs[0], msgs
        r = mixprec_ops.backends.report()
        assert r["extension"].startswith("unavailable"), r["extension"]
        assert r["ops"]["cast_and_scale"]["cpu"]["auto"] == "torch"
        assert "compiled extension is unavailable" in r["ops"]["cast_and_scale"]["cpu"]["cpu"]
        x = torch.randn(100)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            y = mixprec_ops.cast_and_scale(x, torch.float8_e4m3fn, 2.0)
            f = torch.zeros(1)
            mixprec_ops.unscale_([x.clone()], torch.ones(1), f)
        assert torch.equal(y.float(), (x * 2).clamp(-448, 448).to(torch.float8_e4m3fn).float())
        try:
            mixprec_ops.cast_and_scale(x, torch.float16, backend="cpu")
        except ValueError as e:
            assert "compiled extension is unavailable" in str(e)
        else:
            raise AssertionError("no error")
        print("OK")
    """
    p = run_python(code)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


def test_import_survives_missing_triton():
    code = """
        import sys
        sys.modules["triton"] = None
        import mixprec_ops, torch
        r = mixprec_ops.backends.report()
        assert "triton is not importable" in r["ops"]["unscale_"]["cpu"]["triton"], r
        assert r["triton"] is None
        mixprec_ops.cast_and_scale(torch.randn(10), torch.float16)
        print("OK")
    """
    p = run_python(code)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


def _interpreted_triton_kernels():
    """mixprec_ops.triton_kernels when the Triton interpreter is on, else skip."""
    why = backends.unavailable_reason("cast_and_scale", "triton", CPU)
    if why is not None:
        pytest.skip(why)
    from mixprec_ops import triton_kernels

    return triton_kernels


def test_interpreter_gate_only_where_the_interpreter_is_broken():
    """The Triton-interpreter gate (Triton < 3.7 with NumPy >= 2.4 cannot loop over run-time bounds) must never
    switch on where the interpreter works: on CI's Triton it would otherwise skip every adam_step_ / unscale_ /
    matmul Triton test with a plausible reason. cast_and_scale (no loops) is never gated."""
    tk = _interpreted_triton_kernels()
    fixed = tuple(int(v) for v in __import__("triton").__version__.split(".")[:2]) >= (3, 7)
    if not fixed:
        pytest.skip(f"Triton {__import__('triton').__version__}: its interpreter may be gated")
    for op in sorted(tk.RUNTIME_LOOP_BOUND_OPS):
        assert tk.interpreter_problem(op) is None, op
        assert backends.unavailable_reason(op, "triton", CPU) is None, op
    # first asked under a meta / fake mode (torch.compile tracing): the probe must still run on a real CPU tensor
    from torch._subclasses.fake_tensor import FakeTensorMode

    for mode in (torch.device("meta"), FakeTensorMode()):
        tk._loop_bound_problem.cache_clear()
        try:
            with mode:
                assert tk.interpreter_problem("adam_step_") is None, mode
        finally:
            tk._loop_bound_problem.cache_clear()


def test_wrap_triton_passes_interpreted_kernels_through(monkeypatch):
    """torch 2.11's wrap_triton rejects the interpreter's kernels (torch 2.14's hands them back): ours never calls it
    under the interpreter. Simulated here with a torch.library.wrap_triton that raises as 2.11's does; the cast
    through the Triton op must still run."""
    tk = _interpreted_triton_kernels()
    from mixprec_ops.triton_kernels.cast_and_scale import _cast_and_scale_kernel

    def like_torch_2_11(kernel):
        raise RuntimeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")

    monkeypatch.setattr(torch.library, "wrap_triton", like_torch_2_11)
    assert tk.wrap_triton(_cast_and_scale_kernel) is _cast_and_scale_kernel
    y = mixprec_ops.cast_and_scale(torch.full((5,), 3.0), torch.bfloat16, backend="triton")
    assert y.tolist() == [3.0] * 5


def test_triton_launches_guard_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every Triton op sets the tensors' device around its launch
    (device_guard), except for other devices and while torch.compile traces (its code sets the device itself)."""
    import contextlib

    from mixprec_ops.triton_kernels import device_guard

    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
    g = device_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert isinstance(device_guard(torch.device("cuda", 1)), contextlib.nullcontext)


def test_import_survives_missing_extension_with_warnings_as_errors():
    """`import mixprec_ops` never fails for a missing extension, also under -W error (pytest's filterwarnings =
    error): the warning then goes to the "mixprec_ops" logger."""
    code = """
        import sys, warnings
        warnings.simplefilter("error")
        sys.modules["mixprec_ops._C"] = None
        import mixprec_ops, torch
        assert mixprec_ops.backends.report()["extension"].startswith("unavailable")
        print("OK")
    """
    p = run_python(code)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]
    assert "C++/CUDA kernels unavailable" in p.stderr


def test_fallback_warning_names_the_callers_line(monkeypatch):
    """The one fallback warning points at the user's call, however deep in the package the choice is made (it
    pointed into the op's own file)."""
    import warnings

    real = backends.unavailable_reason
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda op, b, d: "pretend missing" if b == "cpu" else real(op, b, d))
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mixprec_ops.cast_and_scale(torch.randn(4), torch.float16)
    mine = [x for x in w if "using backend" in str(x.message)]
    assert len(mine) == 1 and mine[0].filename == __file__, [(x.filename, str(x.message)) for x in w]


def test_interpreter_is_never_chosen_automatically_for_cuda_tensors(monkeypatch):
    """With TRITON_INTERPRET=1 (the interpreter), "auto" never picks Triton, for CUDA tensors either (it did when
    the CUDA kernel was unavailable); explicit backend="triton" still works."""
    monkeypatch.setattr(backends, "_triton_status", lambda: (True, True, None))
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda op, b, d: {"triton": None, "cuda": "pretend missing"}.get(b))
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="the Triton interpreter .* is never chosen automatically"):
        assert backends.select("matmul", cuda) == "torch"
    assert backends.select("matmul", cuda, "triton") == "triton"



_FIRST_CALLS_IN_THREADS = """
import importlib, json, threading
import torch
import mixprec_ops

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
mods = [importlib.import_module(f"mixprec_ops.ops.{n}") for n in ("cast_and_scale", "unscale", "adam", "matmul")]
mods = [m for m in mods if mixprec_ops.backends.unavailable_reason(m.OP, "triton", dev) is None]
assert mods
errors, barrier = [], threading.Barrier(8)


def first_calls():
    barrier.wait()
    try:
        for m in mods:
            m._select(dev, "triton")
    except Exception as e:  # noqa: BLE001
        errors.append(repr(e)[:300])


threads = [threading.Thread(target=first_calls) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("RESULT " + json.dumps(errors))
"""


@pytest.mark.parametrize("device", DEVICES)
def test_first_triton_calls_from_several_threads(tmp_path, device):
    """Each op registers its Triton version on first use; 8 threads choosing Triton at once in a fresh process
    (nn.DataParallel runs its replicas in threads) registered it several times over: 6-7 of 8 raised
    "Library object has been destroyed". One registration now, under a lock; no thread fails. (The fresh process
    runs on CUDA where there is a GPU: the cpu case is for the interpreter, the cuda one for bench/gpu_check.)"""
    dev = torch.device(device)
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the fresh process takes the GPU here (the cuda case)")
    why = backends.unavailable_reason("cast_and_scale", "triton", dev)
    if why is not None:
        pytest.skip(why)
    from conftest import run_fresh_process

    assert run_fresh_process(_FIRST_CALLS_IN_THREADS, cwd=tmp_path) == []
