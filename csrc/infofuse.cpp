// infofuse._C: the schemas of every infofuse custom op, in one place, and the Python module.
//
// Implementations are registered per dispatch key beside their kernels (csrc/cpu/*.cpp for CPU,
// csrc/cuda/*.cu for CUDA). Fake (meta) kernels and autograd are registered from Python
// (python/infofuse/_ops/), so that the Triton backends can share them.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "cpu/gemm.h"

TORCH_LIBRARY(infofuse, m) {
  // Linear cross-entropy, forward. Returns (loss, lse, grad_input, grad_weight, grad_bias).
  // reduction: 0 none, 1 mean, 2 sum. softcap <= 0 means no softcap. chunk_size <= 0 picks one.
  // For mean/sum with a grad_* flag set, the matching gradient of the loss (for grad_output = 1) is
  // formed in this pass and returned; otherwise that output is an empty tensor.
  m.def(
      "linear_cross_entropy_forward(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, "
      "Tensor? weight, int reduction, int ignore_index, float label_smoothing, float z_loss, float softcap, "
      "int chunk_size, bool grad_input, bool grad_weight, bool grad_bias) "
      "-> (Tensor loss, Tensor lse, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Linear cross-entropy, backward by recomputation from the saved lse. grad_loss is the gradient of the
  // returned loss (shape () for mean/sum, (N,) for none); grad_lse (N,) that of the returned lse, if any.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, Tensor input, Tensor linear_weight, "
      "Tensor target, Tensor? linear_bias, Tensor? weight, Tensor lse, int reduction, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, int chunk_size, bool grad_input, bool grad_weight, "
      "bool grad_bias) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Pairwise InfoNCE over S = scale * query @ key.T (query (N, D), key (M, D), scale a 0-dim float32 tensor).
  // mode 0: row i's positive is target[i]; with labels/key_labels, other same-label columns leave row i's
  // softmax; exclude_self removes j == i. mode 1 (SupCon): j == i removed, positives {j != i: same label}.
  // Returns per-row (loss, lse) and, with want_cols (mode 0, M == N, col_target the inverse permutation of
  // target), per-column (loss, lse) of the transposed problem; empty tensors otherwise.
  m.def(
      "info_nce_forward(Tensor query, Tensor key, Tensor scale, Tensor target, Tensor? labels, "
      "Tensor? key_labels, Tensor? col_target, int mode, bool exclude_self, bool want_cols) "
      "-> (Tensor row_loss, Tensor row_lse, Tensor col_loss, Tensor col_lse)");
  // Gradients of sum_i grad_row[i]*row_loss[i] + sum_j grad_col[j]*col_loss[j] by recomputing S from the lse.
  m.def(
      "info_nce_backward(Tensor grad_row, Tensor? grad_col, Tensor query, Tensor key, Tensor scale, "
      "Tensor target, Tensor? labels, Tensor? key_labels, Tensor? col_target, Tensor row_lse, Tensor? col_lse, "
      "int mode, bool exclude_self, bool grad_query, bool grad_key, bool grad_scale) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_scale)");
  // SigLIP: per-row loss sum_j softplus(-y_ij (S_ij + bias)), y_ij = +1 if i == j else -1; bias 0-dim float32.
  m.def("siglip_forward(Tensor query, Tensor key, Tensor scale, Tensor bias) -> Tensor row_loss");
  m.def(
      "siglip_backward(Tensor grad_row, Tensor query, Tensor key, Tensor scale, Tensor bias, bool grad_query, "
      "bool grad_key, bool grad_scale, bool grad_bias) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_scale, Tensor grad_bias)");
  // k nearest neighbours of every row of x (B, N, d) among the rows of y (B, M, d), per batch entry.
  // metric: 0 Euclidean, 1 Chebyshev (max-norm). exclude_self (y is x, M == N): j == i is never a neighbour of i.
  // Returns (distances (B, N, k) ascending, in float32 — float64 for float64 inputs — recomputed exactly for the
  // selected neighbours; indices (B, N, k) int64). Ties in distance go to the smaller index.
  m.def("knn(Tensor x, Tensor y, int k, int metric, bool exclude_self) -> (Tensor distances, Tensor indices)");
  // For every row i of x (B, N, d): #{j != i : dist(x_i, x_j) < radius[b, i]} (strict) or <= (not strict), int64
  // (B, N); radius (B, N) in x's accumulation dtype. The marginal counts of the KSG estimators.
  m.def("knn_count(Tensor x, Tensor radius, int metric, bool strict) -> Tensor counts");
}

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef INFOFUSE_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  info["cpu_gemm"] = infofuse::cpu::gemm_backend_name();
  return info;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "infofuse C++/CUDA kernels; the ops live under torch.ops.infofuse";
  m.def("build_info", &build_info, "How this extension was built (OpenMP, CUDA, torch version, CPU GEMM)");
  m.def("set_cpu_gemm_backend", &infofuse::cpu::set_gemm_backend,
        "'auto' (oneDNN for float32 where PyTorch provides it, else at::mm) or 'aten' (always at::mm)");
}
