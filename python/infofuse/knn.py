"""k nearest neighbours and the k-NN estimators of entropy, mutual information and divergence (nats)."""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F

from . import _ext
from ._ops import _triton_common
from ._ops import knn as _ops
from .reference import knn_reference

__all__ = ["knn", "knn_entropy", "knn_kl_divergence", "koleo_loss", "ksg_mutual_information"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_IMPLS = ("cpu", "cuda", "triton", "reference")
_METRICS = ("euclidean", "chebyshev", "cosine")


# ---------------------------------------------------------------- validation and dispatch


def _check_points(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be (N, d) or batched (B, N, d), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")


def _check_finite(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        return
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{name} holds {bad} non-finite values (NaN or inf); k-NN estimates need finite points")
    else:
        torch._assert_async(torch.isfinite(x).all(), f"infofuse: {name} holds non-finite values")


def _check_k(k, candidates: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > candidates:
        raise ValueError(f"k = {k} exceeds the {candidates} candidate neighbours ({what})")


def _check_impl(impl, device: torch.device) -> str:
    if impl is not None and impl not in _IMPLS:
        raise ValueError(f"impl must be None, 'cpu', 'cuda', 'triton' or 'reference', got {impl!r}")
    if impl is None:
        if device.type == "cpu" and _ext.cpp_available():
            return "cpu"
        if device.type == "cuda":
            if _ops.cuda_kernels_built():
                return "cuda"
            if _triton_common.triton_usable(device) is None:
                return "triton"
        return "reference"
    if impl in ("cpu", "cuda"):
        _ext.require_cpp(impl)
        if device.type != impl:
            raise ValueError(f"impl={impl!r} needs {impl.upper()} tensors, got tensors on {device}")
        if impl == "cuda" and not _ops.cuda_kernels_built():
            raise RuntimeError("impl='cuda': the extension was built without CUDA kernels (a CPU-only torch)")
    elif impl == "triton":
        reason = _triton_common.triton_usable(device)
        if reason is not None:
            raise RuntimeError(f"impl='triton' cannot run: {reason}")
    return impl


def _prepare(x, y, k, metric, impl, names=("x", "y"), check_finite=True):
    """Validated (x3, y3 or None, squeeze, impl) with x3 (B, N, d); ``names``: the caller's names of x and y."""
    xn, yn = names
    _check_points(xn, x)
    if metric not in _METRICS:
        raise ValueError(f"metric must be 'euclidean', 'chebyshev' or 'cosine', got {metric!r}")
    if y is not None:
        _check_points(yn, y)
        if y.dim() != x.dim():
            raise ValueError(f"{yn} must have {xn}'s number of dimensions ({x.dim()}), got shape {tuple(y.shape)}")
        if y.shape[-1] != x.shape[-1]:
            raise ValueError(f"{yn} must have {xn}'s dimension d = {x.shape[-1]}, got shape {tuple(y.shape)}")
        if x.dim() == 3 and y.shape[0] != x.shape[0]:
            raise ValueError(f"{yn} must have {xn}'s batch size {x.shape[0]}, got shape {tuple(y.shape)}")
        if y.dtype != x.dtype:
            raise TypeError(f"{yn} must have {xn}'s dtype {x.dtype}, got {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"{yn} must be on {xn}'s device {x.device}, got {y.device}")
    n_candidates = (x.shape[-2] - 1) if y is None else y.shape[-2]
    _check_k(k, n_candidates, f"{xn} against itself, each point excluded" if y is None else f"rows of {yn}")
    if check_finite:
        _check_finite(xn, x)
        if y is not None:
            _check_finite(yn, y)
    impl = _check_impl(impl, x.device)
    squeeze = x.dim() == 2
    return (x[None] if squeeze else x), (None if y is None else (y[None] if squeeze else y)), squeeze, impl


# ---------------------------------------------------------------- the search, scale-safe

# A problem needs no scaling while the exponent e of its largest |coordinate| (in [2^(e−1), 2^e)) lies in [lo, hi]:
# its squared distances neither overflow nor lose bits to underflow (float32 arithmetic, which bf16 also uses, for
# d < 2^40; and float64).
_SAFE_EXPONENTS = {torch.float64: (-400, 400), torch.float32: (-30, 40)}
# Scale exponents are clamped to ±this, so 2^±e stays a normal number of the dtype.
_MAX_SHIFT = {torch.float64: 1000, torch.float32: 100}


def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^e exactly, built from its bits (e an integer tensor within ±_MAX_SHIFT): no libm, and it compiles."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32).to(dtype)


def _exponent(amax: torch.Tensor) -> torch.Tensor:
    """e with amax in [2^(e−1), 2^e) (0 for 0), clamped to ±_MAX_SHIFT; amax float32 or float64."""
    limit = _MAX_SHIFT[amax.dtype]
    return torch.frexp(amax)[1].to(torch.int64).clamp(-limit, limit)


def _exponents(*ts: torch.Tensor, always: bool = False) -> torch.Tensor | None:
    """(B, 1, 1) int64: the exponent of the largest |coordinate| of each problem over ts (B, ·, d), or None where no
    problem needs scaling. Scaling the points by 2^-e and the distances by 2^e is exact and changes no rounding of
    the search (it only keeps squares finite and normal), so the check is made only where it is free (CPU tensors
    outside torch.compile, unless ``always``); elsewhere the points are always scaled. The estimators scale always:
    their log ε_i + e·log 2 is then the same computation eager and compiled."""
    ts = [t for t in ts if t.numel()]
    if not ts or ts[0].dtype == torch.float16:  # fp16: its differences' squares are finite and normal in float32
        return None
    acc = _ops.acc_dtype(ts[0].dtype)
    amax = torch.stack([t.detach().abs().amax((1, 2)).to(acc) for t in ts]).amax(0)
    e = _exponent(amax)[:, None, None]
    if not always and ts[0].device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = _SAFE_EXPONENTS[acc]
        if not bool(((e < lo) | (e > hi)).any()):
            return None
    return e


def _scaled(t: torch.Tensor | None, e: torch.Tensor | None) -> torch.Tensor | None:
    """t·2^-e (exact; differentiable), or t where e is None."""
    return t if t is None or e is None else t * _pow2(-e, t.dtype)


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    """v/‖v‖ row by row, a zero row staying zero; each row is first scaled by the power of two of its largest
    |coordinate| (exact), so its norm neither overflows nor underflows. Differentiable; v float32 or float64."""
    if v.shape[-1] == 0:
        return v
    return F.normalize(v * _pow2(-_exponent(v.detach().abs().amax(-1, keepdim=True)), v.dtype), dim=-1)


def _search(x3, y3, k, metric, impl, exclude_self=None):
    """(distances, indices) (B, N, k) of x3 against y3 (None: itself) for 'euclidean'/'chebyshev', without gradient.
    exclude_self=True with y3 given: y3's row i stands for x3's row i, excluded from its neighbours by index."""
    with torch.no_grad():
        if impl == "reference":
            if exclude_self:
                dist = torch.cdist(x3, y3, compute_mode="donot_use_mm_for_euclid_dist")
                dist = dist.masked_fill(torch.eye(dist.shape[-1], dtype=torch.bool, device=dist.device), float("inf"))
                dist, idx = torch.sort(dist, dim=-1, stable=True)
                return dist[..., :k], idx[..., :k]
            return knn_reference(x3, y3, k, metric=metric)
        op = torch.ops.infofuse.knn_triton if impl == "triton" else torch.ops.infofuse.knn
        exclude = y3 is None if exclude_self is None else exclude_self
        return op(x3, x3 if y3 is None else y3, k, _ops.METRICS[metric], exclude)


def _euclidean_search(x3, y3, k, impl):
    """``_search`` for "euclidean", scale-safe: points whose squared distances would overflow or underflow are
    searched scaled by an exact power of two (``_exponents``), their distances scaled back."""
    e = _exponents(x3) if y3 is None else _exponents(x3, y3)
    dist, idx = _search(_scaled(x3, e), _scaled(y3, e), k, "euclidean", impl)
    return (dist if e is None else dist * _pow2(e, dist.dtype)), idx


def _cosine_search(x3, y3, k, impl):
    """Cosine distances 1 − cos(x_i, y_j) with cos(0, ·) = cos(·, 0) = 0, as ‖x̂ − ŷ‖²/2 of unit vectors. Where a
    zero vector is present (under torch.compile: always), queries x̂ become (x̂, 0, 0), zero queries (0, 1, 0),
    candidates (ŷ, 0, 0), zero candidates (0, 0, 1), so ‖a − b‖²/2 = 1 − cos for every pair; then the distance of a
    pair with a zero vector is set to exactly 1, and a zero query, whose candidates all tie, takes the first k by
    index (the reference's order)."""
    acc = _ops.acc_dtype(x3.dtype)
    xn = _unit_rows(x3.to(acc))
    yn = xn if y3 is None else _unit_rows(y3.to(acc))
    zx = (x3 == 0).all(-1)
    zy = zx if y3 is None else (y3 == 0).all(-1)
    if not torch.compiler.is_compiling() and not bool(zx.any() | zy.any()):
        dist, idx = _search(xn, None if y3 is None else yn, k, "euclidean", impl)
        return 0.5 * dist * dist, idx
    nil = torch.zeros_like(xn[..., :1])
    queries = torch.cat([xn, zx[..., None].to(acc), nil], -1)
    candidates = torch.cat([yn, torch.zeros_like(yn[..., :1]), zy[..., None].to(acc)], -1)
    dist, idx = _search(queries, candidates, k, "euclidean", impl, exclude_self=y3 is None)
    b, n, _ = idx.shape
    zero = zx[..., None] | torch.gather(zy, 1, idx.reshape(b, n * k)).reshape(b, n, k)
    dist = torch.where(zero, torch.ones_like(dist), 0.5 * dist * dist)
    first = torch.arange(k, device=idx.device).expand(b, n, k)
    if y3 is None:  # the first k indices other than the query's own
        first = first + (first >= torch.arange(n, device=idx.device)[None, :, None]).to(first.dtype)
    return dist, torch.where(zx[..., None], first, idx)


def knn(
    x: torch.Tensor, y: torch.Tensor | None = None, k: int = 1, *, metric: str = "euclidean", impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest neighbours of every row of x among the rows of y, without an N×M distance matrix.

    Equivalent PyTorch (``infofuse.reference.knn_reference``)::

        dist = torch.cdist(x, y)                          # y = x with the diagonal set to inf when y is None
        distances, indices = dist.sort(-1, stable=True)   # ascending; ties to the smaller index
        distances, indices = distances[..., :k], indices[..., :k]

    Args:
        x: (N, d) points, or (B, N, d) for B independent problems. float32, float64, bfloat16/float16 (computed in
            float32).
        y: (M, d) / (B, M, d) candidates, or None for x against itself with each point excluded from its own
            neighbours by index (duplicates at other indices are neighbours at distance 0).
        k: 1 <= k <= the number of candidates.
        metric: "euclidean", "chebyshev" (max-norm) or "cosine" (1 − cos, ranked as Euclidean on unit vectors; a zero
            vector has cos = 0 with every vector, a zero vector included, so its cosine distance is 1 to all).
        impl: None picks by device ("cpu" for CPU tensors; on CUDA "cuda" where the extension has its CUDA kernels,
            else "triton"); "cpu" (C++), "cuda" (CUDA C++ warp selection), "triton" (fused distance + top-k; CPU
            tensors under TRITON_INTERPRET=1), "reference" (the full distance matrix).

    Returns:
        (distances, indices): (…, N, k), distances ascending in float32 (float64 for float64 input), exact for the
        selected pairs (also for points whose squared distances would overflow or underflow: they are searched
        scaled by a power of two); indices int64. Not differentiable: neither output requires grad (the estimators
        recompute distances from the indices).
    """
    with torch.profiler.record_function("infofuse::knn"):
        x3, y3, squeeze, impl = _prepare(x, y, k, metric, impl)
        if metric == "cosine":
            dist, idx = _cosine_search(x3, y3, k, impl)
        elif metric == "euclidean":
            dist, idx = _euclidean_search(x3, y3, k, impl)
        else:
            dist, idx = _search(x3, y3, k, metric, impl)
        return (dist[0], idx[0]) if squeeze else (dist, idx)


# ---------------------------------------------------------------- estimators


def _psi(v) -> torch.Tensor:
    return torch.special.digamma(torch.as_tensor(v, dtype=torch.float64))


def _neighbour_distance(x3, y3, idx, metric):
    """Differentiable dist(x_i, y_idx(i)) for idx (B, N), in the accumulation dtype."""
    acc = _ops.acc_dtype(x3.dtype)
    d = x3.shape[-1]
    nb = torch.gather(y3, 1, idx[..., None].expand(-1, -1, d))
    diff = (x3 - nb).to(acc)
    if metric == "chebyshev":
        return diff.abs().amax(-1)
    return torch.linalg.vector_norm(diff, dim=-1)


def _floor_zero_distances(eps: torch.Tensor, neighbour: str, where: str = "") -> torch.Tensor:
    """Duplicates make k-th distances 0 (log 0 = −∞): floor them at the smallest positive one of their problem,
    with a warning that counts them; a problem with no positive one (all its points identical) is an error. No noise
    is added. Under torch.compile the error is an asynchronous assertion and the warning is skipped."""
    zero = eps <= 0
    positive = eps.detach().masked_fill(zero, float("inf")).amin(-1, keepdim=True)
    message = f"infofuse: no positive {neighbour} distance{where}"
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(positive).all(), message)
    else:
        if not bool(zero.any()):
            return eps
        none = ~torch.isfinite(positive[..., 0])
        if bool(none.any()):
            problem = "" if eps.shape[0] == 1 else f" in problem {int(none.nonzero()[0, 0])} of the batch"
            raise ValueError(f"{message}{problem}: all its points identical? (k-NN estimators need continuous data)")
        warnings.warn(
            f"infofuse: {int(zero.sum())} point(s) have their {neighbour}{where} at distance 0 (duplicated points); "
            "it was floored at the smallest positive one of the sample (k-NN estimators assume continuous data)",
            RuntimeWarning,
            stacklevel=3,
        )
    return torch.where(zero, positive.expand_as(eps), eps)


def _log_unit_ball(d: int, metric: str) -> float:
    if metric == "chebyshev":
        return d * math.log(2.0)
    return d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)


def _in_base(value: torch.Tensor, base) -> torch.Tensor:
    if base is None:
        return value
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 0 or base == 1:
        raise ValueError(f"base must be None (nats) or a number > 0 other than 1, got {base!r}")
    return value / math.log(base)


def knn_entropy(
    x: torch.Tensor, k: int = 3, *, metric: str = "euclidean", base=None, impl: str | None = None
) -> torch.Tensor:
    """Kozachenko–Leonenko differential entropy estimate, H = ψ(N) − ψ(k) + log V_d + (d/N) Σ log ε_i.

    ε_i is the distance from x_i to its k-th nearest neighbour (self excluded); V_d the volume of the unit ball of
    the metric ("euclidean": π^{d/2}/Γ(d/2 + 1); "chebyshev": 2^d). x (N, d) gives a 0-dim tensor, (B, N, d) a (B,)
    tensor, one per problem; in nats, or in ``base`` units. Differentiable with respect to x through the ε_i, twice
    as well (the neighbours themselves are held fixed). Duplicated points (ε_i = 0) are floored at the smallest
    positive ε of their problem with a warning; a problem without one (all points identical) raises ValueError.
    """
    with torch.profiler.record_function("infofuse::knn_entropy"):
        if metric not in ("euclidean", "chebyshev"):
            raise ValueError(f"metric must be 'euclidean' or 'chebyshev' for knn_entropy, got {metric!r}")
        x3, _, squeeze, impl = _prepare(x, None, k, metric, impl)
        n, d = x3.shape[1], x3.shape[2]
        e = _exponents(x3, always=True) if metric == "euclidean" else None
        xs = _scaled(x3, e)  # ε_i = 2^e·ε_i(xs) exactly: log ε_i gains e·log 2
        _, idx = _search(xs.detach(), None, k, metric, impl)
        eps = _floor_zero_distances(_neighbour_distance(xs, xs, idx[..., k - 1], metric), f"{k}-th neighbour")
        log_eps = torch.log(eps).mean(-1).to(torch.float64)
        if e is not None:
            log_eps = log_eps + e[:, 0, 0].to(torch.float64) * math.log(2.0)
        h = _psi(n) - _psi(k) + _log_unit_ball(d, metric) + d * log_eps
        h = _in_base(h.to(eps.dtype), base)
        return h[0] if squeeze else h


def koleo_loss(x: torch.Tensor, eps: float = 1e-8, *, impl: str | None = None) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: L = −(1/N) Σ_i log(‖x̂_i − x̂_n(i)‖ + eps), x̂ = x/‖x‖, n(i) the nearest other
    row by cosine similarity. x (N, d) gives a 0-dim tensor, (B, N, d) a (B,) tensor. Differentiable (twice as
    well); near-duplicates give log(eps), never inf; rows of any magnitude are normalised exactly."""
    with torch.profiler.record_function("infofuse::koleo_loss"):
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
            raise ValueError(f"eps must be a float > 0, got {eps!r}")
        x3, _, squeeze, impl = _prepare(x, None, 1, "euclidean", impl)
        xn = _unit_rows(x3.to(_ops.acc_dtype(x3.dtype)))
        _, idx = _search(xn.detach(), None, 1, "euclidean", impl)
        nb = torch.gather(xn, 1, idx[..., 0, None].expand(-1, -1, xn.shape[-1]))
        # sqrt(Σ diff² + tiny): the norm's gradient stays finite at exact duplicates
        dist = torch.sqrt(((xn - nb) ** 2).sum(-1) + torch.finfo(xn.dtype).tiny)
        loss = -torch.log(dist + eps).mean(-1)
        return loss[0] if squeeze else loss


def knn_kl_divergence(
    p: torch.Tensor, q: torch.Tensor, k: int = 1, *, base=None, impl: str | None = None
) -> torch.Tensor:
    """Wang–Kulkarni–Verdú estimate of D(P‖Q) from samples p (n, d) of P and q (m, d) of Q (Euclidean):
    (d/n) Σ_i log(ν_k(i)/ρ_k(i)) + log(m/(n − 1)), ρ the k-th distance within p (self excluded), ν the k-th
    distance from p_i to q. Batched (B, n, d) and (B, m, d) give a (B,) tensor. Differentiable with respect to p
    and q (twice as well); zero distances are floored as in knn_entropy, and a problem with no positive ρ (or ν)
    raises ValueError."""
    with torch.profiler.record_function("infofuse::knn_kl_divergence"):
        _check_points("p", p)
        _check_k(k, p.shape[-2] - 1, "p against itself, each point excluded")
        p3, q3, squeeze, impl = _prepare(p, q, k, "euclidean", impl, names=("p", "q"))
        n, m, d = p3.shape[1], q3.shape[1], p3.shape[2]
        e = _exponents(p3, q3, always=True)  # one power of two for both: log(ν/ρ) does not change
        ps, qs = _scaled(p3, e), _scaled(q3, e)
        _, idx_p = _search(ps.detach(), None, k, "euclidean", impl)
        _, idx_q = _search(ps.detach(), qs.detach(), k, "euclidean", impl)
        rho = _neighbour_distance(ps, ps, idx_p[..., k - 1], "euclidean")
        nu = _neighbour_distance(ps, qs, idx_q[..., k - 1], "euclidean")
        rho = _floor_zero_distances(rho, f"{k}-th neighbour", " within p")
        nu = _floor_zero_distances(nu, f"{k}-th neighbour", " from p to q")
        div = d * (torch.log(nu) - torch.log(rho)).mean(-1) + math.log(m / (n - 1))
        div = _in_base(div, base)
        return div[0] if squeeze else div


def ksg_mutual_information(
    x: torch.Tensor, y: torch.Tensor, k: int = 3, *, variant: int = 1, base=None, impl: str | None = None
) -> torch.Tensor:
    """Kraskov–Stögbauer–Grassberger estimate of I(X; Y) from paired samples x (N, dx), y (N, dy) (1-D vectors are
    one feature), or batched (B, N, ·) giving a (B,) tensor. Max-norm in the joint space; marginal counts exclude the
    point itself.

    variant 1: ε_i the joint distance to the k-th neighbour, n_x(i) = #{j : ‖x_j − x_i‖∞ < ε_i} (strict);
    I = ψ(k) + ψ(N) − ⟨ψ(n_x + 1) + ψ(n_y + 1)⟩.
    variant 2: ε_x(i), ε_y(i) the marginal extents of the k joint neighbours, counts with ≤;
    I = ψ(k) − 1/k + ψ(N) − ⟨ψ(n_x) + ψ(n_y)⟩.
    Computed in float64 for float64 input (the counts at the radii are exact). No noise is added: duplicated
    samples are counted as they are (a warning says how many have a zero joint radius). Not differentiable: the
    result never requires grad (the counts are integers).
    """
    with torch.profiler.record_function("infofuse::ksg_mutual_information"):
        if variant not in (1, 2):
            raise ValueError(f"variant must be 1 or 2, got {variant!r}")
        if isinstance(x, torch.Tensor) and x.dim() == 1:
            x = x[:, None]
        if isinstance(y, torch.Tensor) and y.dim() == 1:
            y = y[:, None]
        _check_points("x", x)
        _check_points("y", y)
        if x.dim() != y.dim() or x.shape[:-1] != y.shape[:-1]:
            raise ValueError(f"x and y must pair up row by row: shapes {tuple(x.shape)} and {tuple(y.shape)}")
        if y.dtype != x.dtype:
            raise TypeError(f"y must have x's dtype {x.dtype}, got {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"y must be on x's device {x.device}, got {y.device}")
        _check_finite("x", x)
        _check_finite("y", y)
        xy = torch.cat([x, y], dim=-1)
        z3, _, squeeze, impl = _prepare(xy, None, k, "chebyshev", impl, names=("(x, y)", ""), check_finite=False)
        acc = _ops.acc_dtype(z3.dtype)
        dx = x.shape[-1]
        x3, y3 = z3[..., :dx].to(acc), z3[..., dx:].to(acc)
        n = z3.shape[1]
        with torch.no_grad():
            dist, idx = _search(z3, None, k, "chebyshev", impl)
            if not torch.compiler.is_compiling():
                zero = int((dist[..., k - 1] <= 0).sum())
                if zero:
                    message = f"infofuse: {zero} point(s) have their k-th joint neighbour at distance 0 (duplicated "
                    warnings.warn(message + "samples); KSG assumes continuous data", RuntimeWarning, stacklevel=2)
            if variant == 1:
                radius = dist[..., k - 1].to(acc)
                nx, ny = _count(x3, radius, True, impl), _count(y3, radius, True, impl)
                mi = _psi(k) + _psi(n) - (_psi(nx + 1) + _psi(ny + 1)).mean(-1)
            else:
                ex = _extent(x3, idx)
                ey = _extent(y3, idx)
                nx, ny = _count(x3, ex, False, impl), _count(y3, ey, False, impl)
                mi = _psi(k) - 1.0 / k + _psi(n) - (_psi(nx) + _psi(ny)).mean(-1)
            mi = _in_base(mi.to(acc), base)
        return mi[0] if squeeze else mi


def _extent(v3: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """max over the k neighbours j of ‖v_i − v_j‖∞ (B, N), exact."""
    b, n, k = idx.shape
    d = v3.shape[-1]
    nb = torch.gather(v3, 1, idx.reshape(b, n * k, 1).expand(-1, -1, d)).reshape(b, n, k, d)
    return (v3[:, :, None, :] - nb).abs().amax(-1).amax(-1)


def _count(v3: torch.Tensor, radius: torch.Tensor, strict: bool, impl: str) -> torch.Tensor:
    if impl == "reference":
        dist = (v3[..., :, None, :] - v3[..., None, :, :]).abs().amax(-1)
        n = dist.shape[-1]
        inside = dist < radius[..., None] if strict else dist <= radius[..., None]
        inside &= ~torch.eye(n, dtype=torch.bool, device=v3.device)
        return inside.sum(-1)
    op = torch.ops.infofuse.knn_count_triton if impl == "triton" else torch.ops.infofuse.knn_count
    return op(v3, radius.contiguous(), 1, strict)
