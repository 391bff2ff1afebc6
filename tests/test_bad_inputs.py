"""Bad input: a clear error naming the argument, raised before anything is touched (every tensor unchanged)."""

import pytest
import torch

import mixprec_ops

X = torch.randn(10, 3)
META = torch.device("meta")  # a second device that exists on every machine


CAST_CASES = [
    # (kwargs overriding the good call, exception type, text that must appear)
    ({"x": torch.arange(6, dtype=torch.int32)}, TypeError, "x must be float32"),
    ({"x": X.double()}, TypeError, "x must be float32"),
    ({"x": [1.0, 2.0]}, TypeError, "x must be a torch.Tensor"),
    ({"x": X.to_sparse()}, TypeError, "x must be a dense strided tensor"),
    ({"dtype": torch.int8}, TypeError, "dtype must be one of"),
    ({"dtype": torch.float32}, TypeError, "dtype must be one of"),
    ({"scale": torch.tensor([1.0], dtype=torch.float64)}, TypeError, "scale must be a float32"),
    ({"scale": torch.tensor([1.0, 2.0])}, ValueError, "scale must have exactly 1 element"),
    ({"scale": torch.ones(1, device=META)}, ValueError, "scale must be on cpu"),
    ({"scale": "2.0"}, TypeError, "scale must be None, a Python float"),
    ({"scale": True}, TypeError, "scale must be None, a Python float"),
    ({"amax": torch.zeros(1, dtype=torch.float16)}, TypeError, "amax must be a float32"),
    ({"amax": torch.zeros(2)}, ValueError, "amax must have exactly 1 element"),
    ({"amax": torch.zeros(1, device=META)}, ValueError, "amax must be on cpu"),
    ({"amax": 0.0}, TypeError, "amax must be a torch.Tensor"),
    ({"saturate": "yes"}, TypeError, "saturate must be a bool"),
    ({"backend": "fast"}, ValueError, "backend must be one of"),
    ({"backend": "cuda"}, ValueError, "backend 'cuda' is unavailable"),
]


@pytest.mark.parametrize("override,exc,text", CAST_CASES, ids=[c[2] + f"-{i}" for i, c in enumerate(CAST_CASES)])
def test_cast_and_scale_rejects(override, exc, text):
    good_amax = torch.full((1,), 0.5)
    args = {"x": X.clone(), "dtype": torch.float8_e4m3fn, "scale": torch.ones(1), "amax": good_amax,
            "saturate": True, "backend": None}
    args.update(override)
    with pytest.raises(exc, match=text):
        mixprec_ops.cast_and_scale(args.pop("x"), args.pop("dtype"), args.pop("scale"), **args)
    assert good_amax.item() == 0.5  # the tensor the op mutates is untouched by a rejected call


def test_env_backend_is_validated(monkeypatch):
    monkeypatch.setenv("MIXPREC_BACKEND", "gpu")
    with pytest.raises(ValueError, match="MIXPREC_BACKEND must be one of"):
        mixprec_ops.cast_and_scale(X, torch.float16)


def good_unscale_args():
    return [torch.randn(5), torch.randn(7).bfloat16()], torch.tensor([0.5]), torch.zeros(1)


UNSCALE_CASES = [
    (lambda ts, inv, f: (ts, inv, torch.zeros(1, dtype=torch.float16)), TypeError, "found_inf must be a float32"),
    (lambda ts, inv, f: (ts, inv, torch.zeros(2)), ValueError, "found_inf must have exactly 1 element"),
    (lambda ts, inv, f: (ts, inv, torch.zeros(1, device=META)), ValueError, "found_inf must be on cpu"),
    (lambda ts, inv, f: (ts, torch.tensor([0.5, 0.5]), f), ValueError, "inv_scale must have exactly 1 element"),
    (lambda ts, inv, f: (ts, torch.tensor([0.5]).double(), f), TypeError, "inv_scale must be a float32"),
    (lambda ts, inv, f: (ts, 0.5, f), TypeError, "inv_scale must be a torch.Tensor"),
    (lambda ts, inv, f: (ts + [torch.arange(3)], inv, f), TypeError, r"tensors\[2\] must be float32"),
    (lambda ts, inv, f: (ts + [torch.randn(3, device=META)], inv, f), ValueError, r"tensors\[2\] is on meta"),
    (lambda ts, inv, f: (ts + [torch.randn(4, 4).to_sparse()], inv, f), TypeError, r"tensors\[2\] must be a dense"),
    (lambda ts, inv, f: (ts + [torch.randn(3).double()], inv, f), TypeError, r"tensors\[2\] must be float32"),
    (lambda ts, inv, f: (3, inv, f), TypeError, "tensors must be a tensor or a sequence"),
    (lambda ts, inv, f: (ts + [3.0], inv, f), TypeError, r"tensors\[2\] must be a torch.Tensor"),
    (lambda ts, inv, f: (ts + [None], inv, f), TypeError, r"tensors\[2\] must be a torch.Tensor"),
    (lambda ts, inv, f: (ts + [torch.randn(1).expand(3)], inv, f), ValueError,
     r"tensors\[2\] has elements that share"),
    (lambda ts, inv, f: (ts + [torch.randn(20).as_strided((4, 4), (1, 1))], inv, f), ValueError,
     r"tensors\[2\] has elements that share"),
    (lambda ts, inv, f: (ts + [torch.randn(3, requires_grad=True)], inv, f), RuntimeError,
     r"tensors\[2\] is a leaf tensor that requires grad"),
    (lambda ts, inv, f: (ts + [torch.ones(4, requires_grad=True)[:2]], inv, f), RuntimeError,
     r"tensors\[2\] is a view of a leaf tensor that requires grad"),
]


def _unscale_backends():
    """The reference and the Triton op, which write tensor by tensor (all checks first), and the C++ op where it is
    built, which checks the list itself (the Python sweeps run only to word its error): each error worded alike."""
    why = {b: mixprec_ops.backends.unavailable_reason("unscale_", b, torch.device("cpu")) for b in ("cpu", "triton")}
    return ["torch", *(pytest.param(b, marks=pytest.mark.skipif(w is not None, reason=f"{b}: {w}"))
                       for b, w in why.items())]


@pytest.mark.parametrize("backend", _unscale_backends())
@pytest.mark.parametrize("make,exc,text", UNSCALE_CASES, ids=[c[2] + f"-{i}" for i, c in enumerate(UNSCALE_CASES)])
def test_unscale_rejects_and_touches_nothing(make, exc, text, backend):
    ts, inv, found = good_unscale_args()
    before = [t.clone() for t in ts]
    args = make(ts, inv, found)
    with pytest.raises(exc, match=text):
        mixprec_ops.unscale_(*args, backend=backend)
    for a, b in zip(ts, before):
        assert torch.equal(a, b), "a rejected call modified a tensor"
    assert found.item() == 0.0


def test_unscale_sweeps_the_list_in_python_only_to_word_a_cpp_error(monkeypatch):
    """On the C++ backends a good call skips the Python sweep over the list (the op checks each tensor before it
    touches any); a bad one runs it, for the error users have always had. The reference backend sweeps first."""
    if mixprec_ops.backends.unavailable_reason("unscale_", "cpu", torch.device("cpu")):
        pytest.skip("C++ extension unavailable")
    from mixprec_ops.ops import unscale as U

    sweeps = []
    real = U._check_tensors
    monkeypatch.setattr(U, "_check_tensors", lambda *a: (sweeps.append(1), real(*a))[1])
    ts, inv, found = good_unscale_args()
    mixprec_ops.unscale_(ts, inv, found, backend="cpu")
    assert sweeps == []
    mixprec_ops.unscale_(ts, inv, found, backend="torch")
    assert sweeps == [1]
    with pytest.raises(TypeError, match=r"tensors\[2\] must be float32") as err:
        mixprec_ops.unscale_(ts + [torch.arange(3)], inv, found, backend="cpu")
    assert sweeps == [1, 1]
    assert err.value.__context__ is None  # raised as a user's own error, not "during handling of" the C++ one
    # what the sweeps do not look for: the C++ error itself
    with pytest.raises(RuntimeError, match=r"tensors\[2\] has no allocated memory"):
        mixprec_ops.unscale_(ts + [_freed(torch.randn(3))], inv, found, backend="cpu")
    assert found.item() == 0.0


def test_unscale_rejects_bad_keywords():
    ts, inv, found = good_unscale_args()
    with pytest.raises(TypeError, match="return_norm must be a bool"):
        mixprec_ops.unscale_(ts, inv, found, return_norm=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        mixprec_ops.unscale_(ts, inv, found, backend="gpu")


def test_direct_op_calls_are_checked_in_cpp():
    """torch.ops.mixprec.* bypasses the Python checks; the C++ kernels repeat them (no crash, a clear error)."""
    if mixprec_ops.backends.unavailable_reason("cast_and_scale", "cpu", torch.device("cpu")):
        pytest.skip("C++ extension unavailable")
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.mixprec.cast_and_scale(torch.arange(4), torch.float16, None, 1.0, None, True)
    with pytest.raises(RuntimeError, match="amax must have exactly 1 element"):
        torch.ops.mixprec.cast_and_scale(X, torch.float16, None, 1.0, torch.zeros(3), True)
    with pytest.raises(RuntimeError, match="dtype must be"):
        torch.ops.mixprec.cast_and_scale(X, torch.float32, None, 1.0, None, True)
    ts = [torch.randn(3)]
    with pytest.raises(RuntimeError, match="found_inf must be a float32"):
        torch.ops.mixprec.unscale_(ts, torch.ones(1), torch.zeros(1, dtype=torch.int32), False)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] must be float32"):
        torch.ops.mixprec.unscale_([torch.arange(3)], torch.ones(1), torch.zeros(1), False)


def _freed(t):
    """t with its memory freed under it, as FSDP frees grads and params (untyped_storage().resize_(0)): elements
    without memory, whose raw data pointer is null."""
    t.untyped_storage().resize_(0)
    return t


def test_freed_storage_is_an_error_not_a_crash():
    """A tensor whose storage was freed or shrunk reaches no kernel: the C++ checks name it (the CPU kernels read
    raw pointers and crashed on these: SIGSEGV, found by fuzzing direct op calls; on a GPU an illegal address).
    Public calls and direct op calls, every C++ op; nothing else touched."""
    if mixprec_ops.backends.unavailable_reason("cast_and_scale", "cpu", torch.device("cpu")):
        pytest.skip("C++ extension unavailable")
    keep = torch.randn(8)
    before = keep.clone()
    found = torch.zeros(1)
    msg = "has no allocated memory"
    with pytest.raises(RuntimeError, match=r"tensors\[1\] " + msg):
        mixprec_ops.unscale_([keep, _freed(torch.randn(16))], torch.full((1,), 0.5), found, backend="cpu")
    with pytest.raises(RuntimeError, match=r"tensors\[0\] " + msg):
        torch.ops.mixprec.unscale_([_freed(torch.randn(4, 4).t())], torch.ones(1), found, False)
    with pytest.raises(RuntimeError, match="found_inf " + msg):
        torch.ops.mixprec.unscale_([keep], torch.ones(1), _freed(torch.zeros(1)), False)
    shrunk = torch.randn(64)
    shrunk.untyped_storage().resize_(16)  # 4 of its 64 elements still have memory
    with pytest.raises(RuntimeError, match="x " + msg):
        mixprec_ops.cast_and_scale(shrunk, torch.float8_e4m3fn, backend="cpu")
    assert torch.equal(keep, before) and found.item() == 0.0

    def bucket(n=5):
        ts = [torch.randn(n, dtype=torch.bfloat16), torch.randn(n, dtype=torch.bfloat16), torch.zeros(n),
              torch.zeros(n), torch.randn(n)]
        return ts, [t.clone() for t in ts]

    for i, name in enumerate(("params", "grads", "exp_avgs", "exp_avg_sqs", "masters")):
        (p, g, m, v, w), orig = bucket()
        args = [[p], [g], [m], [v], [], [w]]
        args[i if i < 4 else 5][0] = _freed(args[i if i < 4 else 5][0].clone())
        with pytest.raises(RuntimeError, match=rf"{name}\[0\] " + msg):
            torch.ops.mixprec.adam_step_(*args, torch.ones(1, 3), 0.9, 0.999, 1e-8, 0.0, True, False, None, None,
                                         None)
        assert all(torch.equal(a, b) for a, b in zip((p, g, m, v, w), orig) if a.untyped_storage().nbytes())


def test_unscale_rejects_tensors_sharing_memory_before_touching_any():
    """unscale_ writes in place: an expanded (stride 0) or self-overlapping tensor would be scaled more than once per
    element; it is refused before any tensor is scaled or found_inf set (the C++ kernels found it only after the
    others were done)."""
    if mixprec_ops.backends.unavailable_reason("unscale_", "cpu", torch.device("cpu")):
        pytest.skip("C++ extension unavailable")
    for bad in (torch.ones(1).expand(6), torch.randn(20).as_strided((4, 4), (1, 1))):
        first = torch.tensor([0.5, float("inf")])
        found = torch.zeros(1)
        with pytest.raises(RuntimeError, match=r"tensors\[1\] has elements that share memory"):
            torch.ops.mixprec.unscale_([first, bad], torch.full((1,), 0.5), found, False)
        assert first.tolist() == [0.5, float("inf")] and found.item() == 0.0
    # (the public call, on every backend: UNSCALE_CASES)


def test_a_meta_tensor_among_cpu_ones_is_refused():
    """One meta tensor among CPU ones routes a direct op call to the fake (meta) implementation; the fakes check
    devices like the kernels do, so the call raises instead of returning without doing anything."""
    if mixprec_ops.backends.unavailable_reason("adam_step_", "cpu", torch.device("cpu")):
        pytest.skip("C++ extension unavailable")
    p, g, m, v = torch.randn(4), torch.randn(4, device="meta"), torch.zeros(4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
        torch.ops.mixprec.adam_step_([p], [g], [m], [v], [], [], torch.ones(1, 3), 0.9, 0.999, 1e-8, 0.0, True,
                                     False, None, None, None)
    with pytest.raises(ValueError, match="found_inf must be on cpu"):
        torch.ops.mixprec.unscale_([torch.randn(3)], torch.ones(1), torch.zeros(1, device="meta"), False)
    with pytest.raises(ValueError, match="scale must be on cpu"):
        torch.ops.mixprec.cast_and_scale(torch.randn(3), torch.float16, torch.ones(1, device="meta"), 1.0, None,
                                         True)
