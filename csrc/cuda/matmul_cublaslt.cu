// CUDA backend of mixprec::matmul / matmul_pre / matmul_rowsum: cuBLASLt with its fused epilogues, plus one small
// element-wise kernel of ours for the activations cuBLASLt does not have. The vendor GEMM is the engine; nothing
// here is a hand-written GEMM.
//
// Semantics (exactly matmul_reference in mixprec_ops/ops/matmul.py): a (..., M, K) and b (K, N), both fp16 or both
// bf16; products accumulated in fp32; on the fp32 accumulator + bias (N,) (a's dtype or fp32), then the activation,
// then ONE rounding to out_dtype (fp16, bf16, fp32). matmul_pre also returns the pre-activation (acc + bias,
// rounded once to out_dtype); matmul_rowsum also returns sum_k a[m, k] (fp32 sum, rounded once to out_dtype): the
// bias gradient of the wgrad GEMM dW = g^T x, where a = g^T.
//
// Row-major <-> column-major. cuBLASLt is column-major: a row-major (R, C) matrix with row stride s is a
// column-major (C, R) matrix with ld = s. So the row-major product Y (M, N) = a b is computed as the column-major
// Y^T (N, M) = b^T a^T: cuBLASLt's "A" is built from our b and its "B" from our a, D has N rows and M columns with
// ld = N (a fresh contiguous output). Each operand is read in place when one of its strides is 1 and the other is a
// valid leading dimension (>= the stored rows): unit stride along columns -> OP_N with ld = stride(0); unit stride
// along rows (a transpose, e.g. weight.t()) -> OP_T with ld = stride(1). Any other layout (a strided slice in both
// dims, a broadcast with stride 0, an overlapping view) is copied to a contiguous tensor first. A batched a is
// flattened to (M, K) with reshape: a view when its batch dims collapse, else a copy. cuBLASLt has no hard rule on
// ld or pointer alignment for fp16/bf16 with fp32 compute; the heuristic query is told each pointer's real alignment
// (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*) and picks an algorithm that handles it. Should it find none, the call falls
// back (below) and finally copies both operands to fresh, 256-byte-aligned contiguous tensors.
//
// Epilogue mapping (out = out_dtype; "fused" = cuBLASLt does it all in the GEMM's epilogue):
//   out dtype               fused only when out is a's dtype or fp32: cuBLASLt has no bf16 x bf16 -> fp16 GEMM (nor
//                           fp16 -> bf16), so a cross 16-bit out takes the fp32 path.
//   bias                    fused only when the bias dtype is out's (cuBLASLt's bias type is D's type for
//                           non-fp8 GEMMs) or out is fp32 (then an fp16/bf16 bias is widened to fp32, exactly).
//                           Otherwise (fp32 bias with 16-bit out, bf16 bias with fp16 out) the fp32 path below.
//   None                    DEFAULT / BIAS. With pre: pre = a copy of y (they are equal by definition).
//   relu                    DEFAULT / BIAS writes pre (out dtype; y itself when pre is not wanted), then our
//                           kernel y = relu(pre) (in place without pre); exact, since relu commutes with a monotone
//                           rounding that keeps 0 and signs. cuBLASLt's RELU epilogues are not used: their NaN
//                           behaviour is unspecified (a max(x, 0) returns 0 for NaN, torch.relu keeps NaN, and a
//                           NaN turned into 0 would hide an overflow from AMP's inf/NaN check). Costs one read and
//                           write of y; RELU_AUX gives a bit-mask, not the pre-activation.
//   gelu_tanh               GELU / GELU_BIAS: cuBLASLt's GELU epilogue IS the tanh approximation, so it serves
//                           "gelu_tanh" only. With pre: GELU_AUX(_BIAS), aux = pre (the aux type is D's type; its ld
//                           must be a multiple of 8 and >= rows: ld = N, so only when N % 8 == 0, else fp32 path).
//                           16-bit outputs only: how exactly cuBLASLt evaluates tanh is not documented (a fast
//                           approximation would be invisible under a 16-bit rounding, not in an fp32 output, which
//                           takes the fp32 path and its tanhf; tests/test_matmul.py bounds fp32 outputs tightly).
//   gelu (erf), silu        no cuBLASLt epilogue: the fp32 path.
//   fp32 path               the GEMM writes the fp32 accumulator (+ bias via BIAS with a widened fp32 bias) to a
//                           scratch buffer (or to y / pre themselves when out is fp32), then epilogue_kernel applies
//                           the activation in fp32 and rounds once into y (and pre): 16-byte vector stores,
//                           grid-stride, 64-bit indexing. Costs one fp32 M x N write + read more than a fused
//                           epilogue; it is also the fallback whenever the fused configuration has no algorithm.
//                           If even BIAS has none (cuBLASLt's heuristic rejects a bias epilogue when an operand has
//                           one row or column, as torch's addmm notes), then with contiguous operands, and last
//                           DEFAULT with the bias added to the fp32 accumulator by a torch add (the same fp32 sum).
//   rowsum (bias grad)      BGRADB: cuBLASLt's "B" is our a, so its bias gradient (one value per column of D,
//                           reduced over k) is sum_k a[m, k]; its type is D's. Only for the plain GEMM (no
//                           bias/activation in the same call). If BGRADB has no algorithm for the layout, a plain
//                           GEMM plus a separate fp32-accumulated sum (a.sum(1, dtype=fp32)) is used instead.
// fp32 accumulation is kept through split-K: the heuristic may only choose reduction schemes that keep partial sums
// in the compute type (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE; INPLACE and OUTPUT_TYPE sum partials in out dtype).
//
// Handle, workspace, algorithms:
//   - handle: torch's own per-(thread, device) cuBLASLt handle, at::cuda::getCurrentCUDABlasLtHandle() (from
//     ATen/cuda/CUDAContextLight.h, which needs cublasLt.h, cusparse.h, cusolverDn.h: setup.py adds the CUDA torch
//     wheel's nvidia/cu13/include when the toolkit lacks them). The stream is torch's current stream.
//   - workspace: at most kMaxWorkspace (32 MiB, torch's own default on Hopper) offered to the heuristic; the chosen
//     algorithm's actual need (often 0) is allocated per call from torch's caching allocator on the current stream,
//     so reuse is stream-ordered, nothing is shared between streams, and it is CUDA-graph-capture safe.
//   - algorithms: cublasLtMatmulAlgoGetHeuristic, first result, cached per key (device, m, n, k, ops, lds, dtypes,
//     epilogue, alignment class of every pointer, aux ld), negative results too (so a fallback costs no repeated
//     query). The cache is cleared when it exceeds kMaxCachedAlgos entries (dynamic shapes).
// Errors: every cuBLASLt status is checked, naming the call and the status; the op checks dtypes, devices and
// shapes itself, so a direct torch.ops.mixprec.* call with bad inputs raises instead of crashing.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "../common.h"
#include "cuda_common.cuh"

namespace mixprec::cuda {
namespace {

#define MIXPREC_CUBLASLT_CHECK(call)                                                                            \
  do {                                                                                                          \
    const cublasStatus_t status_ = (call);                                                                      \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "mixprec matmul: ", #call, " failed with ",                   \
                cublasLtGetStatusName(status_), " (", static_cast<int>(status_), "): ",                         \
                cublasLtGetStatusString(status_));                                                              \
  } while (0)

constexpr size_t kMaxWorkspace = size_t(32) << 20;
constexpr size_t kMaxCachedAlgos = 8192;

enum class Act : int { None = 0, Relu = 1, Gelu = 2, GeluTanh = 3, Silu = 4 };

Act parse_activation(c10::string_view s) {
  if (s == "none") return Act::None;
  if (s == "relu") return Act::Relu;
  if (s == "gelu") return Act::Gelu;
  if (s == "gelu_tanh") return Act::GeluTanh;
  if (s == "silu") return Act::Silu;
  TORCH_CHECK(false, "activation must be one of 'none', 'relu', 'gelu', 'gelu_tanh', 'silu', got '", s, "'");
}

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kFloat: return CUDA_R_32F;
    default: TORCH_CHECK(false, "mixprec matmul: no cuBLASLt type for ", t);
  }
}

// ---- the element-wise epilogue (activation in fp32, one rounding) --------------------------------------------------

template <Act ACT>
__device__ __forceinline__ float activate(float v) {
  if constexpr (ACT == Act::Relu) {
    return isnan(v) ? v : (v > 0.0f ? v : 0.0f);
  } else if constexpr (ACT == Act::Gelu) {  // torch: x * 0.5 * (1 + erf(x / sqrt(2)))
    return v * 0.5f * (1.0f + erff(v * 0.70710678118654752f));
  } else if constexpr (ACT == Act::GeluTanh) {  // torch: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + tanhf(inner));
  } else if constexpr (ACT == Act::Silu) {  // torch: x / (1 + exp(-x))
    return v / (1.0f + expf(-v));
  } else {
    return v;
  }
}

constexpr int kThreads = 256;

// y[i] = cast(act(acc[i])), and pre[i] = cast(acc[i]) when PRE. VEC elements per thread and access: 16 bytes of Out
// per store. acc may alias y (in place: an fp32 y, or relu on a 16-bit y), hence no __restrict__ on those two. Every
// pointer comes from a fresh allocation of ours (256-byte aligned), so the vector path always applies; the < VEC
// tail is done by block 0.
template <typename In, typename Out, Act ACT, bool PRE>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(const In* acc, Out* y, Out* __restrict__ pre, int64_t n) {
  constexpr int VEC = 16 / sizeof(Out);
  using InPack = Pack<In, VEC>;
  using OutPack = Pack<Out, VEC>;
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    const InPack in = reinterpret_cast<const InPack*>(acc)[i];
    OutPack out, out_pre;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = static_cast<float>(in.v[k]);
      out.v[k] = static_cast<Out>(activate<ACT>(v));
      if constexpr (PRE) out_pre.v[k] = static_cast<Out>(v);
    }
    reinterpret_cast<OutPack*>(y)[i] = out;
    if constexpr (PRE) reinterpret_cast<OutPack*>(pre)[i] = out_pre;
  }
  if (blockIdx.x == 0 && threadIdx.x < n - nvec * VEC) {
    const int64_t i = nvec * VEC + threadIdx.x;
    const float v = static_cast<float>(acc[i]);
    y[i] = static_cast<Out>(activate<ACT>(v));
    if constexpr (PRE) pre[i] = static_cast<Out>(v);
  }
}

template <typename In, typename Out, Act ACT>
void launch_epilogue_act(const at::Tensor& acc, const at::Tensor& y, const at::Tensor* pre, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(Out);
  const int64_t n = y.numel();
  const In* ap = static_cast<const In*>(acc.const_data_ptr());
  Out* yp = static_cast<Out*>(y.data_ptr());
  Out* pp = pre ? static_cast<Out*>(pre->data_ptr()) : nullptr;
  TORCH_INTERNAL_ASSERT(aligned(ap, sizeof(In) * VEC) && aligned(yp, 16) && (!pp || aligned(pp, 16)));
  const int64_t want = (n / VEC + kThreads - 1) / kThreads;
  constexpr auto with_pre = &epilogue_kernel<In, Out, ACT, true>;
  constexpr auto without = &epilogue_kernel<In, Out, ACT, false>;
  if (pp)
    with_pre<<<grid_stride_blocks<with_pre>(want, kThreads), kThreads, 0, stream>>>(ap, yp, pp, n);
  else
    without<<<grid_stride_blocks<without>(want, kThreads), kThreads, 0, stream>>>(ap, yp, pp, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename In, typename Out>
void launch_epilogue_out(const at::Tensor& acc, const at::Tensor& y, const at::Tensor* pre, Act act,
                         cudaStream_t stream) {
  switch (act) {
    case Act::None: return launch_epilogue_act<In, Out, Act::None>(acc, y, pre, stream);
    case Act::Relu: return launch_epilogue_act<In, Out, Act::Relu>(acc, y, pre, stream);
    case Act::Gelu: return launch_epilogue_act<In, Out, Act::Gelu>(acc, y, pre, stream);
    case Act::GeluTanh: return launch_epilogue_act<In, Out, Act::GeluTanh>(acc, y, pre, stream);
    case Act::Silu: return launch_epilogue_act<In, Out, Act::Silu>(acc, y, pre, stream);
  }
}

// y (and pre) from the fp32 accumulator `acc` (all contiguous, same numel; acc may be y itself).
void epilogue_from_fp32(const at::Tensor& acc, const at::Tensor& y, const at::Tensor* pre, Act act,
                        cudaStream_t stream) {
  if (y.numel() == 0) return;
  switch (y.scalar_type()) {
    case at::kHalf: return launch_epilogue_out<float, at::Half>(acc, y, pre, act, stream);
    case at::kBFloat16: return launch_epilogue_out<float, at::BFloat16>(acc, y, pre, act, stream);
    case at::kFloat: return launch_epilogue_out<float, float>(acc, y, pre, act, stream);
    default: TORCH_CHECK(false, "unreachable");
  }
}

// y = relu(pre), pre already rounded to y's dtype (exact: see the header); pre may be y itself (in place).
void relu_from_pre(const at::Tensor& pre, const at::Tensor& y, cudaStream_t stream) {
  if (y.numel() == 0) return;
  switch (y.scalar_type()) {
    case at::kHalf: return launch_epilogue_act<at::Half, at::Half, Act::Relu>(pre, y, nullptr, stream);
    case at::kBFloat16: return launch_epilogue_act<at::BFloat16, at::BFloat16, Act::Relu>(pre, y, nullptr, stream);
    case at::kFloat: return launch_epilogue_act<float, float, Act::Relu>(pre, y, nullptr, stream);
    default: TORCH_CHECK(false, "unreachable");
  }
}

// ---- cuBLASLt plumbing ---------------------------------------------------------------------------------------------

struct DescGuard {
  cublasLtMatmulDesc_t desc = nullptr;
  ~DescGuard() { if (desc) cublasLtMatmulDescDestroy(desc); }
};
struct LayoutGuard {
  cublasLtMatrixLayout_t layout = nullptr;
  ~LayoutGuard() { if (layout) cublasLtMatrixLayoutDestroy(layout); }
};
struct PrefGuard {
  cublasLtMatmulPreference_t pref = nullptr;
  ~PrefGuard() { if (pref) cublasLtMatmulPreferenceDestroy(pref); }
};

template <typename T>
void set_desc(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const T& v) {
  MIXPREC_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &v, sizeof(v)));
}

// Largest power of two (<= 256) dividing the address: what the heuristic must assume about a pointer.
uint32_t alignment_of(const void* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && addr % a != 0) a /= 2;
  return a;
}

// One GEMM operand as cuBLASLt sees it: a column-major matrix of rows x cols with leading dimension ld, used as
// op(X). `keep` holds the tensor the pointer belongs to (possibly a contiguous copy).
struct Operand {
  at::Tensor keep;
  const void* ptr = nullptr;
  cublasOperation_t op = CUBLAS_OP_N;
  int64_t rows = 0, cols = 0, ld = 0;
};

// A row-major (R, C) tensor t, used as op(X) = t^T (C x R, column-major). See the header for the cases.
Operand as_operand(const at::Tensor& t, bool force_copy) {
  const int64_t R = t.size(0), C = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  if (!force_copy) {
    if (s1 == 1 || C == 1) {  // element (c, r) at c + r * s0: column-major C x R, ld = s0, OP_N
      const int64_t ld = R == 1 ? C : s0;
      if (ld >= C && ld >= 1) return {t, t.const_data_ptr(), CUBLAS_OP_N, C, R, ld};
    }
    if (s0 == 1 || R == 1) {  // element (r, c) at r + c * s1: column-major R x C, ld = s1, used transposed
      const int64_t ld = C == 1 ? R : s1;
      if (ld >= R && ld >= 1) return {t, t.const_data_ptr(), CUBLAS_OP_T, R, C, ld};
    }
  }
  // No valid leading dimension (both strides > 1, a broadcast, an overlap) or a retry after the heuristic found no
  // algorithm: a fresh contiguous copy (256-byte aligned), read as OP_N with ld = C.
  at::Tensor c = t.clone(at::MemoryFormat::Contiguous);
  return {c, c.const_data_ptr(), CUBLAS_OP_N, C, R, std::max<int64_t>(C, 1)};
}

struct Gemm {
  Operand A, B;  // cuBLASLt's A (from our b) and B (from our a)
  cudaDataType_t ab_type = CUDA_R_16F;
  void* d = nullptr;
  cudaDataType_t d_type = CUDA_R_32F;
  int64_t m = 0, n = 0, k = 0, ldd = 0;  // D: m rows (our N), n columns (our M)
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // BIAS epilogues: input, type bias_type
  cudaDataType_t bias_type = CUDA_R_32F;
  void* bgrad = nullptr;  // BGRADB: output, D's type
  void* aux = nullptr;    // GELU_AUX: output, D's type
  int64_t aux_ld = 0;
};

struct AlgoEntry {
  bool found = false;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;  // the heuristic's status when !found
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

using AlgoKey = std::array<int64_t, 22>;

struct AlgoKeyHash {
  size_t operator()(const AlgoKey& k) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

std::mutex g_algo_mutex;
std::unordered_map<AlgoKey, AlgoEntry, AlgoKeyHash> g_algos;

// Runs the GEMM and returns CUBLAS_STATUS_SUCCESS, or NOT_SUPPORTED / INVALID_VALUE when this cuBLASLt cannot run
// the configuration (an epilogue/layout combination it rejects): from the heuristic query, or from cublasLtMatmul
// itself, which may refuse what the heuristic accepted (it then launches nothing). Both are cached as "no
// algorithm" and the caller falls back. Any other failure raises.
cublasStatus_t run_gemm(const Gemm& g, const at::Tensor& like, cudaStream_t stream) {
  const int device = like.get_device();
  const void* bias_or_grad = g.bias ? g.bias : g.bgrad;
  const AlgoKey key = {device, g.m, g.n, g.k, g.A.op, g.B.op, g.A.ld, g.B.ld, g.ldd, g.ab_type, g.d_type,
                       g.bias_type, g.epilogue, alignment_of(g.A.ptr), alignment_of(g.B.ptr),
                       alignment_of(g.d), bias_or_grad ? alignment_of(bias_or_grad) : 0,
                       g.aux ? alignment_of(g.aux) : 0, g.aux_ld, g.A.rows, g.B.rows, 0};

  DescGuard desc;
  MIXPREC_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&desc.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(desc.desc, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(g.A.op));
  set_desc(desc.desc, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(g.B.op));
  set_desc(desc.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(g.epilogue));
  if (g.bias) {
    set_desc(desc.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
    set_desc(desc.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, static_cast<int32_t>(g.bias_type));
  }
  if (g.bgrad) {
    set_desc(desc.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(g.bgrad));
    set_desc(desc.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, static_cast<int32_t>(g.d_type));
  }
  if (g.aux) {
    set_desc(desc.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, static_cast<const void*>(g.aux));
    set_desc(desc.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.aux_ld);
    set_desc(desc.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, static_cast<int32_t>(g.d_type));
  }
  LayoutGuard la, lb, ld;
  MIXPREC_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&la.layout, g.ab_type, g.A.rows, g.A.cols, g.A.ld));
  MIXPREC_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&lb.layout, g.ab_type, g.B.rows, g.B.cols, g.B.ld));
  MIXPREC_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&ld.layout, g.d_type, g.m, g.n, g.ldd));
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();

  AlgoEntry entry;
  entry.status = CUBLAS_STATUS_NOT_SUPPORTED;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    auto it = g_algos.find(key);
    if (it != g_algos.end()) {
      entry = it->second;
      cached = true;
    }
  }
  if (!cached) {
    PrefGuard pref;
    MIXPREC_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref.pref));
    const uint64_t ws = kMaxWorkspace;
    MIXPREC_CUBLASLT_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    // Split-K partial sums in fp32 only (INPLACE and OUTPUT_TYPE would add partials in the output dtype).
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    MIXPREC_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                                &schemes, sizeof(schemes)));
    const uint32_t al_a = alignment_of(g.A.ptr), al_b = alignment_of(g.B.ptr), al_d = alignment_of(g.d);
    MIXPREC_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                                &al_a, sizeof(al_a)));
    MIXPREC_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                                &al_b, sizeof(al_b)));
    MIXPREC_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                                &al_d, sizeof(al_d)));
    MIXPREC_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                                &al_d, sizeof(al_d)));
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, desc.desc, la.layout, lb.layout, ld.layout,
                                                             ld.layout, pref.pref, 1, &result, &returned);
    // NOT_SUPPORTED / INVALID_VALUE: no algorithm for this configuration (e.g. an epilogue with this layout); that
    // is a fallback, not an error.
    if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) MIXPREC_CUBLASLT_CHECK(st);
    entry.found = st == CUBLAS_STATUS_SUCCESS && returned > 0;
    entry.status = st == CUBLAS_STATUS_SUCCESS ? CUBLAS_STATUS_NOT_SUPPORTED : st;
    if (entry.found) {
      entry.algo = result.algo;
      entry.workspace = result.workspaceSize;
    }
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    if (g_algos.size() >= kMaxCachedAlgos) g_algos.clear();
    g_algos.emplace(key, entry);
  }
  if (!entry.found) return entry.status;

  at::Tensor workspace;
  void* ws_ptr = nullptr;
  if (entry.workspace > 0) {
    workspace = at::empty({static_cast<int64_t>(entry.workspace)}, like.options().dtype(at::kByte));
    ws_ptr = workspace.data_ptr();
  }
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t st = cublasLtMatmul(handle, desc.desc, &alpha, g.A.ptr, la.layout, g.B.ptr, lb.layout, &beta,
                                           g.d, ld.layout, g.d, ld.layout, &entry.algo, ws_ptr, entry.workspace,
                                           stream);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
    AlgoEntry refused;
    refused.status = st;
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    g_algos[key] = refused;
    return st;
  }
  MIXPREC_CUBLASLT_CHECK(st);
  return CUBLAS_STATUS_SUCCESS;
}

// ---- the op --------------------------------------------------------------------------------------------------------

void check_args(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                at::ScalarType out_dtype) {
  for (const auto* t : {&a, &b}) {
    const char* name = t == &a ? "a" : "b";
    TORCH_CHECK(t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16, name,
                " must be float16 or bfloat16, got ", t->scalar_type());
    TORCH_CHECK(t->layout() == at::kStrided, name, " must be a dense strided tensor");
    TORCH_CHECK(t->is_cuda(), name, " must be a CUDA tensor, got one on ", t->device());
  }
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b must have the same dtype, got a ", a.scalar_type(),
              " and b ", b.scalar_type());
  TORCH_CHECK(a.dim() >= 2, "a must have shape (M, K) or (..., M, K), got ", dims(a.sizes()));
  TORCH_CHECK(b.dim() == 2, "b must have shape (K, N), got ", dims(b.sizes()));
  TORCH_CHECK(a.size(-1) == b.size(0), "a and b shapes do not match: a ", dims(a.sizes()), ", b ", dims(b.sizes()));
  TORCH_CHECK(b.device() == a.device(), "b must be on a's device ", a.device(), ", got ", b.device());
  check_allocated(a, "a");
  check_allocated(b, "b");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b.size(1), "bias must have shape (N,) = (", b.size(1),
                ",), got ", dims(bias->sizes()));
    TORCH_CHECK(bias->scalar_type() == a.scalar_type() || bias->scalar_type() == at::kFloat, "bias must be ",
                a.scalar_type(), " (a's dtype) or float32, got ", bias->scalar_type());
    TORCH_CHECK(bias->layout() == at::kStrided, "bias must be a dense strided tensor");
    TORCH_CHECK(bias->device() == a.device(), "bias must be on a's device ", a.device(), ", got ", bias->device());
    check_allocated(*bias, "bias");
  }
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16 || out_dtype == at::kFloat,
              "out_dtype must be float16, bfloat16 or float32, got ", out_dtype);
}

// A widened fp32 copy of the bias (or the bias itself when fp32), contiguous and 16-byte aligned.
at::Tensor bias_fp32(const at::Tensor& bias) {
  at::Tensor t = bias.to(at::kFloat).contiguous();
  if (!aligned(t.const_data_ptr(), 16)) t = t.clone();
  return t;
}

struct Outputs {
  at::Tensor y, pre, rowsum;
};

Outputs matmul_impl(const at::Tensor& a_in, const at::Tensor& b, const std::optional<at::Tensor>& bias, Act act,
                    at::ScalarType out_dtype, bool want_pre, bool want_rowsum) {
  check_args(a_in, b, bias, out_dtype);
  const c10::cuda::CUDAGuard guard(a_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = a_in.size(-1), N = b.size(1);
  int64_t M = 1;
  for (int64_t d = 0; d < a_in.dim() - 1; ++d) M *= a_in.size(d);
  // (M, K): a view when the batch dims collapse, else a copy (M given explicitly: -1 is ambiguous when K == 0)
  const at::Tensor a = a_in.dim() == 2 ? a_in : a_in.reshape({M, K});
  std::vector<int64_t> out_shape(a_in.sizes().begin(), a_in.sizes().end());
  out_shape.back() = N;
  const auto opts = a_in.options().dtype(out_dtype);
  Outputs o;
  o.y = at::empty({M, N}, opts);
  if (want_pre) o.pre = at::empty({M, N}, opts);
  bool rowsum_done = false;
  auto finish = [&]() {
    if (want_rowsum && !rowsum_done) {  // fp32-accumulated sum over K, rounded once
      const int64_t dim1[] = {1};
      o.rowsum = a.sum(at::OptionalIntArrayRef(at::IntArrayRef(dim1)), false, at::kFloat).to(out_dtype);
    }
    o.y = o.y.view(out_shape);
    if (want_pre) o.pre = o.pre.view(out_shape);
    return o;
  };
  if (M == 0 || N == 0) return finish();
  if (K == 0) {  // no product: act(bias) (or act(0)) everywhere
    at::Tensor acc = at::zeros({M, N}, a_in.options().dtype(at::kFloat));
    if (bias.has_value()) acc.add_(bias_fp32(*bias));
    epilogue_from_fp32(acc, o.y, want_pre ? &o.pre : nullptr, act, stream);
    return finish();
  }

  Gemm g;
  g.A = as_operand(b, false);
  g.B = as_operand(a, false);
  g.ab_type = cuda_type(a.scalar_type());
  g.m = N;
  g.n = M;
  g.k = K;
  g.ldd = N;

  // 1. Fully fused in cuBLASLt's epilogue, where the mapping in the header allows it. cuBLASLt has no bf16 x bf16 ->
  // fp16 (or fp16 -> bf16) GEMM: a cross 16-bit out_dtype takes the fp32 path directly.
  const bool type_fusable = out_dtype == at::kFloat || out_dtype == a.scalar_type();
  const bool bias_fusable = !bias.has_value() || bias->scalar_type() == out_dtype || out_dtype == at::kFloat;
  const bool act_fusable = act == Act::None || act == Act::Relu ||
                           (act == Act::GeluTanh && out_dtype != at::kFloat && (!want_pre || N % 8 == 0));
  if (type_fusable && bias_fusable && act_fusable) {
    at::Tensor bias_d;
    if (bias.has_value()) bias_d = bias->scalar_type() == out_dtype ? bias->contiguous() : bias_fp32(*bias);
    const bool has_bias = bias_d.defined();
    Gemm f = g;
    f.d_type = cuda_type(out_dtype);
    f.bias = has_bias ? bias_d.const_data_ptr() : nullptr;
    f.bias_type = cuda_type(out_dtype);
    enum class Post { None, CopyPre, ReluFromPre } post = Post::None;
    if (act == Act::None) {
      f.d = o.y.data_ptr();
      f.epilogue = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
      if (want_pre) post = Post::CopyPre;
      if (want_rowsum && !has_bias) {
        o.rowsum = at::empty({M}, opts);
        f.epilogue = CUBLASLT_EPILOGUE_BGRADB;
        f.bgrad = o.rowsum.data_ptr();
      }
    } else if (act == Act::Relu) {  // not cuBLASLt's RELU epilogue: see the header (NaN)
      f.d = want_pre ? o.pre.data_ptr() : o.y.data_ptr();
      f.epilogue = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
      post = Post::ReluFromPre;
    } else {  // gelu_tanh
      f.d = o.y.data_ptr();
      if (want_pre) {
        f.epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
        f.aux = o.pre.data_ptr();
        f.aux_ld = N;
      } else {
        f.epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
      }
    }
    bool ok = run_gemm(f, o.y, stream) == CUBLAS_STATUS_SUCCESS;
    if (!ok && f.bgrad) {  // BGRADB unavailable for this layout: the plain GEMM, and the sum separately
      f.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
      f.bgrad = nullptr;
      o.rowsum = at::Tensor();
      ok = run_gemm(f, o.y, stream) == CUBLAS_STATUS_SUCCESS;
    } else if (ok && f.bgrad) {
      rowsum_done = true;
    }
    if (ok) {
      if (post == Post::CopyPre) o.pre.copy_(o.y);
      if (post == Post::ReluFromPre) relu_from_pre(want_pre ? o.pre : o.y, o.y, stream);  // in place without pre
      return finish();
    }
  }

  // 2. fp32 path: the GEMM (+ bias) into an fp32 accumulator, then our epilogue kernel.
  at::Tensor acc;
  if (out_dtype == at::kFloat) {
    acc = want_pre ? o.pre : o.y;  // the kernel then reads pre and writes y, or works on y in place
  } else {
    acc = at::empty({M, N}, opts.dtype(at::kFloat));
  }
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias_fp32(*bias);
  Gemm p = g;
  p.d = acc.data_ptr();
  p.d_type = CUDA_R_32F;
  p.bias = bias32.defined() ? bias32.const_data_ptr() : nullptr;
  p.bias_type = CUDA_R_32F;
  p.epilogue = bias32.defined() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  cublasStatus_t st = run_gemm(p, o.y, stream);
  if (st != CUBLAS_STATUS_SUCCESS) {  // 3. the same with fresh contiguous, 256-byte-aligned operands
    p.A = as_operand(b, true);
    p.B = as_operand(a, true);
    st = run_gemm(p, o.y, stream);
  }
  if (st != CUBLAS_STATUS_SUCCESS && p.bias) {  // 4. no bias epilogue: the plain GEMM, then acc += bias in fp32
    p.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    p.bias = nullptr;
    st = run_gemm(p, o.y, stream);
    if (st == CUBLAS_STATUS_SUCCESS) acc.add_(bias32);
  }
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "mixprec matmul: cuBLASLt has no algorithm (",
              cublasLtGetStatusName(st), ") for (M, N, K) = (", M, ", ", N, ", ", K, "), ", a.scalar_type(),
              " operands, fp32 output, even with contiguous operands and no epilogue");
  if (out_dtype == at::kFloat && !want_pre) {
    if (act != Act::None) epilogue_from_fp32(acc, o.y, nullptr, act, stream);  // in place
  } else if (out_dtype == at::kFloat) {
    epilogue_from_fp32(acc, o.y, nullptr, act, stream);  // acc is pre (already final: fp32 needs no rounding)
  } else {
    epilogue_from_fp32(acc, o.y, want_pre ? &o.pre : nullptr, act, stream);
  }
  return finish();
}

at::Tensor matmul_cuda(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                       c10::string_view activation, at::ScalarType out_dtype) {
  return matmul_impl(a, b, bias, parse_activation(activation), out_dtype, false, false).y;
}

std::tuple<at::Tensor, at::Tensor> matmul_pre_cuda(const at::Tensor& a, const at::Tensor& b,
                                                   const std::optional<at::Tensor>& bias,
                                                   c10::string_view activation, at::ScalarType out_dtype) {
  Outputs o = matmul_impl(a, b, bias, parse_activation(activation), out_dtype, true, false);
  return {o.y, o.pre};
}

std::tuple<at::Tensor, at::Tensor> matmul_rowsum_cuda(const at::Tensor& a, const at::Tensor& b,
                                                      at::ScalarType out_dtype) {
  TORCH_CHECK(a.dim() == 2, "matmul_rowsum: a must have shape (M, K), got ", dims(a.sizes()));
  Outputs o = matmul_impl(a, b, std::nullopt, Act::None, out_dtype, false, true);
  return {o.y, o.rowsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("matmul", &matmul_cuda);
  m.impl("matmul_pre", &matmul_pre_cuda);
  m.impl("matmul_rowsum", &matmul_rowsum_cuda);
}

}  // namespace mixprec::cuda
