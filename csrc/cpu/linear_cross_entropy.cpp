// CPU linear cross-entropy: cross_entropy(input @ linear_weight.T + linear_bias, target) over row chunks.
//
// Per chunk of rows: the logits by ATen's GEMM into one reused buffer, then one fused pass per row (row max,
// sum of exps, target logit and every loss term, then the gradient of the logits written over the chunk),
// then grad_input = G·W and grad_weight += Gᵀ·X by ATen's GEMM. For "mean"/"sum" the gradients are formed
// in forward, while the chunk is hot (3 GEMMs in all); "none" recomputes in backward from the saved lse.
// At most one chunk of logits exists at a time. Accumulation is in float (double for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "gemm.h"
#include "row_kernels.h"

namespace infofuse::cpu {
namespace {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Bytes of logits held at once when the caller does not fix the chunk size.
constexpr int64_t kChunkBytes = int64_t(32) << 20;
// Rows of grad_weight updated per GEMM when half-precision chunks are added into a float accumulator.
constexpr int64_t kHalfGradWeightBlock = 4096;

struct Options {
  int64_t reduction;
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
  double softcap;      // <= 0: off (the op's None)
  int64_t chunk_size;  // <= 0: chosen here (the op's None)
  double temperature;  // the logits are ẑ / temperature
  bool entropy;        // forward: compute each row's entropy; backward: add the entropy's gradient
};

Options make_options(int64_t reduction, int64_t ignore_index, double label_smoothing, double z_loss,
                     std::optional<double> softcap, std::optional<int64_t> chunk_size, double temperature,
                     bool entropy) {
  TORCH_CHECK_VALUE(!softcap.has_value() || *softcap > 0, "softcap must be None or > 0, got ", softcap.value_or(0));
  TORCH_CHECK_VALUE(!chunk_size.has_value() || *chunk_size >= 1, "chunk_size must be None or >= 1, got ",
                    chunk_size.value_or(0));
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be a finite float > 0, got ",
                    temperature);
  return {reduction,   ignore_index, label_smoothing, z_loss, softcap.value_or(0.0), chunk_size.value_or(0),
          temperature, entropy};
}

struct TargetStats {
  int64_t n_valid = 0;        // rows whose target is not ignore_index
  double weight_valid = 0.0;  // Σ over those rows of weight[target] (n_valid without class weights)
  double weight_all = 0.0;    // Σ_j weight[j] (V without class weights)
};

void check_args(const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target,
                const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight,
                const Options& opt) {
  TORCH_CHECK_VALUE(input.dim() == 2, "input must be 2-D (N, D), got shape ", input.sizes());
  TORCH_CHECK_VALUE(linear_weight.dim() == 2 && linear_weight.size(1) == input.size(1),
                    "linear_weight must be (V, D) with D = ", input.size(1), ", got shape ", linear_weight.sizes());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0),
                    "target must be (N,) with N = ", input.size(0), ", got shape ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  TORCH_CHECK_TYPE(input.scalar_type() == linear_weight.scalar_type(),
                   "input and linear_weight must share a dtype, got ", input.scalar_type(), " and ",
                   linear_weight.scalar_type());
  const int64_t v = linear_weight.size(0);
  if (linear_bias.has_value()) {
    TORCH_CHECK_VALUE(linear_bias->dim() == 1 && linear_bias->size(0) == v, "linear_bias must be (V,) with V = ", v,
                      ", got shape ", linear_bias->sizes());
    TORCH_CHECK_TYPE(linear_bias->scalar_type() == input.scalar_type(), "linear_bias must have input's dtype ",
                     input.scalar_type(), ", got ", linear_bias->scalar_type());
  }
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == v, "weight must be (V,) with V = ", v, ", got shape ",
                      weight->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(weight->scalar_type()), "weight must be floating point, got ",
                     weight->scalar_type());
  }
  for (const at::Tensor* t : {&input, &linear_weight, &target}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "infofuse's cpu backend needs CPU tensors, got ", t->device());
  }
  for (const std::optional<at::Tensor>* t : {&linear_bias, &weight}) {
    if (t->has_value()) {
      TORCH_CHECK_VALUE((*t)->device().is_cpu(), "infofuse's cpu backend needs CPU tensors, got ", (*t)->device());
    }
  }
  TORCH_CHECK_VALUE(opt.reduction >= kNone && opt.reduction <= kSum, "reduction code must be 0, 1 or 2, got ",
                    opt.reduction);
  TORCH_CHECK_VALUE(opt.label_smoothing >= 0.0 && opt.label_smoothing <= 1.0, "label_smoothing must be in [0, 1], got ",
                    opt.label_smoothing);
  TORCH_CHECK_VALUE(opt.z_loss >= 0.0, "z_loss must be >= 0, got ", opt.z_loss);
}

// One pass over the targets: range check (before any GEMM runs) and the divisors of "mean".
template <typename acc_t>
TargetStats scan_targets(const int64_t* target, int64_t n, int64_t v, int64_t ignore_index, const acc_t* w) {
  TargetStats s;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = target[i];
    if (t == ignore_index) continue;
    TORCH_CHECK_VALUE(t >= 0 && t < v, "target[", i, "] = ", t, " is outside [0, V) with V = ", v,
                      " and is not ignore_index (", ignore_index, ")");
    s.n_valid += 1;
    s.weight_valid += w ? static_cast<double>(w[t]) : 1.0;
  }
  if (w) {
    for (int64_t j = 0; j < v; ++j) s.weight_all += static_cast<double>(w[j]);
  } else {
    s.weight_all = static_cast<double>(v);
  }
  return s;
}

int64_t pick_chunk_rows(int64_t n, int64_t v, int64_t elem_bytes, int64_t chunk_size) {
  if (chunk_size > 0) return std::max<int64_t>(1, std::min(chunk_size, n));
  const int64_t rows = kChunkBytes / std::max<int64_t>(1, v * elem_bytes);
  return std::max<int64_t>(1, std::min(rows, n));
}

// Per-row multipliers of the gradient: the "ce" part (cross-entropy + smoothing) and the z-loss part, each
// with its reduction divisor and the upstream gradient folded in; a stride of 0 broadcasts one value.
template <typename acc_t>
struct RowGradScale {
  const acc_t* ce = nullptr;  // upstream gradient of the loss
  int64_t ce_stride = 0;
  acc_t ce_scale = 1;
  acc_t z_scale = 1;
  const acc_t* lse_grad = nullptr;      // gradient of the returned lse, or null
  const acc_t* entropy_grad = nullptr;  // gradient of the returned entropy, or null
  const acc_t* entropy = nullptr;       // the forward's entropy (read with entropy_grad)
};

// The fused pass over rows [0, rows) of one chunk (row i of the chunk is global row r0 + i).
// forward: computes lse (written to lse[r0 + i]) and the unscaled per-row terms ce[r0 + i], zl[r0 + i], and
// with opt.entropy the row's entropy ent[r0 + i] (0 at ignored rows); otherwise reads lse. With want_grad,
// overwrites the chunk with dLoss/dlogits (in the chunk's dtype). Everything is of the logits ẑ/T.
template <typename scalar_t, typename acc_t>
void fused_rows(scalar_t* chunk, int64_t r0, int64_t rows, int64_t v, const int64_t* target, const acc_t* w,
                const Options& opt, const TargetStats& stats, bool forward, acc_t* lse, acc_t* ce, acc_t* zl,
                acc_t* ent, int64_t* argmax, bool want_grad, const RowGradScale<acc_t>& gs) {
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  const acc_t eps = static_cast<acc_t>(opt.label_smoothing);
  const acc_t eps_v = eps / static_cast<acc_t>(v);
  const acc_t lam = static_cast<acc_t>(opt.z_loss);
  const acc_t cap = static_cast<acc_t>(opt.softcap > 0 ? opt.softcap : 0.0);
  const acc_t w_all = static_cast<acc_t>(stats.weight_all);
  const bool scaled = opt.temperature != 1.0;  // hoisted: T = 1 costs nothing
  const acc_t inv_t = static_cast<acc_t>(1.0 / opt.temperature);
  const bool entropy_grad = want_grad && gs.entropy_grad != nullptr;

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch((kInPlace && cap <= 0) ? 0 : v);
    std::vector<acc_t> slopes((cap > 0 && want_grad) ? v : 0);  // 1 − tanh²(z/cap) of the raw logits
    acc_t* slope = slopes.empty() ? nullptr : slopes.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = r0 + i;
      scalar_t* z_row = chunk + i * v;
      acc_t* z = (kInPlace && cap <= 0) ? reinterpret_cast<acc_t*>(z_row) : scratch.data();
      if (cap > 0) {
        for (int64_t j = 0; j < v; ++j) {
          acc_t unused;
          softcap_slope(static_cast<acc_t>(z_row[j]), cap, z + j, slope ? slope + j : &unused);
        }
      } else if (!kInPlace) {
        for (int64_t j = 0; j < v; ++j) z[j] = static_cast<acc_t>(z_row[j]);
      }
      if (scaled) row_scale(z, v, inv_t);
      const int64_t t = target[row];
      const bool valid = t != opt.ignore_index;
      const acc_t wt = valid ? (w ? w[t] : acc_t(1)) : acc_t(0);
      const acc_t zt = valid ? z[t] : acc_t(0);

      acc_t l;
      if (forward) {
        const acc_t m = row_max(z, v);
        if (argmax != nullptr) {  // the first column holding the row's (softcapped) maximum; 0 for a NaN row
          int64_t j = 0;
          while (j < v && !(z[j] == m)) ++j;
          argmax[row] = j < v ? j : 0;
        }
        double s, h = 0.0;
        if (opt.entropy) {
          double t_sum;
          s = row_sum_exp_entropy(z, v, m, &t_sum);
          h = std::log(s) - t_sum / s;
        } else {
          s = row_sum_exp(z, v, m);
        }
        const double lse_d = static_cast<double>(m) + std::log(s);
        l = static_cast<acc_t>(lse_d);
        lse[row] = l;
        if (opt.entropy) ent[row] = valid ? static_cast<acc_t>(h) : acc_t(0);
        double ce_row = 0.0, z_row_loss = 0.0;
        if (valid) {
          ce_row = (1.0 - opt.label_smoothing) * static_cast<double>(wt) * (lse_d - static_cast<double>(zt));
          if (opt.label_smoothing > 0) {
            const double gaps = row_gap_sum(z, w, v, m) + stats.weight_all * (lse_d - static_cast<double>(m));
            ce_row += opt.label_smoothing / static_cast<double>(v) * gaps;
          }
          z_row_loss = opt.z_loss * lse_d * lse_d;
        }
        ce[row] = static_cast<acc_t>(ce_row);
        zl[row] = static_cast<acc_t>(z_row_loss);
      } else {
        l = lse[row];
      }
      if (!want_grad) continue;

      // Ignored rows take no loss gradient (and never meet "mean"'s 1/0 divisor when every row is ignored).
      const acc_t g_up = valid ? gs.ce[row * gs.ce_stride] : acc_t(0);
      const acc_t g_ce = valid ? g_up * gs.ce_scale : acc_t(0);
      const acc_t g_z = valid ? g_up * gs.z_scale : acc_t(0);
      const acc_t g_lse = gs.lse_grad ? gs.lse_grad[row] : acc_t(0);
      // g_j = a·p_j + b·(p_j − [j = t]) − c·w_j − e·p_j·(ℓ_j − lse + H): the coefficient of p beyond the
      // target's b, then b itself, with the temperature's 1/T (dℓ/dẑ) folded into every coefficient
      const acc_t a = (g_ce * eps_v * w_all + g_z * acc_t(2) * lam * l + g_lse) * inv_t;
      const acc_t b = g_ce * (acc_t(1) - eps) * wt * inv_t;
      const acc_t c = g_ce * eps_v * inv_t;
      const acc_t e = entropy_grad && valid ? gs.entropy_grad[row] * inv_t : acc_t(0);
      const acc_t h = entropy_grad ? l - gs.entropy[row] : acc_t(0);  // lse − H
      if (entropy_grad) {
        row_grad_entropy(z, w, v, l, a + b, c, e, h, slope);
      } else {
        row_grad(z, w, v, l, a + b, c, slope);
      }
      if (valid) {
        // The target's entry as b·(p_t − 1) + a·p_t, not (a + b)·p_t − b: where p_t rounds to 1 (one class, a
        // certain row) the cross-entropy part is exactly 0 and the z-loss part keeps its precision.
        const acc_t p_t = std::exp(zt - l);
        const acc_t w_t = w ? w[t] : acc_t(1);
        const acc_t g_t = a * p_t + b * (p_t - acc_t(1)) - c * w_t - e * p_t * (zt - h);
        z[t] = g_t * (slope ? slope[t] : acc_t(1));
      }
      if (z != reinterpret_cast<acc_t*>(z_row)) {
        for (int64_t j = 0; j < v; ++j) z_row[j] = static_cast<scalar_t>(z[j]);
      }
    }
  });
}

// Logits of one chunk of rows, in the input dtype (ATen's GEMM accumulates in float for bf16/fp16).
void chunk_logits(at::Tensor& out, const at::Tensor& x_chunk, const at::Tensor& linear_weight,
                  const std::optional<at::Tensor>& linear_bias) {
  if (linear_bias.has_value()) {
    out.copy_(linear_bias->unsqueeze(0).expand_as(out));
    gemm(x_chunk, linear_weight.t(), out, /*accumulate=*/true);
  } else {
    gemm(x_chunk, linear_weight.t(), out, /*accumulate=*/false);
  }
}

// grad_input rows, grad_weight and grad_bias from each chunk's dLoss/dlogits G.
struct GradAccumulator {
  bool want_input, want_weight, want_bias, half;
  at::Tensor grad_input, grad_weight, grad_weight_acc, grad_bias_acc;
  bool first = true;

  GradAccumulator(const at::Tensor& input, const at::Tensor& linear_weight,
                  const std::optional<at::Tensor>& linear_bias, bool gi, bool gw, bool gb)
      : want_input(gi), want_weight(gw), want_bias(gb && linear_bias.has_value()) {
    const int64_t n = input.size(0), d = input.size(1), v = linear_weight.size(0);
    half = at::isReducedFloatingType(input.scalar_type());
    grad_input = want_input ? at::empty({n, d}, input.options()) : at::empty({0}, input.options());
    if (want_weight) {
      grad_weight = at::empty({v, d}, linear_weight.options());
      // bf16/fp16: chunk contributions are added into a float accumulator, never rounded running sums.
      grad_weight_acc = half ? at::zeros({v, d}, linear_weight.options().dtype(at::kFloat)) : grad_weight;
    } else {
      grad_weight = at::empty({0}, linear_weight.options());
    }
    const auto bias_opts = linear_bias.has_value() ? linear_bias->options() : input.options();
    grad_bias_acc = want_bias ? at::zeros({v}, bias_opts.dtype(half ? at::kFloat : bias_opts.dtype().toScalarType()))
                              : at::Tensor();
  }

  void add(const at::Tensor& g, const at::Tensor& x_chunk, const at::Tensor& linear_weight, int64_t r0) {
    const int64_t rows = g.size(0);
    if (want_input) {
      auto out = grad_input.narrow(0, r0, rows);
      gemm(g, linear_weight, out, /*accumulate=*/false);
    }
    if (want_weight) {
      if (half) {
        const int64_t v = g.size(1);
        for (int64_t j0 = 0; j0 < v; j0 += kHalfGradWeightBlock) {
          const int64_t vb = std::min(kHalfGradWeightBlock, v - j0);
          grad_weight_acc.narrow(0, j0, vb).add_(at::mm(g.narrow(1, j0, vb).t(), x_chunk));
        }
      } else {
        gemm(g.t(), x_chunk, grad_weight_acc, /*accumulate=*/!first);
      }
    }
    if (want_bias) grad_bias_acc.add_(at::sum(g, {0}, false, grad_bias_acc.scalar_type()));
    first = false;
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const at::Tensor& input,
                                                        const std::optional<at::Tensor>& linear_bias) {
    if (want_weight) {
      if (first) {
        grad_weight.zero_();  // no rows: the gradient is zero
      } else if (half) {
        grad_weight.copy_(grad_weight_acc);
      }
    }
    at::Tensor grad_bias = want_bias ? grad_bias_acc.to(linear_bias->scalar_type()) : at::empty({0}, input.options());
    return {grad_input, grad_weight, grad_bias};
  }
};

// Class weights in the accumulation dtype (undefined where there are none).
template <typename acc_t>
at::Tensor class_weights(const std::optional<at::Tensor>& weight) {
  return weight.has_value() ? weight->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : at::Tensor();
}

// Gradient multipliers for an upstream gradient `upstream` (one value, stride 0; or one per row, stride 1),
// with "mean"'s divisors folded in.
template <typename acc_t>
RowGradScale<acc_t> grad_scale(const acc_t* upstream, int64_t stride, int64_t reduction, const TargetStats& stats) {
  RowGradScale<acc_t> gs;
  gs.ce = upstream;
  gs.ce_stride = stride;
  if (reduction == kMean) {
    gs.ce_scale = static_cast<acc_t>(1.0 / stats.weight_valid);
    gs.z_scale = static_cast<acc_t>(1.0 / static_cast<double>(stats.n_valid));
  }
  return gs;
}

// The "no gradient" outputs of both ops: empty tensors of the right dtype and device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> no_grads(const at::Tensor& input, const at::Tensor& linear_weight) {
  return {at::empty({0}, input.options()), at::empty({0}, linear_weight.options()), at::empty({0}, input.options())};
}

// Runs the chunk loop shared by forward and backward.
template <typename scalar_t, typename acc_t>
void run_chunks(const at::Tensor& x, const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
                const int64_t* target, const acc_t* w, const Options& opt, const TargetStats& stats, int64_t chunk_size,
                bool forward, acc_t* lse, acc_t* ce, acc_t* zl, acc_t* ent, int64_t* argmax, GradAccumulator* grads,
                const RowGradScale<acc_t>& gs) {
  const int64_t n = x.size(0), v = linear_weight.size(0);
  if (n == 0) return;
  const int64_t chunk_rows = pick_chunk_rows(n, v, x.element_size(), chunk_size);
  at::Tensor buffer = at::empty({chunk_rows, v}, x.options());
  for (int64_t r0 = 0; r0 < n; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - r0);
    at::Tensor z = buffer.narrow(0, 0, rows);
    const at::Tensor x_chunk = x.narrow(0, r0, rows);
    chunk_logits(z, x_chunk, linear_weight, linear_bias);
    fused_rows<scalar_t, acc_t>(z.data_ptr<scalar_t>(), r0, rows, v, target, w, opt, stats, forward, lse, ce, zl, ent,
                                argmax, grads != nullptr, gs);
    if (grads != nullptr) grads->add(z, x_chunk, linear_weight, r0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_cross_entropy_forward(const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target,
                             const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight,
                             int64_t reduction, int64_t ignore_index, double label_smoothing, double z_loss,
                             std::optional<double> softcap, std::optional<int64_t> chunk_size, bool grad_input,
                             bool grad_weight, bool grad_bias, bool want_argmax, double temperature,
                             bool want_entropy) {
  const Options opt =
      make_options(reduction, ignore_index, label_smoothing, z_loss, softcap, chunk_size, temperature, want_entropy);
  check_args(input, linear_weight, target, linear_bias, weight, opt);
  const int64_t n = input.size(0), v = linear_weight.size(0);
  const at::Tensor tgt = target.contiguous();
  at::Tensor argmax = at::empty({want_argmax ? n : 0}, input.options().dtype(at::kLong));
  const bool want_grads = reduction != kNone && (grad_input || grad_weight || (grad_bias && linear_bias.has_value()));

  // Loss and lse in float (double for float64 inputs).
  const auto acc_opts = input.options().dtype(input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor lse = at::empty({n}, acc_opts);
  at::Tensor ce = at::empty({n}, acc_opts);
  at::Tensor zl = at::empty({n}, acc_opts);
  at::Tensor entropy = at::empty({want_entropy ? n : 0}, acc_opts);
  at::Tensor loss;
  auto grads = no_grads(input, linear_weight);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "infofuse_lce_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor w = class_weights<acc_t>(weight);
    const acc_t* w_ptr = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    const TargetStats stats = scan_targets(tgt.data_ptr<int64_t>(), n, v, ignore_index, w_ptr);
    // Gradient of the mean/sum loss for grad_output = 1; backward rescales it.
    const acc_t one = 1;
    const RowGradScale<acc_t> gs = grad_scale(&one, 0, reduction, stats);
    std::optional<GradAccumulator> acc;
    if (want_grads) acc.emplace(input, linear_weight, linear_bias, grad_input, grad_weight, grad_bias);
    run_chunks<scalar_t, acc_t>(input, linear_weight, linear_bias, tgt.data_ptr<int64_t>(), w_ptr, opt, stats,
                                opt.chunk_size, /*forward=*/true, lse.data_ptr<acc_t>(), ce.data_ptr<acc_t>(),
                                zl.data_ptr<acc_t>(), want_entropy ? entropy.data_ptr<acc_t>() : nullptr,
                                want_argmax ? argmax.data_ptr<int64_t>() : nullptr, acc ? &*acc : nullptr, gs);
    if (acc) grads = acc->finish(input, linear_bias);

    if (reduction == kNone) {
      loss = ce.add_(zl);
    } else {
      double sum_ce = 0.0, sum_z = 0.0;
      const acc_t* ce_p = ce.data_ptr<acc_t>();
      const acc_t* zl_p = zl.data_ptr<acc_t>();
      for (int64_t i = 0; i < n; ++i) {
        sum_ce += ce_p[i];
        sum_z += zl_p[i];
      }
      double total;
      if (reduction == kMean) {
        total = sum_ce / stats.weight_valid;
        if (z_loss != 0.0) total += sum_z / static_cast<double>(stats.n_valid);
      } else {
        total = sum_ce + sum_z;
      }
      loss = at::full({}, total, acc_opts);
    }
  });
  return {loss, lse, std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), argmax, entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& input,
    const at::Tensor& linear_weight, const at::Tensor& target, const std::optional<at::Tensor>& linear_bias,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t reduction, int64_t ignore_index,
    double label_smoothing, double z_loss, std::optional<double> softcap, std::optional<int64_t> chunk_size,
    bool grad_input, bool grad_weight, bool grad_bias, const std::optional<at::Tensor>& grad_entropy,
    const std::optional<at::Tensor>& entropy, double temperature) {
  const bool has_entropy_grad = grad_entropy.has_value() && grad_entropy->defined();
  const Options opt = make_options(reduction, ignore_index, label_smoothing, z_loss, softcap, chunk_size, temperature,
                                   has_entropy_grad);
  check_args(input, linear_weight, target, linear_bias, weight, opt);
  const int64_t n = input.size(0), v = linear_weight.size(0);
  const at::ScalarType acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == n && lse.scalar_type() == acc_type, "lse must be ", acc_type,
                    " (N,), got ", lse.sizes(), " ", lse.scalar_type());
  if (reduction == kNone) {
    TORCH_CHECK_VALUE(grad_loss.numel() == n, "grad_loss must have N = ", n, " elements, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss of a reduced loss must have one element, got ",
                      grad_loss.sizes());
  }
  // reshape + float + contiguous also turns a stride-0 (expanded) grad_output into real memory.
  const at::Tensor g = grad_loss.reshape({-1}).to(acc_type).contiguous();
  at::Tensor g_lse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK_VALUE(grad_lse->numel() == n, "grad_lse must have N = ", n, " elements, got ", grad_lse->sizes());
    g_lse = grad_lse->reshape({-1}).to(acc_type).contiguous();
  }
  at::Tensor g_ent, ent;
  if (has_entropy_grad) {
    TORCH_CHECK_VALUE(grad_entropy->numel() == n, "grad_entropy must have N = ", n, " elements, got ",
                      grad_entropy->sizes());
    TORCH_CHECK_VALUE(entropy.has_value() && entropy->numel() == n, "entropy (N = ", n,
                      " values from the forward) must come with grad_entropy");
    g_ent = grad_entropy->reshape({-1}).to(acc_type).contiguous();
    ent = entropy->reshape({-1}).to(acc_type).contiguous();
  }
  const at::Tensor tgt = target.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  auto grads = no_grads(input, linear_weight);
  if (!(grad_input || grad_weight || (grad_bias && linear_bias.has_value()))) return grads;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "infofuse_lce_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor w = class_weights<acc_t>(weight);
    const acc_t* w_ptr = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    const TargetStats stats = scan_targets(tgt.data_ptr<int64_t>(), n, v, ignore_index, w_ptr);
    RowGradScale<acc_t> gs = grad_scale(g.data_ptr<acc_t>(), reduction == kNone ? 1 : 0, reduction, stats);
    gs.lse_grad = g_lse.defined() ? g_lse.data_ptr<acc_t>() : nullptr;
    gs.entropy_grad = g_ent.defined() ? g_ent.data_ptr<acc_t>() : nullptr;
    gs.entropy = ent.defined() ? ent.data_ptr<acc_t>() : nullptr;
    GradAccumulator acc(input, linear_weight, linear_bias, grad_input, grad_weight, grad_bias);
    run_chunks<scalar_t, acc_t>(input, linear_weight, linear_bias, tgt.data_ptr<int64_t>(), w_ptr, opt, stats,
                                opt.chunk_size, /*forward=*/false, lse_c.data_ptr<acc_t>(), nullptr, nullptr, nullptr,
                                nullptr, &acc, gs);
    grads = acc.finish(input, linear_bias);
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(infofuse, CPU, m) {
  m.impl("linear_cross_entropy_forward", &linear_cross_entropy_forward);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward);
}

}  // namespace infofuse::cpu
