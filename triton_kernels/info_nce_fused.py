"""Fused pairwise InfoNCE / SigLIP: Triton kernels that never write a score to memory.

Forward (``pair_fused_forward``): each program owns BLOCK_N query rows and walks the keys, computing score tiles
``scale·Q_blk·K_tileᵀ`` with ``tl.dot`` (float32 accumulation; float32 operands in IEEE precision, never TF32)
and keeping per row an online max and sum of exps over the allowed columns and the positive term (InfoNCE,
SupCon), or the sum of SigLIP's softplus terms. The column problem of a symmetric loss is the same launch on
(key, query). O(N) floats out.

Backward (``pair_fused_backward``): two passes recompute the score tiles and form dLoss/dz from the saved
log-sum-exps (``info_nce_terms.pair_grad_terms`` / ``siglip_terms``): one owns blocks of dQ rows and walks the keys,
adding ``scale·G·K``, the other owns blocks of dK rows and walks the queries, adding ``scale·Gᵀ·Q``; the first
also sums the scale's (and SigLIP's bias's) gradient. Accumulation in float32: into the gradient itself for
float32, else into a float32 (rows × D) buffer rounded once. Programs of one output block split the other
dimension and add with float32 atomics; under ``torch.use_deterministic_algorithms(True)`` one program per block
in a fixed order (bitwise reproducible). 4·N·M·D FLOPs per pass: 12 in all for a symmetric loss.

All row, column and feature offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_block, logit_tile
from .info_nce_terms import pair_grad_terms, pair_masks, siglip_terms

__all__ = ["pair_fused_backward", "pair_fused_forward"]


@triton.jit
def _pair_fused_fwd_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    bias_ptr,
    target_ptr,
    lab_row_ptr,
    lab_col_ptr,
    lse_ptr,
    loss_ptr,
    N,
    M,
    D,
    stride_qn,
    stride_qd,
    stride_km,
    stride_kd,
    EXCLUDE_SELF: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SUPCON: tl.constexpr,
    SIGLIP: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    scale = tl.load(scale_ptr).to(tl.float32)
    t_i = rows * 0 - 1
    if not SUPCON and not SIGLIP:
        t_i = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    lab_i = rows * 0
    if HAS_LABELS or SUPCON:
        lab_i = tl.load(lab_row_ptr + rows, mask=row_mask, other=0)
    bias = 0.0
    if SIGLIP:
        bias = tl.load(bias_ptr).to(tl.float32)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    pos_sum = tl.zeros((BLOCK_N,), tl.float32)
    pos_cnt = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M).to(tl.int64)
        col_mask = cols < M
        z = scale * logit_tile(
            q_ptr,
            k_ptr,
            q_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            stride_qn,
            stride_qd,
            stride_km,
            stride_kd,
            False,
            IEEE,
            DOT_F32,
            BLOCK_N,
            BLOCK_M,
            BLOCK_D,
        )
        valid = row_mask[:, None] & col_mask[None, :]
        if SIGLIP:
            term, _ = siglip_terms(z, rows[:, None], cols[None, :], valid, bias)
            acc += tl.sum(term, axis=1)
        else:
            lab_j = cols * 0
            if HAS_LABELS or SUPCON:
                lab_j = tl.load(lab_col_ptr + cols, mask=col_mask, other=0)
            allowed, positive = pair_masks(
                rows[:, None],
                cols[None, :],
                valid,
                t_i[:, None],
                lab_i[:, None],
                lab_j[None, :],
                EXCLUDE_SELF,
                HAS_LABELS,
                SUPCON,
            )
            zm = tl.where(allowed, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(zm, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - m_ref) + tl.sum(tl.exp(zm - m_ref[:, None]), axis=1)
            m = m_new
            pos_sum += tl.sum(tl.where(positive, z, 0.0), axis=1)
            pos_cnt += tl.sum(positive.to(tl.float32), axis=1)
    if SIGLIP:
        tl.store(loss_ptr + rows, acc, mask=row_mask)
    else:
        lse = m + tl.log(tl.where(row_mask, acc, 1.0))  # (masked rows: no log(0) warning)
        if SUPCON:
            loss = tl.where(pos_cnt > 0, lse - pos_sum / tl.maximum(pos_cnt, 1.0), 0.0)
        else:
            loss = lse - pos_sum
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        tl.store(loss_ptr + rows, loss, mask=row_mask)


@triton.jit
def _pair_fused_bwd_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    bias_ptr,
    target_ptr,
    lab_row_ptr,
    lab_col_ptr,
    count_ptr,
    row_lse_ptr,
    grad_row_ptr,
    col_target_ptr,
    col_lse_ptr,
    grad_col_ptr,
    out_ptr,
    ds_ptr,
    db_ptr,
    N,
    M,
    D,
    stride_qn,
    stride_qd,
    stride_km,
    stride_kd,
    EXCLUDE_SELF: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SUPCON: tl.constexpr,
    SIGLIP: tl.constexpr,
    HAS_COLS: tl.constexpr,
    OWN_ROWS: tl.constexpr,
    WANT_OUT: tl.constexpr,
    WANT_DS: tl.constexpr,
    ATOMIC: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (b, s) of (·, S) owns block b of dQ rows (OWN_ROWS) or of dK rows and takes the blocks s, s + S, …
    of the other dimension. WANT_DS: also Σ G∘raw (and Σ G for SigLIP) per owned row, into ds_ptr/db_ptr."""
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if SIGLIP:
        bias = tl.load(bias_ptr).to(tl.float32)
    if OWN_ROWS:
        n_inner = tl.cdiv(M, BLOCK_M)
    else:
        n_inner = tl.cdiv(N, BLOCK_N)
    for k in range(split, n_inner, tl.num_programs(1)):
        if OWN_ROWS:
            rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            cols = k * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        else:
            rows = k * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            cols = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < N
        col_mask = cols < M
        valid = row_mask[:, None] & col_mask[None, :]
        raw = logit_tile(
            q_ptr,
            k_ptr,
            q_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            stride_qn,
            stride_qd,
            stride_km,
            stride_kd,
            False,
            IEEE,
            DOT_F32,
            BLOCK_N,
            BLOCK_M,
            BLOCK_D,
        )
        g_i = tl.load(grad_row_ptr + rows, mask=row_mask, other=0.0)
        if SIGLIP:
            _, dz = siglip_terms(raw * scale, rows[:, None], cols[None, :], valid, bias)
            g = g_i[:, None] * dz
        else:
            t_i = rows * 0 - 1
            if not SUPCON:
                t_i = tl.load(target_ptr + rows, mask=row_mask, other=-1)
            lab_i = rows * 0
            lab_j = cols * 0
            if HAS_LABELS or SUPCON:
                lab_i = tl.load(lab_row_ptr + rows, mask=row_mask, other=0)
                lab_j = tl.load(lab_col_ptr + cols, mask=col_mask, other=0)
            inv_count = tl.full((BLOCK_N,), 1.0, tl.float32)
            if SUPCON:
                count = tl.load(count_ptr + rows, mask=row_mask, other=0).to(tl.float32)
                g_i = tl.where(count > 0, g_i, 0.0)
                inv_count = 1.0 / tl.maximum(count, 1.0)
            lse_i = tl.load(row_lse_ptr + rows, mask=row_mask, other=0.0)
            ct_j = cols * 0
            lse_j = tl.zeros((BLOCK_M,), tl.float32)
            g_j = tl.zeros((BLOCK_M,), tl.float32)
            if HAS_COLS:
                ct_j = tl.load(col_target_ptr + cols, mask=col_mask, other=-1)
                lse_j = tl.load(col_lse_ptr + cols, mask=col_mask, other=0.0)
                g_j = tl.load(grad_col_ptr + cols, mask=col_mask, other=0.0)
            g = pair_grad_terms(
                raw * scale,
                rows[:, None],
                cols[None, :],
                valid,
                t_i[:, None],
                lab_i[:, None],
                lab_j[None, :],
                lse_i[:, None],
                g_i[:, None],
                inv_count[:, None],
                ct_j[None, :],
                lse_j[None, :],
                g_j[None, :],
                EXCLUDE_SELF,
                HAS_LABELS,
                SUPCON,
                HAS_COLS,
            )
        if WANT_DS:
            if OWN_ROWS:
                own = rows
                own_mask = row_mask
                ds = tl.sum(g * raw, axis=1)
                db = tl.sum(g, axis=1)
            else:
                own = cols
                own_mask = col_mask
                ds = tl.sum(g * raw, axis=0)
                db = tl.sum(g, axis=0)
            if ATOMIC:
                tl.atomic_add(ds_ptr + own, ds, mask=own_mask)
            else:
                tl.store(ds_ptr + own, tl.load(ds_ptr + own, mask=own_mask, other=0.0) + ds, mask=own_mask)
            if SIGLIP:
                if ATOMIC:
                    tl.atomic_add(db_ptr + own, db, mask=own_mask)
                else:
                    tl.store(db_ptr + own, tl.load(db_ptr + own, mask=own_mask, other=0.0) + db, mask=own_mask)
        gs = g * scale
        g_in = gs if DOT_F32 else gs.to(q_ptr.dtype.element_ty)
        for d0 in range(0, D if WANT_OUT else 0, BLOCK_D):
            ds_cols = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds_cols < D
            if OWN_ROWS:
                part = dot_block(
                    g_in, k_ptr, cols, col_mask, ds_cols, d_mask, stride_km, stride_kd, False, IEEE, DOT_F32
                )
                ptrs = out_ptr + rows[:, None] * D + ds_cols[None, :]
                mask = row_mask[:, None] & d_mask[None, :]
            else:
                part = dot_block(
                    g_in, q_ptr, rows, row_mask, ds_cols, d_mask, stride_qn, stride_qd, True, IEEE, DOT_F32
                )
                ptrs = out_ptr + cols[:, None] * D + ds_cols[None, :]
                mask = col_mask[:, None] & d_mask[None, :]
            if ATOMIC:
                tl.atomic_add(ptrs, part, mask=mask)
            else:
                tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + part, mask=mask)


def _meta(x: torch.Tensor) -> dict:
    if x.is_cuda:  # untuned first guess (bench/NOTES.md)
        return {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "DOT_F32": False, "num_warps": 4, "num_stages": 3}
    # Triton's interpreter: its tl.dot mishandles bf16/fp16 operands (3.9), so they are upcast first
    return {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "DOT_F32": x.dtype != torch.float32}


def _flags(q, exclude_self, has_labels, supcon, siglip):
    return {
        "EXCLUDE_SELF": exclude_self,
        "HAS_LABELS": has_labels and not supcon,
        "SUPCON": supcon,
        "SIGLIP": siglip,
        "IEEE": q.dtype == torch.float32,
    }


def pair_fused_forward(
    q, k, scale, *, bias=None, target=None, lab_row=None, lab_col=None, exclude_self=False, supcon=False, siglip=False
):
    """(lse, loss) per query row (InfoNCE/SupCon; lse is None for SigLIP), float32."""
    n, d = q.shape
    m = k.shape[0]
    f32 = {"dtype": torch.float32, "device": q.device}
    lse = None if siglip else torch.empty(n, **f32)
    loss = torch.empty(n, **f32)
    if n == 0:
        return lse, loss
    meta = _meta(q)
    any_ = loss
    _pair_fused_fwd_kernel[(triton.cdiv(n, meta["BLOCK_N"]),)](
        q,
        k,
        scale,
        bias if bias is not None else scale,
        target if target is not None else any_,
        lab_row if lab_row is not None else any_,
        lab_col if lab_col is not None else any_,
        lse if lse is not None else any_,
        loss,
        n,
        m,
        d,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        **_flags(q, exclude_self, lab_row is not None, supcon, siglip),
        **meta,
    )
    return lse, loss


def pair_fused_backward(
    q,
    k,
    scale,
    grad_row,
    *,
    bias=None,
    target=None,
    lab_row=None,
    lab_col=None,
    count=None,
    row_lse=None,
    col_target=None,
    col_lse=None,
    grad_col=None,
    exclude_self=False,
    supcon=False,
    siglip=False,
    want_q=True,
    want_k=True,
    want_scale=False,
    want_bias=False,
    deterministic=False,
):
    """(dQ, dK, d(scale), d(bias)) in q's/k's dtype and float32 scalars; None where not wanted."""
    n, d = q.shape
    m = k.shape[0]
    meta = _meta(q)
    f32 = {"dtype": torch.float32, "device": q.device}
    want_ds = want_scale or want_bias
    outs = {"q": q.new_zeros((n, d)) if want_q else None, "k": k.new_zeros((m, d)) if want_k else None}
    ds_scale = db_scale = None
    flags = _flags(q, exclude_self, lab_row is not None, supcon, siglip)
    programs = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    dummy = grad_row
    tensors = (
        q,
        k,
        scale,
        bias if bias is not None else scale,
        target if target is not None else dummy,
        lab_row if lab_row is not None else dummy,
        lab_col if lab_col is not None else dummy,
        count if count is not None else dummy,
        row_lse if row_lse is not None else dummy,
        grad_row,
        col_target if col_target is not None else dummy,
        col_lse if col_lse is not None else dummy,
        grad_col if grad_col is not None else dummy,
    )
    passes = [("q", True, n, meta["BLOCK_N"], m, meta["BLOCK_M"]), ("k", False, m, meta["BLOCK_M"], n, meta["BLOCK_N"])]
    for name, own_rows, total, block, inner, inner_block in passes:
        out = outs[name]
        take_ds = want_ds and ds_scale is None
        if (out is None and not take_ds) or total == 0 or inner == 0:
            continue
        if take_ds:
            ds_scale = torch.zeros(total, **f32)
            db_scale = torch.zeros(total, **f32) if siglip else None
        acc = out if out is None or out.dtype == torch.float32 else torch.zeros(out.shape, **f32)
        owned = triton.cdiv(total, block)
        n_inner = triton.cdiv(inner, inner_block)
        split = 1 if deterministic else max(1, min(n_inner, triton.cdiv(programs, owned)))
        _pair_fused_bwd_kernel[(owned, split)](
            *tensors,
            acc if acc is not None else dummy,
            ds_scale if take_ds else dummy,
            db_scale if take_ds and siglip else dummy,
            n,
            m,
            d,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            HAS_COLS=grad_col is not None,
            OWN_ROWS=own_rows,
            WANT_OUT=out is not None,
            WANT_DS=take_ds,
            ATOMIC=split > 1,
            **flags,
            **meta,
        )
        if acc is not None and acc is not out:
            out.copy_(acc)
        if take_ds:
            ds_scale, db_scale = ds_scale.sum(), (db_scale.sum() if siglip else None)
    ds = ds_scale if want_scale else None
    db = db_scale if want_bias else None
    if want_ds and ds_scale is None:  # an empty side: nothing to sum
        ds = torch.zeros((), **f32) if want_scale else None
        db = torch.zeros((), **f32) if want_bias else None
    return outs["q"], outs["k"], ds, db
