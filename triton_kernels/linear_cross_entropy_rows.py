"""The row pass of chunked linear cross-entropy: one Triton kernel over a chunk of logits, in place.

For each row of a (rows, V) chunk of logits (the output of a cuBLAS GEMM, in the input dtype) one program reads
the row once for the online max and sum of exps, the target logit and every loss term (label smoothing, z-loss,
softcap, class weights), writes the row's lse and loss terms, then writes the gradient of the loss with respect
to the (pre-softcap) logits over the row:

    g_j = (a·p_j + b·(p_j − [j = t]) − c·w_j) · (softcap ? 1 − tanh²(z_j/cap) : 1),   p_j = exp(ẑ_j − lse)

with a = g_ce·ε/V·Σw + g_z·2λ·lse + g_lse, b = g_ce·(1−ε)·w_t, c = g_ce·ε/V (MATH.md). With a temperature T the
logits are ℓ = ẑ/T throughout (lse, p, the loss terms) and every coefficient carries the 1/T of dℓ/dẑ. With
WANT_ENTROPY the forward also keeps Σ exp(ℓ − m)·(ℓ − m) beside the sum of exps (rescaled like it as the running
max m moves) and stores the row's entropy H = log s − t/s (0 at ignored rows); with HAS_ENTROPY_GRAD the gradient
gains −e·p_j·(ℓ_j − lse + H), e the entropy's upstream gradient (0 at ignored rows). Both flags are constexpr:
without them the kernel is the plain cross-entropy one. The target's term is
b·(p_t − 1) + a·p_t, not (a + b)·p_t − b: where p_t rounds to 1 (one class, or a certain row) the cross-entropy
part is exactly 0 and the z-loss part keeps its precision. All arithmetic is float32 whatever the logits' dtype.
Row offsets are int64 (rows·V can pass 2³¹).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import softcap_slope, softcapped, tempered

__all__ = ["linear_cross_entropy_rows"]


@triton.jit
def _lce_rows_kernel(
    z_ptr,
    target_ptr,
    weight_ptr,
    scale_ptr,
    grad_ptr,
    lse_grad_ptr,
    lse_ptr,
    ce_ptr,
    zl_ptr,
    argmax_ptr,
    ent_ptr,
    ent_grad_ptr,
    row0,
    V,
    stride_zn,
    stride_zv,
    stride_grad,
    ignore_index,
    eps,
    z_loss,
    softcap,
    inv_temp,
    # meta-parameters
    FORWARD: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_LSE_GRAD: tl.constexpr,
    WANT_ARGMAX: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    row = row0 + i
    weight_all = tl.load(scale_ptr + 2)  # Σ_j w_j (V without class weights)
    z_row = z_ptr + i * stride_zn
    t = tl.load(target_ptr + row)
    valid = t != ignore_index
    w_t = 1.0
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t, mask=valid, other=0.0).to(tl.float32)
    cols0 = tl.arange(0, BLOCK_V)

    if FORWARD:
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        ts = tl.zeros((), tl.float32)  # Σ exp(ℓ − m)·(ℓ − m), relative to the running max like s
        z_t = tl.zeros((), tl.float32)
        wz = tl.zeros((BLOCK_V,), tl.float32)  # Σ_j w_j·ẑ_j, lane by lane
        am = tl.zeros((), tl.int64)  # first column of the running maximum
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            z = tl.load(z_row + cols * stride_zv, mask=mask, other=0.0).to(tl.float32)
            z = tl.where(
                mask, tempered(softcapped(z, softcap, HAS_SOFTCAP), inv_temp, HAS_TEMPERATURE), 0.0
            )  # finite everywhere
            z_max = tl.where(mask, z, float("-inf"))
            tile_max = tl.max(z_max, axis=0)
            if WANT_ARGMAX:  # a later tile takes over only with a strictly larger maximum: the first index wins
                am = tl.where(tile_max > m, v0 + tl.argmax(z_max, axis=0).to(tl.int64), am)
            m_new = tl.maximum(m, tile_max)
            alpha = tl.exp(m - m_new)
            e = tl.exp(z_max - m_new)
            if WANT_ENTROPY:  # Σ e^{ℓ−m}(ℓ − m') = α·(t + (m − m')·s); the first tile has s = t = 0 and m = −inf
                shift = (tl.where(s > 0.0, m, m_new) - m_new) * s  # no −inf·0 on the first tile
                ts = alpha * (ts + shift) + tl.sum(tl.where(mask, e * (z - m_new), 0.0), axis=0)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
            z_t += tl.sum(tl.where(cols == t, z, 0.0), axis=0)
            if HAS_WEIGHT:
                wz += tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32) * z
            else:
                wz += z
        lse = m + tl.log(s)
        tl.store(lse_ptr + row, lse)
        if WANT_ARGMAX:
            tl.store(argmax_ptr + row, am)
        ce = (1.0 - eps) * w_t * (lse - z_t) + eps / V * (weight_all * lse - tl.sum(wz, axis=0))
        ce = tl.where(valid, ce, 0.0)
        tl.store(ce_ptr + row, ce)
        tl.store(zl_ptr + row, tl.where(valid, z_loss * lse * lse, 0.0))
        if WANT_ENTROPY:
            tl.store(ent_ptr + row, tl.where(valid, tl.log(s) - ts / s, 0.0))
    else:
        lse = tl.load(lse_ptr + row).to(tl.float32)

    if WRITE_GRAD:
        # upstream gradient times the reduction's divisors; ignored rows take none (and never meet 1/0)
        g_up = tl.load(grad_ptr + row * stride_grad).to(tl.float32)
        g_ce = tl.where(valid, g_up * tl.load(scale_ptr), 0.0)
        g_z = tl.where(valid, g_up * tl.load(scale_ptr + 1), 0.0)
        a = g_ce * eps / V * weight_all + g_z * 2.0 * z_loss * lse
        if HAS_LSE_GRAD:
            a += tl.load(lse_grad_ptr + row).to(tl.float32)
        a = a * inv_temp  # dℓ/dẑ = 1/T, folded into the coefficients
        b = g_ce * (1.0 - eps) * w_t * inv_temp
        c = g_ce * eps / V * inv_temp
        if HAS_ENTROPY_GRAD:
            e_h = tl.where(valid, tl.load(ent_grad_ptr + row).to(tl.float32), 0.0) * inv_temp
            h = lse - tl.load(ent_ptr + row).to(tl.float32)  # lse − H
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            z_raw = tl.load(z_row + cols * stride_zv, mask=mask, other=0.0).to(tl.float32)
            z = tempered(softcapped(z_raw, softcap, HAS_SOFTCAP), inv_temp, HAS_TEMPERATURE)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                w = 1.0
            p = tl.exp(z - lse)
            g = a * p + b * (p - tl.where(cols == t, 1.0, 0.0)) - c * w
            if HAS_ENTROPY_GRAD:
                g -= e_h * p * (z - h)
            if HAS_SOFTCAP:
                g = g * softcap_slope(z_raw, softcap)
            tl.store(z_row + cols * stride_zv, g.to(z_ptr.dtype.element_ty), mask=mask)


def linear_cross_entropy_rows(
    z: torch.Tensor,
    row0: int,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    scales: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    lse: torch.Tensor,
    ce: torch.Tensor | None = None,
    zl: torch.Tensor | None = None,
    forward: bool,
    grad: torch.Tensor | None = None,
    lse_grad: torch.Tensor | None = None,
    argmax: torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy: torch.Tensor | None = None,
    entropy_grad: torch.Tensor | None = None,
) -> None:
    """Run the row pass over the chunk ``z`` (rows, V), whose row i is global row ``row0 + i``.

    ``target`` (N,) int64, ``weight`` (V,) float32 or None, ``scales`` float32 [ce_scale, z_scale, Σ weight] on
    the device (the reduction's divisors and the class-weight total, so that nothing is read back to the host).
    ``forward``: compute and store ``lse``, ``ce`` and ``zl`` (each (N,) float32; ``ce``/``zl`` unscaled per-row
    terms); otherwise read ``lse``. With ``grad`` (the upstream gradient: one element, or (N,) per row) the chunk
    is overwritten by dLoss/dlogits; ``lse_grad`` (N,) adds the gradient flowing into the returned lse. With
    ``forward``, ``argmax`` (N,) int64 receives each row's first column of the largest (softcapped) logit.
    ``temperature`` divides the (softcapped) logits. ``entropy`` (N,) float32: with ``forward``, receives each
    row's entropy; with ``entropy_grad`` (N,) float32 (not forward), the saved entropies, and the gradient flowing
    into them is added to the chunk's.
    """
    rows, v = z.shape
    assert target.dtype == torch.int64 and target.is_contiguous()
    assert lse.dtype == torch.float32 and lse.is_contiguous()
    assert scales.dtype == torch.float32 and scales.numel() == 3 and scales.is_contiguous()
    if rows == 0:
        return
    if forward:
        assert ce is not None and zl is not None
    if grad is not None:
        assert grad.dtype == torch.float32
        stride_grad = 0 if grad.numel() == 1 else grad.stride(0)
    else:
        stride_grad = 0
    dummy = lse
    # One default per device class (untuned on GPU so far: see bench/NOTES.md); in the interpreter, where every
    # tile is a few NumPy calls, the widest tile that still leaves the odd test shapes a ragged last tile.
    block_v = min(2048 if z.is_cuda else 256, triton.next_power_of_2(v))
    num_warps = 8 if z.is_cuda else 1
    _lce_rows_kernel[(rows,)](
        z,
        target,
        weight if weight is not None else dummy,
        scales,
        grad if grad is not None else dummy,
        lse_grad if lse_grad is not None else dummy,
        lse,
        ce if ce is not None else dummy,
        zl if zl is not None else dummy,
        argmax if argmax is not None else dummy,
        entropy if entropy is not None else dummy,
        entropy_grad if entropy_grad is not None else dummy,
        row0,
        v,
        z.stride(0),
        z.stride(1),
        stride_grad,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        float(softcap) if softcap else 1.0,
        1.0 / float(temperature),
        FORWARD=forward,
        WRITE_GRAD=grad is not None,
        HAS_WEIGHT=weight is not None,
        HAS_SOFTCAP=bool(softcap),
        HAS_TEMPERATURE=float(temperature) != 1.0,
        HAS_LSE_GRAD=lse_grad is not None,
        WANT_ARGMAX=forward and argmax is not None,
        WANT_ENTROPY=forward and entropy is not None,
        HAS_ENTROPY_GRAD=not forward and entropy_grad is not None and grad is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
