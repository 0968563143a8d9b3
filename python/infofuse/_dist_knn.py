"""Sharded k-NN search and estimators: the point set is the union of every rank's shard (issue 22 item 3).

Each rank passes its own rows (uneven shards allowed, in rank order). Neighbours are found by a ring pass of the
candidate shards (``send_recv``): at step s a rank holds the shard of rank (r − s) mod W, posts its hand-on to rank
r + 1 and its receipt from rank r − 1, searches its own queries against the visiting shard with the single-process
kernels (``infofuse.knn``'s search; the query itself excluded by index on its own shard only), and merges those k
best into its running top-k by (distance, global index). Memory per rank: its queries' top-k lists, its shard, and
two visiting shards (the one searched and the one arriving); never a distance matrix, never the whole set.

The estimators sum their per-point terms over ranks (``all_reduce_sum``), so the value is the same on every rank
and equals the single-process estimate of the union. Their gradient follows the data-parallel contract of
``infofuse.distributed``: rank r's backward carries W × the gradient of its own points' terms, and the gradient
of a neighbour's coordinates goes back to the rank that owns it (``_fetch_rows``: an all-to-all that fetches the
neighbours' rows, whose backward is the all-to-all returning their gradients). After DDP averages parameter
gradients over ranks they equal the single-process gradient of the estimate on the union.
"""

from __future__ import annotations

import importlib
import math
import numbers
import sys
import warnings

import torch

from . import _dist
from ._ops import knn as _ops

# the module infofuse.knn (the package's attribute `knn` is the function of that name)
_knn = importlib.import_module("infofuse.knn")

__all__ = ["knn", "knn_entropy", "knn_kl_divergence", "koleo_loss", "ksg_mutual_information"]


# ---------------------------------------------------------------- validation and the handshake


def _check_k_type(k) -> None:
    _knn._check_k(k, sys.maxsize, "")


def _check_base(base) -> None:
    _knn._in_base(torch.zeros(()), base)


def _handshake(op, group, x, error, replicated, local):
    """``_dist.agree`` on x's device (the CPU when x is not a tensor, whose error the handshake then spreads)."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    return _dist.agree(op, group, device, replicated, local, error=error)


def _points_fields(name: str, t) -> dict:
    """The replicated description of a point tensor: its number of dimensions, batch size, d and dtype."""
    if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
        return {f"{name}.dim": -1, f"{name}.batch": -1, f"{name}.d": -1, f"{name}.dtype": None}
    return {
        f"{name}.dim": t.dim(),
        f"{name}.batch": t.shape[0] if t.dim() == 3 else 0,
        f"{name}.d": t.shape[-1],
        f"{name}.dtype": t.dtype,
    }


def _rows(t) -> int:
    return t.shape[-2] if isinstance(t, torch.Tensor) and t.dim() in (2, 3) else 0


def _as3(t: torch.Tensor) -> torch.Tensor:
    return t[None] if t.dim() == 2 else t


def _check_pair(x, y, names) -> None:
    """y's layout against x's (the single-process rules of ``infofuse.knn``)."""
    xn, yn = names
    _knn._check_points(yn, y)
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


# ---------------------------------------------------------------- global scale


def _global_exponent(group, *ts: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, 1) int64: the exponent of the largest |coordinate| of each problem over every rank's ts (the
    single-process ``_exponents(..., always=True)`` of the union), by one all-reduce (max); None for fp16."""
    if ts[0].dtype == torch.float16:
        return None
    acc = _ops.acc_dtype(ts[0].dtype)
    b = ts[0].shape[0]
    amax = torch.zeros(b, dtype=acc, device=ts[0].device)
    for t in ts:
        if t.numel():
            amax = torch.maximum(amax, t.detach().abs().amax((1, 2)).to(acc))
    amax = _dist._wait(_dist._funcol().all_reduce(amax, "max", group))
    w = _dist.world_size(group)
    _dist._account("all_reduce", 2 * (w - 1) / w * amax.numel() * amax.element_size())
    return _knn._exponent(amax)[:, None, None]


# ---------------------------------------------------------------- the ring search


def _merge(best, new, k):
    """The k best of two candidate lists (dist, gidx, rows or None), (B, N, ·), by (distance, global index)."""
    dist = torch.cat([best[0], new[0]], -1)
    idx = torch.cat([best[1], new[1]], -1)
    idx, by_index = torch.sort(idx, dim=-1)
    dist, by_dist = torch.sort(torch.gather(dist, -1, by_index), dim=-1, stable=True)
    order = torch.gather(by_index, -1, by_dist)[..., :k]
    dist, idx = dist[..., :k], torch.gather(idx, -1, by_dist[..., :k])
    rows = None
    if best[2] is not None:
        rows = torch.cat([best[2], new[2]], -2)
        rows = torch.gather(rows, -2, order[..., None].expand(-1, -1, -1, rows.shape[-1]))
    return dist, idx, rows


def _ring_search(q, cand, sizes, k, metric, impl, group, self_search, keep=None):
    """This rank's queries q (B, N_r, p) against the union of every rank's cand (B, M_r, p), sizes = M by rank.

    ``self_search``: cand's row i on this rank is query i (excluded by index; q and cand may differ, as cosine's
    augmented queries and candidates do). ``metric``: "euclidean" or "chebyshev". ``keep``: a slice of the
    candidates' columns whose rows come back for the k neighbours. Returns (distances (B, N_r, k) ascending,
    global indices (B, N_r, k) into the concatenation in rank order, rows (B, N_r, k, ·) or None), no gradient."""
    w, me = _dist.world_size(group), _dist.rank(group)
    offs = _dist.offsets(sizes)
    b, n, _ = q.shape
    acc = _ops.acc_dtype(q.dtype)
    width = 0 if keep is None else cand[..., keep].shape[-1]
    best = (
        q.new_empty((b, n, 0), dtype=acc),
        q.new_empty((b, n, 0), dtype=torch.int64),
        None if keep is None else q.new_empty((b, n, 0, width), dtype=cand.dtype),
    )
    same = cand is q
    with torch.no_grad():
        shard = cand.contiguous()
        for step in range(w):
            src = (me - step) % w
            pending, incoming = [], None
            if step + 1 < w:  # hand the shard on while this one is searched
                incoming = shard.new_empty((b, sizes[(src - 1) % w], shard.shape[-1]))
                pending = _dist.send_recv(shard, incoming, (me + 1) % w, (me - 1) % w, group)
            own = src == me and self_search
            kk = min(k, sizes[src] - int(own))
            if kk > 0 and n > 0:
                if own and same:
                    dist, idx = _knn._search(q, None, kk, metric, impl)
                elif own:
                    dist, idx = _knn._search(q, shard, kk, metric, impl, exclude_self=True)
                else:
                    dist, idx = _knn._search(q, shard, kk, metric, impl)
                rows = None
                if keep is not None:
                    part = shard[..., keep]
                    flat = idx.reshape(b, n * kk, 1).expand(-1, -1, width)
                    rows = torch.gather(part, 1, flat).reshape(b, n, kk, width)
                best = _merge(best, (dist, idx + offs[src], rows), k)
            for req in pending:
                req.wait()
            if incoming is not None:
                shard = incoming
    if n == 0:  # no queries here: empty lists of the full width
        best = (
            best[0].new_empty((b, 0, k)),
            best[1].new_empty((b, 0, k)),
            None if keep is None else best[2].new_empty((b, 0, k, width)),
        )
    return best


# ---------------------------------------------------------------- fetching neighbours' rows, differentiably


class _Route:
    """Who asks whom for which rows: this rank's requests ``gidx`` (B, N_r) of global rows (per problem) of a
    sharded (B, M_·, p) tensor, sorted by owner, and the rows other ranks ask of this one (flat ids into its
    (B·M_r, p) view). Built once (two all-to-alls of integers); used by the fetch and by its backward."""

    def __init__(self, gidx: torch.Tensor, sizes, group):
        w, me = _dist.world_size(group), _dist.rank(group)
        b, n = gidx.shape
        dev = gidx.device
        size_t = torch.tensor(list(sizes), dtype=torch.int64, device=dev)
        ends = torch.cumsum(size_t, 0)
        flat = gidx.reshape(-1).contiguous()
        owner = torch.searchsorted(ends, flat, right=True)
        local = flat - (ends - size_t)[owner]
        problem = torch.arange(b, device=dev).repeat_interleave(n)
        key = problem * size_t[owner] + local
        self.order = torch.argsort(owner, stable=True)
        self.send = torch.bincount(owner, minlength=w).tolist()  # rows asked of each rank
        counts = torch.tensor(self.send, dtype=torch.int64, device=dev)
        self.recv = _all_to_all(counts, [1] * w, [1] * w, group, me).tolist()  # rows each rank asks of me
        self.asked = _all_to_all(key[self.order], self.recv, self.send, group, me)
        self.shape, self.group, self.me, self.sizes = (b, n), group, me, sizes


def _all_to_all(t: torch.Tensor, out_splits, in_splits, group, me: int) -> torch.Tensor:
    """Uneven all-to-all of rows (``in_splits[r]`` rows to rank r); counts the bytes sent to other ranks."""
    out = _dist._wait(_dist._funcol().all_to_all_single(t.contiguous(), list(out_splits), list(in_splits), group))
    row = t[:1].numel() * t.element_size()
    _dist._account("all_to_all", (sum(in_splits) - in_splits[me]) * row)
    return out


class _FetchRows(torch.autograd.Function):
    """Forward: the requested rows of every rank's src, (B, N_r, p). Backward: their gradients sent back to the
    owners and summed there (``_ReturnRows``), itself differentiable, so double backward works."""

    @staticmethod
    def forward(ctx, src, route):
        ctx.route = route
        b, n = route.shape
        p = src.shape[-1]
        given = src.reshape(-1, p)[route.asked]
        got = _all_to_all(given, route.send, route.recv, route.group, route.me)
        out = torch.empty_like(got)
        out[route.order] = got
        return out.reshape(b, n, p)

    @staticmethod
    def backward(ctx, grad):
        return _ReturnRows.apply(grad, ctx.route), None


class _ReturnRows(torch.autograd.Function):
    """Forward: gradients (B, N_r, p) of fetched rows summed onto their owners' (B, M_r, p). Backward: a fetch."""

    @staticmethod
    def forward(ctx, grad, route):
        ctx.route = route
        p = grad.shape[-1]
        sent = grad.reshape(-1, p)[route.order]
        got = _all_to_all(sent, route.recv, route.send, route.group, route.me)
        b, m = route.shape[0], route.sizes[route.me]
        out = grad.new_zeros((b * m, p)).index_add_(0, route.asked, got)
        return out.reshape(b, m, p)

    @staticmethod
    def backward(ctx, grad):
        return _FetchRows.apply(grad, ctx.route), None


def _fetch_rows(src: torch.Tensor, gidx: torch.Tensor, sizes, group) -> torch.Tensor:
    """Rows gidx (B, N_r) (global, per problem) of the sharded src (B, M_r, p), differentiable: the gradient of
    each fetched row goes back to its owner."""
    return _FetchRows.apply(src, _Route(gidx, sizes, group))


def _distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Differentiable dist(a_i, b_i) in the accumulation dtype (the single-process ``_neighbour_distance``)."""
    diff = (a - b).to(_ops.acc_dtype(a.dtype))
    if metric == "chebyshev":
        return diff.abs().amax(-1)
    return torch.linalg.vector_norm(diff, dim=-1)


# ---------------------------------------------------------------- zero distances, over every rank


def _floor_zero_distances(eps: torch.Tensor, neighbour: str, group, where: str = "") -> torch.Tensor:
    """The single-process flooring over the union: zero distances take the smallest positive one of their problem
    over every rank (one all-gather of each rank's smallest positive distance and count of zeros); a problem with
    none raises the same ValueError on every rank."""
    zero = eps <= 0
    positive = eps.detach().double().masked_fill(zero, float("inf"))
    positive = torch.cat([positive, positive.new_full((eps.shape[0], 1), float("inf"))], -1)  # a rank may hold none
    stats = torch.stack([positive.amin(-1), zero.sum(-1).double()], -1)  # (B, 2)
    w = _dist.world_size(group)
    table = _dist._all_gather(stats.contiguous(), group).view(w, *stats.shape)
    _dist._account("all_gather", (w - 1) * stats.numel() * stats.element_size())
    positive = table[..., 0].amin(0).to(eps.dtype)[:, None]
    message = f"infofuse: no positive {neighbour} distance{where}"
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(positive).all(), message)
    else:
        zeros = int(table[..., 1].sum())
        if not zeros:
            return eps
        none = ~torch.isfinite(positive[:, 0])
        if bool(none.any()):
            problem = "" if eps.shape[0] == 1 else f" in problem {int(none.nonzero()[0, 0])} of the batch"
            raise ValueError(f"{message}{problem}: all its points identical? (k-NN estimators need continuous data)")
        warnings.warn(
            f"infofuse: {zeros} point(s) of the union have their {neighbour}{where} at distance 0 (duplicated "
            "points); it was floored at the smallest positive one of the sample (k-NN estimators assume continuous "
            "data)",
            RuntimeWarning,
            stacklevel=3,
        )
    return torch.where(zero, positive.expand_as(eps), eps)


def _sum_over_ranks(t: torch.Tensor, group) -> torch.Tensor:
    """Σ over ranks; rank r's backward carries W × its own part (the data-parallel contract)."""
    return _dist.all_reduce_sum(t, group, grad_scale=_dist.world_size(group))


# ---------------------------------------------------------------- public functions

# torch.compile: the ring's point-to-point sends (dist.P2POp) do not trace, and the shard sizes drive Python
# control flow; a compiled model that calls these functions breaks its graph there and runs them eagerly
# (fullgraph=True raises), with the same value and gradients.
_eager = torch.compiler.disable(
    recursive=True, reason="infofuse.distributed k-NN: a ring of point-to-point sends over shards of host-known sizes"
)


@_eager
def knn(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    k: int = 1,
    *,
    metric: str = "euclidean",
    impl: str | None = None,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``infofuse.knn`` on the union of every rank's shard: the k nearest neighbours of this rank's rows of x among
    the rows of every rank's y (y=None: every rank's x, each point excluded from its own neighbours by index).

    Equivalent single-process call, on the concatenations in rank order (X = torch.cat of every rank's x)::

        dist, idx = infofuse.knn(X, Y, k, metric=metric)
        dist, idx = dist[..., off_r : off_r + n_r, :], idx[..., off_r : off_r + n_r, :]   # this rank's queries

    Args:
        x: (N_r, d) this rank's queries (and, with y None, its shard of the candidates), or batched (B, N_r, d);
            d, B and dtype equal on every rank, N_r may differ (0 included).
        y: None, or (M_r, d) / (B, M_r, d) this rank's shard of the candidates (every rank passes one, or none).
        k: 1 <= k <= the number of candidates of the union (N − 1 with y None, else M); k may exceed a shard.
        metric, impl: as in ``infofuse.knn``. group: the process group (None: the default group).

    Returns:
        (distances, indices) (…, N_r, k): ascending distances, exact for the selected pairs, and int64 indices into
        the concatenation of every rank's rows in rank order; ties to the smaller global index (the single-process
        rule: each shard's search breaks ties by index, the merge by global index). Not differentiable.

    Communication: the candidates make one ring pass, (W − 1)/W · M · d values sent per rank on average.
    """
    with torch.profiler.record_function("infofuse::distributed::knn"):
        group = _dist.resolve_group(group, "knn")
        error = None
        try:
            _knn._check_points("x", x)
            if metric not in _knn._METRICS:
                raise ValueError(f"metric must be 'euclidean', 'chebyshev' or 'cosine', got {metric!r}")
            if y is not None:
                _check_pair(x, y, ("x", "y"))
            _check_k_type(k)
            _knn._check_finite("x", x)
            if y is not None:
                _knn._check_finite("y", y)
            impl = _knn._check_impl(impl, x.device)
        except (ValueError, TypeError) as e:
            error = e
        replicated = {**_points_fields("x", x), "y": y is not None, "k": k, "metric": metric}
        if y is not None:
            replicated.update(_points_fields("y", y))
        local = {"n": _rows(x)} if y is None else {"n": _rows(x), "m": _rows(y)}
        sizes = _handshake("knn", group, x, error, replicated, local)
        xsizes = sizes["n"]
        ysizes = xsizes if y is None else sizes["m"]
        _knn._check_k(
            k, sum(ysizes) - (y is None), "the union of x, each point excluded" if y is None else "the union of y"
        )
        squeeze = x.dim() == 2
        x3 = _as3(x)
        y3 = None if y is None else _as3(y)
        if metric == "cosine":
            dist, idx = _cosine_ring(x3, y3, k, impl, group, xsizes, ysizes)
        elif metric == "euclidean":
            e = _global_exponent(group, x3) if y3 is None else _global_exponent(group, x3, y3)
            xs = _knn._scaled(x3.detach(), e)
            ys = xs if y3 is None else _knn._scaled(y3.detach(), e)
            dist, idx, _ = _ring_search(xs, ys, ysizes, k, "euclidean", impl, group, y is None)
            if e is not None:
                dist = dist * _knn._pow2(e, dist.dtype)
        else:
            x3 = x3.detach()
            cand = x3 if y3 is None else y3.detach()
            dist, idx, _ = _ring_search(x3, cand, ysizes, k, "chebyshev", impl, group, y is None)
        return (dist[0], idx[0]) if squeeze else (dist, idx)


def _cosine_ring(x3, y3, k, impl, group, xsizes, ysizes):
    """``infofuse.knn``'s cosine search, always on the augmented vectors (a zero vector may sit on any rank): unit
    queries (x̂, 0, 0), zero queries (0, 1, 0), unit candidates (ŷ, 0, 0), zero candidates (0, 0, 1); ‖a − b‖²/2
    = 1 − cos. A pair with a zero vector gets exactly 1 (the neighbour's flag comes back with it), and a zero
    query takes the first k global indices (self excluded)."""
    acc = _ops.acc_dtype(x3.dtype)
    x3 = x3.detach()
    xn = _knn._unit_rows(x3.to(acc))
    zx = (x3 == 0).all(-1)
    queries = torch.cat([xn, zx[..., None].to(acc), torch.zeros_like(xn[..., :1])], -1)
    if y3 is None:
        yn, zy = xn, zx
    else:
        y3 = y3.detach()
        yn, zy = _knn._unit_rows(y3.to(acc)), (y3 == 0).all(-1)
    candidates = torch.cat([yn, torch.zeros_like(yn[..., :1]), zy[..., None].to(acc)], -1)
    dist, idx, flag = _ring_search(
        queries, candidates, ysizes, k, "euclidean", impl, group, y3 is None, keep=slice(-1, None)
    )
    b, n, _ = idx.shape
    zero = zx[..., None] | (flag[..., 0] > 0)
    dist = torch.where(zero, torch.ones_like(dist), 0.5 * dist * dist)
    first = torch.arange(k, device=idx.device).expand(b, n, k)
    if y3 is None:  # the first k global indices other than the query's own
        me = _dist.rank(group)
        own = _dist.offsets(xsizes)[me] + torch.arange(n, device=idx.device)
        first = first + (first >= own[None, :, None]).to(first.dtype)
    return dist, torch.where(zx[..., None], first, idx)


def _estimator_setup(op, group, x, k, metric, base, impl, name="x"):
    """Validation and handshake of a one-sample estimator; returns (impl, N by rank)."""
    error = None
    try:
        if metric not in ("euclidean", "chebyshev"):
            raise ValueError(f"metric must be 'euclidean' or 'chebyshev' for {op}, got {metric!r}")
        _knn._check_points(name, x)
        _check_k_type(k)
        _check_base(base)
        _knn._check_finite(name, x)
        impl = _knn._check_impl(impl, x.device)
    except (ValueError, TypeError) as e:
        error = e
    replicated = {**_points_fields(name, x), "k": k, "metric": metric, "base": base}
    sizes = _handshake(op, group, x, error, replicated, {"n": _rows(x)})["n"]
    _knn._check_k(k, sum(sizes) - 1, f"the union of {name}, each point excluded")
    return impl, sizes


@_eager
def knn_entropy(
    x: torch.Tensor, k: int = 3, *, metric: str = "euclidean", base=None, impl: str | None = None, group=None
) -> torch.Tensor:
    """``infofuse.knn_entropy`` (Kozachenko–Leonenko) of the union of every rank's x, the same value on every rank:
    H = ψ(N) − ψ(k) + log V_d + (d/N) Σ_i log ε_i over all N = Σ_r N_r points, ε_i the distance to the k-th
    neighbour among all of them (self excluded).

    x (N_r, d) this rank's points, or (B, N_r, d) giving a (B,) tensor; k <= N − 1. Differentiable with respect
    to x through the ε_i (twice as well; the neighbours held fixed), under the data-parallel contract: rank r's
    backward carries W × ∂/∂x of its own points' terms, and the gradient of a neighbour on another rank is sent
    back to it, so that DDP's average of parameter gradients is the single-process gradient on the union. Zero
    distances are floored at the smallest positive ε of the union with a warning, as single-process.
    """
    with torch.profiler.record_function("infofuse::distributed::knn_entropy"):
        group = _dist.resolve_group(group, "knn_entropy")
        impl, sizes = _estimator_setup("knn_entropy", group, x, k, metric, base, impl)
        squeeze = x.dim() == 2
        x3 = _as3(x)
        n, d = sum(sizes), x3.shape[-1]
        e = _global_exponent(group, x3) if metric == "euclidean" else None
        xs = _knn._scaled(x3, e)
        _, idx, _ = _ring_search(xs.detach(), xs.detach(), sizes, k, metric, impl, group, True)
        nb = _fetch_rows(xs, idx[..., k - 1], sizes, group)
        eps = _floor_zero_distances(_distance(xs, nb, metric), f"{k}-th neighbour", group)
        log_eps = (_sum_over_ranks(torch.log(eps).sum(-1), group) / n).to(torch.float64)
        if e is not None:
            log_eps = log_eps + e[:, 0, 0].to(torch.float64) * math.log(2.0)
        h = _knn._psi(n) - _knn._psi(k) + _knn._log_unit_ball(d, metric) + d * log_eps
        h = _knn._in_base(h.to(eps.dtype), base)
        return h[0] if squeeze else h


@_eager
def koleo_loss(x: torch.Tensor, eps: float = 1e-8, *, impl: str | None = None, group=None) -> torch.Tensor:
    """``infofuse.koleo_loss`` (DINOv2's KoLeo) of the union of every rank's x, the same value on every rank:
    L = −(1/N) Σ_i log(‖x̂_i − x̂_n(i)‖ + eps) over all N points, n(i) the nearest other row of the union by cosine.

    x (N_r, d) or (B, N_r, d). Differentiable (twice as well) under the data-parallel contract of knn_entropy:
    a neighbour's gradient goes back to its owner; rank r's backward carries W × its own rows' terms.
    """
    with torch.profiler.record_function("infofuse::distributed::koleo_loss"):
        group = _dist.resolve_group(group, "koleo_loss")
        error = None
        try:
            if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
                raise ValueError(f"eps must be a float > 0, got {eps!r}")
            _knn._check_points("x", x)
            _knn._check_finite("x", x)
            impl = _knn._check_impl(impl, x.device)
        except (ValueError, TypeError) as e:
            error = e
        replicated = {**_points_fields("x", x), "eps": float(eps) if isinstance(eps, numbers.Real) else None}
        sizes = _handshake("koleo_loss", group, x, error, replicated, {"n": _rows(x)})["n"]
        _knn._check_k(1, sum(sizes) - 1, "the union of x, each point excluded")
        squeeze = x.dim() == 2
        x3 = _as3(x)
        xn = _knn._unit_rows(x3.to(_ops.acc_dtype(x3.dtype)))
        _, idx, _ = _ring_search(xn.detach(), xn.detach(), sizes, 1, "euclidean", impl, group, True)
        nb = _fetch_rows(xn, idx[..., 0], sizes, group)
        # sqrt(Σ diff² + tiny): the norm's gradient stays finite at exact duplicates
        dist = torch.sqrt(((xn - nb) ** 2).sum(-1) + torch.finfo(xn.dtype).tiny)
        loss = -_sum_over_ranks(torch.log(dist + eps).sum(-1), group) / sum(sizes)
        return loss[0] if squeeze else loss


@_eager
def knn_kl_divergence(
    p: torch.Tensor, q: torch.Tensor, k: int = 1, *, base=None, impl: str | None = None, group=None
) -> torch.Tensor:
    """``infofuse.knn_kl_divergence`` (Wang–Kulkarni–Verdú) of the unions of every rank's p and q, the same value
    on every rank: (d/n) Σ_i log(ν_k(i)/ρ_k(i)) + log(m/(n − 1)) over all n = Σ_r n_r samples of P and m of Q.

    p (n_r, d), q (m_r, d) this rank's samples (or batched (B, ·, d) giving (B,)); k <= n − 1 and k <= m.
    Differentiable with respect to p and q (twice as well) under the contract of knn_entropy; zero distances
    are floored over the union as single-process.
    """
    with torch.profiler.record_function("infofuse::distributed::knn_kl_divergence"):
        group = _dist.resolve_group(group, "knn_kl_divergence")
        error = None
        try:
            _knn._check_points("p", p)
            _check_pair(p, q, ("p", "q"))
            _check_k_type(k)
            _check_base(base)
            _knn._check_finite("p", p)
            _knn._check_finite("q", q)
            impl = _knn._check_impl(impl, p.device)
        except (ValueError, TypeError) as e:
            error = e
        replicated = {**_points_fields("p", p), **_points_fields("q", q), "k": k, "base": base}
        sizes = _handshake("knn_kl_divergence", group, p, error, replicated, {"n": _rows(p), "m": _rows(q)})
        psizes, qsizes = sizes["n"], sizes["m"]
        _knn._check_k(k, sum(psizes) - 1, "the union of p, each point excluded")
        _knn._check_k(k, sum(qsizes), "the union of q")
        squeeze = p.dim() == 2
        p3, q3 = _as3(p), _as3(q)
        n, m, d = sum(psizes), sum(qsizes), p3.shape[-1]
        e = _global_exponent(group, p3, q3)  # one power of two for both: log(ν/ρ) does not change
        ps, qs = _knn._scaled(p3, e), _knn._scaled(q3, e)
        _, idx_p, _ = _ring_search(ps.detach(), ps.detach(), psizes, k, "euclidean", impl, group, True)
        _, idx_q, _ = _ring_search(ps.detach(), qs.detach(), qsizes, k, "euclidean", impl, group, False)
        rho = _distance(ps, _fetch_rows(ps, idx_p[..., k - 1], psizes, group), "euclidean")
        nu = _distance(ps, _fetch_rows(qs, idx_q[..., k - 1], qsizes, group), "euclidean")
        rho = _floor_zero_distances(rho, f"{k}-th neighbour", group, " within p")
        nu = _floor_zero_distances(nu, f"{k}-th neighbour", group, " from p to q")
        div = d * _sum_over_ranks((torch.log(nu) - torch.log(rho)).sum(-1), group) / n + math.log(m / (n - 1))
        div = _knn._in_base(div, base)
        return div[0] if squeeze else div


@_eager
def ksg_mutual_information(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int = 3,
    *,
    variant: int = 1,
    base=None,
    impl: str | None = None,
    group=None,
) -> torch.Tensor:
    """``infofuse.ksg_mutual_information`` (KSG 1 or 2) of the union of every rank's pairs (x, y), the same value
    on every rank. x (N_r, dx), y (N_r, dy) this rank's pairs (1-D: one feature), or batched (B, N_r, ·) giving
    (B,). The joint k-th neighbour is searched over the union by one ring pass of the joint shards, the marginal
    counts n_x(i), n_y(i) by a second ring pass of the marginal shards (each step counts this rank's queries among
    its own rows with the visiting shard appended, less the count among its own rows); ψ(N) takes the global N.
    Not differentiable (the counts are integers), as single-process.
    """
    with torch.profiler.record_function("infofuse::distributed::ksg_mutual_information"):
        group = _dist.resolve_group(group, "ksg_mutual_information")
        error = None
        try:
            if variant not in (1, 2):
                raise ValueError(f"variant must be 1 or 2, got {variant!r}")
            if isinstance(x, torch.Tensor) and x.dim() == 1:
                x = x[:, None]
            if isinstance(y, torch.Tensor) and y.dim() == 1:
                y = y[:, None]
            _knn._check_points("x", x)
            _knn._check_points("y", y)
            if x.dim() != y.dim() or x.shape[:-1] != y.shape[:-1]:
                raise ValueError(f"x and y must pair up row by row: shapes {tuple(x.shape)} and {tuple(y.shape)}")
            if y.dtype != x.dtype:
                raise TypeError(f"y must have x's dtype {x.dtype}, got {y.dtype}")
            if y.device != x.device:
                raise ValueError(f"y must be on x's device {x.device}, got {y.device}")
            _check_k_type(k)
            _check_base(base)
            _knn._check_finite("x", x)
            _knn._check_finite("y", y)
            impl = _knn._check_impl(impl, x.device)
        except (ValueError, TypeError) as e:
            error = e
        replicated = {**_points_fields("x", x), **_points_fields("y", y), "k": k, "variant": variant, "base": base}
        sizes = _handshake("ksg_mutual_information", group, x, error, replicated, {"n": _rows(x)})["n"]
        _knn._check_k(k, sum(sizes) - 1, "the union of (x, y), each point excluded")
        squeeze = x.dim() == 2
        x3, y3 = _as3(x).detach(), _as3(y).detach()
        z3 = torch.cat([x3, y3], -1)
        acc = _ops.acc_dtype(z3.dtype)
        dx, n = x3.shape[-1], sum(sizes)
        with torch.no_grad():
            dist, _, nb = _ring_search(z3, z3, sizes, k, "chebyshev", impl, group, True, keep=slice(None))
            zero = (dist[..., k - 1] <= 0).sum(-1).to(torch.float64)
            za = z3.to(acc)
            if variant == 1:
                radius = dist[..., k - 1].to(acc)
                nx, ny = _ring_counts(za, dx, radius, radius, True, sizes, impl, group)
                terms = (_knn._psi(nx + 1) + _knn._psi(ny + 1)).sum(-1)
            else:
                diff = (za[:, :, None, :] - nb.to(acc)).abs()
                ex, ey = diff[..., :dx].amax(-1).amax(-1), diff[..., dx:].amax(-1).amax(-1)
                nx, ny = _ring_counts(za, dx, ex, ey, False, sizes, impl, group)
                terms = (_knn._psi(nx) + _knn._psi(ny)).sum(-1)
            total = _dist.all_reduce_sum(torch.stack([terms, zero], -1), group)
            if not torch.compiler.is_compiling() and int(total[:, 1].sum()):
                message = f"infofuse: {int(total[:, 1].sum())} point(s) of the union have their k-th joint neighbour "
                message += "at distance 0 (duplicated samples); KSG assumes continuous data"
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            mean = total[:, 0] / n
            if variant == 1:
                mi = _knn._psi(k) + _knn._psi(n) - mean
            else:
                mi = _knn._psi(k) - 1.0 / k + _knn._psi(n) - mean
            mi = _knn._in_base(mi.to(acc), base)
        return mi[0] if squeeze else mi


def _ring_counts(za, dx, rx, ry, strict, sizes, impl, group):
    """n_x(i), n_y(i) (B, N_r) over the union: #{j ≠ i: ‖x_j − x_i‖∞ < rx_i} (≤ unless strict), same for y, by a
    ring pass of the (x, y) shards za (B, N_r, dx + dy) in the accumulation dtype. The count kernel counts a set
    against itself: for a visiting shard, this rank's rows with the shard appended (radius 0 for the shard's rows,
    whose counts are dropped), less the count among this rank's rows alone."""
    w, me = _dist.world_size(group), _dist.rank(group)
    b, n, _ = za.shape
    halves = ((za[..., :dx], rx, slice(None, dx)), (za[..., dx:], ry, slice(dx, None)))
    own = [za.new_zeros((b, n), dtype=torch.int64) for _ in halves]
    counts = list(own)
    shard = za.contiguous()
    for step in range(w):
        src = (me - step) % w
        pending, incoming = [], None
        if step + 1 < w:  # hand the shard on while this one is counted
            incoming = shard.new_empty((b, sizes[(src - 1) % w], shard.shape[-1]))
            pending = _dist.send_recv(shard, incoming, (me + 1) % w, (me - 1) % w, group)
        if n and sizes[src]:
            for h, (mine, radius, cols) in enumerate(halves):
                if step == 0:
                    own[h] = _knn._count(mine, radius, strict, impl)
                    counts[h] = own[h]
                else:
                    both = torch.cat([mine, shard[..., cols]], 1)
                    radii = torch.cat([radius, radius.new_zeros((b, sizes[src]))], 1)
                    counts[h] = counts[h] + _knn._count(both, radii, strict, impl)[:, :n] - own[h]
        for req in pending:
            req.wait()
        if incoming is not None:
            shard = incoming
    return counts[0], counts[1]
