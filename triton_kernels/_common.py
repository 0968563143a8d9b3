"""Small @triton.jit helpers shared by infofuse's kernels."""

import triton
import triton.language as tl


@triton.jit
def softcapped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """cap·tanh(z/cap) where HAS_SOFTCAP, else z, in float32.

    Written as cap·(1 − 2/(exp(2z/cap) + 1)), which saturates cleanly at ±cap for large |z|.
    """
    if HAS_SOFTCAP:
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z


@triton.jit
def tempered(z, inv_temp, HAS_TEMPERATURE: tl.constexpr):
    """z / T (``inv_temp`` = 1/T) where HAS_TEMPERATURE, else z: temperature 1 compiles to nothing."""
    if HAS_TEMPERATURE:
        z = z * inv_temp
    return z


@triton.jit
def softcap_slope(z, softcap):
    """d/dz cap·tanh(z/cap) = 1 − tanh²(z/cap) of the raw logit z, in float32.

    Written as 4e/(1 + e)² with e = exp(−2|z|/cap): accurate to rounding where tanh saturates, where 1 − u² of
    the rounded softcapped value u keeps no correct digit.
    """
    e = tl.exp(-2.0 * tl.abs(z) / softcap)
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def logit_tile(
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
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """X[rows]·W[cols]ᵀ (+ b[cols]) as a float32 (BLOCK_N × BLOCK_V) tile, BLOCK_D columns of D at a time;
    IEEE: float32 operands in IEEE precision (never TF32); DOT_F32: upcast the operands first (interpreter)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        x = tl.load(
            x_ptr + rows[:, None] * stride_xn + ds[None, :] * stride_xd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[:, None] * stride_wv + ds[None, :] * stride_wd,
            mask=col_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if DOT_F32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def dot_block(
    a,
    b_ptr,
    b_rows,
    b_mask,
    ds,
    d_mask,
    stride_r,
    stride_d,
    TRANS_A: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """a·B[b_rows, ds] (or aᵀ·B with TRANS_A), float32 out; B's tile is read in its own dtype."""
    blk = tl.load(
        b_ptr + b_rows[:, None] * stride_r + ds[None, :] * stride_d, mask=b_mask[:, None] & d_mask[None, :], other=0.0
    )
    if DOT_F32:
        blk = blk.to(tl.float32)
    if TRANS_A:
        a = tl.trans(a)
    if IEEE:
        return tl.dot(a, blk, input_precision="ieee")
    return tl.dot(a, blk)
