"""Every Triton kernel compiled for real NVIDIA GPUs (sm_80, sm_90), here on CPU, ahead of any GPU session.

The other tests run the kernels under Triton's interpreter, which never builds the GPU code: a Triton compile error
(API drift between releases, a type error in a branch only compiled code takes, such as NATIVE_FP8's hardware
conversion or the TMA kernel, a constexpr combination that does not lower) would otherwise first show on a GPU.
tests/triton_aot.py records what each launcher launches and compiles it to PTX and cubin; it runs once, in a
subprocess (the interpreter is on in this process: TRITON_INTERPRET=1 makes @triton.jit build interpreted
functions at import), importing the installed package. Besides "it compiles", the tests check facts of the
compiled code that the kernels' design rests on.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_aot.py")
KERNELS = ["_cast_and_scale_kernel", "_cast_and_scale_backward_kernel", "_unscale_kernel", "_adam_kernel",
           "_matmul_kernel", "_matmul_tma_kernel", "_matmul_splitk_kernel", "_matmul_splitk_sum_kernel"]
TARGETS = {"sm_80", "sm_90"}
# Largest shared memory per block (opt-in) of the GPUs behind each target: A100 163 KB, H100/H200 227 KB. A kernel
# needing more compiles but fails at launch (triton's OutOfResources).
SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}

# The values each constexpr must take over a kernel's compiles: the coverage the case tables in triton_aot.py
# promise (each value at least once). A constexpr missing here fails test_constexpr_coverage, so that a new one is
# added with its values. Sizes and layout constants are left out (SIZES).
EXPECTED_VALUES = {
    "_cast_and_scale_kernel": {
        "HAS_SCALE": {True, False}, "HAS_AMAX": {True, False}, "SAT": {True, False}, "KEEP_INF": {True, False},
        "OUT_KIND": {0, 1, 2, 3}, "OVERFLOW_NAN": {True, False}, "NATIVE_FP8": {True, False},
        "SRC_BF16": {True, False},
    },
    "_cast_and_scale_backward_kernel": {
        "HAS_SCALE": {True, False}, "SAT": {True, False}, "KEEP_INF": {True, False}, "G_KIND": {0, 1, 2, 3, 4},
        "X_KIND": {0, 1, 2},
    },
    "_unscale_kernel": {"DTYPE": {"fp32", "fp16", "int16"}, "IS_BF16": {True, False}, "NORM": {True, False}},
    "_adam_kernel": {
        "P_KIND": {0, 1, 2}, "G_KIND": {0, 1, 2}, "S_KIND": {0, 1, 2}, "AMSGRAD": {True, False},
        "MASTER": {True, False}, "HAS_WD": {True, False}, "DECOUPLED": {True, False}, "MAXIMIZE": {True, False},
        "HAS_GRAD_SCALE": {True, False}, "HAS_FOUND_INF": {True, False}, "HAS_CLIP": {True, False},
    },
    # OUT_KIND 2 (bf16 rounded in integer arithmetic) and UPCAST=True are the interpreter's: never compiled.
    "_matmul_kernel": {
        "HAS_BIAS": {True, False}, "ACT": {0, 1, 2, 3, 4}, "STORE_PRE": {True, False}, "UPCAST": {False},
        "OUT_KIND": {0, 1, 3}, "USE_ERF": {True, False},
    },
    "_matmul_splitk_kernel": {"UPCAST": {False}},
    "_matmul_splitk_sum_kernel": {
        "HAS_BIAS": {True, False}, "ACT": {0, 1, 2, 3, 4}, "STORE_PRE": {True, False}, "OUT_KIND": {0, 1, 3},
        "USE_ERF": {True},
    },
    # USE_ERF=False (a Triton without tl.math.erf) is compiled through the tiled kernel: the epilogue is shared.
    "_matmul_tma_kernel": {
        "A_KM": {True, False}, "B_NK": {True, False}, "HAS_BIAS": {True, False}, "ACT": {0, 1, 2, 3, 4},
        "STORE_PRE": {True, False}, "UPCAST": {False}, "OUT_KIND": {0, 1, 3}, "USE_ERF": {True}, "FLATTEN": {True},
    },
}
SIZES = {"BLOCK", "CHUNK", "ROW", "VMAX_COL", "MASTER_COL", "NUM_SMS", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    """triton_aot.py's JSON document, run once for this module (about 30 s on 2 cores)."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    tmp = tmp_path_factory.mktemp("triton_aot")
    out = tmp / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # -P and a scratch cwd: the installed mixprec_ops, never the source tree (see conftest.py).
    # Its own session, so that a timeout kills the forked compile workers too (and lets its cleanup run).
    proc = subprocess.Popen([sys.executable, "-P", SCRIPT, "--out", str(out)], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"triton_aot.py ran over 900 s:\n{err[-6000:]}")
    if not out.exists():
        pytest.fail(f"triton_aot.py produced no result (exit {proc.returncode}):\n{err[-6000:]}")
    doc = json.loads(out.read_text())
    # Triton 3.6 and 3.8 both have host-side tensor descriptors; without them the TMA kernel has no cases and the
    # tests below would fail with misleading messages.
    assert doc["has_tma"], f"Triton {doc['triton']}: matmul.HAS_TMA is False (tensor descriptors not detected)"
    return doc


def _records(aot, kernel=None, target=None):
    return [r for r in aot["records"]
            if (kernel is None or r["kernel"] == kernel) and (target is None or r["target"] == target)]


def test_every_kernel_has_cases(aot):
    """Each @triton.jit kernel of the package (a jit function no other one calls) is compiled by some case."""
    assert aot["kernels_without_cases"] == [], "add cases for these kernels to tests/triton_aot.py"
    assert {r["kernel"] for r in aot["records"]} <= set(KERNELS), "update KERNELS"


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles(aot, kernel):
    """Every variant of `kernel` compiles to a cubin for every target, with Triton's error text when not."""
    if kernel == "_matmul_tma_kernel" and not aot["has_tma"]:
        pytest.skip(f"Triton {aot['triton']} lacks what the TMA kernel needs (matmul.HAS_TMA is False)")
    recs = _records(aot, kernel)
    want = {"sm_90"} if kernel == "_matmul_tma_kernel" else TARGETS
    assert {r["target"] for r in recs} == want
    failed = [r for r in recs if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(recs)} compiles failed (Triton {aot['triton']}):\n" + "\n\n".join(
        f"[{r['target']}] {r['variant']}:\n{r['error']}" for r in failed)


@pytest.mark.parametrize("kernel", KERNELS)
def test_constexpr_coverage(aot, kernel):
    """The compiled variants span every value of every constexpr in EXPECTED_VALUES (what the launchers produce),
    and nothing else."""
    recs = [r for r in _records(aot, kernel) if r["constexprs"] is not None]  # compiled or not
    if not recs:
        pytest.skip("no variant got as far as Triton (see test_kernel_compiles)")
    expected = EXPECTED_VALUES[kernel]
    seen = {}
    for r in recs:
        for name, v in r["constexprs"].items():
            seen.setdefault(name, set()).add(v)
    unknown = {n for n in seen if n.isupper() and n not in expected and n not in SIZES}
    assert not unknown, f"new constexprs {sorted(unknown)}: add their values to EXPECTED_VALUES (and cases)"
    for name, values in expected.items():
        assert seen.get(name) == values, f"{name}: compiled {sorted(seen.get(name, set()), key=str)}, " \
                                         f"expected {sorted(values, key=str)}"


def test_native_fp8_is_the_hardware_conversion(aot):
    """cast_and_scale: the launcher picks NATIVE_FP8 exactly for saturated fp8 on sm_90, whose PTX then holds the
    cvt.rn.satfinite conversion of that format; no other variant converts through the hardware."""
    native = set()
    for r in _records(aot, "_cast_and_scale_kernel"):
        c, ptx = r["constexprs"], r["ptx"]
        if c and c["NATIVE_FP8"]:
            native.add((r["target"], c["OUT_KIND"]))
        if not r["ok"]:
            continue  # test_kernel_compiles reports it
        if c["NATIVE_FP8"]:
            want = "cvt_e4m3x2" if c["OUT_KIND"] == 2 else "cvt_e5m2x2"
            assert ptx[want] > 0, f"{r['variant']} [{r['target']}]: NATIVE_FP8 without {want}: {ptx}"
        else:
            assert ptx["cvt_e4m3x2"] == ptx["cvt_e5m2x2"] == 0, f"{r['variant']} [{r['target']}]: {ptx}"
    assert native == {("sm_90", 2), ("sm_90", 3)}


def test_tma_kernel_loads_through_tma(aot):
    """The persistent matmul on sm_90 fetches its tiles with cp.async.bulk.tensor and multiplies with wgmma."""
    recs = [r for r in _records(aot, "_matmul_tma_kernel") if r["ok"]]
    if not recs:
        pytest.skip("no compiled TMA variant (see test_kernel_compiles)")
    for r in recs:
        assert r["ptx"]["tma_load"] > 0 and r["ptx"]["wgmma"] > 0, f"{r['variant']}: {r['ptx']}"


def test_matmul_uses_tensor_cores(aot):
    """Every tiled and split-K matmul variant's tl.dot lowers to tensor-core instructions (mma.sync or, on sm_90,
    wgmma)."""
    for r in _records(aot, "_matmul_kernel") + _records(aot, "_matmul_splitk_kernel"):
        if r["ok"]:
            assert r["ptx"]["mma_sync"] + r["ptx"]["wgmma"] > 0, f"{r['variant']} [{r['target']}]: {r['ptx']}"


def test_matmul_relu_keeps_nan(aot):
    """relu in the matmul epilogue is the NaN-propagating maximum (max.NaN.f32), as torch.relu: the plain max.f32
    returns 0 for a NaN input, which would hide a NaN product from AMP's inf/NaN check downstream."""
    seen = 0
    for kernel in ("_matmul_kernel", "_matmul_tma_kernel", "_matmul_splitk_sum_kernel"):
        for r in _records(aot, kernel):
            if r["ok"] and r["constexprs"] and r["constexprs"]["ACT"] == 1:
                seen += 1
                assert r["ptx"]["max_nan_f32"] > 0, f"{r['variant']} [{r['target']}]: relu without max.NaN: {r['ptx']}"
    assert seen, "no relu variant compiled"


def test_matmul_pointer_tiles_are_offset_in_64_bits(aot):
    """No 2-D tile of pointers in any matmul kernel is offset by 32-bit values: the A/B tiles' start and their
    step along K (BLOCK_K x the K stride, which Triton would compute in i32 for a stride passed as i32 and which
    wraps for strides >= 2^31 / BLOCK_K) and the C/pre-activation stores are all 64-bit. Seen in the TTIR of every
    compiled variant, those with column-major operands (a K stride that is an i32 argument) among them; the wrap
    itself needs operands of gigabytes, beyond the CPU tests."""
    seen = 0
    for kernel in ("_matmul_kernel", "_matmul_tma_kernel", "_matmul_splitk_kernel", "_matmul_splitk_sum_kernel"):
        for r in _records(aot, kernel):
            if r["ok"]:
                seen += 1
                assert r["ttir"]["addptr_2d_i32"] == 0, f"{r['variant']} [{r['target']}]: {r['ttir']}"
    assert seen, "no matmul variant compiled"


def test_adam_rounds_like_the_reference(aot):
    """Adam is bit-exact with its reference only without contracted multiply-adds (enable_fp_fusion=False reached
    the compiler) and with IEEE division and square root (div_rn / sqrt_rn)."""
    for r in _records(aot, "_adam_kernel"):
        if r["ok"]:
            p = r["ptx"]
            assert p["fma_f32"] == 0 and p["div_rn_f32"] > 0 and p["sqrt_rn_f32"] > 0, f"{r['variant']}: {p}"


@pytest.mark.parametrize("kernel", [k for k in KERNELS if "matmul" not in k])
def test_bit_exact_kernels_negate_exactly(aot, kernel):
    """No unary minus on float values in the kernels that must match their reference bit for bit, signs of zero
    included: Triton 3.6 compiles -x as 0.0 - x, which is +0.0 for x = +0.0 (torch's neg gives -0.0; seen as a
    wrong-signed zero in Adam's maximize path on the H200, 2026-11-30), and 3.8 as negf. They write x * -1.0.
    The matmul epilogue's erf/exp arguments are exempt: exp(-0.0) and exp(+0.0) are both 1."""
    recs = [r for r in _records(aot, kernel) if r["ok"]]
    if not recs:
        pytest.skip("no compiled variant (see test_kernel_compiles)")
    bad = [f"[{r['target']}] {r['variant']}: {r['ttir']['float_neg']}" for r in recs if r["ttir"]["float_neg"]]
    assert not bad, "float negations:\n" + "\n".join(bad)


# The kernels whose launchers take `wrap` (torch.library.wrap_triton, for triton_ops) and that have float arguments:
# under torch.compile, Inductor's generated wrapper launches them, and it types a Python float argument fp64 where
# Triton's own launch types it fp32 (unscale_ is not a triton_op yet; its launcher is ready to be).
WRAP_TRITON_FLOAT_KERNELS = ["_cast_and_scale_kernel", "_cast_and_scale_backward_kernel", "_unscale_kernel"]


@pytest.mark.parametrize("kernel", WRAP_TRITON_FLOAT_KERNELS)
def test_fp64_float_arguments_compile_to_fp32_math(aot, kernel):
    """Every variant also compiles with its float arguments typed fp64, as Inductor launches it, and does its math in
    fp32 all the same (no fp64 arithmetic, comparison or select in the TTIR): on the H200 (2026-11-30) the forward's
    fp8 rows failed to compile so (the saturation bound made y fp64), and the backward compared |x * s| in fp64."""
    recs = _records(aot, kernel)
    typed = [r for r in recs if r["floats"] == "fp64"]
    assert {r["target"] for r in typed} == TARGETS, "each target's variants again with fp64 floats"
    plain = [r for r in recs if r["floats"] == "fp32"]
    # every case row again (not the forward's two extra rows: another torch's overflow rule, a subnormal scale)
    assert len(typed) >= len(plain) - 2 * len(TARGETS), "each case row again with fp64 floats"
    for r in typed:
        assert r["ok"], f"[{r['target']}] {r['variant']}:\n{r['error']}"
        assert "fp64" in r["float_args"].values(), f"{r['variant']}: compiled without an fp64 argument"
        assert r["ttir"]["f64_math"] == 0, f"[{r['target']}] {r['variant']}: fp64 math in the TTIR"


def test_wrap_triton_kernels_are_listed(aot):
    """WRAP_TRITON_FLOAT_KERNELS names every kernel launched through wrap_triton (a launcher's `wrap(KERNEL)[grid]`,
    read from the source) whose compiled signature has a float argument: a new one must get fp64 cases too."""
    import ast
    import pathlib

    wrapped = set()
    for path in (pathlib.Path(__file__).resolve().parent.parent / "triton_kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "wrap"
                    and node.args and isinstance(node.args[0], ast.Name)):
                wrapped.add(node.args[0].id)
    assert {"_cast_and_scale_kernel", "_matmul_kernel"} <= wrapped, "the pattern this test reads changed"
    with_floats = {r["kernel"] for r in aot["records"] if r["kernel"] in wrapped and r["float_args"]}
    assert with_floats == set(WRAP_TRITON_FLOAT_KERNELS)


def test_shared_memory_fits(aot):
    """Each variant's shared memory fits its target's GPUs, except persistent TMA matmul configs that
    triton_kernels.matmul.candidates would not offer for that output dtype on that target: for those the launcher's
    bound (tma_shared_bytes) must hold, or it could offer a config that fails at launch."""
    from mixprec_ops.triton_kernels import matmul as km

    tma_cfgs = {c.label: c for c in km._TMA_CONFIGS}
    out_bytes = {0: 2, 1: 2, 3: 4}  # OUT_KIND: fp16, bf16, fp32
    too_big, bound_broken, dropped = [], [], set()
    for r in aot["records"]:
        if not r["ok"]:
            continue
        limit = SHARED_LIMIT[r["target"]]
        line = f"[{r['target']}] {r['kernel']} {r['variant']}: {r['shared']} bytes"
        if r["kernel"] == "_matmul_tma_kernel":
            cfg, ob = tma_cfgs[r["config"]], out_bytes[r["constexprs"]["OUT_KIND"]]
            if km.tma_shared_bytes(cfg, ob) < r["shared"]:
                bound_broken.append(f"{line} > bound {km.tma_shared_bytes(cfg, ob)}")
            if km.candidates(8192, 8192, 8192, True, ob, limit).count(cfg) == 0:
                dropped.add(f"[{r['target']}] {cfg.label} for {ob}-byte outputs")
                continue
        if r["shared"] > limit:
            too_big.append(f"{line} > {limit}")
    assert not bound_broken, "\n".join(bound_broken)
    assert not too_big, "\n".join(too_big)
    # What the bound drops on an H200 today (the first and last TMA config for fp32 outputs); a change here is a
    # change of the candidate set worth noticing.
    assert dropped == {f"[sm_90] {km._TMA_CONFIGS[i].label} for 4-byte outputs" for i in (0, 2)}, dropped


def test_no_register_spills_where_nothing_measures_them(aot):
    """Register spills (stack bytes in cuobjdump -res-usage) are slow local-memory traffic. The elementwise and
    optimizer kernels and the default matmul configs (used untuned: graph capture, MIXPREC_MATMUL_AUTOTUNE=0) must
    have none. Other matmul candidates may spill in the epilogue (measured on 2026-11-29: tiled 64x256x32 w4 and
    128x128x32 w4 with GELU, the TMA 128x256x64 w8 with GELU): the autotuner times them against the rest."""
    recs = [r for r in aot["records"] if r["ok"]]
    if all(r["res"] is None for r in recs):
        pytest.skip("no cuobjdump (Triton ships one next to its ptxas)")
    spills = [f"[{r['target']}] {r['kernel']} {r['variant']}: {r['res']}" for r in recs
              if r["res"]["stack"] > 0 and not (r["kernel"].startswith("_matmul") and not r["default"])]
    assert not spills, "\n".join(spills)
    assert all(r["res"]["regs"] > 0 for r in recs), "cuobjdump's resource usage was not parsed"
