// CPU k-nearest neighbours (knn) and radius counts (knn_count), exact, for the k-NN estimators (MATH.md).
//
// Per batch entry: a k-d tree over the candidates (leaves of 128 float / 64 double points, each leaf's coordinates
// stored dimension-major), then, in parallel over query blocks (the leaves of a tree over the queries, handed out
// from a shared counter), a depth-first walk of the candidate tree, nearer child first, that skips nodes whose
// box-to-box lower bound exceeds every query's current k-th distance and, per query, leaves whose point-to-box bound
// exceeds its own. A visited leaf is scanned by a direct-difference kernel (knn_kernels.h: 8 vector accumulators
// across the leaf's points, dimensions streamed, a partial-distance exit every 8 dimensions). Each query keeps a
// bounded top-k of (distance, index), ties to the smaller index (sorted insertion up to k = 32, a heap above);
// candidates reach it only when their s passes the query's threshold, which is rare after the first leaves.
// Memory beyond the inputs and outputs: the trees and their tiles (about (M + N)·d values, plus M·d/2 words of
// screening data), and per thread one block of queries and their top-k lists; no N×M block exists.
//
// Why direct differences and no GEMM (‖x‖² + ‖y‖² − 2x·y): at the small d of the estimators the GEMM has K = d,
// and its N×M output must go through memory to be screened. On the 2-core Zen 4 VM, float32, N = M = 100000,
// d = 16, at::mm alone over 1024-row blocks of x·yᵀ takes ~6.7 s; this whole op takes ~2.0 s (Euclidean) and
// ~1.65 s (Chebyshev), k = 3, self excluded. The direct kernel is bound by its FMA units (one subtract and one FMA
// per pair and dimension); on CPUs with AVX512-BF16, float32 Euclidean leaves are first screened with bfloat16 dot
// products, two dimensions per instruction, under a rigorous error bound, and only points that pass get their exact
// distance (knn_kernels.h: ScreenLeaves), which took the op above from ~2.6 s to ~2.0 s. Pruning is what d allows:
// at d = 16 (Gaussian) about 68 % of the candidate leaves are still scanned, at d <= 4 a handful (~0.1 s for the
// shape above). At large d the walk degenerates into a brute force through the same kernels (d = 128, N = 20000:
// ~0.6 s Euclidean, ~1.2 s Chebyshev).
//
// On CPUs with AMX-BF16, float Euclidean problems from d = 12 on (and at least 2^20 pairs) skip the tree: a brute
// force whose screen is a bfloat16 tile product under the same kind of rigorous bound, with an exact re-rank
// (knn_amx.h). On the 2-core Sapphire Rapids VM, N = 100000, k = 3, self excluded, the estimator took 768 ms at
// d = 16 (the tree walk: 2460 ms) and 2062 ms at d = 128 (tree: 22244 ms) (bench/NOTES.md); below d ~ 10 the tree
// prunes enough to win. The results are bit-identical either way (tests/test_knn_amx.py). set_cpu_knn_path("tree" |
// "amx") forces one path.
//
// knn_count: the same tree over x; nodes are skipped when outside every query's radius and counted whole when
// inside all of them (box upper bound); leaves are decided per query and scanned only when they straddle its
// radius. d == 1: sorted values and two binary searches per query, on the same computed s as the brute force
// (knn_kernels.h, count_sorted_1d). Batches of small problems run one problem per thread.
//
// Accumulation: float for float32/bfloat16/float16 (inputs upcast once), double for float64. Distances come back in
// that dtype, exactly as the selection saw them. Inputs must be finite (checked).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
// GCC's unroll-and-jam (on at -O3) jams two dimensions of the leaf kernel and then keeps its 8 accumulators in
// memory, which halves its speed; the functions of this file (which inline the kernels) opt out.
#pragma GCC optimize("no-loop-unroll-and-jam")
#endif
#include "knn_amx.h"
#include "knn_kernels.h"
#include "knn_path.h"

namespace infofuse::cpu {

namespace {
std::atomic<KnnPath> g_knn_path{KnnPath::kAuto};
std::atomic<int64_t> g_knn_amx_problems{0};
}  // namespace

KnnPath knn_path() { return g_knn_path.load(); }
int64_t knn_amx_problems() { return g_knn_amx_problems.load(); }

namespace {

using knn::CountProblem;
using knn::index_t;
using knn::KnnProblem;
using knn::Tree;

// ---------------------------------------------------------------------------------------------------------------
// Target dispatch. The workers are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline, and
// the best one for the machine runs. Unlike row_kernels.h's target_clones, each variant is its own function: the
// FMA targets use an explicit fma and the baseline a·b + c, and the choice must be made once for the whole op (a
// distance must round the same way in knn and in knn_count).

enum class Isa { kBase, kV3, kV4, kV4Bf16 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define INFOFUSE_KNN_MULTIVERSION 1
#define INFOFUSE_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define INFOFUSE_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
constexpr bool kBaseFma = false;  // baseline x86-64 has no FMA instruction
constexpr int kBaseVecBytes = 16;
#else
constexpr bool kBaseFma = true;  // other targets with hardware FMA (aarch64)
constexpr int kBaseVecBytes = 16;
#endif

Isa machine_isa() {
#ifdef INFOFUSE_KNN_MULTIVERSION
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) {
      return __builtin_cpu_supports("avx512bf16") ? Isa::kV4Bf16 : Isa::kV4;
    }
    if (__builtin_cpu_supports("x86-64-v3")) return Isa::kV3;
    return Isa::kBase;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

// Points processed at once by the leaf kernel: 8 vectors of the target's width.
template <typename T, int kVecBytes>
constexpr int kGroup = 8 * kVecBytes / static_cast<int>(sizeof(T));

#ifdef INFOFUSE_KNN_MULTIVERSION
template <typename T, int kMetric>
INFOFUSE_TARGET_V4 void knn_worker_v4(const KnnProblem<T>& pb, std::atomic<index_t>* next) {
  knn::knn_worker_impl<T, kMetric, true, kGroup<T, 64>>(pb, next);
}
// float Euclidean with bfloat16 screening (knn_kernels.h).
INFOFUSE_KNN_BF16_TARGET void knn_worker_v4_screened(const KnnProblem<float>& pb, std::atomic<index_t>* next) {
  knn::knn_worker_impl<float, knn::kEuclidean, true, kGroup<float, 64>, true>(pb, next);
}
template <typename T, int kMetric>
INFOFUSE_TARGET_V3 void knn_worker_v3(const KnnProblem<T>& pb, std::atomic<index_t>* next) {
  knn::knn_worker_impl<T, kMetric, true, kGroup<T, 32>>(pb, next);
}
template <typename T, int kMetric>
INFOFUSE_TARGET_V4 void count_worker_v4(const CountProblem<T>& pb, std::atomic<index_t>* next) {
  knn::count_worker_impl<T, kMetric, true, kGroup<T, 64>>(pb, next);
}
template <typename T, int kMetric>
INFOFUSE_TARGET_V3 void count_worker_v3(const CountProblem<T>& pb, std::atomic<index_t>* next) {
  knn::count_worker_impl<T, kMetric, true, kGroup<T, 32>>(pb, next);
}
#endif
template <typename T, int kMetric>
void knn_worker_base(const KnnProblem<T>& pb, std::atomic<index_t>* next) {
  knn::knn_worker_impl<T, kMetric, kBaseFma, kGroup<T, kBaseVecBytes>>(pb, next);
}
template <typename T, int kMetric>
void count_worker_base(const CountProblem<T>& pb, std::atomic<index_t>* next) {
  knn::count_worker_impl<T, kMetric, kBaseFma, kGroup<T, kBaseVecBytes>>(pb, next);
}

template <typename T, int kMetric>
void knn_worker(const KnnProblem<T>& pb, std::atomic<index_t>* next) {
#ifdef INFOFUSE_KNN_MULTIVERSION
  switch (machine_isa()) {
    case Isa::kV4Bf16:
      if constexpr (std::is_same_v<T, float> && kMetric == knn::kEuclidean) {
        if (pb.screen != nullptr) return knn_worker_v4_screened(pb, next);
      }
      return knn_worker_v4<T, kMetric>(pb, next);
    case Isa::kV4:
      return knn_worker_v4<T, kMetric>(pb, next);
    case Isa::kV3:
      return knn_worker_v3<T, kMetric>(pb, next);
    default:
      break;
  }
#endif
  knn_worker_base<T, kMetric>(pb, next);
}

template <typename T, int kMetric>
void count_worker(const CountProblem<T>& pb, std::atomic<index_t>* next) {
#ifdef INFOFUSE_KNN_MULTIVERSION
  switch (machine_isa()) {
    case Isa::kV4Bf16:
    case Isa::kV4:
      return count_worker_v4<T, kMetric>(pb, next);
    case Isa::kV3:
      return count_worker_v3<T, kMetric>(pb, next);
    default:
      break;
  }
#endif
  count_worker_base<T, kMetric>(pb, next);
}

// Runs work(next) on every thread (parallel) or on this one, the threads sharing one block counter.
template <typename Work>
void run_workers(index_t n_blocks, const Work& work, bool parallel = true) {
  std::atomic<index_t> next{0};
  if (!parallel) {
    work(&next);
    return;
  }
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n_blocks);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) work(&next);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Arguments.

at::ScalarType acc_type_of(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_points(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "infofuse's cpu backend needs CPU tensors, got ", name, " on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must be 3-D (B, N, d), got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, name,
                   " must be float32, float64, bfloat16 or float16, got ", dt);
}

void check_metric(int64_t metric) {
  TORCH_CHECK_VALUE(metric == knn::kEuclidean || metric == knn::kChebyshev,
                    "metric must be 0 (Euclidean) or 1 (Chebyshev), got ", metric);
}

// t in the accumulation dtype, contiguous, checked finite (the exactness argument of knn_kernels.h needs it).
at::Tensor points_arg(const at::Tensor& t, const char* name) {
  at::Tensor c = t.to(acc_type_of(t)).contiguous();
  TORCH_CHECK_VALUE(c.numel() == 0 || at::isfinite(c).all().item<bool>(), name,
                    " must be finite: it holds NaN or infinite values");
  return c;
}

bool same_points(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.scalar_type() == b.scalar_type();
}

// ---------------------------------------------------------------------------------------------------------------
// knn

// Runs solve(b, parallel) for every batch entry: one after another, each spread over the threads, or, when one
// entry has fewer query blocks than there are threads, several entries at once, each on one thread.
template <typename Solve>
void over_batch(index_t batch, index_t blocks_per_entry, const Solve& solve) {
  if (batch > 1 && blocks_per_entry < at::get_num_threads()) {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) solve(b, /*parallel=*/false);
    });
  } else {
    for (index_t b = 0; b < batch; ++b) solve(b, /*parallel=*/true);
  }
}

#ifdef INFOFUSE_KNN_AMX
// Where "auto" takes the AMX brute force: from d = 12 on, the tree scans most leaves anyway (bench/NOTES.md), and
// below 2^20 pairs either path takes milliseconds.
constexpr index_t kAmxMinDim = 12;
constexpr index_t kAmxMinPairs = index_t(1) << 20;

// Whether the AMX brute force (knn_amx.h) runs this problem instead of the tree walk. "auto": where the tree prunes
// little and the screen's conditions hold; "amx": wherever it can run at all; "tree": never.
bool use_amx(index_t n, index_t m, index_t d, int64_t k) {
  const KnnPath path = knn_path();
  if (path == KnnPath::kTree || k > knn::amx::kMaxK || machine_isa() != Isa::kV4Bf16 || !knn::amx::available()) {
    return false;
  }
  if (path == KnnPath::kAmx) return true;
  return d >= kAmxMinDim && n * m >= kAmxMinPairs;
}

// One batch entry by the AMX brute force; false (nothing written) where the screen's norms would be unsafe.
bool knn_amx_entry(const float* x, index_t n, const float* y, index_t m, index_t d, int64_t k, bool exclude_self,
                   float* dist, int64_t* idx, bool parallel) {
  knn::amx::Packed pk;
  pk.build(x, n, y, m, d);
  if (!(pk.max_norm <= knn::kScreenMax)) return false;
  const knn::amx::Problem pb{x, y, &pk, k, exclude_self, dist, idx};
  const index_t rows = knn::amx::kBlockGroups * knn::amx::kGroupRows;
  const auto work = [&](std::atomic<index_t>* next) { knn::amx::worker(pb, next); };
  run_workers((n + rows - 1) / rows, work, parallel);
  g_knn_amx_problems.fetch_add(1);
  return true;
}
#endif

template <typename T, int kMetric>
void knn_impl(const at::Tensor& xa, const at::Tensor& ya, bool same, int64_t k, bool exclude_self, T* dist,
              int64_t* idx) {
  const index_t batch = xa.size(0), n = xa.size(1), m = ya.size(1), d = xa.size(2);
  const T* xp = xa.data_ptr<T>();
  const T* yp = ya.data_ptr<T>();
#ifdef INFOFUSE_KNN_AMX
  if constexpr (std::is_same_v<T, float> && kMetric == knn::kEuclidean) {
    if (use_amx(n, m, d, k)) {
      std::atomic<bool> all{true};
      const index_t rows = knn::amx::kBlockGroups * knn::amx::kGroupRows;
      over_batch(batch, (n + rows - 1) / rows, [&](index_t b, bool parallel) {
        if (!knn_amx_entry(xp + b * n * d, n, yp + b * m * d, m, d, k, exclude_self, dist + b * n * k, idx + b * n * k,
                           parallel)) {
          all = false;
        }
      });
      if (all) return;  // else an entry's norms were out of the screen's range: the tree walk does them all
    }
  }
#endif
  constexpr index_t leaf = knn::kLeafSize<T>;
  bool screened = false;
#ifdef INFOFUSE_KNN_MULTIVERSION
  if constexpr (std::is_same_v<T, float> && kMetric == knn::kEuclidean) screened = machine_isa() == Isa::kV4Bf16;
#endif
  over_batch(batch, (n + leaf - 1) / leaf, [&](index_t b, bool parallel) {
    const T* xb = xp + b * n * d;
    Tree<T> ctree, qtree;
    knn::ScreenLeaves screen;
    ctree.build(yp + b * m * d, m, d, leaf, /*with_tiles=*/true);
    if (!same) qtree.build(xb, n, d, leaf, /*with_tiles=*/false);
    if constexpr (std::is_same_v<T, float>) {
      if (screened) screen.build(ctree);
    }
    const KnnProblem<T> pb{xb,           same ? &ctree : &qtree,       &ctree,           k,
                           exclude_self, screened ? &screen : nullptr, dist + b * n * k, idx + b * n * k};
    const auto work = [&](std::atomic<index_t>* next) { knn_worker<T, kMetric>(pb, next); };
    run_workers(pb.qtree->n_leaves, work, parallel);
  });
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& x, const at::Tensor& y, int64_t k, int64_t metric,
                                           bool exclude_self) {
  check_points(x, "x");
  check_points(y, "y");
  TORCH_CHECK_TYPE(x.scalar_type() == y.scalar_type(), "x and y must share a dtype, got ", x.scalar_type(), " and ",
                   y.scalar_type());
  TORCH_CHECK_VALUE(y.size(0) == x.size(0) && y.size(2) == x.size(2), "y must be (B, M, d) with B = ", x.size(0),
                    " and d = ", x.size(2), " as in x, got shape ", y.sizes());
  check_metric(metric);
  const int64_t batch = x.size(0), n = x.size(1), m = y.size(1);
  if (exclude_self) {
    TORCH_CHECK_VALUE(m == n, "exclude_self needs y = x (M == N), got N = ", n, ", M = ", m);
  }
  const int64_t max_k = exclude_self ? m - 1 : m;
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(n == 0 || batch == 0 || k <= max_k, "k must be <= ", exclude_self ? "M - 1 = " : "M = ", max_k,
                    exclude_self ? " (exclude_self)" : "", ", got k = ", k);
  const at::ScalarType acc = acc_type_of(x);
  at::Tensor dist = at::empty({batch, n, k}, x.options().dtype(acc));
  at::Tensor idx = at::empty({batch, n, k}, x.options().dtype(at::kLong));
  if (batch == 0 || n == 0) return {dist, idx};
  const bool same = same_points(x, y);
  const at::Tensor xa = points_arg(x, "x");
  const at::Tensor ya = same ? xa : points_arg(y, "y");
  AT_DISPATCH_FLOATING_TYPES(acc, "infofuse_knn_cpu", [&] {
    if (metric == knn::kEuclidean) {
      knn_impl<scalar_t, knn::kEuclidean>(xa, ya, same, k, exclude_self, dist.data_ptr<scalar_t>(),
                                          idx.data_ptr<int64_t>());
    } else {
      knn_impl<scalar_t, knn::kChebyshev>(xa, ya, same, k, exclude_self, dist.data_ptr<scalar_t>(),
                                          idx.data_ptr<int64_t>());
    }
  });
  return {dist, idx};
}

// ---------------------------------------------------------------------------------------------------------------
// knn_count

template <typename T, int kMetric>
void count_impl(const at::Tensor& xa, const at::Tensor& ra, bool strict, int64_t* out) {
  const index_t batch = xa.size(0), n = xa.size(1), d = xa.size(2);
  const T* xp = xa.data_ptr<T>();
  const T* rp = ra.data_ptr<T>();
  constexpr index_t leaf = knn::kLeafSize<T>;
  over_batch(batch, d == 1 ? (n + 2047) / 2048 : (n + leaf - 1) / leaf, [&](index_t b, bool parallel) {
    const T* xb = xp + b * n * d;
    std::vector<T> S(n);
    for (index_t i = 0; i < n; ++i) S[i] = knn::s_threshold<kMetric>(rp[b * n + i], strict);
    index_t* ob = out + b * n;
    if (d == 1) {
      std::vector<T> sorted(xb, xb + n);
      std::sort(sorted.begin(), sorted.end());
      // One fma of a difference with itself plus 0 is that difference squared, rounded once: the same s on every
      // target, so the baseline instantiation serves all.
      const auto work = [&](int64_t begin, int64_t end) {
        knn::count_sorted_1d<T, kMetric, false>(sorted.data(), n, xb, S.data(), ob, begin, end);
      };
      if (parallel) {
        at::parallel_for(0, n, 2048, work);
      } else {
        work(0, n);
      }
      return;
    }
    Tree<T> tree;
    tree.build(xb, n, d, leaf, /*with_tiles=*/true);
    const CountProblem<T> pb{xb, &tree, S.data(), ob};
    const auto work = [&](std::atomic<index_t>* next) { count_worker<T, kMetric>(pb, next); };
    run_workers(tree.n_leaves, work, parallel);
  });
}

at::Tensor knn_count_cpu(const at::Tensor& x, const at::Tensor& radius, int64_t metric, bool strict) {
  check_points(x, "x");
  check_metric(metric);
  const at::ScalarType acc = acc_type_of(x);
  TORCH_CHECK_VALUE(radius.device().is_cpu(), "infofuse's cpu backend needs CPU tensors, got radius on ",
                    radius.device());
  TORCH_CHECK_VALUE(radius.dim() == 2 && radius.size(0) == x.size(0) && radius.size(1) == x.size(1),
                    "radius must be (B, N) = (", x.size(0), ", ", x.size(1), "), got shape ", radius.sizes());
  TORCH_CHECK_TYPE(radius.scalar_type() == acc, "radius must be ", acc, " (the accumulation dtype of x, ",
                   x.scalar_type(), "), got ", radius.scalar_type());
  at::Tensor counts = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kLong));
  if (counts.numel() == 0) return counts;
  const at::Tensor xa = points_arg(x, "x");
  const at::Tensor ra = radius.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "infofuse_knn_count_cpu", [&] {
    if (metric == knn::kEuclidean) {
      count_impl<scalar_t, knn::kEuclidean>(xa, ra, strict, counts.data_ptr<int64_t>());
    } else {
      count_impl<scalar_t, knn::kChebyshev>(xa, ra, strict, counts.data_ptr<int64_t>());
    }
  });
  return counts;
}

}  // namespace

void set_knn_path(const std::string& name) {
  TORCH_CHECK_VALUE(name == "auto" || name == "tree" || name == "amx",
                    "knn path must be 'auto', 'tree' or 'amx', got '", name, "'");
  g_knn_path.store(name == "auto" ? KnnPath::kAuto : name == "tree" ? KnnPath::kTree : KnnPath::kAmx);
}

std::string knn_amx_status() {
#ifdef INFOFUSE_KNN_AMX
  if (machine_isa() == Isa::kV4Bf16 && knn::amx::available()) return "available";
  return "no AMX-BF16 on this CPU (or the kernel refused the tile data)";
#else
  return "not compiled (needs GCC >= 11 on x86-64)";
#endif
}

TORCH_LIBRARY_IMPL(infofuse, CPU, m) {
  m.impl("knn", &knn_cpu);
  m.impl("knn_count", &knn_count_cpu);
}

}  // namespace infofuse::cpu
