"""``infofuse.distributed``'s data-parallel contrastive losses on gloo ranks (CPU, float64): every loss and option,
both schedules, uneven local batches 13/19/7 (and 13/19 on a two-rank subgroup, one-rank groups, a rank with no
rows), against the single-process op and the dense reference on the concatenated batch; bf16 graded against
PyTorch's own bf16 error; the Triton kernels (interpreted) under the all_gather schedule; the gradient contract
through DistributedDataParallel and FSDP2; open_clip's gather-with-grad ClipLoss; a disagreement between ranks.

One spawn (it costs seconds): the ranks loop over the cases and return plain lists (tensors do not survive the
queue once their rank exits), compared here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time

import pytest
import torch

import infofuse
from infofuse.bench.info_nce import open_clip_loss_module
from tests.dist_utils import gloo_available, run_ranks
from tests.utils import assert_close, assert_graded

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")

SIZES = (13, 19, 7)  # queries (images, samples) by rank
KEY_SIZES = (15, 20, 9)  # keys by rank where the key side has extra (hard) negatives
EMPTY, EMPTY_KEYS = (0, 5, 3), (0, 6, 4)  # a rank without rows
SPLIT = (16, 15, 8)  # keys split unlike the queries (same total)
D = 6
SCHEDULES = ("all_gather", "ring")
TOL = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the cases


def _randn(rows: int, seed: int, d: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g, dtype=torch.float64) * (2.0 / d**0.5)


def _ints(n: int, high: int, seed: int) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed))


def _derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation of 0 … n − 1 with no fixed point."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[(torch.argsort(perm) + 1) % n]


class _Side:
    """Where a case runs: the whole batch (``rank`` None, single-process) or one rank's rows; ``dtype`` of the
    embeddings."""

    def __init__(self, rank, world, dtype=torch.float64):
        self.rank, self.world, self.dtype = rank, world, dtype

    def rows(self, t, sizes):
        if self.rank is None:
            return t
        sizes = sizes[: self.world]
        start = sum(sizes[: self.rank])
        return t[start : start + sizes[self.rank]]

    def leaf(self, t, sizes, noncontig=False):
        x = self.rows(t, sizes).to(self.dtype).clone()
        if noncontig:  # column-major: a non-contiguous leaf
            x = x.T.contiguous().T
        return x.requires_grad_()

    def order(self, sizes):
        """Global indices of this side's rows (of its per-row outputs, reduction="none")."""
        sizes = sizes[: self.world]
        start = 0 if self.rank is None else sum(sizes[: self.rank])
        return torch.arange(start, start + (sum(sizes) if self.rank is None else sizes[self.rank]))


def _case(name: str, side: _Side, ops, extra: dict):
    """(output, leaves by name, global indices of "none" rows) of case ``name``: ``ops`` is ``infofuse`` or
    ``infofuse.distributed``, ``extra`` the distributed keywords (empty for the single-process op). A name ending in
    ``@impl`` runs that single-process kernel (Triton's, on float32) for the all_gather schedule's blocks; one
    ending in ``#empty`` gives rank 0 no rows."""
    name, _, impl = name.partition("@")
    name, _, variant = name.partition("#")
    sizes, key_sizes = (EMPTY, EMPTY_KEYS) if variant == "empty" else (SIZES, KEY_SIZES)
    if impl:
        extra = {**extra, "impl": impl}
        side = _Side(side.rank, side.world, torch.float32)
    world = side.world
    n_all, m_all = sum(sizes[:world]), sum(key_sizes[:world])
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.3, dtype=torch.float64, requires_grad=True)
    temperature = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    kind, _, option = name.partition(":")
    order = side.order(sizes)
    if kind == "info_nce":
        extra_keys = option in ("hard", "hard_labels")
        ksizes = key_sizes if extra_keys else SPLIT if option == "split" else sizes
        q = side.leaf(_randn(n_all, 1), sizes, noncontig=option == "default")
        k = side.leaf(_randn(m_all if extra_keys else n_all, 2), ksizes)
        kw = dict(scale=scale, reduction="mean")
        if option == "hard":  # targets anywhere among the global keys
            kw.update(target=side.rows(_ints(n_all, m_all, 3), sizes), reduction="sum")
        elif option == "hard_labels":  # false-negative masking with extra keys
            kw.update(
                target=side.rows(_ints(n_all, m_all, 4), sizes),
                labels=side.rows(_ints(n_all, 4, 5), sizes),
                key_labels=side.rows(_ints(m_all, 4, 6), key_sizes),
                reduction="none",
            )
        elif option == "symmetric":
            kw.update(target=side.rows(torch.randperm(n_all, generator=torch.Generator().manual_seed(7)), sizes))
            kw.update(symmetric=True, reduction="sum")
        elif option == "symmetric_none":
            kw.update(symmetric=True, reduction="none", labels=side.rows(_ints(n_all, 5, 8), sizes))
        elif option == "exclude_self":  # every option at once
            kw.update(
                target=side.rows(_derangement(n_all, 9), sizes),
                labels=side.rows(_ints(n_all, 3, 10), sizes),
                symmetric=True,
                exclude_self=True,
            )
        elif option == "split":  # symmetric, every option, keys on other ranks than their queries
            kw.update(
                target=side.rows(_derangement(n_all, 12), sizes),
                labels=side.rows(_ints(n_all, 3, 13), sizes),
                key_labels=side.rows(_ints(n_all, 3, 14), SPLIT),
                symmetric=True,
                exclude_self=True,
            )
        elif option == "exclude_self_none":
            kw.update(target=side.rows(_derangement(n_all, 11), sizes), exclude_self=True, reduction="none")
        out = ops.info_nce(q, k, **kw, **extra)
        return out, dict(query=q, key=k, scale=scale), order
    if kind == "clip":
        dtype = torch.bfloat16 if option == "bf16" else torch.float64
        image = side.leaf(_randn(n_all, 12).to(dtype), sizes)
        text = side.leaf(_randn(n_all, 13).to(dtype), sizes, noncontig=True)
        out = ops.clip_loss(image, text, scale, reduction="mean" if option == "bf16" else option, **extra)
        return out, dict(image=image, text=text, scale=scale), order
    if kind == "siglip":
        extra_keys = option != "square"
        ksizes = key_sizes if extra_keys else sizes
        image = side.leaf(_randn(n_all, 14), sizes)
        text = side.leaf(_randn(m_all if extra_keys else n_all, 15), ksizes)
        reduction = "mean" if option == "square" else option
        out = ops.siglip_loss(image, text, scale, bias, reduction=reduction, **extra)
        return out, dict(image=image, text=text, scale=scale, bias=bias), order
    if kind == "nt_xent":
        z1, z2 = side.leaf(_randn(n_all, 16), sizes), side.leaf(_randn(n_all, 17), sizes)
        out = ops.nt_xent(z1, z2, temperature, reduction=option, **extra)
        order = torch.cat([order, order + n_all])  # z1's anchors, then z2's
        return out, dict(z1=z1, z2=z2, temperature=temperature), order
    if kind == "supcon":
        views = 2 if option == "views" else 0
        if views:  # (B, V, D) with labels (B,): flattened view-major on each rank
            g = torch.Generator().manual_seed(18)
            feats = torch.randn(n_all, views, D, generator=g, dtype=torch.float64) * (2.0 / D**0.5)
            features = side.leaf(feats, sizes)
            labels = side.rows(_ints(n_all, 6, 19), sizes)
            order = torch.cat([order + v * n_all for v in range(views)])
        else:  # a singleton label: a row without a positive, left out of the mean
            labels = _ints(n_all, 4, 20)
            labels[5] = 99
            features, labels = side.leaf(_randn(n_all, 21), sizes), side.rows(labels, sizes)
        reduction = "mean" if option == "views" else option
        out = ops.supcon_loss(features, labels, temperature, reduction=reduction, **extra)
        return out, dict(features=features, temperature=temperature), order
    raise AssertionError(name)


CASES = (
    "info_nce:default",
    "info_nce:hard",
    "info_nce:hard_labels",
    "info_nce:symmetric",
    "info_nce:symmetric_none",
    "info_nce:exclude_self",
    "info_nce:exclude_self_none",
    "clip:mean",
    "clip:none",
    "siglip:mean",
    "siglip:square",
    "siglip:sum",
    "siglip:none",
    "nt_xent:mean",
    "nt_xent:none",
    "supcon:mean",
    "supcon:views",
    "supcon:sum",
    "supcon:none",
)


TRITON_CASES = ("info_nce:exclude_self@fused", "siglip:mean@chunked", "supcon:mean@chunked", "nt_xent:none@fused")
MORE_CASES = (  # 3 ranks only
    "info_nce:split",
    "info_nce:hard_labels#empty",
    "clip:mean#empty",
    "siglip:sum#empty",
    "nt_xent:none#empty",
    "supcon:mean#empty",
)
TOL32 = dict(rtol=2e-5, atol=2e-6)


def _weights(n: int) -> torch.Tensor:
    """Upstream gradient of a "none" output (by global row)."""
    return torch.linspace(0.5, 1.5, n, dtype=torch.float64)


def _total(name: str, world: int) -> int:
    """The number of per-row outputs of case ``name`` on the global batch."""
    n = sum((EMPTY if name.endswith("#empty") else SIZES)[:world])
    return 2 * n if name.startswith("nt_xent") or name == "supcon:views" else n


def _run(name, side, ops, extra):
    out, leaves, order = _case(name, side, ops, extra)
    if out.dim() == 0:
        out.backward()
    else:
        (out * _weights(_total(name, side.world))[order]).sum().backward()
    grads = {k: (v.grad.tolist() if v.grad is not None else None) for k, v in leaves.items()}
    return dict(out=out.detach().tolist(), order=order.tolist(), grads=grads)


def _expected(name, world, impl=None):
    """The single-process op (or its dense reference, impl="reference") on the concatenated batch."""
    out, leaves, _ = _case(name, _Side(None, world), infofuse, {} if impl is None else dict(impl=impl))
    if out.dim():
        (out * _weights(out.numel())).sum().backward()
    else:
        out.backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


# ---------------------------------------------------------------- every case: 3 ranks, 2 ranks, 1 rank


def _sweep(rank, world):
    import torch.distributed as dist

    import infofuse.distributed as idist

    results = {}
    for schedule in SCHEDULES:
        for name in CASES:
            results[(3, schedule, name)] = _run(name, _Side(rank, world), idist, dict(schedule=schedule))
    for schedule in SCHEDULES:
        results[(3, schedule, "clip:bf16")] = _run("clip:bf16", _Side(rank, world), idist, dict(schedule=schedule))
    results[(3, "all_gather-reference", "info_nce:exclude_self")] = _run(
        "info_nce:exclude_self", _Side(rank, world), idist, dict(impl="reference")
    )
    for schedule in SCHEDULES:
        for name in MORE_CASES:
            results[(3, schedule, name)] = _run(name, _Side(rank, world), idist, dict(schedule=schedule))
    for name in TRITON_CASES:  # the kernels that run on CUDA, here in Triton's interpreter
        results[(3, "all_gather", name)] = _run(name, _Side(rank, world), idist, {})
    pair = dist.new_group([0, 1])
    singles = [dist.new_group([r]) for r in range(world)]
    if rank < 2:
        for schedule in SCHEDULES:
            for name in ("info_nce:exclude_self", "clip:mean", "siglip:mean", "nt_xent:mean", "supcon:none"):
                results[(2, schedule, name)] = _run(name, _Side(rank, 2), idist, dict(schedule=schedule, group=pair))
    if rank == 0:  # one rank: bit for bit the single-process op
        for schedule in SCHEDULES:
            for name in CASES:
                results[(1, schedule, name)] = _run(
                    name, _Side(None, 1), idist, dict(schedule=schedule, group=singles[0])
                )
                results[(1, "single-process", name)] = _run(name, _Side(None, 1), infofuse, {})
    dist.barrier()
    return results


def _compare(res, world, truth, tol, where):
    """Ranks' results ``res`` against ``truth`` = (value, gradients) of the single-process op on the global batch."""
    value, grads = truth
    if value.dim() == 0:
        for r in res:  # the global loss on every rank
            assert_close(torch.tensor(r["out"], dtype=torch.float64), value, **tol, name=f"{where}: loss")
    else:
        order = torch.cat([torch.tensor(r["order"], dtype=torch.long) for r in res])
        got = torch.cat([torch.tensor(r["out"], dtype=torch.float64) for r in res])
        assert_close(got, value[order], **tol, name=f"{where}: per-row losses")
    for leaf, grad in grads.items():
        parts = [torch.tensor(r["grads"][leaf], dtype=torch.float64) for r in res]
        # each rank's backward carries W × its part; summed over ranks, / W (as DDP averages): ∂L
        got = sum(parts) / world if grad.dim() == 0 else torch.cat(parts) / world
        assert_close(got, grad, **tol, name=f"{where}: gradient of {leaf}")


def _grade_bf16(res, schedule):
    truth, truth_grads = _expected("clip:mean", 3)
    dense, dense_grads = _expected("clip:bf16", 3, impl="reference")
    for r in res:
        ours = torch.tensor(r["out"], dtype=torch.float64)
        assert_graded(ours, dense, truth, name=f"bf16 clip_loss, {schedule}: loss", floor=1e-6)
    for leaf in ("image", "text", "scale"):
        parts = [torch.tensor(r["grads"][leaf], dtype=torch.float64) for r in res]
        ours = sum(parts) / 3 if leaf == "scale" else torch.cat(parts) / 3
        assert_graded(ours, dense_grads[leaf], truth_grads[leaf], name=f"bf16 clip_loss, {schedule}: d{leaf}")


def _everything(rank, world):
    return dict(sweep=_sweep(rank, world), contract=_contract(rank, world))


@pytest.fixture(scope="module")
def ranks():
    """One spawn of 3 ranks for the whole file (a spawn costs seconds; the checks inside take about one)."""
    return run_ranks(_everything, 3, timeout=150)


def test_every_loss_and_option_matches_the_single_process_op(ranks):
    out = [r["sweep"] for r in ranks]
    truth = {}
    for key in sorted(out[0], key=str):
        world, schedule, name = key
        if schedule == "single-process":
            continue
        if name == "clip:bf16":  # graded: error vs float64 within 2x of PyTorch's own bf16 error
            _grade_bf16([out[r][key] for r in range(3)], schedule)
            continue
        res = [out[r][key] for r in range(3) if key in out[r]]
        assert len(res) == world, key
        where = f"{world} ranks, {schedule}, {name}"
        if "@" in name:  # float32 Triton kernels: against the same kernel on the global batch
            _compare(res, world, _expected(name, world), TOL32, where)
            continue
        for impl in (None, "reference"):
            if (world, name, impl) not in truth:
                truth[(world, name, impl)] = _expected(name, world, impl)
        _compare(res, world, truth[(world, name, None)], TOL, where)
        _compare(res, world, truth[(world, name, "reference")], TOL, where + " (vs the dense reference)")
        if world == 1:  # the single-process op in the same process: bit for bit
            single = out[0][(1, "single-process", name)]
            assert res[0] == single, f"{where}: differs from the single-process op"


# ---------------------------------------------------------------- DDP, open_clip, a disagreement


class _Towers(torch.nn.Module):
    """Two linear encoders, a learnable log-scale and SigLIP's learnable bias (one-element vectors: FSDP2 does not
    take 0-dim parameters)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(5, D, dtype=torch.float64)
        self.text = torch.nn.Linear(4, D, dtype=torch.float64)
        self.logit_scale = torch.nn.Parameter(torch.tensor([0.7], dtype=torch.float64))
        self.logit_bias = torch.nn.Parameter(torch.tensor([-2.0], dtype=torch.float64))

    def forward(self, x, y, labels, loss, ops, **extra):
        a, b = self.image(x), self.text(y)
        s = self.logit_scale.exp()
        if loss == "clip":
            return ops.clip_loss(a, b, s, **extra)
        if loss == "siglip":
            return ops.siglip_loss(a, b, s, self.logit_bias, **extra)
        if loss == "nt_xent":
            return ops.nt_xent(a, b, 1 / s, **extra)
        return ops.supcon_loss(torch.stack([a, b], 1), labels, 1 / s, **extra)


def _ddp_inputs():
    n = sum(SIZES)
    return _randn(n, 40, 5), _randn(n, 41, 4), _ints(n, 3, 42)


DDP_LOSSES = ("clip", "siglip", "supcon", "nt_xent")


def _open_clip_loss_module():
    try:
        return open_clip_loss_module()
    except importlib.metadata.PackageNotFoundError:
        return None


def _contract(rank, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import infofuse.distributed as idist

    mesh = init_device_mesh("cpu", (world,))
    x, y, labels = _ddp_inputs()
    start = sum(SIZES[:rank])
    mine = slice(start, start + SIZES[rank])
    results = {}
    for schedule in SCHEDULES:
        for loss in DDP_LOSSES:
            model = DistributedDataParallel(_Towers(), find_unused_parameters=loss != "siglip")
            value = model(x[mine], y[mine], labels[mine], loss, idist, schedule=schedule)
            value.backward()
            grads = {k: p.grad.tolist() for k, p in model.module.named_parameters() if p.grad is not None}
            results[(schedule, loss)] = dict(value=value.item(), grads=grads)
        # FSDP2 (one root unit over the 3 ranks) averages the gradients as DDP does
        model = _Towers()
        fully_shard(model, mesh=mesh)
        value = model(x[mine], y[mine], labels[mine], "siglip", idist, schedule=schedule)
        value.backward()
        grads = {k: p.grad.full_tensor().tolist() for k, p in model.named_parameters()}
        results[(schedule, "siglip-fsdp2")] = dict(value=value.item(), grads=grads)

    # open_clip's gather-with-grad ClipLoss (even shards: its all_gather needs them) on the same features
    module = _open_clip_loss_module()
    if module is not None:
        a, b = _randn(8 * world, 50)[8 * rank : 8 * rank + 8], _randn(8 * world, 51)[8 * rank : 8 * rank + 8]
        s = torch.tensor(3.0, dtype=torch.float64)
        theirs = module.ClipLoss(gather_with_grad=True, rank=rank, world_size=world)(a, b, s)
        results["open_clip"] = (idist.clip_loss(a, b, s).item(), theirs.item())

    # a shape disagreement (D = 7 on rank 1) and one rank's bad target shape: every rank raises, in seconds
    errors = {}
    for what in ("D", "target"):
        q = _randn(SIZES[rank], 60, 7 if (what == "D" and rank == 1) else D)
        target = torch.zeros(SIZES[rank] + (what == "target" and rank == 2), dtype=torch.long)
        began = time.monotonic()
        try:
            idist.info_nce(q, q, scale=2.0, target=target if what == "target" else None)
            errors[what] = (None, time.monotonic() - began)
        except ValueError as e:
            errors[what] = (str(e), time.monotonic() - began)
    results["errors"] = errors
    dist.barrier()
    return results


def _single_process_gradients(loss):
    model = _Towers()
    value = model(*_ddp_inputs(), loss, infofuse)
    value.backward()
    return value.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def test_gradient_contract_under_ddp_and_fsdp2_open_clip_and_disagreement(ranks):
    out = [r["contract"] for r in ranks]
    for schedule in SCHEDULES:
        for loss in (*DDP_LOSSES, "siglip-fsdp2"):
            value, grads = _single_process_gradients(loss.removesuffix("-fsdp2"))
            for r in range(3):
                res = out[r][(schedule, loss)]
                where = f"{loss}, {schedule}, rank {r}"
                assert_close(torch.tensor(res["value"], dtype=torch.float64), value, **TOL, name=f"{where}: loss")
                assert set(res["grads"]) == set(grads), where
                for name, grad in grads.items():
                    got = torch.tensor(res["grads"][name], dtype=torch.float64)
                    assert_close(got, grad, **TOL, name=f"{where}: DDP gradient of {name}")
    if "open_clip" in out[0]:
        for r in range(3):
            ours, theirs = out[r]["open_clip"]
            assert abs(ours - theirs) <= 1e-12 * abs(theirs), (ours, theirs)
    for r in range(3):
        message, seconds = out[r]["errors"]["D"]
        assert message is not None and "`D`" in message and "ranks [0, 2] vs ranks [1]" in message, message
        assert seconds < 10
        message, seconds = out[r]["errors"]["target"]
        assert message is not None and seconds < 10
        assert ("target must have shape" in message) if r == 2 else ("rank(s) [2]" in message), message
