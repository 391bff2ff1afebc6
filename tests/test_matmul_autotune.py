"""matmul's Triton kernel internals: the disk-cached autotuning (triton_kernels/tune_cache.py and select_config in
triton_kernels/matmul.py) and the persistent TMA kernel variant.

The selection logic (memory, then disk, then a benchmark; nothing benchmarked or stored during a CUDA graph capture;
stale, invalid or corrupt cache contents ignored; failing configs skipped) is tested on CPU with a stubbed
benchmark, so it needs no GPU. The TMA kernel runs on CPU under Triton 3.8's interpreter (host-side tensor
descriptors work there), and on a GPU in bench/gpu_check, where the cuda parameters and the GPU-only tests stop
skipping: the TMA kernel compiled for sm_90 with each of its configs, the tuner choosing among tiled and TMA
configs, the cache file written and read back, and the persistent kernel inside a CUDA graph.
"""

import json
import os
import warnings

import pytest
import torch
from conftest import HAS_CUDA, INTERPRETED
from test_matmul import DTYPES, OP, check, rand

import mixprec_ops

@pytest.fixture
def km():
    """mixprec_ops.triton_kernels.matmul, skipped where Triton cannot be imported."""
    why = mixprec_ops.backends.unavailable_reason(OP, "triton", torch.device("cuda" if HAS_CUDA else "cpu"))
    if why is not None and "not importable" in why:
        pytest.skip(why)
    from mixprec_ops.triton_kernels import matmul

    return matmul


@pytest.fixture
def tune_env(km, tmp_path, monkeypatch):
    """A private cache directory, an empty in-memory choice table and a fresh cache object (a "new process")."""
    from mixprec_ops.triton_kernels.tune_cache import TuneCache

    monkeypatch.setenv("MIXPREC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(km.AUTOTUNE_ENV, "1")  # on, also where the session turned it off (bench/gpu_check's tests)
    monkeypatch.setattr(km, "_CHOSEN", {})
    monkeypatch.setattr(km, "_CACHE", TuneCache("matmul_autotune.json"))
    return tmp_path


def _cfgs(km):
    return (km._tiled(64, 64, 32, 4, 3), km._tiled(128, 128, 64, 8, 3), km._tma(128, 256, 64, 8, 3))


class _Stub:
    """A fake kernel launcher and benchmark: run(cfg) records the launch; bench(fn) runs fn and returns the time
    planted for the config it launched (or raises what is planted)."""

    def __init__(self, times):
        self.times, self.ran = dict(times), []

    def run(self, cfg):
        self.ran.append(cfg)

    def bench(self, fn):
        fn()
        t = self.times[self.ran[-1]]
        if isinstance(t, Exception):
            raise t
        return t


def _boom(fn):
    raise AssertionError("benchmarked although a result was available")


def test_autotune_tunes_once_stores_and_reloads_from_disk(km, tune_env, monkeypatch):
    from mixprec_ops.triton_kernels.tune_cache import TuneCache

    c0, c1, c2 = cfgs = _cfgs(km)
    s = _Stub({c0: 3e-3, c1: 1e-3, c2: 2e-3})
    assert km.select_config("k1", cfgs, s.run, capturing=False, benchmark=s.bench) == (c1, "tuned")
    assert s.ran == list(cfgs)
    doc = json.load(open(tune_env / "matmul_autotune.json"))
    assert doc["schema"] == 1 and doc["entries"]["k1"]["config"] == c1.to_dict()
    assert doc["entries"]["k1"]["us"] == 1000.0 and doc["entries"]["k1"]["candidates"] == 3
    assert sorted(os.listdir(tune_env)) == ["matmul_autotune.json"]  # the temporary file was moved, not left
    assert km.select_config("k1", cfgs, s.run, capturing=False, benchmark=_boom) == (c1, "memory")
    # a new process: nothing in memory, the file is read, nothing is benchmarked
    monkeypatch.setattr(km, "_CHOSEN", {})
    monkeypatch.setattr(km, "_CACHE", TuneCache("matmul_autotune.json"))
    assert km.select_config("k1", cfgs, s.run, capturing=False, benchmark=_boom) == (c1, "disk")
    # another key, stored by another cache object meanwhile: both entries end up in the file (merge on write)
    other = TuneCache("matmul_autotune.json")
    assert other.put("k0", {"config": c0.to_dict()})
    s2 = _Stub({c0: 1e-3, c1: 2e-3, c2: 3e-3})
    assert km.select_config("k2", cfgs, s2.run, capturing=False, benchmark=s2.bench) == (c0, "tuned")
    assert set(json.load(open(tune_env / "matmul_autotune.json"))["entries"]) == {"k0", "k1", "k2"}


def test_autotune_never_benchmarks_during_graph_capture(km, tune_env):
    c0, c1, c2 = cfgs = _cfgs(km)
    assert km.select_config("k", cfgs, _Stub({}).run, capturing=True, benchmark=_boom) == (c0, "default (capture)")
    assert not os.listdir(tune_env)  # nothing stored either
    s = _Stub({c0: 3e-3, c1: 2e-3, c2: 1e-3})
    assert km.select_config("k", cfgs, s.run, capturing=False, benchmark=s.bench) == (c2, "tuned")
    assert km.select_config("k", cfgs, s.run, capturing=True, benchmark=_boom) == (c2, "memory")


def test_autotune_off_switch_uses_the_default_and_stores_nothing(km, tune_env, monkeypatch):
    c0, c1, c2 = cfgs = _cfgs(km)
    monkeypatch.setenv(km.AUTOTUNE_ENV, "0")
    assert km.select_config("k", cfgs, _Stub({}).run, capturing=False, benchmark=_boom) == (c0, "default (autotune off)")
    assert not os.listdir(tune_env)
    monkeypatch.setenv(km.AUTOTUNE_ENV, "1")
    s = _Stub({c0: 3e-3, c1: 1e-3, c2: 2e-3})
    assert km.select_config("k", cfgs, s.run, capturing=False, benchmark=s.bench) == (c1, "tuned")
    monkeypatch.setenv(km.AUTOTUNE_ENV, "0")  # a result already known is still used
    assert km.select_config("k", cfgs, s.run, capturing=False, benchmark=_boom) == (c1, "memory")


def test_autotune_ignores_stale_and_invalid_entries(km, tune_env):
    c0, c1, c2 = cfgs = _cfgs(km)
    bad = {"not offered": {"config": km._tiled(256, 256, 256, 8, 3).to_dict()},
           "unknown variant": {"config": {**c1.to_dict(), "variant": "warp_specialized"}},
           "string warps": {"config": {**c1.to_dict(), "num_warps": "8"}},
           "extra field": {"config": {**c1.to_dict(), "maxnreg": 128}},
           "split of a tiled config": {"config": {**c1.to_dict(), "split_k": 4}},
           "split-K without a split": {"config": {**c1.to_dict(), "variant": km.SPLIT_K}},
           "chosen among other candidates": {"config": c1.to_dict(), "offered": "00000000"},
           "written before sets were recorded": {"config": c1.to_dict()},
           "no config": {"us": 3.0}}
    (tune_env / "matmul_autotune.json").write_text(json.dumps({"schema": 1, "entries": bad}))
    for key in bad:
        s = _Stub({c0: 1e-3, c1: 2e-3, c2: 3e-3})
        assert km.select_config(key, cfgs, s.run, capturing=False, benchmark=s.bench) == (c0, "tuned"), key
        assert s.ran == list(cfgs), key


@pytest.mark.parametrize("where", ["capture", "autotune_off", "out_of_memory"])
def test_a_choice_among_other_candidates_serves_where_nothing_may_be_tuned(km, tune_env, where, monkeypatch):
    """A cached choice made among another candidate set (before split-K existed, say) is tuned again when tuning
    may run (test_autotune_ignores_stale_and_invalid_entries); during a graph capture, with tuning off, or when the
    tuning runs out of memory it still serves, being one of today's candidates, rather than the set's untuned
    default. Not kept in memory: the next call that may tune does (after a capture too). A choice among today's set
    is used as it is (test_autotune_tunes_once_stores_and_reloads_from_disk)."""
    c0, c1, c2 = cfgs = _cfgs(km)
    monkeypatch.setattr(km, "_oom_warned", set())
    (tune_env / "matmul_autotune.json").write_text(json.dumps(
        {"schema": 1, "entries": {"k": {"config": c1.to_dict(), "offered": "00000000"}}}))
    if where == "autotune_off":
        monkeypatch.setenv(km.AUTOTUNE_ENV, "0")
    if where == "out_of_memory":
        s = _Stub({c: torch.OutOfMemoryError("CUDA out of memory") for c in cfgs})
        with pytest.warns(RuntimeWarning, match="using the cached config"):
            got = km.select_config("k", cfgs, s.run, capturing=False, benchmark=s.bench)
    else:
        got = km.select_config("k", cfgs, _Stub({}).run, capturing=where == "capture", benchmark=_boom)
    assert got == (c1, "disk") and km.chosen_configs() == {}
    if where == "capture":  # the eager calls after it tune
        s = _Stub({c0: 3e-3, c1: 2e-3, c2: 1e-3})
        assert km.select_config("k", cfgs, s.run, capturing=False, benchmark=s.bench) == (c2, "tuned")


def test_autotune_corrupt_file_warns_once_and_is_replaced(km, tune_env):
    c0, c1, c2 = cfgs = _cfgs(km)
    (tune_env / "matmul_autotune.json").write_text('{"schema": 1, "entries": {"k": ')  # truncated
    s = _Stub({c0: 2e-3, c1: 1e-3, c2: 3e-3})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert km.select_config("k1", cfgs, s.run, capturing=False, benchmark=s.bench) == (c1, "tuned")
        assert km.select_config("k2", cfgs, s.run, capturing=False, benchmark=s.bench) == (c1, "tuned")
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and "autotune cache" in msgs[0] and "ignoring" in msgs[0], msgs
    doc = json.load(open(tune_env / "matmul_autotune.json"))  # valid again, with both results
    assert set(doc["entries"]) == {"k1", "k2"}


def test_autotune_unwritable_cache_dir_warns_once_keeps_memory(km, tune_env, monkeypatch):
    (tune_env / "a_file").write_text("")
    monkeypatch.setenv("MIXPREC_CACHE_DIR", str(tune_env / "a_file" / "cache"))  # a directory under a file
    c0, c1, c2 = cfgs = _cfgs(km)
    s = _Stub({c0: 2e-3, c1: 3e-3, c2: 1e-3})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert km.select_config("k1", cfgs, s.run, capturing=False, benchmark=s.bench) == (c2, "tuned")
        assert km.select_config("k2", cfgs, s.run, capturing=False, benchmark=s.bench) == (c2, "tuned")
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and "cannot write" in msgs[0], msgs
    assert km.select_config("k1", cfgs, s.run, capturing=False, benchmark=_boom) == (c2, "memory")


def test_autotune_skips_failing_configs(km, tune_env):
    c0, c1, c2 = cfgs = _cfgs(km)
    s = _Stub({c0: 2e-3, c1: RuntimeError("out of shared memory"), c2: 3e-3})
    with pytest.warns(RuntimeWarning, match="out of shared memory"):
        assert km.select_config("k", cfgs, s.run, capturing=False, benchmark=s.bench) == (c0, "tuned")
    s = _Stub({c: ValueError(f"bad {c.label}") for c in cfgs})
    with pytest.raises(ValueError, match="bad"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        km.select_config("k2", cfgs, s.run, capturing=False, benchmark=s.bench)
    assert not os.path.exists(tune_env / "matmul_autotune.json") or "k2" not in json.load(
        open(tune_env / "matmul_autotune.json"))["entries"]


def test_autotune_out_of_memory_falls_back_to_the_default_uncached(km, tune_env, monkeypatch):
    """Out of memory while benchmarking (triton's do_bench allocates a 256 MB buffer to flush L2; the candidates'
    runs allocate nothing else) says nothing about a config, and the rest would fail alike: the call takes the
    default, with a warning, and nothing is kept in memory or on disk, so a later call (with memory to spare) tunes."""
    c0, c1, c2 = cfgs = _cfgs(km)
    monkeypatch.setattr(km, "_oom_warned", set())
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")
    for key, times in (("k0", {c0: 1e-3, c1: oom, c2: 2e-3}), ("k1", {c0: oom, c1: 1e-3, c2: 2e-3})):
        s = _Stub(times)
        with pytest.warns(RuntimeWarning, match="out of memory"):
            assert km.select_config(key, cfgs, s.run, capturing=False, benchmark=s.bench) == (
                c0, "default (out of memory)")
        assert km.chosen_configs() == {} and not os.listdir(tune_env)
    s = _Stub({c0: 3e-3, c1: 1e-3, c2: 2e-3})
    assert km.select_config("k0", cfgs, s.run, capturing=False, benchmark=s.bench) == (c1, "tuned")


def test_launch_failing_during_graph_capture_says_why(km, tune_env, monkeypatch):
    """A launch that fails while a CUDA graph is captured (Triton loading the binary of a config or specialization
    never launched in this process: "operation not permitted when stream is capturing") raises an error that names
    the shape, the config and the rule (run each shape once before capturing), with Triton's error as the cause;
    outside a capture Triton's error is raised as it is. Simulated on CPU (tensors that say is_cuda, a capture that
    is "on", a launch that raises); only a GPU shows the real failure (tests/test_matmul.py warms up before its
    captures)."""

    class OnGpu(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    err = RuntimeError("Triton Error [CUDA]: operation not permitted when stream is capturing")

    def fail(*args, **kwargs):
        raise err

    monkeypatch.setattr(km, "INTERPRETED", False)  # the GPU path of launch_matmul
    monkeypatch.setattr(km, "_launch", fail)
    monkeypatch.setattr(km, "_benchmark", _boom)
    a = torch.zeros(3, 40, dtype=torch.float16).as_subclass(OnGpu)
    b = torch.zeros(40, 24, dtype=torch.float16).as_subclass(OnGpu)
    c = torch.empty(3, 24, dtype=torch.float16).as_subclass(OnGpu)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"M=3 N=24 K=40 .*during a CUDA graph capture.*run each shape once "
                                           r"before capturing") as ei:
        km.launch_matmul(a, b, c, None, None)
    assert ei.value.__cause__ is err
    assert f"{km._SMALL_M_CONFIGS[0].label} (default (capture))" in str(ei.value), str(ei.value)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv(km.AUTOTUNE_ENV, "0")
    with pytest.raises(RuntimeError) as ei:
        km.launch_matmul(a, b, c, None, None)
    assert ei.value is err


def test_session_uses_a_private_cache_dir(km):
    """The test session's autotune cache is a fresh temporary directory (conftest.py), not the user's
    ~/.cache/mixprec_ops: GPU tests that tune would write there, and later runs would load those choices instead of
    tuning."""
    import tempfile

    from mixprec_ops.triton_kernels import tune_cache

    d = tune_cache.cache_dir()
    assert d != os.path.join(os.path.expanduser("~"), ".cache", "mixprec_ops"), d
    assert os.path.commonpath([d, tempfile.gettempdir()]) == tempfile.gettempdir(), d
    assert not os.path.exists(os.path.join(d, "matmul_autotune.json")) or HAS_CUDA  # only GPU tests store there


def test_tune_key_fields(km):
    import triton

    base = dict(device_tag="NVIDIA H200 sm_90", m=8192, n=4096, k=11008, ab_dtype=torch.bfloat16,
                c_dtype=torch.bfloat16, bias_dtype=None, activation=None, store_pre=False,
                layout="a row b col c row tma 1")
    k0 = km.tune_key(**base)
    assert triton.__version__ in k0 and torch.__version__ in k0 and "NVIDIA H200 sm_90" in k0
    assert km.tune_key(**{**base, "m": 5000}) == k0  # same power-of-two bucket
    for change in [dict(m=8193), dict(n=4097), dict(k=4096), dict(device_tag="NVIDIA H100 sm_90"),
                   dict(ab_dtype=torch.float16), dict(c_dtype=torch.float32), dict(bias_dtype=torch.float32),
                   dict(activation="gelu"), dict(store_pre=True), dict(layout="a row b row c row tma 1"),
                   dict(layout="a row b col c row tma 0")]:
        assert km.tune_key(**{**base, **change}) != k0, change


def test_candidates(km):
    small, large = km.candidates(16, 4096, 4096, False), km.candidates(8192, 4096, 4096, False)
    assert all(c.block_m <= 32 and c.variant in (km.TILED, km.SPLIT_K) for c in small)
    assert all(c.variant == km.TILED for c in large) and max(c.block_m for c in large) == 128
    with_tma = km.candidates(8192, 4096, 4096, True)
    assert with_tma[:len(large)] == large and {c.variant for c in with_tma[len(large):]} == {km.TMA}
    narrow = km.candidates(100, 40, 4096, True)  # no tile more than twice N's power of two
    assert narrow and all(c.block_n <= 128 for c in narrow) and km.TMA in {c.variant for c in narrow}
    assert km.candidates(100, 16, 4096, True) == km._LARGE_CONFIGS[-1:]  # nothing fits: the smallest tiled one
    # (the tall tiles never alone: a lone candidate runs untuned, and they need more shared memory than sm_86 has)
    assert not set(km._MID_M_CONFIGS) & set(km.candidates(100, 64, 16, False))  # K = 16: BLOCK_K 128 does not fit
    # TMA configs whose shared memory (pipeline + epilogue tile in the output dtype) exceeds the device's are not
    # offered: on an H200 (227 KB) fp32 outputs lose 128x256x64 s3 and 128x128x128 s3
    h200 = 232448
    assert km.candidates(8192, 4096, 4096, True, 2, h200) == with_tma
    fp32 = km.candidates(8192, 4096, 4096, True, 4, h200)
    assert fp32 == large + (km._TMA_CONFIGS[1],), fp32
    assert all(km.tma_shared_bytes(c, 4) <= h200 < km.tma_shared_bytes(d, 4)
               for c in fp32 if c.variant == km.TMA for d in set(km._TMA_CONFIGS) - set(fp32))
    # the default (first) of each set is what a graph capture uses before tuning: a tiled config
    assert with_tma[0].variant == km.TILED and small[0].variant == km.TILED
    # split-K for M <= 128 only, each run of K at least SPLIT_K_MIN_K_TILES tiles long
    assert [c for c in small if c.variant == km.SPLIT_K] == list(km._SMALL_M_SPLIT_CONFIGS)
    mid = km.candidates(128, 4096, 11008, False)
    assert [c for c in mid if c.variant == km.SPLIT_K] == list(km._MID_M_SPLIT_CONFIGS) and mid[0].variant == km.TILED
    # 64 < M <= 128: the tall, narrow tiles too (one tile row covers M), not beyond
    assert set(km._MID_M_CONFIGS) <= set(mid) and not set(km._MID_M_CONFIGS) & set(large)
    assert not set(km._MID_M_CONFIGS) & set(km.candidates(129, 4096, 4096, False) + small)
    assert km.SPLIT_K not in {c.variant for c in large + km.candidates(129, 4096, 4096, False)}
    short = km.candidates(16, 4096, 1024, False)  # 8 K tiles of 128: two runs of 4, not four of 2
    assert [c.split_k for c in short if c.variant == km.SPLIT_K] == [2]
    assert all(c.variant != km.SPLIT_K for c in km.candidates(16, 4096, 256, False))
    if not HAS_CUDA:
        assert not km._tma_eligible(torch.ones(512, 512, dtype=torch.bfloat16), 512, 512, 512)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter path (TRITON_INTERPRET=1)")
def test_interpreter_path_never_tunes_or_touches_the_cache(km, tune_env, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the interpreter path must not tune or use the cache")

    why = mixprec_ops.backends.unavailable_reason(OP, "triton", torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    monkeypatch.setattr(km, "select_config", refuse)
    monkeypatch.setattr(km._CACHE, "get", refuse)
    monkeypatch.setattr(km._CACHE, "put", refuse)
    a, b = rand(33, 40, dtype=torch.bfloat16, device="cpu"), rand(40, 24, dtype=torch.bfloat16, device="cpu")
    with km.record_choices() as got:
        y = mixprec_ops.matmul(a, b, activation="gelu", backend="triton")
    check(y, a, b, act="gelu")
    assert got == [{"m": 33, "n": 24, "k": 40, "config": km._INTERPRETER_CONFIG.label, "source": "interpreter"}]
    assert not os.listdir(tune_env)


def _tma_params():
    """(device, config) pairs for the persistent TMA kernel: under the interpreter one small config, on a GPU
    with tensor descriptors each of the TMA configs; skipped with the reason elsewhere."""
    from mixprec_ops.triton_kernels import matmul as m

    out = []
    why_cpu = None if INTERPRETED and m.HAS_TMA else (
        "needs the Triton interpreter (TRITON_INTERPRET=1)" if not INTERPRETED else "this Triton has no tensor "
        "descriptors")
    why_cpu = why_cpu or mixprec_ops.backends.unavailable_reason(OP, "triton", torch.device("cpu"))
    out.append(pytest.param("cpu", m._INTERPRETER_TMA_CONFIG, id="cpu-interpreter",
                            marks=pytest.mark.skipif(why_cpu is not None, reason=str(why_cpu))))
    if not HAS_CUDA:
        why = "needs a CUDA device (runs in bench/gpu_check)"
    elif INTERPRETED:
        why = "the interpreter is on"
    elif not m.HAS_TMA:
        why = "this Triton has no host-side tensor descriptors"
    elif torch.cuda.get_device_capability()[0] < 9:
        why = "TMA needs sm_90 or newer"
    else:
        why = None
    for c in m._TMA_CONFIGS:
        out.append(pytest.param("cuda", c, id=f"cuda-{c.block_m}x{c.block_n}x{c.block_k}",
                                marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out


try:
    TMA_PARAMS = _tma_params()
except Exception as e:  # triton not importable: the tests skip with the reason
    TMA_PARAMS = [pytest.param("cpu", None, marks=pytest.mark.skip(reason=f"triton unavailable: {e}"))]


@pytest.mark.parametrize("device,cfg", TMA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tma_persistent_kernel_matches_tiled_and_reference(km, device, cfg, dtype):
    """The persistent TMA kernel, forced, for the operand layouts it takes (A row- or column-major, B row-major
    or the nn.Linear weight.t()), with tails in M, N and K, fp32 bias + GELU + pre-activation: within the usual
    error bound of the fp64 product, every output element written (NaN-filled outputs), and on the interpreter
    bit-identical to the tiled kernel with the same tile sizes (same products, same order, same epilogue)."""
    small = device == "cpu"
    m, n, k = (40, 56, 72) if small else (336, 264, 520)  # multiples of 8: 16-byte aligned rows either way
    # On a GPU every layout with the first config, the nn.Linear layout (A row-major, B = weight.t()) with the
    # others (each layout is a kernel specialization to compile).
    layouts = [(a_col, b_col) for a_col in (False, True) for b_col in (False, True)]
    if not small and cfg != km._TMA_CONFIGS[0]:
        layouts = [(False, True)]
    for a_col, b_col in layouts:
        a = rand(k, m, dtype=dtype, device=device).t() if a_col else rand(m, k, dtype=dtype, device=device)
        b = rand(n, k, dtype=dtype, device=device).t() if b_col else rand(k, n, dtype=dtype, device=device)
        bias = rand(n, dtype=torch.float32, device=device)
        outs = {}
        for name, c in (("tma", cfg), ("tiled", km._INTERPRETER_CONFIG))[:2 if small else 1]:
            y = torch.full((m, n), float("nan"), dtype=dtype, device=device)
            pre = torch.full((m, n), float("nan"), dtype=dtype, device=device)
            km.launch_matmul(a, b, y, bias, "gelu", pre=pre, config=c)
            outs[name] = (y, pre)
        what = f"a {'col' if a_col else 'row'} b {'col' if b_col else 'row'}"
        check(outs["tma"][0], a, b, bias, "gelu", what=what)
        check(outs["tma"][1], a, b, bias, None, what=what + " pre")
        if small:
            assert torch.equal(outs["tma"][0], outs["tiled"][0]), what
            assert torch.equal(outs["tma"][1], outs["tiled"][1]), what


@pytest.mark.skipif(not INTERPRETED and not HAS_CUDA, reason="needs the Triton interpreter or a CUDA device")
def test_tma_rejects_incompatible_operands(km):
    if not km.HAS_TMA:
        pytest.skip("this Triton has no tensor descriptors")
    dev = "cpu" if INTERPRETED else "cuda"
    cfg = km._INTERPRETER_TMA_CONFIG if INTERPRETED else km._TMA_CONFIGS[0]
    a = rand(32, 48, dtype=torch.float16, device=dev)
    y = torch.empty(32, 45, dtype=torch.float16, device=dev)
    for name, aa, bb in [("row stride 90 bytes", a, rand(48, 45, dtype=torch.float16, device=dev)),
                         ("no contiguous dim", rand(32, 96, dtype=torch.float16, device=dev)[:, ::2],
                          rand(48, 48, dtype=torch.float16, device=dev)[:, :45]),  # (b alone is compatible)
                         ("misaligned base", rand(32 * 48 + 1, dtype=torch.float16, device=dev)[1:].view(32, 48),
                          rand(48, 48, dtype=torch.float16, device=dev)[:, :45])]:
        with pytest.raises(ValueError, match="not TMA-compatible"):
            km.launch_matmul(aa, bb, y, None, None, config=cfg)
    assert km._tma_operands(a, rand(48, 48, dtype=torch.float16, device=dev)) is not None


def test_tma_operands_refuse_zero_strides(km):
    """A broadcast (stride-0) operand passes the 16-byte alignment test (0 % 16 == 0), but a TMA descriptor with a
    zero global stride is undocumented: such operands are not TMA-compatible (the tiled kernel reads them through
    their strides). What a descriptor with a zero stride would do, only a GPU could show; nothing here relies on it."""
    a = torch.zeros(64, 48, dtype=torch.float16)
    b = torch.zeros(48, 32, dtype=torch.float16)
    a_col = torch.zeros(48, 64, dtype=torch.float16).t()  # column-major: strides (1, 64)
    assert km._tma_operands(a, b) is not None and km._tma_operands(a_col, b) is not None
    for name, aa, bb in [("a: one row broadcast", a[:1].expand(64, 48), b),            # strides (0, 1)
                         ("b: one row broadcast", a, b[:1].expand(48, 32)),            # strides (0, 1)
                         ("a column-major, one column broadcast", a_col[:, :1].expand(64, 48), b)]:  # (1, 0)
        refused = km._tma_operands(aa, bb) is None
        assert refused, name


@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA device (runs in bench/gpu_check)")
def test_autotune_cache_and_tma_on_gpu(km, tune_env, monkeypatch):
    """On a GPU: a first call tunes (the TMA configs among the candidates on sm_90+) and writes the cache file; a
    "new process" (empty memory, fresh cache object) takes the result from disk without benchmarking; a CUDA graph
    captured with the TMA variant chosen replays to the same result."""
    from mixprec_ops.triton_kernels.tune_cache import TuneCache

    a = rand(512, 384, dtype=torch.bfloat16, device="cuda")
    w = rand(320, 384, dtype=torch.bfloat16, device="cuda")
    bias = rand(320, dtype=torch.bfloat16, device="cuda")
    with km.record_choices() as got:
        y0 = mixprec_ops.matmul(a, w.t(), bias=bias, activation="gelu_tanh", backend="triton")
    check(y0, a, w.t(), bias, "gelu_tanh")
    assert got[0]["source"] == "tuned", got
    (key,) = km.chosen_configs()
    tma = km._tma_eligible(a, 512, 320, 384)
    assert key.endswith(f"tma {int(tma)}") and "a row b col c row" in key
    entries = json.load(open(tune_env / "matmul_autotune.json"))["entries"]
    assert entries[key]["config"] == km.chosen_configs()[key].to_dict()
    limit = km._shared_limit(a.device)
    assert isinstance(limit, int) and limit >= 96 * 1024, limit  # A100 163 KB, H100/H200 227 KB
    assert entries[key]["candidates"] == len(km.candidates(512, 320, 384, tma, 2, limit))

    monkeypatch.setattr(km, "_CHOSEN", {})
    monkeypatch.setattr(km, "_CACHE", TuneCache("matmul_autotune.json"))
    monkeypatch.setattr(km, "_benchmark", _boom)
    with km.record_choices() as got:
        y1 = mixprec_ops.matmul(a, w.t(), bias=bias, activation="gelu_tanh", backend="triton")
    assert got[0]["source"] == "disk" and torch.equal(y1, y0)

    if tma:  # the persistent kernel inside a CUDA graph (host-built descriptors are kernel parameters)
        km._CHOSEN[key] = km._TMA_CONFIGS[1]
        # the warm-up the capture rule asks for: the TMA kernel's binary is loaded here, not during the capture
        y2 = mixprec_ops.matmul(a, w.t(), bias=bias, activation="gelu_tanh", backend="triton")
        g = torch.cuda.CUDAGraph()
        with km.record_choices() as got, torch.cuda.graph(g):
            y3 = mixprec_ops.matmul(a, w.t(), bias=bias, activation="gelu_tanh", backend="triton")
        g.replay()
        torch.cuda.synchronize()
        check(y2, a, w.t(), bias, "gelu_tanh")
        assert torch.equal(y3, y2)
        assert [(c["source"], c["config"]) for c in got] == [("memory", km._TMA_CONFIGS[1].label)], got


def test_config_dicts_written_before_split_k_still_load(km):
    """A cache entry written before KernelConfig had split_k (no such field) is the same config (split_k 1)."""
    c = km._tiled(64, 64, 32, 4, 3)
    old = {k: v for k, v in c.to_dict().items() if k != "split_k"}
    assert km.KernelConfig.from_dict(old) == c
    s = km._split(16, 64, 128, 4, 4, 4)
    assert km.KernelConfig.from_dict(s.to_dict()) == s and s.label.endswith(" k4")


def _split_params():
    """(device, config, (m, n, k)) for the split-K kernels: under the interpreter small configs whose runs of K come
    out uneven, empty (more runs than K tiles allow) and single-tile; on a GPU each split-K candidate at a shape it
    is offered for; skipped with the reason elsewhere."""
    from mixprec_ops.triton_kernels import matmul as m

    why_cpu = None if INTERPRETED else "needs the Triton interpreter (TRITON_INTERPRET=1)"
    why_cpu = why_cpu or mixprec_ops.backends.unavailable_reason(OP, "triton", torch.device("cpu"))
    why_gpu = ("needs a CUDA device (runs in bench/gpu_check)" if not HAS_CUDA else
               "the interpreter is on" if INTERPRETED else None)
    out = []
    for cfg, shape, id_ in ((m._split(16, 16, 16, 1, 1, 3, group=2), (33, 40, 72), "uneven-runs"),
                            (m._split(16, 16, 16, 1, 1, 4, group=2), (17, 24, 40), "an-empty-run"),
                            (m._split(16, 32, 16, 1, 1, 2, group=2), (1, 70, 17), "m1-k-tail")):
        out.append(pytest.param("cpu", cfg, shape, id=f"cpu-{id_}",
                                marks=pytest.mark.skipif(why_cpu is not None, reason=str(why_cpu))))
    for cfg in m._SMALL_M_SPLIT_CONFIGS + m._MID_M_SPLIT_CONFIGS:
        shape = (13 if cfg in m._SMALL_M_SPLIT_CONFIGS else 100, 264, 1000)
        out.append(pytest.param("cuda", cfg, shape, id=f"cuda-{cfg.label.replace(' ', '-')}",
                                marks=pytest.mark.skipif(why_gpu is not None, reason=str(why_gpu))))
    return out


try:
    SPLIT_PARAMS = _split_params()
except Exception as e:  # triton not importable: the tests skip with the reason
    SPLIT_PARAMS = [pytest.param("cpu", None, None, marks=pytest.mark.skip(reason=f"triton unavailable: {e}"))]


@pytest.mark.parametrize("device,cfg,shape", SPLIT_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_kernels_match_tiled_and_reference(km, device, cfg, shape, dtype):
    """The split-K pair (partials per run of K, then their sum with the epilogue), forced, with A row- or
    column-major and B row-major or the nn.Linear weight.t(), fp32 bias + GELU + pre-activation stored and an fp32
    output: within the usual error bound of the fp64 product, every output element written (NaN-filled outputs).
    Against the tiled kernel with the same tile bit for bit, on small integers (every product and sum exact, so the
    order of the additions cannot show): a partial stored to the wrong place, a K tile skipped or counted twice, a
    run's bounds off by one would."""
    m, n, k = shape
    g = torch.Generator().manual_seed(m * 1000 + k)
    tiled = km.KernelConfig(km.TILED, cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, cfg.num_warps,
                            cfg.num_stages)
    def operands(ints, a_col, b_col):
        def mk(*s):
            x = torch.randint(-3, 4, s, generator=g).float() if ints else torch.randn(*s, generator=g)
            return x.to(device, dtype)
        a = mk(k, m).t() if a_col else mk(m, k)
        b = mk(n, k).t() if b_col else mk(k, n)
        return a, b, mk(n).float()

    for a_col, b_col in ((False, True), (True, False)):
        what = f"a {'col' if a_col else 'row'} b {'col' if b_col else 'row'}"
        a, b, bias = operands(False, a_col, b_col)
        for out_dtype in (dtype, torch.float32):
            y = torch.full((m, n), float("nan"), dtype=out_dtype, device=device)
            pre = torch.full((m, n), float("nan"), dtype=out_dtype, device=device)
            km.launch_matmul(a, b, y, bias, "gelu", pre=pre, config=cfg)
            check(y, a, b, bias, "gelu", out_dtype, what=f"{what} -> {out_dtype}")
            check(pre, a, b, bias, None, out_dtype, what=f"{what} -> {out_dtype} pre")
        a, b, bias = operands(True, a_col, b_col)
        outs = []
        for c in (cfg, tiled):
            y = torch.full((m, n), float("nan"), dtype=torch.float32, device=device)
            pre = torch.full((m, n), float("nan"), dtype=torch.float32, device=device)
            km.launch_matmul(a, b, y, bias, "gelu", pre=pre, config=c)
            outs.append((y, pre))
        assert not outs[0][1].isnan().any(), what
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), what


def test_traced_calls_give_triton_autotune_tiled_configs_only(km, monkeypatch):
    """While torch.compile traces (fake tensors) the op goes through triton.autotune over the tiled kernel: the
    candidate set's split-K configs (another kernel pair) must not reach it, where they would run as duplicate
    tiled configs (triton_config() has no split)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    seen = []
    monkeypatch.setattr(km, "_tuner", lambda configs: seen.append(configs) or Launcher())
    monkeypatch.setattr(km, "INTERPRETED", False)  # (the interpreter's path never tunes)
    for m in (16, 128):
        with FakeTensorMode():
            a = torch.empty(m, 4096, dtype=torch.float16)
            b = torch.empty(4096, 4096, dtype=torch.float16)
            km.launch_matmul(a, b, torch.empty(m, 4096, dtype=torch.float16), None, None)
        assert any(c.variant == km.SPLIT_K for c in km.candidates(m, 4096, 4096, False))  # offered eagerly
        assert seen[-1] and all(c.variant == km.TILED for c in seen[-1]), seen[-1]
