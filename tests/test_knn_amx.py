"""The CPU knn's AMX brute force (csrc/cpu/knn_amx.h) against its tree walk: the two must return bit-identical
distances and indices (both select on the exact s of knn_kernels.h's rule 1), on every shape, dtype and data that
could break the tile screen's bound. Run where the CPU has AMX-BF16; elsewhere the path cannot run and the tests
say so."""

from __future__ import annotations

import pytest
import torch

import infofuse
from infofuse import knn, knn_entropy, knn_kl_divergence
from tests.test_knn import check_neighbours

pytestmark = pytest.mark.skipif(
    not infofuse.cpp_available() or infofuse.build_info().get("cpu_knn_amx") != "available",
    reason=f"the CPU knn's AMX path cannot run here: {infofuse.build_info().get('cpu_knn_amx', 'no C++ extension')}",
)


def _C():
    from infofuse._ext import _C

    return _C


def run_path(path, fn, *args, **kwargs):
    """fn(*args, **kwargs) with the CPU knn forced onto `path`; for "amx", also checks that the AMX path ran."""
    c = _C()
    before = c.cpu_knn_amx_problems()
    c.set_cpu_knn_path(path)
    try:
        out = fn(*args, **kwargs)
    finally:
        c.set_cpu_knn_path("auto")
    ran = c.cpu_knn_amx_problems() - before
    return out, ran


def raw_knn(x, y, k):
    """The C++ op itself, without the public function's power-of-two scaling of extreme inputs."""
    x3 = x if x.dim() == 3 else x[None]
    y3 = x3 if y is None else (y if y.dim() == 3 else y[None])
    dist, idx = torch.ops.infofuse.knn(x3, y3, k, 0, y is None)
    return (dist, idx) if x.dim() == 3 else (dist[0], idx[0])


def both_paths(x, y, k, raw=False, **kw):
    fn = raw_knn if raw else knn
    if not raw:
        kw["impl"] = "cpu"
    (d_tree, i_tree), ran_tree = run_path("tree", fn, x, y, k=k, **kw)
    (d_amx, i_amx), ran_amx = run_path("amx", fn, x, y, k=k, **kw)
    assert ran_tree == 0
    return (d_tree, i_tree), (d_amx, i_amx), ran_amx


def gaussian(shape, seed, dtype=torch.float32, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


@pytest.mark.parametrize(
    "n, m, d, k, self_",
    [
        (252, 507, 123, 3, False),  # odd sizes against every block size: 32-row groups, 32-column pairs, 32-deep
        (300, 300, 16, 1, True),
        (257, 257, 33, 17, True),  # two depth steps, the second nearly empty
        (200, 1000, 200, 64, False),  # the largest k the AMX path takes
        (65, 65, 2, 64, True),  # k = M − 1
        (40, 3000, 128, 5, False),  # one query group, many candidate chunks
    ],
)
def test_amx_equals_the_tree_walk_bit_for_bit(n, m, d, k, self_):
    x = gaussian((n, d), seed=n + d)
    y = None if self_ else gaussian((m, d), seed=m + d + 1)
    (dt, it), (da, ia), ran = both_paths(x, y, k)
    assert ran == 1
    assert torch.equal(it, ia) and torch.equal(dt, da)
    check_neighbours(x, y, k, "euclidean", da, ia)


@pytest.mark.parametrize(
    "data",
    ["far_from_origin", "integer_grid_ties", "duplicates", "tiny_scale", "mixed_scales", "noncontiguous_batched"],
)
def test_amx_on_data_that_strains_the_screen(data):
    k = 4
    y = None
    if data == "far_from_origin":  # the centre must absorb the offset, or every norm dwarfs every distance
        x = gaussian((301, 40), seed=1, offset=3.0e4)
    elif data == "integer_grid_ties":  # many pairs at exactly equal distances: ties go to the smaller index
        x = torch.randint(0, 3, (400, 24), generator=torch.Generator().manual_seed(2)).float()
    elif data == "duplicates":  # distance 0 pairs, and a query whose k-th distance is 0
        base = gaussian((90, 20), seed=3)
        x = torch.cat([base, base, base[:30], base[:7]])
    elif data == "tiny_scale":  # thresholds under the screen's 2^-60 (the raw op: knn() would rescale them)
        x = gaussian((150, 20), seed=4, scale=1e-25)
    elif data == "mixed_scales":  # norms that differ by 10^6 between points
        x = torch.cat([gaussian((100, 30), seed=5, scale=1e-3), gaussian((100, 30), seed=6, scale=1e3)])
    else:
        x = gaussian((3, 120, 2 * 37), seed=7)[..., ::2]
        assert not x.is_contiguous()
    (dt, it), (da, ia), ran = both_paths(x, y, k, raw=data == "tiny_scale")
    assert ran == (3 if x.dim() == 3 else 1)
    assert torch.equal(it, ia) and torch.equal(dt, da)
    check_neighbours(x, y, k, "euclidean", da, ia)
    if data == "duplicates":
        assert (da[:90, 0] == 0).all()


def test_amx_falls_back_to_the_tree_where_its_bound_cannot_hold():
    # norms above 2^100: the screen's sums would lose the bound, the entry goes to the tree walk
    x = gaussian((200, 16), seed=8, scale=1e16)
    (dt, it), (da, ia), ran = both_paths(x, None, 3, raw=True)
    assert ran == 0
    assert torch.equal(it, ia) and torch.equal(dt, da)
    # k above the AMX path's 64: the tree walk
    x = gaussian((150, 16), seed=9)
    (dt, it), (da, ia), ran = both_paths(x, None, 65)
    assert ran == 0
    assert torch.equal(it, ia) and torch.equal(dt, da)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amx_half_inputs_are_upcast_and_exact(dtype):
    x, y = gaussian((130, 48), seed=10, dtype=dtype), gaussian((260, 48), seed=11, dtype=dtype)
    (dt, it), (da, ia), ran = both_paths(x, y, 3)
    assert ran == 1 and da.dtype == torch.float32
    assert torch.equal(it, ia) and torch.equal(dt, da)
    check_neighbours(x.float(), y.float(), 3, "euclidean", da, ia)


def test_amx_cosine_and_estimators_match_the_tree():
    x = gaussian((400, 24), seed=12)
    y = gaussian((350, 24), seed=13)
    (dt, it), (da, ia), ran = both_paths(x, y, 5, metric="cosine")
    assert ran == 1
    assert torch.equal(it, ia) and torch.equal(dt, da)
    for fn, args in [(knn_entropy, (x,)), (knn_kl_divergence, (x, y))]:
        tree, _ = run_path("tree", fn, *args, k=3, impl="cpu")
        amx, ran = run_path("amx", fn, *args, k=3, impl="cpu")
        assert ran >= 1
        assert torch.equal(tree, amx), fn.__name__


def test_knn_path_setting_is_checked():
    with pytest.raises(ValueError, match="knn path must be 'auto', 'tree' or 'amx'"):
        _C().set_cpu_knn_path("gemm")
