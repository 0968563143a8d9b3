// CPU linear KL / generalised JSD between two linear heads, without the N×V logits.
//
// Per chunk of rows: the student's and the teacher's logits by ATen's GEMM into two reused buffers, then one
// fused pass per row that forms both log-softmaxes (of z/T), the row's divergence and, in place, the gradient
// of the loss with respect to each head's logits; then dX = G·W and dW += Gᵀ·X per head by ATen's GEMM. For
// "mean"/"sum" the gradients are formed in forward, while the chunk is hot (2 + 2 GEMMs for the student, 2 more
// with teacher gradients); "none" recomputes everything in backward with the per-token upstream gradient. At
// most one chunk of each head's logits exists at a time. Accumulation is in float (double for float64 inputs).
//
// Per row, with log q = log_softmax(z_s/T) (student), log p = log_softmax(z_t/T) (teacher), β = beta and ℓ the
// row's divergence (docs/kl_divergence.md), the gradients with respect to the scaled logits are
//   β = 0, ℓ = KL(P‖Q):  d/da = q − p,                     d/db = p·(log p − log q − ℓ)
//   β = 1, ℓ = KL(Q‖P):  d/da = q·(log q − log p − ℓ),     d/db = p − q
//   else, ℓ = β·K_p + (1−β)·K_q, K_p = KL(P‖M), K_q = KL(Q‖M), M = β·P + (1−β)·Q:
//                        d/da = (1−β)·q·(log q − log m − K_q),   d/db = β·p·(log p − log m − K_p)
// and the logits' gradients are these times (upstream gradient)·(1/n_valid for "mean")/T.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "gemm.h"
// Only exp_fast, the *_impl row loops and kSumBlock of the linear-CE row kernels are used here; their entry points
// (static, one copy per translation unit) would each warn as unused.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "row_kernels.h"
#pragma GCC diagnostic pop

namespace infofuse::cpu {
namespace {

enum KLReduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Bytes of logits (both heads together) held at once when the caller does not fix the chunk size.
constexpr int64_t kKLChunkBytes = int64_t(32) << 20;
// Rows of a chunk at least D / this (bench/NOTES.md, "Floors: linear_kl_divergence": the bandwidth of W's passes).
constexpr int64_t kKLMinRowsPerD = 32;
// Rows of grad_weight updated per GEMM when half-precision chunks are added into a float accumulator.
constexpr int64_t kKLHalfBlock = 4096;

struct KLOptions {
  double beta;
  double temperature;
  int64_t reduction;
  int64_t ignore_index;
  int64_t chunk_size;  // <= 0: chosen here
};

using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_head(const char* who, const at::Tensor& input, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, int64_t n, int64_t v, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(input.dim() == 2 && input.size(0) == n, who, "_input must be 2-D (N, D) with N = ", n,
                    ", got shape ", input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == input.size(1) && weight.size(0) == v, who,
                    "_weight must be (V, D) with V = ", v, " and D = ", input.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK_TYPE(input.scalar_type() == dtype && weight.scalar_type() == dtype, who, "_input and ", who,
                   "_weight must be ", dtype, ", got ", input.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(input.device().is_cpu() && weight.device().is_cpu(), "infofuse's cpu backend needs CPU tensors");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == v, who, "_bias must be (V,) with V = ", v, ", got shape ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, who, "_bias must be ", dtype, ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device().is_cpu(), "infofuse's cpu backend needs CPU tensors");
  }
}

KLOptions check_args(const at::Tensor& s_in, const at::Tensor& s_w, const at::Tensor& t_in, const at::Tensor& t_w,
                     const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& s_b,
                     const std::optional<at::Tensor>& t_b, double beta, double temperature, int64_t reduction,
                     int64_t ignore_index, std::optional<int64_t> chunk_size) {
  TORCH_CHECK_VALUE(s_in.dim() == 2 && s_w.dim() == 2, "student_input and student_weight must be 2-D");
  const int64_t n = s_in.size(0), v = s_w.size(0);
  check_head("student", s_in, s_w, s_b, n, v, s_in.scalar_type());
  check_head("teacher", t_in, t_w, t_b, n, v, s_in.scalar_type());
  if (target.has_value()) {
    TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == n, "target must be (N,) with N = ", n, ", got shape ",
                      target->sizes());
    TORCH_CHECK_TYPE(target->scalar_type() == at::kLong, "target must be int64, got ", target->scalar_type());
    TORCH_CHECK_VALUE(target->device().is_cpu(), "infofuse's cpu backend needs CPU tensors");
  }
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), "temperature must be a finite float > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kSum, "reduction code must be 0, 1 or 2, got ", reduction);
  TORCH_CHECK_VALUE(!chunk_size.has_value() || *chunk_size >= 1, "chunk_size must be None or >= 1");
  return {beta, temperature, reduction, ignore_index, chunk_size.value_or(0)};
}

// ---------------------------------------------------------------- row loops (float entry points cloned per ISA)

// Σ_j exp(x_j)·(x_j − y_j) over a row of log-probabilities x, y: KL(X‖Y).
template <typename T>
INFOFUSE_INLINE double kl_sum_impl(const T* __restrict x, const T* __restrict y, index_t v) {
  double total = 0.0;
  for (index_t j0 = 0; j0 < v; j0 += kSumBlock) {
    const index_t j1 = std::min(v, j0 + kSumBlock);
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (index_t j = j0; j < j1; ++j) s += exp_fast(x[j]) * (x[j] - y[j]);
    total += static_cast<double>(s);
  }
  return total;
}

// log m_j = log(β·p_j + (1−β)·q_j) into lm, from log p and log q (log β, log(1−β) given); returns
// (KL(P‖M), KL(Q‖M)). log m as max + log1p(exp(−|difference|)): its argument is in [1, 2], never 0.
template <typename T>
INFOFUSE_INLINE void skew_sums_impl(const T* __restrict lp, const T* __restrict lq, T* __restrict lm, index_t v,
                                    T log_b, T log_1mb, double* kp, double* kq) {
  double tp = 0.0, tq = 0.0;
  for (index_t j0 = 0; j0 < v; j0 += kSumBlock) {
    const index_t j1 = std::min(v, j0 + kSumBlock);
    for (index_t j = j0; j < j1; ++j) {
      const T a = lp[j] + log_b, b = lq[j] + log_1mb;
      const T hi = a > b ? a : b, lo = a > b ? b : a;
      lm[j] = hi + std::log1p(exp_fast(lo - hi));
    }
    T sp = 0, sq = 0;
#pragma omp simd reduction(+ : sp, sq)
    for (index_t j = j0; j < j1; ++j) {
      sp += exp_fast(lp[j]) * (lp[j] - lm[j]);
      sq += exp_fast(lq[j]) * (lq[j] - lm[j]);
    }
    tp += static_cast<double>(sp);
    tq += static_cast<double>(sq);
  }
  *kp = tp;
  *kq = tq;
}

// The gradients of one row, written over lq (student, if gs != 0 or want_s) and lp (teacher, if want_t):
// mode 0 forward KL, 1 reverse KL, 2 skew JSD (lm holds log m); cs, ct the factors of each head's gradient,
// l the row's divergence (K_q and K_p for mode 2 in l and l2).
template <typename T>
INFOFUSE_INLINE void row_grads_impl(T* __restrict lq, T* __restrict lp, const T* __restrict lm, index_t v, int mode,
                                    T cs, T ct, T l, T l2, bool want_s, bool want_t) {
  if (mode == 0) {
    if (want_t) {
#pragma omp simd
      for (index_t j = 0; j < v; ++j) {
        const T p = exp_fast(lp[j]), q = exp_fast(lq[j]);
        const T gt = ct * p * (lp[j] - lq[j] - l);
        lq[j] = cs * (q - p);
        lp[j] = gt;
      }
    } else {
#pragma omp simd
      for (index_t j = 0; j < v; ++j) lq[j] = cs * (exp_fast(lq[j]) - exp_fast(lp[j]));
    }
  } else if (mode == 1) {
    if (want_t) {
#pragma omp simd
      for (index_t j = 0; j < v; ++j) {
        const T p = exp_fast(lp[j]), q = exp_fast(lq[j]);
        const T gs = cs * q * (lq[j] - lp[j] - l);
        lp[j] = ct * (p - q);
        lq[j] = gs;
      }
    } else {
#pragma omp simd
      for (index_t j = 0; j < v; ++j) lq[j] = cs * exp_fast(lq[j]) * (lq[j] - lp[j] - l);
    }
  } else {
    if (want_t) {
#pragma omp simd
      for (index_t j = 0; j < v; ++j) {
        const T gs = cs * exp_fast(lq[j]) * (lq[j] - lm[j] - l);
        lp[j] = ct * exp_fast(lp[j]) * (lp[j] - lm[j] - l2);
        lq[j] = gs;
      }
    } else {
#pragma omp simd
      for (index_t j = 0; j < v; ++j) lq[j] = cs * exp_fast(lq[j]) * (lq[j] - lm[j] - l);
    }
  }
  (void)want_s;
}

// x_j = (x_j·s − m) − log Σ exp(x·s − m): a row of logits into its log-softmax of x·s, in place. The max is
// taken off first and log Σ after, as PyTorch's log_softmax does: subtracting a rounded lse = m + log Σ instead
// would cost an ulp of |m| on every log-probability, which the JSD's gradient (log q − log m − K_q) then carries.
template <typename T>
INFOFUSE_INLINE void log_softmax_impl(T* __restrict x, index_t v, T s) {
#pragma omp simd
  for (index_t j = 0; j < v; ++j) x[j] *= s;
  const T m = row_max_impl(x, v);
  const T log_sum = static_cast<T>(std::log(row_sum_exp_impl(x, v, m)));
#pragma omp simd
  for (index_t j = 0; j < v; ++j) x[j] = (x[j] - m) - log_sum;
}

INFOFUSE_CLONES double kl_sum(const float* x, const float* y, index_t v) { return kl_sum_impl(x, y, v); }
double kl_sum(const double* x, const double* y, index_t v) { return kl_sum_impl(x, y, v); }
INFOFUSE_CLONES void skew_sums(const float* lp, const float* lq, float* lm, index_t v, float lb, float l1b, double* kp,
                               double* kq) {
  skew_sums_impl(lp, lq, lm, v, lb, l1b, kp, kq);
}
void skew_sums(const double* lp, const double* lq, double* lm, index_t v, double lb, double l1b, double* kp,
               double* kq) {
  skew_sums_impl(lp, lq, lm, v, lb, l1b, kp, kq);
}
INFOFUSE_CLONES void row_grads(float* lq, float* lp, const float* lm, index_t v, int mode, float cs, float ct, float l,
                               float l2, bool ws, bool wt) {
  row_grads_impl(lq, lp, lm, v, mode, cs, ct, l, l2, ws, wt);
}
void row_grads(double* lq, double* lp, const double* lm, index_t v, int mode, double cs, double ct, double l, double l2,
               bool ws, bool wt) {
  row_grads_impl(lq, lp, lm, v, mode, cs, ct, l, l2, ws, wt);
}
INFOFUSE_CLONES void log_softmax_row(float* x, index_t v, float s) { log_softmax_impl(x, v, s); }
void log_softmax_row(double* x, index_t v, double s) { log_softmax_impl(x, v, s); }

// ---------------------------------------------------------------- the fused pass over a chunk

// Upstream gradient: one value (stride 0) or one per row (stride 1), times "mean"'s 1/n_valid.
template <typename acc_t>
struct Upstream {
  const acc_t* g = nullptr;
  int64_t stride = 0;
  acc_t scale = 1;
};

// Rows [0, rows) of one chunk (global rows r0 + i): per-row divergence into loss[r0 + i] (when loss is not
// null); with want_s / want_t the student / teacher chunk is overwritten by dLoss/dlogits.
template <typename scalar_t, typename acc_t>
void fused_rows(scalar_t* zs, scalar_t* zt, int64_t r0, int64_t rows, int64_t v, const int64_t* target,
                const KLOptions& opt, acc_t* loss, bool want_s, bool want_t, const Upstream<acc_t>& up) {
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  const int mode = opt.beta == 0.0 ? 0 : (opt.beta == 1.0 ? 1 : 2);
  const acc_t inv_t = static_cast<acc_t>(1.0 / opt.temperature);
  const acc_t log_b = mode == 2 ? static_cast<acc_t>(std::log(opt.beta)) : acc_t(0);
  const acc_t log_1mb = mode == 2 ? static_cast<acc_t>(std::log1p(-opt.beta)) : acc_t(0);
  const bool want = want_s || want_t;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kInPlace ? 0 : 2 * v);
    std::vector<acc_t> lm_buf(mode == 2 ? v : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = r0 + i;
      scalar_t* s_row = zs + i * v;
      scalar_t* t_row = zt + i * v;
      const bool valid = target == nullptr || target[row] != opt.ignore_index;
      if (!valid) {
        if (loss != nullptr) loss[row] = 0;
        if (want_s) std::fill(s_row, s_row + v, scalar_t(0));
        if (want_t) std::fill(t_row, t_row + v, scalar_t(0));
        continue;
      }
      acc_t* lq = kInPlace ? reinterpret_cast<acc_t*>(s_row) : scratch.data();
      acc_t* lp = kInPlace ? reinterpret_cast<acc_t*>(t_row) : scratch.data() + v;
      if (!kInPlace) {
        for (int64_t j = 0; j < v; ++j) lq[j] = static_cast<acc_t>(s_row[j]);
        for (int64_t j = 0; j < v; ++j) lp[j] = static_cast<acc_t>(t_row[j]);
      }
      log_softmax_row(lq, v, inv_t);
      log_softmax_row(lp, v, inv_t);
      double l, k_p = 0.0, k_q = 0.0;
      if (mode == 0) {
        l = kl_sum(lp, lq, v);
      } else if (mode == 1) {
        l = kl_sum(lq, lp, v);
      } else {
        skew_sums(lp, lq, lm_buf.data(), v, log_b, log_1mb, &k_p, &k_q);
        l = opt.beta * k_p + (1.0 - opt.beta) * k_q;
      }
      if (loss != nullptr) loss[row] = static_cast<acc_t>(l);
      if (!want) continue;
      const acc_t c = up.g[row * up.stride] * up.scale * inv_t;
      acc_t cs = c, ct = c, l1 = static_cast<acc_t>(l), l2 = 0;
      if (mode == 2) {
        cs = c * static_cast<acc_t>(1.0 - opt.beta);
        ct = c * static_cast<acc_t>(opt.beta);
        l1 = static_cast<acc_t>(k_q);
        l2 = static_cast<acc_t>(k_p);
      }
      row_grads(lq, lp, lm_buf.data(), v, mode, cs, ct, l1, l2, want_s, want_t);
      if (!kInPlace) {
        if (want_s)
          for (int64_t j = 0; j < v; ++j) s_row[j] = static_cast<scalar_t>(lq[j]);
        if (want_t)
          for (int64_t j = 0; j < v; ++j) t_row[j] = static_cast<scalar_t>(lp[j]);
      }
    }
  });
}

// ---------------------------------------------------------------- GEMMs and gradient accumulation

void head_logits(at::Tensor& out, const at::Tensor& x_chunk, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    out.copy_(bias->unsqueeze(0).expand_as(out));
    gemm(x_chunk, weight.t(), out, /*accumulate=*/true);
  } else {
    gemm(x_chunk, weight.t(), out, /*accumulate=*/false);
  }
}

// One head's grad_input rows, grad_weight and grad_bias, summed over chunks from dLoss/dlogits.
struct HeadGrads {
  bool gi, gw, gb, half, first = true;
  at::Tensor grad_input, grad_weight, weight_acc, bias_acc;

  HeadGrads(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool want_i,
            bool want_w, bool want_b)
      : gi(want_i), gw(want_w), gb(want_b && bias.has_value()) {
    const int64_t n = input.size(0), d = input.size(1), v = weight.size(0);
    half = at::isReducedFloatingType(input.scalar_type());
    grad_input = gi ? at::empty({n, d}, input.options()) : at::empty({0}, input.options());
    grad_weight = gw ? at::empty({v, d}, weight.options()) : at::empty({0}, weight.options());
    if (gw) weight_acc = half ? at::zeros({v, d}, weight.options().dtype(at::kFloat)) : grad_weight;
    if (gb) bias_acc = at::zeros({v}, input.options().dtype(half ? at::kFloat : input.scalar_type()));
  }

  bool any() const { return gi || gw || gb; }

  void add(const at::Tensor& g, const at::Tensor& x_chunk, const at::Tensor& weight, int64_t r0) {
    if (gi) {
      auto out = grad_input.narrow(0, r0, g.size(0));
      gemm(g, weight, out, /*accumulate=*/false);
    }
    if (gw) {
      if (half) {
        for (int64_t j0 = 0; j0 < g.size(1); j0 += kKLHalfBlock) {
          const int64_t vb = std::min(kKLHalfBlock, g.size(1) - j0);
          weight_acc.narrow(0, j0, vb).add_(at::mm(g.narrow(1, j0, vb).t(), x_chunk));
        }
      } else {
        gemm(g.t(), x_chunk, weight_acc, /*accumulate=*/!first);
      }
    }
    if (gb) bias_acc.add_(at::sum(g, {0}, false, bias_acc.scalar_type()));
    first = false;
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const at::Tensor& input) {
    if (gw) {
      if (first) {
        grad_weight.zero_();
      } else if (half) {
        grad_weight.copy_(weight_acc);
      }
    }
    at::Tensor grad_bias = gb ? bias_acc.to(input.scalar_type()) : at::empty({0}, input.options());
    return {grad_input, grad_weight, grad_bias};
  }
};

int64_t valid_rows(const std::optional<at::Tensor>& target, int64_t ignore_index, int64_t n) {
  if (!target.has_value()) return n;
  const int64_t* t = target->data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += t[i] != ignore_index;
  return count;
}

// The chunk loop shared by forward and backward.
template <typename scalar_t, typename acc_t>
void run_chunks(const at::Tensor& s_in, const at::Tensor& s_w, const std::optional<at::Tensor>& s_b,
                const at::Tensor& t_in, const at::Tensor& t_w, const std::optional<at::Tensor>& t_b,
                const int64_t* target, const KLOptions& opt, acc_t* loss, HeadGrads* student, HeadGrads* teacher,
                const Upstream<acc_t>& up) {
  const int64_t n = s_in.size(0), v = s_w.size(0);
  if (n == 0) return;
  // Default chunk: kKLChunkBytes of logits for both heads, but at least D/kKLMinRowsPerD rows, so that each pass of
  // a weight through memory (2.1 GB at an 8B head) feeds enough rows of GEMM not to be bandwidth-bound.
  const int64_t d_max = std::max(s_in.size(1), t_in.size(1));
  int64_t rows = opt.chunk_size > 0
                     ? opt.chunk_size
                     : std::max(kKLChunkBytes / std::max<int64_t>(1, 2 * v * int64_t(s_in.element_size())),
                                d_max / kKLMinRowsPerD);
  rows = std::max<int64_t>(1, std::min(rows, n));
  at::Tensor s_buf = at::empty({rows, v}, s_in.options());
  at::Tensor t_buf = at::empty({rows, v}, s_in.options());
  const bool want_s = student != nullptr && student->any();
  const bool want_t = teacher != nullptr && teacher->any();
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor zs = s_buf.narrow(0, 0, r), zt = t_buf.narrow(0, 0, r);
    const at::Tensor xs = s_in.narrow(0, r0, r), xt = t_in.narrow(0, r0, r);
    head_logits(zs, xs, s_w, s_b);
    head_logits(zt, xt, t_w, t_b);
    fused_rows<scalar_t, acc_t>(zs.data_ptr<scalar_t>(), zt.data_ptr<scalar_t>(), r0, r, v, target, opt, loss, want_s,
                                want_t, up);
    if (want_s) student->add(zs, xs, s_w, r0);
    if (want_t) teacher->add(zt, xt, t_w, r0);
  }
}

Grads6 join(std::tuple<at::Tensor, at::Tensor, at::Tensor> s, std::tuple<at::Tensor, at::Tensor, at::Tensor> t) {
  return {std::get<0>(s), std::get<1>(s), std::get<2>(s), std::get<0>(t), std::get<1>(t), std::get<2>(t)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_kl_forward(
    const at::Tensor& student_input, const at::Tensor& student_weight, const at::Tensor& teacher_input,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_bias, double beta,
    double temperature, int64_t reduction, int64_t ignore_index, std::optional<int64_t> chunk_size,
    bool grad_student_input, bool grad_student_weight, bool grad_student_bias, bool grad_teacher_input,
    bool grad_teacher_weight, bool grad_teacher_bias) {
  const KLOptions opt = check_args(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                                   teacher_bias, beta, temperature, reduction, ignore_index, chunk_size);
  const int64_t n = student_input.size(0);
  const std::optional<at::Tensor> tgt = target.has_value() ? std::optional(target->contiguous()) : std::nullopt;
  const auto acc_opts =
      student_input.options().dtype(student_input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor per_row = at::empty({n}, acc_opts);
  // Gradients in forward for "mean"/"sum" only ("none" has a per-token upstream gradient).
  const bool formed = reduction != kNone;
  HeadGrads student(student_input, student_weight, student_bias, formed && grad_student_input,
                    formed && grad_student_weight, formed && grad_student_bias);
  HeadGrads teacher(teacher_input, teacher_weight, teacher_bias, formed && grad_teacher_input,
                    formed && grad_teacher_weight, formed && grad_teacher_bias);
  const int64_t n_valid = valid_rows(tgt, ignore_index, n);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, student_input.scalar_type(), "infofuse_kl_forward_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const acc_t one = 1;
        Upstream<acc_t> up{&one, 0, acc_t(1)};
        if (reduction == kMean) up.scale = static_cast<acc_t>(1.0 / double(n_valid));
        run_chunks<scalar_t, acc_t>(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                                    teacher_bias, tgt ? tgt->data_ptr<int64_t>() : nullptr, opt,
                                    per_row.data_ptr<acc_t>(), &student, &teacher, up);
        if (reduction == kNone) {
          loss = per_row;
        } else {
          double total = 0.0;
          const acc_t* p = per_row.data_ptr<acc_t>();
          for (int64_t i = 0; i < n; ++i) total += p[i];
          if (reduction == kMean) total /= static_cast<double>(n_valid);
          loss = at::full({}, total, acc_opts);
        }
      });
  auto [gsi, gsw, gsb] = student.finish(student_input);
  auto [gti, gtw, gtb] = teacher.finish(teacher_input);
  return {loss, gsi, gsw, gsb, gti, gtw, gtb};
}

Grads6 linear_kl_backward(const at::Tensor& grad_loss, const at::Tensor& student_input,
                          const at::Tensor& student_weight, const at::Tensor& teacher_input,
                          const at::Tensor& teacher_weight, const std::optional<at::Tensor>& target,
                          const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_bias,
                          double beta, double temperature, int64_t reduction, int64_t ignore_index,
                          std::optional<int64_t> chunk_size, bool grad_student_input, bool grad_student_weight,
                          bool grad_student_bias, bool grad_teacher_input, bool grad_teacher_weight,
                          bool grad_teacher_bias) {
  const KLOptions opt = check_args(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                                   teacher_bias, beta, temperature, reduction, ignore_index, chunk_size);
  const int64_t n = student_input.size(0);
  TORCH_CHECK_VALUE(grad_loss.numel() == (reduction == kNone ? n : 1), "grad_loss must have ",
                    reduction == kNone ? n : 1, " elements, got ", grad_loss.sizes());
  const at::ScalarType acc_type = student_input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // reshape + cast + contiguous also turns a stride-0 (expanded) grad_output into real memory.
  const at::Tensor g = grad_loss.reshape({-1}).to(acc_type).contiguous();
  const std::optional<at::Tensor> tgt = target.has_value() ? std::optional(target->contiguous()) : std::nullopt;
  HeadGrads student(student_input, student_weight, student_bias, grad_student_input, grad_student_weight,
                    grad_student_bias);
  HeadGrads teacher(teacher_input, teacher_weight, teacher_bias, grad_teacher_input, grad_teacher_weight,
                    grad_teacher_bias);
  if (student.any() || teacher.any()) {
    const int64_t n_valid = valid_rows(tgt, ignore_index, n);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, student_input.scalar_type(), "infofuse_kl_backward_cpu", [&] {
          using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
          Upstream<acc_t> up{g.data_ptr<acc_t>(), reduction == kNone ? 1 : 0, acc_t(1)};
          if (reduction == kMean) up.scale = static_cast<acc_t>(1.0 / double(n_valid));
          run_chunks<scalar_t, acc_t>(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                                      teacher_bias, tgt ? tgt->data_ptr<int64_t>() : nullptr, opt, nullptr, &student,
                                      &teacher, up);
        });
  }
  return join(student.finish(student_input), teacher.finish(teacher_input));
}

}  // namespace

TORCH_LIBRARY_IMPL(infofuse, CPU, m) {
  m.impl("linear_kl_divergence_forward", &linear_kl_forward);
  m.impl("linear_kl_divergence_backward", &linear_kl_backward);
}

}  // namespace infofuse::cpu
