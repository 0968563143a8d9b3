"""The CPU kernels of the k-NN ops (``infofuse::knn``, ``infofuse::knn_count``) against brute force in PyTorch.

The kernels compute every distance by one sequence in the accumulation dtype: diff_t = y_t − x_t, then
s = fma(diff_t, diff_t, s) (Euclidean, distance sqrt(s)) or s = max(s, |diff_t|) (Chebyshev), t = 0, 1, …
``_s_float32`` reproduces that sequence bit for bit for float32 inputs (the fma in float64 with an exact tie
correction), so float32 results are checked exactly: the same distances, the same indices as a stable sort by
(distance, index), the same counts at radii that equal pairwise distances. They are also checked against a float64
truth, within float32 rounding. float64 results are checked against a float64 brute force (rtol 1e-12), and exactly
on data whose distances involve no rounding at all (small dyadic coordinates: many ties)."""

from __future__ import annotations

import pytest
import torch

import infofuse  # noqa: F401  (loads the extension and registers the ops)
from tests.utils import assert_close

ops = torch.ops.infofuse
EUCLIDEAN, CHEBYSHEV = 0, 1
INF = float("inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Brute-force references.


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fl32(a·b + c) rounded once, for float32 tensors: the product is exact in float64, TwoSum gives the exact
    remainder of the float64 sum, and it decides the rounding where the float64 sum sits halfway between floats."""
    p = a.double() * b.double()
    c64 = c.double()
    s = p + c64
    bb = s - p
    e = (p - (s - bb)) + (c64 - bb)  # s + e == p + c exactly
    r = s.float()
    r64 = r.double()
    other = torch.where(r64 > s, torch.nextafter(r, torch.tensor(-INF)), torch.nextafter(r, torch.tensor(INF)))
    o64 = other.double()
    halfway = (s == (r64 + o64) / 2) & (e != 0)
    bigger, smaller = torch.maximum(r, other), torch.minimum(r, other)
    return torch.where(halfway, torch.where(e > 0, bigger, smaller), r)


def _s_float32(x: torch.Tensor, y: torch.Tensor, metric: int, fma: bool = True) -> torch.Tensor:
    """The kernels' s for float32 x (B, N, d), y (B, M, d): (B, N, M) float32, bit for bit. fma=False gives the
    sequence of targets without FMA (a·b + c rounded twice)."""
    s = torch.zeros(x.shape[0], x.shape[1], y.shape[1], dtype=torch.float32)
    for t in range(x.shape[2]):
        diff = y[:, None, :, t] - x[:, :, None, t]
        if metric == CHEBYSHEV:
            s = torch.maximum(s, diff.abs())
        elif fma:
            s = _fma32(diff, diff, s)
        else:
            s = (diff.double() * diff.double()).float() + s
    return s


def _dist_float32(x, y, metric, fma=True):
    """float32 distances as the kernels return them. The square root goes through float64 (correctly rounded twice,
    which for sqrt equals one rounding): PyTorch's float32 sqrt on CPU is not always correctly rounded."""
    s = _s_float32(x.float(), y.float(), metric, fma)
    return s.double().sqrt().float() if metric == EUCLIDEAN else s


def _dist64(x, y, metric):
    """float64 distances (B, N, M) by direct differences."""
    x, y = x.double(), y.double()
    if metric == EUCLIDEAN:
        return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    return (x[:, :, None] - y[:, None]).abs().amax(-1)


def _topk_ref(D: torch.Tensor, k: int, exclude_self: bool):
    """The first k of a stable sort by (distance, index); self (j == i) removed by index."""
    D = D.clone()
    if exclude_self:
        n = D.shape[1]
        D[:, torch.arange(n), torch.arange(n)] = INF
    dist, idx = torch.sort(D, dim=-1, stable=True)
    return dist[..., :k], idx[..., :k]


def _count_ref(D: torch.Tensor, radius: torch.Tensor, strict: bool) -> torch.Tensor:
    """#{j != i : D[b, i, j] < radius[b, i]} (strict) or <=."""
    D = D.clone()
    n = D.shape[1]
    D[:, torch.arange(n), torch.arange(n)] = float("nan")
    r = radius[..., None]
    return ((D < r) if strict else (D <= r)).sum(-1)


def _points(b, n, d, gen, dtype=torch.float64, kind="gauss"):
    if kind == "gauss":
        x = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    elif kind == "dyadic":  # coordinates in {-2, -1.75, …, 2}: every distance computation is exact, ties abound
        x = torch.randint(-8, 9, (b, n, d), generator=gen).double() / 4
    elif kind == "far":  # a small cloud far from the origin
        x = 1000.0 + 0.01 * torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return x.to(dtype)


def _with_duplicates(x: torch.Tensor, gen: torch.Generator, count: int) -> torch.Tensor:
    """x with `count` rows of each batch entry replaced by copies of other rows (distance 0 to other indices)."""
    x = x.clone()
    n = x.shape[1]
    for b in range(x.shape[0]):
        src = torch.randint(0, n, (count,), generator=gen)
        dst = torch.randint(0, n, (count,), generator=gen)
        x[b, dst] = x[b, src]
    return x


def _check_knn_float32(x, y, k, metric, exclude_self, dist, idx):
    """float32 results: exactly those of the kernels' arithmetic (with or without FMA), and within float32 rounding
    of a float64 truth: the returned neighbours' true distances are the true k smallest, up to rounding."""
    ref_ok = False
    for fma in (True, False) if metric == EUCLIDEAN else (True,):
        rd, ri = _topk_ref(_dist_float32(x, y, metric, fma), k, exclude_self)
        if torch.equal(ri, idx) and torch.equal(rd, dist):
            ref_ok = True
            break
    assert ref_ok, f"float32 results differ from the kernels' arithmetic:\n{(ri != idx).sum()} indices differ"
    true = _dist64(x, y, metric)
    if exclude_self:
        n = true.shape[1]
        true[:, torch.arange(n), torch.arange(n)] = INF
    true_sorted = true.sort(dim=-1).values[..., :k]
    picked = torch.gather(true, -1, idx)
    scale = true_sorted.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert ((picked - true_sorted).abs() <= 4e-6 * scale).all(), "a neighbour is not among the true k nearest"
    assert_close(dist, picked, rtol=2e-6, atol=1e-6 * scale.max().item(), name="distances vs float64 truth")


# ---------------------------------------------------------------------------------------------------------------
# knn


@pytest.mark.parametrize("metric", [EUCLIDEAN, CHEBYSHEV])
@pytest.mark.parametrize(
    ("b", "n", "m", "d", "k", "exclude_self"),
    [
        (1, 67, 131, 37, 17, False),
        (3, 67, 67, 5, 3, True),
        (1, 1, 1, 1, 1, False),
        (2, 40, 95, 1, 3, False),
        (1, 300, 300, 1, 17, True),
        (1, 50, 77, 3, 77, False),  # k = M
        (2, 60, 60, 4, 59, True),  # k = M - 1 with self
        (1, 700, 700, 6, 5, True),  # several leaves: the tree walk and its pruning
    ],
)
def test_knn_float64(metric, b, n, m, d, k, exclude_self):
    gen = _gen(100 + n + d + k)
    x = _points(b, n, d, gen)
    y = x if exclude_self else _points(b, m, d, gen)
    dist, idx = ops.knn(x, y, k, metric, exclude_self)
    assert dist.shape == (b, n, k) and idx.shape == (b, n, k)
    assert dist.dtype == torch.float64 and idx.dtype == torch.int64
    rd, ri = _topk_ref(_dist64(x, y, metric), k, exclude_self)
    assert_close(dist, rd, rtol=1e-12, atol=0.0, name="distances")
    assert torch.equal(idx, ri), f"{(idx != ri).sum()} indices differ"


@pytest.mark.parametrize("metric", [EUCLIDEAN, CHEBYSHEV])
@pytest.mark.parametrize(
    ("n", "m", "d", "k", "exclude_self"),
    [(4000, 4000, 2, 5, True), (3000, 5000, 3, 40, False), (1, 5000, 2, 7, False), (3, 6000, 3, 1, False)],
)
def test_knn_many_leaves_float64(metric, n, m, d, k, exclude_self):
    """Low d and many leaves, where the walk prunes most of the tree (checked on a subset of the queries)."""
    gen = _gen(n + m + d)
    x = _points(1, n, d, gen)
    y = x if exclude_self else _points(1, m, d, gen)
    dist, idx = ops.knn(x, y, k, metric, exclude_self)
    rows = torch.arange(0, n, 3)
    D = _dist64(x[:, rows], y, metric)
    if exclude_self:
        D[:, torch.arange(len(rows)), rows] = INF
    rd, ri = torch.sort(D, dim=-1, stable=True)
    assert torch.equal(idx[:, rows], ri[..., :k]), f"{(idx[:, rows] != ri[..., :k]).sum()} indices differ"
    assert_close(dist[:, rows], rd[..., :k], rtol=1e-12, atol=0.0, name="distances")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", [EUCLIDEAN, CHEBYSHEV])
@pytest.mark.parametrize(("n", "m", "d", "k", "exclude_self"), [(90, 90, 3, 17, True), (70, 300, 2, 40, False)])
def test_knn_ties_exact(dtype, metric, n, m, d, k, exclude_self):
    """Dyadic coordinates: distances are computed without rounding, many are equal, and ties must go to the
    smaller index; duplicated points are neighbours at distance 0 (only j == i itself is excluded)."""
    gen = _gen(7 + d)
    x = _with_duplicates(_points(2, n, d, gen, kind="dyadic"), gen, 15)
    y = x if exclude_self else _with_duplicates(_points(2, m, d, gen, kind="dyadic"), gen, 30)
    dist, idx = ops.knn(x.to(dtype), y.to(dtype), k, metric, exclude_self)
    rd, ri = _topk_ref(_dist64(x, y, metric), k, exclude_self)
    assert torch.equal(idx, ri), f"{(idx != ri).sum()} indices differ"
    assert torch.equal(dist, rd.to(dtype))
    if exclude_self:
        assert (idx != torch.arange(n)[None, :, None]).all()
        assert (dist[..., 0] == 0).any(), "duplicates should be neighbours at distance 0"


@pytest.mark.parametrize("metric", [EUCLIDEAN, CHEBYSHEV])
@pytest.mark.parametrize(
    ("b", "n", "m", "d", "k", "exclude_self", "kind"),
    [
        (1, 67, 131, 37, 17, False, "gauss"),
        (3, 100, 100, 5, 3, True, "gauss"),
        (1, 1, 1, 1, 1, False, "gauss"),
        (1, 200, 200, 1, 17, True, "gauss"),
        (1, 40, 40, 7, 39, True, "gauss"),
        (1, 1500, 1500, 16, 5, True, "gauss"),  # many leaves: pruning, and bfloat16 screening where the CPU has it
        (1, 900, 1300, 8, 9, False, "far"),  # a cloud far from the origin
    ],
)
def test_knn_float32(metric, b, n, m, d, k, exclude_self, kind):
    gen = _gen(200 + n + d)
    x = _points(b, n, d, gen, torch.float32, kind)
    y = x if exclude_self else _points(b, m, d, gen, torch.float32, kind)
    if exclude_self and n > 100:
        x = y = _with_duplicates(x, gen, 20)
    dist, idx = ops.knn(x, y, k, metric, exclude_self)
    assert dist.dtype == torch.float32
    if n > 1000:  # check a subset of the queries (the reference is quadratic)
        rows = torch.arange(0, n, 7)
        full_d, full_i = dist, idx
        dist, idx = full_d[:, rows], full_i[:, rows]
        # the reference over all candidates, for the chosen query rows; self is row `rows` in y
        D32 = [_dist_float32(x[:, rows], y, metric, fma) for fma in ((True, False) if metric == EUCLIDEAN else (True,))]
        ok = False
        for D in D32:
            if exclude_self:
                D[:, torch.arange(len(rows)), rows] = INF
            rd, ri = torch.sort(D, dim=-1, stable=True)
            ok |= torch.equal(ri[..., :k], idx) and torch.equal(rd[..., :k], dist)
        assert ok, "float32 results differ from the kernels' arithmetic"
        return
    _check_knn_float32(x, y, k, metric, exclude_self, dist, idx)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", [EUCLIDEAN, CHEBYSHEV])
def test_knn_half_inputs_upcast(dtype, metric):
    gen = _gen(3)
    x = _points(2, 83, 6, gen, dtype)
    y = _points(2, 120, 6, gen, dtype)
    dist, idx = ops.knn(x, y, 4, metric, False)
    assert dist.dtype == torch.float32
    d32, i32 = ops.knn(x.float(), y.float(), 4, metric, False)
    assert torch.equal(dist, d32) and torch.equal(idx, i32)
    _check_knn_float32(x.float(), y.float(), 4, metric, False, dist, idx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_noncontiguous(dtype):
    gen = _gen(11)
    big = torch.randn(3, 2 * 150, 3 * 9, generator=gen, dtype=torch.float64).to(dtype)
    x = big[:, ::2, 1::3]
    y = big.transpose(0, 1)[:217].transpose(0, 1)[:, :, ::3]
    assert not x.is_contiguous() and not y.is_contiguous()
    for metric in (EUCLIDEAN, CHEBYSHEV):
        got = ops.knn(x, y, 6, metric, False)
        want = ops.knn(x.contiguous(), y.contiguous(), 6, metric, False)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        rd, ri = _topk_ref(_dist64(x, y, metric), 6, False)
        assert_close(got[0], rd, rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=0.0, name="distances")
    got = ops.knn(x, x, 5, EUCLIDEAN, True)
    want = ops.knn(x.contiguous(), x.contiguous(), 5, EUCLIDEAN, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_knn_empty():
    x = torch.randn(2, 0, 3)
    y = torch.randn(2, 5, 3)
    for metric in (EUCLIDEAN, CHEBYSHEV):
        dist, idx = ops.knn(x, y, 3, metric, False)
        assert dist.shape == (2, 0, 3) and idx.shape == (2, 0, 3)
        dist, idx = ops.knn(x, x, 2, metric, True)
        assert dist.shape == (2, 0, 2) and idx.dtype == torch.int64
    dist, idx = ops.knn(torch.randn(0, 4, 3), torch.randn(0, 4, 3), 2, EUCLIDEAN, False)
    assert dist.shape == (0, 4, 2)


def test_knn_batch_entries_independent():
    gen = _gen(5)
    x = _points(3, 64, 4, gen)
    dist, idx = ops.knn(x, x, 3, EUCLIDEAN, True)
    for b in range(3):
        d1, i1 = ops.knn(x[b : b + 1], x[b : b + 1], 3, EUCLIDEAN, True)
        assert torch.equal(d1[0], dist[b]) and torch.equal(i1[0], idx[b])
    assert (idx < 64).all() and (idx >= 0).all()


def test_knn_errors():
    x = torch.randn(1, 10, 3)
    with pytest.raises(ValueError, match="x must be 3-D"):
        ops.knn(x[0], x[0], 1, 0, False)
    with pytest.raises(ValueError, match="y must be"):
        ops.knn(x, torch.randn(1, 10, 4), 1, 0, False)
    with pytest.raises(ValueError, match="y must be"):
        ops.knn(x, torch.randn(2, 10, 3), 1, 0, False)
    with pytest.raises(TypeError, match="x and y must share a dtype"):
        ops.knn(x, x.double(), 1, 0, False)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.knn(x.long(), x.long(), 1, 0, False)
    with pytest.raises(ValueError, match="metric"):
        ops.knn(x, x, 1, 2, False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ops.knn(x, x, 0, 0, False)
    with pytest.raises(ValueError, match="k must be <="):
        ops.knn(x, x, 11, 0, False)
    with pytest.raises(ValueError, match="k must be <="):
        ops.knn(x, x, 10, 0, True)
    with pytest.raises(ValueError, match="exclude_self"):
        ops.knn(x, torch.randn(1, 12, 3), 1, 0, True)
    bad = x.clone()
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="x must be finite"):
        ops.knn(bad, x, 1, 0, False)


def test_knn_opcheck_schema():
    x = torch.randn(2, 20, 3)
    torch.library.opcheck(ops.knn.default, (x, x, 3, 0, True), test_utils="test_schema")
    torch.library.opcheck(ops.knn_count.default, (x, torch.rand(2, 20), 1, True), test_utils="test_schema")


# ---------------------------------------------------------------------------------------------------------------
# knn_count


def _radii_with_ties(D: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per row, the distance to a random other point (an exact tie with at least that point), and a few special
    radii: 0 (duplicates only, for <=), +inf, a negative value, NaN."""
    b, n, _ = D.shape
    j = (torch.arange(n) + torch.randint(1, n, (b, n), generator=gen)) % n
    r = torch.gather(D, -1, j[..., None])[..., 0].clone()
    r[:, 0] = 0.0
    if n > 4:
        r[:, 1] = INF
        r[:, 2] = -1.0
        r[:, 3] = float("nan")
    return r


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("metric", [EUCLIDEAN, CHEBYSHEV])
@pytest.mark.parametrize(("n", "d"), [(301, 1), (2000, 1), (260, 5), (1300, 5)])
def test_knn_count_float32(strict, metric, n, d):
    gen = _gen(300 + n + d)
    x = _with_duplicates(_points(2, n, d, gen, torch.float32), gen, n // 10)
    D = _dist_float32(x, x, metric)
    r = _radii_with_ties(D, gen)
    counts = ops.knn_count(x, r, metric, strict)
    assert counts.dtype == torch.int64 and counts.shape == (2, n)
    want = _count_ref(D, r, strict)
    if metric == EUCLIDEAN and not torch.equal(counts, want):  # a target without FMA rounds differently
        want = _count_ref(_dist_float32(x, x, metric, fma=False), r, strict)
    assert torch.equal(counts, want), f"{(counts != want).sum()} counts differ"


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("metric", [EUCLIDEAN, CHEBYSHEV])
@pytest.mark.parametrize(("n", "d", "kind"), [(500, 1, "gauss"), (400, 5, "dyadic"), (1500, 5, "dyadic")])
def test_knn_count_float64(strict, metric, n, d, kind):
    """float64: Gaussian 1-D data (a 1-D distance is one rounding, reproduced by PyTorch) and dyadic 5-D data
    (no rounding at all), with duplicates and radii at pairwise distances."""
    gen = _gen(400 + n + d)
    x = _with_duplicates(_points(2, n, d, gen, torch.float64, kind), gen, n // 10)
    D = _dist64(x, x, metric)
    r = _radii_with_ties(D, gen)
    counts = ops.knn_count(x, r, metric, strict)
    want = _count_ref(D, r, strict)
    assert torch.equal(counts, want), f"{(counts != want).sum()} counts differ"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("metric", [EUCLIDEAN, CHEBYSHEV])
def test_knn_count_shared_radius_clusters(dtype, strict, metric):
    """Tight clusters far apart and one radius for all rows, equal to pairwise distances: whole subtrees of the
    tree fall inside every query's radius (counted without a scan) or outside (skipped)."""
    gen = _gen(21)
    n, d = 1600, 3
    centers = 8.0 * torch.randint(-3, 4, (1, 12, d), generator=gen).double()
    x = centers[:, torch.randint(0, 12, (n,), generator=gen)] + _points(1, n, d, gen, kind="dyadic") / 2
    x = _with_duplicates(x, gen, 50).to(dtype)
    D = _dist_float32(x, x, metric) if dtype == torch.float32 else _dist64(x, x, metric)
    r = D[:, 0, 1:].median(-1, keepdim=True).values.expand(1, n).contiguous()  # a pairwise distance of row 0
    r[:, 5] = INF
    counts = ops.knn_count(x, r, metric, strict)
    want = _count_ref(D, r, strict)
    if dtype == torch.float32 and metric == EUCLIDEAN and not torch.equal(counts, want):
        want = _count_ref(_dist_float32(x, x, metric, fma=False), r, strict)
    assert torch.equal(counts, want), f"{(counts != want).sum()} counts differ"
    assert counts[0, 5] == n - 1


@pytest.mark.parametrize("metric", [EUCLIDEAN, CHEBYSHEV])
@pytest.mark.parametrize("d", [1, 4])
def test_knn_count_at_knn_radius(metric, d):
    """The KSG pattern: radii are the k-th neighbour distances returned by knn, on the same points. Counting with
    <= finds at least k points, with < at most k − 1 (exactly, where the k-th distance is not tied)."""
    gen = _gen(17 + d)
    k = 4
    x = _points(1, 2500, d, gen, torch.float32)
    dist, _ = ops.knn(x, x, k + 1, metric, True)
    r = dist[..., k - 1].contiguous()
    le = ops.knn_count(x, r, metric, False)
    lt = ops.knn_count(x, r, metric, True)
    assert (le >= k).all() and (lt <= k - 1).all()
    untied = (dist[..., k] > dist[..., k - 1]) & (dist[..., k - 2] < dist[..., k - 1])
    assert (le[untied] == k).all() and (lt[untied] == k - 1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_knn_count_half_inputs(dtype):
    gen = _gen(9)
    x = _points(1, 150, 3, gen, dtype)
    D = _dist_float32(x.float(), x.float(), CHEBYSHEV)
    r = _radii_with_ties(D, gen)
    assert torch.equal(ops.knn_count(x, r, CHEBYSHEV, True), _count_ref(D, r, True))


def test_knn_count_noncontiguous_and_empty():
    gen = _gen(13)
    big = torch.randn(2, 400, 6, generator=gen)
    x = big[:, ::2, ::2]
    r = torch.rand(2, 400, generator=gen)[:, ::2]
    assert not x.is_contiguous() and not r.is_contiguous()
    for metric in (EUCLIDEAN, CHEBYSHEV):
        got = ops.knn_count(x, r, metric, True)
        assert torch.equal(got, ops.knn_count(x.contiguous(), r.contiguous(), metric, True))
    assert torch.equal(got, _count_ref(_dist_float32(x, x, CHEBYSHEV), r, True))
    out = ops.knn_count(torch.randn(2, 0, 3), torch.rand(2, 0), 1, True)
    assert out.shape == (2, 0) and out.dtype == torch.int64
    assert torch.equal(ops.knn_count(torch.randn(1, 1, 3), torch.ones(1, 1), 0, False), torch.zeros(1, 1).long())


def test_knn_count_errors():
    x = torch.randn(1, 10, 3)
    r = torch.rand(1, 10)
    with pytest.raises(ValueError, match="x must be 3-D"):
        ops.knn_count(x[0], r, 0, True)
    with pytest.raises(ValueError, match="radius must be"):
        ops.knn_count(x, r[0], 0, True)
    with pytest.raises(ValueError, match="radius must be"):
        ops.knn_count(x, torch.rand(1, 9), 0, True)
    with pytest.raises(TypeError, match="radius must be"):
        ops.knn_count(x, r.double(), 0, True)
    with pytest.raises(TypeError, match="radius must be"):
        ops.knn_count(x.double(), r, 0, True)
    with pytest.raises(ValueError, match="metric"):
        ops.knn_count(x, r, -1, True)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.knn_count(x.int(), r, 0, True)


def test_exactness_sanity_of_reference():
    """The float32 emulation of fma agrees with direct float32 arithmetic where no rounding can differ."""
    a = torch.tensor([1.5, 3.0, -2.25])
    assert torch.equal(_fma32(a, a, torch.tensor([0.5, 1.0, 2.0])), a * a + torch.tensor([0.5, 1.0, 2.0]))
    # (1 + 2^-23) + (2^-24 − 2^-70): float64 rounds the sum to the float32 midpoint 1 + 3·2^-24 (whose even
    # neighbour is 1 + 2^-22), but the exact sum lies below it: one rounding gives 1 + 2^-23
    a = torch.tensor([2.0**-12 * (1 + 2.0**-23)])
    b = torch.tensor([2.0**-12 * (1 - 2.0**-23)])
    c = torch.tensor([1 + 2.0**-23])
    assert (a.double() * b.double() + c.double()).float().item() == 1 + 2.0**-22  # double rounding
    assert _fma32(a, b, c).item() == 1 + 2.0**-23
    assert _fma32(torch.tensor([2.0**-12]), torch.tensor([2.0**-12]), torch.tensor([1.0])).item() == 1.0
