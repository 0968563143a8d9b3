"""Vocabulary-parallel linear cross-entropy (``infofuse.distributed.linear_cross_entropy``) on spawned gloo ranks.

Every check runs in two spawns (2 ranks: head shards 50/51; 3 ranks: 13/0/19, a two-rank subgroup and one-rank
groups), each looping over its cases and returning the results; the parent compares them, in float64, with the
single-process ``infofuse.linear_cross_entropy`` on the concatenated head (and with the plain-PyTorch reference).
The ranks return their many tensors pickled into bytes: handed to the parent as tensors, through
torch.multiprocessing's shared-memory queue, they do not all arrive once the rank has exited.
"""

from __future__ import annotations

import math
import pickle
import time

import pytest
import torch

import infofuse
from infofuse import _dist_lce, linear_cross_entropy_reference
from infofuse import distributed as idist
from tests.dist_utils import gloo_available, run_ranks
from tests.utils import assert_close, assert_graded

pytestmark = [
    pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(not infofuse.cpp_available(), reason="needs the C++ extension infofuse._C"),
]

D = 17
BATCH = (3, 7)
TWO = (50, 51)
THREE = (13, 0, 19)
SUBGROUP = (20, 12)  # the head over ranks 0 and 2 of the three

# every option of the single-process op; flags: bias, cw (class weights), tw (token weights, with a gradient)
CASES_TWO = [
    dict(reduction="mean"),
    dict(reduction="sum", bias=True, softcap=4.0),
    dict(reduction="none", bias=True, cw=True, label_smoothing=0.1, return_lse=True),
    dict(reduction="mean", cw=True, label_smoothing=0.2, z_loss=0.01, softcap=3.0, ignore_index=7, return_lse=True),
    dict(reduction="mean", bias=True, cw=True, z_loss=0.02, tw=True),
    dict(reduction="sum", label_smoothing=0.3, softcap=2.5, tw=True, chunk_size=4),
    dict(reduction="none", z_loss=0.05, tw=True, return_lse=True, impl="reference"),
    dict(reduction="mean", label_smoothing=1.0, bias=True),
]
CASES_THREE = [
    dict(reduction="mean", bias=True, cw=True, label_smoothing=0.15, z_loss=0.01, return_lse=True),
    dict(reduction="none", bias=True, label_smoothing=0.25, softcap=3.0, tw=True),
    dict(reduction="sum", cw=True, ignore_index=3, chunk_size=5),
]
ERRORS = ("smoothing", "target range", "bad shard", "target differs", "requires grad", "soft target")


def _data(v: int, seed: int, ignore_index: int = -100) -> dict:
    """Random float64 inputs (never zero), strided views of larger tensors; some targets ignored."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*BATCH, 2 * D + 1, generator=g, dtype=torch.float64)[..., 1::2]
    w = torch.randn(D + 2, v, generator=g, dtype=torch.float64).t()[:, 1 : D + 1] * (2.0 / math.sqrt(D))
    t = torch.randint(0, v, BATCH, generator=g)
    t[torch.rand(BATCH, generator=g) < 0.2] = ignore_index
    return dict(
        x=x,
        w=w,
        t=t,
        b=torch.randn(v, generator=g, dtype=torch.float64),
        cw=torch.rand(v, generator=g, dtype=torch.float64) + 0.5,
        tw=torch.rand(BATCH, generator=g, dtype=torch.float64) + 0.25,
        g_loss=torch.randn(BATCH, generator=g, dtype=torch.float64),
        g_lse=torch.randn(BATCH, generator=g, dtype=torch.float64),
    )


def _kwargs(case: dict) -> dict:
    return {
        k: case[k]
        for k in ("reduction", "ignore_index", "label_smoothing", "z_loss", "softcap", "impl", "chunk_size")
        if k in case
    }


def _call(fn, data: dict, w, b, cw, case: dict, **extra) -> dict:
    """fn's loss (and lse), backward of a random objective over them; the results and gradients."""
    x = data["x"].clone().requires_grad_()
    tw = data["tw"].clone().requires_grad_() if case.get("tw") else None
    out = fn(
        x,
        w,
        data["t"],
        linear_bias=b if case.get("bias") else None,
        weight=cw if case.get("cw") else None,
        token_weight=tw,
        return_lse=case.get("return_lse", False),
        **_kwargs(case),
        **extra,
    )
    loss, lse = out if case.get("return_lse") else (out, None)
    objective = (loss * data["g_loss"]).sum() if case["reduction"] == "none" else 1.7 * loss
    if lse is not None:
        objective = objective + (lse * data["g_lse"]).sum()
    objective.backward()
    return dict(
        loss=loss.detach(),
        lse=None if lse is None else lse.detach(),
        dx=x.grad,
        dtw=None if tw is None else tw.grad,
    )


def _sharded(data: dict, sizes, r: int, case: dict) -> dict:
    """Rank r's shard of the head (a view of the strided head), then the call and its gradients."""
    start = sum(sizes[:r])
    rows = slice(start, start + sizes[r])
    w = data["w"][rows].detach().requires_grad_()
    b = data["b"][rows].clone().requires_grad_()
    fn = case.get("fn", idist.linear_cross_entropy)
    out = _call(fn, data, w, b, data["cw"][rows], case, **case.get("extra", {}))
    return dict(out, dw=w.grad, db=b.grad if case.get("bias") else None)


def _single(data: dict, case: dict) -> dict:
    """The single-process op on the whole head."""
    w = data["w"].detach().requires_grad_()
    b = data["b"].clone().requires_grad_()
    out = _call(infofuse.linear_cross_entropy, data, w, b, data["cw"], case)
    return dict(out, dw=w.grad, db=b.grad if case.get("bias") else None)


def _compare(got: dict, want: dict, name: str, rtol: float = 1e-10) -> None:
    for key, value in want.items():
        if value is None:
            assert got[key] is None, f"{name}: {key} should be None"
            continue
        assert_close(got[key], value, rtol=rtol, atol=1e-12, name=f"{name}: {key}")


# ----------------------------------------------------------------------------------------------------------------
# 2 ranks


def _two_ranks(rank, world):
    _dist_lce._TARGET_ROWS = 8  # the target logits of the smoothing cases in several chunks (21 rows)
    res = {
        "cases": [
            _sharded(_data(sum(TWO), 10 + i, case.get("ignore_index", -100)), TWO, rank, case)
            for i, case in enumerate(CASES_TWO)
        ]
    }
    res["dtensor"] = _dtensor_case(rank)
    res["bf16"] = _bf16_case(rank)
    with idist.comm_stats() as stats:
        _sharded(_data(sum(TWO), 40), TWO, rank, dict(reduction="mean", label_smoothing=0.1))
    res["bytes"] = stats.bytes_sent
    res["errors"] = {which: _error_case(rank, which) for which in ERRORS}
    res["compiled"] = _compiled_case(rank)
    return pickle.dumps(res)


DT_CASE = dict(reduction="mean", bias=True, cw=True, label_smoothing=0.1, z_loss=0.01, return_lse=True)


def _dtensor_case(rank):
    """The head, its bias and class weights as Shard(0) DTensors on a 1-D mesh (torch.chunk's 51/50 split)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    data = _data(101, 50)
    w = torch.nn.Parameter(distribute_tensor(data["w"].contiguous(), mesh, [Shard(0)]))
    b = torch.nn.Parameter(distribute_tensor(data["b"], mesh, [Shard(0)]))
    cw = distribute_tensor(data["cw"], mesh, [Shard(0)])
    out = _call(idist.linear_cross_entropy, data, w, b, cw, DT_CASE)
    # the activations as a replicated DTensor too (their gradient: a replicated DTensor, whole on every rank)
    x = distribute_tensor(data["x"], mesh, [Replicate()]).requires_grad_()
    loss = idist.linear_cross_entropy(x, w, data["t"], linear_bias=b, weight=cw, label_smoothing=0.1)
    out["dx replicated"] = torch.autograd.grad(loss, x)[0].to_local()
    return dict(out, dw=w.grad.full_tensor(), db=b.grad.full_tensor(), local_rows=w.to_local().shape[0])


BF16_CASE = dict(reduction="mean", bias=True, cw=True, label_smoothing=0.1, z_loss=0.01, softcap=5.0)


def _bf16_data():
    data = _data(sum(TWO), 60)
    for key in ("x", "w", "b"):
        data[key] = data[key].to(torch.bfloat16)
    return data


def _bf16_case(rank):
    return _sharded(_bf16_data(), TWO, rank, BF16_CASE)


COMPILE_SIZES = (20, 27)
COMPILE_CASE = dict(reduction="mean", bias=True, label_smoothing=0.1, z_loss=0.01, softcap=4.0)


def _compiled_case(rank):
    """torch.compile(fullgraph=True) of the op on uneven shards (aot_eager: inductor's code generation adds ~15 s
    here and nothing that this op's tracing depends on)."""
    fn = torch.compile(idist.linear_cross_entropy, fullgraph=True, backend="aot_eager")
    return _sharded(_data(sum(COMPILE_SIZES), 110), COMPILE_SIZES, rank, dict(COMPILE_CASE, fn=fn))


def _error_case(rank, which):
    """One rank's (or every rank's) bad call: the message each rank raises, and how long it took."""
    data = _data(sum(TWO), 70)
    start = sum(TWO[:rank])
    x, t = data["x"], data["t"]
    w = data["w"][start : start + TWO[rank]]
    kwargs = dict(label_smoothing=0.1)
    if which == "smoothing" and rank == 1:
        kwargs["label_smoothing"] = 0.2
    if which == "target range":
        t = t.clone()
        t[1, 2] = sum(TWO)
    if which == "bad shard" and rank == 1:
        w = torch.randn(TWO[1], D + 1, dtype=torch.float64)
    if which == "target differs" and rank == 0:
        t = t.clone()
        t[0, 0] = (t[0, 0] + 1) % sum(TWO)
    if which == "requires grad" and rank == 0:
        x = x.clone().requires_grad_()
    if which == "soft target":
        t = torch.rand(*BATCH, sum(TWO), dtype=torch.float64)
    began = time.monotonic()
    try:
        idist.linear_cross_entropy(x, w, t, **kwargs)
    except (ValueError, TypeError) as e:
        return str(e), time.monotonic() - began
    return None, time.monotonic() - began


@pytest.fixture(scope="module")
def two():
    return [pickle.loads(res) for res in run_ranks(_two_ranks, 2)]


@pytest.mark.parametrize("i", range(len(CASES_TWO)))
def test_two_ranks_every_option(two, i):
    case = CASES_TWO[i]
    data = _data(sum(TWO), 10 + i, case.get("ignore_index", -100))
    want = _single(data, case)
    for r, res in enumerate(two):
        got = dict(res["cases"][i])
        got["dw"] = torch.cat([two[q]["cases"][i]["dw"] for q in range(2)])
        if case.get("bias"):
            got["db"] = torch.cat([two[q]["cases"][i]["db"] for q in range(2)])
        _compare(got, want, f"case {i} {case} rank {r}")
    if not case.get("tw"):  # the reference (no token weights there), loss and lse
        ref = linear_cross_entropy_reference(
            data["x"],
            data["w"],
            data["t"],
            linear_bias=data["b"] if case.get("bias") else None,
            weight=data["cw"] if case.get("cw") else None,
            reduction=case["reduction"],
            ignore_index=case.get("ignore_index", -100),
            label_smoothing=case.get("label_smoothing", 0.0),
            z_loss=case.get("z_loss", 0.0),
            softcap=case.get("softcap"),
            return_lse=True,
            compute_dtype=torch.float64,
        )
        assert_close(two[0]["cases"][i]["loss"], ref[0], rtol=1e-10, atol=1e-12, name="loss vs reference")
        if case.get("return_lse"):
            assert_close(two[0]["cases"][i]["lse"], ref[1], rtol=1e-10, atol=1e-12, name="lse vs reference")


def test_dtensor_head(two):
    data = _data(101, 50)
    want = _single(data, DT_CASE)
    x = data["x"].clone().requires_grad_()
    infofuse.linear_cross_entropy(
        x, data["w"], data["t"], linear_bias=data["b"], weight=data["cw"], label_smoothing=0.1
    ).backward()
    assert [res["dtensor"]["local_rows"] for res in two] == [51, 50]
    for r, res in enumerate(two):
        got = {k: v for k, v in res["dtensor"].items() if k not in ("local_rows", "dx replicated")}
        _compare(got, want, f"DTensor rank {r}")
        assert_close(res["dtensor"]["dx replicated"], x.grad, rtol=1e-10, atol=1e-12, name="replicated input's grad")


def test_bf16_graded(two):
    """bf16 inputs: our error against a float64 truth within 2× PyTorch's own bf16 error (+ a float32 floor)."""
    data = _bf16_data()

    def reference(dtype):
        up = {k: (v.to(dtype) if k in ("x", "w", "b") else v) for k, v in data.items()}

        def fn(x, w, t, **kw):
            return linear_cross_entropy_reference(
                x,
                w,
                t,
                **{k: v for k, v in kw.items() if k != "token_weight"},
                compute_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
            )

        return _single_with(fn, up)

    truth, same = reference(torch.float64), reference(torch.bfloat16)
    for r, res in enumerate(two):
        got = dict(res["bf16"])
        got["dw"] = torch.cat([two[q]["bf16"]["dw"] for q in range(2)])
        got["db"] = torch.cat([two[q]["bf16"]["db"] for q in range(2)])
        for key in ("loss", "dx", "dw", "db"):
            floor = 1e-6 if key == "loss" else 1e-3
            assert_graded(got[key], same[key], truth[key], name=f"bf16 {key} rank {r}", floor=floor)


def _single_with(fn, data):
    w = data["w"].detach().requires_grad_()
    b = data["b"].clone().requires_grad_()
    out = _call(fn, data, w, b, data["cw"], BF16_CASE)
    return dict(out, dw=w.grad, db=b.grad)


def test_bytes_sent(two):
    n = math.prod(BATCH)
    expected = _dist_lce.sent_bytes(n, D, 2, torch.float64, label_smoothing=True)
    floor = _dist_lce.min_bytes(n, D, 2, torch.float64)
    for res in two:
        assert res["bytes"] == int(expected), (res["bytes"], expected)
    assert floor < expected
    # at a realistic width the O(N) exchange and the handshake vanish beside the N×D gradient: within 1.1×
    big_n, big_d = 8192, 4096
    ratio = _dist_lce.sent_bytes(big_n, big_d, 8, torch.bfloat16, label_smoothing=True) / _dist_lce.min_bytes(
        big_n, big_d, 8, torch.bfloat16
    )
    assert 1.0 < ratio < 1.1, ratio


def test_torch_compile_fullgraph(two):
    want = _single(_data(sum(COMPILE_SIZES), 110), COMPILE_CASE)
    for r, res in enumerate(two):
        got = dict(res["compiled"])
        got["dw"] = torch.cat([two[q]["compiled"]["dw"] for q in range(2)])
        got["db"] = torch.cat([two[q]["compiled"]["db"] for q in range(2)])
        _compare(got, want, f"torch.compile rank {r}")


def test_errors_raise_on_every_rank(two):
    expect = {
        "smoothing": "disagree on `label_smoothing`",
        "target range": "outside [0, V) with V = Σ_r V_r = 101",
        "bad shard": ("rank(s) [1] of the group rejected", "linear_weight must be (V, D)"),
        "target differs": "disagree on `target (its values)`",
        "requires grad": "disagree on `input requires grad`",
        "soft target": "class-index targets only",
    }
    for which in ERRORS:
        for r, res in enumerate(two):
            message, seconds = res["errors"][which]
            assert message is not None, f"{which}: rank {r} did not raise"
            wanted = expect[which] if isinstance(expect[which], str) else expect[which][r]
            assert wanted in message, f"{which}, rank {r}: {message}"
            assert seconds < 10, f"{which}, rank {r}: took {seconds:.1f} s"


def test_needs_a_process_group():
    data = _data(sum(TWO), 0)
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        idist.linear_cross_entropy(data["x"], data["w"], data["t"])


# ----------------------------------------------------------------------------------------------------------------
# 3 ranks: an empty shard, a subgroup, one-rank groups


def _three_ranks(rank, world):
    import torch.distributed as dist

    res = {
        "cases": [
            _sharded(_data(sum(THREE), 80 + i, case.get("ignore_index", -100)), THREE, rank, case)
            for i, case in enumerate(CASES_THREE)
        ]
    }
    # the path taken under torch.compile (no handshake; shard sizes by a traced all-gather), run eagerly
    real = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        res["traced path"] = _sharded(_data(sum(THREE), 80), THREE, rank, CASES_THREE[0])
    finally:
        torch.compiler.is_compiling = real
    # a subgroup of ranks 0 and 2 holding the head 20/12 (rank 1 only takes part in creating it)
    sub = dist.new_group([0, 2])
    if rank != 1:
        case = dict(CASES_THREE[0], extra=dict(group=sub))
        res["sub"] = _sharded(_data(sum(SUBGROUP), 90), SUBGROUP, rank // 2, case)
    # one-rank groups: the single-process op exactly (each rank a third of the cases)
    own, _ = dist.new_subgroups(group_size=1)
    res["one"] = []
    for i, case in list(enumerate(CASES_TWO + CASES_THREE))[rank::3]:
        data = _data(sum(TWO), 100 + i, case.get("ignore_index", -100))
        res["one"].append((_sharded(data, (sum(TWO),), 0, dict(case, extra=dict(group=own))), _single(data, case)))
    return pickle.dumps(res)


@pytest.fixture(scope="module")
def three():
    return [pickle.loads(res) for res in run_ranks(_three_ranks, 3)]


@pytest.mark.parametrize("i", range(len(CASES_THREE)))
def test_three_ranks_with_an_empty_shard(three, i):
    case = CASES_THREE[i]
    want = _single(_data(sum(THREE), 80 + i, case.get("ignore_index", -100)), case)
    assert three[1]["cases"][i]["dw"].shape == (0, D)  # the empty shard's gradient: (0, D), not None
    for r, res in enumerate(three):
        got = dict(res["cases"][i])
        got["dw"] = torch.cat([three[q]["cases"][i]["dw"] for q in range(3)])
        if case.get("bias"):
            got["db"] = torch.cat([three[q]["cases"][i]["db"] for q in range(3)])
        _compare(got, want, f"case {i} {case} rank {r}")


def test_path_under_torch_compile(three):
    """What runs under torch.compile (no handshake; shard sizes as tensors), with an empty shard, run eagerly."""
    case = CASES_THREE[0]
    want = _single(_data(sum(THREE), 80), case)
    for r, res in enumerate(three):
        got = dict(res["traced path"])
        got["dw"] = torch.cat([three[q]["traced path"]["dw"] for q in range(3)])
        got["db"] = torch.cat([three[q]["traced path"]["db"] for q in range(3)])
        _compare(got, want, f"traced path, rank {r}")


def test_subgroup(three):
    want = _single(_data(sum(SUBGROUP), 90), CASES_THREE[0])
    assert "sub" not in three[1]
    for r in (0, 2):
        got = dict(three[r]["sub"])
        got["dw"] = torch.cat([three[q]["sub"]["dw"] for q in (0, 2)])
        got["db"] = torch.cat([three[q]["sub"]["db"] for q in (0, 2)])
        _compare(got, want, f"subgroup rank {r}")


def test_world_size_one_is_the_single_process_op_exactly(three):
    for res in three:
        for i, (got, want) in enumerate(res["one"]):
            for key, value in want.items():
                if value is None:
                    assert got[key] is None
                else:
                    assert torch.equal(got[key], value), f"case {i}: {key} differs at world size 1"
