"""The row pass of chunked linear KL / generalised JSD: one Triton kernel over a chunk of both heads' logits.

For row i of a (rows, V) chunk of student logits z_s and the same rows of teacher logits z_t (outputs of library
GEMMs, in the input dtype), one program reads both rows for the online max and sum of exps of a = z_s/T and
b = z_t/T (lse_a, lse_b), reads them again for the row's divergence, stores it, and, where gradients are wanted,
reads them a third time and writes dLoss/dz_s over the student row (and dLoss/dz_t over the teacher row):

    log q = a − lse_a, log p = b − lse_b,  c = (upstream gradient)·(1/n_valid for "mean")/T
    beta = 0:  ℓ = Σ p(log p − log q);  g_s = c(q − p),                g_t = c·p(log p − log q − ℓ)
    beta = 1:  ℓ = Σ q(log q − log p);  g_s = c·q(log q − log p − ℓ),  g_t = c(p − q)
    else, log m = log(β p + (1 − β) q), K_p = Σ p(log p − log m), K_q = Σ q(log q − log m), ℓ = βK_p + (1−β)K_q:
               g_s = c(1 − β)·q(log q − log m − K_q),  g_t = cβ·p(log p − log m − K_p)

Rows whose target is ignore_index get ℓ = 0 and zero gradients. All arithmetic is float32 whatever the logits'
dtype; row offsets are int64.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["kl_divergence_rows"]


@triton.jit
def _log_m(lp, lq, log_beta, log_1mbeta):
    """log(β·p + (1 − β)·q) from log p and log q, as max + log(1 + exp(min − max))."""
    x = lp + log_beta
    y = lq + log_1mbeta
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    return hi + tl.log(1.0 + tl.exp(lo - hi))


@triton.jit
def _kl_rows_kernel(
    zs_ptr,
    zt_ptr,
    target_ptr,
    grad_ptr,
    scale_ptr,
    loss_ptr,
    row0,
    V,
    stride_sn,
    stride_sv,
    stride_tn,
    stride_tv,
    stride_grad,
    ignore_index,
    inv_t,
    beta,
    log_beta,
    log_1mbeta,
    # meta-parameters
    MODE: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 skew JSD
    HAS_TARGET: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    row = row0 + i
    s_row = zs_ptr + i * stride_sn
    t_row = zt_ptr + i * stride_tn
    cols0 = tl.arange(0, BLOCK_V)
    valid = True
    if HAS_TARGET:
        valid = tl.load(target_ptr + row) != ignore_index

    if not valid:
        if WRITE_LOSS:
            tl.store(loss_ptr + row, 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            if GRAD_S:
                tl.store(s_row + cols * stride_sv, tl.zeros((BLOCK_V,), tl.float32).to(zs_ptr.dtype.element_ty), mask)
            if GRAD_T:
                tl.store(t_row + cols * stride_tv, tl.zeros((BLOCK_V,), tl.float32).to(zt_ptr.dtype.element_ty), mask)
    else:
        # pass 1: log-sum-exp of both scaled rows, online
        ma = tl.full((), float("-inf"), tl.float32)
        mb = tl.full((), float("-inf"), tl.float32)
        sa = tl.zeros((), tl.float32)
        sb = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            a = tl.load(s_row + cols * stride_sv, mask=mask, other=0.0).to(tl.float32) * inv_t
            b = tl.load(t_row + cols * stride_tv, mask=mask, other=0.0).to(tl.float32) * inv_t
            a = tl.where(mask, a, float("-inf"))
            b = tl.where(mask, b, float("-inf"))
            ma_new = tl.maximum(ma, tl.max(a, axis=0))
            mb_new = tl.maximum(mb, tl.max(b, axis=0))
            sa = sa * tl.exp(ma - ma_new) + tl.sum(tl.exp(a - ma_new), axis=0)
            sb = sb * tl.exp(mb - mb_new) + tl.sum(tl.exp(b - mb_new), axis=0)
            ma = ma_new
            mb = mb_new
        # log q = (a − max) − log Σ, not a − lse: a rounded lse would cost an ulp of |max| on every log-probability
        log_sa = tl.log(sa)
        log_sb = tl.log(sb)

        # pass 2: the divergence (and K_p, K_q for the skew JSD)
        acc_p = tl.zeros((BLOCK_V,), tl.float32)
        acc_q = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            lq = tl.load(s_row + cols * stride_sv, mask=mask, other=0.0).to(tl.float32) * inv_t - ma - log_sa
            lp = tl.load(t_row + cols * stride_tv, mask=mask, other=0.0).to(tl.float32) * inv_t - mb - log_sb
            if MODE == 0:
                acc_p += tl.where(mask, tl.exp(lp) * (lp - lq), 0.0)
            elif MODE == 1:
                acc_q += tl.where(mask, tl.exp(lq) * (lq - lp), 0.0)
            else:
                lm = _log_m(lp, lq, log_beta, log_1mbeta)
                acc_p += tl.where(mask, tl.exp(lp) * (lp - lm), 0.0)
                acc_q += tl.where(mask, tl.exp(lq) * (lq - lm), 0.0)
        k_p = tl.sum(acc_p, axis=0)
        k_q = tl.sum(acc_q, axis=0)
        if MODE == 0:
            loss = k_p
        elif MODE == 1:
            loss = k_q
        else:
            loss = beta * k_p + (1.0 - beta) * k_q
        if WRITE_LOSS:
            tl.store(loss_ptr + row, loss)

        # pass 3: the logits' gradients, in place
        if GRAD_S or GRAD_T:
            c = tl.load(grad_ptr + row * stride_grad).to(tl.float32) * tl.load(scale_ptr) * inv_t
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                mask = cols < V
                lq = tl.load(s_row + cols * stride_sv, mask=mask, other=0.0).to(tl.float32) * inv_t - ma - log_sa
                lp = tl.load(t_row + cols * stride_tv, mask=mask, other=0.0).to(tl.float32) * inv_t - mb - log_sb
                p = tl.exp(lp)
                q = tl.exp(lq)
                if MODE == 0:
                    g_s = c * (q - p)
                    g_t = c * p * (lp - lq - loss)
                elif MODE == 1:
                    g_s = c * q * (lq - lp - loss)
                    g_t = c * (p - q)
                else:
                    lm = _log_m(lp, lq, log_beta, log_1mbeta)
                    g_s = c * (1.0 - beta) * q * (lq - lm - k_q)
                    g_t = c * beta * p * (lp - lm - k_p)
                if GRAD_S:
                    tl.store(s_row + cols * stride_sv, g_s.to(zs_ptr.dtype.element_ty), mask=mask)
                if GRAD_T:
                    tl.store(t_row + cols * stride_tv, g_t.to(zt_ptr.dtype.element_ty), mask=mask)


def kl_divergence_rows(
    zs: torch.Tensor,
    zt: torch.Tensor,
    row0: int,
    target: torch.Tensor | None,
    *,
    ignore_index: int,
    beta: float,
    temperature: float,
    loss: torch.Tensor | None,
    grad: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    grad_student: bool = False,
    grad_teacher: bool = False,
) -> None:
    """Run the row pass over the chunks ``zs``, ``zt`` (rows, V), whose row i is global row ``row0 + i``.

    ``target`` (N,) int64 or None (no row ignored). ``loss`` (N,) float32 receives each row's divergence (None:
    not wanted). With ``grad_student`` / ``grad_teacher``, ``grad`` (the float32 upstream gradient: one element or
    (N,)) and ``scale`` (one float32 element on the device: "mean"'s 1/n_valid, else 1), the student / teacher
    chunk is overwritten by dLoss/dlogits.
    """
    rows, v = zs.shape
    assert zt.shape == zs.shape and zt.dtype == zs.dtype
    assert target is None or (target.dtype == torch.int64 and target.is_contiguous())
    assert loss is None or (loss.dtype == torch.float32 and loss.is_contiguous())
    if rows == 0:
        return
    want = grad_student or grad_teacher
    if want:
        assert grad is not None and grad.dtype == torch.float32 and scale is not None and scale.dtype == torch.float32
    dummy = zs
    mode = 0 if beta == 0.0 else (1 if beta == 1.0 else 2)
    block_v = min(2048 if zs.is_cuda else 256, triton.next_power_of_2(v))
    num_warps = 8 if zs.is_cuda else 1
    _kl_rows_kernel[(rows,)](
        zs,
        zt,
        target if target is not None else dummy,
        grad if want else dummy,
        scale if want else dummy,
        loss if loss is not None else dummy,
        row0,
        v,
        zs.stride(0),
        zs.stride(1),
        zt.stride(0),
        zt.stride(1),
        0 if not want or grad.numel() == 1 else grad.stride(0),
        ignore_index,
        1.0 / temperature,
        float(beta),
        math.log(beta) if mode == 2 else 0.0,
        math.log1p(-beta) if mode == 2 else 0.0,
        MODE=mode,
        HAS_TARGET=target is not None,
        WRITE_LOSS=loss is not None,
        GRAD_S=grad_student,
        GRAD_T=grad_teacher,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
