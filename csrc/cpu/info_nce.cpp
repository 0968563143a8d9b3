// CPU pairwise losses over S = scale·query·keyᵀ: InfoNCE (with false-negative masking, exclude_self and the
// column/"symmetric" terms), SupCon, and SigLIP.
//
// Like linear_cross_entropy.cpp, per chunk of query rows: the raw products q_i·k_j by one GEMM into a reused
// buffer (kChunkBytes of scores; never N×M), then one OpenMP pass over the chunk's rows (pair_kernels.h), then,
// in backward, G over the chunk in place and grad_query = G·K, grad_key += Gᵀ·Q_chunk by GEMMs (4 GEMMs for a
// forward + backward). Masks come from the label vectors inside the passes.
//
// Column log-sum-exps (want_cols) are an online (max, Σ exp) state per column, folded in after each chunk's row
// pass by a second pass over the chunk parallel over column strips (so it is race-free without per-thread
// copies) and merged across chunks in double. The alternative, a second pass over key chunks of the transposed
// problem, would cost a fifth GEMM of 2·N·M·D flops (~0.2 s at N = M = 8192, D = 256 on 2 cores); the online
// state costs one exp per score (~10 ms there) and one more read of each chunk.
//
// Compute dtype: float for float32 (row sums finished in double), float for bfloat16/float16 (key upcast once,
// query per chunk; grad_key accumulated in a float buffer), double for float64. Losses and lse come back in
// float (double for float64 inputs), gradients in the inputs' dtypes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "gemm.h"
#include "pair_kernels.h"

namespace infofuse::cpu {
namespace {

// Bytes of scores held at once: 32 MiB, as in linear_cross_entropy.cpp (1024 rows at M = 8192 in float).
constexpr int64_t kChunkBytes = int64_t(32) << 20;

enum Mode : int64_t { kInfoNce = 0, kSupCon = 1 };

at::ScalarType acc_type_of(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

const int64_t* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<int64_t>() : nullptr; }

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "infofuse's cpu backend needs CPU tensors, got ", name, " on ", t.device());
}

// query (N, D), key (M, D) of one floating dtype, and a one-element floating scale (or bias).
void check_pair(const at::Tensor& query, const at::Tensor& key) {
  TORCH_CHECK_VALUE(query.dim() == 2, "query must be 2-D (N, D), got shape ", query.sizes());
  TORCH_CHECK_VALUE(key.dim() == 2 && key.size(1) == query.size(1), "key must be (M, D) with D = ", query.size(1),
                    ", got shape ", key.sizes());
  const auto dt = query.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                   "query must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK_TYPE(key.scalar_type() == dt, "query and key must share a dtype, got ", dt, " and ", key.scalar_type());
  check_cpu(query, "query");
  check_cpu(key, "key");
}

double scalar_arg(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.numel() == 1, name, " must have one element (a 0-dim tensor), got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
  check_cpu(t, name);
  return t.item<double>();
}

// An int64 vector of length len; with bound > 0, every value in [0, bound).
at::Tensor index_arg(const at::Tensor& t, const char* name, int64_t len, int64_t bound, const char* bound_name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, name, " must be (", len, ",), got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  check_cpu(t, name);
  at::Tensor c = t.contiguous();
  if (bound >= 0) {
    const int64_t* p = c.data_ptr<int64_t>();
    for (int64_t i = 0; i < len; ++i) {
      TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < bound, name, "[", i, "] = ", p[i], " is outside [0, ", bound_name,
                        ") with ", bound_name, " = ", bound);
    }
  }
  return c;
}

// A floating vector of length len, as a contiguous tensor of dtype acc.
at::Tensor vector_arg(const at::Tensor& t, const char* name, int64_t len, at::ScalarType acc) {
  TORCH_CHECK_VALUE(t.numel() == len && t.dim() <= 1, name, " must be (", len, ",), got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
  check_cpu(t, name);
  // reshape + to + contiguous also turns a stride-0 (expanded) gradient into real memory.
  return t.reshape({len}).to(acc).contiguous();
}

// The integer arguments of the InfoNCE ops, checked, contiguous, and their raw pointers.
struct NceIndex {
  at::Tensor target, labels, key_labels, col_target;
  int64_t mode = kInfoNce;
  bool exclude_self = false;

  NceIndex(const at::Tensor& query, const at::Tensor& key, const at::Tensor& target_,
           const std::optional<at::Tensor>& labels_, const std::optional<at::Tensor>& key_labels_,
           const std::optional<at::Tensor>& col_target_, int64_t mode_, bool exclude_self_, bool want_col_target)
      : mode(mode_), exclude_self(exclude_self_) {
    const int64_t n = query.size(0), m = key.size(0);
    TORCH_CHECK_VALUE(mode == kInfoNce || mode == kSupCon, "mode must be 0 (InfoNCE) or 1 (SupCon), got ", mode);
    const bool has_labels = labels_.has_value() && labels_->defined();
    const bool has_key_labels = key_labels_.has_value() && key_labels_->defined();
    TORCH_CHECK_VALUE(has_labels == has_key_labels, "labels and key_labels must be given together");
    if (has_labels) {
      labels = index_arg(*labels_, "labels", n, -1, "");
      key_labels = index_arg(*key_labels_, "key_labels", m, -1, "");
    }
    if (mode == kSupCon) {
      // SupCon reads no target: its positives come from the labels.
      TORCH_CHECK_VALUE(has_labels, "mode 1 (SupCon) needs labels and key_labels");
      TORCH_CHECK_VALUE(n == m, "mode 1 (SupCon) needs as many keys as queries, got N = ", n, ", M = ", m);
    } else {
      target = index_arg(target_, "target", n, m, "M");
    }
    if (want_col_target) {
      TORCH_CHECK_VALUE(mode == kInfoNce, "the column terms exist only in mode 0 (InfoNCE)");
      // Any N x M block: the public symmetric loss asks for M == N itself; infofuse.distributed's symmetric loss
      // takes the column log-sum-exps of a rank's rows against every key (N_r x M).
      TORCH_CHECK_VALUE(col_target_.has_value() && col_target_->defined(), "the column terms need col_target");
      col_target = index_arg(*col_target_, "col_target", m, n, "N");
    }
  }

  // Row i's masks.
  PairMask row_mask(int64_t i) const {
    PairMask mk;
    if (mode == kSupCon) {
      mk.key_labels = key_labels.data_ptr<int64_t>();
      mk.label = labels.data_ptr<int64_t>()[i];
      mk.self = i;
      mk.supcon = true;
    } else {
      if (labels.defined()) {
        mk.key_labels = key_labels.data_ptr<int64_t>();
        mk.label = labels.data_ptr<int64_t>()[i];
      }
      mk.keep = target.data_ptr<int64_t>()[i];
      mk.self = exclude_self ? i : -1;
    }
    return mk;
  }

  // SupCon: |P(i)| = #{j != i: key_labels[j] == labels[i]}, from one sorted copy of key_labels.
  std::vector<int64_t> positive_counts() const {
    const int64_t n = labels.size(0), m = key_labels.size(0);
    const int64_t* lab = labels.data_ptr<int64_t>();
    const int64_t* kl = key_labels.data_ptr<int64_t>();
    std::vector<int64_t> sorted(kl, kl + m);
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> count(n);
    for (int64_t i = 0; i < n; ++i) {
      const auto range = std::equal_range(sorted.begin(), sorted.end(), lab[i]);
      count[i] = (range.second - range.first) - ((i < m && kl[i] == lab[i]) ? 1 : 0);
    }
    return count;
  }
};

// query and key as the GEMMs read them: contiguous, in the compute dtype acc (bfloat16/float16: key upcast
// once, M·D floats; query one chunk at a time).
struct Operands {
  at::Tensor query, key;
  at::ScalarType acc;
  int64_t n, m, d, chunk_rows;

  Operands(const at::Tensor& q, const at::Tensor& k)
      : query(q.contiguous()),
        key(k.to(acc_type_of(k)).contiguous()),
        acc(acc_type_of(q)),
        n(q.size(0)),
        m(k.size(0)),
        d(q.size(1)) {
    const int64_t elem = acc == at::kDouble ? 8 : 4;
    chunk_rows = std::max<int64_t>(1, std::min<int64_t>(kChunkBytes / std::max<int64_t>(1, m * elem), n));
  }

  at::Tensor query_chunk(int64_t r0, int64_t rows) const { return query.narrow(0, r0, rows).to(acc).contiguous(); }

  // out (rows, M) = query[r0:r0+rows] @ keyᵀ; returns the query chunk in the compute dtype.
  at::Tensor scores(at::Tensor& out, int64_t r0, int64_t rows) const {
    at::Tensor qc = query_chunk(r0, rows);
    gemm(qc, key.t(), out, /*accumulate=*/false);
    return qc;
  }
};

// grad_query rows (G·K) and grad_key (Σ over chunks of Gᵀ·Q_chunk) from each chunk's scale·G.
struct PairGrads {
  bool want_query, want_key, half;
  at::Tensor grad_query, grad_key, grad_key_acc;
  bool first = true;

  PairGrads(const at::Tensor& query, const at::Tensor& key, bool gq, bool gk) : want_query(gq), want_key(gk) {
    const int64_t n = query.size(0), m = key.size(0), d = query.size(1);
    half = at::isReducedFloatingType(query.scalar_type());
    grad_query = gq ? at::empty({n, d}, query.options()) : at::empty({0}, query.options());
    grad_key = gk ? at::empty({m, d}, key.options()) : at::empty({0}, key.options());
    // bf16/fp16: chunk contributions are added into a float accumulator, never into rounded running sums.
    if (gk) grad_key_acc = half ? at::empty({m, d}, key.options().dtype(at::kFloat)) : grad_key;
  }

  void add(const at::Tensor& g, const at::Tensor& q_chunk, const at::Tensor& key_acc, int64_t r0) {
    if (want_query) {
      at::Tensor out = grad_query.narrow(0, r0, g.size(0));
      if (half) {
        at::Tensor tmp = at::empty({g.size(0), key_acc.size(1)}, g.options());
        gemm(g, key_acc, tmp, /*accumulate=*/false);
        out.copy_(tmp);
      } else {
        gemm(g, key_acc, out, /*accumulate=*/false);
      }
    }
    if (want_key) gemm(g.t(), q_chunk, grad_key_acc, /*accumulate=*/!first);
    first = false;
  }

  std::tuple<at::Tensor, at::Tensor> finish() {
    if (want_key) {
      if (first) {
        grad_key.zero_();  // no rows: the gradient is zero
      } else if (half) {
        grad_key.copy_(grad_key_acc);
      }
    }
    return {grad_query, grad_key};
  }
};

// ---------------------------------------------------------------------------------------------------------------
// InfoNCE forward.

template <typename acc_t>
void nce_forward_impl(const Operands& ops, const NceIndex& idx, double scale_d, bool want_cols, acc_t* row_loss,
                      acc_t* row_lse, acc_t* col_loss, acc_t* col_lse) {
  const int64_t n = ops.n, m = ops.m;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool supcon = idx.mode == kSupCon;
  const std::vector<int64_t> count = supcon ? idx.positive_counts() : std::vector<int64_t>();
  const int64_t* target = ptr_or_null(idx.target);
  const int64_t* col_target = want_cols ? idx.col_target.data_ptr<int64_t>() : nullptr;

  // Column state across chunks: running max and Σ exp(S − max) (double); per chunk, a float state per column.
  std::vector<double> col_max, col_sum;
  std::vector<acc_t> chunk_max, chunk_sum;
  if (want_cols) {
    col_max.assign(m, -std::numeric_limits<double>::infinity());
    col_sum.assign(m, 0.0);
    chunk_max.resize(m);
    chunk_sum.resize(m);
  }

  at::Tensor buffer = at::empty({ops.chunk_rows, m}, ops.query.options().dtype(ops.acc));
  for (int64_t r0 = 0; r0 < n; r0 += ops.chunk_rows) {
    const int64_t rows = std::min(ops.chunk_rows, n - r0);
    at::Tensor z = buffer.narrow(0, 0, rows);
    ops.scores(z, r0, rows);
    acc_t* zp = z.data_ptr<acc_t>();

    // Column positives S[col_target[j], j], read before the row pass masks the chunk.
    if (want_cols) {
      for (int64_t j = 0; j < m; ++j) {
        const int64_t i = col_target[j];
        if (i >= r0 && i < r0 + rows) col_loss[j] = scale * zp[(i - r0) * m + j];
      }
    }

    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r0 + r;
        acc_t* zr = zp + r * m;
        const PairMask mk = idx.row_mask(i);
        const acc_t s_target = supcon ? acc_t(0) : scale * zr[target[i]];
        double pos_sum = 0.0;
        const acc_t mx = nce_prepare_row(zr, m, scale, mk, &pos_sum);
        const double lse = mx == ninf ? -std::numeric_limits<double>::infinity()
                                      : static_cast<double>(mx) + std::log(row_sum_exp(zr, m, mx));
        row_lse[i] = static_cast<acc_t>(lse);
        if (supcon) {
          row_loss[i] = count[i] > 0 ? static_cast<acc_t>(lse - pos_sum / static_cast<double>(count[i])) : acc_t(0);
        } else {
          row_loss[i] = static_cast<acc_t>(lse) - s_target;
        }
      }
    });

    if (want_cols) {
      const int64_t strips = (m + kColStrip - 1) / kColStrip;
      at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
        for (int64_t s = begin; s < end; ++s) {
          const int64_t j0 = s * kColStrip, w = std::min(kColStrip, m - j0);
          std::fill_n(chunk_max.data() + j0, w, ninf);
          std::fill_n(chunk_sum.data() + j0, w, acc_t(0));
          nce_col_update(zp + j0, m, rows, w, chunk_max.data() + j0, chunk_sum.data() + j0);
          // Merge this chunk's state into the running one (online log-sum-exp, MATH.md).
          for (int64_t j = j0; j < j0 + w; ++j) {
            const double cm = chunk_max[j];
            if (cm == -std::numeric_limits<double>::infinity()) continue;
            if (cm > col_max[j]) {
              col_sum[j] = col_sum[j] * std::exp(col_max[j] - cm) + static_cast<double>(chunk_sum[j]);
              col_max[j] = cm;
            } else {
              col_sum[j] += static_cast<double>(chunk_sum[j]) * std::exp(cm - col_max[j]);
            }
          }
        }
      });
    }
  }

  if (want_cols) {
    for (int64_t j = 0; j < m; ++j) {
      const double lse = col_sum[j] > 0 ? col_max[j] + std::log(col_sum[j]) : -std::numeric_limits<double>::infinity();
      col_lse[j] = static_cast<acc_t>(lse);
      col_loss[j] = col_lse[j] - col_loss[j];  // col_loss held S[col_target[j], j]
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const at::Tensor& target,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& key_labels,
    const std::optional<at::Tensor>& col_target, int64_t mode, bool exclude_self, bool want_cols) {
  check_pair(query, key);
  const double scale_d = scalar_arg(scale, "scale");
  const NceIndex idx(query, key, target, labels, key_labels, col_target, mode, exclude_self, want_cols);
  const int64_t n = query.size(0), m = key.size(0);
  const auto acc_opts = query.options().dtype(acc_type_of(query));
  at::Tensor row_loss = at::empty({n}, acc_opts), row_lse = at::empty({n}, acc_opts);
  at::Tensor col_loss = at::empty({want_cols ? m : 0}, acc_opts), col_lse = at::empty({want_cols ? m : 0}, acc_opts);
  if (n == 0) return {row_loss, row_lse, col_loss, col_lse};
  const Operands ops(query, key);
  AT_DISPATCH_FLOATING_TYPES(acc_type_of(query), "infofuse_info_nce_forward_cpu", [&] {
    nce_forward_impl<scalar_t>(ops, idx, scale_d, want_cols, row_loss.data_ptr<scalar_t>(),
                               row_lse.data_ptr<scalar_t>(), want_cols ? col_loss.data_ptr<scalar_t>() : nullptr,
                               want_cols ? col_lse.data_ptr<scalar_t>() : nullptr);
  });
  return {row_loss, row_lse, col_loss, col_lse};
}

// ---------------------------------------------------------------------------------------------------------------
// InfoNCE backward.

// Returns Σ_ij G_ij·q_i·k_j; writes the gradients of the inputs through grads (if any is wanted).
template <typename acc_t>
double nce_backward_impl(const Operands& ops, const NceIndex& idx, double scale_d, const acc_t* g_row,
                         const acc_t* row_lse, const acc_t* g_col, const acc_t* col_lse, PairGrads* grads) {
  const int64_t n = ops.n, m = ops.m;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const bool supcon = idx.mode == kSupCon;
  const std::vector<int64_t> count = supcon ? idx.positive_counts() : std::vector<int64_t>();
  const int64_t* target = ptr_or_null(idx.target);
  const int64_t* col_target = g_col != nullptr ? idx.col_target.data_ptr<int64_t>() : nullptr;
  std::vector<double> row_gp(n, 0.0);  // Σ_j G_ij·q_i·k_j per row, summed in order at the end
  double col_gp = 0.0;
  std::vector<acc_t> col_pos(g_col != nullptr ? m : 0);

  at::Tensor buffer = at::empty({ops.chunk_rows, m}, ops.query.options().dtype(ops.acc));
  for (int64_t r0 = 0; r0 < n; r0 += ops.chunk_rows) {
    const int64_t rows = std::min(ops.chunk_rows, n - r0);
    at::Tensor z = buffer.narrow(0, 0, rows);
    const at::Tensor q_chunk = ops.scores(z, r0, rows);
    acc_t* zp = z.data_ptr<acc_t>();

    if (g_col != nullptr) {
      for (int64_t j = 0; j < m; ++j) {
        const int64_t i = col_target[j];
        if (i >= r0 && i < r0 + rows) col_pos[j] = zp[(i - r0) * m + j];
      }
    }

    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r0 + r;
        acc_t* zr = zp + r * m;
        const PairMask mk = idx.row_mask(i);
        acc_t gr = g_row[i], g_pos = 0;
        if (supcon) {
          // A row without positives has loss 0 whatever S is: it contributes nothing.
          gr = count[i] > 0 ? gr : acc_t(0);
          g_pos = count[i] > 0 ? gr / static_cast<acc_t>(count[i]) : acc_t(0);
        }
        const acc_t p_target = supcon ? acc_t(0) : zr[target[i]];
        double gp = nce_grad_row(zr, m, scale, gr, row_lse[i], g_pos, g_col, col_lse, mk);
        if (!supcon) {
          zr[target[i]] -= scale * gr;
          gp -= static_cast<double>(gr) * static_cast<double>(p_target);
        }
        row_gp[i] = gp;
      }
    });

    if (g_col != nullptr) {
      for (int64_t j = 0; j < m; ++j) {
        const int64_t i = col_target[j];
        if (i >= r0 && i < r0 + rows) {
          zp[(i - r0) * m + j] -= scale * g_col[j];
          col_gp -= static_cast<double>(g_col[j]) * static_cast<double>(col_pos[j]);
        }
      }
    }
    if (grads != nullptr) grads->add(z, q_chunk, ops.key, r0);
  }
  double total = col_gp;
  for (int64_t i = 0; i < n; ++i) total += row_gp[i];
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_backward(
    const at::Tensor& grad_row, const std::optional<at::Tensor>& grad_col, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& scale, const at::Tensor& target, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& key_labels, const std::optional<at::Tensor>& col_target, const at::Tensor& row_lse,
    const std::optional<at::Tensor>& col_lse, int64_t mode, bool exclude_self, bool grad_query, bool grad_key,
    bool grad_scale) {
  check_pair(query, key);
  const double scale_d = scalar_arg(scale, "scale");
  const bool has_cols = grad_col.has_value() && grad_col->defined();
  const NceIndex idx(query, key, target, labels, key_labels, col_target, mode, exclude_self, has_cols);
  const int64_t n = query.size(0), m = key.size(0);
  const at::ScalarType acc = acc_type_of(query);
  const at::Tensor g_row = vector_arg(grad_row, "grad_row", n, acc);
  TORCH_CHECK_VALUE(row_lse.dim() == 1 && row_lse.size(0) == n && row_lse.scalar_type() == acc, "row_lse must be ", acc,
                    " (N,) with N = ", n, ", got ", row_lse.sizes(), " ", row_lse.scalar_type());
  check_cpu(row_lse, "row_lse");
  const at::Tensor lse_r = row_lse.contiguous();
  at::Tensor g_col, lse_c;
  if (has_cols) {
    g_col = vector_arg(*grad_col, "grad_col", m, acc);
    TORCH_CHECK_VALUE(col_lse.has_value() && col_lse->defined(), "grad_col needs col_lse");
    TORCH_CHECK_VALUE(col_lse->dim() == 1 && col_lse->size(0) == m && col_lse->scalar_type() == acc, "col_lse must be ",
                      acc, " (M,) with M = ", m, ", got ", col_lse->sizes(), " ", col_lse->scalar_type());
    check_cpu(*col_lse, "col_lse");
    lse_c = col_lse->contiguous();
  }

  PairGrads grads(query, key, grad_query, grad_key);
  const auto acc_opts = query.options().dtype(acc);
  at::Tensor g_scale = grad_scale ? at::zeros({}, acc_opts) : at::empty({0}, acc_opts);
  if (!(grad_query || grad_key || grad_scale)) return {grads.grad_query, grads.grad_key, g_scale};
  if (n > 0) {
    const Operands ops(query, key);
    double gp = 0.0;
    AT_DISPATCH_FLOATING_TYPES(acc, "infofuse_info_nce_backward_cpu", [&] {
      gp = nce_backward_impl<scalar_t>(ops, idx, scale_d, g_row.data_ptr<scalar_t>(), lse_r.data_ptr<scalar_t>(),
                                       has_cols ? g_col.data_ptr<scalar_t>() : nullptr,
                                       has_cols ? lse_c.data_ptr<scalar_t>() : nullptr,
                                       (grad_query || grad_key) ? &grads : nullptr);
    });
    if (grad_scale) g_scale.fill_(gp);
  }
  auto [gq, gk] = grads.finish();
  return {gq, gk, g_scale};
}

// ---------------------------------------------------------------------------------------------------------------
// SigLIP.

template <typename acc_t>
void siglip_forward_impl(const Operands& ops, double scale_d, double bias_d, acc_t* row_loss) {
  const int64_t n = ops.n, m = ops.m;
  const acc_t scale = static_cast<acc_t>(scale_d), bias = static_cast<acc_t>(bias_d);
  at::Tensor buffer = at::empty({ops.chunk_rows, m}, ops.query.options().dtype(ops.acc));
  for (int64_t r0 = 0; r0 < n; r0 += ops.chunk_rows) {
    const int64_t rows = std::min(ops.chunk_rows, n - r0);
    at::Tensor z = buffer.narrow(0, 0, rows);
    ops.scores(z, r0, rows);
    const acc_t* zp = z.data_ptr<acc_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        row_loss[r0 + r] = static_cast<acc_t>(siglip_row_loss(zp + r * m, m, scale, bias, r0 + r));
      }
    });
  }
}

// Returns (Σ_ij G_ij, Σ_ij G_ij·q_i·k_j); writes the gradients of the inputs through grads (if any is wanted).
template <typename acc_t>
std::pair<double, double> siglip_backward_impl(const Operands& ops, double scale_d, double bias_d, const acc_t* g_row,
                                               PairGrads* grads) {
  const int64_t n = ops.n, m = ops.m;
  const acc_t scale = static_cast<acc_t>(scale_d), bias = static_cast<acc_t>(bias_d);
  std::vector<double> row_g(n, 0.0), row_gp(n, 0.0);
  at::Tensor buffer = at::empty({ops.chunk_rows, m}, ops.query.options().dtype(ops.acc));
  for (int64_t r0 = 0; r0 < n; r0 += ops.chunk_rows) {
    const int64_t rows = std::min(ops.chunk_rows, n - r0);
    at::Tensor z = buffer.narrow(0, 0, rows);
    const at::Tensor q_chunk = ops.scores(z, r0, rows);
    acc_t* zp = z.data_ptr<acc_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r0 + r;
        siglip_grad_row(zp + r * m, m, scale, bias, i, g_row[i], &row_g[i], &row_gp[i]);
      }
    });
    if (grads != nullptr) grads->add(z, q_chunk, ops.key, r0);
  }
  double sg = 0.0, sgp = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    sg += row_g[i];
    sgp += row_gp[i];
  }
  return {sg, sgp};
}

at::Tensor siglip_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale,
                          const at::Tensor& bias) {
  check_pair(query, key);
  const double scale_d = scalar_arg(scale, "scale");
  const double bias_d = scalar_arg(bias, "bias");
  const int64_t n = query.size(0);
  at::Tensor row_loss = at::empty({n}, query.options().dtype(acc_type_of(query)));
  if (n == 0) return row_loss;
  const Operands ops(query, key);
  AT_DISPATCH_FLOATING_TYPES(acc_type_of(query), "infofuse_siglip_forward_cpu", [&] {
    siglip_forward_impl<scalar_t>(ops, scale_d, bias_d, row_loss.data_ptr<scalar_t>());
  });
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_backward(
    const at::Tensor& grad_row, const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale,
    const at::Tensor& bias, bool grad_query, bool grad_key, bool grad_scale, bool grad_bias) {
  check_pair(query, key);
  const double scale_d = scalar_arg(scale, "scale");
  const double bias_d = scalar_arg(bias, "bias");
  const int64_t n = query.size(0);
  const at::ScalarType acc = acc_type_of(query);
  const at::Tensor g_row = vector_arg(grad_row, "grad_row", n, acc);
  PairGrads grads(query, key, grad_query, grad_key);
  const auto acc_opts = query.options().dtype(acc);
  at::Tensor g_scale = grad_scale ? at::zeros({}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor g_bias = grad_bias ? at::zeros({}, acc_opts) : at::empty({0}, acc_opts);
  if (!(grad_query || grad_key || grad_scale || grad_bias)) return {grads.grad_query, grads.grad_key, g_scale, g_bias};
  if (n > 0) {
    const Operands ops(query, key);
    std::pair<double, double> sums;
    AT_DISPATCH_FLOATING_TYPES(acc, "infofuse_siglip_backward_cpu", [&] {
      sums = siglip_backward_impl<scalar_t>(ops, scale_d, bias_d, g_row.data_ptr<scalar_t>(),
                                            (grad_query || grad_key) ? &grads : nullptr);
    });
    if (grad_bias) g_bias.fill_(sums.first);
    if (grad_scale) g_scale.fill_(sums.second);
  }
  auto [gq, gk] = grads.finish();
  return {gq, gk, g_scale, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(infofuse, CPU, m) {
  m.impl("info_nce_forward", &info_nce_forward);
  m.impl("info_nce_backward", &info_nce_backward);
  m.impl("siglip_forward", &siglip_forward);
  m.impl("siglip_backward", &siglip_backward);
}

}  // namespace infofuse::cpu
