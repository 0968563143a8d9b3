"""Custom ops of the k-NN search: ``infofuse::knn`` / ``knn_count`` (C++: CPU in csrc/cpu/knn.cpp, CUDA in
csrc/cuda/knn.cu) and their Triton twins ``knn_triton`` / ``knn_count_triton`` with the same schemas.

The ops return indices, so they are not differentiable; the estimators recompute the selected distances with
autograd from the indices (``infofuse.knn``), O(N·k·d).
"""

from __future__ import annotations

import torch

from .._ext import cpp_available
from ._triton_common import triton_usable

KNN_SCHEMA = "{name}(Tensor x, Tensor y, int k, int metric, bool exclude_self) -> (Tensor distances, Tensor indices)"
KNN_COUNT_SCHEMA = "{name}(Tensor x, Tensor radius, int metric, bool strict) -> Tensor counts"

METRICS = {"euclidean": 0, "chebyshev": 1}
# Bytes of gathered candidate rows per step of the exact re-ranking.
RERANK_BYTES = 64 << 20


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _knn_fake(x, y, k, metric, exclude_self):
    b, n, _ = x.shape
    return x.new_empty((b, n, k), dtype=acc_dtype(x.dtype)), x.new_empty((b, n, k), dtype=torch.int64)


def _knn_count_fake(x, radius, metric, strict):
    return x.new_empty(x.shape[:2], dtype=torch.int64)


def exact_distances(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, metric: int) -> torch.Tensor:
    """dist(x[b, i], y[b, idx[b, i, j]]) by direct differences in the accumulation dtype (+inf where idx < 0)."""
    b, n, kp = idx.shape
    d = x.shape[2]
    acc = acc_dtype(x.dtype)
    out = torch.empty((b, n, kp), dtype=acc, device=x.device)
    rows = max(1, RERANK_BYTES // max(1, b * kp * d * 4))
    for r0 in range(0, n, rows):
        part = idx[:, r0 : r0 + rows]
        safe = part.clamp(min=0)
        nb = torch.gather(y.to(acc), 1, safe.reshape(b, -1, 1).expand(-1, -1, d)).reshape(*safe.shape, d)
        diff = x[:, r0 : r0 + rows, None, :].to(acc) - nb
        if metric == 1:
            dist = diff.abs().amax(-1) if d else diff.new_zeros(diff.shape[:-1])
        else:
            dist = torch.linalg.vector_norm(diff, dim=-1)
        out[:, r0 : r0 + rows] = dist.masked_fill(part < 0, float("inf"))
    return out


def _knn_triton(x, y, k, metric, exclude_self):
    from infofuse.triton_kernels.knn import knn_candidates

    reason = triton_usable(x.device)
    if reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}")
    _, idx, _ = knn_candidates(x, y, k, metric, exclude_self)
    dist = exact_distances(x, y, idx, metric)
    # (distance, index) order: sort by index, then stably by the exact distance; keep k
    by_index, order = torch.sort(idx, dim=-1)
    dist = torch.gather(dist, -1, order)
    dist = dist.masked_fill(by_index < 0, float("inf"))
    dist, order = torch.sort(dist, dim=-1, stable=True)
    return dist[..., :k].contiguous(), torch.gather(by_index, -1, order)[..., :k].contiguous()


def _knn_count_triton(x, radius, metric, strict):
    from infofuse.triton_kernels.knn import knn_counts

    reason = triton_usable(x.device)
    if reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}")
    return knn_counts(x, radius, metric, strict)


_lib = torch.library.Library("infofuse", "FRAGMENT")
_lib.define(KNN_SCHEMA.format(name="knn_triton"))
_lib.define(KNN_COUNT_SCHEMA.format(name="knn_count_triton"))
torch.library.impl("infofuse::knn_triton", ("cpu", "cuda"), lib=_lib)(_knn_triton)
torch.library.impl("infofuse::knn_count_triton", ("cpu", "cuda"), lib=_lib)(_knn_count_triton)
torch.library.register_fake("infofuse::knn_triton")(_knn_fake)
torch.library.register_fake("infofuse::knn_count_triton")(_knn_count_fake)

if cpp_available() and hasattr(torch.ops.infofuse, "knn"):  # declared in csrc/infofuse.cpp
    torch.library.register_fake("infofuse::knn")(_knn_fake)
    torch.library.register_fake("infofuse::knn_count")(_knn_count_fake)


def cuda_kernels_built() -> bool:
    """Whether the extension was built with the CUDA k-NN kernels (csrc/cuda/knn.cu)."""
    from .._ext import build_info

    return bool(build_info().get("cuda"))
