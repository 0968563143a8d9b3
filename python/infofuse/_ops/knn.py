"""Custom ops of the k-NN search: ``infofuse::knn`` / ``knn_count`` (C++: CPU in csrc/cpu/knn.cpp, CUDA in
csrc/cuda/knn.cu) and their Triton twins ``knn_triton`` / ``knn_count_triton`` with the same schemas.

The ops return indices, so they are not differentiable; the estimators recompute the selected distances with
autograd from the indices (``infofuse.knn``), O(N·k·d).
"""

from __future__ import annotations

import torch

from ._library import LIB, define
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
        nb = torch.gather(y, 1, safe.reshape(b, -1, 1).expand(-1, -1, d)).reshape(*safe.shape, d).to(acc)
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
# direct (exact) kernel. A large search first probes PROBE_QUERIES random queries in TF32 (``_first_tier``): where
# TF32 certifies fewer than PROBE_MIN_SHARE of them (unit vectors in tight clusters, bench/knn_screening.py), every
# query starts in 3×TF32 instead of paying for both passes. Counts of the last call, for benchmarks and tests:
# queries, probed queries, the first tier, queries screened in 3×TF32 (first or again), searched directly.
SCREEN_TIERS = ("tf32", "tf32x3")
PROBE_QUERIES = 2048
PROBE_MIN_PAIRS = 1 << 32  # (query, candidate) pairs from which a search is probed (and 16 probes' worth of queries)
PROBE_MIN_SHARE = 0.5
last_search_tiers: dict[str, int | str] = {"queries": 0, "probe": 0, "first": "tf32", "tf32x3": 0, "direct": 0}


def _knn_triton(x, y, k, metric, exclude_self):
    from infofuse.triton_kernels.knn import knn_candidates

    reason = triton_usable(x.device)
    if reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}")
    queries = x.shape[0] * x.shape[1]
    last_search_tiers.update(queries=queries, probe=0, first=SCREEN_TIERS[0], tf32x3=0, direct=0)
    first = _first_tier(x, y, k, metric, exclude_self)
    if first == SCREEN_TIERS[1]:
        last_search_tiers.update(first=first, tf32x3=queries)
    screened, idx, bound = knn_candidates(x, y, k, metric, exclude_self, precision=first)
    dist, idx_k = _rerank(x, y, idx, k, metric)
    if bound is None or k == 0 or x.shape[1] == 0:
        return dist, idx_k
    redo = ~_certified(dist, screened, bound, k)
    if bool(redo.any()):
        later = SCREEN_TIERS[SCREEN_TIERS.index(first) + 1 :]
        for bi in redo.any(dim=1).nonzero().flatten().tolist():
            rows = redo[bi].nonzero().flatten()
            d_rows, i_rows = _search_again(x[bi, rows][None], y[bi : bi + 1], rows, k, metric, exclude_self, later)
            dist[bi, rows] = d_rows[0]
            idx_k[bi, rows] = i_rows[0]
    return dist, idx_k


def _first_tier(x, y, k, metric, exclude_self) -> str:
    """The first tier's precision: TF32, unless this is a large screened search and TF32 certifies fewer than
    PROBE_MIN_SHARE of PROBE_QUERIES random queries (the same rows in every batch entry), screened first.

    TF32 first costs C₁ + (1 − p)·C₃ for a share p certified by it, 3×TF32 first C₃. C₁/C₃ is about 1/3 where the
    matrix unit bounds both (d = 128: three TF32 dots for one) and about 2/3 where the issue slots do (d = 16: 0.245
    and 0.366 warp-instructions a pair, bench/NOTES.md), so the break-even p lies between, as PROBE_MIN_SHARE does.
    The probe is PROBE_QUERIES / N of a TF32 pass's work, and takes about one wave of its blocks' time."""
    b, n, _ = x.shape
    screened = metric == 0 and x.dtype != torch.float64  # else knn_candidates searches directly
    if not screened or n < 16 * PROBE_QUERIES or b * n * y.shape[1] < PROBE_MIN_PAIRS:
        return SCREEN_TIERS[0]
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:PROBE_QUERIES].to(x.device)
    last_search_tiers["probe"] = b * rows.numel()
    certified = _gathered(x[:, rows], y, rows, k, metric, exclude_self, SCREEN_TIERS[0])[2]
    return SCREEN_TIERS[0] if float(certified.double().mean()) >= PROBE_MIN_SHARE else SCREEN_TIERS[1]


def _certified(dist, screened, bound, k):
    """Whether each query's k best are certain: a candidate left out has screened distance ≥ the largest kept one, so
    its exact squared distance is ≥ that minus the bound; below it, the k-th exact distance cannot be beaten
    (strict: ties go to the smaller index, which may be one left out)."""
    kth = dist[..., k - 1].double() * (1 + 2.0**-18)
    return kth.square() < screened.amax(-1).double() - bound  # the KP-th smallest screened (kept in no order)


def _gathered(xs, y, rows, k, metric, exclude_self, precision):
    """(distances, indices, certified) of the k best of y (B, M, d) for the gathered queries xs (B, R, d), the rows
    ``rows`` (R,) of the original x: screened in ``precision``, or by the direct kernel where it is None (all
    certified). A gathered query no longer knows its own index, so with exclude_self one more neighbour is asked
    for and the query itself is dropped by index; among the candidates it leaves the certificate valid (those left
    out are still beyond the largest kept)."""
    from infofuse.triton_kernels.knn import knn_candidates

    kk = min(k + 1, y.shape[1]) if exclude_self else k
    screened, cand, bound = knn_candidates(
        xs, y, kk, metric, False, direct=True if precision is None else None, precision=precision or SCREEN_TIERS[0]
    )
    if exclude_self:
        cand = cand.masked_fill(cand == rows[None, :, None], -1)  # the query itself: no candidate
    dist, idx = _rerank(xs, y, cand, k, metric)
    if precision is None:
        return dist, idx, torch.ones(dist.shape[:2], dtype=torch.bool, device=dist.device)
    return dist, idx, _certified(dist, screened, bound, k)


def _search_again(xs, y, rows, k, metric, exclude_self, tiers):
    """The k best of y for the queries xs (1, R, d), the rows ``rows`` of the original x: screened in each precision
    of ``tiers`` in turn, then by the direct kernel, each query until it is certified."""
    dist = idx = None
    todo = torch.arange(rows.numel(), device=rows.device)
    for precision in (*tiers, None):
        last_search_tiers[precision or "direct"] += todo.numel()
        d, i, certified = _gathered(xs[:, todo], y, rows[todo], k, metric, exclude_self, precision)
        if dist is None:
            dist, idx = d, i
        else:
            dist[:, todo], idx[:, todo] = d, i
        todo = todo[~certified[0]]
        if todo.numel() == 0:
            break
    return dist, idx


def _knn_count_triton(x, radius, metric, strict):
    from infofuse.triton_kernels.knn import knn_counts

    reason = triton_usable(x.device)
    if reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}")
    return knn_counts(x, radius, metric, strict)


# "knn" / "knn_count" are implemented by the C++ extension (csrc/cpu/knn.cpp, csrc/cuda/knn.cu), their "_triton"
# twins here; all four share two schemas and two fake kernels.
for _name in ("knn", "knn_triton"):
    torch.library.register_fake(define(KNN_SCHEMA, _name))(_knn_fake)
for _name in ("knn_count", "knn_count_triton"):
    torch.library.register_fake(define(KNN_COUNT_SCHEMA, _name))(_knn_count_fake)
torch.library.impl("infofuse::knn_triton", ("cpu", "cuda"), lib=LIB)(_knn_triton)
torch.library.impl("infofuse::knn_count_triton", ("cpu", "cuda"), lib=LIB)(_knn_count_triton)


def cuda_kernels_built() -> bool:
    """Whether the extension was built with the CUDA k-NN kernels (csrc/cuda/knn.cu)."""
    from .._ext import build_info

    return bool(build_info().get("cuda"))
