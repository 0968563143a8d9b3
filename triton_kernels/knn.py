"""k nearest neighbours with a fused distance + k-selection kernel, and the marginal neighbour counts of KSG.

Each program owns BLOCK_Q query rows of one batch entry and streams the candidates in tiles of BLOCK_C rows; a
tile of distances lives only in registers and is merged into a running top-KP per query (while some query's best
remaining tile entry beats its current worst kept entry, that entry replaces the worst; ties go to the smaller
index: tiles arrive in index order and ``tl.argmin`` takes the leftmost minimum). Memory: O(N·KP) out, nothing
N×M.

- ``knn_screen`` (float32/bf16/fp16 Euclidean): squared distances ‖a‖² + ‖b‖² − 2a·b with the matrix unit
  (``tl.dot`` in TF32, or 3×TF32, on the GPU; the norms are computed once, in float64, outside the kernel), relative
  to the candidates' mean where that shrinks the norms (``screen_centre``), and KP = k plus a margin. The caller
  (``infofuse._ops.knn``) recomputes the KP candidates' distances exactly, keeps the k best, and certifies each
  query with the error bound of the screening (``screen_error_bound``): a query whose k-th exact distance is not
  below its KP-th screened distance minus the bound is screened again in 3×TF32, then searched by the direct
  kernel if still not certified. So the selected neighbours and distances are exact; the screening only decides
  how much work is spent.
- ``knn_direct`` (Chebyshev, float64, and the re-searched queries): distances by direct differences, exact.
- ``knn_counts``: per query, #{j ≠ i : dist(x_i, x_j) < r_i} (or ≤), by direct differences tile by tile.

All row, column and feature offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "elapsed_ms",
    "knn_candidates",
    "knn_counts",
    "padded_candidates",
    "screen_arguments",
    "screen_centre",
    "screen_configs",
    "screen_error_bound",
    "screen_feature_blocks",
    "screen_slots",
    "squared_norms",
]


@triton.jit
def _distance_tile(
    x_ptr,
    y_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    sxn,
    sxd,
    syn,
    syd,
    METRIC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_Q × BLOCK_C) tile by direct differences in ACC: squared Euclidean (METRIC 0) or Chebyshev (1)."""
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        a = tl.load(
            x_ptr + rows[:, None] * sxn + ds[None, :] * sxd, mask=row_mask[:, None] & d_mask[None, :], other=0.0
        ).to(ACC)
        b = tl.load(
            y_ptr + cols[:, None] * syn + ds[None, :] * syd, mask=col_mask[:, None] & d_mask[None, :], other=0.0
        ).to(ACC)
        diff = a[:, None, :] - b[None, :, :]
        if METRIC == 1:
            acc = tl.maximum(acc, tl.max(tl.abs(diff), axis=2))
        else:
            acc += tl.sum(diff * diff, axis=2)
    return acc


@triton.jit
def _program_rows(x_ptr, y_ptr, sxb, syb, N, BLOCK_Q: tl.constexpr):
    """This program's batch entry, its x and y bases, and its BLOCK_Q query rows (int64) with their mask."""
    pid = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    return batch, x_ptr + batch * sxb, y_ptr + batch * syb, rows, rows < N


@triton.jit
def _store_kept(best_d, best_i, batch, rows, row_mask, slot, out_d_ptr, out_i_ptr, N, KP: tl.constexpr):
    """Write each query's KP kept (distance, index) entries as they lie, in no order: the caller sorts them by exact
    distance. Slots that never held a candidate keep a negative index (their distance is ±inf)."""
    out = batch * N * KP + rows[:, None] * KP + slot
    tl.store(out_d_ptr + out, best_d, mask=row_mask[:, None])
    tl.store(out_i_ptr + out, best_i.to(tl.int64), mask=row_mask[:, None])


@triton.jit
def _empty_kept(K, ACC: tl.constexpr, KP: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Per query KP slots of kept (distance, index), the first K real (+inf), the rest padding that never counts as
    the worst (-inf); indices are distinct negative placeholders."""
    slot = tl.arange(0, KP)[None, :]
    zero = tl.zeros((BLOCK_Q, KP), dtype=ACC)
    best_d = tl.where(slot < K, zero + float("inf"), zero - float("inf"))
    best_i = tl.zeros((BLOCK_Q, KP), dtype=tl.int64) - (slot + 1).to(tl.int64)
    return slot, best_d, best_i


@triton.jit
def _knn_direct_kernel(
    x_ptr,
    y_ptr,
    out_d_ptr,
    out_i_ptr,
    N,
    M,
    D,
    K,
    sxb,
    sxn,
    sxd,
    syb,
    syn,
    syd,
    EXCLUDE_SELF: tl.constexpr,
    METRIC: tl.constexpr,
    ACC: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch, x_b, y_b, rows, row_mask = _program_rows(x_ptr, y_ptr, sxb, syb, N, BLOCK_Q)
    slot, best_d, best_i = _empty_kept(K, ACC, KP, BLOCK_Q)
    for c0 in range(0, M, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < M
        t = _distance_tile(
            x_b, y_b, rows, cols, row_mask, col_mask, D, sxn, sxd, syn, syd, METRIC, ACC, BLOCK_Q, BLOCK_C, BLOCK_D
        )
        best_d, best_i = _merge_tile(t, rows, cols, c0, row_mask, col_mask, best_d, best_i, EXCLUDE_SELF)
    _store_kept(best_d, best_i, batch, rows, row_mask, slot, out_d_ptr, out_i_ptr, N, KP)


@triton.jit
def _merge_tile(t, rows, cols, c0, row_mask, col_mask, best_d, best_i, EXCLUDE_SELF: tl.constexpr):
    """Merge a (BLOCK_Q × BLOCK_C) distance tile into each query's kept (distance, index) entries."""
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
    return best_d, best_i


@triton.jit
def _knn_screen_kernel(
    x_ptr,
    y_ptr,
    mu_ptr,
    nx_ptr,
    hy_ptr,
    out_d_ptr,
    out_i_ptr,
    N,
    M,
    D,
    sxb,
    sxn,
    sxd,
    syb,
    syn,
    syd,
    SHY,
    TUNE_N,
    EXCLUDE_SELF: tl.constexpr,
    PRECISION: tl.constexpr,
    CENTRE: tl.constexpr,
    KP: tl.constexpr,
    ONE_D: tl.constexpr,
    INDEX: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Squared Euclidean screening. Along a query's row the candidates are ranked by s = ‖b‖²/2 − a·b (the query's
    own ‖a‖² is the same for all of them): one subtraction per pair after the dot. hy: float32 (B, SHY) ‖b‖²/2,
    then +inf up to SHY, a multiple of BLOCK_C above M (so the last tile needs no mask). The kept entries leave as
    ‖a‖² + 2s (nx: float32 (B, N) ‖a‖²). CENTRE: every point has the centre mu (float32 (B, D)) subtracted as it
    is loaded (the norms are then those of the centred points). ONE_D: D ≤ BLOCK_D, and the query block is loaded
    once for all candidate tiles. INDEX: the kept indices' dtype (int32 below 2³¹ candidates). PREFETCH (with
    ONE_D): each candidate tile is loaded, as stored, during the tile before it (centred when used). TUNE_N: not
    used here; N's bit length, for the autotuner's key (the grid's size decides which blocks fill the GPU).

    Per tile, only what the tile needs: the +inf of hy past M stands for the last tile's missing candidates, and the
    self-exclusion runs only on the tiles that meet the diagonal. Query rows past N keep -inf entries, so they never
    take a candidate."""
    batch, x_b, y_b, rows, row_mask = _program_rows(x_ptr, y_ptr, sxb, syb, N, BLOCK_Q)
    r0 = tl.program_id(0).to(tl.int64) * BLOCK_Q
    ds = tl.arange(0, BLOCK_D).to(tl.int64)
    lc = tl.arange(0, BLOCK_C)  # tile-local candidate columns (int32)
    lq = tl.arange(0, BLOCK_Q)
    if ONE_D:
        a_all = _centred_rows(x_b, mu_ptr + batch * D, rows, row_mask, ds, D, sxn, sxd, CENTRE)
    else:
        a_all = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    if ONE_D and PREFETCH:  # the candidate tile's pointers, advanced a tile at a time
        b_ptrs = y_b + lc.to(tl.int64)[:, None] * syn + ds[None, :] * syd
        b_raw = tl.load(b_ptrs, mask=(lc < M)[:, None] & (ds < D)[None, :], other=0.0)  # the first tile
    else:
        b_ptrs = y_b + tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.int64)  # unused
        b_raw = tl.zeros((BLOCK_C, BLOCK_D), dtype=y_ptr.dtype.element_ty)
    slot = tl.arange(0, KP)[None, :]
    best_d = tl.where(row_mask[:, None] & (slot >= 0), float("inf"), float("-inf"))
    best_i = tl.zeros((BLOCK_Q, KP), dtype=INDEX) - 1 - slot
    worst, w_slot = tl.max(best_d, axis=1, return_indices=True)
    for c0 in range(0, M, BLOCK_C):
        cols = c0 + lc.to(tl.int64)
        col_mask = lc < M - c0
        if ONE_D:
            if PREFETCH:  # this tile was loaded during the last one; the next one loads during this one
                b = _centre(b_raw.to(tl.float32), mu_ptr + batch * D, ds, D, CENTRE)
                b_ptrs += tl.full((), BLOCK_C, tl.int64) * syn  # 64-bit: the row stride may be large
                b_raw = tl.load(b_ptrs, mask=(lc < M - c0 - BLOCK_C)[:, None] & (ds < D)[None, :], other=0.0)
            else:
                b = _centred_rows(y_b, mu_ptr + batch * D, cols, col_mask, ds, D, syn, syd, CENTRE)
            dot = tl.dot(a_all, tl.trans(b), input_precision=PRECISION)
        else:
            dot = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                a = _centred_rows(x_b, mu_ptr + batch * D, rows, row_mask, d0 + ds, D, sxn, sxd, CENTRE)
                b = _centred_rows(y_b, mu_ptr + batch * D, cols, col_mask, d0 + ds, D, syn, syd, CENTRE)
                dot = tl.dot(a, tl.trans(b), dot, input_precision=PRECISION)
        half = tl.load(hy_ptr + batch * SHY + cols)  # +inf past M: no mask
        t = half[None, :] - dot
        if EXCLUDE_SELF:
            if (c0 < r0 + BLOCK_Q) & (r0 < c0 + BLOCK_C):  # the tile meets the diagonal
                t = tl.where((lq + (r0 - c0))[:, None] == lc[None, :], float("inf"), t)
        best_d, best_i, worst, w_slot = _merge_screened(t, c0, lc, slot, best_d, best_i, worst, w_slot)
    nq = tl.load(nx_ptr + batch * N + rows, mask=row_mask, other=0.0)
    _store_kept(nq[:, None] + 2.0 * best_d, best_i, batch, rows, row_mask, slot, out_d_ptr, out_i_ptr, N, KP)


@triton.jit
def _merge_screened(t, c0, lc, slot, best_d, best_i, worst, w_slot):
    """Merge a tile of screened values into the kept KP per query: while some query's best tile entry beats its
    worst kept one, it takes that slot. worst and w_slot (the worst kept value and its slot) come in and go out
    with the kept entries, so a tile with nothing to take (most tiles, once the kept entries are good) costs one
    plain min per row and one any(); the argmin is found only in the rounds that take something. Which of equal
    worst entries leaves is not defined: the caller's certificate does not depend on it."""
    more = tl.max((tl.min(t, axis=1) < worst).to(tl.int32), axis=0) > 0
    while more:
        c_min, c_arg = tl.min(t, axis=1, return_indices=True)
        hit = (c_min < worst)[:, None] & (slot == w_slot[:, None])
        best_d = tl.where(hit, c_min[:, None], best_d)
        best_i = tl.where(hit, (c0 + c_arg[:, None]).to(best_i.dtype), best_i)
        t = tl.where(lc[None, :] == c_arg[:, None], float("inf"), t)  # taken, or no better than what is kept
        worst, w_slot = tl.max(best_d, axis=1, return_indices=True)
        more = tl.max((tl.min(t, axis=1) < worst).to(tl.int32), axis=0) > 0
    return best_d, best_i, worst, w_slot


@triton.jit
def _rows(v_ptr, rows, row_mask, ds, D, svn, svd):
    """(rows × ds) block of points as stored, zero outside D and the rows."""
    return tl.load(
        v_ptr + rows[:, None] * svn + ds[None, :] * svd, mask=row_mask[:, None] & (ds < D)[None, :], other=0.0
    )


@triton.jit
def _centre(v, mu_ptr, ds, D, CENTRE: tl.constexpr):
    """v minus the centre mu (float32, zero outside D) where CENTRE."""
    if CENTRE:
        v = v - tl.load(mu_ptr + ds, mask=ds < D, other=0.0)[None, :]
    return v


@triton.jit
def _centred_rows(v_ptr, mu_ptr, rows, row_mask, ds, D, svn, svd, CENTRE: tl.constexpr):
    """(rows × ds) block of points in float32, zero outside D, minus the centre mu where CENTRE."""
    return _centre(_rows(v_ptr, rows, row_mask, ds, D, svn, svd).to(tl.float32), mu_ptr, ds, D, CENTRE)


# Tried in turn on the first call for each (D, KP, precision, centring, N's bit length) on a GPU where KP ≤ 32;
# above, the kept entries need the registers and one smaller block runs. PREFETCH (one feature block only): the
# next candidate tile is loaded into registers while this one is screened and merged. Triton does not pipeline a
# loop with a loop in it (the merge), so without it every tile waits for its own loads; with it, ~40 more
# registers a thread at 128 × 64 and d = 128, and about as many instructions (bench/NOTES.md): the GPU decides. The
# interpreter uses INTERPRETER_META.
_SCREEN_CONFIGS = [
    triton.Config({"BLOCK_Q": 128, "BLOCK_C": 64, "PREFETCH": True}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_Q": 128, "BLOCK_C": 64, "PREFETCH": False}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_Q": 64, "BLOCK_C": 64, "PREFETCH": False}, num_warps=4, num_stages=2),
    # fewer registers (≈ 120 at KP = 32 on sm_90 without PREFETCH): two blocks an SM where 128 × 64 fits one
    triton.Config({"BLOCK_Q": 128, "BLOCK_C": 32, "PREFETCH": True}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_Q": 128, "BLOCK_C": 32, "PREFETCH": False}, num_warps=8, num_stages=2),
]
_SCREEN_LARGE_KP = triton.Config({"BLOCK_Q": 32, "BLOCK_C": 64, "PREFETCH": False}, num_warps=4, num_stages=2)
INTERPRETER_META = {"BLOCK_Q": 32, "BLOCK_C": 64, "PREFETCH": True}
# A configuration's run at least this long (ms) is timed once, after one warm run, when autotuning.
LONG_RUN_MS = 20.0


def screen_configs(kp: int) -> list:
    """The GPU configurations of the screening kernel for KP kept entries (autotuned among them when several)."""
    return _SCREEN_CONFIGS if kp <= 32 else [_SCREEN_LARGE_KP]


def _prune_screen_configs(configs, named_args, **kwargs):
    """Without ONE_D the tile loop has the feature loop in it and PREFETCH changes nothing: one of each pair."""
    return configs if kwargs.get("ONE_D", True) else [c for c in configs if not c.kwargs["PREFETCH"]]


def elapsed_ms(fn) -> float:
    """Milliseconds of one call of fn on the current CUDA stream, by events (waits for it)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_config(kernel_call, quantiles):
    """The autotuner's timing of one configuration. Triton's do_bench runs a kernel at least 8 times; a screening
    of 2²⁰ points takes about a second a run, so a run of LONG_RUN_MS or more is timed once after one warm-up run
    (two runs a configuration): run-to-run noise at that length is far below what separates the configurations."""
    import triton.testing

    kernel_call()  # compiles, and warms
    ms = elapsed_ms(kernel_call)
    if ms >= LONG_RUN_MS:
        return [ms] * len(quantiles)
    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


_knn_screen_tuned = triton.autotune(
    configs=_SCREEN_CONFIGS,
    key=["D", "KP", "PRECISION", "CENTRE", "TUNE_N"],
    prune_configs_by={"early_config_prune": _prune_screen_configs},
    do_bench=time_config,
)(_knn_screen_kernel)


@triton.jit
def _knn_count_kernel(
    x_ptr,
    r_ptr,
    out_ptr,
    N,
    D,
    sxb,
    sxn,
    sxd,
    METRIC: tl.constexpr,
    STRICT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch, x_b, _, rows, row_mask = _program_rows(x_ptr, x_ptr, sxb, sxb, N, BLOCK_Q)
    r = tl.load(r_ptr + batch * N + rows, mask=row_mask, other=0.0)
    count = tl.zeros((BLOCK_Q,), dtype=tl.int64)
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < N
        t = _distance_tile(
            x_b, x_b, rows, cols, row_mask, col_mask, D, sxn, sxd, sxn, sxd, METRIC, ACC, BLOCK_Q, BLOCK_C, BLOCK_D
        )
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


# Block sizes of the direct-difference kernels (search and counts) on the GPU.
DIRECT_GPU_META = {"BLOCK_Q": 32, "BLOCK_C": 64, "BLOCK_D": 8, "num_warps": 4}


def _direct_meta(x: torch.Tensor) -> dict:
    """Block sizes of the direct-difference kernels: on the GPU, or in the interpreter."""
    return dict(DIRECT_GPU_META) if x.is_cuda else {"BLOCK_Q": 32, "BLOCK_C": 64, "BLOCK_D": 16}


def padded_candidates(m: int) -> int:
    """Length of the screening's per-candidate rows: m, then +inf up to a multiple of 128 (every BLOCK_C) past it."""
    return (m // 128 + 1) * 128


def screen_feature_blocks(d: int) -> dict:
    """The screening's feature blocking for d features: ONE_D (all of d in one block, the query block loaded once)
    and BLOCK_D (d rounded up to a power of two, at least 16 for the matrix unit; else 64 a step)."""
    block_d = max(16, triton.next_power_of_2(d))
    return {"ONE_D": block_d <= 128, "BLOCK_D": block_d if block_d <= 128 else 64}


def screen_slots(k: int) -> int:
    """KP, the candidates a screening keeps per query for k neighbours: k plus a margin of about 7k/8 (at least 4),
    rounded up to a power of 2. The certificate needs the KP-th screened distance clear of the k-th exact one by
    the bound; on Gaussian data (N = 2²⁰, d = 16 to 128, the CPU model of bench/knn_screening.py) KP ≈ 1.6 k left
    4 to 26 % of the queries to the 3×TF32 tier, KP ≥ 1.9 k at most 1 % (bench/NOTES.md, "Screening margin")."""
    return triton.next_power_of_2(k + max(4, (7 * k + 7) // 8))


def knn_candidates(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    metric: int,
    exclude_self: bool,
    *,
    direct: bool | None = None,
    precision: str = "tf32",
    config: triton.Config | None = None,
):
    """(B, N, KP) candidates, KP ≥ k, in no particular order. A slot with a negative index holds no candidate: +inf
    in the screening (fewer than KP candidates), -inf in the direct search's padding past k. In the screening a
    query's largest distance is its KP-th smallest screened one, the certificate's.

    Returns (distances, indices, bound). Direct search (Chebyshev, float64, or ``direct=True``): KP = k rounded up
    to a power of two, distances exact (squared for Euclidean), ``bound`` None. Screening (float32/bf16/fp16
    Euclidean): KP = k plus a margin, squared distances from the matrix unit in ``precision`` ("tf32" or "tf32x3";
    the interpreter computes in float32 whatever it is told), and ``bound`` (B, N) float64 bounds
    |screened − exact squared distance| for every candidate of each query (``screen_error_bound``). The points are
    screened relative to the candidates' mean where that shrinks their norms (``screen_centre``): distances do not
    change, the bound does. ``config``: screen with this configuration (one of ``screen_configs``) instead of the
    autotuned one on the GPU, or with its blocks instead of INTERPRETER_META's in the interpreter."""
    b, n, d = x.shape
    m = y.shape[1]
    if direct is None:
        direct = metric == 1 or x.dtype == torch.float64
    kp = triton.next_power_of_2(k) if direct else screen_slots(k)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_d = torch.empty((b, n, kp), dtype=acc_dtype, device=x.device)
    out_i = torch.empty((b, n, kp), dtype=torch.int64, device=x.device)
    if direct:
        if n:
            meta = _direct_meta(x)
            _knn_direct_kernel[(triton.cdiv(n, meta["BLOCK_Q"]), b)](
                x,
                y,
                out_d,
                out_i,
                n,
                m,
                d,
                k,
                x.stride(0),
                x.stride(1),
                x.stride(2),
                y.stride(0),
                y.stride(1),
                y.stride(2),
                EXCLUDE_SELF=exclude_self,
                METRIC=metric,
                ACC=_acc(x.dtype),
                KP=kp,
                **meta,
            )
        return out_d, out_i, None
    if precision not in SCREEN_PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(SCREEN_PRECISIONS)}, got {precision!r}")
    mu, ny = screen_centre(y)
    nx = ny if x is y else squared_norms(x, mu)
    if n:
        hy32 = torch.full((b, padded_candidates(m)), float("inf"), dtype=torch.float32, device=x.device)
        hy32[:, :m] = ny / 2
        args = screen_arguments(x, y, mu, nx.float(), hy32, out_d, out_i, exclude_self, precision)
        if x.is_cuda and config is None and kp <= 32:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_Q"]), b)  # noqa: E731
            _knn_screen_tuned[grid](**args)
        else:
            if x.is_cuda:
                c = config or _SCREEN_LARGE_KP
                meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            else:  # the interpreter: the blocks of ``config`` where given
                meta = dict(config.kwargs) if config else INTERPRETER_META
            _knn_screen_kernel[(triton.cdiv(n, meta["BLOCK_Q"]), b)](**args, **meta)
    return out_d, out_i, screen_error_bound(nx, ny, d, precision)


def screen_arguments(x, y, mu, nx32, hy32, out_d, out_i, exclude_self: bool, precision: str) -> dict:
    """The screening kernel's arguments by name, all but the blocks of a configuration: x (B, N, d) queries, y
    (B, M, d) candidates, mu the centre (float32 (B, d)) or None, nx32 float32 (B, N) ‖a‖², hy32 float32 (B, SHY)
    ‖b‖²/2 then +inf (``padded_candidates``), out_d / out_i (B, N, KP). What knn_candidates launches, and what
    bench/sass.py compiles."""
    b, n, d = x.shape
    m = y.shape[1]
    return dict(
        x_ptr=x,
        y_ptr=y,
        mu_ptr=hy32 if mu is None else mu,  # any float32 pointer when not centring (never read)
        nx_ptr=nx32,
        hy_ptr=hy32,
        out_d_ptr=out_d,
        out_i_ptr=out_i,
        N=n,
        M=m,
        D=d,
        sxb=x.stride(0),
        sxn=x.stride(1),
        sxd=x.stride(2),
        syb=y.stride(0),
        syn=y.stride(1),
        syd=y.stride(2),
        SHY=hy32.shape[1],
        TUNE_N=n.bit_length(),
        EXCLUDE_SELF=exclude_self,
        PRECISION=precision,
        CENTRE=mu is not None,
        KP=out_d.shape[-1],
        **screen_feature_blocks(d),
        INDEX=tl.int32 if m + 1024 < 2**31 else tl.int64,
    )


# Bytes of float64 rows per step when norms and centres are computed (bounded temporaries).
_NORM_BYTES = 64 << 20
# What the screening does with each product aᵢbᵢ, by precision: (relative error of one product, dot passes summed
# in float32). TF32 keeps 10 of float32's 23 mantissa bits of each operand (truncated: 2⁻¹⁰ each, 2⁻⁹ a product).
# 3×TF32 splits each operand into a TF32 part and a TF32 remainder and drops remainder × remainder: at most
# 3·2⁻²⁰ (whether the split rounds or truncates), taken as 2⁻¹⁸; its three dots all add into the accumulator.
SCREEN_PRECISIONS = {"tf32": (2.0**-9, 1), "tf32x3": (2.0**-18, 3)}
# Centre the points when that makes the bound's scale, mean ‖b‖ × largest ‖b‖ over the candidates, at most this
# fraction of the uncentred one (centring costs a subtraction per loaded element).
CENTRE_GAIN = 0.64


def _row_chunks(v: torch.Tensor):
    rows = max(1, _NORM_BYTES // max(1, v.shape[0] * v.shape[2] * 8))
    for r0 in range(0, v.shape[1], rows):
        yield slice(r0, r0 + rows)


def squared_norms(v: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
    """(B, N) float64 ‖vᵢ − mu‖² (mu float32 (B, d), or None for ‖vᵢ‖²), summed in float64 by row chunks."""
    out = torch.empty(v.shape[:2], dtype=torch.float64, device=v.device)
    for rows in _row_chunks(v):
        part = v[:, rows].double()
        if mu is not None:
            part = part - mu.double()[:, None, :]
        out[:, rows] = part.square().sum(-1)
    return out


def screen_centre(y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(mu, ny): the candidates' mean in float32 (B, d) and the float64 squared norms of the centred candidates, or
    (None, uncentred norms) where centring would not shrink the bound's scale to CENTRE_GAIN of what it is.

    The screening's error grows with ‖a‖‖b‖ (``screen_error_bound``), not with ‖a − b‖: data far from the origin
    (a common offset, embeddings that share a direction) would leave most queries uncertified without it."""
    b, m, d = y.shape
    plain = squared_norms(y, None)
    if m == 0:
        return None, plain
    total = torch.zeros((b, d), dtype=torch.float64, device=y.device)
    for rows in _row_chunks(y):
        total += y[:, rows].double().sum(1)
    mu = (total / m).float()
    centred = squared_norms(y, mu)

    def scale(norms):  # ‖a‖·max‖b‖ of screen_error_bound, for a typical query
        return norms.sqrt().mean() * norms.amax().sqrt()

    if bool((scale(centred) < CENTRE_GAIN * scale(plain)).item()):
        return mu, centred
    return None, plain


def screen_error_bound(nx: torch.Tensor, ny: torch.Tensor, d: int, precision: str = "tf32") -> torch.Tensor:
    """(B, N) float64 bound on |screened − exact| squared distance between query i and any candidate.

    nx, ny: float64 squared norms of the queries and the candidates as screened (centred or not). The screening
    computes fl(‖a‖² + ‖b‖² − 2·dot) with the dot on the matrix unit: each product off by at most the precision's
    relative error, the products summed in float32 (passes·d roundings, each at most 2⁻²⁴ of Σ|aᵢbᵢ| ≤ ‖a‖‖b‖),
    and each operand rounded once more when centred; the norms are rounded once to float32 and the two additions
    add 4·2⁻²⁴·(‖a‖² + ‖b‖²). With ‖b‖ ≤ the largest candidate norm, and a factor 2 of safety (the matrix unit may
    truncate its sums) over this first-order count."""
    rel, passes = SCREEN_PRECISIONS[precision]
    ymax = ny.amax(dim=-1, keepdim=True) if ny.shape[-1] else torch.zeros_like(nx[..., :1])
    dot = (rel + (passes * d + 2) * 2.0**-24) * nx.sqrt() * ymax.sqrt()
    norms = 6 * 2.0**-24 * (nx + ymax)
    return 2.0 * (2.0 * dot + norms)


def knn_counts(x: torch.Tensor, radius: torch.Tensor, metric: int, strict: bool) -> torch.Tensor:
    """(B, N) int64: #{j ≠ i : dist(x_i, x_j) < radius_i} (strict) or ≤, by direct differences."""
    b, n, d = x.shape
    out = torch.empty((b, n), dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    radius = radius.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()
    meta = _direct_meta(x)
    _knn_count_kernel[(triton.cdiv(n, meta["BLOCK_Q"]), b)](
        x,
        radius,
        out,
        n,
        d,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        METRIC=metric,
        STRICT=strict,
        ACC=_acc(x.dtype),
        **meta,
    )
    return out
