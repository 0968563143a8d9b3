"""The collectives and the handshake under ``infofuse.distributed``: 3 gloo ranks with uneven rows."""

from __future__ import annotations

import time

import pytest
import torch

from infofuse import _dist
from tests.dist_utils import gloo_available, run_ranks

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")

SIZES = (13, 19, 7)


def _rows(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(SIZES[rank], 5, generator=g, dtype=torch.float64)


def _collectives(rank, world):
    group = _dist.resolve_group(None, "test")
    x = _rows(rank).requires_grad_()
    sizes = _dist.agree("test", group, torch.device("cpu"), {"d": 5, "dtype": x.dtype}, {"n": x.shape[0]})["n"]
    with _dist.comm_stats() as stats:
        full = _dist.gather_rows(x, sizes, group)
        # every rank weighs the gathered rows differently: the owner's gradient is the sum over ranks
        coef = torch.arange(full.numel(), dtype=torch.float64).view_as(full) * (rank + 1)
        total = _dist.all_reduce_sum((full * coef).sum(), group, grad_scale=1.0)
        total.backward()
        stacked = _dist.gather_replicated(torch.full((4,), float(rank), dtype=torch.float64), group)
    return dict(
        sizes=sizes, full=full.detach(), grad=x.grad, total=total.detach(), stacked=stacked, sent=stats.bytes_sent
    )


CASES = ("dtype", "float", "fields", "error")


def _mismatches(rank, world):
    return {which: _mismatch(rank, which) for which in CASES}


def _mismatch(rank, which):
    group = _dist.resolve_group(None, "test")
    replicated = {"d": 5, "dtype": torch.float32, "smoothing": 0.1}
    if which == "dtype" and rank == 1:
        replicated["dtype"] = torch.float64
    if which == "float" and rank == 2:
        replicated["smoothing"] = 0.2
    if which == "fields" and rank == 0:
        replicated["bias"] = True
    error = ValueError("input: expected (N, D)") if which == "error" and rank == 2 else None
    start = time.monotonic()
    try:
        _dist.agree("test", group, torch.device("cpu"), replicated, {"n": rank}, error=error)
    except ValueError as e:
        return str(e), time.monotonic() - start
    return None, time.monotonic() - start


def test_gather_rows_reduce_scatter_and_stack():
    out = run_ranks(_collectives, 3)
    whole = torch.cat([_rows(r) for r in range(3)])
    coef = torch.arange(whole.numel(), dtype=torch.float64).view_as(whole)
    offs = _dist.offsets(SIZES)
    for r, res in enumerate(out):
        assert res["sizes"] == list(SIZES)
        torch.testing.assert_close(res["full"], whole, rtol=0, atol=0)
        # Σ_ranks (r + 1) · coef over this rank's rows = 6 · coef
        expected = 6 * coef[offs[r] : offs[r] + SIZES[r]]
        torch.testing.assert_close(res["grad"], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(res["total"], 6 * (whole * coef).sum(), rtol=1e-12, atol=0)
        torch.testing.assert_close(res["stacked"], torch.arange(3.0, dtype=torch.float64)[:, None].expand(3, 4))
        assert res["sent"] > 0


def test_handshake_disagreement_raises_on_every_rank():
    """Four disagreements in one spawn (each costs seconds): each one raises on every rank, within seconds."""
    out = run_ranks(_mismatches, 3, timeout=30)
    for r, which in ((r, which) for r in range(3) for which in CASES):
        message, seconds = out[r][which]
        assert message is not None, f"rank {r} did not raise on a disagreement in {which}"
        assert seconds < 10
        if which == "dtype":
            assert "`dtype`" in message and "ranks [0, 2] vs ranks [1]" in message
        elif which == "float":
            assert "`smoothing`" in message
        elif which == "fields":
            assert "call it differently" in message
        else:
            assert ("input: expected (N, D)" in message) if r == 2 else ("rank(s) [2]" in message)
