"""k nearest neighbours with a fused distance + k-selection kernel, and the marginal neighbour counts of KSG.

``knn_candidates``: each program owns BLOCK_Q query rows of one batch entry and streams the candidates in tiles of
BLOCK_C rows. A tile of distances is computed in registers — Chebyshev and float64 Euclidean by direct
differences (exact), float32/bf16/fp16 Euclidean as ‖a‖² + ‖b‖² − 2a·b with ``tl.dot`` (a screening pass) — and
merged into a running top-KP per query held in registers: while some query's best remaining tile entry beats its
current worst kept entry, that entry replaces the worst (ties go to the smaller index: tiles arrive in index
order and ``tl.argmin`` takes the leftmost minimum). Memory: O(N·KP) out, nothing N×M. KP is k plus a margin
when the tile distances are screened: the caller recomputes the KP candidates' distances exactly and keeps the
k best (``infofuse.knn``), so the selected distances are exact and the screening only has to rank the true k
inside the top KP.

``knn_counts``: per query, #{j ≠ i : dist(x_i, x_j) < r_i} (or ≤), by direct differences tile by tile.

All row, column and feature offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["knn_candidates", "knn_counts"]


@triton.jit
def _distance_tile(x_ptr, y_ptr, rows, cols, row_mask, col_mask, D, sxn, sxd, syn, syd, METRIC: tl.constexpr,
                   DIRECT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_Q: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """(BLOCK_Q × BLOCK_C) tile: squared Euclidean (METRIC 0) or Chebyshev (METRIC 1) distances in ACC."""
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
    if DIRECT:
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            a = tl.load(x_ptr + rows[:, None] * sxn + ds[None, :] * sxd, mask=row_mask[:, None] & d_mask[None, :],
                        other=0.0).to(ACC)  # fmt: skip
            b = tl.load(y_ptr + cols[:, None] * syn + ds[None, :] * syd, mask=col_mask[:, None] & d_mask[None, :],
                        other=0.0).to(ACC)  # fmt: skip
            diff = a[:, None, :] - b[None, :, :]
            if METRIC == 1:
                acc = tl.maximum(acc, tl.max(tl.abs(diff), axis=2))
            else:
                acc += tl.sum(diff * diff, axis=2)
    else:
        na = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        nb = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            a = tl.load(x_ptr + rows[:, None] * sxn + ds[None, :] * sxd, mask=row_mask[:, None] & d_mask[None, :],
                        other=0.0).to(tl.float32)  # fmt: skip
            b = tl.load(y_ptr + cols[:, None] * syn + ds[None, :] * syd, mask=col_mask[:, None] & d_mask[None, :],
                        other=0.0).to(tl.float32)  # fmt: skip
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
            na += tl.sum(a * a, axis=1)
            nb += tl.sum(b * b, axis=1)
        acc = tl.maximum(na[:, None] + nb[None, :] - 2.0 * acc, 0.0)
    return acc


@triton.jit
def _knn_kernel(
    x_ptr, y_ptr, out_d_ptr, out_i_ptr,
    N, M, D, K,
    sxb, sxn, sxd, syb, syn, syd,
    EXCLUDE_SELF: tl.constexpr, METRIC: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, KP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    x_b = x_ptr + batch * sxb
    y_b = y_ptr + batch * syb
    rows = pid * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    row_mask = rows < N
    slot = tl.arange(0, KP)[None, :]
    real = slot < K
    zero = tl.zeros((BLOCK_Q, KP), dtype=ACC)
    best_d = tl.where(real, zero + float("inf"), zero - float("inf"))  # padding slots never count as worst
    best_i = tl.zeros((BLOCK_Q, KP), dtype=tl.int64) - (slot + 1).to(tl.int64)  # distinct placeholders
    for c0 in range(0, M, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < M
        t = _distance_tile(x_b, y_b, rows, cols, row_mask, col_mask, D, sxn, sxd, syn, syd, METRIC, DIRECT,
                           PRECISION, ACC, BLOCK_Q, BLOCK_C, BLOCK_D)  # fmt: skip
        t = tl.where(col_mask[None, :], t, float("inf"))
        if EXCLUDE_SELF:
            t = tl.where(rows[:, None] == cols[None, :], float("inf"), t)
        more = tl.max((row_mask & (tl.min(t, axis=1) < tl.max(best_d, axis=1))).to(tl.int32), axis=0) > 0
        while more:
            c_min = tl.min(t, axis=1)
            c_arg = c0 + tl.argmin(t, axis=1).to(tl.int64)
            worst = tl.max(best_d, axis=1)
            w_idx = tl.max(tl.where(best_d == worst[:, None], best_i, -(1 << 62)), axis=1)  # the worst's index
            take = row_mask & (c_min < worst)
            hit = take[:, None] & (best_i == w_idx[:, None])
            best_d = tl.where(hit, c_min[:, None], best_d)
            best_i = tl.where(hit, c_arg[:, None], best_i)
            t = tl.where(cols[None, :] == c_arg[:, None], float("inf"), t)  # taken (or no better than kept)
            more = tl.max((row_mask & (tl.min(t, axis=1) < tl.max(best_d, axis=1))).to(tl.int32), axis=0) > 0
    # out: the kept entries in (distance, index) order
    out = rows[:, None] * KP + slot
    for j in range(0, KP):
        m = tl.min(tl.where(real, best_d, float("inf")), axis=1)
        m_idx = tl.min(tl.where(real & (best_d == m[:, None]), best_i, 1 << 62), axis=1)
        sel = slot == j
        written = tl.where(m_idx >= (1 << 62), -1, m_idx)  # past the kept entries: "no candidate"
        tl.store(out_d_ptr + batch * N * KP + out, tl.where(sel, m[:, None], 0.0), mask=row_mask[:, None] & sel)
        tl.store(out_i_ptr + batch * N * KP + out, tl.where(sel, written[:, None], 0), mask=row_mask[:, None] & sel)
        best_d = tl.where(best_i == m_idx[:, None], float("inf"), best_d)
        best_i = tl.where(best_i == m_idx[:, None], 1 << 62, best_i)


@triton.jit
def _knn_count_kernel(
    x_ptr, r_ptr, out_ptr,
    N, D,
    sxb, sxn, sxd,
    METRIC: tl.constexpr, STRICT: tl.constexpr, ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    x_b = x_ptr + batch * sxb
    rows = pid * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    row_mask = rows < N
    r = tl.load(r_ptr + batch * N + rows, mask=row_mask, other=0.0)
    count = tl.zeros((BLOCK_Q,), dtype=tl.int64)
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < N
        t = _distance_tile(x_b, x_b, rows, cols, row_mask, col_mask, D, sxn, sxd, sxn, sxd, METRIC, True, "ieee",
                           ACC, BLOCK_Q, BLOCK_C, BLOCK_D)  # fmt: skip
        if METRIC == 0:
            t = tl.sqrt(t)
        if STRICT:
            inside = t < r[:, None]
        else:
            inside = t <= r[:, None]
        inside = inside & col_mask[None, :] & (rows[:, None] != cols[None, :])
        count += tl.sum(inside.to(tl.int64), axis=1)
    tl.store(out_ptr + batch * N + rows, count, mask=row_mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def knn_candidates(x: torch.Tensor, y: torch.Tensor, k: int, metric: int, exclude_self: bool):
    """(B, N, KP) candidate distances (squared for Euclidean; screened) and indices, KP ≥ k, in (distance,
    index) order; slots beyond the candidates hold +inf and negative indices. Returns (distances, indices, exact):
    ``exact`` says whether the tile distances were exact (no screening margin was needed)."""
    b, n, d = x.shape
    m = y.shape[1]
    direct = metric == 1 or x.dtype == torch.float64
    margin = 0 if direct else max(4, k // 2)
    kp = triton.next_power_of_2(k + margin)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_d = torch.empty((b, n, kp), dtype=acc_dtype, device=x.device)
    out_i = torch.empty((b, n, kp), dtype=torch.int64, device=x.device)
    if n == 0:
        return out_d, out_i, direct
    if x.is_cuda:
        meta = {"BLOCK_Q": 32, "BLOCK_C": 64, "BLOCK_D": 8 if direct else 32, "num_warps": 4}
        precision = "tf32x3" if x.dtype == torch.float32 else "ieee"
    else:  # the interpreter
        meta = {"BLOCK_Q": 32, "BLOCK_C": 64, "BLOCK_D": 16}
        precision = "ieee"
    grid = (triton.cdiv(n, meta["BLOCK_Q"]), b)
    _knn_kernel[grid](
        x, y, out_d, out_i, n, m, d, min(kp, k + margin), x.stride(0), x.stride(1), x.stride(2), y.stride(0),
        y.stride(1), y.stride(2), EXCLUDE_SELF=exclude_self, METRIC=metric, DIRECT=direct, PRECISION=precision,
        ACC=_acc(x.dtype), KP=kp, **meta,
    )  # fmt: skip
    return out_d, out_i, direct


def knn_counts(x: torch.Tensor, radius: torch.Tensor, metric: int, strict: bool) -> torch.Tensor:
    """(B, N) int64: #{j ≠ i : dist(x_i, x_j) < radius_i} (strict) or ≤, by direct differences."""
    b, n, d = x.shape
    out = torch.empty((b, n), dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    radius = radius.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()
    meta = {"BLOCK_Q": 32, "BLOCK_C": 64, "BLOCK_D": 8, "num_warps": 4} if x.is_cuda else {
        "BLOCK_Q": 32, "BLOCK_C": 64, "BLOCK_D": 16}  # fmt: skip
    _knn_count_kernel[(triton.cdiv(n, meta["BLOCK_Q"]), b)](
        x, radius, out, n, d, x.stride(0), x.stride(1), x.stride(2), METRIC=metric, STRICT=strict,
        ACC=_acc(x.dtype), **meta,
    )  # fmt: skip
    return out
