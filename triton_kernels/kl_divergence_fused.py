"""Fused linear KL / generalised JSD: Triton kernels that never write a logit to memory.

Both heads' logits are formed only as (BLOCK_N × BLOCK_V) float32 tiles in registers, ``X_s,blk · W_s,tileᵀ (+ b_s)``
and ``X_t,blk · W_t,tileᵀ (+ b_t)`` with ``tl.dot`` (float32 accumulation; float32 operands in IEEE precision,
never TF32), then scaled by 1/T: a = z_s/T, b = z_t/T, log q = a − lse_a, log p = b − lse_b.

``kl_fused_stats`` (one program per BLOCK_N rows): pass 1 over the vocabulary keeps the online max and sum of exps
of a and b per row (lse_a, lse_b as max + log Σ); pass 2 recomputes both tiles and sums
K_p = Σ p(log p − log m) and K_q = Σ q(log q − log m), m = βp + (1 − β)q (for β = 0 only K_p = KL(P‖Q) with
log m = log q, for β = 1 only K_q = KL(Q‖P)); the row's divergence is βK_p + (1 − β)K_q (0 at ignored rows). Out:
six float32 numbers per row, nothing of size V.

``kl_fused_grads`` (one program per (BLOCK_N rows, BLOCK_V columns) tile): recomputes both tiles from the saved
per-row statistics, forms the logit gradients of the rows pass (``kl_divergence_rows``) with the per-row
coefficient c (upstream gradient · 1/n_valid for "mean" · 1/T, 0 at ignored rows)

    g_s = c(1 − β)·q(log q − log m − K_q),  g_t = cβ·p(log p − log m − K_p)
    (β = 0: g_s = c(q − p), g_t = c·p(log p − log q − K_p); β = 1: g_s = c·q(log q − log p − K_q), g_t = c(p − q))

and adds ``g·W_tile`` into dX's rows and ``gᵀ·X_blk`` into dW's rows (and Σ_rows g into db) of every wanted head,
BLOCK_D columns at a time, with float32 atomics into float32 buffers (N×D and V×D per head; for float32 inputs
the buffers are the gradients themselves). The atomics make the float32 sums' order depend on scheduling on the
GPU (the interpreter runs programs in order); there is no deterministic mode yet.

Cost: the statistics kernel computes each head's logits twice (2 GEMM-equivalents per head), the gradient kernel
once more plus the dX and dW products per wanted head: with the student's gradients only, 4 + 2 + 2 = 8
GEMM-equivalents (the floor is 5: two forward, three backward), against 2 + 2 for the chunked path, which in
exchange holds a chunk of both heads' logits. Row and column offsets are int64: N·V, N·D and V·D may pass 2³¹.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import dot_block, logit_tile
from .kl_divergence_rows import _log_m

__all__ = ["kl_fused_grads", "kl_fused_stats"]


@triton.jit
def _scaled_tiles(
    xs_ptr,
    ws_ptr,
    bs_ptr,
    xt_ptr,
    wt_ptr,
    bt_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    DS,
    DT,
    stride_xsn,
    stride_xsd,
    stride_wsv,
    stride_wsd,
    stride_xtn,
    stride_xtd,
    stride_wtv,
    stride_wtd,
    inv_t,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """a = z_s/T and b = z_t/T of one (BLOCK_N × BLOCK_V) tile, float32."""
    a = logit_tile(
        xs_ptr,
        ws_ptr,
        bs_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        DS,
        stride_xsn,
        stride_xsd,
        stride_wsv,
        stride_wsd,
        HAS_BS,
        IEEE,
        DOT_F32,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    b = logit_tile(
        xt_ptr,
        wt_ptr,
        bt_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        DT,
        stride_xtn,
        stride_xtd,
        stride_wtv,
        stride_wtd,
        HAS_BT,
        IEEE,
        DOT_F32,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    return a * inv_t, b * inv_t


@triton.jit
def _kl_fused_stats_kernel(
    xs_ptr,
    ws_ptr,
    bs_ptr,
    xt_ptr,
    wt_ptr,
    bt_ptr,
    target_ptr,
    stats_ptr,
    loss_ptr,
    N,
    V,
    DS,
    DT,
    stride_xsn,
    stride_xsd,
    stride_wsv,
    stride_wsd,
    stride_xtn,
    stride_xtd,
    stride_wtv,
    stride_wtd,
    ignore_index,
    inv_t,
    beta,
    log_beta,
    log_1mbeta,
    # meta-parameters
    MODE: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 skew JSD
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    # pass 1: online max and sum of exps of a and b per row
    ma = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    mb = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sa = tl.zeros((BLOCK_N,), tl.float32)
    sb = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        a, b = _scaled_tiles(
            xs_ptr,
            ws_ptr,
            bs_ptr,
            xt_ptr,
            wt_ptr,
            bt_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            DS,
            DT,
            stride_xsn,
            stride_xsd,
            stride_wsv,
            stride_wsd,
            stride_xtn,
            stride_xtd,
            stride_wtv,
            stride_wtd,
            inv_t,
            HAS_BS,
            HAS_BT,
            IEEE,
            DOT_F32,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        a = tl.where(col_mask[None, :], a, float("-inf"))
        b = tl.where(col_mask[None, :], b, float("-inf"))
        ma_new = tl.maximum(ma, tl.max(a, axis=1))
        mb_new = tl.maximum(mb, tl.max(b, axis=1))
        sa = sa * tl.exp(ma - ma_new) + tl.sum(tl.exp(a - ma_new[:, None]), axis=1)
        sb = sb * tl.exp(mb - mb_new) + tl.sum(tl.exp(b - mb_new[:, None]), axis=1)
        ma = ma_new
        mb = mb_new
    # log q = (a − max) − log Σ: a rounded lse would cost an ulp of |max| on every log-probability
    lsa = tl.log(sa)
    lsb = tl.log(sb)
    # pass 2: K_p and K_q from recomputed tiles
    acc_p = tl.zeros((BLOCK_N,), tl.float32)
    acc_q = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        a, b = _scaled_tiles(
            xs_ptr,
            ws_ptr,
            bs_ptr,
            xt_ptr,
            wt_ptr,
            bt_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            DS,
            DT,
            stride_xsn,
            stride_xsd,
            stride_wsv,
            stride_wsd,
            stride_xtn,
            stride_xtd,
            stride_wtv,
            stride_wtd,
            inv_t,
            HAS_BS,
            HAS_BT,
            IEEE,
            DOT_F32,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        lq = a - ma[:, None] - lsa[:, None]
        lp = b - mb[:, None] - lsb[:, None]
        keep = col_mask[None, :]
        if MODE == 0:
            acc_p += tl.sum(tl.where(keep, tl.exp(lp) * (lp - lq), 0.0), axis=1)
        elif MODE == 1:
            acc_q += tl.sum(tl.where(keep, tl.exp(lq) * (lq - lp), 0.0), axis=1)
        else:
            lm = _log_m(lp, lq, log_beta, log_1mbeta)
            acc_p += tl.sum(tl.where(keep, tl.exp(lp) * (lp - lm), 0.0), axis=1)
            acc_q += tl.sum(tl.where(keep, tl.exp(lq) * (lq - lm), 0.0), axis=1)
    if MODE == 0:
        loss = acc_p
    elif MODE == 1:
        loss = acc_q
    else:
        loss = beta * acc_p + (1.0 - beta) * acc_q
    if HAS_TARGET:
        valid = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index) != ignore_index
        loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(stats_ptr + rows, ma, mask=row_mask)
    tl.store(stats_ptr + N + rows, lsa, mask=row_mask)
    tl.store(stats_ptr + 2 * N + rows, mb, mask=row_mask)
    tl.store(stats_ptr + 3 * N + rows, lsb, mask=row_mask)
    tl.store(stats_ptr + 4 * N + rows, acc_p, mask=row_mask)
    tl.store(stats_ptr + 5 * N + rows, acc_q, mask=row_mask)


@triton.jit
def _add_head_grads(
    g,
    x_ptr,
    w_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    stride_xn,
    stride_xd,
    stride_wv,
    stride_wd,
    WANT_X: tl.constexpr,
    WANT_W: tl.constexpr,
    WANT_B: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dX[rows] += g·W[cols], dW[cols] += gᵀ·X[rows], db[cols] += Σ_rows g: float32 atomics into contiguous
    float32 buffers (dX is N×D, dW is V×D)."""
    if WANT_B:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_mask)
    if WANT_X or WANT_W:
        g_in = g if DOT_F32 else g.to(x_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_mask = ds < D
            if WANT_X:
                part = dot_block(g_in, w_ptr, cols, col_mask, ds, d_mask, stride_wv, stride_wd, False, IEEE, DOT_F32)
                tl.atomic_add(dx_ptr + rows[:, None] * D + ds[None, :], part, mask=row_mask[:, None] & d_mask[None, :])
            if WANT_W:
                part = dot_block(g_in, x_ptr, rows, row_mask, ds, d_mask, stride_xn, stride_xd, True, IEEE, DOT_F32)
                tl.atomic_add(dw_ptr + cols[:, None] * D + ds[None, :], part, mask=col_mask[:, None] & d_mask[None, :])


@triton.jit
def _kl_fused_grad_kernel(
    xs_ptr,
    ws_ptr,
    bs_ptr,
    xt_ptr,
    wt_ptr,
    bt_ptr,
    stats_ptr,
    coef_ptr,
    dxs_ptr,
    dws_ptr,
    dbs_ptr,
    dxt_ptr,
    dwt_ptr,
    dbt_ptr,
    N,
    V,
    DS,
    DT,
    stride_xsn,
    stride_xsd,
    stride_wsv,
    stride_wsd,
    stride_xtn,
    stride_xtd,
    stride_wtv,
    stride_wtd,
    inv_t,
    beta,
    log_beta,
    log_1mbeta,
    # meta-parameters
    MODE: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    GRAD_XS: tl.constexpr,
    GRAD_WS: tl.constexpr,
    GRAD_BS: tl.constexpr,
    GRAD_XT: tl.constexpr,
    GRAD_WT: tl.constexpr,
    GRAD_BT: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    a, b = _scaled_tiles(
        xs_ptr,
        ws_ptr,
        bs_ptr,
        xt_ptr,
        wt_ptr,
        bt_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        DS,
        DT,
        stride_xsn,
        stride_xsd,
        stride_wsv,
        stride_wsd,
        stride_xtn,
        stride_xtd,
        stride_wtv,
        stride_wtd,
        inv_t,
        HAS_BS,
        HAS_BT,
        IEEE,
        DOT_F32,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    ma = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
    lsa = tl.load(stats_ptr + N + rows, mask=row_mask, other=0.0)
    mb = tl.load(stats_ptr + 2 * N + rows, mask=row_mask, other=0.0)
    lsb = tl.load(stats_ptr + 3 * N + rows, mask=row_mask, other=0.0)
    k_p = tl.load(stats_ptr + 4 * N + rows, mask=row_mask, other=0.0)
    k_q = tl.load(stats_ptr + 5 * N + rows, mask=row_mask, other=0.0)
    c = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)  # 0 at ignored rows
    lq = a - ma[:, None] - lsa[:, None]
    lp = b - mb[:, None] - lsb[:, None]
    p = tl.exp(lp)
    q = tl.exp(lq)
    if MODE == 0:
        g_s = c[:, None] * (q - p)
        g_t = c[:, None] * p * (lp - lq - k_p[:, None])
    elif MODE == 1:
        g_s = c[:, None] * q * (lq - lp - k_q[:, None])
        g_t = c[:, None] * (p - q)
    else:
        lm = _log_m(lp, lq, log_beta, log_1mbeta)
        g_s = (c * (1.0 - beta))[:, None] * q * (lq - lm - k_q[:, None])
        g_t = (c * beta)[:, None] * p * (lp - lm - k_p[:, None])
    keep = row_mask[:, None] & col_mask[None, :]
    if GRAD_XS or GRAD_WS or GRAD_BS:
        _add_head_grads(
            tl.where(keep, g_s, 0.0),
            xs_ptr,
            ws_ptr,
            dxs_ptr,
            dws_ptr,
            dbs_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            DS,
            stride_xsn,
            stride_xsd,
            stride_wsv,
            stride_wsd,
            GRAD_XS,
            GRAD_WS,
            GRAD_BS,
            IEEE,
            DOT_F32,
            BLOCK_D,
        )
    if GRAD_XT or GRAD_WT or GRAD_BT:
        _add_head_grads(
            tl.where(keep, g_t, 0.0),
            xt_ptr,
            wt_ptr,
            dxt_ptr,
            dwt_ptr,
            dbt_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            DT,
            stride_xtn,
            stride_xtd,
            stride_wtv,
            stride_wtd,
            GRAD_XT,
            GRAD_WT,
            GRAD_BT,
            IEEE,
            DOT_F32,
            BLOCK_D,
        )


def _mode(beta: float) -> tuple[int, float, float]:
    mode = 0 if beta == 0.0 else (1 if beta == 1.0 else 2)
    return mode, (math.log(beta) if mode == 2 else 0.0), (math.log1p(-beta) if mode == 2 else 0.0)


# one default for CUDA; untuned (no GPU measurement yet)
CUDA_BLOCKS = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64, "DOT_F32": False, "num_warps": 8, "num_stages": 2}


def _blocks(x: torch.Tensor) -> dict:
    if x.is_cuda:
        return CUDA_BLOCKS
    # Triton's interpreter: its tl.dot mishandles bf16/fp16 operands, so the tiles are upcast to float32 there
    return {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16, "DOT_F32": x.dtype != torch.float32}


def _common_args(xs, ws, xt, wt):
    return (
        xs.shape[0],
        ws.shape[0],
        xs.shape[1],
        xt.shape[1],
        xs.stride(0),
        xs.stride(1),
        ws.stride(0),
        ws.stride(1),
        xt.stride(0),
        xt.stride(1),
        wt.stride(0),
        wt.stride(1),
    )


def kl_fused_stats(xs, ws, bs, xt, wt, bt, target, *, ignore_index, beta, temperature, blocks=None):
    """Per-row statistics and divergence of both heads: returns ``(stats, loss)``, ``stats`` (6, N) float32 rows
    [max a, log Σ e^(a − max), max b, log Σ e^(b − max), K_p, K_q] and ``loss`` (N,) float32 (0 at rows whose
    ``target`` is ``ignore_index``; ``target`` (N,) int64 contiguous or None). xs (N, D_s), ws (V, D_s), xt (N,
    D_t), wt (V, D_t) of one floating dtype, any strides; biases (V,) contiguous or None."""
    n, v = xs.shape[0], ws.shape[0]
    assert xt.shape[0] == n and wt.shape[0] == v and xs.shape[1] == ws.shape[1] and xt.shape[1] == wt.shape[1]
    assert target is None or (target.dtype == torch.int64 and target.is_contiguous())
    assert bs is None or bs.is_contiguous()
    assert bt is None or bt.is_contiguous()
    stats = torch.empty((6, n), dtype=torch.float32, device=xs.device)
    loss = torch.empty(n, dtype=torch.float32, device=xs.device)
    if n == 0:
        return stats, loss
    cfg = dict(blocks or _blocks(xs))
    mode, log_beta, log_1mbeta = _mode(beta)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _kl_fused_stats_kernel[grid](
        xs,
        ws,
        bs if bs is not None else ws,
        xt,
        wt,
        bt if bt is not None else wt,
        target if target is not None else stats,
        stats,
        loss,
        *_common_args(xs, ws, xt, wt),
        ignore_index,
        1.0 / temperature,
        float(beta),
        log_beta,
        log_1mbeta,
        MODE=mode,
        HAS_BS=bs is not None,
        HAS_BT=bt is not None,
        HAS_TARGET=target is not None,
        IEEE=xs.dtype == torch.float32,
        **cfg,
    )
    return stats, loss


def kl_fused_grads(xs, ws, bs, xt, wt, bt, stats, coef, *, beta, temperature, want, blocks=None):
    """The wanted gradients from the per-row ``stats`` of ``kl_fused_stats`` and ``coef`` (N,) float32 (upstream
    gradient · "mean"'s 1/n_valid · 1/T, 0 at ignored rows). ``want``: six flags (student input,
    weight, bias; teacher input, weight, bias). Returns six float32 tensors (dX_s (N, D_s), dW_s (V, D_s), db_s
    (V,), dX_t, dW_t, db_t), None where not wanted."""
    n, v = xs.shape[0], ws.shape[0]
    assert stats.shape == (6, n) and stats.dtype == torch.float32 and stats.is_contiguous()
    assert coef.shape == (n,) and coef.dtype == torch.float32 and coef.is_contiguous()
    want = tuple(bool(w) for w in want)
    assert not want[2] or bs is not None
    assert not want[5] or bt is not None
    shapes = (xs.shape, ws.shape, (v,), xt.shape, wt.shape, (v,))
    out = tuple(
        torch.zeros(tuple(s), dtype=torch.float32, device=xs.device) if w else None
        for w, s in zip(want, shapes, strict=True)
    )
    if n == 0 or not any(want):
        return out
    cfg = dict(blocks or _blocks(xs))
    mode, log_beta, log_1mbeta = _mode(beta)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
    _kl_fused_grad_kernel[grid](
        xs,
        ws,
        bs if bs is not None else ws,
        xt,
        wt,
        bt if bt is not None else wt,
        stats,
        coef,
        *(o if o is not None else stats for o in out),
        *_common_args(xs, ws, xt, wt),
        1.0 / temperature,
        float(beta),
        log_beta,
        log_1mbeta,
        MODE=mode,
        HAS_BS=bs is not None,
        HAS_BT=bt is not None,
        GRAD_XS=want[0],
        GRAD_WS=want[1],
        GRAD_BS=want[2],
        GRAD_XT=want[3],
        GRAD_WT=want[4],
        GRAD_BT=want[5],
        IEEE=xs.dtype == torch.float32,
        **cfg,
    )
    return out
