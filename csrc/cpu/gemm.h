// The GEMMs of the CPU kernels: out = A·B, or out += A·B.
//
// For float32, oneDNN's matmul (the one PyTorch ships and uses for its own reduced-precision matmuls) runs
// our chunk shapes 1.2-1.7x faster than the BLAS behind at::mm on the machines we measured (bench/NOTES.md).
// PyTorch exports it (at::native::mkldnn_matmul) but does not ship its header, so it is looked up at run
// time by its mangled name, which encodes the whole signature: a PyTorch build without it, or with another
// signature, simply keeps at::mm. It follows PyTorch's own settings: torch.backends.mkldnn.enabled = False
// turns it off, and torch.backends.mkldnn's float32 matmul precision applies (IEEE float32 by default).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace infofuse::cpu {

enum class GemmBackend { kAuto, kAten };

// out = a @ b (accumulate = false) or out += a @ b (accumulate = true); a (M, K), b (K, N), out (M, N).
void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate);

// Which GEMM gemm() uses for float32: "onednn" or "aten"; set_gemm_backend("aten") forces at::mm.
std::string gemm_backend_name();
void set_gemm_backend(const std::string& name);

}  // namespace infofuse::cpu
