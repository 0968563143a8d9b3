// Brute-force float Euclidean k-NN screened by AMX bfloat16 tile products, for CPUs with AMX-BF16 (knn.cpp picks
// it over the tree walk where the tree prunes little: larger d, enough points).
//
// Every (query, candidate) pair gets a screened value from the tiles; only pairs whose screened lower bound can
// still reach the query's k-th distance get their exact s, by knn_kernels.h's op sequence (rule 1), so distances,
// ties and indices are exactly those of the tree walk and of the brute force.
//
// The bound is ScreenLeaves's (knn_kernels.h), with one centre μ for the whole candidate set instead of one per
// leaf: with u = fl(y − μ), v = fl(q − μ), n_y = ‖u‖², n_q = ‖v‖² (float fma chains) and û, v̂ = bf16(u), bf16(−2v),
// the tile product c = Σ_t û_t·v̂_t (float accumulation, in whatever order the tile unit adds) gives
//     L = c + (1 − α)·n_y + (1 − α)·n_q <= s <= c + (1 + α)·n_y + (1 + α)·n_q = U
// for the exact kernel's s of the pair, with α = screen_alpha(dp) over the padded depth dp (the three additions
// that form L and U are covered by the factor of two that screen_alpha keeps). AMX treats bfloat16 subnormals as
// zero and flushes float subnormals: at most d·2^-124 in absolute terms, covered, as in ScreenLeaves, by a
// relative slack on a threshold of at least 2^-60 (below that a query falls back to the exact scan).
//
// One pass per query: U_k, the k-th smallest U so far, only falls; every pair with L <= U_k·(1 + 2^-18) at its
// turn is kept as (L, j). At the end every kept pair with L <= the final U_k·(1 + 2^-18) gets its exact s and
// competes in the query's TopK. That threshold is above the k-th smallest s (U >= s), with room for the pairs
// whose distance rounds to the same value (the 2^-18 covers both that and the flush-to-zero slack), so no pair of
// the exact top k, ties included, is missed.
//
// Layout: queries as rows of v̂ (dp = d rounded up to 32 bfloat16, zero-padded), 32 rows per group (two A tiles),
// packed per thread block;
// candidates packed per block of 16 and per 32 dimensions in the tile unit's pair-interleaved B layout (1 KiB per
// tile), padding candidates with L = U = +inf. A thread takes 512 queries at a time and sweeps the candidates in
// chunks of 2048 (512 KiB of tiles at d = 128, kept in L2 across the block's 16 groups); per group and pair of
// candidate blocks, four 16×16 float tiles accumulate over dp/32 steps, go to a 4 KiB buffer and are screened with
// AVX-512.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define INFOFUSE_KNN_AMX 1
#endif

#ifdef INFOFUSE_KNN_AMX

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "knn_kernels.h"

#define INFOFUSE_KNN_AMX_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16")))

namespace infofuse::cpu::knn::amx {

constexpr index_t kGroupRows = 32;    // queries per group: two A tiles
constexpr index_t kPairCols = 32;     // candidates per step: two B tiles
constexpr index_t kDepth = 32;        // bfloat16 values per tile row
constexpr index_t kBlockGroups = 16;  // groups per thread block: 512 queries
constexpr index_t kChunkCols = 2048;  // candidates swept per chunk
constexpr index_t kMaxK = 64;         // larger k: the tree walk
constexpr float kSlack = 1.0f + 0x1p-18f;

// Whether the CPU has AMX-BF16 and the kernel lets this process use the tile data (Linux asks each process to
// request it once). Later calls return the first answer.
inline bool available() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
    if (!tile || !bf16) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The packed operands and bounds of one problem (one batch entry).
struct Packed {
  index_t n = 0, m = 0, d = 0, dp = 0, steps = 0, m_pad = 0;
  float alpha = 0;
  float max_norm = 0;                 // the largest n_y or n_q (screening needs <= kScreenMax)
  std::vector<float> center;          // μ: the candidates' mean
  std::vector<uint16_t> y;            // m_pad / 16 blocks × steps tiles of 16 × 32
  std::vector<float> ql, qu, yl, yu;  // (1 ∓ α)·n per query / per candidate (+inf for padding)

  void build(const float* x, index_t n_, const float* yp, index_t m_, index_t d_) {
    n = n_;
    m = m_;
    d = d_;
    dp = (d + kDepth - 1) / kDepth * kDepth;
    steps = dp / kDepth;
    m_pad = (m + kPairCols - 1) / kPairCols * kPairCols;
    alpha = screen_alpha(dp);
    std::vector<double> mu(d, 0.0);
    for (index_t j = 0; j < m; ++j) {
      for (index_t t = 0; t < d; ++t) mu[t] += yp[j * d + t];
    }
    center.resize(d);
    const float* c = center.data();
    for (index_t t = 0; t < d; ++t) center[t] = static_cast<float>(mu[t] / static_cast<double>(m > 0 ? m : 1));
    const index_t n_rows = (n + kGroupRows - 1) / kGroupRows * kGroupRows;
    ql.assign(n_rows, 0.0f);
    qu.assign(n_rows, 0.0f);
    y.assign(m_pad * dp, 0);
    const float inf = std::numeric_limits<float>::infinity();
    yl.assign(m_pad, inf);
    yu.assign(m_pad, inf);
    max_norm = 0;
    for (index_t i = 0; i < n; ++i) {
      float nrm = 0;
      for (index_t t = 0; t < d; ++t) {
        const float v = x[i * d + t] - c[t];
        nrm = __builtin_fmaf(v, v, nrm);
      }
      max_norm = std::max(max_norm, nrm);
      ql[i] = (1.0f - alpha) * nrm;
      qu[i] = (1.0f + alpha) * nrm;
    }
    for (index_t j = 0; j < m; ++j) {
      float nrm = 0;
      uint16_t* blk = y.data() + (j / 16) * steps * 512;
      const index_t col = j % 16;
      for (index_t t = 0; t < d; ++t) {
        const float u = yp[j * d + t] - c[t];
        nrm = __builtin_fmaf(u, u, nrm);
        const index_t step = t / kDepth, kk = t % kDepth;
        blk[step * 512 + (kk / 2) * 32 + col * 2 + (kk % 2)] = static_cast<uint16_t>(bf16_bits(u));
      }
      max_norm = std::max(max_norm, nrm);
      yl[j] = (1.0f - alpha) * nrm;
      yu[j] = (1.0f + alpha) * nrm;
    }
  }
};

// Rows [r0, r0 + rows) of the queries as A-tile rows of v̂ = bf16(−2·fl(x − μ)) (zero past d and past n), into out
// (rows rounded up to 32, dp each): packed per thread block, so that no N·dp copy of the queries exists.
inline void pack_queries(const Packed& pk, const float* x, index_t r0, index_t rows, uint16_t* out) {
  const index_t d = pk.d, dp = pk.dp;
  const index_t padded = (rows + kGroupRows - 1) / kGroupRows * kGroupRows;
  std::fill(out, out + padded * dp, uint16_t(0));
  for (index_t r = 0; r < rows; ++r) {
    const float* xi = x + (r0 + r) * d;
    for (index_t t = 0; t < d; ++t) out[r * dp + t] = static_cast<uint16_t>(bf16_bits(-2.0f * (xi[t] - pk.center[t])));
  }
}

// One query's running state: the k smallest U so far (sorted), and the kept (L, j) pairs.
struct QueryState {
  float* row_thr;          // threshold() − (1 − α)·n_q: what c + (1 − α)·n_y is compared with (a flat array)
  float nl;                // (1 − α)·n_q
  std::vector<float> top;  // ascending, size k (+inf until filled)
  std::vector<std::pair<float, index_t>> kept;
  size_t compact_at = 64;
  void reset(index_t k, float nl_q, float* thr_slot) {
    nl = nl_q;
    row_thr = thr_slot;
    top.assign(k, std::numeric_limits<float>::infinity());
    *row_thr = std::numeric_limits<float>::infinity();
    kept.clear();
    compact_at = 64;
  }
  float threshold() const { return top.back() * kSlack; }
  void offer_upper(float u) {
    if (!(u < top.back())) return;
    index_t p = static_cast<index_t>(top.size()) - 1;
    while (p > 0 && u < top[p - 1]) {
      top[p] = top[p - 1];
      --p;
    }
    top[p] = u;
    *row_thr = threshold() - nl;
  }
  void keep(float l, index_t j) {
    kept.emplace_back(l, j);
    if (kept.size() >= compact_at) {
      const float thr = threshold();
      size_t w = 0;
      for (const auto& e : kept) {
        if (e.first <= thr) kept[w++] = e;
      }
      kept.resize(w);
      compact_at = std::max<size_t>(64, 2 * w);
    }
  }
};

// The exact s of query row x against candidate row y: rule 1's sequence.
INFOFUSE_KNN_AMX_TARGET static inline float exact_s(const float* x, const float* y, index_t d) {
  float s = 0;
  for (index_t t = 0; t < d; ++t) s = step<kEuclidean, true>(s, y[t] - x[t]);
  return s;
}

struct Problem {
  const float* x;
  const float* y;
  const Packed* pk;
  index_t k;
  bool exclude_self;
  float* out_dist;
  index_t* out_idx;
};

// The pairs of query row r that passed: their L and U into the query's state.
INFOFUSE_KNN_AMX_TARGET __attribute__((noinline)) static void take_passed(const Packed& pk, const float* c, index_t i,
                                                                          index_t j0, uint32_t pass, QueryState& st) {
  for (; pass != 0; pass &= pass - 1) {
    const int b = __builtin_ctz(pass);
    const index_t j = j0 + b;
    st.offer_upper(c[b] + pk.yu[j] + pk.qu[i]);
    st.keep(c[b] + pk.yl[j] + pk.ql[i], j);
  }
}

// Screens the 32 × 32 products in cbuf for queries [i0, i0 + 32) and candidates [j0, j0 + 32). row_thr[r] is row
// r's threshold less its (1 − α)·n_q: L <= T is tested as c + (1 − α)·n_y <= T − (1 − α)·n_q (two roundings,
// covered like those of L itself). The scalar L and U of a passing pair are formed in the same order as the
// vector ones would be.
INFOFUSE_KNN_AMX_TARGET static inline void screen_tile(const Problem& pb, const float* cbuf, index_t i0, index_t j0,
                                                       QueryState* states, const float* row_thr) {
  const Packed& pk = *pb.pk;
  const __m512 yl0 = _mm512_loadu_ps(pk.yl.data() + j0), yl1 = _mm512_loadu_ps(pk.yl.data() + j0 + 16);
  const index_t rows = std::min(kGroupRows, pk.n - i0);
  uint32_t masks[kGroupRows];
  uint32_t any = 0;
  for (index_t r = 0; r < rows; ++r) {
    const __m512 thr = _mm512_set1_ps(row_thr[r]);
    const __m512 l0 = _mm512_add_ps(_mm512_load_ps(cbuf + r * 32), yl0);
    const __m512 l1 = _mm512_add_ps(_mm512_load_ps(cbuf + r * 32 + 16), yl1);
    const uint32_t pass = _cvtmask16_u32(_mm512_cmp_ps_mask(l0, thr, _CMP_LE_OQ)) |
                          (_cvtmask16_u32(_mm512_cmp_ps_mask(l1, thr, _CMP_LE_OQ)) << 16);
    masks[r] = pass;
    any |= pass;
  }
  if (any == 0) return;
  const bool diag = pb.exclude_self && i0 < j0 + kPairCols && j0 < i0 + kGroupRows;
  for (index_t r = 0; r < rows; ++r) {
    uint32_t pass = masks[r];
    const index_t i = i0 + r;
    if (diag && i >= j0 && i < j0 + kPairCols) pass &= ~(1u << (i - j0));
    if (pass != 0) take_passed(pk, cbuf + r * 32, i, j0, pass, states[r]);
  }
}

// s of one pair by 16-lane float fmas and a tree sum: not rule 1's sequence, but a sum of the same d rounded
// squares (the differences round alike), so it differs from the exact s by at most (2d + 16)·2^-24 of either.
INFOFUSE_KNN_AMX_TARGET static inline float vector_s(const float* x, const float* y, index_t d) {
  __m512 acc = _mm512_setzero_ps();
  index_t t = 0;
  for (; t + 16 <= d; t += 16) {
    const __m512 diff = _mm512_sub_ps(_mm512_loadu_ps(y + t), _mm512_loadu_ps(x + t));
    acc = _mm512_fmadd_ps(diff, diff, acc);
  }
  if (t < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - t)) - 1u);
    const __m512 diff = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, y + t), _mm512_maskz_loadu_ps(m, x + t));
    acc = _mm512_fmadd_ps(diff, diff, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Finishes query i in two sieves. The kept pairs under the final threshold get vector_s, whose error is relative
// (about 2^-16 at d = 128 against the tile screen's 2^-6 of the norms); the k-th smallest of its upper bounds is a
// second threshold that leaves about k pairs, and those get the exact s (rule 1: a chain of d dependent fmas) and
// compete in the TopK. An absolute 2^-100 covers subnormals flushed under a flush-to-zero mode. Where the first
// threshold is too small for the tile screen's slack, every candidate goes through both sieves.
INFOFUSE_KNN_AMX_TARGET static inline void finish_query(const Problem& pb, index_t i, QueryState& st, float* dist,
                                                        index_t* idx, std::vector<std::pair<float, index_t>>& sieve) {
  const Packed& pk = *pb.pk;
  const index_t d = pk.d;
  const float* xi = pb.x + i * d;
  const float thr = st.threshold();
  const bool all = !(thr >= kScreenMin);
  sieve.clear();
  auto consider = [&](index_t j) {
    if (!(pb.exclude_self && j == i)) sieve.emplace_back(vector_s(xi, pb.y + j * d, d), j);
  };
  if (all) {
    for (index_t j = 0; j < pk.m; ++j) consider(j);
  } else {
    for (const auto& e : st.kept) {
      if (e.first <= thr) consider(e.second);
    }
  }
  const float eps = static_cast<float>(2 * d + 16) * 0x1p-24f, tiny = 0x1p-100f;
  const index_t k = pb.k;
  float thr2 = std::numeric_limits<float>::infinity();
  if (static_cast<index_t>(sieve.size()) > k) {
    std::nth_element(sieve.begin(), sieve.begin() + (k - 1), sieve.end());
    thr2 = (sieve[k - 1].first * (1.0f + eps) + tiny) * (1.0f + 0x1p-20f);
  }
  TopK<float> top{dist, idx, k, 0};
  for (const auto& [sv, j] : sieve) {
    if (sv * (1.0f - eps) - tiny > thr2) continue;
    const float D = std::sqrt(exact_s(xi, pb.y + j * d, d));
    if (top.admits(D, j)) top.insert(D, j);
  }
  top.finish(sieve);
}

// A worker: takes blocks of kBlockGroups query groups from `next` until none is left.
INFOFUSE_KNN_AMX_TARGET static void worker(const Problem& pb, std::atomic<index_t>* next) {
  const Packed& pk = *pb.pk;
  const index_t block_rows = kBlockGroups * kGroupRows;
  const index_t n_blocks = (pk.n + block_rows - 1) / block_rows;
  const index_t dp = pk.dp, steps = pk.steps;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float cbuf[kGroupRows * kPairCols];
  std::vector<QueryState> states(block_rows);
  std::vector<float> row_thr(block_rows);
  std::vector<uint16_t> qblk(block_rows * dp);
  std::vector<std::pair<float, index_t>> sort_buffer;
  for (index_t blk = next->fetch_add(1); blk < n_blocks; blk = next->fetch_add(1)) {
    const index_t b0 = blk * block_rows;
    const index_t groups = std::min(kBlockGroups, (pk.n - b0 + kGroupRows - 1) / kGroupRows);
    for (index_t r = 0; r < groups * kGroupRows; ++r) {
      states[r].reset(pb.k, pk.ql[std::min(b0 + r, pk.n - 1)], row_thr.data() + r);
    }
    pack_queries(pk, pb.x, b0, std::min(block_rows, pk.n - b0), qblk.data());
    for (index_t c0 = 0; c0 < pk.m_pad; c0 += kChunkCols) {
      const index_t c1 = std::min(pk.m_pad, c0 + kChunkCols);
      for (index_t g = 0; g < groups; ++g) {
        const index_t i0 = b0 + g * kGroupRows;
        const uint16_t* a = qblk.data() + g * kGroupRows * dp;
        for (index_t j0 = c0; j0 < c1; j0 += kPairCols) {
          const uint16_t* b = pk.y.data() + (j0 / 16) * steps * 512;
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (index_t s = 0; s < steps; ++s) {
            // One step (d <= 32): the group's A tiles stay loaded across the chunk. Each load sits just before
            // the first product that needs it, to overlap the products already issued (tile registers are not
            // renamed).
            const bool load_a = steps > 1 || j0 == c0;
            if (load_a) _tile_loadd(4, a + s * kDepth, dp * 2);
            _tile_loadd(6, b + s * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, b + steps * 512 + s * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            if (load_a) _tile_loadd(5, a + 16 * dp + s * kDepth, dp * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          _tile_stored(0, cbuf, kPairCols * 4);
          _tile_stored(1, cbuf + 16, kPairCols * 4);
          _tile_stored(2, cbuf + 16 * kPairCols, kPairCols * 4);
          _tile_stored(3, cbuf + 16 * kPairCols + 16, kPairCols * 4);
          screen_tile(pb, cbuf, i0, j0, states.data() + g * kGroupRows, row_thr.data() + g * kGroupRows);
        }
      }
    }
    for (index_t r = 0; r < std::min(block_rows, pk.n - b0); ++r) {
      const index_t i = b0 + r;
      finish_query(pb, i, states[r], pb.out_dist + i * pb.k, pb.out_idx + i * pb.k, sort_buffer);
    }
  }
  _tile_release();
}

}  // namespace infofuse::cpu::knn::amx

#endif  // INFOFUSE_KNN_AMX
