// Inner loops of the CPU k-NN ops (knn.cpp): a k-d tree over the candidate points, the distance kernel over one
// leaf, the bounds that prune the tree walk, the bounded sorted top-k, and the walks for knn and knn_count.
//
// Plain C++ on float/double arrays, free of torch headers. Exactness rests on two rules, kept everywhere here:
//   1. Every distance is computed by one op sequence, in the accumulation dtype: diff_t = y_t − x_t, then
//      s = fma(diff_t, diff_t, s) (Euclidean; the distance is sqrt(s)) or s = max(s, |diff_t|) (Chebyshev), over
//      t = 0, 1, …, d − 1. The fma is explicit (never left to contraction), so that the leaf kernel, the 1-D path
//      and knn_count give bit-identical values for the same pair: a radius returned by knn counts its own
//      neighbour in knn_count. Targets without FMA (the baseline x86-64 build) use a·b + c throughout instead.
//   2. Tree bounds are computed by the same sequence on per-dimension gaps (lower bound) or extents (upper
//      bound) of a bounding box. Rounding is monotone, so a bound is ≤ (≥) the computed s of every point in the
//      box, and pruning never drops a pair that the brute force would keep.
// Comparisons are made in "s units" (the squared sum for Euclidean): a distance threshold D becomes the largest
// s with fl(sqrt(s)) <= D (sq_threshold), so the selection is exactly that of the returned distances, with ties
// going to the smaller index.
//
// The inputs must be finite (knn.cpp checks): then no distance is NaN and the order (distance, index) is total.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#define INFOFUSE_KNN_INLINE inline __attribute__((always_inline))

namespace infofuse::cpu::knn {

using index_t = int64_t;

enum Metric : int { kEuclidean = 0, kChebyshev = 1 };

// Points per leaf of the trees: 128 float / 64 double (8 vectors of 512 bits; the bfloat16 screening kernel covers
// a float leaf with 8 vectors). Query blocks are the leaves of the query tree. On the 2-core Zen 4 VM (float32,
// N = 100000, d = 16, k = 3, exact kernel only) 256-point leaves took the same time (2.64 s vs 2.60 s): smaller
// leaves prune more (68 % vs 74 % of the points scanned) but pay more bounds per point.
template <typename T>
constexpr index_t kLeafSize = 512 / sizeof(T);

// Dimensions accumulated between two "can any lane still qualify?" checks in the leaf kernel (partial-distance
// early exit: s only grows with t).
constexpr index_t kDimChunk = 8;

template <bool kFma, typename T>
static INFOFUSE_KNN_INLINE T madd(T a, T b, T c) {
  if constexpr (kFma) {
    if constexpr (std::is_same_v<T, float>) {
      return __builtin_fmaf(a, b, c);
    } else {
      return __builtin_fma(a, b, c);
    }
  } else {
    return a * b + c;
  }
}

// One step of the distance accumulation (rule 1 above).
template <int kMetric, bool kFma, typename T>
static INFOFUSE_KNN_INLINE T step(T acc, T diff) {
  if constexpr (kMetric == kEuclidean) {
    return madd<kFma>(diff, diff, acc);
  } else {
    const T a = diff < T(0) ? -diff : diff;
    return a > acc ? a : acc;
  }
}

// The returned distance of a pair whose accumulated value is s.
template <int kMetric, typename T>
static INFOFUSE_KNN_INLINE T distance_of(T s) {
  if constexpr (kMetric == kEuclidean) {
    return std::sqrt(s);
  } else {
    return s;
  }
}

// The neighbour of a float s >= 0 (not +inf) above (up) or below it (s > 0): +-1 on the bits.
template <typename T>
static INFOFUSE_KNN_INLINE T next_float(T s, bool up) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U bits;
  std::memcpy(&bits, &s, sizeof(bits));
  bits = up ? bits + 1 : bits - 1;
  std::memcpy(&s, &bits, sizeof(bits));
  return s;
}

// The largest s with fl(sqrt(s)) <= dist (sqrt is correctly rounded and monotone, so fl(sqrt(s)) <= dist exactly
// when s <= the result); -1 when no s >= 0 qualifies, NaN for a NaN dist.
template <typename T>
static T sq_threshold(T dist) {
  const T inf = std::numeric_limits<T>::infinity();
  if (std::isnan(dist)) return dist;
  if (dist < T(0)) return T(-1);
  if (dist == inf) return inf;
  T s = dist * dist;  // within an ulp or two of the answer (inf if it overflows)
  while (s > T(0) && std::sqrt(s) > dist) s = next_float(s, false);
  for (;;) {
    const T up = next_float(s, true);
    if (up == inf || std::sqrt(up) > dist) break;
    s = up;
  }
  return s;
}

// The threshold S, in s units, for "distance <= dist" (strict = false) or "distance < dist" (strict = true):
// a pair qualifies exactly when s <= S.
template <int kMetric, typename T>
static T s_threshold(T dist, bool strict) {
  if (strict) {
    if (!(dist > T(0))) return std::isnan(dist) ? dist : T(-1);
    dist = std::nextafter(dist, -std::numeric_limits<T>::infinity());
  }
  if constexpr (kMetric == kEuclidean) {
    return sq_threshold(dist);
  } else {
    return dist;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// k-d tree. Leaves hold exactly `leaf` points (the last one the remainder), in the order of `perm`; node b
// covers leaves [leaf_begin, leaf_end) and carries the tight bounding box of its points. Splits are at a leaf
// boundary near the median of the widest dimension of the box. With tiles, leaf l's coordinates are also stored
// dimension-major (d rows of `leaf` values, +inf past the last point), the layout the leaf kernel streams.

struct Node {
  index_t leaf_begin, leaf_end;
  index_t left, right;  // -1 for a leaf
};

template <typename T>
struct Tree {
  index_t n = 0, d = 0, leaf = 0, n_leaves = 0;
  std::vector<index_t> perm;       // position -> row of the input
  std::vector<Node> nodes;         // nodes[0] is the root
  std::vector<T> box;              // node b: lo at box[2·b·d], hi at box[(2·b + 1)·d]
  std::vector<index_t> leaf_node;  // leaf l -> its node
  std::vector<T> tiles;            // leaf l: tiles[(l·d + t)·leaf + p], p < leaf

  const T* lo(index_t b) const { return box.data() + 2 * b * d; }
  const T* hi(index_t b) const { return box.data() + (2 * b + 1) * d; }
  index_t count(index_t b) const { return std::min(n, nodes[b].leaf_end * leaf) - nodes[b].leaf_begin * leaf; }
  const T* leaf_tiles(index_t l) const { return tiles.data() + l * d * leaf; }

  // data: n rows of d values (row stride d).
  void build(const T* data, index_t n_, index_t d_, index_t leaf_, bool with_tiles) {
    n = n_;
    d = d_;
    leaf = leaf_;
    n_leaves = (n + leaf - 1) / leaf;
    perm.resize(n);
    for (index_t i = 0; i < n; ++i) perm[i] = i;
    nodes.clear();
    box.clear();
    leaf_node.assign(n_leaves, -1);
    if (n > 0) {
      nodes.reserve(2 * n_leaves);
      box.reserve(4 * n_leaves * d);
      build_node(data, 0, n_leaves);
    }
    if (with_tiles) {
      tiles.resize(n_leaves * d * leaf);
      const T inf = std::numeric_limits<T>::infinity();
      for (index_t l = 0; l < n_leaves; ++l) {
        T* out = tiles.data() + l * d * leaf;
        for (index_t p = 0; p < leaf; ++p) {
          const index_t pos = l * leaf + p;
          const T* row = pos < n ? data + perm[pos] * d : nullptr;
          for (index_t t = 0; t < d; ++t) out[t * leaf + p] = row != nullptr ? row[t] : inf;
        }
      }
    }
  }

 private:
  index_t build_node(const T* data, index_t lb, index_t le) {
    const index_t b = static_cast<index_t>(nodes.size());
    nodes.push_back(Node{lb, le, -1, -1});
    box.resize(box.size() + 2 * d);
    T* lo_ = box.data() + 2 * b * d;
    T* hi_ = lo_ + d;
    const index_t p0 = lb * leaf, p1 = std::min(n, le * leaf);
    for (index_t t = 0; t < d; ++t) {
      lo_[t] = std::numeric_limits<T>::infinity();
      hi_[t] = -std::numeric_limits<T>::infinity();
    }
    for (index_t p = p0; p < p1; ++p) {
      const T* row = data + perm[p] * d;
      for (index_t t = 0; t < d; ++t) {
        lo_[t] = std::min(lo_[t], row[t]);
        hi_[t] = std::max(hi_[t], row[t]);
      }
    }
    if (le - lb == 1) {
      leaf_node[lb] = b;
      return b;
    }
    index_t dim = 0;
    T widest = -1;
    for (index_t t = 0; t < d; ++t) {
      if (hi_[t] - lo_[t] > widest) {
        widest = hi_[t] - lo_[t];
        dim = t;
      }
    }
    const index_t lm = lb + (le - lb) / 2;
    index_t* first = perm.data();
    if (d > 0) {
      std::nth_element(first + p0, first + lm * leaf, first + p1,
                       [data, dim, d = d](index_t a, index_t c) { return data[a * d + dim] < data[c * d + dim]; });
    }
    const index_t left = build_node(data, lb, lm);  // may move `box` and `nodes`: no references kept
    const index_t right = build_node(data, lm, le);
    nodes[b].left = left;
    nodes[b].right = right;
    return b;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Bounds, in s units, between a query box [qlo, qhi] (a point: qlo == qhi) and a node box [lo, hi].

// <= s(x, y) for every x in the query box and y in the node box.
template <int kMetric, bool kFma, typename T>
static INFOFUSE_KNN_INLINE T lower_bound_s(const T* qlo, const T* qhi, const T* lo, const T* hi, index_t d) {
  T s = 0;
  for (index_t t = 0; t < d; ++t) {
    const T below = lo[t] - qhi[t];  // > 0: the node lies above the query box in dimension t
    const T above = qlo[t] - hi[t];
    T gap = below > above ? below : above;
    gap = gap > T(0) ? gap : T(0);
    s = step<kMetric, kFma>(s, gap);
  }
  return s;
}

// >= s(x, y) for every x in the query box and y in the node box.
template <int kMetric, bool kFma, typename T>
static INFOFUSE_KNN_INLINE T upper_bound_s(const T* qlo, const T* qhi, const T* lo, const T* hi, index_t d) {
  T s = 0;
  for (index_t t = 0; t < d; ++t) {
    const T up = hi[t] - qlo[t];
    const T down = qhi[t] - lo[t];
    s = step<kMetric, kFma>(s, up > down ? up : down);
  }
  return s;
}

// The same bounds for every query of a block against one node box, vectorised over the queries: qt holds the
// block's queries dimension-major (d rows of kBlock values; columns past the block's size are ignored). ub is
// written only with kUpper.
template <int kMetric, bool kFma, index_t kBlock, bool kUpper, typename T>
static INFOFUSE_KNN_INLINE void block_bounds(const T* __restrict qt, const T* lo, const T* hi, index_t d,
                                             T* __restrict lb, T* __restrict ub) {
  for (index_t r = 0; r < kBlock; ++r) lb[r] = T(0);
  if constexpr (kUpper) {
    for (index_t r = 0; r < kBlock; ++r) ub[r] = T(0);
  }
  for (index_t t = 0; t < d; ++t) {
    const T lo_t = lo[t], hi_t = hi[t];
    const T* __restrict q = qt + t * kBlock;
#pragma omp simd
    for (index_t r = 0; r < kBlock; ++r) {
      const T below = lo_t - q[r];
      const T above = q[r] - hi_t;
      T gap = below > above ? below : above;
      gap = gap > T(0) ? gap : T(0);
      lb[r] = step<kMetric, kFma>(lb[r], gap);
    }
    if constexpr (kUpper) {
#pragma omp simd
      for (index_t r = 0; r < kBlock; ++r) {
        const T up = hi_t - q[r];
        const T down = q[r] - lo_t;
        ub[r] = step<kMetric, kFma>(ub[r], up > down ? up : down);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The leaf kernel: s for one query against kGroup consecutive points of a leaf (dimension-major rows of
// kLeafSize values), dimensions in chunks of kDimChunk. kGroup is 8 vectors of the target's width, so that the
// accumulators stay in registers.

// acc[p] for dimensions [t0, t1); t0 == 0 starts the sums (no separate zeroing pass).
template <int kMetric, bool kFma, int kGroup, typename T>
static INFOFUSE_KNN_INLINE void accumulate(T* __restrict acc, const T* __restrict y, const T* __restrict q, index_t t0,
                                           index_t t1) {
  constexpr index_t stride = kLeafSize<T>;
  index_t t = t0;
  if (t == 0) {
    const T qt = q[0];
#pragma omp simd
    for (int p = 0; p < kGroup; ++p) acc[p] = step<kMetric, kFma>(T(0), y[p] - qt);
    ++t;
  }
  for (; t < t1; ++t) {
    const T qt = q[t];
    const T* __restrict yt = y + t * stride;
#pragma omp simd
    for (int p = 0; p < kGroup; ++p) acc[p] = step<kMetric, kFma>(acc[p], yt[p] - qt);
  }
}

template <int kGroup, typename T>
static INFOFUSE_KNN_INLINE T lowest_of(const T* __restrict acc) {
  T lowest = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : lowest)
  for (int p = 0; p < kGroup; ++p) lowest = acc[p] < lowest ? acc[p] : lowest;
  return lowest;
}

// Writes s for the kGroup points, and pass[p] = (s[p] <= S), and returns true; or returns false as soon as every
// point's partial s exceeds S (the final s can only be larger; s and pass are then left unwritten).
template <int kMetric, bool kFma, int kGroup, typename T>
static INFOFUSE_KNN_INLINE bool scan_group(const T* __restrict y, index_t d, const T* __restrict q, T S,
                                           T* __restrict s, uint8_t* __restrict pass) {
  T acc[kGroup];
  if (d == 0) {
    for (int p = 0; p < kGroup; ++p) acc[p] = T(0);
  }
  for (index_t t0 = 0; t0 < d; t0 += kDimChunk) {
    accumulate<kMetric, kFma, kGroup>(acc, y, q, t0, std::min(d, t0 + kDimChunk));
    if (lowest_of<kGroup>(acc) > S) return false;
  }
#pragma omp simd
  for (int p = 0; p < kGroup; ++p) {
    s[p] = acc[p];
    pass[p] = acc[p] <= S ? 1 : 0;
  }
  return true;
}

// Calls f(p) for every p < n (a multiple of 8) with pass[p] != 0, skipping eight clear flags at a time.
template <typename F>
static INFOFUSE_KNN_INLINE void for_each_flag(const uint8_t* pass, index_t n, F&& f) {
  for (index_t w = 0; w < n; w += 8) {
    uint64_t bits;
    std::memcpy(&bits, pass + w, sizeof(bits));
    while (bits != 0) {
      const int byte = __builtin_ctzll(bits) / 8;
      bits &= ~(uint64_t(0xFF) << (8 * byte));
      f(w + byte);
    }
  }
}

// How many of the kGroup points have s <= S, padding included (padding has s = +inf: the caller corrects for
// S = +inf).
template <int kMetric, bool kFma, int kGroup, typename T>
static INFOFUSE_KNN_INLINE index_t count_group(const T* __restrict y, index_t d, const T* __restrict q, T S) {
  if (d == 0) return T(0) <= S ? kGroup : 0;
  T acc[kGroup];
  for (index_t t0 = 0; t0 < d; t0 += kDimChunk) {
    accumulate<kMetric, kFma, kGroup>(acc, y, q, t0, std::min(d, t0 + kDimChunk));
    if (t0 + kDimChunk < d && lowest_of<kGroup>(acc) > S) return 0;
  }
  int c = 0;
#pragma omp simd reduction(+ : c)
  for (int p = 0; p < kGroup; ++p) c += acc[p] <= S ? 1 : 0;
  return c;
}

// ---------------------------------------------------------------------------------------------------------------
// bfloat16 screening (float32 Euclidean, on CPUs with AVX512-BF16; knn only).
//
// The exact kernel costs d FMAs per pair, and the FMA units are its bottleneck. On CPUs with AVX512-BF16 the
// float32 Euclidean walk first screens a leaf with bfloat16 dot products (vdpbf16ps: two dimensions per
// instruction) and computes exact distances only for the points that pass. With c the leaf's centre, u = fl(y − c)
// and v = fl(q − c) in float, n_y = ‖u‖², n_q = ‖v‖² (float, fma chains) and û, v̂ u and −2v rounded to bfloat16,
//     a = n_y + n_q + Σ_t û_t·v̂_t   (float accumulation)
// differs from the exact kernel's s for the pair by at most α·(n_y + n_q): the bfloat16 roundings contribute
// ≤ (2^-7 + 2^-16)·(‖u‖² + ‖v‖²), the float roundings of u, v, the norms, the dot and of s itself ≤ (4d + 20)·2^-24
// times the same, and α below is twice that sum. Flush-to-zero of tiny values adds at most d·2^-124 in absolute
// terms, covered by raising the threshold by a factor (1 + 2^-20) and screening only where S >= 2^-60. So
//     (1 − α)·n_y + (1 − α)·n_q + Σ_t û_t·v̂_t <= S·(1 + 2^-20)
// holds for every pair with s <= S: points that fail it are out; the others get their exact s. Screening is used
// per (query, leaf) only where its margin is small against the query's threshold (kScreenRatio), so that few
// points pass it needlessly, and only while the values stay far from overflow (n_y, n_q <= 2^100).

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define INFOFUSE_KNN_BF16 1
#define INFOFUSE_KNN_BF16_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16")))
#endif

constexpr float kScreenRatio = 0.25f;  // screen only where α·(n_y + n_q) <= kScreenRatio·S
constexpr int kRecheckLanes = 4;       // more points passing than this: rescan the leaf with the exact kernel
constexpr float kScreenMin = 0x1p-60f;
constexpr float kScreenMax = 0x1p100f;

inline float screen_alpha(index_t d) { return 0x1p-6f + static_cast<float>(8 * d + 64) * 0x1p-24f; }

// float -> bfloat16 bits, rounding to nearest even (finite inputs).
static INFOFUSE_KNN_INLINE uint32_t bf16_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}

// The screening data of a candidate tree (float, with tiles): per leaf its centre, (1 − α)·n_y per point (+inf for
// padding), and û in pairs of dimensions (dimension 2·tp in the low half of a 32-bit word, 2·tp + 1 in the high
// half, 0 past d), tp-major like the tiles; reach[l] = max n_y over the leaf, or +inf where screening is unfit.
struct ScreenLeaves {
  index_t d = 0, dp = 0;
  float alpha = 0;
  std::vector<float> center, ny, reach;
  std::vector<uint32_t> pairs;

  void build(const Tree<float>& tr) {
    constexpr index_t L = kLeafSize<float>;
    d = tr.d;
    dp = (d + 1) / 2;
    alpha = screen_alpha(d);
    center.assign(tr.n_leaves * d, 0.0f);
    ny.assign(tr.n_leaves * L, std::numeric_limits<float>::infinity());
    reach.assign(tr.n_leaves, 0.0f);
    pairs.assign(tr.n_leaves * dp * L, 0u);
    std::vector<float> u(d);
    for (index_t l = 0; l < tr.n_leaves; ++l) {
      const index_t b = tr.leaf_node[l];
      float* c = center.data() + l * d;
      for (index_t t = 0; t < d; ++t) c[t] = 0.5f * tr.lo(b)[t] + 0.5f * tr.hi(b)[t];
      const float* tiles = tr.leaf_tiles(l);
      const index_t valid = std::min(L, tr.n - l * L);
      float most = 0.0f;
      for (index_t p = 0; p < valid; ++p) {
        float n = 0.0f;
        for (index_t t = 0; t < d; ++t) {
          u[t] = tiles[t * L + p] - c[t];
          n = std::fma(u[t], u[t], n);
        }
        most = std::max(most, n);
        ny[l * L + p] = (1.0f - alpha) * n;
        for (index_t tp = 0; tp < dp; ++tp) {
          const uint32_t lo = bf16_bits(u[2 * tp]);
          const uint32_t hi = 2 * tp + 1 < d ? bf16_bits(u[2 * tp + 1]) : 0u;
          pairs[(l * dp + tp) * L + p] = lo | (hi << 16);
        }
      }
      reach[l] = most <= kScreenMax ? most : std::numeric_limits<float>::infinity();
    }
  }
};

#ifdef INFOFUSE_KNN_BF16
// For every query of a block (qt dimension-major, kBlock columns) against leaf l: v̂ pairs (dp rows of kBlock),
// nq1 = (1 − α)·n_q and nq = n_q.
template <index_t kBlock>
INFOFUSE_KNN_BF16_TARGET static inline void screen_queries(const ScreenLeaves& sl, index_t l,
                                                           const float* __restrict qt, uint32_t* __restrict qpairs,
                                                           float* __restrict nq1, float* __restrict nq) {
  const index_t d = sl.d;
  const float* c = sl.center.data() + l * d;
  for (index_t r = 0; r < kBlock; ++r) nq[r] = 0.0f;
  for (index_t tp = 0; tp < sl.dp; ++tp) {
    const index_t t0 = 2 * tp, t1 = 2 * tp + 1;
    const float c0 = c[t0], c1 = t1 < d ? c[t1] : 0.0f;
    const float* __restrict q0 = qt + t0 * kBlock;
    const float* __restrict q1 = qt + (t1 < d ? t1 : t0) * kBlock;
    const bool odd = t1 >= d;
#pragma omp simd
    for (index_t r = 0; r < kBlock; ++r) {
      const float v0 = q0[r] - c0;
      const float v1 = odd ? 0.0f : q1[r] - c1;
      float n = __builtin_fmaf(v0, v0, nq[r]);
      n = odd ? n : __builtin_fmaf(v1, v1, n);
      nq[r] = n;
      qpairs[tp * kBlock + r] = bf16_bits(-2.0f * v0) | (bf16_bits(-2.0f * v1) << 16);
    }
  }
  for (index_t r = 0; r < kBlock; ++r) nq1[r] = (1.0f - sl.alpha) * nq[r];
}

// The screened values of one query against the 128 points of leaf l; returns the 128-bit pass mask in masks[8].
INFOFUSE_KNN_BF16_TARGET static inline bool screen_leaf(const ScreenLeaves& sl, index_t l, const uint32_t* qpair,
                                                        index_t qstride, float nq1, float thr, uint16_t* masks) {
  constexpr index_t L = kLeafSize<float>;
  static_assert(L == 128, "the screening kernel covers a leaf with 8 vectors of 16 floats");
  const float* ny = sl.ny.data() + l * L;
  const uint32_t* pairs = sl.pairs.data() + l * sl.dp * L;
  const __m512 base = _mm512_set1_ps(nq1);
  __m512 a0 = _mm512_add_ps(_mm512_loadu_ps(ny), base), a1 = _mm512_add_ps(_mm512_loadu_ps(ny + 16), base);
  __m512 a2 = _mm512_add_ps(_mm512_loadu_ps(ny + 32), base), a3 = _mm512_add_ps(_mm512_loadu_ps(ny + 48), base);
  __m512 a4 = _mm512_add_ps(_mm512_loadu_ps(ny + 64), base), a5 = _mm512_add_ps(_mm512_loadu_ps(ny + 80), base);
  __m512 a6 = _mm512_add_ps(_mm512_loadu_ps(ny + 96), base), a7 = _mm512_add_ps(_mm512_loadu_ps(ny + 112), base);
  for (index_t tp = 0; tp < sl.dp; ++tp) {
    const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(qpair[tp * qstride]));
    const uint32_t* row = pairs + tp * L;
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(row), qv);
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(row + 16), qv);
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(row + 32), qv);
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(row + 48), qv);
    a4 = _mm512_dpbf16_ps(a4, (__m512bh)_mm512_loadu_si512(row + 64), qv);
    a5 = _mm512_dpbf16_ps(a5, (__m512bh)_mm512_loadu_si512(row + 80), qv);
    a6 = _mm512_dpbf16_ps(a6, (__m512bh)_mm512_loadu_si512(row + 96), qv);
    a7 = _mm512_dpbf16_ps(a7, (__m512bh)_mm512_loadu_si512(row + 112), qv);
  }
  const __m512 tv = _mm512_set1_ps(thr);
  masks[0] = _mm512_cmp_ps_mask(a0, tv, _CMP_LE_OQ);
  masks[1] = _mm512_cmp_ps_mask(a1, tv, _CMP_LE_OQ);
  masks[2] = _mm512_cmp_ps_mask(a2, tv, _CMP_LE_OQ);
  masks[3] = _mm512_cmp_ps_mask(a3, tv, _CMP_LE_OQ);
  masks[4] = _mm512_cmp_ps_mask(a4, tv, _CMP_LE_OQ);
  masks[5] = _mm512_cmp_ps_mask(a5, tv, _CMP_LE_OQ);
  masks[6] = _mm512_cmp_ps_mask(a6, tv, _CMP_LE_OQ);
  masks[7] = _mm512_cmp_ps_mask(a7, tv, _CMP_LE_OQ);
  return (masks[0] | masks[1] | masks[2] | masks[3] | masks[4] | masks[5] | masks[6] | masks[7]) != 0;
}
#endif

// The exact s of one point (position p of a leaf's tiles) and a query: the kernel's sequence, one lane.
template <int kMetric, bool kFma, typename T>
static INFOFUSE_KNN_INLINE T point_s(const T* tiles, index_t p, index_t d, const T* q) {
  constexpr index_t L = kLeafSize<T>;
  T s = 0;
  for (index_t t = 0; t < d; ++t) s = step<kMetric, kFma>(s, tiles[t * L + p] - q[t]);
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// A bounded top-k of (distance, index) pairs, ordered by distance then index. Up to kSortedMax entries it is kept
// sorted (insertion by shifting: short, and inserts are rare once the list is full); above, it is a max-heap with
// the worst entry at the root (O(log k) per insert), sorted by finish().
constexpr index_t kSortedMax = 32;

template <typename T>
static INFOFUSE_KNN_INLINE bool pair_less(T da, index_t ia, T db, index_t ib) {
  return da < db || (da == db && ia < ib);
}

template <typename T>
struct TopK {
  T* dist;
  index_t* idx;
  index_t k;
  index_t filled;

  INFOFUSE_KNN_INLINE bool heap() const { return k > kSortedMax; }
  INFOFUSE_KNN_INLINE index_t worst() const { return heap() ? 0 : k - 1; }
  // The k-th distance so far (valid once the list is full).
  INFOFUSE_KNN_INLINE T worst_dist() const { return dist[worst()]; }

  // Whether (D, j) belongs in the list.
  INFOFUSE_KNN_INLINE bool admits(T D, index_t j) const {
    return filled < k || pair_less(D, j, dist[worst()], idx[worst()]);
  }

  // Adds (D, j), dropping the worst entry if the list is full; call only when admits(D, j).
  void insert(T D, index_t j) {
    if (!heap()) {
      index_t p = filled < k ? filled++ : k - 1;
      while (p > 0 && pair_less(D, j, dist[p - 1], idx[p - 1])) {
        dist[p] = dist[p - 1];
        idx[p] = idx[p - 1];
        --p;
      }
      dist[p] = D;
      idx[p] = j;
    } else if (filled < k) {  // sift up
      index_t p = filled++;
      while (p > 0 && pair_less(dist[(p - 1) / 2], idx[(p - 1) / 2], D, j)) {
        dist[p] = dist[(p - 1) / 2];
        idx[p] = idx[(p - 1) / 2];
        p = (p - 1) / 2;
      }
      dist[p] = D;
      idx[p] = j;
    } else {  // replace the root, sift down
      index_t p = 0;
      for (;;) {
        index_t c = 2 * p + 1;
        if (c >= k) break;
        if (c + 1 < k && pair_less(dist[c], idx[c], dist[c + 1], idx[c + 1])) ++c;
        if (!pair_less(D, j, dist[c], idx[c])) break;
        dist[p] = dist[c];
        idx[p] = idx[c];
        p = c;
      }
      dist[p] = D;
      idx[p] = j;
    }
  }

  // Sorts a heap's entries ascending (a sorted list is left as it is).
  void finish(std::vector<std::pair<T, index_t>>& buffer) const {
    if (!heap()) return;
    buffer.resize(filled);
    for (index_t e = 0; e < filled; ++e) buffer[e] = {dist[e], idx[e]};
    std::sort(buffer.begin(), buffer.end());
    for (index_t e = 0; e < filled; ++e) {
      dist[e] = buffer[e].first;
      idx[e] = buffer[e].second;
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The problems, and each thread's scratch.

template <typename T>
struct KnnProblem {
  const T* x;            // queries, n rows of d (contiguous)
  const Tree<T>* qtree;  // over x (leaves are the query blocks)
  const Tree<T>* ctree;  // over the candidates, with tiles
  index_t k;
  bool exclude_self;
  const ScreenLeaves* screen;  // float Euclidean with AVX512-BF16: the candidates' screening data; else null
  T* out_dist;                 // n rows of k, in x's row order
  index_t* out_idx;
};

template <typename T>
struct CountProblem {
  const T* x;           // n rows of d (contiguous)
  const Tree<T>* tree;  // over x, with tiles; its leaves are also the query blocks
  const T* S;           // per row of x: the threshold in s units
  index_t* out;         // per row of x
};

template <typename T>
struct Scratch {
  std::vector<T> q, qt, lb, ub, dist, S, s;
  std::vector<uint8_t> pass;
  std::vector<index_t> idx, filled, self;
  std::vector<std::pair<index_t, T>> stack;
  std::vector<std::pair<T, index_t>> sort_buffer;
  std::vector<uint32_t> qpairs;  // screening: v̂ pairs of the block's queries, and their (1 − α)·n_q, n_q
  std::vector<float> nq1, nq;

  void reserve(index_t block, index_t d, index_t k, index_t leaf) {
    q.resize(block * d);
    qt.resize(block * d);
    lb.resize(block);
    ub.resize(block);
    dist.resize(block * k);
    idx.resize(block * k);
    S.resize(block);
    filled.resize(block);
    self.resize(block);
    s.resize(leaf);
    pass.resize(leaf);
    qpairs.resize(block * ((d + 1) / 2));
    nq1.resize(block);
    nq.resize(block);
  }
};

// The block's queries (rows perm[0..nq) of x), row-major into sc.q and dimension-major into sc.qt; qt's unused
// columns repeat the last query, so that bounds over the whole block stay finite.
template <typename T>
static void gather_block(const T* x, const index_t* perm, index_t nq, index_t d, Scratch<T>& sc) {
  constexpr index_t L = kLeafSize<T>;
  for (index_t r = 0; r < L; ++r) {
    const T* row = x + perm[std::min(r, nq - 1)] * d;
    if (r < nq) std::memcpy(sc.q.data() + r * d, row, sizeof(T) * d);
    for (index_t t = 0; t < d; ++t) sc.qt[t * L + r] = row[t];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// knn over one query block (one leaf of the query tree): a depth-first walk of the candidate tree, nearer child
// first, pruning nodes whose box-to-box lower bound exceeds every query's current k-th threshold, and per query
// leaves whose point-to-box bound exceeds that query's threshold.
template <typename T, int kMetric, bool kFma, int kGroup, bool kScreen>
static INFOFUSE_KNN_INLINE void knn_block(const KnnProblem<T>& pb, index_t block, Scratch<T>& sc) {
  static_assert(kLeafSize<T> % kGroup == 0, "a leaf is scanned in whole groups");
  const Tree<T>& qt = *pb.qtree;
  const Tree<T>& ct = *pb.ctree;
  const index_t d = ct.d, k = pb.k;
  constexpr index_t L = kLeafSize<T>;
  const T inf = std::numeric_limits<T>::infinity();
  const index_t p0 = block * qt.leaf, nq = std::min(qt.n, p0 + qt.leaf) - p0;
  gather_block(pb.x, qt.perm.data() + p0, nq, d, sc);
  for (index_t r = 0; r < nq; ++r) {
    const index_t i = qt.perm[p0 + r];
    sc.self[r] = pb.exclude_self ? i : -1;
    sc.filled[r] = 0;
    sc.S[r] = inf;
  }
  const index_t qnode = qt.leaf_node[block];
  const T* qlo = qt.lo(qnode);
  const T* qhi = qt.hi(qnode);
  T max_S = inf;
  auto& stack = sc.stack;
  stack.clear();
  stack.emplace_back(0, T(0));
  while (!stack.empty()) {
    const auto [b, bound] = stack.back();
    stack.pop_back();
    if (bound > max_S) continue;
    const Node& node = ct.nodes[b];
    if (node.left >= 0) {
      const T bl = lower_bound_s<kMetric, kFma>(qlo, qhi, ct.lo(node.left), ct.hi(node.left), d);
      const T br = lower_bound_s<kMetric, kFma>(qlo, qhi, ct.lo(node.right), ct.hi(node.right), d);
      // Nearer child on top of the stack (popped first); the left one on equal bounds.
      if (bl <= br) {
        stack.emplace_back(node.right, br);
        stack.emplace_back(node.left, bl);
      } else {
        stack.emplace_back(node.left, bl);
        stack.emplace_back(node.right, br);
      }
      continue;
    }
    const index_t l = node.leaf_begin;
    const T* tiles = ct.leaf_tiles(l);
    const index_t base = l * L;
    block_bounds<kMetric, kFma, L, false>(sc.qt.data(), ct.lo(b), ct.hi(b), d, sc.lb.data(), sc.ub.data());
    // Offers candidate position p (with its exact s) to query r.
    auto offer = [&](index_t r, TopK<T>& top, T& S, index_t p, T sp) {
      const index_t pos = base + p;
      if (sp > S || pos >= ct.n) return;
      const index_t j = ct.perm[pos];
      if (j == sc.self[r]) return;
      const T D = distance_of<kMetric>(sp);
      if (!top.admits(D, j)) return;
      top.insert(D, j);
      if (top.filled == k) S = s_threshold<kMetric>(top.worst_dist(), false);
    };
    bool screened = false;
    for (index_t r = 0; r < nq; ++r) {
      const T* q = sc.q.data() + r * d;
      T S = sc.S[r];
      if (sc.lb[r] > S) continue;
      TopK<T> top{sc.dist.data() + r * k, sc.idx.data() + r * k, k, sc.filled[r]};
      bool done = false;  // the leaf is settled for this query
#ifdef INFOFUSE_KNN_BF16
      if constexpr (kScreen) {
        const ScreenLeaves& sl = *pb.screen;
        if (S >= kScreenMin && S < inf && sl.reach[l] <= kScreenMax) {
          if (!screened) {
            screen_queries<L>(sl, l, sc.qt.data(), sc.qpairs.data(), sc.nq1.data(), sc.nq.data());
            screened = true;
          }
          if (sc.nq[r] <= kScreenMax && sl.alpha * (sl.reach[l] + sc.nq[r]) <= kScreenRatio * S) {
            uint16_t masks[8];
            if (screen_leaf(sl, l, sc.qpairs.data() + r, L, sc.nq1[r], S * (1.0f + 0x1p-20f), masks)) {
              int passed = 0;
              for (int g = 0; g < 8; ++g) passed += __builtin_popcount(masks[g]);
              // Few passed: the exact s of each (a latency-bound chain of d FMAs); many: the exact kernel below.
              if (passed <= kRecheckLanes) {
                for (int g = 0; g < 8; ++g) {
                  for (uint32_t m = masks[g]; m != 0; m &= m - 1) {
                    const index_t p = g * 16 + __builtin_ctz(m);
                    offer(r, top, S, p, point_s<kMetric, kFma>(tiles, p, d, q));
                  }
                }
                done = true;
              }
            } else {
              done = true;
            }
          }
        }
      }
#endif
      for (index_t g = 0; g < L && !done; g += kGroup) {
        T* s = sc.s.data();
        if (!scan_group<kMetric, kFma, kGroup>(tiles + g, d, q, S, s, sc.pass.data())) continue;
        for_each_flag(sc.pass.data(), kGroup, [&](index_t p) { offer(r, top, S, g + p, s[p]); });
      }
      sc.filled[r] = top.filled;
      sc.S[r] = S;
    }
    max_S = sc.S[0];
    for (index_t r = 1; r < nq; ++r) max_S = std::max(max_S, sc.S[r]);
  }
  for (index_t r = 0; r < nq; ++r) {
    const index_t i = qt.perm[p0 + r];
    TopK<T>{sc.dist.data() + r * k, sc.idx.data() + r * k, k, sc.filled[r]}.finish(sc.sort_buffer);
    std::memcpy(pb.out_dist + i * k, sc.dist.data() + r * k, sizeof(T) * k);
    std::memcpy(pb.out_idx + i * k, sc.idx.data() + r * k, sizeof(index_t) * k);
  }
}

// knn_count over one query block (one leaf of the tree over x): nodes entirely outside every query's radius are
// skipped, nodes entirely inside every query's radius are counted whole; leaves are decided per query, and
// scanned only when their box straddles the query's radius.
template <typename T, int kMetric, bool kFma, int kGroup>
static INFOFUSE_KNN_INLINE void count_block(const CountProblem<T>& pb, index_t block, Scratch<T>& sc) {
  static_assert(kLeafSize<T> % kGroup == 0, "a leaf is scanned in whole groups");
  const Tree<T>& tr = *pb.tree;
  const index_t d = tr.d;
  constexpr index_t L = kLeafSize<T>;
  const index_t p0 = block * L, nq = std::min(tr.n, p0 + L) - p0;
  T min_S = std::numeric_limits<T>::infinity(), max_S = -min_S;
  gather_block(pb.x, tr.perm.data() + p0, nq, d, sc);
  for (index_t r = 0; r < nq; ++r) {
    const index_t i = tr.perm[p0 + r];
    sc.S[r] = pb.S[i];
    sc.filled[r] = 0;  // the count
    // A NaN threshold admits nothing: leave it out of the block's bounds.
    if (!std::isnan(sc.S[r])) {
      min_S = std::min(min_S, sc.S[r]);
      max_S = std::max(max_S, sc.S[r]);
    }
  }
  bool any_nan = false;
  for (index_t r = 0; r < nq; ++r) any_nan |= std::isnan(sc.S[r]);
  const index_t qnode = tr.leaf_node[block];
  const T* qlo = tr.lo(qnode);
  const T* qhi = tr.hi(qnode);
  auto& stack = sc.stack;
  stack.clear();
  stack.emplace_back(0, T(0));
  while (!stack.empty()) {
    const index_t b = stack.back().first;
    stack.pop_back();
    const Node& node = tr.nodes[b];
    const T* lo = tr.lo(b);
    const T* hi = tr.hi(b);
    if (lower_bound_s<kMetric, kFma>(qlo, qhi, lo, hi, d) > max_S) continue;
    // The query block lies in this node's range or outside it: self is inside exactly when the block is.
    const bool holds_block = node.leaf_begin <= block && block < node.leaf_end;
    if (!any_nan && upper_bound_s<kMetric, kFma>(qlo, qhi, lo, hi, d) <= min_S) {
      const index_t c = tr.count(b) - (holds_block ? 1 : 0);
      for (index_t r = 0; r < nq; ++r) sc.filled[r] += c;
      continue;
    }
    if (node.left >= 0) {
      stack.emplace_back(node.left, T(0));
      stack.emplace_back(node.right, T(0));
      continue;
    }
    const index_t l = node.leaf_begin;
    const T* tiles = tr.leaf_tiles(l);
    const index_t valid = std::min(L, tr.n - l * L);
    block_bounds<kMetric, kFma, L, true>(sc.qt.data(), lo, hi, d, sc.lb.data(), sc.ub.data());
    for (index_t r = 0; r < nq; ++r) {
      const T* q = sc.q.data() + r * d;
      const T S = sc.S[r];
      if (!(sc.lb[r] <= S)) continue;
      if (sc.ub[r] <= S) {
        sc.filled[r] += valid - (holds_block ? 1 : 0);  // self (s = 0 <= S) is among them
        continue;
      }
      index_t c = 0;
      for (index_t g = 0; g < valid; g += kGroup) c += count_group<kMetric, kFma, kGroup>(tiles + g, d, q, S);
      // Padding (positions valid..L of the last leaf, all of whose groups are scanned) has s = +inf.
      if (S == std::numeric_limits<T>::infinity()) c -= (valid + kGroup - 1) / kGroup * kGroup - valid;
      // Self sits at position r of its own leaf, with s = 0.
      if (holds_block && T(0) <= S) --c;
      sc.filled[r] += c;
    }
  }
  for (index_t r = 0; r < nq; ++r) pb.out[tr.perm[p0 + r]] = sc.filled[r];
}

// d == 1: counts by binary search in the sorted values. Along the sorted order s(x_j − x_i) is non-increasing
// below x_i and non-decreasing above it (rounding is monotone), so the pairs with s <= S form one contiguous run
// around x_i, found with the same s as the brute force: the counts are identical, ties and duplicates included.
template <typename T, int kMetric, bool kFma>
static INFOFUSE_KNN_INLINE void count_sorted_1d(const T* sorted, index_t n, const T* x, const T* S, index_t* out,
                                                index_t begin, index_t end) {
  for (index_t i = begin; i < end; ++i) {
    const T q = x[i], thr = S[i];
    auto pass = [q, thr](T v) { return step<kMetric, kFma>(T(0), v - q) <= thr; };
    const T* mid = std::lower_bound(sorted, sorted + n, q);
    const T* left = std::partition_point(sorted, mid, [&](T v) { return !pass(v); });
    const T* right = std::partition_point(mid, sorted + n, pass);
    out[i] = static_cast<index_t>(right - left) - (T(0) <= thr ? 1 : 0);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points: a worker pulls query blocks from a shared counter until none is left (blocks differ in cost, so
// static chunks would leave a core idle). Each is compiled for the machine's best target (see knn.cpp).

template <typename T, int kMetric, bool kFma, int kGroup, bool kScreen = false>
static INFOFUSE_KNN_INLINE void knn_worker_impl(const KnnProblem<T>& pb, std::atomic<index_t>* next) {
  Scratch<T> sc;
  sc.reserve(pb.qtree->leaf, pb.ctree->d, pb.k, pb.ctree->leaf);
  for (index_t b = next->fetch_add(1); b < pb.qtree->n_leaves; b = next->fetch_add(1)) {
    knn_block<T, kMetric, kFma, kGroup, kScreen>(pb, b, sc);
  }
}

template <typename T, int kMetric, bool kFma, int kGroup>
static INFOFUSE_KNN_INLINE void count_worker_impl(const CountProblem<T>& pb, std::atomic<index_t>* next) {
  Scratch<T> sc;
  sc.reserve(pb.tree->leaf, pb.tree->d, 0, pb.tree->leaf);
  for (index_t b = next->fetch_add(1); b < pb.tree->n_leaves; b = next->fetch_add(1)) {
    count_block<T, kMetric, kFma, kGroup>(pb, b, sc);
  }
}

}  // namespace infofuse::cpu::knn
