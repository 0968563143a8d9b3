// CUDA k nearest neighbours (infofuse::knn) and radius counts (infofuse::knn_count) by direct differences, never
// an N×M matrix. Device code in knn_select.cuh; this file checks the arguments, picks a kernel and launches it.
//
// Distances. A "pre-distance" is accumulated over the features in order 0..d-1, in float32 (bfloat16/float16 are
// read and upcast, exactly) or in double for float64: Euclidean pre = Σ fma((q - y), (q - y), ·), distance =
// sqrt_rn(pre); Chebyshev pre = distance = max |q - y|, the max taken on the bit patterns (NaN propagates and sorts
// above +inf). The three kernels run the same operations in the same order, so a pair's distance is the same bits
// in all of them, and the distances returned are those of the selection: exact for the selected pairs, ascending.
// Comparisons are on "ordered bits" (IEEE pattern, sign cleared; for values >= 0 unsigned order = numeric order),
// so the --use_fast_math of setup.py (flush-to-zero) changes no comparison; the rounding-mode intrinsics
// (__fmaf_rn, __fsqrt_rn, __fmul_ru/rd) keep the arithmetic IEEE. Float32 subnormal coordinate differences are
// flushed to zero under fast math (< 1.2e-38, irrelevant for neighbour search).
//
// Order. A candidate's key is (ordered distance bits, index): 64 bits packed for float32, a (64-bit, 32-bit)
// pair for float64. Keys of distinct candidates differ, so every selection below is one strict total order and
// its result is deterministic; ties in distance go to the smaller index. The sentinel key (all ones) is above
// every real key. N and M are at most 2^31 - 1 (indices fit the key); every offset into x, y and the outputs is
// int64.
//
// Candidate tiles (knn for k <= 64, and knn_count). 256 threads = 8 warps per block; warp w owns QPW queries of one
// batch entry (knn: 2, count: 4), so a block serves 16 (count: 32) queries. The candidates stream through shared
// memory in tiles of 128 rows × 32 features (row stride odd, so lanes reading different rows hit distinct
// banks; for d > 32 the query chunk is reloaded with each tile chunk and partial sums stay in registers). Lane l
// holds the pre-distances of candidates m0 + 32·s + l (s < 4) to its warp's queries: each shared-memory load of a
// candidate feature feeds QPW fused multiply-adds, each query feature load (a broadcast) 4. Each y tile is read
// from global memory once per block, i.e. y is read ⌈N/16⌉ times in all (from L2 when it fits).
//
// Warp selection (knn, k <= 64, after faiss's WarpSelect; our own code). Per query the warp holds a warp queue
// of Q = 32·R sorted keys in registers (R = 1 for k <= 32, 2 for k <= 64; key at position r·32 + lane) and each
// lane a thread queue of T keys (T = 2 for R = 1, 3 for R = 2). kth is the key at position k-1 of the warp queue,
// broadcast. A candidate enters its lane's thread queue only if its key < kth; before the key (and, for
// Euclidean, the square root) is formed, the pre-distance passes a filter implied by that test (for Euclidean,
// a conservative bound on pre from kth's distance by directed-rounding squares, see sq_band). After every
// candidate the warp votes; if any lane's thread queue is full, the thread queues are merged into the warp queue,
// one column (tq[t] of the 32 lanes) at a time: bitonic sort of the column by __shfl_xor_sync (15 steps), a
// half-cleaner against the top block of the warp queue, and bitonic merges (5 steps each) that re-sort the blocks
// (20 steps for R = 1, 35 for R = 2; all-sentinel columns are skipped). Invariants: the warp queue is always the
// Q smallest keys merged so far, ascending; a lane never holds T unmerged keys before an add; a rejected key is
// above the k-th smallest key seen so far, so it is never in the answer. Expected cost per candidate and query,
// once kth has settled: d subtract+FMA (or max) from registers/shared memory, one 32/64-bit compare and one vote.
// Keys enter about k·ln(M/k) times per query in all (random order), each costing at most one column merge. The
// 4 slots of a tile are walked by a rolled loop (the next slot rotated into place), so the merge network is
// inlined once per query of the warp. The three tile kernels are built for 2 resident blocks per SM (<= 128
// registers; ptxas -v for sm_80: 78-128, no spills).
//
// Fallback (knn, k > 64, any k <= M): the same blocks and tile loop, with each query's selection in a buffer of cap
// keys of global workspace (cap = the power of two >= 2k + 128) instead of registers. A candidate whose key is
// below the query's threshold (the k-th smallest key at the last compaction; the sentinel before the first) is
// appended at a slot given by a warp ballot. After each tile (at most 128 appends), if fewer than 128 slots are
// left, the warp bitonic-sorts the buffer (32 lanes, __syncwarp between stages) and keeps its k smallest, so the
// next tile always fits; a final sort gives the k nearest. A persistent grid (2 blocks per SM, fewer if the
// workspace would pass 256 MiB) walks the query groups, so the workspace is per resident block: 16·cap keys.
// Per candidate: the same distance and filter as above plus one ballot; per compaction O(cap·log² cap / 32)
// compare-exchanges per lane, about ln(M/cap) compactions per query for candidates in random order.

// knn_count: the candidate tile loop with y = x and per-query counters in registers, summed over the warp at the
// end. "dist < r" (or <=) is decided on ordered bits; for Euclidean, sq_band decides most candidates from pre alone
// and only those in a band of about one ulp around r² take the square root. NaN radius or r < 0: count 0.

// torch's headers use C++20 default bit-field initializers (c10/core/AutogradState.h), which nvcc's front end
// (warning 3306) and the host compiler (-Wc++20-extensions) flag under -std=c++17; they are torch's, not ours.
#pragma nv_diag_suppress 3306
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpragmas"
#pragma GCC diagnostic ignored "-Wc++20-extensions"
#include <ATen/ATen.h>
#include <torch/library.h>

#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
// A CUDA build of torch: its CUDA guard, current stream and launch check.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define INFOFUSE_KNN_TORCH_CUDA_HEADERS 1
#else
// A CPU build of torch, as in the nvcc-only `make cuda-check` on a machine without a GPU: its headers lack the
// generated c10/cuda/impl/cuda_cmake_macros.h (and ATen/cuda needs cuSPARSE's headers), so the device-generic
// c10 guard and stream stand in. setup.py builds CUDA sources only against a CUDA torch, so this branch is
// compiled, never run; the kernels are the same in both.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#endif
#pragma GCC diagnostic pop
#pragma nv_diag_default 3306

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>

#include "knn_select.cuh"

namespace infofuse::cuda {
namespace {

namespace kn = infofuse::cuda::knn;

#ifdef INFOFUSE_KNN_TORCH_CUDA_HEADERS
using DeviceGuard = c10::cuda::CUDAGuard;

cudaStream_t current_stream(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()); }

void check_cuda(cudaError_t err) { C10_CUDA_CHECK(err); }

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
#else
using DeviceGuard = c10::DeviceGuard;

cudaStream_t current_stream(const at::Device& device) {
  return static_cast<cudaStream_t>(c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle());
}

void check_cuda(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "CUDA error: ", cudaGetErrorString(err)); }

void check_launch() { check_cuda(cudaGetLastError()); }
#endif

// Workspace of the fallback kernel, all blocks together (at least one block's buffer).
constexpr int64_t kFallbackWorkspaceBytes = int64_t(256) << 20;
constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();

static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16) && sizeof(at::Half) == sizeof(__half),
              "16-bit float layouts");

template <typename T>
struct TypeTag {
  using type = T;
};

at::ScalarType acc_type_of(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// f(TypeTag<In>, TypeTag<Acc>) for x's dtype: In the CUDA element type, Acc the accumulation type.
template <typename F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat:
      f(TypeTag<float>{}, TypeTag<float>{});
      break;
    case at::kDouble:
      f(TypeTag<double>{}, TypeTag<double>{});
      break;
    case at::kBFloat16:
      f(TypeTag<__nv_bfloat16>{}, TypeTag<float>{});
      break;
    case at::kHalf:
      f(TypeTag<__half>{}, TypeTag<float>{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "unsupported dtype ", dt);
  }
}

// t (B, N, d) of a supported floating dtype, on a CUDA device.
void check_points(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must be 3-D (B, N, d), got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, name,
                   " must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(t.is_cuda(), "infofuse's cuda backend needs CUDA tensors, got ", name, " on ", t.device());
  TORCH_CHECK_VALUE(t.size(1) <= kMaxRows, name, " has ", t.size(1), " rows; at most ", kMaxRows, " are supported");
}

void check_metric(int64_t metric) {
  TORCH_CHECK_VALUE(metric == 0 || metric == 1, "metric must be 0 (Euclidean) or 1 (Chebyshev), got ", metric);
}

// Blocks per batch entry and the total for a 1-D grid of blocks serving `per_block` queries each.
std::pair<int64_t, unsigned> query_grid(int64_t batch, int64_t n, int64_t per_block) {
  const int64_t per_batch = (n + per_block - 1) / per_block;
  const int64_t total = batch * per_batch;
  TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), "B·N = ", batch * n,
                    " queries is too many for one launch");
  return {per_batch, static_cast<unsigned>(total)};
}

template <typename In, typename Acc, int kMetric, int R, int T>
void launch_warp_select(const In* x, const In* y, int64_t batch, int64_t n, int64_t m, int64_t d, int64_t k,
                        bool exclude_self, Acc* out_dist, int64_t* out_index, cudaStream_t stream) {
  const auto [per_batch, blocks] = query_grid(batch, n, kn::kWarps * kn::kKnnQueriesPerWarp);
  kn::knn_warp_select_kernel<In, Acc, kMetric, R, T><<<blocks, kn::kThreads, 0, stream>>>(
      x, y, n, m, d, static_cast<int>(k), exclude_self, per_batch, out_dist, out_index);
  check_launch();
}

template <typename In, typename Acc, int kMetric>
void launch_buffer_select(const at::Tensor& x, const In* xp, const In* yp, int64_t batch, int64_t n, int64_t m,
                          int64_t d, int64_t k, bool exclude_self, Acc* out_dist, int64_t* out_index,
                          cudaStream_t stream) {
  using K = kn::Key<Acc>;
  constexpr int64_t kQueries = kn::kWarps * kn::kKnnQueriesPerWarp;
  int64_t cap = 1;
  while (cap < 2 * k + kn::kTileM) cap <<= 1;  // >= k + kTileM: a tile always fits after a compaction
  const auto [per_batch, tasks] = query_grid(batch, n, kQueries);
  const int64_t block_bytes = kQueries * cap * static_cast<int64_t>(sizeof(K));
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  int64_t blocks = std::min<int64_t>(tasks, int64_t(kn::kTileMinBlocks) * sms);  // resident at once
  blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, kFallbackWorkspaceBytes / block_bytes));
  at::Tensor work = at::empty({blocks * block_bytes}, x.options().dtype(at::kByte));
  kn::knn_buffer_select_kernel<In, Acc, kMetric><<<static_cast<unsigned>(blocks), kn::kThreads, 0, stream>>>(
      xp, yp, n, m, d, k, exclude_self, per_batch, tasks, reinterpret_cast<K*>(work.data_ptr()), cap, out_dist,
      out_index);
  check_launch();
}

template <typename In, typename Acc, int kMetric>
void launch_knn(const at::Tensor& x, const at::Tensor& y, int64_t k, bool exclude_self, at::Tensor& dist,
                at::Tensor& index, cudaStream_t stream) {
  const int64_t batch = x.size(0), n = x.size(1), m = y.size(1), d = x.size(2);
  const In* xp = reinterpret_cast<const In*>(x.const_data_ptr());
  const In* yp = reinterpret_cast<const In*>(y.const_data_ptr());
  Acc* dp = dist.data_ptr<Acc>();
  int64_t* ip = index.data_ptr<int64_t>();
  if (k <= kn::kWarpSize) {
    launch_warp_select<In, Acc, kMetric, 1, 2>(xp, yp, batch, n, m, d, k, exclude_self, dp, ip, stream);
  } else if (k <= kn::kMaxFastK) {
    launch_warp_select<In, Acc, kMetric, 2, 3>(xp, yp, batch, n, m, d, k, exclude_self, dp, ip, stream);
  } else {
    launch_buffer_select<In, Acc, kMetric>(x, xp, yp, batch, n, m, d, k, exclude_self, dp, ip, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& x, const at::Tensor& y, int64_t k, int64_t metric,
                                            bool exclude_self) {
  check_points(x, "x");
  check_points(y, "y");
  TORCH_CHECK_TYPE(y.scalar_type() == x.scalar_type(), "x and y must share a dtype, got ", x.scalar_type(), " and ",
                   y.scalar_type());
  TORCH_CHECK_VALUE(y.device() == x.device(), "y must be on x's device ", x.device(), ", got ", y.device());
  const int64_t batch = x.size(0), n = x.size(1), d = x.size(2), m = y.size(1);
  TORCH_CHECK_VALUE(y.size(0) == batch && y.size(2) == d, "y must be (B, M, d) with B = ", batch, " and d = ", d,
                    ", got shape ", y.sizes());
  check_metric(metric);
  TORCH_CHECK_VALUE(!exclude_self || m == n, "exclude_self needs y to be x (M == N), got N = ", n, ", M = ", m);
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  const int64_t max_k = exclude_self ? m - 1 : m;
  // With no queries the result is empty whatever M is (as in the CPU op, whose message this is).
  TORCH_CHECK_VALUE(n == 0 || batch == 0 || k <= max_k, "k must be <= ", exclude_self ? "M - 1 = " : "M = ", max_k,
                    exclude_self ? " (exclude_self)" : "", ", got k = ", k);

  const DeviceGuard guard(x.device());
  const auto acc = acc_type_of(x.scalar_type());
  at::Tensor dist = at::empty({batch, n, k}, x.options().dtype(acc));
  at::Tensor index = at::empty({batch, n, k}, x.options().dtype(at::kLong));
  if (dist.numel() == 0) return {dist, index};
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const cudaStream_t stream = current_stream(x.device());
  dispatch_dtype(x.scalar_type(), [&](auto in_tag, auto acc_tag) {
    using In = typename decltype(in_tag)::type;
    using Acc = typename decltype(acc_tag)::type;
    if (metric == 0) {
      launch_knn<In, Acc, 0>(xc, yc, k, exclude_self, dist, index, stream);
    } else {
      launch_knn<In, Acc, 1>(xc, yc, k, exclude_self, dist, index, stream);
    }
  });
  return {dist, index};
}

template <typename In, typename Acc, int kMetric>
void launch_count(const at::Tensor& x, const at::Tensor& radius, bool strict, at::Tensor& counts, cudaStream_t stream) {
  const int64_t batch = x.size(0), n = x.size(1), d = x.size(2);
  const auto [per_batch, blocks] = query_grid(batch, n, kn::kWarps * kn::kCountQueriesPerWarp);
  kn::knn_count_kernel<In, Acc, kMetric><<<blocks, kn::kThreads, 0, stream>>>(
      reinterpret_cast<const In*>(x.const_data_ptr()), radius.const_data_ptr<Acc>(), n, d, strict, per_batch,
      counts.data_ptr<int64_t>());
  check_launch();
}

at::Tensor knn_count_cuda(const at::Tensor& x, const at::Tensor& radius, int64_t metric, bool strict) {
  check_points(x, "x");
  const int64_t batch = x.size(0), n = x.size(1);
  const auto acc = acc_type_of(x.scalar_type());
  TORCH_CHECK_VALUE(radius.dim() == 2 && radius.size(0) == batch && radius.size(1) == n, "radius must be (B, N) = (",
                    batch, ", ", n, "), got shape ", radius.sizes());
  TORCH_CHECK_TYPE(radius.scalar_type() == acc, "radius must be ", acc, " for ", x.scalar_type(), " x, got ",
                   radius.scalar_type());
  TORCH_CHECK_VALUE(radius.device() == x.device(), "radius must be on x's device ", x.device(), ", got ",
                    radius.device());
  check_metric(metric);

  const DeviceGuard guard(x.device());
  at::Tensor counts = at::empty({batch, n}, x.options().dtype(at::kLong));
  if (counts.numel() == 0) return counts;
  const at::Tensor xc = x.contiguous(), rc = radius.contiguous();
  const cudaStream_t stream = current_stream(x.device());
  dispatch_dtype(x.scalar_type(), [&](auto in_tag, auto acc_tag) {
    using In = typename decltype(in_tag)::type;
    using Acc = typename decltype(acc_tag)::type;
    if (metric == 0) {
      launch_count<In, Acc, 0>(xc, rc, strict, counts, stream);
    } else {
      launch_count<In, Acc, 1>(xc, rc, strict, counts, stream);
    }
  });
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(infofuse, CUDA, m) {
  m.impl("knn", &knn_cuda);
  m.impl("knn_count", &knn_count_cuda);
}

}  // namespace infofuse::cuda
