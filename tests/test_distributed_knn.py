"""infofuse.distributed's sharded k-NN search and estimators against the single-process ops on the union.

Spawned gloo ranks on CPU (each spawn costs seconds, so each rank runs many cases and returns them; the parent
compares them in float64 with ``infofuse.knn`` & co. on the concatenation of the shards, and with
``infofuse.reference.knn_reference``). Shards are uneven (13/19/7 points; y 11/4/17), and k = 10 exceeds the
smallest shard, so neighbours must come from other ranks.
"""

from __future__ import annotations

import io
import time
import warnings

import pytest
import torch
import torch.distributed as dist

import infofuse
from infofuse import _dist, distributed
from infofuse.reference import knn_reference
from tests.dist_utils import free_port, gloo_available, run_ranks
from tests.utils import assert_close, assert_graded

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")

SIZES = (13, 19, 7)
EMPTY = (20, 0, 9)  # a rank without points
YSIZES = (11, 4, 17)
D = 5
F64 = torch.float64


def _shard(seed: int, rank: int, sizes, d: int = D, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + rank)
    shape = (sizes[rank], d) if batch is None else (batch, sizes[rank], d)
    return torch.randn(shape, generator=g, dtype=F64)


def _union(seed: int, sizes, d: int = D, batch: int | None = None) -> torch.Tensor:
    return torch.cat([_shard(seed, r, sizes, d, batch) for r in range(len(sizes))], -2)


def _mine(t: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    """This rank's rows of a tensor over the union's rows (dim -2 of points, or dim -2 of (…, N, k) results)."""
    off = _dist.offsets(sizes)[rank]
    return t[..., off : off + sizes[rank], :]


def _cosine_shard(rank: int, sizes) -> torch.Tensor:
    x = _shard(7, rank, sizes)
    if sizes[rank] == max(sizes):  # zero vectors on one rank: cosine distance 1 to everything
        x[2] = 0
        x[5] = 0
    return x


# ---------------------------------------------------------------- the cases (run in the ranks and in the parent)

KNN_CASES = [(metric, k, two) for metric in ("euclidean", "chebyshev", "cosine") for k in (1, 10) for two in (0, 1)]


def _knn_inputs(rank, sizes, metric, two, union=False):
    xs = _union(7, sizes) if union and metric != "cosine" else None
    if metric == "cosine":
        x = torch.cat([_cosine_shard(r, sizes) for r in range(len(sizes))]) if union else _cosine_shard(rank, sizes)
    else:
        x = xs if union else _shard(7, rank, sizes)
    if not two:
        return x, None
    ysizes = YSIZES[: len(sizes)]
    return x, (_union(8, ysizes) if union else _shard(8, rank, ysizes))


def _points(seed: int, which: str = "x", d: int = D, batch: int | None = None, dtype=F64, scale=1.0, shift=0.0):
    """A sample as a function of (rank, sizes): this rank's shard, or the union for rank None; ``which``: "x"
    (sharded as ``sizes``) or "y" (as YSIZES)."""

    def make(rank, sizes):
        s = YSIZES[: len(sizes)] if which == "y" else sizes
        t = _union(seed, s, d, batch) if rank is None else _shard(seed, rank, s, d, batch)
        return (t * scale + shift).to(dtype)

    make.which, make.dtype = which, dtype

    return make


def _with_duplicate(rank, sizes):
    """x whose last rank's row 0 repeats rank 0's row 3: a zero distance across ranks, floored over the union."""
    x = _points(1)(rank, sizes)
    last = len(sizes) - 1
    if rank is None:
        x[_dist.offsets(sizes)[last]] = x[3]
    elif rank == last:
        x[0] = _points(1)(0, sizes)[3]
    return x


def _ksg_x(rank, sizes):
    return _points(4, d=2)(rank, sizes)


def _ksg_y(rank, sizes):
    return _ksg_x(rank, sizes)[..., :1] * 0.8 + _points(5, d=1)(rank, sizes) * 0.6


# (name, function, its options, its inputs, differentiable, duplicates expected)
ESTIMATES = [
    ("entropy k=3", "knn_entropy", dict(k=3), [_points(1)], True, False),
    ("entropy chebyshev bits", "knn_entropy", dict(k=1, metric="chebyshev", base=2.0), [_points(1)], True, False),
    ("entropy k=10", "knn_entropy", dict(k=10), [_points(1)], True, False),
    ("entropy batched", "knn_entropy", dict(k=2), [_points(2, batch=2)], True, False),
    ("entropy duplicate", "knn_entropy", dict(k=1), [_with_duplicate], True, True),
    ("koleo", "koleo_loss", dict(), [_points(1)], True, False),
    ("koleo eps", "koleo_loss", dict(eps=0.5), [_points(1)], True, False),
    ("kl k=1", "knn_kl_divergence", dict(k=1), [_points(1), _points(3, "y", scale=1.5, shift=0.3)], True, False),
    (
        "kl k=4 bits",
        "knn_kl_divergence",
        dict(k=4, base=2.0),
        [_points(1), _points(3, "y", scale=1.5, shift=0.3)],
        True,
        False,
    ),
    ("entropy float32", "knn_entropy", dict(k=3), [_points(1, dtype=torch.float32)], True, False),
    ("koleo bfloat16", "koleo_loss", dict(), [_points(1, dtype=torch.bfloat16)], True, False),
    (
        "kl float32",
        "knn_kl_divergence",
        dict(k=2),
        [_points(1, dtype=torch.float32), _points(3, "y", dtype=torch.float32, scale=1.5, shift=0.3)],
        True,
        False,
    ),
    ("ksg 1", "ksg_mutual_information", dict(k=3), [_ksg_x, _ksg_y], False, False),
    ("ksg 2 bits", "ksg_mutual_information", dict(k=1, variant=2, base=2.0), [_ksg_x, _ksg_y], False, False),
    ("ksg 2 k=10", "ksg_mutual_information", dict(k=10, variant=2), [_ksg_x, _ksg_y], False, False),
    (
        "ksg 1-D",
        "ksg_mutual_information",
        dict(k=2),
        [lambda *a: _ksg_x(*a)[:, 0], lambda *a: _ksg_y(*a)[:, 0]],
        False,
        False,
    ),
]


def _evaluate(lib, rank, sizes, world, upcast=False):
    """Every case of ESTIMATES with ``lib`` (infofuse.distributed on this rank's shards, or infofuse on the union
    for rank None): (value, gradients of the inputs, Hessian-vector products along cos(3x), number of warnings);
    the distributed derivatives divided by W (rank r's backward carries W × its part). ``upcast``: the inputs in
    float64 (the truth of the cases in other dtypes)."""
    out = {}
    for name, fn, options, inputs, differentiable, _ in ESTIMATES:
        ts = [make(rank, sizes) for make in inputs]
        ts = [(t.double() if upcast else t).requires_grad_(differentiable) for t in ts]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            value = getattr(lib, fn)(*ts, **options)
        grads, hvps = [], []
        if differentiable:
            grads = torch.autograd.grad(value.sum(), ts, create_graph=True)
            direction = sum((g * torch.cos(3 * t.detach())).sum() for g, t in zip(grads, ts, strict=True))
            hvps = [h / world for h in torch.autograd.grad(direction, ts)]
            grads = [g.detach() / world for g in grads]
        else:
            assert not value.requires_grad
        runtime = sum(issubclass(w.category, RuntimeWarning) for w in caught)
        out[name] = (value.detach(), grads, hvps, runtime)
    return out


def _estimates(rank, world, sizes):
    return _evaluate(distributed, rank, sizes, world)


def _searches(rank, world, sizes):
    out = {}
    for metric, k, two in KNN_CASES:
        x, y = _knn_inputs(rank, sizes, metric, two)
        out[("knn", metric, k, two)] = distributed.knn(x, y, k, metric=metric)
    out[("knn", "batched")] = distributed.knn(_shard(9, rank, sizes, batch=3), k=4)
    with _dist.comm_stats() as stats:
        distributed.knn(_shard(7, rank, sizes), k=3, metric="chebyshev")
    out["ring bytes"] = stats.by_kind.get("send", 0)
    return out


# ---------------------------------------------------------------- the DDP contract


def _encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def _ddp(rank, world, sizes):
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for name in ("koleo", "entropy"):
        model = DistributedDataParallel(_encoder())
        z = model(_shard(6, rank, sizes))
        loss = distributed.koleo_loss(z) if name == "koleo" else distributed.knn_entropy(z, k=2)
        loss.backward()
        out[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    return out


def _ddp_expected(sizes):
    out = {}
    for name in ("koleo", "entropy"):
        model = _encoder()
        z = model(_union(6, sizes))
        loss = infofuse.koleo_loss(z) if name == "koleo" else infofuse.knn_entropy(z, k=2)
        loss.backward()
        out[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    return out


def _compiled(rank, world):
    """A compiled encoder whose loss is koleo_loss: its graph breaks at the call, value and gradients as eager."""
    model = _encoder()
    x = _shard(6, rank, SIZES)
    out = []
    for fn in (
        lambda t: distributed.koleo_loss(model(t)),
        torch.compile(lambda t: distributed.koleo_loss(model(t)), backend="aot_eager"),
    ):
        loss = fn(x)
        out.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    return out


# ---------------------------------------------------------------- disagreements


def _disagreements(rank, world):
    """Each case must raise on every rank (returns the messages and how long each rank took)."""
    x = _shard(1, rank, SIZES)
    cases = {
        "k": lambda: distributed.knn_entropy(x, k=2 if rank == 1 else 3),
        "metric": lambda: distributed.knn(x, k=2, metric="cosine" if rank == 0 else "euclidean"),
        "d": lambda: distributed.koleo_loss(x[:, : 4 if rank == 1 else 5]),
        "bad input": lambda: distributed.knn(x.long() if rank == 0 else x, k=2),
        "k too large": lambda: distributed.knn(x, k=sum(SIZES[:world])),
    }
    out = {}
    for name, fn in cases.items():
        start = time.monotonic()
        try:
            fn()
            out[name] = (None, time.monotonic() - start)
        except (ValueError, TypeError) as e:
            out[name] = (f"{type(e).__name__}: {e}", time.monotonic() - start)
    return out


# ---------------------------------------------------------------- what each spawn runs


def _packed(out) -> bytes:
    """The results serialised whole: many tensors put on the spawn queue one by one travel as shared-memory
    handles that the parent may open only after the rank has exited (then it gets no answer)."""
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


def _unpacked(results) -> list:
    return [torch.load(io.BytesIO(b), weights_only=False) for b in results]


def _three_ranks(rank, world):
    return _packed(
        dict(
            searches=_searches(rank, world, SIZES),
            estimates=_estimates(rank, world, SIZES),
            ddp=_ddp(rank, world, SIZES),
            empty=dict(searches=_searches(rank, world, EMPTY), estimates=_estimates(rank, world, EMPTY)),
        )
    )


def _two_ranks(rank, world):
    sizes = SIZES[:2]
    return _packed(
        dict(
            searches=_searches(rank, world, sizes),
            estimates=_estimates(rank, world, sizes),
            disagreements=_disagreements(rank, world),
            compiled=_compiled(rank, world),
        )
    )


# ---------------------------------------------------------------- comparisons in the parent


def _check_searches(results, sizes, exact=False):
    world = len(sizes)
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-12, atol=1e-12)
    for metric, k, two in KNN_CASES:
        x, y = _knn_inputs(0, sizes, metric, two, union=True)
        dist, idx = infofuse.knn(x, y, k, metric=metric)
        if metric != "cosine":  # the plain definition, too (its cosine has no zero-vector rule)
            ref_dist, ref_idx = knn_reference(x, y, k, metric=metric)
            assert torch.equal(ref_idx, idx)
            assert_close(dist, ref_dist, rtol=1e-12, atol=1e-12, name=f"reference {metric}")
        for r in range(world):
            got_dist, got_idx = results[r]["searches"][("knn", metric, k, two)]
            name = f"knn {metric} k={k} y={bool(two)} rank {r}"
            assert torch.equal(got_idx, _mine(idx, sizes, r)), name
            assert_close(got_dist, _mine(dist, sizes, r), **tol, name=name)
    dist, idx = infofuse.knn(_union(9, sizes, batch=3), k=4)
    for r in range(world):
        got_dist, got_idx = results[r]["searches"][("knn", "batched")]
        assert torch.equal(got_idx, _mine(idx, sizes, r))
        assert_close(got_dist, _mine(dist, sizes, r), **tol, name="batched knn")
        # the ring: every shard but the next rank's own passes through this rank once
        assert results[r]["searches"]["ring bytes"] == (sum(sizes) - sizes[(r + 1) % world]) * D * 8


def _check_estimates(results, sizes, exact=False):
    """float64 cases against the single-process op on the union (bit for bit where ``exact``); the others graded:
    their error against the float64 truth within twice the single-process op's at the same dtype."""
    world = len(sizes)
    expected = _evaluate(infofuse, None, sizes, 1)
    truth = _evaluate(infofuse, None, sizes, 1, upcast=True)
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-11, atol=1e-12)
    for name, _, _, inputs, _, duplicates in ESTIMATES:
        assert expected[name][3] == int(duplicates), name
        graded = any(getattr(make, "dtype", F64) != F64 for make in inputs)
        for r in range(world):
            got = results[r]["estimates"][name]
            assert got[3] == expected[name][3], f"{name} rank {r}: {got[3]} warnings"
            assert torch.equal(got[0], results[0]["estimates"][name][0]), f"{name}: ranks disagree on the value"
            parts = [("value", got[0], expected[name][0], truth[name][0])]
            for what, i in ((w, i) for w in (1, 2) for i in range(len(expected[name][w]))):
                s = YSIZES[:world] if getattr(inputs[i], "which", "x") == "y" else sizes
                same, true = (_mine(t[what][i], s, r) for t in (expected[name], truth[name]))
                parts.append((f"{('gradient', 'hvp')[what - 1]} {i}", got[what][i], same, true))
            for what, ours, same, true in parts:
                if graded:
                    assert_graded(ours, same, true, name=f"{name} {what} rank {r}", floor=1e-6)
                else:
                    assert_close(ours, same, **tol, name=f"{name} {what} rank {r}")


def test_three_uneven_ranks_equal_single_process_and_ddp_contract():
    results = _unpacked(run_ranks(_three_ranks, 3))
    _check_searches(results, SIZES)
    _check_estimates(results, SIZES)
    _check_searches([r["empty"] for r in results], EMPTY)
    _check_estimates([r["empty"] for r in results], EMPTY)
    expected = _ddp_expected(SIZES)
    for name, (loss, grads) in expected.items():
        for r in range(3):
            got_loss, got_grads = results[r]["ddp"][name]
            assert_close(got_loss, loss, rtol=1e-12, atol=1e-12, name=f"DDP {name} loss rank {r}")
            for i, (a, e) in enumerate(zip(got_grads, grads, strict=True)):
                assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"DDP {name} parameter {i} rank {r}")


def test_two_ranks_and_disagreements_raise_on_every_rank():
    results = _unpacked(run_ranks(_two_ranks, 2, timeout=60))
    _check_searches(results, SIZES[:2])
    _check_estimates(results, SIZES[:2])
    for r in range(2):
        got = results[r]["disagreements"]
        for name, (message, seconds) in got.items():
            assert message is not None, f"rank {r} did not raise on {name}"
            assert seconds < 10, f"{name} took {seconds:.1f} s on rank {r}"
        assert "`k`" in got["k"][0] and "`metric`" in got["metric"][0] and "`x.d`" in got["d"][0]
        bad = got["bad input"][0]
        assert ("TypeError" in bad and "x must be float32" in bad) if r == 0 else "rank(s) [0]" in bad
        assert "k = 32 exceeds the 31 candidate" in got["k too large"][0]
        (eager, eager_grads), (compiled, compiled_grads) = results[r]["compiled"]
        assert_close(compiled, eager, rtol=1e-12, atol=0, name="compiled koleo_loss")
        for a, e in zip(compiled_grads, eager_grads, strict=True):
            assert_close(a, e, rtol=1e-12, atol=1e-15, name="compiled koleo_loss gradient")


def test_world_size_one_equals_single_process_exactly():
    """A group of one, in this process (no spawn): bit for bit the single-process ops."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        sizes = (sum(SIZES),)
        results = [dict(searches=_searches(0, 1, sizes), estimates=_estimates(0, 1, sizes))]
    finally:
        dist.destroy_process_group()
    _check_searches(results, sizes, exact=True)
    _check_estimates(results, sizes, exact=True)
