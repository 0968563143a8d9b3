"""Pairwise InfoNCE / SigLIP: the per-entry terms every pairwise kernel shares, and the row passes of the chunked
strategy over a chunk of scores written by a library GEMM.

Notation (MATH.md, "Pairwise InfoNCE"): raw_ij = q_i·k_j, z_ij = scale·raw_ij. For a row i of the softmax problem,
``allowed`` says which j enter its log-sum-exp and ``positive`` which are its positives:

* InfoNCE (not SUPCON): j = i leaves with EXCLUDE_SELF; with HAS_LABELS, every j ≠ target_i whose label equals
  row i's leaves (false-negative masking); the positive is j = target_i.
* SupCon: j = i leaves; the positives are the other same-label j.

The column problem of a symmetric loss is the same rule on the transposed scores, with the roles of the label
vectors swapped and the column targets (the inverse permutation) as targets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["pair_grad_rows", "pair_grad_terms", "pair_lse_rows", "pair_masks", "siglip_rows", "siglip_terms"]


@triton.jit
def pair_masks(
    i, j, valid, t_i, lab_i, lab_j, EXCLUDE_SELF: tl.constexpr, HAS_LABELS: tl.constexpr, SUPCON: tl.constexpr
):
    """(allowed, positive) for broadcast-compatible row indices i and column indices j (int64)."""
    if SUPCON:
        allowed = valid & (i != j)
        positive = allowed & (lab_i == lab_j)
    else:
        is_target = j == t_i
        allowed = valid
        if EXCLUDE_SELF:
            allowed = allowed & (i != j)
        if HAS_LABELS:
            allowed = allowed & ((lab_i != lab_j) | is_target)
        positive = valid & is_target
    return allowed, positive


@triton.jit
def pair_grad_terms(
    z,
    i,
    j,
    valid,
    t_i,
    lab_i,
    lab_j,
    lse_i,
    g_i,
    inv_count_i,
    ct_j,
    lse_j,
    g_j,
    EXCLUDE_SELF: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SUPCON: tl.constexpr,
    HAS_COLS: tl.constexpr,
):
    """dLoss/dz: g_i·(allowed·e^{z − lse_i} − positive/|P|) (+ g_j·(allowed·e^{z − lse_j} − [i = ct_j])); 0 off
    ``valid``. For InfoNCE inv_count_i is 1."""
    allowed, positive = pair_masks(i, j, valid, t_i, lab_i, lab_j, EXCLUDE_SELF, HAS_LABELS, SUPCON)
    g = g_i * (tl.where(allowed, tl.exp(z - lse_i), 0.0) - tl.where(positive, inv_count_i, 0.0))
    if HAS_COLS:
        g += g_j * (tl.where(allowed, tl.exp(z - lse_j), 0.0) - tl.where(valid & (i == ct_j), 1.0, 0.0))
    return tl.where(valid, g, 0.0)


@triton.jit
def siglip_terms(z, i, j, valid, bias):
    """(softplus(−y(z + b)), d/dz of it) with y = +1 where i = j, −1 elsewhere; 0 off ``valid``."""
    y = tl.where(i == j, 1.0, -1.0)
    u = -y * (z + bias)
    loss = tl.maximum(u, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(u)))  # softplus(u), stable
    sig = 1.0 / (1.0 + tl.exp(-u))  # σ(u)
    return tl.where(valid, loss, 0.0), tl.where(valid, -y * sig, 0.0)


@triton.jit
def _pair_lse_rows_kernel(
    s_ptr,
    stride_s,
    scale_ptr,
    target_ptr,
    lab_row_ptr,
    lab_col_ptr,
    lse_ptr,
    loss_ptr,
    r0,
    M,
    EXCLUDE_SELF: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SUPCON: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One program per chunk row: online lse over the allowed columns, and the row's loss."""
    r = tl.program_id(0).to(tl.int64)
    i = r0 + r
    scale = tl.load(scale_ptr).to(tl.float32)
    t_i = i * 0 - 1
    if not SUPCON:
        t_i = tl.load(target_ptr + i)
    lab_i = i * 0
    if HAS_LABELS or SUPCON:
        lab_i = tl.load(lab_row_ptr + i)
    m = tl.full((), float("-inf"), tl.float32)
    acc = tl.zeros((), tl.float32)
    pos_sum = tl.zeros((), tl.float32)
    pos_cnt = tl.zeros((), tl.float32)
    for c0 in range(0, M, BLOCK_M):
        j = c0 + tl.arange(0, BLOCK_M).to(tl.int64)
        valid = j < M
        z = tl.load(s_ptr + r * stride_s + j, mask=valid, other=0.0).to(tl.float32) * scale
        lab_j = j * 0
        if HAS_LABELS or SUPCON:
            lab_j = tl.load(lab_col_ptr + j, mask=valid, other=0)
        allowed, positive = pair_masks(i, j, valid, t_i, lab_i, lab_j, EXCLUDE_SELF, HAS_LABELS, SUPCON)
        zm = tl.where(allowed, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: keep the sums at 0
        acc = acc * tl.exp(m - m_ref) + tl.sum(tl.exp(zm - m_ref), axis=0)
        m = m_new
        pos_sum += tl.sum(tl.where(positive, z, 0.0), axis=0)
        pos_cnt += tl.sum(positive.to(tl.float32), axis=0)
    lse = m + tl.log(acc)
    if SUPCON:
        loss = tl.where(pos_cnt > 0, lse - pos_sum / tl.maximum(pos_cnt, 1.0), 0.0)
    else:
        loss = lse - pos_sum
    tl.store(lse_ptr + i, lse)
    tl.store(loss_ptr + i, loss)


@triton.jit
def _pair_grad_rows_kernel(
    s_ptr,
    stride_s,
    scale_ptr,
    target_ptr,
    lab_row_ptr,
    lab_col_ptr,
    count_ptr,
    row_lse_ptr,
    grad_row_ptr,
    col_target_ptr,
    col_lse_ptr,
    grad_col_ptr,
    ds_ptr,
    r0,
    M,
    EXCLUDE_SELF: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SUPCON: tl.constexpr,
    HAS_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One program per chunk row: replaces raw scores q_i·k_j by scale·dLoss/dz_ij in place and writes
    Σ_j dLoss/dz_ij·raw_ij (that row's share of the scale's gradient)."""
    r = tl.program_id(0).to(tl.int64)
    i = r0 + r
    scale = tl.load(scale_ptr).to(tl.float32)
    t_i = i * 0 - 1
    if not SUPCON:
        t_i = tl.load(target_ptr + i)
    lab_i = i * 0
    if HAS_LABELS or SUPCON:
        lab_i = tl.load(lab_row_ptr + i)
    g_i = tl.load(grad_row_ptr + i)
    inv_count = 1.0
    if SUPCON:
        count = tl.load(count_ptr + i).to(tl.float32)
        g_i = tl.where(count > 0, g_i, 0.0)  # rows without a positive have no loss
        inv_count = 1.0 / tl.maximum(count, 1.0)
    lse_i = tl.load(row_lse_ptr + i)
    ds = tl.zeros((), tl.float32)
    for c0 in range(0, M, BLOCK_M):
        j = c0 + tl.arange(0, BLOCK_M).to(tl.int64)
        valid = j < M
        ptrs = s_ptr + r * stride_s + j
        raw = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
        lab_j = j * 0
        if HAS_LABELS or SUPCON:
            lab_j = tl.load(lab_col_ptr + j, mask=valid, other=0)
        ct_j = j * 0
        lse_j = raw * 0.0
        g_j = raw * 0.0
        if HAS_COLS:
            ct_j = tl.load(col_target_ptr + j, mask=valid, other=-1)
            lse_j = tl.load(col_lse_ptr + j, mask=valid, other=0.0)
            g_j = tl.load(grad_col_ptr + j, mask=valid, other=0.0)
        g = pair_grad_terms(
            raw * scale,
            i,
            j,
            valid,
            t_i,
            lab_i,
            lab_j,
            lse_i,
            g_i,
            inv_count,
            ct_j,
            lse_j,
            g_j,
            EXCLUDE_SELF,
            HAS_LABELS,
            SUPCON,
            HAS_COLS,
        )
        ds += tl.sum(g * raw, axis=0)
        tl.store(ptrs, (g * scale).to(s_ptr.dtype.element_ty), mask=valid)
    tl.store(ds_ptr + i, ds)


@triton.jit
def _siglip_rows_kernel(
    s_ptr,
    stride_s,
    scale_ptr,
    bias_ptr,
    grad_row_ptr,
    loss_ptr,
    ds_ptr,
    db_ptr,
    r0,
    M,
    FORWARD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One program per chunk row. FORWARD: the row's loss; else scale·dLoss/dz in place of the raw scores and the
    row's shares of the scale's and the bias's gradients."""
    r = tl.program_id(0).to(tl.int64)
    i = r0 + r
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    g_i = 0.0
    if not FORWARD:
        g_i = tl.load(grad_row_ptr + i)
    loss = tl.zeros((), tl.float32)
    ds = tl.zeros((), tl.float32)
    db = tl.zeros((), tl.float32)
    for c0 in range(0, M, BLOCK_M):
        j = c0 + tl.arange(0, BLOCK_M).to(tl.int64)
        valid = j < M
        ptrs = s_ptr + r * stride_s + j
        raw = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
        term, dz = siglip_terms(raw * scale, i, j, valid, bias)
        if FORWARD:
            loss += tl.sum(term, axis=0)
        else:
            g = g_i * dz
            ds += tl.sum(g * raw, axis=0)
            db += tl.sum(g, axis=0)
            tl.store(ptrs, (g * scale).to(s_ptr.dtype.element_ty), mask=valid)
    if FORWARD:
        tl.store(loss_ptr + i, loss)
    else:
        tl.store(ds_ptr + i, ds)
        tl.store(db_ptr + i, db)


def _block_m(s: torch.Tensor) -> dict:
    if s.is_cuda:
        return {"BLOCK_M": 2048, "num_warps": 8}
    return {"BLOCK_M": 256}  # the interpreter: fewer, larger NumPy steps


def _dummy(t, like):
    return t if t is not None else like


def pair_lse_rows(s, r0, scale, target, lab_row, lab_col, lse, loss, *, exclude_self, supcon):
    """Row lse and loss of rows r0 … r0 + len(s) − 1 from their raw scores ``s`` (rows × M, any float dtype)."""
    if s.shape[0] == 0:
        return
    _pair_lse_rows_kernel[(s.shape[0],)](
        s,
        s.stride(0),
        scale,
        _dummy(target, lse),
        _dummy(lab_row, lse),
        _dummy(lab_col, lse),
        lse,
        loss,
        r0,
        s.shape[1],
        EXCLUDE_SELF=exclude_self,
        HAS_LABELS=lab_row is not None and not supcon,
        SUPCON=supcon,
        **_block_m(s),
    )


def pair_grad_rows(
    s,
    r0,
    scale,
    target,
    lab_row,
    lab_col,
    count,
    row_lse,
    grad_row,
    col_target,
    col_lse,
    grad_col,
    ds_rows,
    *,
    exclude_self,
    supcon,
):
    """In place: raw scores → scale·dLoss/dz for rows r0 …; ``ds_rows[i]`` = Σ_j dLoss/dz_ij·raw_ij."""
    if s.shape[0] == 0:
        return
    has_cols = grad_col is not None
    _pair_grad_rows_kernel[(s.shape[0],)](
        s,
        s.stride(0),
        scale,
        _dummy(target, row_lse),
        _dummy(lab_row, row_lse),
        _dummy(lab_col, row_lse),
        _dummy(count, row_lse),
        row_lse,
        grad_row,
        _dummy(col_target, row_lse),
        _dummy(col_lse, row_lse),
        _dummy(grad_col, row_lse),
        ds_rows,
        r0,
        s.shape[1],
        EXCLUDE_SELF=exclude_self,
        HAS_LABELS=lab_row is not None and not supcon,
        SUPCON=supcon,
        HAS_COLS=has_cols,
        **_block_m(s),
    )


def siglip_rows(s, r0, scale, bias, *, loss=None, grad_row=None, ds_rows=None, db_rows=None):
    """Forward (``loss`` given): per-row SigLIP losses; backward: scale·dLoss/dz in place, per-row d(scale), d(bias)."""
    if s.shape[0] == 0:
        return
    forward = loss is not None
    any_ = loss if forward else grad_row
    _siglip_rows_kernel[(s.shape[0],)](
        s,
        s.stride(0),
        scale,
        bias,
        _dummy(grad_row, any_),
        _dummy(loss, any_),
        _dummy(ds_rows, any_),
        _dummy(db_rows, any_),
        r0,
        s.shape[1],
        FORWARD=forward,
        **_block_m(s),
    )
