#include "gemm.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <atomic>

namespace infofuse::cpu {
namespace {

using OneDnnMatmul = void (*)(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                              float alpha);

// at::native::mkldnn_matmul(const Tensor&, const Tensor&, const Tensor&, float beta, float alpha):
// result = beta * result + alpha * mat1 @ mat2.
OneDnnMatmul find_onednn_matmul() {
  static const OneDnnMatmul fn = [] {
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    void* sym = lib ? dlsym(lib, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff") : nullptr;
    return reinterpret_cast<OneDnnMatmul>(sym);
  }();
  return fn;
}

std::atomic<GemmBackend> g_backend{GemmBackend::kAuto};

bool unit_stride(const at::Tensor& t) { return t.stride(1) == 1 || t.stride(0) == 1; }

bool use_onednn(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  return g_backend.load() == GemmBackend::kAuto && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
         out.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0 && out.is_contiguous() && unit_stride(a) &&
         unit_stride(b) && at::globalContext().userEnabledMkldnn() && find_onednn_matmul() != nullptr;
}

}  // namespace

void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) {
  if (use_onednn(a, b, out)) {
    find_onednn_matmul()(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

std::string gemm_backend_name() {
  const bool onednn = g_backend.load() == GemmBackend::kAuto && find_onednn_matmul() != nullptr &&
                      at::globalContext().userEnabledMkldnn();
  return onednn ? "onednn" : "aten";
}

void set_gemm_backend(const std::string& name) {
  TORCH_CHECK_VALUE(name == "auto" || name == "aten", "gemm backend must be 'auto' or 'aten', got '", name, "'");
  g_backend.store(name == "auto" ? GemmBackend::kAuto : GemmBackend::kAten);
}

}  // namespace infofuse::cpu
