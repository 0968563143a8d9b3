// infofuse._C: the Python module of the C++/CUDA kernels.
//
// Every op's schema is defined once, in Python (python/infofuse/_ops/_library.py and the op modules beside it),
// with its fake kernel and autograd; the C++ files only register implementations per dispatch key beside their
// kernels (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA).
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "cpu/gemm.h"
#include "cpu/knn_path.h"

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
  info["cpu_knn_amx"] = infofuse::cpu::knn_amx_status();
  return info;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "infofuse C++/CUDA kernels; the ops live under torch.ops.infofuse";
  m.def("build_info", &build_info, "How this extension was built (OpenMP, CUDA, torch version, CPU GEMM)");
  m.def("set_cpu_gemm_backend", &infofuse::cpu::set_gemm_backend,
        "'auto' (oneDNN for float32 where PyTorch provides it, else at::mm) or 'aten' (always at::mm)");
  m.def("set_cpu_knn_path", &infofuse::cpu::set_knn_path,
        "float Euclidean knn on the CPU: 'auto', 'tree' (always the k-d tree) or 'amx' (the AMX brute force wherever "
        "it can run)");
  m.def("cpu_knn_amx_problems", &infofuse::cpu::knn_amx_problems,
        "batch entries solved by the CPU knn's AMX path so far in this process");
}
