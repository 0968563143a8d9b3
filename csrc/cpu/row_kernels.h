// Row kernels of the CPU linear cross-entropy: the fused pass over one row of logits.
//
// Plain C++ on float/double arrays, free of torch headers. The loops are written so that GCC vectorises them
// (`omp simd` reductions, a branch-free exp); on x86-64 with GCC each float entry point is compiled for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and baseline, and the loader picks the best one for the
// machine (target_clones). double rows (float64 inputs) take the plain path with std::exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define INFOFUSE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define INFOFUSE_CLONES
#endif
#define INFOFUSE_INLINE inline __attribute__((always_inline))

namespace infofuse::cpu {

using index_t = int64_t;

// Partial sums run over blocks of this many elements in the row's own precision (simd lanes), and the
// block sums are added in double: the error of a row sum stays near one block's, whatever V is.
constexpr index_t kSumBlock = 1024;

// exp(x) for float, to about 2 ulp where the result is a normal float; 0 below -87.3, and NaN for NaN.
// Callers only pass x <= 0 (logit minus the row max or lse). Written with selects and no calls, so that the
// loops calling it vectorise on every target: x = n·ln2 + r with |r| <= ln2/2, n rounded by the 1.5·2²³
// shifter, and a degree-6 polynomial for exp(r) (Cephes' expf coefficients).
static INFOFUSE_INLINE float exp_fast(float x) {
  const float lo = -87.3f, hi = 88.0f;
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f;  // ln 2 split in two so that n·ln2_hi is exact
  const float ln2_lo = -2.12194440e-4f;
  const float shifter = 12582912.0f;  // 1.5·2²³: adding it rounds a float below 2²² to an integer
  float xc = x < lo ? lo : x;         // NaN passes through both selects
  xc = xc > hi ? hi : xc;
  const float n = (xc * log2e + shifter) - shifter;
  const float r = (xc - n * ln2_hi) - n * ln2_lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x < lo ? 0.0f : y;
}

static INFOFUSE_INLINE double exp_fast(double x) { return std::exp(x); }

template <typename T>
static INFOFUSE_INLINE T row_max_impl(const T* __restrict z, index_t v) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (index_t j = 0; j < v; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

// Σ_j exp(z_j − m).
template <typename T>
static INFOFUSE_INLINE double row_sum_exp_impl(const T* __restrict z, index_t v, T m) {
  double total = 0.0;
  for (index_t j0 = 0; j0 < v; j0 += kSumBlock) {
    const index_t j1 = std::min(v, j0 + kSumBlock);
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (index_t j = j0; j < j1; ++j) s += exp_fast(z[j] - m);
    total += static_cast<double>(s);
  }
  return total;
}

// Σ_j exp(z_j − m) returned, and Σ_j exp(z_j − m)·(z_j − m) into *t: the entropy of the row's softmax is
// log s − t/s (each term of t is <= 0 and relative to the row max, so nothing cancels against a large max).
template <typename T>
static INFOFUSE_INLINE double row_sum_exp_entropy_impl(const T* __restrict z, index_t v, T m, double* t) {
  double total = 0.0, total_t = 0.0;
  for (index_t j0 = 0; j0 < v; j0 += kSumBlock) {
    const index_t j1 = std::min(v, j0 + kSumBlock);
    T s = 0, st = 0;
#pragma omp simd reduction(+ : s, st)
    for (index_t j = j0; j < j1; ++j) {
      const T d = z[j] - m;
      const T e = exp_fast(d);
      s += e;
      st += e * d;
    }
    total += static_cast<double>(s);
    total_t += static_cast<double>(st);
  }
  *t = total_t;
  return total;
}

// z_j *= k (the temperature's 1/T on a row of logits).
template <typename T>
static INFOFUSE_INLINE void row_scale_impl(T* __restrict z, index_t v, T k) {
#pragma omp simd
  for (index_t j = 0; j < v; ++j) z[j] *= k;
}

// Σ_j w_j·(m − z_j), every term >= 0 (w_j = 1 where w is null): label smoothing's Σ_j w_j·(lse − z_j) is
// this plus Σ_j w_j · (lse − m), with no cancellation.
template <typename T>
static INFOFUSE_INLINE double row_gap_sum_impl(const T* __restrict z, const T* __restrict w, index_t v, T m) {
  double total = 0.0;
  for (index_t j0 = 0; j0 < v; j0 += kSumBlock) {
    const index_t j1 = std::min(v, j0 + kSumBlock);
    T s = 0;
    if (w == nullptr) {
#pragma omp simd reduction(+ : s)
      for (index_t j = j0; j < j1; ++j) s += m - z[j];
    } else {
#pragma omp simd reduction(+ : s)
      for (index_t j = j0; j < j1; ++j) s += w[j] * (m - z[j]);
    }
    total += static_cast<double>(s);
  }
  return total;
}

// The gradient of the loss with respect to the pre-softcap logits, written over z (which holds the
// post-softcap logits on entry):
//   g_j = (a·exp(z_j − lse) − c·w_j) · (slope ? slope_j : 1)     (w_j = 1 where w is null)
// slope_j = 1 − tanh²(z_j/cap) of the raw logit (softcap_slope); the target column's term is the caller's.
template <typename T>
static INFOFUSE_INLINE void row_grad_impl(T* __restrict z, const T* __restrict w, index_t v, T lse, T a, T c,
                                          const T* __restrict slope) {
  if (slope != nullptr) {
    if (w == nullptr) {
#pragma omp simd
      for (index_t j = 0; j < v; ++j) z[j] = (a * exp_fast(z[j] - lse) - c) * slope[j];
    } else {
#pragma omp simd
      for (index_t j = 0; j < v; ++j) z[j] = (a * exp_fast(z[j] - lse) - c * w[j]) * slope[j];
    }
  } else if (w == nullptr) {
#pragma omp simd
    for (index_t j = 0; j < v; ++j) z[j] = a * exp_fast(z[j] - lse) - c;
  } else {
#pragma omp simd
    for (index_t j = 0; j < v; ++j) z[j] = a * exp_fast(z[j] - lse) - c * w[j];
  }
}

// row_grad with the entropy's term: g_j = (p_j·(a − e·(z_j − h)) − c·w_j) · (slope ? slope_j : 1), where
// p_j = exp(z_j − lse) and h = lse − H: −e·p_j·(z_j − lse + H) is e times the gradient of H with respect to z_j.
template <typename T>
static INFOFUSE_INLINE void row_grad_entropy_impl(T* __restrict z, const T* __restrict w, index_t v, T lse, T a, T c,
                                                  T e, T h, const T* __restrict slope) {
  // four loops with the branches outside, so that each vectorises (as row_grad_impl's)
  if (slope != nullptr) {
    if (w == nullptr) {
#pragma omp simd
      for (index_t j = 0; j < v; ++j) z[j] = (exp_fast(z[j] - lse) * (a - e * (z[j] - h)) - c) * slope[j];
    } else {
#pragma omp simd
      for (index_t j = 0; j < v; ++j) z[j] = (exp_fast(z[j] - lse) * (a - e * (z[j] - h)) - c * w[j]) * slope[j];
    }
  } else if (w == nullptr) {
#pragma omp simd
    for (index_t j = 0; j < v; ++j) z[j] = exp_fast(z[j] - lse) * (a - e * (z[j] - h)) - c;
  } else {
#pragma omp simd
    for (index_t j = 0; j < v; ++j) z[j] = exp_fast(z[j] - lse) * (a - e * (z[j] - h)) - c * w[j];
  }
}

// Softcap of a raw logit: cap·tanh(x/cap) into *capped and its derivative 1 − tanh²(x/cap) into *slope, the
// derivative as 4e/(1 + e)² with e = exp(−2|x|/cap), accurate to rounding even where tanh saturates (1 − th²
// from a rounded th keeps no correct digit there).
template <typename T>
static inline void softcap_slope(T x, T cap, T* capped, T* slope) {
  const T e = std::exp(T(-2) * std::abs(x) / cap);
  *capped = cap * std::tanh(x / cap);
  *slope = T(4) * e / ((T(1) + e) * (T(1) + e));
}

// Entry points: float ones are compiled once per target (see INFOFUSE_CLONES), double ones once.
INFOFUSE_CLONES static float row_max(const float* z, index_t v) { return row_max_impl(z, v); }
static double row_max(const double* z, index_t v) { return row_max_impl(z, v); }

INFOFUSE_CLONES static double row_sum_exp(const float* z, index_t v, float m) { return row_sum_exp_impl(z, v, m); }
static double row_sum_exp(const double* z, index_t v, double m) { return row_sum_exp_impl(z, v, m); }

INFOFUSE_CLONES static double row_sum_exp_entropy(const float* z, index_t v, float m, double* t) {
  return row_sum_exp_entropy_impl(z, v, m, t);
}
static double row_sum_exp_entropy(const double* z, index_t v, double m, double* t) {
  return row_sum_exp_entropy_impl(z, v, m, t);
}

INFOFUSE_CLONES static void row_scale(float* z, index_t v, float k) { row_scale_impl(z, v, k); }
static void row_scale(double* z, index_t v, double k) { row_scale_impl(z, v, k); }

INFOFUSE_CLONES static double row_gap_sum(const float* z, const float* w, index_t v, float m) {
  return row_gap_sum_impl(z, w, v, m);
}
static double row_gap_sum(const double* z, const double* w, index_t v, double m) {
  return row_gap_sum_impl(z, w, v, m);
}

INFOFUSE_CLONES static void row_grad(float* z, const float* w, index_t v, float lse, float a, float c,
                                     const float* slope) {
  row_grad_impl(z, w, v, lse, a, c, slope);
}
static void row_grad(double* z, const double* w, index_t v, double lse, double a, double c, const double* slope) {
  row_grad_impl(z, w, v, lse, a, c, slope);
}

INFOFUSE_CLONES static void row_grad_entropy(float* z, const float* w, index_t v, float lse, float a, float c, float e,
                                             float h, const float* slope) {
  row_grad_entropy_impl(z, w, v, lse, a, c, e, h, slope);
}
static void row_grad_entropy(double* z, const double* w, index_t v, double lse, double a, double c, double e, double h,
                             const double* slope) {
  row_grad_entropy_impl(z, w, v, lse, a, c, e, h, slope);
}

}  // namespace infofuse::cpu
