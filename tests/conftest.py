"""Shared test helpers. Tests run the installed package (`make test` installs it; pytest does not put the repo root
on sys.path), on CPU with the Triton interpreter (TRITON_INTERPRET=1, set by `make test`), and on a GPU through
bench/gpu_check, where the CUDA-device parameters stop skipping."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

# The session's own autotune cache directory (MIXPREC_CACHE_DIR, triton_kernels/tune_cache.py's ENV), set before any
# test can read it (tune_cache.cache_dir() reads the variable on every use): GPU tests tune and store choices, which
# must not land in the user's ~/.cache/mixprec_ops, and a rerun must tune again, not load an earlier run's choices.
SESSION_CACHE_DIR = tempfile.mkdtemp(prefix="mixprec_tests_cache_")
os.environ["MIXPREC_CACHE_DIR"] = SESSION_CACHE_DIR

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.utils._python_dispatch  # noqa: E402

import mixprec_ops  # noqa: E402
from mixprec_ops import backends

_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mixprec_ops")
if os.path.dirname(os.path.abspath(mixprec_ops.__file__)) == _SRC:
    # `python -m pytest` puts the repo root first on sys.path: the source tree (no compiled _C, no
    # mixprec_ops.triton_kernels) would shadow the installed package and the kernel tests would all skip.
    pytest.exit("tests imported mixprec_ops from the source tree; run `make test` (or the venv's `pytest`, or "
                "`python -P -m pytest`) so that the installed package is tested", returncode=3)

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)")),
]


def run_fresh_process(code: str, *args: str, cwd) -> dict:
    """Run `code` in a fresh Python process (-P: the installed package, not the source tree) and return the JSON it
    printed after "RESULT " (for what only a first call in a process shows, e.g. an op registered on first use)."""
    r = subprocess.run([sys.executable, "-P", "-c", code, *args], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.split("RESULT ", 1)[1])


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE_DIR, ignore_errors=True)


def pytest_runtest_logreport(report):
    """MIXPREC_TEST_REPORT=PATH (bench/gpu_check sets it): one JSON line per test outcome, appended as it happens
    (nodeid, phase, outcome, seconds, and a failure's text), so that a run stopped at its time limit still tells why
    its failures failed and which tests were slow: pytest prints failures, durations and junit.xml only at its end,
    which the GPU runs of 2026-11-28 and -30 never reached. Under pytest-xdist the controller writes (each worker's
    reports reach it, a crashed worker's test too); the workers do not."""
    path = os.environ.get("MIXPREC_TEST_REPORT")
    if not path or os.environ.get("PYTEST_XDIST_WORKER") or (report.when != "call" and report.passed):
        return
    rec = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
           "seconds": round(report.duration, 3)}
    if report.failed:
        rec["text"] = report.longreprtext[-4000:]
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _needs_cuda(item) -> bool:
    """A test for the GPU: "cuda" in its id (the CUDA-device parameters), or a skipif mark whose reason asks for a
    CUDA device (test_step_adds_no_host_sync[cpu-triton]: "cpu" is where its lr lives), not one for a machine
    without CUDA (test_constructor_warning_points_at_the_caller)."""
    return "cuda" in item.nodeid or any("CUDA device" in str(m.kwargs.get("reason", ""))
                                        for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    """MIXPREC_TESTS_CUDA_ONLY=1 (bench/gpu_check sets it): only the GPU tests (_needs_cuda: those a CPU machine
    skips), the others deselected; CI runs those, and a GPU session's few minutes go to what only a GPU can prove
    (its runs of 2026-11-28 and -30 stopped at their limits partway through the CPU tests).
    MIXPREC_TESTS_CUDA_FIRST=1: all tests, the GPU ones first, in their usual order."""
    if os.environ.get("MIXPREC_TESTS_CUDA_ONLY") == "1":
        kept = [item for item in items if _needs_cuda(item)]
        config.hook.pytest_deselected(items=[item for item in items if not _needs_cuda(item)])
        items[:] = kept
    elif os.environ.get("MIXPREC_TESTS_CUDA_FIRST") == "1":
        items.sort(key=lambda item: not _needs_cuda(item))  # stable: file order kept within each part


def kernel_backends(op: str, device: str) -> list[str]:
    """The non-reference backends that can serve `op` on `device` here (the reference is the oracle)."""
    dev = torch.device(device)
    return [b for b in ("cuda", "triton", "cpu") if backends.unavailable_reason(op, b, dev) is None]


def backend_params(op: str):
    """(device, backend) pairs: every kernel backend on every device, skipped with the reason when unavailable."""
    out = []
    for dev, bk in (("cpu", "cpu"), ("cpu", "triton"), ("cuda", "cuda"), ("cuda", "triton")):
        if dev == "cuda" and not HAS_CUDA:
            why = "needs a CUDA device (runs in bench/gpu_check)"
        else:
            why = backends.unavailable_reason(op, bk, torch.device(dev))
        out.append(pytest.param(dev, bk, id=f"{dev}-{bk}", marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out


def extension_backend(op: str, device: str) -> str:
    """The compiled extension's backend for `device` ("cpu" or "cuda"); skips the test, with the reason, when the
    extension cannot serve `op` there."""
    backend = "cpu" if device == "cpu" else "cuda"
    why = backends.unavailable_reason(op, backend, torch.device(device))
    if why:
        pytest.skip(why)
    return backend


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor, as a signed integer tensor of the same width."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality, except that any NaN matches any NaN (payloads differ between CPU and GPU casts).
    The pair is read back in one transfer (see assert_lists_bit_exact) and compared on the host."""
    assert_lists_bit_exact([actual], [expected], labels=[what])


def _host_bit_exact(a: torch.Tensor, e: torch.Tensor, what: str) -> None:
    """assert_bit_exact's comparison, both tensors on the CPU."""
    fa, fe = a.float(), e.float()
    nan_a, nan_e = fa.isnan(), fe.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ ({(nan_a != nan_e).sum()} elements)"
    diff = (bits(a) != bits(e)) & ~nan_e
    if diff.any():
        i = diff.flatten().nonzero()[:5].flatten()
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} elements differ; first at {i.tolist()}: "
                             f"got {fa.flatten()[i].tolist()}, expected {fe.flatten()[i].tolist()}")


def to_host(tensors) -> list:
    """The tensors copied to the CPU in one transfer per (device, element width), not one per tensor: on the GPU
    machine each read-back is a stream sync, and with a dozen test processes sharing one GPU a sync waits for this
    process's time slice (~1.5 ms each in the run of 2026-11-30: a test comparing 1000-tensor lists one tensor at a
    time took 56 s). Same dtypes, shapes and bits; contiguous. CPU tensors come back as they are (made contiguous:
    aliases, not copies)."""
    out = [None] * len(tensors)
    groups = {}
    for i, t in enumerate(tensors):
        t = t.detach()
        if t.device.type == "cpu":
            out[i] = t.contiguous()
        else:
            groups.setdefault((t.device, t.element_size()), []).append((i, t))
    for members in groups.values():
        if all(t.numel() == 0 for _, t in members):  # nothing to read: no transfer
            for i, t in members:
                out[i] = torch.empty(t.shape, dtype=t.dtype)
            continue
        flat = torch.cat([bits(t).reshape(-1) for _, t in members]).cpu()
        for (i, t), chunk in zip(members, flat.split([t.numel() for _, t in members]), strict=True):
            out[i] = chunk.view(t.dtype).reshape(t.shape)
    return out


def assert_lists_bit_exact(actual, expected, what: str = "", labels=None) -> None:
    """assert_bit_exact for each pair of two equally long tensor lists, all read back in one transfer per element
    width (to_host); a failure names the first differing pair by labels[i], or as `what[i]` without labels."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected), (what, len(actual), len(expected))
    assert labels is None or len(labels) == len(actual), (len(labels), len(actual))
    label = (lambda i: labels[i]) if labels is not None else (lambda i: f"{what}[{i}]")
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, (label(i), a.dtype, a.shape, e.dtype, e.shape)
    host = to_host(actual + expected)
    n = len(actual)
    for i in range(n):
        _host_bit_exact(host[i], host[n + i], label(i))


def outside(t: torch.Tensor) -> torch.Tensor:
    """A copy of the elements of t's base tensor (t._base, contiguous) that the view t does not reach: the gap
    columns of a strided slice, the element before an offset view, the tail after a slice. A kernel writing t in
    place must leave them as they were; an empty tensor for a t that is not a view."""
    b = t._base
    if b is None:
        return t.new_empty(0)
    assert b.is_contiguous(), "outside() reads views of contiguous tensors"
    keep = torch.ones(b.numel(), dtype=torch.bool, device=b.device)
    keep.as_strided(t.shape, t.stride(), t.storage_offset() - b.storage_offset()).fill_(False)
    return b.reshape(-1)[keep]


def to_device(tensors, device) -> list:
    """CPU tensors moved to `device` in one transfer per element width (on the GPU each copy from pageable memory
    syncs: see to_host), each then its own contiguous allocation (a clone on the device), without requires_grad.
    To the CPU: the tensors themselves, as .to("cpu") returns them."""
    assert all(t.device.type == "cpu" for t in tensors), "to_device moves CPU tensors"
    if torch.device(device).type == "cpu":
        return list(tensors)
    out = [None] * len(tensors)
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.element_size(), []).append((i, t))
    for members in groups.values():
        flat = torch.cat([bits(t).reshape(-1) for _, t in members]).to(device)
        for (i, t), chunk in zip(members, flat.split([t.numel() for _, t in members]), strict=True):
            out[i] = chunk.view(t.dtype).reshape(t.shape).clone()
    return out


# The C++ CPU kernels' code paths on this machine: their AVX2 code (MIXPREC_CPU_ISA=avx2 keeps the AVX-512 code off;
# on a machine without AVX-512 it is the only path) and, where the CPU and torch have AVX-512, the AVX-512 code of
# cast_and_scale (forward and backward) and of unscale_ for 16-bit tensors (csrc/cpu/*_avx512.cpp), which serves
# calls there by default.
# Tests that probe a kernel's rounding, tails and task split take the `cpu_isa` fixture with these parameters.
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
CPU_ISAS = [pytest.param("avx2", id="avx2"),
            pytest.param("avx512", id="avx512", marks=pytest.mark.skipif(
                not _AVX512, reason="the CPU (or torch's ATEN_CPU_CAPABILITY) has no AVX-512: the AVX2 path only"))]


@pytest.fixture
def cpu_isa(request, monkeypatch):
    """Runs the test on one code path of the CPU kernels (indirect parameter: "avx2" or "avx512")."""
    if request.param == "avx2":
        monkeypatch.setenv("MIXPREC_CPU_ISA", "avx2")
    else:
        monkeypatch.delenv("MIXPREC_CPU_ISA", raising=False)
    assert backends.cpu_vector_isa() in (request.param, None)
    return request.param


def poison_allocator(nbytes: int, device: str) -> None:
    """Fill a block of `nbytes` with 0xFF bytes and free it, so that the next allocation of that size (which the
    CUDA caching allocator, and glibc for small CPU blocks, hand back) starts as NaN garbage, not zeros: an element
    a kernel forgets to write then fails the comparison instead of passing by luck."""
    if nbytes > 0:
        torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=device)


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that records the name of every op dispatched inside it ("aten.add_.Tensor",
    "mixprec.adam_step_.default"; torch's profiler record-function ops left out), in order, in `ops`."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not str(func).startswith("profiler."):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def wide_random(shape, dtype=torch.float32, device="cpu", lo=-12.0, hi=6.0, generator=None) -> torch.Tensor:
    """Random non-zero values with random signs whose magnitudes span 10**lo .. 10**hi (log-uniform), so casts
    see subnormals, normal values and overflow alike. Never zeros (they hide unwritten outputs)."""
    mag = torch.pow(10.0, torch.empty(shape).uniform_(lo, hi, generator=generator))
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return (mag * sign).to(dtype).to(device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


__all__ = ["mixprec_ops"]
