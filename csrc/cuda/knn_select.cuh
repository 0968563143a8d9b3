// Device code of the CUDA k-NN search (csrc/cuda/knn.cu): keys, the warp-wide selection network, the candidate
// tile loop and the three kernels. Free of torch headers; knn.cu checks the arguments and launches. The design
// and its invariants are described at the top of knn.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace infofuse::cuda::knn {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kThreads = 256;  // every kernel of this file
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kTileM = 128;                 // candidate rows per shared-memory tile
constexpr int kSlots = kTileM / kWarpSize;  // candidates per lane per tile
constexpr int kChunkD = 32;                 // features per pass over a tile
constexpr int kMaxFastK = 64;               // k above this goes to the fallback kernel
constexpr int kKnnQueriesPerWarp = 2;       // warp-select kernel
constexpr int kCountQueriesPerWarp = 4;     // count kernel
// The tile kernels ask for 2 resident blocks per SM, i.e. at most 128 registers a thread, which they fit without
// spilling (ptxas -v, sm_80); left to itself ptxas chose 64 registers and spilled.
constexpr int kTileMinBlocks = 2;
static_assert(kTileM % kWarpSize == 0 && kChunkD <= kThreads, "tile shape");

// ---------------------------------------------------------------- numbers

// "Ordered bits" of a non-negative value: the IEEE pattern with the sign bit cleared. For values >= +0 (and +inf,
// NaN) unsigned comparison of these patterns is numeric comparison, with NaN above +inf. Every comparison of a
// distance in this file is one of ordered bits, so flush-to-zero (setup.py builds with --use_fast_math) never
// changes a comparison; it can only change the distance arithmetic, which all three kernels share.
template <typename Acc>
struct Num;

template <>
struct Num<float> {
  using Bits = unsigned int;
  static constexpr Bits kSign = 0x80000000u;
  static constexpr Bits kInf = 0x7f800000u;
  static constexpr Bits kTiny = Bits(127 - 60) << 23;     // 2^-60
  static constexpr Bits kTinySq = Bits(127 - 120) << 23;  // 2^-120, a normal number
  __device__ static __forceinline__ Bits bits(float v) { return __float_as_uint(v); }
  __device__ static __forceinline__ float from_bits(Bits b) { return __uint_as_float(b); }
  __device__ static __forceinline__ Bits ord(float v) { return bits(v) & ~kSign; }
  __device__ static __forceinline__ float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
  __device__ static __forceinline__ float sqrt(float v) { return __fsqrt_rn(v); }  // IEEE even under fast math
  __device__ static __forceinline__ float mul_rd(float a, float b) { return __fmul_rd(a, b); }
  __device__ static __forceinline__ float mul_ru(float a, float b) { return __fmul_ru(a, b); }
  __device__ static __forceinline__ float abs(float v) { return fabsf(v); }
};

template <>
struct Num<double> {
  using Bits = unsigned long long;
  static constexpr Bits kSign = 0x8000000000000000ull;
  static constexpr Bits kInf = 0x7ff0000000000000ull;
  static constexpr Bits kTiny = Bits(1023 - 60) << 52;     // 2^-60
  static constexpr Bits kTinySq = Bits(1023 - 120) << 52;  // 2^-120
  __device__ static __forceinline__ Bits bits(double v) { return static_cast<Bits>(__double_as_longlong(v)); }
  __device__ static __forceinline__ double from_bits(Bits b) { return __longlong_as_double(static_cast<long long>(b)); }
  __device__ static __forceinline__ Bits ord(double v) { return bits(v) & ~kSign; }
  __device__ static __forceinline__ double fma(double a, double b, double c) { return __fma_rn(a, b, c); }
  __device__ static __forceinline__ double sqrt(double v) { return __dsqrt_rn(v); }
  __device__ static __forceinline__ double mul_rd(double a, double b) { return __dmul_rd(a, b); }
  __device__ static __forceinline__ double mul_ru(double a, double b) { return __dmul_ru(a, b); }
  __device__ static __forceinline__ double abs(double v) { return fabs(v); }
};

template <typename Acc>
__device__ __forceinline__ Acc to_acc(float v) {
  return v;
}
template <typename Acc>
__device__ __forceinline__ Acc to_acc(double v) {
  return v;
}
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half v) {
  return __half2float(v);
}
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// ---------------------------------------------------------------- metrics

// A metric accumulates a "pre-distance" over the features in order 0..d-1 (the same sequence of operations in
// every kernel, so the three kernels agree bit for bit) and finishes it into the distance.
template <typename Acc, int kMetric>
struct Metric;

// Euclidean: pre = Σ (q - y)² by fused multiply-adds, distance = sqrt_rn(pre).
template <typename Acc>
struct Metric<Acc, 0> {
  static constexpr bool kSquared = true;
  __device__ static __forceinline__ Acc accumulate(Acc acc, Acc diff) { return Num<Acc>::fma(diff, diff, acc); }
  __device__ static __forceinline__ Acc finish(Acc pre) { return Num<Acc>::sqrt(pre); }
};

// Chebyshev: pre = distance = max |q - y|, taken on ordered bits (so a NaN difference propagates, as NaN > inf).
template <typename Acc>
struct Metric<Acc, 1> {
  static constexpr bool kSquared = false;
  __device__ static __forceinline__ Acc accumulate(Acc acc, Acc diff) {
    using N = Num<Acc>;
    const typename N::Bits a = N::bits(acc), b = N::bits(N::abs(diff));  // both have the sign bit clear
    return N::from_bits(a > b ? a : b);
  }
  __device__ static __forceinline__ Acc finish(Acc pre) { return pre; }
};

// For the Euclidean metric: a band on the ordered bits s of a squared sum that decides "sqrt_rn(s) <= D" without
// the square root, D given by its ordered bits dmax (any value >= +0, +inf or NaN/all ones):
//   s < lo  implies sqrt_rn(s) <= D;   s >= hi  implies sqrt_rn(s) > D (in ordered bits);   otherwise compute it.
// Proof sketch (sqrt_rn and the directed multiplications are monotone; Dn is the float after D):
//   lo = mul_rd(D, D): s < lo <= D² gives sqrt(s) < D, so sqrt_rn(s) <= D. lo = 0 (nothing certain) when
//   D < 2^-60, so that D² never falls below the normal range, where flush-to-zero could act.
//   hi = mul_ru(Dn, Dn) + 1: s > mul_ru(Dn, Dn) >= Dn² gives sqrt(s) > Dn, so sqrt_rn(s) >= Dn > D. When Dn < 2^-60,
//   hi = 2^-120 instead: s >= 2^-120 gives sqrt_rn(s) >= 2^-60 > Dn > D.
template <typename Acc>
struct SqBand {
  typename Num<Acc>::Bits lo, hi;
};

template <typename Acc>
__device__ __forceinline__ SqBand<Acc> sq_band(typename Num<Acc>::Bits dmax) {
  using N = Num<Acc>;
  using Bits = typename N::Bits;
  if (dmax > N::kInf) return {Bits(0), ~Bits(0)};          // D is NaN or the sentinel: decide every s exactly
  if (dmax == N::kInf) return {N::kInf + 1, N::kInf + 1};  // every s but NaN is in
  const Acc dv = N::from_bits(dmax), dn = N::from_bits(dmax + 1);
  SqBand<Acc> band;
  band.lo = dmax < N::kTiny ? Bits(0) : N::bits(N::mul_rd(dv, dv));
  band.hi = dmax + 1 < N::kTiny ? N::kTinySq : N::bits(N::mul_ru(dn, dn)) + 1;  // mul_ru(dn, dn) <= +inf
  return band;
}

// ---------------------------------------------------------------- keys

// A candidate's key: (distance, index) in lexicographic order on (ordered bits, index). Keys of distinct candidates
// are distinct, so this is a strict total order; ties in distance go to the smaller index. The sentinel (all ones)
// is above every real key (real distance bits have the sign bit clear, real indices are < 2^31).
template <typename Acc>
struct Key;

template <>
struct Key<float> {
  unsigned long long v;  // ordered distance bits << 32 | index
  __device__ static __forceinline__ Key make(float dist, unsigned j) {
    return {(static_cast<unsigned long long>(Num<float>::ord(dist)) << 32) | j};
  }
  __device__ static __forceinline__ Key sentinel() { return {~0ull}; }
  __device__ __forceinline__ bool operator<(const Key& o) const { return v < o.v; }
  __device__ __forceinline__ unsigned dist_bits() const { return static_cast<unsigned>(v >> 32); }
  __device__ __forceinline__ float dist() const { return __uint_as_float(dist_bits()); }
  __device__ __forceinline__ unsigned index() const { return static_cast<unsigned>(v); }
  __device__ __forceinline__ Key shfl(int src) const { return {__shfl_sync(kFullMask, v, src)}; }
  __device__ __forceinline__ Key shfl_xor(int mask) const { return {__shfl_xor_sync(kFullMask, v, mask)}; }
};

template <>
struct Key<double> {
  unsigned long long d;  // ordered distance bits
  unsigned j;            // index
  __device__ static __forceinline__ Key make(double dist, unsigned idx) { return {Num<double>::ord(dist), idx}; }
  __device__ static __forceinline__ Key sentinel() { return {~0ull, ~0u}; }
  __device__ __forceinline__ bool operator<(const Key& o) const { return d < o.d || (d == o.d && j < o.j); }
  __device__ __forceinline__ unsigned long long dist_bits() const { return d; }
  __device__ __forceinline__ double dist() const { return Num<double>::from_bits(d); }
  __device__ __forceinline__ unsigned index() const { return j; }
  __device__ __forceinline__ Key shfl(int src) const {
    return {__shfl_sync(kFullMask, d, src), __shfl_sync(kFullMask, j, src)};
  }
  __device__ __forceinline__ Key shfl_xor(int mask) const {
    return {__shfl_xor_sync(kFullMask, d, mask), __shfl_xor_sync(kFullMask, j, mask)};
  }
};

template <typename K>
__device__ __forceinline__ K key_min(const K& a, const K& b) {
  return b < a ? b : a;
}
template <typename K>
__device__ __forceinline__ K key_max(const K& a, const K& b) {
  return b < a ? a : b;
}

// ---------------------------------------------------------------- warp networks (one key per lane)

// Compare-exchange with lane ^ mask: keep the smaller key (keep_min) or the larger. The two lanes of a pair take
// opposite flags, so the pair ends up holding {min, max}.
template <typename K>
__device__ __forceinline__ K exchange(const K& v, int mask, bool keep_min) {
  const K o = v.shfl_xor(mask);
  return (keep_min == (o < v)) ? o : v;
}

// Bitonic sort of the 32 lane keys by lane, ascending (or descending). 15 compare-exchanges.
template <typename K>
__device__ __forceinline__ K warp_sort(K v, int lane, bool descending) {
#pragma unroll
  for (int size = 2; size <= kWarpSize; size <<= 1) {
    const bool up = ((lane & size) == 0) != descending;  // direction of this lane's block of `size`
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) v = exchange(v, stride, ((lane & stride) == 0) == up);
  }
  return v;
}

// Sorts a bitonic sequence of 32 lane keys (half-cleaners of stride 16, 8, 4, 2, 1). 5 compare-exchanges.
template <typename K>
__device__ __forceinline__ K warp_bitonic_merge(K v, int lane, bool descending) {
#pragma unroll
  for (int stride = kWarpSize / 2; stride > 0; stride >>= 1)
    v = exchange(v, stride, ((lane & stride) == 0) != descending);
  return v;
}

// wq: R·32 keys ascending by position r·32 + lane. Replaces wq by the R·32 smallest keys of wq ∪ {c of every
// lane}, ascending. Half-cleaner lemma: for a ascending and b descending (32 each), min(a_i, b_i) is the 32
// smallest of a ∪ b and bitonic, max(a_i, b_i) the 32 largest and bitonic.
//   1. c sorted descending; l = min(wq[R-1], c): the new set is wq[0..R-2] ∪ l (c's 32 largest and wq[R-1]'s
//      leftovers are the 32 largest of the union, since wq[R-1] is above wq[0..R-2]).
//   2. For r = R-2 down to 0: sort l descending; the 32 largest of wq[r] ∪ l are the 32 largest of what is left
//      (wq[0..r-1] lies below wq[r]), so they become block r+1, sorted; l = the 32 smallest.
//   3. block 0 = l sorted.
template <int R, typename K>
__device__ __forceinline__ void warp_queue_merge(K (&wq)[R], const K& c, int lane) {
  K l = key_min(wq[R - 1], warp_sort(c, lane, /*descending=*/true));
#pragma unroll
  for (int r = R - 2; r >= 0; --r) {
    l = warp_bitonic_merge(l, lane, /*descending=*/true);
    const K lo = key_min(wq[r], l), hi = key_max(wq[r], l);
    wq[r + 1] = warp_bitonic_merge(hi, lane, /*descending=*/false);
    l = lo;
  }
  wq[0] = warp_bitonic_merge(l, lane, /*descending=*/false);
}

// ---------------------------------------------------------------- warp selection of one query's k nearest

// One query's top-k, held by a whole warp (all 32 lanes call every member function together).
//   wq (warp queue): the R·32 smallest keys merged so far (sentinels until filled), ascending by r·32 + lane.
//   tq (thread queue): this lane's admitted keys not yet merged, tq[0..nt) newest first, tq[nt..T) sentinels.
//   kth: the key at position k-1 of wq (the sentinel until k keys were merged). A candidate is admitted only if
//     its key < kth; a rejected key is > the k-th smallest key seen so far, hence never among the final k.
//   pre_max: admission filter on the candidate's pre-distance bits, implied by key < kth (Euclidean: through
//     sq_band, so the square root is taken only for candidates that may be admitted).
// No lane ever holds T unmerged keys before an add: an add that fills a lane's queue triggers a merge at once.
template <typename Acc, int kMetric, int R, int T>
struct WarpSelect {
  using K = Key<Acc>;
  using N = Num<Acc>;
  using Bits = typename N::Bits;
  using M = Metric<Acc, kMetric>;

  K wq[R];
  K tq[T];
  int nt;
  K kth;
  Bits pre_max;

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int r = 0; r < R; ++r) wq[r] = K::sentinel();
#pragma unroll
    for (int t = 0; t < T; ++t) tq[t] = K::sentinel();
    nt = 0;
    kth = K::sentinel();
    pre_max = ~Bits(0);
  }

  // Offers candidate j with pre-distance `pre` (ignored unless valid).
  __device__ __forceinline__ void add(Acc pre, unsigned j, bool valid, int k, int lane) {
    if (valid && N::ord(pre) <= pre_max) {
      const K key = K::make(M::finish(pre), j);
      if (key < kth) {
#pragma unroll
        for (int t = T - 1; t > 0; --t) tq[t] = tq[t - 1];
        tq[0] = key;
        ++nt;
      }
    }
    if (__any_sync(kFullMask, nt == T)) merge(k, lane);
  }

  // Merges every thread queue into wq, column by column (tq[t] of all lanes is one column of 32 keys).
  __device__ __forceinline__ void merge(int k, int lane) {
#pragma unroll
    for (int t = 0; t < T; ++t) {
      if (__any_sync(kFullMask, nt > t)) warp_queue_merge<R>(wq, tq[t], lane);  // column t is not all sentinels
    }
#pragma unroll
    for (int t = 0; t < T; ++t) tq[t] = K::sentinel();
    nt = 0;
    // kth = position k-1 (k <= R·32). One shuffle per block, then a select: indexing wq by (k-1)/32 would move the
    // warp queue to local memory.
    const int p = k - 1;
    kth = wq[0].shfl(p & (kWarpSize - 1));
#pragma unroll
    for (int r = 1; r < R; ++r) {
      const K v = wq[r].shfl(p & (kWarpSize - 1));
      if ((p >> 5) == r) kth = v;
    }
    const Bits kb = kth.dist_bits();
    if constexpr (M::kSquared) {
      pre_max = sq_band<Acc>(kb).hi - 1;  // hi >= 1 here; s < hi is "sqrt_rn(s) may be <= kth's distance"
    } else {
      pre_max = kb;
    }
  }

  __device__ __forceinline__ void finish(int k, int lane) {
    if (__any_sync(kFullMask, nt > 0)) merge(k, lane);
  }

  // Writes positions p < k (the k nearest, ascending) of out rows of length k.
  __device__ __forceinline__ void store(Acc* __restrict__ out_dist, int64_t* __restrict__ out_index, int k,
                                        int lane) const {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int p = r * kWarpSize + lane;
      if (p < k) {
        out_dist[p] = wq[r].dist();
        out_index[p] = static_cast<int64_t>(wq[r].index());
      }
    }
  }
};

// ---------------------------------------------------------------- the candidate tile loop

// Copies rows [row0, row0 + nrows) × features [c0, c0 + w) of a row-major (·, d) matrix into dst (row stride
// dst_stride), converted to Acc; rows >= nvalid are zero-filled. Thread t handles feature t % w of rows
// t / w, t / w + kThreads / w, ... (consecutive threads read consecutive addresses when w = d).
template <typename Acc, typename In>
__device__ __forceinline__ void load_rows(Acc* __restrict__ dst, int dst_stride, const In* __restrict__ src,
                                          int64_t row0, int nvalid, int nrows, int64_t d, int64_t c0, int w) {
  if (w <= 0) return;
  const int rstep = kThreads / w;
  const int first = static_cast<int>(threadIdx.x) / w;
  const int col = static_cast<int>(threadIdx.x) - first * w;
  if (first >= rstep) return;
  for (int r = first; r < nrows; r += rstep) {
    Acc v = Acc(0);
    if (r < nvalid) v = to_acc<Acc>(src[(row0 + r) * d + c0 + col]);
    dst[r * dst_stride + col] = v;
  }
}

// The candidate tile loop: streams the candidate rows yb[0..m) of one batch entry past the block's queries
// xb[q0, q0 + kWarps·QPW), warp w owning queries q0 + w·QPW + [0, QPW). Per tile of kTileM candidates (m0 = 0,
// kTileM, ...) and per chunk of kChunkD features: one barrier, the tile chunk (and, when d > kChunkD, the queries'
// chunk) into shared memory, one barrier, then lane l accumulates the pre-distances of candidates m0 + s·32 + l
// (s < kSlots) to each of its warp's queries in registers. Every thread of the block calls start() once and then
// tile() for every m0 in order (both hold barriers; the loop bounds are block-uniform).
template <typename In, typename Acc, int kMetric, int QPW>
struct CandidateTiles {
  using Met = Metric<Acc, kMetric>;
  static constexpr int kQueries = kWarps * QPW;

  const In* __restrict__ xb;
  const In* __restrict__ yb;
  int64_t m, d, q0, nchunks;
  int qvalid;
  Acc* ys;  // kTileM × (kChunkD + 1)
  Acc* qs;  // kQueries × kChunkD

  __device__ __forceinline__ CandidateTiles(const In* xb_, const In* yb_, int64_t n_, int64_t m_, int64_t d_,
                                            int64_t q0_, Acc* ys_, Acc* qs_)
      : xb(xb_),
        yb(yb_),
        m(m_),
        d(d_),
        q0(q0_),
        nchunks((d_ + kChunkD - 1) / kChunkD),
        qvalid(static_cast<int>(n_ - q0_ < kQueries ? n_ - q0_ : kQueries)),
        ys(ys_),
        qs(qs_) {}

  // With one chunk the queries stay in shared memory for the whole loop (read after the first tile's barrier).
  __device__ __forceinline__ void start() const {
    if (nchunks == 1) load_rows(qs, kChunkD, xb, q0, qvalid, kQueries, d, 0, static_cast<int>(d));
  }

  __device__ __forceinline__ void tile(int64_t m0, Acc (&pre)[kSlots][QPW]) const {
    const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
    const Acc* qrow = qs + (static_cast<int>(threadIdx.x) / kWarpSize) * QPW * kChunkD;
    const int mvalid = static_cast<int>(m - m0 < kTileM ? m - m0 : kTileM);
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
#pragma unroll
      for (int qw = 0; qw < QPW; ++qw) pre[s][qw] = Acc(0);
    }
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t c0 = c * kChunkD;
      const int w = static_cast<int>(d - c0 < kChunkD ? d - c0 : kChunkD);
      const int stride = w | 1;  // odd: lanes reading rows l·stride hit distinct banks
      __syncthreads();           // the previous chunk's readers are done
      load_rows(ys, stride, yb, m0, mvalid, kTileM, d, c0, w);
      if (nchunks > 1) load_rows(qs, kChunkD, xb, q0, qvalid, kQueries, d, c0, w);
      __syncthreads();
#pragma unroll 4
      for (int f = 0; f < w; ++f) {
        Acc qv[QPW];
#pragma unroll
        for (int qw = 0; qw < QPW; ++qw) qv[qw] = qrow[qw * kChunkD + f];  // broadcast
#pragma unroll
        for (int s = 0; s < kSlots; ++s) {
          const Acc yv = ys[(s * kWarpSize + lane) * stride + f];
#pragma unroll
          for (int qw = 0; qw < QPW; ++qw) pre[s][qw] = Met::accumulate(pre[s][qw], yv - qv[qw]);
        }
      }
    }
  }
};

// ---------------------------------------------------------------- kernels

// k <= R·32 <= 64: warp w of block g serves queries q0 + w·QPW + [0, QPW) of batch entry g / blocks_per_batch.
template <typename In, typename Acc, int kMetric, int R, int T>
__global__ void __launch_bounds__(kThreads, kTileMinBlocks)
    knn_warp_select_kernel(const In* __restrict__ x, const In* __restrict__ y, int64_t n, int64_t m, int64_t d, int k,
                           bool exclude_self, int64_t blocks_per_batch, Acc* __restrict__ out_dist,
                           int64_t* __restrict__ out_index) {
  constexpr int QPW = kKnnQueriesPerWarp;
  __shared__ Acc ys[kTileM * (kChunkD + 1)];
  __shared__ Acc qs[kWarps * QPW * kChunkD];
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / blocks_per_batch;
  const int64_t q0 = (static_cast<int64_t>(blockIdx.x) - b * blocks_per_batch) * (kWarps * QPW);
  const In* xb = x + b * n * d;
  const In* yb = y + b * m * d;

  int64_t qi[QPW];
  WarpSelect<Acc, kMetric, R, T> sel[QPW];
#pragma unroll
  for (int qw = 0; qw < QPW; ++qw) {
    qi[qw] = q0 + warp * QPW + qw;
    sel[qw].init();
  }
  const CandidateTiles<In, Acc, kMetric, QPW> tiles(xb, yb, n, m, d, q0, ys, qs);
  tiles.start();
  for (int64_t m0 = 0; m0 < m; m0 += kTileM) {
    Acc pre[kSlots][QPW];
    tiles.tile(m0, pre);
    // A rolled loop over the slots, the next slot rotated into pre[0]: the merge code (inlined in add) is emitted
    // once per query of the warp instead of once per slot and query.
#pragma unroll 1
    for (int s = 0; s < kSlots; ++s) {
      const int64_t j = m0 + s * kWarpSize + lane;
#pragma unroll
      for (int qw = 0; qw < QPW; ++qw) {
        const bool valid = qi[qw] < n && j < m && !(exclude_self && j == qi[qw]);
        sel[qw].add(pre[0][qw], static_cast<unsigned>(j), valid, k, lane);
      }
#pragma unroll
      for (int t = 0; t + 1 < kSlots; ++t) {
#pragma unroll
        for (int qw = 0; qw < QPW; ++qw) pre[t][qw] = pre[t + 1][qw];
      }
    }
  }
#pragma unroll
  for (int qw = 0; qw < QPW; ++qw) {
    sel[qw].finish(k, lane);
    if (qi[qw] < n) {
      const int64_t row = (b * n + qi[qw]) * k;
      sel[qw].store(out_dist + row, out_index + row, k, lane);
    }
  }
}

// counts[b, i] = #{j != i : dist(x_i, x_j) < radius[b, i]} (strict) or <= (not strict), same tile loop with y = x.
template <typename In, typename Acc, int kMetric>
__global__ void __launch_bounds__(kThreads, kTileMinBlocks)
    knn_count_kernel(const In* __restrict__ x, const Acc* __restrict__ radius, int64_t n, int64_t d, bool strict,
                     int64_t blocks_per_batch, int64_t* __restrict__ counts) {
  constexpr int QPW = kCountQueriesPerWarp;
  using N = Num<Acc>;
  using Bits = typename N::Bits;
  using Met = Metric<Acc, kMetric>;
  __shared__ Acc ys[kTileM * (kChunkD + 1)];
  __shared__ Acc qs[kWarps * QPW * kChunkD];
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / blocks_per_batch;
  const int64_t q0 = (static_cast<int64_t>(blockIdx.x) - b * blocks_per_batch) * (kWarps * QPW);
  const In* xb = x + b * n * d;

  // Per query: "in" is ord(distance) < limit (limit = 0: nothing is in). The radius r (any value): NaN and r < 0
  // admit nothing; -0 is +0; strict admits ord < ord(r), not strict ord <= ord(r), i.e. ord < ord(r) + 1.
  int64_t qi[QPW];
  Bits limit[QPW];
  SqBand<Acc> band[QPW];
  unsigned cnt[QPW];
#pragma unroll
  for (int qw = 0; qw < QPW; ++qw) {
    qi[qw] = q0 + warp * QPW + qw;
    Bits rb = qi[qw] < n ? N::bits(radius[b * n + qi[qw]]) : N::kSign | N::kInf;  // -inf for absent queries
    if (rb == N::kSign) rb = 0;
    limit[qw] = rb > N::kInf ? Bits(0) : (strict ? rb : rb + 1);
    band[qw] = limit[qw] == 0 ? SqBand<Acc>{Bits(0), Bits(0)} : sq_band<Acc>(limit[qw] - 1);
    cnt[qw] = 0;
  }
  const CandidateTiles<In, Acc, kMetric, QPW> tiles(xb, xb, n, n, d, q0, ys, qs);
  tiles.start();
  for (int64_t m0 = 0; m0 < n; m0 += kTileM) {
    Acc pre[kSlots][QPW];
    tiles.tile(m0, pre);
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int64_t j = m0 + s * kWarpSize + lane;
#pragma unroll
      for (int qw = 0; qw < QPW; ++qw) {
        if (j < n && j != qi[qw]) {
          const Bits pb = N::ord(pre[s][qw]);
          bool in;
          if constexpr (Met::kSquared) {
            in = pb < band[qw].lo || (pb < band[qw].hi && N::ord(Met::finish(pre[s][qw])) < limit[qw]);
          } else {
            in = pb < limit[qw];
          }
          cnt[qw] += in ? 1u : 0u;
        }
      }
    }
  }
#pragma unroll
  for (int qw = 0; qw < QPW; ++qw) {
    const unsigned total = __reduce_add_sync(kFullMask, cnt[qw]);  // < n <= 2^31
    if (lane == 0 && qi[qw] < n) counts[b * n + qi[qw]] = static_cast<int64_t>(total);
  }
}

// ---------------------------------------------------------------- selection for any k (the fallback)

// Sorts buf[0, count) ascending by one warp, in place: pads with sentinels to p, the power of two >= count (p <=
// the buffer's capacity), then a bitonic sort with the warp's 32 lanes taking the compare-exchanges of each stage
// in turn. Global memory; __syncwarp between stages orders the lanes' writes before the next stage's reads.
template <typename K>
__device__ __forceinline__ void warp_sort_buffer(K* buf, int64_t count, int lane) {
  int64_t p = 1;
  while (p < count) p <<= 1;
  for (int64_t t = count + lane; t < p; t += kWarpSize) buf[t] = K::sentinel();
  __syncwarp();
  for (int64_t size = 2; size <= p; size <<= 1) {
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (int64_t t = lane; t < p / 2; t += kWarpSize) {
        const int64_t lo = ((t & ~(stride - 1)) << 1) | (t & (stride - 1));  // pair (lo, lo + stride)
        const int64_t hi = lo + stride;
        const bool up = (lo & size) == 0;  // direction of the block of `size` holding the pair
        const K a = buf[lo], c = buf[hi];
        if (up ? (c < a) : (a < c)) {
          buf[lo] = c;
          buf[hi] = a;
        }
      }
      __syncwarp();
    }
  }
}

// One query's k nearest for any k, held by a whole warp in a buffer of cap keys of global workspace (cap a power
// of two >= 2k + kTileM).
//   buf[0, count): every key admitted since the last compaction, plus the k kept by it (count is warp-uniform).
//   thresh: the k-th smallest key at the last compaction (the sentinel before the first); a candidate is appended
//     iff its key < thresh (a warp ballot gives each admitted lane its slot), so a key left out is above k others.
//   After each tile (at most kTileM appends), if count > cap - kTileM: sort, keep the k smallest (count = k <=
//     cap - kTileM, so the next tile fits), thresh = the k-th. At the end a last sort; buf[0, k) is the answer.
// Keys are distinct, so the order of the appends never shows in the result.
template <typename Acc, int kMetric>
struct BufferSelect {
  using K = Key<Acc>;
  using N = Num<Acc>;
  using Bits = typename N::Bits;
  using M = Metric<Acc, kMetric>;

  K* buf;
  int64_t count;
  K thresh;
  Bits pre_max;  // filter on the pre-distance implied by key < thresh, as in WarpSelect

  __device__ __forceinline__ void init(K* buffer) {
    buf = buffer;
    count = 0;
    thresh = K::sentinel();
    pre_max = ~Bits(0);
  }

  __device__ __forceinline__ void add(Acc pre, unsigned j, bool valid, int lane) {
    bool take = false;
    K key = K::sentinel();
    if (valid && N::ord(pre) <= pre_max) {
      key = K::make(M::finish(pre), j);
      take = key < thresh;
    }
    const unsigned ballot = __ballot_sync(kFullMask, take);
    if (take) buf[count + __popc(ballot & ((1u << lane) - 1u))] = key;
    count += __popc(ballot);
  }

  __device__ __forceinline__ void compact_if_full(int64_t k, int64_t cap, int lane) {
    if (count <= cap - kTileM) return;  // warp-uniform
    warp_sort_buffer(buf, count, lane);
    count = k;
    thresh = buf[k - 1];
    const Bits kb = thresh.dist_bits();
    if constexpr (M::kSquared) {
      pre_max = sq_band<Acc>(kb).hi - 1;
    } else {
      pre_max = kb;
    }
  }

  __device__ __forceinline__ void store(Acc* __restrict__ out_dist, int64_t* __restrict__ out_index, int64_t k,
                                        int lane) {
    warp_sort_buffer(buf, count, lane);  // count >= k: the host checks k <= the candidates
    for (int64_t p = lane; p < k; p += kWarpSize) {
      const K key = p < count ? buf[p] : K::sentinel();
      out_dist[p] = key.dist();
      out_index[p] = key.index() == ~0u ? int64_t(-1) : static_cast<int64_t>(key.index());
    }
  }
};

// k > 64 (any k <= M): the tile loop of the warp-select kernel with BufferSelect per query. A persistent grid
// (gridDim.x <= tasks) walks the tasks (batch entry, group of kWarps·QPW queries) with a stride, so that the
// workspace is per resident block, not per query: warp w's query qw of block g owns the buffer
// work[((g·kWarps + w)·QPW + qw)·cap, +cap).
template <typename In, typename Acc, int kMetric>
__global__ void __launch_bounds__(kThreads, kTileMinBlocks)
    knn_buffer_select_kernel(const In* __restrict__ x, const In* __restrict__ y, int64_t n, int64_t m, int64_t d,
                             int64_t k, bool exclude_self, int64_t blocks_per_batch, int64_t tasks, Key<Acc>* work,
                             int64_t cap, Acc* __restrict__ out_dist, int64_t* __restrict__ out_index) {
  constexpr int QPW = kKnnQueriesPerWarp;
  __shared__ Acc ys[kTileM * (kChunkD + 1)];
  __shared__ Acc qs[kWarps * QPW * kChunkD];
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  Key<Acc>* own = work + (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * QPW * cap;
  for (int64_t g = blockIdx.x; g < tasks; g += gridDim.x) {  // block-uniform
    const int64_t b = g / blocks_per_batch;
    const int64_t q0 = (g - b * blocks_per_batch) * (kWarps * QPW);
    const In* xb = x + b * n * d;
    const In* yb = y + b * m * d;
    int64_t qi[QPW];
    BufferSelect<Acc, kMetric> sel[QPW];
#pragma unroll
    for (int qw = 0; qw < QPW; ++qw) {
      qi[qw] = q0 + warp * QPW + qw;
      sel[qw].init(own + qw * cap);
    }
    const CandidateTiles<In, Acc, kMetric, QPW> tiles(xb, yb, n, m, d, q0, ys, qs);
    tiles.start();
    for (int64_t m0 = 0; m0 < m; m0 += kTileM) {
      Acc pre[kSlots][QPW];
      tiles.tile(m0, pre);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t j = m0 + s * kWarpSize + lane;
#pragma unroll
        for (int qw = 0; qw < QPW; ++qw) {
          const bool valid = qi[qw] < n && j < m && !(exclude_self && j == qi[qw]);
          sel[qw].add(pre[s][qw], static_cast<unsigned>(j), valid, lane);
        }
      }
#pragma unroll
      for (int qw = 0; qw < QPW; ++qw) sel[qw].compact_if_full(k, cap, lane);
    }
#pragma unroll
    for (int qw = 0; qw < QPW; ++qw) {
      if (qi[qw] < n) {
        const int64_t row = (b * n + qi[qw]) * k;
        sel[qw].store(out_dist + row, out_index + row, k, lane);
      }
    }
    __syncthreads();  // the next task's start() rewrites the queries' shared memory
  }
}

}  // namespace infofuse::cuda::knn
