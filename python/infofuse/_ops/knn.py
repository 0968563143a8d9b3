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


def _rerank(x, y, idx, k, metric):
    """The k best of the candidates ``idx`` by exact distance, in (distance, index) order."""
    dist = exact_distances(x, y, idx, metric)
    by_index, order = torch.sort(idx, dim=-1)  # sort by index, then stably by the exact distance
    dist = torch.gather(dist, -1, order).masked_fill(by_index < 0, float("inf"))
    dist, order = torch.sort(dist, dim=-1, stable=True)
    return dist[..., :k].contiguous(), torch.gather(by_index, -1, order)[..., :k].contiguous()


# The Triton search in tiers: every query is screened in TF32; a query that the TF32 bound cannot certify is
# screened again in 3×TF32 (about a thousand times tighter); one that still is not certified is searched by the
# direct (exact) kernel. Counts of the last call, for benchmarks and tests: queries, screened again, searched directly.
SCREEN_TIERS = ("tf32", "tf32x3")
last_search_tiers: dict[str, int] = {"queries": 0, "tf32x3": 0, "direct": 0}


def _knn_triton(x, y, k, metric, exclude_self):
    from infofuse.triton_kernels.knn import knn_candidates

    reason = triton_usable(x.device)
    if reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}")
    last_search_tiers.update(queries=x.shape[0] * x.shape[1], tf32x3=0, direct=0)
    screened, idx, bound = knn_candidates(x, y, k, metric, exclude_self, precision=SCREEN_TIERS[0])
    dist, idx_k = _rerank(x, y, idx, k, metric)
    if bound is None or k == 0 or x.shape[1] == 0:
        return dist, idx_k
    redo = ~_certified(dist, screened, bound, k)
    if bool(redo.any()):
        for bi in redo.any(dim=1).nonzero().flatten().tolist():
            rows = redo[bi].nonzero().flatten()
            d_rows, i_rows = _search_again(x[bi, rows][None], y[bi : bi + 1], rows, k, metric, exclude_self)
            dist[bi, rows] = d_rows[0]
            idx_k[bi, rows] = i_rows[0]
    return dist, idx_k


def _certified(dist, screened, bound, k):
    """Whether each query's k best are certain: a candidate left out has screened distance ≥ the largest kept one, so
    its exact squared distance is ≥ that minus the bound; below it, the k-th exact distance cannot be beaten
    (strict: ties go to the smaller index, which may be one left out)."""
    kth = dist[..., k - 1].double() * (1 + 2.0**-18)
    return kth.square() < screened.amax(-1).double() - bound  # the KP-th smallest screened (kept in no order)


def _search_again(xs, y, rows, k, metric, exclude_self):
    """The k best of y for the queries xs (1, R, d), the rows ``rows`` of the original x: screened in 3×TF32, then
    by the direct kernel for those still not certified. A gathered query no longer knows its own index, so with
    exclude_self one more neighbour is asked for and the query itself is dropped by index."""
    from infofuse.triton_kernels.knn import knn_candidates

    kk = min(k + 1, y.shape[1]) if exclude_self else k

    def best(queries, own, cand):
        if exclude_self:
            cand = cand.masked_fill(cand == own[None, :, None], -1)  # the query itself: no candidate
        return _rerank(queries, y, cand, k, metric)

    last_search_tiers["tf32x3"] += rows.numel()
    screened, cand, bound = knn_candidates(xs, y, kk, metric, False, precision=SCREEN_TIERS[1])
    dist, idx = best(xs, rows, cand)
    # The query itself among the candidates leaves the certificate valid: the left-out ones are still beyond it.
    redo = ~_certified(dist, screened, bound, k)[0]
    if bool(redo.any()):
        last_search_tiers["direct"] += int(redo.sum())
        _, cand, _ = knn_candidates(xs[:, redo], y, kk, metric, False, direct=True)
        dist[:, redo], idx[:, redo] = best(xs[:, redo], rows[redo], cand)
    return dist, idx


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
