// Element kernels of the CPU pairwise losses (InfoNCE, SupCon, SigLIP): loops over one row, or one strip of
// columns, of a chunk of scores.
//
// Plain C++ on float/double arrays, free of torch headers, written like row_kernels.h so that GCC vectorises
// them: masks are selects computed from the label vectors in the loop (never an N×M mask), exps are exp_fast,
// and every float entry point is compiled per target (INFOFUSE_CLONES) with its variants inlined into it.
// double rows (float64 inputs) take std::exp/std::log1p.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "row_kernels.h"

namespace infofuse::cpu {

// Rows of a chunk folded into the running column max between two rescales (the online column log-sum-exp),
// and columns per strip (the strip's state, kColStrip floats, stays in L1 over those rows).
constexpr index_t kColTileRows = 16;
constexpr index_t kColStrip = 512;

// Row i's view of the masks of the InfoNCE ops.
struct PairMask {
  const int64_t* key_labels = nullptr;  // null: no label rule
  int64_t label = 0;                    // labels[i]
  index_t keep = -1;                    // mode 0: target[i], which the label rule never blocks
  index_t self = -1;                    // the column removed as "self" (i), or -1 for none
  bool supcon = false;                  // labels pick positives (mode 1) rather than blocked columns (mode 0)
};

// log1p(e) for e in [0, 1], to about 1 ulp: Cephes' logf polynomial on f = e (e <= √2 − 1) or on
// f = (e − 1)/2 = (1 + e)/2 − 1 plus ln 2, with no bit tricks, so that it vectorises.
static INFOFUSE_INLINE float log1p_unit(float e) {
  const bool hi = e > 0.41421356f;
  const float f = hi ? (e - 1.0f) * 0.5f : e;
  const float k = hi ? 1.0f : 0.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += k * -2.12194440e-4f;
  y += -0.5f * z;
  return (f + y) + k * 0.693359375f;
}

static INFOFUSE_INLINE double log1p_unit(double e) { return std::log1p(e); }

// softplus(u) = max(u, 0) + log1p(exp(−|u|)) and sigmoid(u) = (u >= 0 ? 1 : exp(−|u|)) / (1 + exp(−|u|)).
template <typename T>
static INFOFUSE_INLINE T softplus_stable(T u) {
  const T a = u < T(0) ? -u : u;
  return (u > T(0) ? u : T(0)) + log1p_unit(exp_fast(-a));
}

template <typename T>
static INFOFUSE_INLINE T sigmoid_stable(T u) {
  const T a = u < T(0) ? -u : u;
  const T e = exp_fast(-a);
  return (u >= T(0) ? T(1) : e) / (T(1) + e);
}

// ---------------------------------------------------------------------------------------------------------------
// InfoNCE forward, one row: z holds q_i·k_j on entry and S_ij = scale·q_i·k_j on exit, −inf where (i, j) is
// blocked. Returns the max over the allowed columns (−inf if none); with SupCon positives, adds
// Σ_{j∈P(i)} S_ij to *pos_sum.
template <typename T, bool kSelf, bool kLabelBlock, bool kPositives>
static INFOFUSE_INLINE T nce_prepare_row_impl(T* __restrict z, index_t m, T scale, const PairMask& mk,
                                              double* pos_sum) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t* __restrict kl = mk.key_labels;
  const int64_t label = mk.label;
  const index_t keep = mk.keep, self = mk.self;
  T mx = ninf;
  double psum = 0.0;
  for (index_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const index_t j1 = std::min(m, j0 + kSumBlock);
    T ps = 0;
#pragma omp simd reduction(max : mx) reduction(+ : ps)
    for (index_t j = j0; j < j1; ++j) {
      T s = scale * z[j];
      bool blocked = false;
      if constexpr (kSelf) blocked = j == self;
      if constexpr (kLabelBlock) blocked = blocked || (kl[j] == label && j != keep);
      if constexpr (kPositives) ps += (kl[j] == label && j != self) ? s : T(0);
      s = blocked ? ninf : s;
      z[j] = s;
      mx = s > mx ? s : mx;
    }
    psum += static_cast<double>(ps);
  }
  if constexpr (kPositives) *pos_sum += psum;
  return mx;
}

template <typename T>
static INFOFUSE_INLINE T nce_prepare_row_any(T* z, index_t m, T scale, const PairMask& mk, double* pos_sum) {
  const bool self = mk.self >= 0;
  if (mk.key_labels == nullptr) {
    return self ? nce_prepare_row_impl<T, true, false, false>(z, m, scale, mk, pos_sum)
                : nce_prepare_row_impl<T, false, false, false>(z, m, scale, mk, pos_sum);
  }
  if (mk.supcon) {
    return self ? nce_prepare_row_impl<T, true, false, true>(z, m, scale, mk, pos_sum)
                : nce_prepare_row_impl<T, false, false, true>(z, m, scale, mk, pos_sum);
  }
  return self ? nce_prepare_row_impl<T, true, true, false>(z, m, scale, mk, pos_sum)
              : nce_prepare_row_impl<T, false, true, false>(z, m, scale, mk, pos_sum);
}

// ---------------------------------------------------------------------------------------------------------------
// InfoNCE forward, columns [0, width) of `rows` rows of scores (row stride ld, −inf where blocked): folds them
// into the running column state cm (max) and cl (Σ exp(S − cm)), which start at −inf and 0. The max is updated
// once per kColTileRows rows (rescaling cl then), so that each score costs one exp.
template <typename T>
static INFOFUSE_INLINE void nce_col_update_impl(const T* __restrict z, index_t ld, index_t rows, index_t width,
                                                T* __restrict cm, T* __restrict cl) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T bm[kColStrip];
  for (index_t w0 = 0; w0 < width; w0 += kColStrip) {
    const index_t w = std::min(kColStrip, width - w0);
    T* __restrict m_run = cm + w0;
    T* __restrict l_run = cl + w0;
    for (index_t r0 = 0; r0 < rows; r0 += kColTileRows) {
      const index_t r1 = std::min(rows, r0 + kColTileRows);
#pragma omp simd
      for (index_t j = 0; j < w; ++j) bm[j] = m_run[j];
      for (index_t r = r0; r < r1; ++r) {
        const T* __restrict zr = z + r * ld + w0;
#pragma omp simd
        for (index_t j = 0; j < w; ++j) bm[j] = zr[j] > bm[j] ? zr[j] : bm[j];
      }
      // A column still all −inf keeps shift 0: exp(−inf − 0) = 0, never exp(−inf + inf).
#pragma omp simd
      for (index_t j = 0; j < w; ++j) {
        const T shift = bm[j] == ninf ? T(0) : bm[j];
        l_run[j] *= exp_fast(m_run[j] - shift);
        m_run[j] = bm[j];
        bm[j] = shift;
      }
      for (index_t r = r0; r < r1; ++r) {
        const T* __restrict zr = z + r * ld + w0;
#pragma omp simd
        for (index_t j = 0; j < w; ++j) l_run[j] += exp_fast(zr[j] - bm[j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// InfoNCE backward, one row: z holds q_i·k_j on entry and scale·G_ij on exit, where
//   G_ij = allowed_ij·(g_row·exp(S_ij − lse) + g_col[j]·exp(S_ij − col_lse[j])) − g_pos·[j ∈ P(i)]
// (the column term only with g_col, the positive term only with SupCon positives). The −g_row at the target
// and −g_col[j] at col_target[j] are the caller's. Returns Σ_j G_ij·q_i·k_j.
template <typename T, bool kSelf, bool kLabelBlock, bool kPositives, bool kCols>
static INFOFUSE_INLINE double nce_grad_row_impl(T* __restrict z, index_t m, T scale, T g_row, T lse, T g_pos,
                                                const T* __restrict g_col, const T* __restrict col_lse,
                                                const PairMask& mk) {
  const int64_t* __restrict kl = mk.key_labels;
  const int64_t label = mk.label;
  const index_t keep = mk.keep, self = mk.self;
  double total = 0.0;
  for (index_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const index_t j1 = std::min(m, j0 + kSumBlock);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (index_t j = j0; j < j1; ++j) {
      const T p = z[j];
      const T s = scale * p;
      bool blocked = false;
      if constexpr (kSelf) blocked = j == self;
      if constexpr (kLabelBlock) blocked = blocked || (kl[j] == label && j != keep);
      T g = g_row * exp_fast(s - lse);
      if constexpr (kCols) g += g_col[j] * exp_fast(s - col_lse[j]);
      g = blocked ? T(0) : g;
      if constexpr (kPositives) g -= (kl[j] == label && j != self) ? g_pos : T(0);
      acc += g * p;
      z[j] = scale * g;
    }
    total += static_cast<double>(acc);
  }
  return total;
}

template <typename T, bool kCols>
static INFOFUSE_INLINE double nce_grad_row_cols(T* z, index_t m, T scale, T g_row, T lse, T g_pos, const T* g_col,
                                                const T* col_lse, const PairMask& mk) {
  const bool self = mk.self >= 0;
  if (mk.key_labels == nullptr) {
    return self ? nce_grad_row_impl<T, true, false, false, kCols>(z, m, scale, g_row, lse, g_pos, g_col, col_lse, mk)
                : nce_grad_row_impl<T, false, false, false, kCols>(z, m, scale, g_row, lse, g_pos, g_col, col_lse, mk);
  }
  if (mk.supcon) {
    return self ? nce_grad_row_impl<T, true, false, true, kCols>(z, m, scale, g_row, lse, g_pos, g_col, col_lse, mk)
                : nce_grad_row_impl<T, false, false, true, kCols>(z, m, scale, g_row, lse, g_pos, g_col, col_lse, mk);
  }
  return self ? nce_grad_row_impl<T, true, true, false, kCols>(z, m, scale, g_row, lse, g_pos, g_col, col_lse, mk)
              : nce_grad_row_impl<T, false, true, false, kCols>(z, m, scale, g_row, lse, g_pos, g_col, col_lse, mk);
}

template <typename T>
static INFOFUSE_INLINE double nce_grad_row_any(T* z, index_t m, T scale, T g_row, T lse, T g_pos, const T* g_col,
                                               const T* col_lse, const PairMask& mk) {
  return g_col != nullptr ? nce_grad_row_cols<T, true>(z, m, scale, g_row, lse, g_pos, g_col, col_lse, mk)
                          : nce_grad_row_cols<T, false>(z, m, scale, g_row, lse, g_pos, g_col, col_lse, mk);
}

// ---------------------------------------------------------------------------------------------------------------
// SigLIP, one row of q_i·k_j (read only): Σ_j softplus(u_j), u_j = −y_ij·(scale·q_i·k_j + bias), y = +1 at
// j == diag (−1 for none) and −1 elsewhere.
template <typename T>
static INFOFUSE_INLINE double siglip_row_loss_impl(const T* __restrict z, index_t m, T scale, T bias, index_t diag) {
  double total = 0.0;
  for (index_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const index_t j1 = std::min(m, j0 + kSumBlock);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (index_t j = j0; j < j1; ++j) {
      const T x = scale * z[j] + bias;
      acc += softplus_stable(j == diag ? -x : x);
    }
    total += static_cast<double>(acc);
  }
  return total;
}

// SigLIP backward, one row: z holds q_i·k_j on entry and scale·G_ij on exit, G_ij = g_row·(−y_ij)·σ(u_j).
// Adds Σ_j G_ij to *sum_g and Σ_j G_ij·q_i·k_j to *sum_gp.
template <typename T>
static INFOFUSE_INLINE void siglip_grad_row_impl(T* __restrict z, index_t m, T scale, T bias, index_t diag, T g_row,
                                                 double* sum_g, double* sum_gp) {
  double tg = 0.0, tgp = 0.0;
  for (index_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const index_t j1 = std::min(m, j0 + kSumBlock);
    T ag = 0, agp = 0;
#pragma omp simd reduction(+ : ag, agp)
    for (index_t j = j0; j < j1; ++j) {
      const T p = z[j];
      const T x = scale * p + bias;
      const bool d = j == diag;
      const T sg = sigmoid_stable(d ? -x : x);
      const T g = g_row * (d ? -sg : sg);
      ag += g;
      agp += g * p;
      z[j] = scale * g;
    }
    tg += static_cast<double>(ag);
    tgp += static_cast<double>(agp);
  }
  *sum_g += tg;
  *sum_gp += tgp;
}

// Entry points: float ones compiled once per target (INFOFUSE_CLONES), double ones once.
INFOFUSE_CLONES static float nce_prepare_row(float* z, index_t m, float scale, const PairMask& mk, double* pos_sum) {
  return nce_prepare_row_any(z, m, scale, mk, pos_sum);
}
static double nce_prepare_row(double* z, index_t m, double scale, const PairMask& mk, double* pos_sum) {
  return nce_prepare_row_any(z, m, scale, mk, pos_sum);
}

INFOFUSE_CLONES static void nce_col_update(const float* z, index_t ld, index_t rows, index_t width, float* cm,
                                           float* cl) {
  nce_col_update_impl(z, ld, rows, width, cm, cl);
}
static void nce_col_update(const double* z, index_t ld, index_t rows, index_t width, double* cm, double* cl) {
  nce_col_update_impl(z, ld, rows, width, cm, cl);
}

INFOFUSE_CLONES static double nce_grad_row(float* z, index_t m, float scale, float g_row, float lse, float g_pos,
                                           const float* g_col, const float* col_lse, const PairMask& mk) {
  return nce_grad_row_any(z, m, scale, g_row, lse, g_pos, g_col, col_lse, mk);
}
static double nce_grad_row(double* z, index_t m, double scale, double g_row, double lse, double g_pos,
                           const double* g_col, const double* col_lse, const PairMask& mk) {
  return nce_grad_row_any(z, m, scale, g_row, lse, g_pos, g_col, col_lse, mk);
}

INFOFUSE_CLONES static double siglip_row_loss(const float* z, index_t m, float scale, float bias, index_t diag) {
  return siglip_row_loss_impl(z, m, scale, bias, diag);
}
static double siglip_row_loss(const double* z, index_t m, double scale, double bias, index_t diag) {
  return siglip_row_loss_impl(z, m, scale, bias, diag);
}

INFOFUSE_CLONES static void siglip_grad_row(float* z, index_t m, float scale, float bias, index_t diag, float g_row,
                                            double* sum_g, double* sum_gp) {
  siglip_grad_row_impl(z, m, scale, bias, diag, g_row, sum_g, sum_gp);
}
static void siglip_grad_row(double* z, index_t m, double scale, double bias, index_t diag, double g_row, double* sum_g,
                            double* sum_gp) {
  siglip_grad_row_impl(z, m, scale, bias, diag, g_row, sum_g, sum_gp);
}

}  // namespace infofuse::cpu
