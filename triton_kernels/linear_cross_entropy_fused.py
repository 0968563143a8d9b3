"""Fused linear cross-entropy: Triton kernels that never write a logit to memory.

Forward (``lce_fused_partials``): each program takes BLOCK_N rows and one slice of the vocabulary, computes logit
tiles ``X_blk · W_tileᵀ (+ b)`` with ``tl.dot`` (float32 accumulation; float32 inputs in IEEE precision, never
TF32), and keeps per row an online max and sum of exps, the target logit and Σ_j w_j·ẑ_j. The slices' partial
states are merged afterwards (MATH.md, online log-sum-exp): O(N) floats out per slice.

Backward (``lce_fused_grads``): programs recompute (BLOCK_N × BLOCK_V) logit tiles and form the gradient tile
``g = (a·p + b·(p − [j = t]) − c·w)·softcap′`` from per-row coefficients. One pass owns blocks of dX rows and adds
``g·W_tile`` over the vocabulary, the other owns blocks of dW rows (and db) and adds ``gᵀ·X_blk`` over the rows,
BLOCK_D columns at a time, into float32 accumulators: the gradient itself for float32, else a bounded float32
slice rounded once into the bf16/fp16 gradient. Neither a V×D nor an N×D float32 buffer is held: the extra memory
is at most WORKSPACE_BYTES plus O(N + V) floats. The dW pass may skip the products of tiles whose softmax entries
are all below ``filter_eps`` (LM-like logits: most of the vocabulary's tail).

Temperature and entropy: the logits are ℓ = ẑ·(1/T) in every pass (``inv_temp``, behind the constexpr
HAS_TEMPERATURE; the caller folds the 1/T of dℓ/dẑ into the coefficients). With WANT_ENTROPY the forward keeps a
third online sum per row and slice, Σ exp(ℓ − m)·(ℓ − m), merged across slices like s; with HAS_ENTROPY the
gradient tile gains −e·p·(ℓ − h) from two more per-row vectors (e the entropy's upstream gradient times 1/T,
h = lse − H). All three are constexpr flags: without them the kernels are the plain cross-entropy ones.

Row and column offsets are int64: N·D, V·D and N·V may pass 2³¹.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_block, logit_tile, softcap_slope, softcapped, tempered

__all__ = ["lce_fused_grads", "lce_fused_partials"]


@triton.jit
def _lce_fused_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    target_ptr,
    weight_ptr,
    m_ptr,
    s_ptr,
    zt_ptr,
    wz_ptr,
    am_ptr,
    ts_ptr,
    N,
    V,
    D,
    v_per_split,
    stride_xn,
    stride_xd,
    stride_wv,
    stride_wd,
    softcap,
    inv_temp,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    WANT_ARGMAX: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    t = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    wz = tl.zeros((BLOCK_N,), tl.float32)
    ts = tl.zeros((BLOCK_N,), tl.float32)  # Σ exp(ℓ − m)·(ℓ − m), relative to the running max like s
    am = tl.zeros((BLOCK_N,), tl.int64) + v_start  # first column of each row's running maximum
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < v_end
        z = logit_tile(
            x_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            stride_xn,
            stride_xd,
            stride_wv,
            stride_wd,
            HAS_BIAS,
            IEEE,
            DOT_F32,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        z = tl.where(col_mask[None, :], tempered(softcapped(z, softcap, HAS_SOFTCAP), inv_temp, HAS_TEMPERATURE), 0.0)
        z_max = tl.where(col_mask[None, :], z, float("-inf"))
        tile_max = tl.max(z_max, axis=1)
        if WANT_ARGMAX:  # a later tile takes over only with a strictly larger maximum: the first index wins
            am = tl.where(tile_max > m, v0 + tl.argmax(z_max, axis=1).to(tl.int64), am)
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)
        e = tl.exp(z_max - m_new[:, None])
        if WANT_ENTROPY:  # Σ e^{ℓ−m}(ℓ − m') = α·(t + (m − m')·s); the first tile has s = t = 0 and m = −inf
            shift = (tl.where(s > 0.0, m, m_new) - m_new) * s  # no −inf·0 on the first tile
            ts = alpha * (ts + shift) + tl.sum(tl.where(col_mask[None, :], e * (z - m_new[:, None]), 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), axis=1)
        if HAS_WEIGHT:
            w_col = tl.load(weight_ptr + cols, mask=col_mask, other=0.0)
            wz += tl.sum(z * w_col[None, :], axis=1)
        else:
            wz += tl.sum(z, axis=1)
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(zt_ptr + out, zt, mask=row_mask)
    tl.store(wz_ptr + out, wz, mask=row_mask)
    if WANT_ARGMAX:
        tl.store(am_ptr + out, am, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(ts_ptr + out, ts, mask=row_mask)


@triton.jit
def _grad_tile(
    x_ptr,
    w_ptr,
    b_ptr,
    target_ptr,
    weight_ptr,
    lse_ptr,
    a_ptr,
    b_coef_ptr,
    c_ptr,
    e_ptr,
    h_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    stride_xn,
    stride_xd,
    stride_wv,
    stride_wd,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dLoss/dlogits on one (BLOCK_N × BLOCK_V) tile, recomputed from the logits; 0 outside the masks."""
    z = logit_tile(
        x_ptr,
        w_ptr,
        b_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        D,
        stride_xn,
        stride_xd,
        stride_wv,
        stride_wd,
        HAS_BIAS,
        IEEE,
        DOT_F32,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    z_raw = z
    z = tempered(softcapped(z, softcap, HAS_SOFTCAP), inv_temp, HAS_TEMPERATURE)
    t = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    a = tl.load(a_ptr + rows, mask=row_mask, other=0.0)
    b = tl.load(b_coef_ptr + rows, mask=row_mask, other=0.0)
    c = tl.load(c_ptr + rows, mask=row_mask, other=0.0)
    if HAS_WEIGHT:
        w_col = tl.load(weight_ptr + cols, mask=col_mask, other=0.0)
    else:
        w_col = tl.full((BLOCK_V,), 1.0, tl.float32)
    p = tl.exp(z - lse[:, None])
    g = a[:, None] * p + b[:, None] * (p - tl.where(cols[None, :] == t[:, None], 1.0, 0.0))
    g -= c[:, None] * w_col[None, :]
    if HAS_ENTROPY:
        e = tl.load(e_ptr + rows, mask=row_mask, other=0.0)
        h = tl.load(h_ptr + rows, mask=row_mask, other=0.0)
        g -= e[:, None] * p * (z - h[:, None])
    if HAS_SOFTCAP:
        g = g * softcap_slope(z_raw, softcap)
    return tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)


@triton.jit
def _lce_fused_bwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    target_ptr,
    weight_ptr,
    lse_ptr,
    a_ptr,
    b_coef_ptr,
    c_ptr,
    e_ptr,
    h_ptr,
    out_ptr,
    db_ptr,
    count_ptr,
    N,
    V,
    D,
    own0,
    own_end,
    stride_out,
    stride_xn,
    stride_xd,
    stride_wv,
    stride_wd,
    softcap,
    inv_temp,
    filter_eps,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    IEEE: tl.constexpr,
    OWN_ROWS: tl.constexpr,
    WANT_OUT: tl.constexpr,
    WANT_DB: tl.constexpr,
    FILTER: tl.constexpr,
    COUNT: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Each program owns one block of output rows in [own0, own_end) and walks a share of the other dimension.

    OWN_ROWS: BLOCK_N rows of dX, walking the vocabulary; else BLOCK_V rows of dW (and db), walking the rows.
    ``out_ptr`` points at row ``own0`` of a float32 accumulator. Program (i, s) of (·, S) takes the inner blocks
    s, s + S, s + 2S, …; with S > 1 (ATOMIC) the programs of one output block add with float32 atomics, with
    S = 1 each output element is summed by one program in a fixed order (bitwise reproducible).
    FILTER (dW pass): skip the GEMM of a tile where every |g_ij| <= filter_eps·|a_i + b_i|, i.e. p_ij·softcap′ <=
    filter_eps and no target falls in it (bench/NOTES.md: why dX is never filtered).
    """
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if OWN_ROWS:
        n_inner = tl.cdiv(V, BLOCK_V)
    else:
        n_inner = tl.cdiv(N, BLOCK_N)
    for k in range(split, n_inner, tl.num_programs(1)):
        if OWN_ROWS:
            rows = own0 + pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            cols = k * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
            row_mask = rows < own_end
            col_mask = cols < V
        else:
            rows = k * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            cols = own0 + pid * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
            row_mask = rows < N
            col_mask = cols < own_end
        g = _grad_tile(
            x_ptr,
            w_ptr,
            b_ptr,
            target_ptr,
            weight_ptr,
            lse_ptr,
            a_ptr,
            b_coef_ptr,
            c_ptr,
            e_ptr,
            h_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            stride_xn,
            stride_xd,
            stride_wv,
            stride_wd,
            softcap,
            inv_temp,
            HAS_BIAS,
            HAS_WEIGHT,
            HAS_SOFTCAP,
            HAS_TEMPERATURE,
            HAS_ENTROPY,
            IEEE,
            DOT_F32,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        if not OWN_ROWS and WANT_DB:  # never filtered: a row sum of the tile is cheap
            if ATOMIC:
                tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_mask)
            else:
                tl.store(
                    db_ptr + cols, tl.load(db_ptr + cols, mask=col_mask, other=0.0) + tl.sum(g, axis=0), mask=col_mask
                )
        keep = True
        if FILTER:
            a = tl.load(a_ptr + rows, mask=row_mask, other=0.0) + tl.load(b_coef_ptr + rows, mask=row_mask, other=0.0)
            keep = tl.max(tl.max(tl.abs(g) - filter_eps * tl.abs(a)[:, None], axis=1), axis=0) > 0.0
            if COUNT:
                tl.atomic_add(count_ptr, 1 - keep.to(tl.int32))
                tl.atomic_add(count_ptr + 1, 1)
        g_in = g if DOT_F32 else g.to(x_ptr.dtype.element_ty)
        if keep:
            for d0 in range(0, D if WANT_OUT else 0, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_mask = ds < D
                if OWN_ROWS:
                    part = dot_block(
                        g_in, w_ptr, cols, col_mask, ds, d_mask, stride_wv, stride_wd, False, IEEE, DOT_F32
                    )
                    ptrs = out_ptr + (rows - own0)[:, None] * stride_out + ds[None, :]
                    mask = row_mask[:, None] & d_mask[None, :]
                else:
                    part = dot_block(g_in, x_ptr, rows, row_mask, ds, d_mask, stride_xn, stride_xd, True, IEEE, DOT_F32)
                    ptrs = out_ptr + (cols - own0)[:, None] * stride_out + ds[None, :]
                    mask = col_mask[:, None] & d_mask[None, :]
                if ATOMIC:
                    tl.atomic_add(ptrs, part, mask=mask)
                else:
                    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + part, mask=mask)


def _blocks(x: torch.Tensor) -> dict:
    if x.is_cuda:  # one default per device class; untuned (bench/NOTES.md)
        return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "DOT_F32": False, "num_warps": 8, "num_stages": 3}
    # Triton's interpreter: large tiles (fewer NumPy calls); its tl.dot mishandles bf16/fp16 operands (Triton
    # 3.9 returned garbage), so the tiles are upcast to float32 there.
    return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "DOT_F32": x.dtype != torch.float32}


def lce_fused_partials(
    x,
    w,
    b,
    target,
    weight,
    softcap,
    *,
    splits: int | None = None,
    want_argmax: bool = False,
    temperature: float = 1.0,
    want_entropy: bool = False,
):
    """Per-slice online states ``(m, s, zt, wz)``, each (splits, N) float32, over vocabulary slices of the logits
    ℓ = ẑ/T; with ``want_argmax`` then (splits, N) int64, each slice's first column of its largest logit; with
    ``want_entropy`` last (splits, N) float32 ``t`` = Σ exp(ℓ − m)·(ℓ − m) over the slice.

    Merge with ``lse = M + log Σ s·exp(m − M)``, ``zt = Σ zt``, ``wz = Σ wz`` over slices; the argmax is that of
    the first slice whose m is M; ``T = Σ exp(m − M)·(t + (m − M)·s)`` and the entropy is ``log S − T/S``.
    """
    n, d = x.shape
    v = w.shape[0]
    meta = _blocks(x)
    if splits is None:
        row_blocks = triton.cdiv(n, meta["BLOCK_N"])
        target_programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        splits = max(1, min(triton.cdiv(v, meta["BLOCK_V"]), triton.cdiv(target_programs, max(1, row_blocks))))
    v_per_split = triton.cdiv(triton.cdiv(v, splits), meta["BLOCK_V"]) * meta["BLOCK_V"]
    splits = triton.cdiv(v, v_per_split)  # every slice holds at least one column
    out = [torch.empty((splits, n), dtype=torch.float32, device=x.device) for _ in range(4)]
    if want_argmax:
        out.append(torch.empty((splits, n), dtype=torch.int64, device=x.device))
    if want_entropy:
        out.append(torch.empty((splits, n), dtype=torch.float32, device=x.device))
    grid = (triton.cdiv(n, meta["BLOCK_N"]), splits)
    _lce_fused_fwd_kernel[grid](
        x,
        w,
        b if b is not None else x,
        target,
        weight if weight is not None else x,
        *out[:4],
        out[4] if want_argmax else out[0],
        out[-1] if want_entropy else out[0],
        n,
        v,
        d,
        v_per_split,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        float(softcap) if softcap else 1.0,
        1.0 / float(temperature),
        HAS_BIAS=b is not None,
        HAS_WEIGHT=weight is not None,
        HAS_SOFTCAP=bool(softcap),
        HAS_TEMPERATURE=float(temperature) != 1.0,
        IEEE=x.dtype == torch.float32,
        WANT_ARGMAX=want_argmax,
        WANT_ENTROPY=want_entropy,
        **meta,
    )
    return out


# float32 accumulator of one backward pass for bf16/fp16 gradients, in bytes: each pass sums a slice of dX (or dW)
# rows in float32 and rounds it once into the gradient, so the extra memory stays bounded whatever N, V and D.
WORKSPACE_BYTES = 32 << 20


def default_filter_eps(dtype: torch.dtype, label_smoothing: float) -> float:
    """The dW pass's tile filter: 1/16 of the input dtype's unit roundoff (bf16 2⁻¹², fp16 2⁻¹⁵); off for float32
    and with label smoothing (whose −ε/V term is in every tile). bench/NOTES.md holds the measurements."""
    if label_smoothing or dtype == torch.float32:
        return 0.0
    return torch.finfo(dtype).eps / 32  # eps = 2·unit roundoff


def lce_fused_grads(
    x,
    w,
    b,
    target,
    weight,
    softcap,
    lse,
    coef_a,
    coef_b,
    coef_c,
    *,
    want_dx,
    want_dw,
    want_db,
    deterministic=False,
    filter_eps=0.0,
    counts=None,
    temperature=1.0,
    coef_e=None,
    coef_h=None,
):
    """(grad_input, grad_weight, grad_bias) from per-row coefficients (None where not wanted).

    Two passes, each recomputing the logits: one owns dX row blocks and walks the vocabulary, one owns dW row
    blocks (and db) and walks the rows. Gradients come back in the input/weight dtype, each element summed in
    float32 and rounded once (through a float32 slice of at most WORKSPACE_BYTES for bf16/fp16); db in float32.
    ``deterministic``: one program per output block, a fixed order, no atomics (bitwise reproducible; fewer
    programs). ``filter_eps`` > 0 skips dW tile products below it (``default_filter_eps``); ``counts``, an int32
    tensor of 2 zeros, receives (skipped tiles, filtered tiles) of the dW pass. ``temperature`` divides the
    (softcapped) logits (the coefficients already carry its 1/T); ``coef_e``, ``coef_h`` (N,) float32 add the
    entropy's term −e·p·(ℓ − h) (the filter is then off: that term is not bounded by |a + b|).
    """
    n, d = x.shape
    v = w.shape[0]
    meta = _blocks(x)
    dx = x.new_empty((n, d)) if want_dx else None
    dw = w.new_empty((v, d)) if want_dw else None
    db = torch.zeros((v,), dtype=torch.float32, device=x.device) if want_db else None
    if n == 0:
        for out in (dx, dw):
            if out is not None:
                out.zero_()
        return dx, dw, db
    has_entropy = coef_e is not None
    if has_entropy:
        filter_eps = 0.0
    common = (
        *(x, w, b if b is not None else x, target, weight if weight is not None else x, lse, coef_a, coef_b, coef_c),
        *((coef_e, coef_h) if has_entropy else (lse, lse)),
    )
    flags = {
        "HAS_BIAS": b is not None,
        "HAS_WEIGHT": weight is not None,
        "HAS_SOFTCAP": bool(softcap),
        "HAS_TEMPERATURE": float(temperature) != 1.0,
        "HAS_ENTROPY": has_entropy,
        "IEEE": x.dtype == torch.float32,
        "COUNT": counts is not None,
        **meta,
    }
    scalars = (
        *(x.stride(0), x.stride(1), w.stride(0), w.stride(1)),
        float(softcap) if softcap else 1.0,
        1.0 / float(temperature),
    )
    programs = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    passes = []
    if want_dx:
        passes.append((True, dx, meta["BLOCK_N"], triton.cdiv(v, meta["BLOCK_V"])))
    if want_dw or want_db:
        passes.append((False, dw, meta["BLOCK_V"], triton.cdiv(n, meta["BLOCK_N"])))
    for own_rows, out, block, n_inner in passes:
        total = n if own_rows else v
        direct = out is None or out.dtype == torch.float32  # accumulate in the gradient itself
        rows = total if direct else max(block, WORKSPACE_BYTES // (4 * d) // block * block)
        acc = None if direct else torch.empty((min(rows, total), d), dtype=torch.float32, device=x.device)
        use_filter = not own_rows and filter_eps > 0.0
        for own0 in range(0, total, rows):
            m = min(rows, total - own0)
            target_acc = (out[own0 : own0 + m] if out is not None else None) if direct else acc[:m]
            if target_acc is not None:
                target_acc.zero_()
            owned = triton.cdiv(m, block)
            split = 1 if deterministic else max(1, min(n_inner, triton.cdiv(programs, owned)))
            _lce_fused_bwd_kernel[(owned, split)](
                *common,
                target_acc if target_acc is not None else lse,
                db if db is not None else lse,
                counts if counts is not None else lse,
                n,
                v,
                d,
                own0,
                own0 + m,
                d,
                *scalars,
                float(filter_eps),
                OWN_ROWS=own_rows,
                WANT_OUT=out is not None,
                WANT_DB=not own_rows and want_db,
                FILTER=use_filter,
                ATOMIC=split > 1,
                **flags,
            )
            if not direct and out is not None:
                out[own0 : own0 + m].copy_(acc[:m])
    return dx, dw, db
