"""k nearest neighbours and the k-NN estimators: every backend against brute force and against ground truth."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import infofuse
from infofuse import knn, knn_entropy, knn_kl_divergence, koleo_loss, ksg_mutual_information
from infofuse.reference import knn_reference
from tests.utils import assert_close, extra_cuda_bytes, to_cuda

IMPLS = ["cpu", "triton"]  # Triton under TRITON_INTERPRET=1 here (tests/conftest.py)
METRICS = ["euclidean", "chebyshev", "cosine"]


def _needs(impl):
    if impl == "cpu" and not hasattr(torch.ops.infofuse, "knn"):
        pytest.fail("the C++ extension does not provide infofuse::knn")


def points(shape, dtype=torch.float64, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64).to(dtype)[..., ::2]
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def check_neighbours(x, y, k, metric, dist, idx):
    """Honest comparison with brute force in float64 on the same values: the returned distances are the exact
    distances of the returned indices, the indices are distinct valid candidates, and the j-th returned distance
    equals the true j-th smallest distance (to the input dtype's rounding). Where the true distances are distinct
    beyond that rounding, the indices must be the true ones."""
    candidates = (x if y is None else y).shape[-2] - (1 if y is None else 0)
    ahead = min(k + 1, candidates)  # one neighbour past the k-th, to see a near-tie at the boundary
    want_d, want_i = knn_reference(x.double(), None if y is None else y.double(), ahead, metric=metric)
    after = want_d[..., k:] if ahead > k else torch.full_like(want_d[..., :1], float("inf"))
    want_d, want_i = want_d[..., :k], want_i[..., :k]
    x64 = x.double()
    y64 = x64 if y is None else y.double()
    assert dist.shape == want_d.shape and idx.shape == want_i.shape
    assert idx.dtype == torch.int64
    assert dist.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    exact = x.dtype == torch.float64
    rtol = 1e-12 if exact else 2e-6
    flat_y = y64 if y64.dim() == 3 else y64[None]
    flat_x = x64 if x64.dim() == 3 else x64[None]
    flat_i = idx if idx.dim() == 3 else idx[None]
    nb = torch.gather(flat_y, 1, flat_i.reshape(flat_i.shape[0], -1, 1).expand(-1, -1, flat_y.shape[-1]))
    nb = nb.reshape(*flat_i.shape, flat_y.shape[-1])
    own = knn_reference(
        flat_x[:, :, None, :].reshape(-1, 1, flat_x.shape[-1]), nb.reshape(-1, k, flat_y.shape[-1]), k, metric=metric
    )[0]
    own = torch.sort(own.reshape(-1, k), dim=-1).values
    got_d = dist.reshape(-1, k).double()
    assert_close(got_d, torch.sort(got_d, dim=-1).values, rtol=0, atol=0, name="ascending")
    assert_close(got_d, own, rtol=rtol, atol=rtol, name="distances of the returned indices")
    assert_close(got_d, want_d.reshape(-1, k), rtol=rtol, atol=rtol, name="j-th distances")
    if y is None:
        rows = torch.arange(x.shape[-2], device=idx.device).expand(*idx.shape[:-1])
        assert not (idx == rows[..., None]).any(), "a point is its own neighbour"
    assert (torch.sort(idx, dim=-1).values.diff(dim=-1) != 0).all(), "repeated neighbour"
    gap = torch.cat([want_d, after], -1).diff(dim=-1)
    before = torch.cat([torch.full_like(want_d[..., :1], float("inf")), gap[..., :-1]], -1)
    clear = (gap.abs() > 1e-6 * want_d.abs().clamp(min=1e-3)) & (before.abs() > 1e-6 * want_d.abs().clamp(min=1e-3))
    if exact:
        assert torch.equal(idx, want_i), "indices differ from brute force (ties go to the smaller index)"
    else:
        assert torch.equal(idx[clear], want_i[clear]), "indices differ where the distances are clearly apart"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 3, 17])
def test_knn_self_matches_brute_force(impl, metric, k):
    _needs(impl)
    x = points((67, 37), seed=k)
    dist, idx = knn(x, k=k, metric=metric, impl=impl)
    check_neighbours(x, None, k, metric, dist, idx)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["euclidean", "chebyshev"])
def test_knn_low_precision_and_queries(impl, dtype, metric):
    _needs(impl)
    x, y = points((67, 37), dtype, seed=2), points((131, 37), dtype, seed=3)
    dist, idx = knn(x, y, k=3, metric=metric, impl=impl)
    check_neighbours(
        x.float() if dtype != torch.float32 else x, y.float() if dtype != torch.float32 else y, 3, metric, dist, idx
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_knn_batched_noncontiguous_and_edge_shapes(impl):
    _needs(impl)
    x = points((3, 29, 5), seed=4, noncontig=True)
    assert not x.is_contiguous()
    dist, idx = knn(x, k=4, metric="chebyshev", impl=impl)
    check_neighbours(x, None, 4, "chebyshev", dist, idx)
    one = points((2, 1), seed=5)
    dist, idx = knn(one, k=1, impl=impl)  # two points, d = 1: each is the other's neighbour
    assert idx.tolist() == [[1], [0]] and dist[0, 0] == dist[1, 0] == (one[0] - one[1]).abs()
    dist, idx = knn(points((0, 3)), points((5, 3)), k=2, impl=impl)
    assert dist.shape == idx.shape == (0, 2)
    x = points((40, 1), seed=6)
    dist, idx = knn(x, k=39, impl=impl)  # every other point
    check_neighbours(x, None, 39, "euclidean", dist, idx)


@pytest.mark.parametrize("impl", IMPLS)
def test_knn_duplicates_are_neighbours_at_zero_and_ties_go_to_the_smaller_index(impl):
    _needs(impl)
    base = points((10, 3), seed=7)
    x = torch.cat([base, base, base[:4]])  # points i, i + 10 (and i + 20) coincide
    dist, idx = knn(x, k=2, impl=impl)
    check_neighbours(x, None, 2, "euclidean", dist, idx)
    assert idx[0].tolist() == [10, 20] and dist[0].tolist() == [0.0, 0.0]
    assert idx[10].tolist() == [0, 20]


# ---------------------------------------------------------------- estimators against ground truth


def _gaussian(n, cov, seed):
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))
    return torch.randn(n, chol.shape[0], generator=g, dtype=torch.float64) @ chol.T


def _kl_entropy_scipy(x: torch.Tensor, k: int, metric: str) -> float:
    """The Kozachenko–Leonenko formula of MATH.md on scipy's cKDTree neighbours: an independent implementation."""
    from scipy.spatial import cKDTree
    from scipy.special import digamma

    n, d = x.shape
    p = math.inf if metric == "chebyshev" else 2
    dist, _ = cKDTree(x.numpy()).query(x.numpy(), k=k + 1, p=p)  # column 0: the point itself (no duplicates)
    log_ball = d * math.log(2) if metric == "chebyshev" else d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)
    return float(digamma(n) - digamma(k) + log_ball + d * torch.from_numpy(dist[:, k]).log().mean())


@pytest.mark.parametrize("impl", ["cpu"])  # Triton: test_triton_estimators_equal_the_reference
@pytest.mark.parametrize("metric", ["euclidean", "chebyshev"])
@pytest.mark.parametrize("d", [1, 2, 8])
def test_knn_entropy_of_gaussians(impl, metric, d):
    """H(N(0, Σ)) = ½ log((2πe)^d det Σ), Σ with correlations 0.5 (d > 1). The estimate equals the same formula on
    scipy's neighbours, and lies within 4 of its standard errors (d·sd(log ε)/√N, from the sample) of the truth plus
    the estimator's own small-sample bias: under 0.02 nats at d ≤ 2; at d = 8, N = 20000, k = 3 it measured
    -0.05 to -0.08 nats over seeds (both metrics; 0.014 standard deviation), allowed 0.1."""
    _needs(impl)
    n = 20000 if d == 8 else 3000
    cov = torch.eye(d, dtype=torch.float64) * 0.5 + 0.5
    if d == 1:
        cov = torch.tensor([[2.0]], dtype=torch.float64)
    x = _gaussian(n, cov, seed=10 + d)
    truth = 0.5 * math.log((2 * math.pi * math.e) ** d * torch.linalg.det(cov).item())
    got = knn_entropy(x, k=3, metric=metric, impl=impl).item()
    assert abs(got - _kl_entropy_scipy(x, 3, metric)) < 1e-10, "the estimate differs from the formula on scipy's"
    if n <= 3000:
        ref = knn_entropy(x, k=3, metric=metric, impl="reference").item()
        assert abs(got - ref) < 1e-12, "the estimate differs from the same formula on brute-force neighbours"
    eps = knn(x, k=3, metric=metric, impl=impl)[0][:, 2]
    se = d * eps.log().std().item() / math.sqrt(n)
    assert abs(got - truth) < 4 * se + (0.1 if d == 8 else 0.02), (got, truth, se)


@pytest.mark.parametrize("impl", ["cpu"])  # Triton: test_triton_estimators_equal_the_reference
def test_knn_entropy_uniform_box_and_base(impl):
    _needs(impl)
    g = torch.Generator().manual_seed(12)
    sides = torch.tensor([0.5, 3.0], dtype=torch.float64)
    x = torch.rand(4000, 2, generator=g, dtype=torch.float64) * sides
    truth = float(torch.log(sides).sum())
    got = knn_entropy(x, k=4, impl=impl)
    assert abs(got.item() - truth) < 0.1, (got.item(), truth)  # boundary effects bias it slightly at N = 4000
    assert_close(knn_entropy(x, k=4, impl=impl, base=2), got / math.log(2), rtol=1e-12, atol=0, name="bits")


@pytest.mark.parametrize("impl", ["cpu"])  # Triton: test_triton_estimators_equal_the_reference
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("variant", [1, 2])
def test_ksg_mutual_information_of_correlated_gaussians(impl, rho, variant):
    _needs(impl)
    n = 2000
    z = _gaussian(n, [[1.0, rho], [rho, 1.0]], seed=20 + int(10 * rho))
    truth = -0.5 * math.log(1 - rho * rho)
    got = ksg_mutual_information(z[:, 0], z[:, 1], k=3, variant=variant, impl=impl).item()
    ref = ksg_mutual_information(z[:, :1], z[:, 1:], k=3, variant=variant, impl="reference").item()
    assert abs(got - ref) < 1e-12, "counts differ from brute force"
    assert abs(got - truth) < 0.05, (got, truth)


def test_ksg_agrees_with_scikit_learn_and_ennemi():
    """Noise-free samples: scikit-learn's KSG-1 (its private _compute_mi_cc, without the noise its public API
    adds) and ennemi's estimate_mi(preprocess=False) compute the same quantity."""
    sk = pytest.importorskip("sklearn.feature_selection._mutual_info")
    ennemi = pytest.importorskip("ennemi")
    z = _gaussian(1500, [[1.0, 0.7], [0.7, 1.0]], seed=30)
    ours = ksg_mutual_information(z[:, 0], z[:, 1], k=3, variant=1).item()
    want_sk = sk._compute_mi_cc(z[:, 0].numpy(), z[:, 1].numpy(), 3)
    want_en = float(ennemi.estimate_mi(z[:, 1].numpy(), z[:, 0].numpy(), k=3, preprocess=False).squeeze())
    assert abs(ours - want_sk) < 1e-9, (ours, want_sk)
    assert abs(ours - want_en) < 1e-5 * abs(want_en), (ours, want_en)  # ennemi: 5e-7 apart (its own rounding)


def test_ksg_agrees_with_scikit_learns_mutual_info_regression():
    """scikit-learn's public mutual_info_regression divides each variable by its standard deviation (KSG's max-norm
    is not scale-free) and adds noise of 1e-10 of the mean magnitude to break ties; on continuous samples that noise
    moves no count, so KSG-1 of the scaled samples is its answer (it clips negative estimates at 0)."""
    feature_selection = pytest.importorskip("sklearn.feature_selection")
    for rho, seed in ((0.0, 32), (0.3, 33), (0.8, 34)):
        z = _gaussian(2000, [[1.0, rho], [rho, 2.0]], seed=seed)
        z = z / z.std(dim=0, correction=0)
        ours = ksg_mutual_information(z[:, 0], z[:, 1], k=4, variant=1).item()
        want = feature_selection.mutual_info_regression(
            z[:, :1].numpy(), z[:, 1].numpy(), n_neighbors=4, random_state=seed
        )[0]
        assert abs(max(ours, 0.0) - want) < 1e-9, (rho, ours, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_ksg_multivariate_marginals_and_batches(impl):
    _needs(impl)
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, 150, 3, generator=g, dtype=torch.float64)
    y = x[..., :2] + 0.5 * torch.randn(2, 150, 2, generator=g, dtype=torch.float64)
    got = ksg_mutual_information(x, y, k=5, variant=2, impl=impl)
    want = torch.stack([ksg_mutual_information(x[b], y[b], k=5, variant=2, impl="reference") for b in range(2)])
    assert_close(got, want, rtol=1e-12, atol=1e-12, name="batched KSG-2")


@pytest.mark.parametrize("impl", ["cpu"])  # Triton: test_triton_estimators_equal_the_reference
def test_knn_kl_divergence_of_gaussians(impl):
    _needs(impl)
    p = _gaussian(3000, torch.eye(2), seed=40)
    q = _gaussian(4000, torch.eye(2), seed=41) + torch.tensor([0.5, -0.5], dtype=torch.float64)
    truth = 0.5 * (0.25 + 0.25)
    got = knn_kl_divergence(p, q, k=3, impl=impl).item()
    ref = knn_kl_divergence(p, q, k=3, impl="reference").item()
    assert abs(got - ref) < 1e-12
    assert abs(got - truth) < 0.08, (got, truth)


def test_triton_estimators_equal_the_reference():
    """The Triton search and counting kernels (interpreter: small samples) give exactly the reference's
    estimates; the estimates' accuracy is tested above on the C++ backend with the same formulas."""
    z = _gaussian(150, [[1.0, 0.6], [0.6, 1.0]], seed=60)
    for metric in ("euclidean", "chebyshev"):
        got = knn_entropy(z, k=3, metric=metric, impl="triton")
        assert_close(got, knn_entropy(z, k=3, metric=metric, impl="reference"), rtol=1e-12, atol=0, name=metric)
    for variant in (1, 2):
        got = ksg_mutual_information(z[:, 0], z[:, 1], k=3, variant=variant, impl="triton")
        want = ksg_mutual_information(z[:, 0], z[:, 1], k=3, variant=variant, impl="reference")
        assert_close(got, want, rtol=1e-12, atol=0, name=f"KSG-{variant}")
    q = _gaussian(120, torch.eye(2), seed=61) + 0.3
    got = knn_kl_divergence(z, q, k=2, impl="triton")
    assert_close(got, knn_kl_divergence(z, q, k=2, impl="reference"), rtol=1e-12, atol=0, name="KL")


# ---------------------------------------------------------------- gradients and the duplicate policy


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_and_koleo_gradients_match_reference(impl):
    _needs(impl)
    x = points((60, 6), seed=50)
    for fn in (
        lambda v, i: knn_entropy(v, k=3, impl=i),
        lambda v, i: koleo_loss(v, impl=i),
        lambda v, i: knn_entropy(v, k=2, metric="chebyshev", impl=i),
    ):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        fn(a, impl).backward()
        fn(b, "reference").backward()
        assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, name="gradient")
        assert a.grad.abs().sum() > 0


def test_gradcheck_float64():
    x = points((30, 3), seed=51).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: knn_entropy(v, k=2, impl="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda v: koleo_loss(v, impl="cpu"), (x,))
    q = points((25, 3), seed=52).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: knn_kl_divergence(a, b, k=2, impl="cpu"), (x, q))


def test_duplicates_are_floored_with_a_warning_never_inf():
    x = points((50, 2), seed=53)
    x[10:20] = x[0]  # eleven identical points: their 3rd neighbour is at distance 0
    with pytest.warns(RuntimeWarning, match=r"11 point\(s\) have their 3-th neighbour at distance 0"):
        h = knn_entropy(x, k=3)
    assert torch.isfinite(h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(koleo_loss(x))  # log(0 + eps), no warning needed
    with pytest.warns(RuntimeWarning, match="KSG assumes continuous data"):
        assert torch.isfinite(ksg_mutual_information(x[:, 0], x[:, 1], k=3))


def test_koleo_matches_dinov2_formula():
    x = points((40, 8), seed=54)
    xn = torch.nn.functional.normalize(x, dim=-1)
    sim = xn @ xn.T
    sim.fill_diagonal_(-2.0)
    nn_idx = sim.argmax(1)
    want = -torch.log(torch.linalg.vector_norm(xn - xn[nn_idx], dim=-1) + 1e-8).mean()
    assert_close(koleo_loss(x), want, rtol=1e-10, atol=0, name="koleo")


# ---------------------------------------------------------------- bad input


def test_bad_input_is_reported():
    x = points((20, 3), torch.float32)

    def bad(exc, match, fn):
        with pytest.raises(exc, match=match):
            fn()

    bad(ValueError, "k must be >= 1", lambda: knn(x, k=0))
    bad(ValueError, r"k = 20 exceeds the 19 candidate", lambda: knn(x, k=20))
    bad(ValueError, r"k = 6 exceeds the 5 candidate", lambda: knn(x, points((5, 3), torch.float32), k=6))
    bad(TypeError, "k must be an int", lambda: knn(x, k=2.0))
    bad(ValueError, r"x must be \(N, d\) or batched", lambda: knn(x[0]))
    bad(ValueError, "y must have x's dimension d = 3", lambda: knn(x, points((5, 4), torch.float32)))
    bad(ValueError, "metric must be", lambda: knn(x, metric="manhattan"))
    bad(
        ValueError, "metric must be 'euclidean' or 'chebyshev' for knn_entropy", lambda: knn_entropy(x, metric="cosine")
    )
    bad(TypeError, "must be float32", lambda: knn(x.int()))
    bad(ValueError, "on x's device", lambda: knn(x, x.to("meta")))
    bad(ValueError, "x and y must pair up", lambda: ksg_mutual_information(x, x[:10]))
    bad(ValueError, "variant must be 1 or 2", lambda: ksg_mutual_information(x, x, variant=3))
    bad(ValueError, "impl must be", lambda: knn(x, impl="faiss"))
    nan = x.clone()
    nan[3, 1] = float("nan")
    bad(ValueError, "1 non-finite values", lambda: knn_entropy(nan))
    bad(ValueError, "eps must be a float > 0", lambda: koleo_loss(x, eps=0.0))
    bad(ValueError, "base must be", lambda: knn_entropy(x, base=1))
    assert infofuse.knn(x, k=1)[0].shape == (20, 1)


@pytest.mark.parametrize("failing", [("tf32",), ("tf32", "tf32x3")])
def test_triton_uncertified_queries_are_searched_again_exactly(monkeypatch, failing):
    """A query whose TF32 screening is not certified is screened again in 3×TF32, and one still not certified goes
    to the direct kernel: with an infinite bound for the failing tiers every query takes that path, and the answer
    is still brute force's (self excluded by index, duplicates, batches, queries vs points)."""
    import infofuse.triton_kernels.knn as tk
    from infofuse._ops.knn import last_search_tiers

    real = tk.screen_error_bound

    def bound(nx, ny, d, precision):
        return torch.full_like(nx, float("inf")) if precision in failing else real(nx, ny, d, precision)

    monkeypatch.setattr(tk, "screen_error_bound", bound)
    x, y = points((67, 37), torch.float32, seed=20), points((131, 37), torch.float32, seed=21)
    direct = 67 if "tf32x3" in failing else 0
    for k in (1, 5):
        check_neighbours(x, None, k, "euclidean", *knn(x, k=k, impl="triton"))
        assert last_search_tiers == {"queries": 67, "probe": 0, "first": "tf32", "tf32x3": 67, "direct": direct}
        check_neighbours(x, y, k, "euclidean", *knn(x, y, k=k, impl="triton"))
        assert last_search_tiers == {"queries": 67, "probe": 0, "first": "tf32", "tf32x3": 67, "direct": direct}
    base = points((2, 10, 3), torch.float32, seed=22)
    xb = torch.cat([base, base, base[:, :4]], dim=1)  # points i, i + 10 (and i + 20) coincide
    dist, idx = knn(xb, k=3, impl="triton")
    check_neighbours(xb, None, 3, "euclidean", dist, idx)
    assert idx[0, 0].tolist() == [10, 20, idx[0, 0, 2].item()] and dist[0, 0, :2].tolist() == [0.0, 0.0]
    assert last_search_tiers["tf32x3"] == 48


def test_triton_probe_starts_uncertifiable_data_in_tf32x3(monkeypatch):
    """A large search first screens random queries in TF32 (large here by lowered thresholds): where TF32 certifies
    too few of them (points far from the origin, not centred), every query starts in 3×TF32, and those 3×TF32 does
    not certify go straight to the direct kernel; near the origin the search starts in TF32. The answer is brute
    force's either way (self excluded by index, batches, queries against other points). A small search is not
    probed."""
    import infofuse._ops.knn as ops
    import infofuse.triton_kernels.knn as tk
    from infofuse._ops.knn import last_search_tiers

    x = points((2, 80, 12), torch.float32, seed=26)
    check_neighbours(x, None, 3, "euclidean", *knn(x, k=3, impl="triton"))
    assert last_search_tiers["probe"] == 0 and last_search_tiers["first"] == "tf32"
    monkeypatch.setattr(ops, "PROBE_QUERIES", 5)  # 80 queries: 16 probes' worth
    monkeypatch.setattr(ops, "PROBE_MIN_PAIRS", 0)
    check_neighbours(x, None, 3, "euclidean", *knn(x, k=3, impl="triton"))
    assert last_search_tiers["probe"] == 10 and last_search_tiers["first"] == "tf32", dict(last_search_tiers)
    monkeypatch.setattr(tk, "CENTRE_GAIN", 0.0)  # never centre: the TF32 bound then certifies none far out
    far, y = x + 40.0, points((2, 90, 12), torch.float32, seed=27) + 40.0
    for other in (None, y):
        check_neighbours(far, other, 3, "euclidean", *knn(far, other, k=3, impl="triton"))
        assert last_search_tiers["probe"] == 10 and last_search_tiers["first"] == "tf32x3"
        assert last_search_tiers["tf32x3"] == 160, dict(last_search_tiers)
    real = tk.screen_error_bound
    monkeypatch.setattr(tk, "screen_error_bound", lambda nx, ny, d, precision: real(nx, ny, d, precision) * 1e9)
    check_neighbours(far, None, 3, "euclidean", *knn(far, k=3, impl="triton"))
    assert last_search_tiers == {"queries": 160, "probe": 10, "first": "tf32x3", "tf32x3": 160, "direct": 160}


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
@pytest.mark.parametrize("offset", [1.0, 40.0])
def test_triton_screening_bound_covers_its_error(precision, offset):
    """The screened squared distances the kernel keeps are within screen_error_bound of the exact ones, centred
    (a large common offset) or not."""
    from infofuse.triton_kernels.knn import knn_candidates, screen_centre

    x = points((1, 67, 37), torch.float32, seed=23) * 3 + offset
    assert (screen_centre(x)[0] is not None) == (offset > 10)
    screened, idx, bound = knn_candidates(x, x, 5, 0, True, precision=precision)
    exact = torch.cdist(x.double(), x.double()).square().gather(-1, idx.clamp(min=0))
    assert (idx >= 0).all() and bound.shape == (1, 67)
    assert ((screened.double() - exact).abs() <= bound[..., None]).all()


@pytest.mark.parametrize(
    "shape, k, offset",
    [
        ((203, 37), 1, 0.0),
        ((203, 37), 3, 0.0),
        ((203, 37), 3, 30.0),
        ((2, 70, 20), 17, 0.0),
        ((5, 3), 3, 0.0),
        ((1, 150, 130), 5, 0.0),
    ],
)
@pytest.mark.parametrize("prefetch", [True, False])
def test_triton_screening_keeps_the_nearest_candidates(shape, k, offset, prefetch, monkeypatch):
    """The screening kernel itself, x against itself: many query blocks and candidate tiles (a partial last one,
    diagonal tiles at every alignment, rows past N in the last block), fewer candidates than slots, batches,
    centred data, d above one feature block; with and without the candidate tile loaded a tile ahead (PREFETCH,
    one of the GPU's autotuned choices). The kept candidates as ``check_screened`` wants them: the screening may
    swap candidates closer than twice the bound, no more."""
    import infofuse.triton_kernels.knn as tk
    from infofuse.triton_kernels.knn import knn_candidates, screen_centre

    monkeypatch.setitem(tk.INTERPRETER_META, "PREFETCH", prefetch)
    x = points(shape, torch.float32, seed=sum(shape) + k) + offset
    x = x if x.dim() == 3 else x[None]
    assert (screen_centre(x)[0] is not None) == (offset > 0)
    check_screened(x, k, *knn_candidates(x, x, k, 0, True))


@pytest.mark.parametrize("shape, k", [((1, 301, 37), 3), ((1, 150, 130), 10)])
def test_triton_screening_in_every_gpu_configuration(shape, k):
    """The GPU's screening configurations (their block shapes and PREFETCH; the interpreter has no warps) keep what
    check_screened wants: several tiles with a partial last one, rows past N, one and several feature blocks."""
    import infofuse.triton_kernels.knn as tk

    x = points(shape, torch.float32, seed=shape[1] + k)
    kp = tk.screen_slots(k)
    for config in [*tk.screen_configs(kp), tk._SCREEN_LARGE_KP]:
        check_screened(x, k, *tk.knn_candidates(x, x, k, 0, True, config=config))


def check_screened(x, k, screened, idx, bound):
    """The screening's kept candidates of x (B, N, d) against itself: distinct, never the query, screened values
    within the bound of the exact squared distances, the KP nearest of brute force up to twice the bound; empty
    slots (fewer candidates than KP) negative and +inf."""
    b, n, _ = x.shape
    screened, order = screened.sort(-1)
    idx = idx.gather(-1, order)
    kp = idx.shape[-1]
    assert kp >= k + 4 and bound.shape == (b, n)
    d2 = torch.cdist(x.double(), x.double()).square()
    d2.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    kept = min(kp, n - 1)
    assert (idx[..., :kept] >= 0).all() and (idx[..., kept:] < 0).all(), "kept slots"
    assert torch.isinf(screened[..., kept:]).all()
    ids, scr = idx[..., :kept], screened[..., :kept].double()
    assert not (ids == torch.arange(n, device=x.device)[None, :, None]).any(), "a point is its own candidate"
    assert (ids.sort(-1).values.diff(dim=-1) != 0).all(), "repeated candidate"
    exact = d2.gather(-1, ids)
    assert ((scr - exact).abs() <= bound[..., None]).all(), "screened value outside the bound"
    want = d2.sort(-1).values[..., :kept]
    off = (exact.sort(-1).values - want).abs()
    assert (off <= 2 * bound[..., None]).all(), f"kept candidates not the nearest (off by up to {off.max()})"


def test_screen_autotuning_prunes_prefetch_without_one_feature_block():
    """PREFETCH only changes the one-feature-block loop: without ONE_D the autotuner tries each block shape once."""
    import infofuse.triton_kernels.knn as tk

    configs = tk.screen_configs(16)
    assert {c.kwargs["PREFETCH"] for c in configs} == {True, False}
    assert tk._prune_screen_configs(configs, {}, ONE_D=True, BLOCK_D=128) == configs
    pruned = tk._prune_screen_configs(configs, {}, ONE_D=False, BLOCK_D=64)
    assert not any(c.kwargs["PREFETCH"] for c in pruned)

    def shape(c):
        return c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_C"], c.num_warps

    assert sorted(map(shape, pruned)) == sorted(set(map(shape, configs)))


def test_triton_centring_certifies_points_far_from_the_origin(monkeypatch):
    """Points with a common offset 40 times their spread: screened relative to their mean, every query is certified
    by the first tier; screened as they are, the bound (which grows with the norms) certifies none."""
    import infofuse.triton_kernels.knn as tk
    from infofuse._ops.knn import last_search_tiers

    x = points((2, 70, 24), torch.float32, seed=24) + 40.0
    check_neighbours(x, None, 4, "euclidean", *knn(x, k=4, impl="triton"))
    assert last_search_tiers == {"queries": 140, "probe": 0, "first": "tf32", "tf32x3": 0, "direct": 0}
    monkeypatch.setattr(tk, "CENTRE_GAIN", 0.0)  # never centre
    check_neighbours(x, None, 4, "euclidean", *knn(x, k=4, impl="triton"))
    assert last_search_tiers["tf32x3"] == 140


def test_screen_norms_by_chunks(monkeypatch):
    """The float64 norms and the centre are summed by row chunks: the same values as in one piece."""
    import infofuse.triton_kernels.knn as tk

    y = points((2, 300, 7), torch.float32, seed=25, noncontig=True) + 5.0
    mu = y.double().mean(1)
    want = (y.double() - mu.float().double()[:, None]).square().sum(-1)
    monkeypatch.setattr(tk, "_NORM_BYTES", 2 * 7 * 8 * 16)  # 16 rows a chunk
    got_mu, got = tk.screen_centre(y)
    assert_close(got_mu, mu.float(), rtol=0, atol=0, name="centre")
    assert_close(got, want, rtol=1e-15, atol=0, name="centred norms")
    assert_close(tk.squared_norms(y, None), y.double().square().sum(-1), rtol=1e-15, atol=0, name="norms")


# ---------------------------------------------------------------- issue 20: second order, degenerate input, scale

ALL_IMPLS = ["cpu", "reference", "triton"]  # every impl that runs on CPU tensors (Triton in the interpreter)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_double_backward_is_exact(impl):
    """The estimators recompute the selected distances with autograd (neighbours held fixed), so their second
    derivatives are PyTorch's own: gradgradcheck in float64 on each differentiable estimator."""
    _needs(impl)
    x = points((9, 2), seed=70).requires_grad_()
    q = points((7, 2), seed=71).requires_grad_()
    for metric in ("euclidean", "chebyshev"):
        assert torch.autograd.gradgradcheck(lambda v, m=metric: knn_entropy(v, k=2, metric=m, impl=impl), (x,))
    assert torch.autograd.gradgradcheck(lambda v: koleo_loss(v, impl=impl), (x,))
    assert torch.autograd.gradgradcheck(lambda a, b: knn_kl_divergence(a, b, k=2, impl=impl), (x, q))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_knn_and_ksg_outputs_do_not_require_grad(impl):
    _needs(impl)
    x = points((12, 3), seed=72).requires_grad_()
    for metric in METRICS:
        dist, idx = knn(x, k=2, metric=metric, impl=impl)
        assert not dist.requires_grad and not idx.requires_grad, metric
    assert not ksg_mutual_information(x[:, :1], x[:, 1:], k=2, impl=impl).requires_grad


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_no_positive_distance_raises(impl):
    """All points identical: no positive distance to floor at; an error, not log(float tiny)."""
    _needs(impl)
    with pytest.raises(ValueError, match="no positive 2-th neighbour distance"):
        knn_entropy(torch.ones(10, 3), k=2, impl=impl)
    batch = torch.stack([points((10, 3), seed=73), torch.full((10, 3), 0.25, dtype=torch.float64)])
    with pytest.raises(ValueError, match="problem 1 .*all its points identical"):
        knn_entropy(batch, k=2, impl=impl)
    p = torch.full((6, 2), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="no positive 1-th neighbour distance within p"):
        knn_kl_divergence(p, points((5, 2), seed=74), k=1, impl=impl)
    with pytest.raises(ValueError, match="no positive 1-th neighbour distance from p to q"):
        same = points((6, 2), seed=75)
        knn_kl_divergence(same, same.clone(), k=1, impl=impl)  # every p_i is in q


def _with_zero_rows(shape, rows, seed):
    x = points(shape, seed=seed)
    x[..., rows, :] = 0.0
    return x


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_cosine_zero_vectors(impl):
    """cos(0, y) = 0: a zero vector is at cosine distance 1 from every vector, zero vectors included. Every
    backend agrees with the reference (the neighbours of a zero query are the first candidates by index)."""
    _needs(impl)
    x = _with_zero_rows((23, 5), [0, 7, 8], seed=76)
    y = _with_zero_rows((19, 5), [3, 11], seed=77)
    for k in (1, 4):
        dist, idx = knn(x, k=k, metric="cosine", impl=impl)
        check_neighbours(x, None, k, "cosine", dist, idx)
        assert dist[0].tolist() == [1.0] * k and idx[0].tolist() == list(range(1, k + 1))
        assert idx[7].tolist() == [j for j in range(k + 1) if j != 7][:k]
        dist, idx = knn(x, y, k=k, metric="cosine", impl=impl)
        check_neighbours(x, y, k, "cosine", dist, idx)
        assert dist[8].tolist() == [1.0] * k and idx[8].tolist() == list(range(k))
    far = knn(x[1:2], y[3:4].expand(2, 5).contiguous(), k=2, metric="cosine", impl=impl)
    assert far[0].tolist() == [[1.0, 1.0]] and far[1].tolist() == [[0, 1]]
    xb = torch.stack([x, _with_zero_rows((23, 5), [22], seed=78)]).float()
    check_neighbours(xb, None, 3, "cosine", *knn(xb, k=3, metric="cosine", impl=impl))


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_distances_of_huge_and_tiny_points(impl, scale):
    """float32 points near 1e30 (squares overflow) and 1e-30 (squares underflow): the neighbours and distances
    of the float64 brute force, and the estimators shifted exactly as the scale says."""
    _needs(impl)
    base = points((40, 3), seed=79)
    x = (base * scale).float()
    y = (points((30, 3), seed=80) * scale).float()
    for metric in METRICS:
        check_neighbours(x, None, 3, metric, *knn(x, k=3, metric=metric, impl=impl))
        check_neighbours(x, y, 3, metric, *knn(x, y, k=3, metric=metric, impl=impl))
    x64 = x.double()
    for metric in ("euclidean", "chebyshev"):
        want = knn_entropy(x64 / scale, k=3, metric=metric, impl=impl) + 3 * math.log(scale)
        assert_close(knn_entropy(x, k=3, metric=metric, impl=impl), want, rtol=1e-5, atol=0, name=metric)
    want = knn_kl_divergence(x64 / scale, y.double() / scale, k=2, impl=impl)
    assert_close(knn_kl_divergence(x, y, k=2, impl=impl), want, rtol=0, atol=1e-5, name="KL")
    assert_close(koleo_loss(x, impl=impl), koleo_loss(x64, impl=impl), rtol=1e-5, atol=0, name="KoLeo")
    g = x.clone().requires_grad_()
    knn_entropy(g, k=3, impl=impl).backward()
    assert torch.isfinite(g.grad).all() and (g.grad != 0).any()


def test_errors_name_the_arguments():
    x = points((20, 2), torch.float32, seed=81)
    nan = x.clone()
    nan[4, 0] = float("nan")
    with pytest.raises(ValueError, match="^y holds 1 non-finite"):
        ksg_mutual_information(x[:, 0], nan[:, 0])
    with pytest.raises(ValueError, match="^x holds 1 non-finite"):
        ksg_mutual_information(nan[:, :1], x[:, 1])
    with pytest.raises(ValueError, match="q must have p's dimension d = 2"):
        knn_kl_divergence(x, points((5, 3), torch.float32))
    with pytest.raises(ValueError, match="^q holds 1 non-finite"):
        knn_kl_divergence(x, nan)
    with pytest.raises(ValueError, match="^p holds 1 non-finite"):
        knn_kl_divergence(nan, x)
    with pytest.raises(TypeError, match="q must have p's dtype"):
        knn_kl_divergence(x, x.double())
    with pytest.raises(ValueError, match=r"k = 6 exceeds the 5 candidate neighbours \(rows of q\)"):
        knn_kl_divergence(x, x[:5], k=6)
    with pytest.raises(ValueError, match=r"k = 20 exceeds the 19 candidate neighbours \(p against itself"):
        knn_kl_divergence(x, x, k=20)


def _compiled(fn):
    """fn under torch.compile(fullgraph=True) with the aot_eager backend (fast), counting the graphs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, backend=counter), counter


@pytest.mark.parametrize(
    "name",
    [
        "knn",
        "knn_cosine",
        "knn_cosine_zero",
        "knn_huge",
        "knn_entropy",
        "knn_entropy_triton",
        "knn_kl_divergence",
        "ksg_mutual_information",
        "koleo_loss",
    ],
)
def test_compiled_fullgraph_equals_eager(name):
    """Each public function traced as one graph (fullgraph: no graph break, the data-dependent checks made
    asynchronous) gives eager's result bit for bit; compiled, cosine always searches the augmented vectors and the
    estimators scale, which changes no rounding."""
    torch._dynamo.reset()
    x = points((30, 3), torch.float32, seed=82)
    y = points((25, 3), torch.float32, seed=83)
    fn, args = {
        "knn": (lambda a, b: knn(a, b, k=3), (x, y)),
        "knn_cosine": (lambda a, b: knn(a, b, k=3, metric="cosine"), (x, y)),
        "knn_cosine_zero": (lambda a: knn(a, k=3, metric="cosine"), (_with_zero_rows((30, 3), [2, 9], 84).float(),)),
        "knn_huge": (lambda a: knn(a, k=3), (x * 1e30,)),
        "knn_entropy": (lambda a: knn_entropy(a, k=3), (x,)),
        "knn_entropy_triton": (lambda a: knn_entropy(a, k=3, impl="triton"), (x,)),
        "knn_kl_divergence": (lambda a, b: knn_kl_divergence(a, b, k=2), (x, y)),
        "ksg_mutual_information": (lambda a: ksg_mutual_information(a[:, 0], a[:, 1:], k=3), (x,)),
        "koleo_loss": (lambda a: koleo_loss(a), (x,)),
    }[name]
    compiled, counter = _compiled(fn)
    got, want = compiled(*args), fn(*args)
    assert counter.frame_count == 1 and counter.op_count > 0, "not traced as one graph"
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- on the GPU (marked gpu: skipped without CUDA)
# At real sizes, and the interpreter tests' cases with the inputs moved to CUDA (the compiled kernels at shapes that
# defeat their block sizes); formerly in tests/test_gpu.py.


def _knn_impls():
    from infofuse._ops.knn import cuda_kernels_built

    return ["triton", "cuda"] if cuda_kernels_built() else ["triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["euclidean", "chebyshev"])
@pytest.mark.parametrize("k", [1, 10, 64, 100])
def test_knn_large_against_chunked_cdist_topk(metric, k):
    """N = 50000 points, d = 64: the j-th distances equal brute force's (chunked cdist + sort, float64), every
    returned distance is the exact distance of its index, and on every backend."""

    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(50000, 64, device="cuda", generator=g)
    for impl in _knn_impls():
        dist, idx = knn(x, k=k, metric=metric, impl=impl)
        assert dist.shape == idx.shape == (50000, k)
        for r0 in (0, 24000, 49000):
            q = x[r0 : r0 + 1000].double()
            p = float("inf") if metric == "chebyshev" else 2.0
            full = torch.cdist(q, x.double(), p=p)
            full[torch.arange(1000), torch.arange(r0, r0 + 1000)] = float("inf")
            want = torch.sort(full, dim=1, stable=True).values[:, :k]
            assert_close(dist[r0 : r0 + 1000], want, rtol=2e-6, atol=2e-6, name=f"{impl} distances rows {r0}+")
            own = full.gather(1, idx[r0 : r0 + 1000])
            assert_close(dist[r0 : r0 + 1000], own, rtol=2e-6, atol=2e-6, name=f"{impl} distance of its index")


@pytest.mark.gpu
def test_knn_count_and_ksg_match_cpu():

    g = torch.Generator().manual_seed(8)
    z = torch.randn(20000, 2, dtype=torch.float64, generator=g)
    z[:, 1] = 0.8 * z[:, 0] + 0.6 * z[:, 1]
    want = ksg_mutual_information(z[:, 0], z[:, 1], k=3, variant=1, impl="cpu")
    for impl in _knn_impls():
        got = ksg_mutual_information(z[:, 0].cuda(), z[:, 1].cuda(), k=3, variant=1, impl=impl)
        assert abs(got.item() - want.item()) < 1e-12, (impl, got.item(), want.item())


@pytest.mark.gpu
def test_knn_memory_is_linear_in_n():

    x = torch.randn(200000, 32, device="cuda")
    for impl in _knn_impls():
        extra, _ = extra_cuda_bytes(lambda impl=impl: knn(x, k=10, impl=impl))
        assert extra < 64 * 200000 * 10 * 8 + (64 << 20), f"{impl}: {extra / 2**20:.1f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["euclidean", "chebyshev", "cosine"])
@pytest.mark.parametrize("k", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_knn_odd_shapes_every_backend(metric, k, dtype):

    for impl in _knn_impls():
        x, y = to_cuda(points((1013, 37), dtype, seed=k), points((2027, 37), dtype, seed=k + 1))
        ok = (x, y) if dtype != torch.bfloat16 else (x.float(), y.float())
        dist, idx = knn(x, k=k, metric=metric, impl=impl)
        check_neighbours(ok[0], None, k, metric, dist, idx)
        dist, idx = knn(x, y, k=k, metric=metric, impl=impl)
        check_neighbours(ok[0], ok[1], k, metric, dist, idx)
        xb = to_cuda(points((3, 129, 5), dtype, seed=4, noncontig=True))[0]
        dist, idx = knn(xb, k=min(k, 100), metric=metric, impl=impl)
        check_neighbours(xb if dtype != torch.bfloat16 else xb.float(), None, min(k, 100), metric, dist, idx)


@pytest.mark.gpu
def test_knn_duplicates_and_estimators_equal_the_reference():

    base = points((300, 3), seed=7).cuda()
    x = torch.cat([base, base, base[:40]])
    z = points((3000, 2), seed=8).cuda()
    z[:, 1] = 0.6 * z[:, 0] + 0.8 * z[:, 1]
    q = points((2500, 2), seed=9).cuda() + 0.3
    for impl in _knn_impls():
        dist, idx = knn(x, k=2, impl=impl)
        check_neighbours(x, None, 2, "euclidean", dist, idx)
        assert idx[0].tolist() == [300, 600] and dist[0].tolist() == [0.0, 0.0], impl
        for metric in ("euclidean", "chebyshev"):
            got = knn_entropy(z, k=3, metric=metric, impl=impl)
            assert_close(
                got,
                knn_entropy(z, k=3, metric=metric, impl="reference"),
                rtol=1e-12,
                atol=0,
                name=f"{impl} entropy {metric}",
            )
        for variant in (1, 2):
            got = ksg_mutual_information(z[:, 0], z[:, 1], k=3, variant=variant, impl=impl)
            want = ksg_mutual_information(z[:, 0], z[:, 1], k=3, variant=variant, impl="reference")
            assert_close(got, want, rtol=1e-12, atol=0, name=f"{impl} KSG-{variant}")
        got = knn_kl_divergence(z, q, k=2, impl=impl)
        assert_close(got, knn_kl_divergence(z, q, k=2, impl="reference"), rtol=1e-12, atol=0, name=f"{impl} KL")
        for fn in (lambda v, i: knn_entropy(v, k=3, impl=i), lambda v, i: koleo_loss(v, impl=i)):
            a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
            fn(a, impl).backward()
            fn(b, "reference").backward()
            assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, name=f"{impl} gradient")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_knn_screening_bound_holds_in_tf32(precision):
    """The TF32 and 3×TF32 screenings' kept squared distances lie within screen_error_bound of the exact ones, for
    points near the origin and for points far from it (screened centred)."""
    from infofuse.triton_kernels.knn import knn_candidates, screen_centre

    g = torch.Generator(device="cuda").manual_seed(9)
    for d in (3, 16, 128, 300):
        for offset in (0.5, 20.0):
            x = torch.randn(1, 20000, d, device="cuda", generator=g) * 2 + offset
            assert (screen_centre(x)[0] is not None) == (offset > 1), (d, offset)
            screened, idx, bound = knn_candidates(x, x, 10, 0, True, precision=precision)
            exact = (x[0][:, None, :].double() - x[0][idx[0]].double()).square().sum(-1)
            assert ((screened[0].double() - exact).abs() <= bound[0][:, None]).all(), (d, offset)


@pytest.mark.gpu
def test_knn_screening_every_config_keeps_the_nearest_candidates():
    """Each GPU configuration of the screening kernel (block shapes, PREFETCH, the large-KP one), forced instead of
    the autotuner's choice, keeps what check_screened wants, at d = 16 (one small feature block), 128 (one block)
    and 200 (the feature loop), with a partial last tile and centred data."""
    import infofuse.triton_kernels.knn as tk

    g = torch.Generator(device="cuda").manual_seed(11)
    for d, k, offset in ((16, 3, 0.0), (128, 10, 0.0), (128, 10, 20.0), (200, 5, 0.0)):
        x = torch.randn(1, 3001, d, device="cuda", generator=g) + offset
        kp = tk.screen_slots(k)
        for config in [*tk.screen_configs(kp), tk._SCREEN_LARGE_KP]:
            for precision in tk.SCREEN_PRECISIONS:
                check_screened(x, k, *tk.knn_candidates(x, x, k, 0, True, precision=precision, config=config))


@pytest.mark.gpu
def test_screen_autotuner_times_a_long_run_once():
    """time_config, the autotuner's timing: a run past LONG_RUN_MS is timed once after one warm-up run; a short
    one goes to Triton's do_bench (many runs)."""
    from infofuse.triton_kernels.knn import LONG_RUN_MS, elapsed_ms, time_config

    calls = []

    def sleep(cycles):
        return lambda: (calls.append(cycles), torch.cuda._sleep(cycles))

    long_cycles = int(10**7 * 3 * LONG_RUN_MS / elapsed_ms(lambda: torch.cuda._sleep(10**7)))  # ≈ 3 × LONG_RUN_MS
    got = time_config(sleep(long_cycles), (0.5, 0.2, 0.8))
    assert len(calls) == 2 and len(got) == 3 and min(got) >= LONG_RUN_MS, (calls, got)
    calls.clear()
    got = time_config(sleep(1000), (0.5, 0.2, 0.8))
    assert len(calls) > 8 and len(got) == 3 and max(got) < LONG_RUN_MS, (len(calls), got)


@pytest.mark.gpu
def test_screen_autotuner_keys_on_the_bit_length_of_n():
    """A small grid and a large one are tuned apart (TUNE_N in the key): a search at N = 1000 does not fix the
    blocks of one at N = 40000."""
    import infofuse.triton_kernels.knn as tk

    g = torch.Generator(device="cuda").manual_seed(12)
    for n in (1000, 40000):
        x = torch.randn(1, n, 16, device="cuda", generator=g)
        tk.knn_candidates(x, x, 3, 0, True)
    position = tk._knn_screen_tuned.keys.index("TUNE_N")
    assert {key[position] for key in tk._knn_screen_tuned.cache} >= {10, 16}


# Most shares of the queries screened again in 3×TF32 and searched directly, at N = 30000, d = 128, k = 10: well
# above what the CPU model of the TF32 arithmetic gives (bench/knn_screening.py, 2048 queries, as of 2026-12-01:
# with KP = 16 offset 3.1 % and 0, cone 3.9 % and 0, clusters 100 % and 0; with KP = 32, the margin since then,
# 0 and 0, 0 and 0, 100 % and 0; the real matrix unit, which may round where the model truncates, errs no more).
_TIER_SHARES = {"offset": (0.15, 0.01), "cone": (0.15, 0.01), "clusters": (1.0, 0.03)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(_TIER_SHARES))
def test_knn_triton_tiers_on_data_far_from_the_origin_or_clustered(model):
    """Data that TF32 cannot resolve without centring, or at all (bench/knn_screening.py): the tiers give brute
    force's neighbours, and the later tiers see no more queries than the CPU model predicts, with margin."""
    from infofuse._ops.knn import last_search_tiers
    from infofuse.bench.knn_screening import MODELS

    x = MODELS[model](30000, 128, torch.Generator().manual_seed(3)).cuda()
    dist, idx = knn(x, k=10, impl="triton")
    tiers = dict(last_search_tiers)
    again, direct = _TIER_SHARES[model]
    assert tiers["queries"] == 30000 and tiers["probe"] == 0, tiers
    assert tiers["tf32x3"] <= again * 30000 and tiers["direct"] <= direct * 30000, tiers
    _check_first_rows(x, dist, idx, f"{model} ({tiers})")


@pytest.mark.gpu
@pytest.mark.parametrize("model, first", [("gaussian", "tf32"), ("clusters", "tf32x3")])
def test_knn_triton_probe_picks_the_first_tier(model, first):
    """A search of 2¹⁶ + 4464 points (past the probe's thresholds) probes 2048 queries in TF32 and starts where the
    CPU model says TF32 certifies most queries (Gaussian) or none (clusters): in TF32 or in 3×TF32."""
    from infofuse._ops.knn import PROBE_QUERIES, last_search_tiers
    from infofuse.bench.knn_screening import MODELS

    x = MODELS[model](70000, 128, torch.Generator().manual_seed(4)).cuda()
    dist, idx = knn(x, k=10, impl="triton")
    tiers = dict(last_search_tiers)
    assert tiers["probe"] == PROBE_QUERIES and tiers["first"] == first, tiers
    _check_first_rows(x, dist, idx, f"{model} ({tiers})")


def _check_first_rows(x, dist, idx, name, rows=2000):
    """The k-NN of x against itself, self excluded, for its first rows against float64 brute force."""
    k = dist.shape[-1]
    q = x[:rows].double()
    full = torch.cdist(q, x.double())
    full[torch.arange(rows), torch.arange(rows)] = float("inf")
    want = torch.sort(full, dim=1, stable=True).values[:, :k]
    assert_close(dist[:rows], want, rtol=2e-6, atol=2e-6, name=f"{name} distances")
    assert_close(dist[:rows], full.gather(1, idx[:rows]), rtol=2e-6, atol=2e-6, name=f"{name} distance of its index")
